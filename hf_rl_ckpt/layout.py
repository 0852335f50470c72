"""The on-disk layout, format version 1 (see `shared/design.md`).

All path knowledge lives here so that the manager, the CLI, the converters and the Hub
publisher agree on where every file is, and so that a path read from disk (a manifest or
registry entry) is checked to stay inside its checkpoint before anything opens it.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .documents import read_json_document
from .errors import ConfigError, CorruptCheckpointError

#: On-disk format. 2: manifest entries record XXH3-128 (`digest`); format-1 checkpoints (sha256) still load and verify.
FORMAT_VERSION = 2

TRAINING_INFO = "training_info.json"
CONFIG_YAML = "config.yaml"
REGISTRY = "checkpoints.json"
MODEL_CARD = "README.md"
CONSOLIDATED_DIR = "model/consolidated"
ADAPTER_DIR = "model/adapter"
SHARDED_DIR = "model/sharded"
MASTER_DIR = "model/master"  # the weights as trained, when model/consolidated holds them cast (consolidated_dtype)
OPTIM_DIR = "optim"
SCHEDULER_JSON = "scheduler.json"
INCOMPLETE_DIR = ".incomplete"
TRASH_DIR = ".trash"
#: The names hf_rl_ckpt gives entries of `.trash/` (an evicted checkpoint; the one a re-save of its step replaced)
#: and of `.incomplete/` besides step names (a checkpoint being downloaded; a foreign one being converted).
EVICTED_PREFIX, REPLACED_PREFIX = "evicted-", "replaced-"
DOWNLOAD_PREFIX, CONVERTED_PREFIX = "download-", "converted-"
LOCK_FILE = ".lock"
DEFAULT_NAME_TEMPLATE = "step_{step}"
COMMIT_SEQ = "commit_seq"

#: Format specs of `{step}` whose output is decimal digits only, so a name parses back to its step.
_DIGITS_SPEC = re.compile(r"(0\d+)?d?")


def parse_name_template(template: str) -> tuple[str, str]:
    """(text before, text after) the step field of a checkpoint name template such as `ckpt_{step:06d}`.

    The one rule for templates, used by config validation, `CheckpointLayout.of_run` and name
    parsing: exactly one `{step}` field, with no spec or a zero-padding one (`{step:06d}`,
    `{step:d}`), so that a name formats to digits between fixed text and parses back to its
    step; and no path separator. Raises ConfigError naming `checkpoint_name_template` otherwise.
    """

    def refuse(reason: str) -> ConfigError:
        return ConfigError(
            f"checkpoint_name_template {template!r} {reason}; use the step as '{{step}}' or zero-padded as "
            "'{step:06d}' in a name without '/', e.g. 'step_{step}' or 'ckpt_{step:06d}'."
        )

    if not isinstance(template, str) or "/" in template or "\\" in template:
        raise refuse("must be a directory name without '/' or '\\'")
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as err:  # an unbalanced brace
        raise refuse(f"is not a format string ({err}; write a literal brace as '{{{{' or '}}}}')") from err
    fields = [(index, field, spec, conversion) for index, (_text, field, spec, conversion) in enumerate(pieces) if field is not None]
    if len(fields) != 1 or fields[0][1] != "step":
        raise refuse("must contain the field '{step}' exactly once and no other field")
    index, _field, spec, conversion = fields[0]
    if conversion is not None or not _DIGITS_SPEC.fullmatch(spec):
        raise refuse("formats the step with a conversion or spec that does not give plain digits to parse back")
    prefix = "".join(text for text, *_ in pieces[: index + 1])
    suffix = "".join(text for text, *_ in pieces[index + 1:])
    return prefix, suffix


def commit_order(step: int, record: Mapping[str, Any]) -> tuple[int, str, int]:
    """Sort key of a checkpoint by when it was committed, from its training_info.json or registry row.

    "Newest" means the most recent commit, not the highest step: after a resume from an
    older step the new timeline's saves are the newest. Every commit records a `commit_seq`
    one above the run's newest; checkpoints written before it existed (no `commit_seq`) come
    first, ordered by their creation time, then by step.
    """
    seq = record.get(COMMIT_SEQ)
    created = record.get("created_at")
    return (
        seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
        created if isinstance(created, str) else "",
        step,
    )


def dataloader_file(rank: int) -> str:
    return f"dataloader/rank_{rank}.json"


def rng_file(rank: int) -> str:
    return f"rng/rank_{rank}.safetensors"


def rollout_files(rank: int) -> tuple[str, str]:
    """A rank's rollout state (see `state.rollout`): its tensors, and the JSON of the rest."""
    return f"rollout/rank_{rank}.safetensors", f"rollout/rank_{rank}.json"


def safe_join(root: str | os.PathLike, relpath: str) -> Path:
    """`root/relpath`, refusing absolute paths, `..` and any symlink on the way below `root`.

    Paths in manifests and registries come from disk and may have been tampered with; this
    is the one gate every such path passes before it is opened. hf_rl_ckpt writes no links,
    so one inside a checkpoint (a folder linked to somewhere else) was planted: refused,
    wherever it points.
    """
    root = Path(root)
    if not isinstance(relpath, str) or not relpath or os.path.isabs(relpath) or "\\" in relpath:
        raise CorruptCheckpointError(root, f"refusing path {relpath!r}: paths must be relative to the checkpoint")
    parts = Path(relpath).parts
    if ".." in parts:
        raise CorruptCheckpointError(root, f"refusing path {relpath!r}: it climbs out of the checkpoint with '..'")
    candidate = root
    for part in parts:
        candidate = candidate / part
        if candidate.is_symlink():
            raise CorruptCheckpointError(
                candidate, f"is a symlink (to {os.readlink(candidate)}); checkpoints hold regular files only, so {relpath!r} is refused",
            )
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CorruptCheckpointError(root, f"refusing path {relpath!r}: a symlink leads outside the checkpoint to {real}")
    return candidate


def own_folder(path: Path) -> Path:
    """`path`, a folder hf_rl_ckpt makes inside a run directory and deletes the contents of; refused when something else is there.

    A symlink in its place (a run directory from elsewhere, shared storage) would make recovery
    delete, and saves write, wherever it points; it is never followed.
    """
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        what = f"a symlink to {os.readlink(path)}" if path.is_symlink() else "not a folder"
        raise CorruptCheckpointError(
            path, f"is {what}; hf_rl_ckpt creates it as a plain folder and deletes what it holds, so it does not follow it. "
            "Remove it (it only ever holds unfinished saves and evicted checkpoints)",
        )
    return path


@dataclass(frozen=True)
class CheckpointLayout:
    """Where the checkpoints of one run live.

    ```python
    >>> layout = CheckpointLayout("runs/ckpt")
    >>> layout.step_dir(40).name
    'step_40'
    >>> layout.parse_step("step_40")
    40
    ```
    """

    root: Path
    name_template: str = DEFAULT_NAME_TEMPLATE

    def __init__(self, root: str | os.PathLike, name_template: str = DEFAULT_NAME_TEMPLATE) -> None:
        # Absolute once, here: a later os.chdir (Hydra does one) must not move the run elsewhere.
        object.__setattr__(self, "root", Path(os.path.abspath(root)))
        object.__setattr__(self, "name_template", name_template)
        parse_name_template(name_template)

    @classmethod
    def of_run(cls, root: str | os.PathLike) -> "CheckpointLayout":
        """The layout of an existing run directory, with the name template its registry records.

        The template comes from disk, so one that `parse_name_template` refuses (it could
        name a path outside `root`) is ignored in favour of the default `step_{step}`.
        """
        template = DEFAULT_NAME_TEMPLATE
        registry = Path(root) / REGISTRY
        if registry.is_file():
            data = _read_json_object(registry)
            recorded = data.get("name_template") if data is not None else None
            try:
                parse_name_template(recorded)
                template = recorded
            except ConfigError:
                pass
        return cls(root, template)

    @property
    def registry_path(self) -> Path:
        return self.root / REGISTRY

    @property
    def incomplete_root(self) -> Path:
        """Unfinished saves, downloads and conversions (recovery deletes what it holds)."""
        return own_folder(self.root / INCOMPLETE_DIR)

    @property
    def trash_root(self) -> Path:
        """Evicted checkpoints and the ones a re-save replaced, until deleted (recovery deletes what it holds)."""
        return own_folder(self.root / TRASH_DIR)

    def step_name(self, step: int) -> str:
        return self.name_template.format(step=step)

    def step_dir(self, step: int) -> Path:
        return self.root / self.step_name(step)

    def incomplete_dir(self, step: int) -> Path:
        return self.incomplete_root / self.step_name(step)

    def parse_step(self, name: str) -> int | None:
        """The step a directory name encodes, or None if it is not a checkpoint name.

        The inverse of `step_name`: a name counts only if formatting its step gives it back
        (`step_040` is not step 40's name under `step_{step}`, nor `ckpt_40` under `ckpt_{step:06d}`).
        """
        prefix, suffix = parse_name_template(self.name_template)
        match = re.fullmatch(re.escape(prefix) + r"(\d+)" + re.escape(suffix), name)
        if match is None:
            return None
        step = int(match.group(1))
        return step if self.step_name(step) == name else None

    def committed_steps(self) -> dict[int, Path]:
        """Committed checkpoints by step, in commit order (oldest first, the newest commit last; see `commit_order`).

        A committed checkpoint is a directory named like a step and holding a
        training_info.json: that is the last file written before the atomic rename, so its
        presence means the checkpoint is whole. One whose training_info.json cannot be read
        comes last, as if newest: resuming then tries it first and reports the damage before
        falling back, instead of passing over it in silence.
        """
        return {step: path for _order, step, path, _info in self._committed()}

    def latest(self) -> Path | None:
        """The newest committed checkpoint (the most recent commit, not the highest step), or None."""
        committed = list(self.committed_steps().values())
        return committed[-1] if committed else None

    def next_commit_seq(self) -> int:
        """The `commit_seq` of the next commit: one above every committed checkpoint's."""
        return 1 + max((order[1] for order, _step, _path, info in self._committed() if info is not None), default=0)

    def committed_infos(self) -> dict[int, dict[str, Any] | None]:
        """training_info.json of every committed checkpoint (None where unreadable), in commit order."""
        return {step: info for _order, step, _path, info in self._committed()}

    def _committed(self) -> list[tuple[tuple[bool, int, str, int], int, Path, dict[str, Any] | None]]:
        found = []
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            step = self.parse_step(entry.name)
            if step is not None and entry.is_dir() and not entry.is_symlink() and (entry / TRAINING_INFO).is_file():
                info = _training_info(entry)
                found.append(((info is None, *commit_order(step, info or {})), step, entry, info))
        return sorted(found, key=lambda item: item[0])


def _training_info(ckpt_dir: Path) -> dict[str, Any] | None:
    """A checkpoint's training_info.json as verification reads it (every field typed), None when damaged (verification names it)."""
    from .verify import read_training_info  # verify joins paths with this module's safe_join

    try:
        return read_training_info(ckpt_dir)
    except (OSError, CorruptCheckpointError):
        return None


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from disk, or None when unreadable (verification reports the damage)."""
    try:
        return read_json_document(path)
    except (OSError, CorruptCheckpointError):
        return None
