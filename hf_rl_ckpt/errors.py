"""Exceptions raised by hf_rl_ckpt.

Every error names the file or configuration field at fault and says what to do, so a
user reading a crashed job's log can act without opening the library's source.
"""

from __future__ import annotations

import os


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


class StateMismatchError(CheckpointError):
    """The checkpoint does not fit the object it is loaded into (e.g. another architecture)."""


class CheckpointSaveError(CheckpointError):
    """A save failed; nothing was committed and earlier checkpoints are untouched."""
