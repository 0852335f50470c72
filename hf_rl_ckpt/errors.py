"""Exceptions raised by hf_rl_ckpt.

Every error names the file or configuration field at fault and says what to do, so a
user reading a crashed job's log can act without opening the library's source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class CheckpointError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(CheckpointError, ValueError):
    """A configuration field is unknown, has the wrong type or an invalid value."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint that was asked for does not exist or is not a committed checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """A file of a checkpoint is missing, truncated, modified or malformed.

    Attributes:
        path: the file (or checkpoint directory) that failed the check.
        reason: what was wrong with it.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled to the other ranks with its fields (see `distributed.on_rank0`)
        return type(self), (self.path, self.reason)


class StateMismatchError(CheckpointError):
    """The checkpoint does not fit the object it is loaded into (e.g. another architecture)."""


class RemoteStorageError(CheckpointError):
    """`remote_dir` cannot be used: unreachable, credentials missing or denied, or a remote checkpoint unreadable."""


class CheckpointSaveError(CheckpointError):
    """A save failed; nothing was committed and earlier checkpoints are untouched."""


class CheckpointLockedError(CheckpointError):
    """Another process holds the checkpoint directory's lock.

    Attributes:
        holder: what the holder wrote into the lock file (pid, host, started_at, program); may be empty.
    """

    def __init__(self, lock_path: Path, holder: dict[str, Any]) -> None:
        self.lock_path, self.holder = lock_path, holder
        who = (
            f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started_at')}: {holder.get('program')})"
            if holder else "a process that has not written its details yet"
        )
        super().__init__(
            f"{lock_path.parent} is in use by {who}; lock file {lock_path}. Two runs writing one checkpoint_dir would "
            "destroy each other's saves: stop the other run or point this one at another checkpoint_dir"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.lock_path, self.holder)


class ReadOnlyCheckpointDirError(CheckpointError):
    """The checkpoint directory cannot be written (read-only mount or no permission)."""


class HubAuthError(CheckpointError):
    """The Hub refused the credentials (HTTP 401/403): publishing cannot succeed until they are fixed."""


class HubUnavailableError(CheckpointError):
    """The Hub kept failing with transient errors (5xx, timeouts, connection errors) beyond the retry budget."""


class HubPublishError(CheckpointError):
    """The Hub refused a request for another reason (e.g. 400/404/413); retrying the same request will not help."""


class UnsupportedVersionError(CheckpointError):
    """An installed library lacks an internal name hf_rl_ckpt needs (a release too new or too old)."""


class UntrustedPickleError(CheckpointError):
    """A file that only pickle can read was met and `trust_pickle` was not given.

    Attributes:
        paths: the pickled files.
    """

    def __init__(self, paths: list[Path], what: str) -> None:
        self.paths, self.what = paths, what
        names = ", ".join(str(p) for p in paths[:6]) + (f" (+{len(paths) - 6} more)" if len(paths) > 6 else "")
        super().__init__(
            f"{what} needs pickled file(s) {names}; hf_rl_ckpt unpickles nothing unless told to trust the source. "
            "If you trust it, pass --trust-pickle (CLI), trust_pickle=True (Python) or resume.trust_pickle: true (config); "
            "the files are then read with torch.load(weights_only=True) only"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.paths, self.what)
