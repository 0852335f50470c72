"""Durable file primitives: fsync, write-temp-then-rename, hashing while writing.

A checkpoint is only as safe as its weakest write. Everything here follows one rule: a
reader sees either the old content or the complete new content, never a torn file, even if
the process is SIGKILLed or the machine loses power between any two system calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 8 * 1024 * 1024


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory's entries (new, renamed or deleted names) to disk."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory below `root` (files first, then their directories)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


class HashingWriter:
    """A binary file writer that computes sha256 and size of what passes through it.

    Hashing while writing means the manifest costs no second read of the bytes.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._sha.update(data)
        self.size += len(data)
        return self._fh.write(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> tuple[int, str]:
    """Write `data` to `path` through a temp file + fsync + rename; return (size, sha256)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data), hashlib.sha256(data).hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> tuple[int, str]:
    """Atomically write `obj` as pretty JSON; return (size, sha256)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 8 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()
