"""`<checkpoint_dir>/.lock`: one writing process per checkpoint directory.

Two jobs pointed at the same `checkpoint_dir` (a restarted job while the old one still
runs, a copy-pasted config) would delete each other's in-progress saves (`_recover` clears
`.incomplete/` on start) and race on the registry. The manager therefore holds an exclusive
lock on `.lock` for its lifetime, and a second process gets a `CheckpointLockedError` that
names the holder (pid, host, start time, command).

Why a POSIX record lock (`fcntl.lockf`) and not just a pid file: the kernel releases it the
instant the holder dies, SIGKILL included, so a crashed run never blocks its own restart;
it is not inherited by forked children (DataLoader workers cannot keep a dead trainer's
lock alive); and it works on NFSv4. The file's content only describes the holder: when a
lock is acquired over content left by another process, that process died without
releasing (a stale lock) and a warning says so.

The lock is per process (POSIX record locks are): several managers on one directory in the
same process share it, reference-counted, which is what tests and a callback plus a
resume helper in one script need. A manager that is garbage-collected gives its share back.
A descendant of the holder on the same host (the workers of a launcher, a notebook or a
driver that holds the directory and starts `torchrun`) shares the holder's lock too: one
process tree is one job. Only rank 0 of a distributed job takes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import CheckpointLockedError, CorruptCheckpointError, ReadOnlyCheckpointDirError
from .layout import LOCK_FILE

logger = logging.getLogger(__name__)

_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[str, _Held] = {}
_guard = threading.Lock()


def holder_info() -> dict[str, Any]:
    """What this process writes into a lock file it holds: who it is, never its arguments (they may hold secrets)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "program": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
    }


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"unparsable": raw[:80].decode(errors="replace")}
    return data if isinstance(data, dict) else {}


def _write_holder(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    if info:
        os.write(fd, (json.dumps(info) + "\n").encode())
    os.fsync(fd)


class DirectoryLock:
    """The exclusive lock on one checkpoint directory's `.lock` file.

    ```python
    lock = DirectoryLock("runs/ckpt")
    lock.acquire()      # raises CheckpointLockedError naming the holder if another process has it
    ...
    lock.release()      # also released by the kernel if this process dies
    ```
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK_FILE
        self._share: weakref.finalize | None = None
        self._ancestor: int | None = None  # pid of the ancestor whose lock this process shares

    @property
    def held(self) -> bool:
        return self._ancestor is not None or (self._share is not None and self._share.alive)

    def acquire(self) -> None:
        """Take the lock (idempotent for this instance).

        Raises:
            CheckpointLockedError: another process holds it.
            ReadOnlyCheckpointDirError: the lock file cannot be created or written.
        """
        if self.held:
            return
        key = os.path.realpath(self.path)
        with _guard:
            if key in _held:
                _held[key].count += 1
                self._share = weakref.finalize(self, _give_back, key)
                return
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as err:
                if err.errno in _READ_ONLY_ERRNOS:
                    raise ReadOnlyCheckpointDirError(f"cannot create {self.path}: {err.strerror}") from err
                if err.errno == errno.ELOOP:  # writing the holder through it would overwrite whatever it points at
                    raise CorruptCheckpointError(
                        self.path, f"is a symlink to {os.readlink(self.path)}; hf_rl_ckpt creates its lock file itself and does not follow links. Remove it",
                    ) from err
                raise
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = _read_holder(fd)
                os.close(fd)  # this process holds no lock on the file, so closing releases nothing
                if holder.get("host") == socket.gethostname() and holder.get("pid") in _ancestors():
                    logger.info("%s is held by pid %s, an ancestor of this process: sharing it", self.path, holder["pid"])
                    self._ancestor = holder["pid"]
                    return
                raise CheckpointLockedError(self.path, holder) from None
            with contextlib.suppress(OSError):  # a lock file from before: only its owner reads who holds the directory
                os.fchmod(fd, 0o600)
            previous = _read_holder(fd)
            if previous:
                logger.warning(
                    "taking over the stale lock %s: its holder (pid %s on host %s, started %s) ended without releasing it",
                    self.path, previous.get("pid"), previous.get("host"), previous.get("started_at"),
                )
            _write_holder(fd, holder_info())
            _held[key] = _Held(fd, 1)
            self._share = weakref.finalize(self, _give_back, key)

    def release(self) -> None:
        """Give this instance's share back (idempotent); also happens when the instance is garbage-collected."""
        self._ancestor = None
        if self._share is not None:
            self._share()


def _forget_inherited() -> None:
    """In a forked child: POSIX locks are not inherited, so the parent's shares are not this process's to give back."""
    global _guard
    _held.clear()
    _guard = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_inherited)


def _ancestors() -> set[int]:
    """Pids of this process's parent, grandparent, ... up to init (from /proc; just the parent without it)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def _give_back(key: str) -> None:
    """Drop one share of the lock on `key`; the last one empties the file and unlocks it."""
    with _guard:
        entry = _held.get(key)
        if entry is None:  # a forked child's copy of a share: the child never held the lock
            return
        entry.count -= 1
        if entry.count:
            return
        del _held[key]
        _write_holder(entry.fd, {})  # empty content: the next holder knows this was a clean release
        fcntl.lockf(entry.fd, fcntl.LOCK_UN)
        os.close(entry.fd)
