"""The on-disk layout, format version 1 (see `shared/design.md`).

All path knowledge lives here so that the manager, the CLI, the converters and the Hub
publisher agree on where every file is, and so that a path read from disk (a manifest or
registry entry) is checked to stay inside its checkpoint before anything opens it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptCheckpointError

FORMAT_VERSION = 1

TRAINING_INFO = "training_info.json"
CONFIG_YAML = "config.yaml"
REGISTRY = "checkpoints.json"
MODEL_CARD = "README.md"
CONSOLIDATED_DIR = "model/consolidated"
ADAPTER_DIR = "model/adapter"
SHARDED_DIR = "model/sharded"
OPTIM_DIR = "optim"
SCHEDULER_JSON = "scheduler.json"
INCOMPLETE_DIR = ".incomplete"
TRASH_DIR = ".trash"
LOCK_FILE = ".lock"


def deployable_dir(ckpt_dir: str | os.PathLike) -> str | None:
    """The model folder a checkpoint serves from: `model/adapter` (PEFT), else `model/consolidated`.

    None when it has neither (a sharded model saved with `save_consolidated: false`). A
    checkpoint holds one or the other, never both.
    """
    return next((rel for rel in (ADAPTER_DIR, CONSOLIDATED_DIR) if (Path(ckpt_dir) / rel).is_dir()), None)


def dataloader_file(rank: int) -> str:
    return f"dataloader/rank_{rank}.json"


def rng_file(rank: int) -> str:
    return f"rng/rank_{rank}.safetensors"


def safe_join(root: str | os.PathLike, relpath: str) -> Path:
    """`root/relpath`, refusing absolute paths, `..` and symlinks that lead outside `root`.

    Paths in manifests and registries come from disk and may have been tampered with; this
    is the one gate every such path passes before it is opened.
    """
    root = Path(root)
    if not isinstance(relpath, str) or not relpath or os.path.isabs(relpath) or "\\" in relpath:
        raise CorruptCheckpointError(root, f"refusing path {relpath!r}: paths must be relative to the checkpoint")
    parts = Path(relpath).parts
    if ".." in parts:
        raise CorruptCheckpointError(root, f"refusing path {relpath!r}: it climbs out of the checkpoint with '..'")
    candidate = root.joinpath(*parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CorruptCheckpointError(root, f"refusing path {relpath!r}: a symlink leads outside the checkpoint to {real}")
    return candidate


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
    name_template: str = "step_{step}"

    def __init__(self, root: str | os.PathLike, name_template: str = "step_{step}") -> None:
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "name_template", name_template)

    @classmethod
    def of_run(cls, root: str | os.PathLike) -> "CheckpointLayout":
        """The layout of an existing run directory, with the name template its registry records.

        The template comes from disk, so one that could name a path outside `root` (a `/`,
        no `{step}`) is ignored in favour of the default `step_{step}`.
        """
        template = "step_{step}"
        registry = Path(root) / REGISTRY
        if registry.is_file():
            try:
                data = json.loads(registry.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                data = None
            recorded = data.get("name_template") if isinstance(data, dict) else None
            if isinstance(recorded, str) and "{step}" in recorded and "/" not in recorded and "\\" not in recorded and recorded.count("{") == 1:
                template = recorded
        return cls(root, template)

    @property
    def registry_path(self) -> Path:
        return self.root / REGISTRY

    @property
    def incomplete_root(self) -> Path:
        return self.root / INCOMPLETE_DIR

    @property
    def trash_root(self) -> Path:
        return self.root / TRASH_DIR

    def step_name(self, step: int) -> str:
        return self.name_template.format(step=step)

    def step_dir(self, step: int) -> Path:
        return self.root / self.step_name(step)

    def incomplete_dir(self, step: int) -> Path:
        return self.incomplete_root / self.step_name(step)

    def parse_step(self, name: str) -> int | None:
        """The step a directory name encodes, or None if it is not a checkpoint name."""
        prefix, _, suffix = self.name_template.partition("{step}")
        pattern = re.escape(prefix) + r"(\d+)" + re.escape(suffix)
        match = re.fullmatch(pattern, name)
        return int(match.group(1)) if match else None

    def committed_steps(self) -> dict[int, Path]:
        """Committed checkpoints: named like a step and holding a training_info.json.

        `training_info.json` is the last file written before the atomic rename, so its
        presence in a directory under the root means the checkpoint is whole.
        """
        found: dict[int, Path] = {}
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            step = self.parse_step(entry.name)
            if step is not None and entry.is_dir() and not entry.is_symlink() and (entry / TRAINING_INFO).is_file():
                found[step] = entry
        return dict(sorted(found.items()))
