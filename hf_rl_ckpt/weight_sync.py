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
- Resolve the link once (`os.path.realpath(sync_weight_path)`) and read every file from the
  resolved folder: two opens through the link may straddle a swap and mix two versions.
- A published folder is deleted only after two newer ones have been published, so a reader
  that resolved the link has at least one full `sync_weight_period` to finish reading.
- The folder's name says which step it holds (`step_<N>`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from .atomic import atomic_directory, fsync_dir, staging_sibling
from .errors import CheckpointError

VERSIONS_SUFFIX = ".versions"


def versions_dir(link: Path) -> Path:
    """Where the published folders behind `link` live (a hidden sibling of the link)."""
    return link.parent / f".{link.name}{VERSIONS_SUFFIX}"


def publish(link: str | os.PathLike, name: str, write: Callable[[Path], object]) -> Path:
    """Write a new version with `write(folder)` and atomically point `link` at it.

    Args:
        link: the path readers use (`sync_weight_path`); created as a relative symlink.
        name: the version folder's name, e.g. `step_40`; a repeated name gets a suffix.
        write: fills the (empty) folder it is given.

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
    previous = Path(os.path.realpath(link)) if link.is_symlink() else None
    final = versions / name
    suffix = 1
    while final.exists():  # the same step published again (e.g. after a resume): never touch what readers may hold
        final = versions / f"{name}-{suffix}"
        suffix += 1
    with atomic_directory(final) as staging:
        write(staging)
    tmp_link = staging_sibling(link)
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(os.path.relpath(final, link.parent), tmp_link)
    os.replace(tmp_link, link)
    fsync_dir(link.parent)
    for entry in versions.iterdir():  # keep the new and the previous version; drop older ones and crashed stagings
        if entry != final and (previous is None or entry.resolve() != previous):
            shutil.rmtree(entry, ignore_errors=True)
    return final
