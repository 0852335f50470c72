"""Weight-only exports for an inference engine (`sync_weight_path`), published atomically.

An RL loop hands fresh weights to vLLM/SGLang every few steps by pointing the engine at a
folder. Rewriting that folder in place would let the engine read a half-written shard, and a
non-empty directory cannot be replaced by a rename. So `sync_weight_path` is a symlink:
every export is written to a new version folder next to it
(`.<name>.versions/step_<N>`), fsynced, and then the link is swapped with `os.replace`,
a single rename that POSIX makes atomic.

What a reader can rely on:

- Once the first export is published, `sync_weight_path` always resolves to a complete
  folder (config, tokenizer, all weight files).
- Resolve the link once (`published(sync_weight_path)` does, or
  `os.path.realpath(sync_weight_path)`) and read every file from the resolved folder: two
  opens through the link may straddle a swap and mix two versions.
- Each version folder holds `weight_sync.json`: the step, the policy version, the dtype and
  every file with its size and digest (`PublishedWeights`; XXH3-128, see `digest`).
- The newest `sync_weight_keep` versions (default 2) stay on disk: a reader that resolved
  the link keeps its folder until `sync_weight_keep - 1` newer versions are published.

The synchronous RL loop (train step -> publish -> engine reloads -> next rollouts):

```python
config = CheckpointConfig(checkpoint_dir="runs/ckpt", sync_weight_path="runs/policy")
manager = CheckpointManager(config)
llm = vllm.LLM(model=str(manager.sync_weights(0, model=model, tokenizer=tok)))   # version 0
for step in range(1, steps + 1):
    rollouts = llm.generate(prompts, sampling)          # produced by the published policy
    train_step(model, rollouts)
    manager.sync_weights(step, model=model, tokenizer=tok)   # rank 0 writes, every rank calls
    reload_vllm(llm, config.sync_weight_path)           # the engine now serves `step`'s weights
```
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_directory, fsync_dir, staging_sibling, write_bytes
from .digest import Digests
from .errors import CheckpointError, CorruptCheckpointError
from .verify import build_manifest

VERSIONS_SUFFIX = ".versions"
SYNC_INFO = "weight_sync.json"
FORMAT = "hf_rl_ckpt.weight_sync"


def versions_dir(link: Path) -> Path:
    """Where the published folders behind `link` live (a hidden sibling of the link)."""
    return link.parent / f".{link.name}{VERSIONS_SUFFIX}"


@dataclass(frozen=True)
class PublishedWeights:
    """One published version, as its `weight_sync.json` describes it.

    Attributes:
        folder: the version folder (resolved: it never changes under the reader).
        step: the training step whose weights these are.
        policy_version: the version an RL loop tags its rollouts with (the step unless the loop said otherwise).
        dtype: the dtype of the floating-point weights, e.g. "bfloat16".
        files: every file of the folder with its size and digest (`{"model.safetensors": {"size": ..., "xxh3_128": ...}}`).
        sequence: the publication order (1 for the first version published behind this link).
    """

    folder: Path
    step: int
    policy_version: int
    dtype: str | None
    files: dict[str, dict[str, Any]]
    sequence: int

    @classmethod
    def read(cls, folder: str | os.PathLike) -> PublishedWeights:
        """The description of version `folder`; CorruptCheckpointError if it has none or files are missing or cut."""
        folder = Path(folder)
        try:
            info = json.loads((folder / SYNC_INFO).read_bytes())
            version = cls(
                folder=folder, step=int(info["step"]), policy_version=int(info["policy_version"]), dtype=info.get("dtype"),
                files=dict(info["files"]), sequence=int(info["sequence"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorruptCheckpointError(folder / SYNC_INFO, f"not a published weight version ({err})") from err
        for name, entry in version.files.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != entry["size"]:
                raise CorruptCheckpointError(path, f"missing or not {entry['size']} bytes as {SYNC_INFO} records")
        return version


def published(link: str | os.PathLike) -> PublishedWeights:
    """The version `link` (`sync_weight_path`) points at now, resolved once: read every file from `.folder`."""
    link = Path(link)
    if not link.is_symlink():
        raise CheckpointError(f"nothing published at {link} yet: it is created by the first `sync_weights` on a sync step")
    return PublishedWeights.read(os.path.realpath(link))


def reload_vllm(llm: Any, link: str | os.PathLike) -> PublishedWeights:
    """Make a live `vllm.LLM` serve the version `link` points at now, in place (no engine restart); returns that version.

    Calls vLLM's `reload_weights` worker method on the resolved folder, so the engine reads
    one complete version even if a newer one is published meanwhile.
    """
    version = published(link)
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(version.folder)})
    return version


def _sequence(entry: Path) -> int:
    """A version's publication order; 0 for one published before versions were numbered."""
    try:
        return int(json.loads((entry / SYNC_INFO).read_bytes())["sequence"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def publish(
    link: str | os.PathLike, name: str, write: Callable[[Path], Digests | None], *, step: int, policy_version: int | None = None,
    dtype: str | None = None, keep: int = 2,
) -> Path:
    """Write a new version with `write(folder)` and atomically point `link` at it; keep the newest `keep` versions.

    Args:
        link: the path readers use (`sync_weight_path`); created as a relative symlink.
        name: the version folder's name, e.g. `step_40`; a repeated name gets a suffix.
        write: fills the (empty) folder it is given; may return the digests of files it wrote, by name
            (they are not read again for `weight_sync.json`).
        step, policy_version, dtype: recorded in the version's `weight_sync.json` (policy_version defaults to step).
        keep: how many published versions stay on disk, the new one included (>= 1).

    Returns:
        The published version folder.
    """
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise CheckpointError(
            f"sync_weight_path {link} exists and is not the symlink hf_rl_ckpt publishes weights through; "
            "move it away or choose another sync_weight_path"
        )
    versions = versions_dir(link)
    versions.mkdir(parents=True, exist_ok=True)
    # By publication order; hidden entries are a crashed publisher's staging.
    existing = {entry: _sequence(entry) for entry in versions.iterdir() if not entry.name.startswith(".")}
    sequence = max(existing.values(), default=0) + 1
    final = versions / name
    suffix = 1
    while final.exists():  # the same step published again (e.g. after a resume): never touch what readers may hold
        final = versions / f"{name}-{suffix}"
        suffix += 1
    with atomic_directory(final) as staging:
        digests = write(staging)
        document = {
            "format": FORMAT, "version": 2, "step": step, "policy_version": step if policy_version is None else policy_version,
            "dtype": dtype, "sequence": sequence, "published_at": time.time(), "files": build_manifest(staging, digests),
        }
        write_bytes(staging / SYNC_INFO, (json.dumps(document, indent=1) + "\n").encode())  # sealed by atomic_directory's fsync
    tmp_link = staging_sibling(link)
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(os.path.relpath(final, link.parent), tmp_link)
    os.replace(tmp_link, link)
    fsync_dir(link.parent)
    newest_first = sorted(existing, key=existing.__getitem__, reverse=True)
    for entry in [*newest_first[keep - 1:], *(entry for entry in versions.iterdir() if entry.name.startswith("."))]:
        shutil.rmtree(entry, ignore_errors=True)
    return final

