"""Named fault points of the save path: no-ops until a test arms one.

Crash safety is a claim about every instant of a save. Random SIGKILLs test it broadly but
rarely land in the narrow windows that matter most (between the fsync and the rename,
between the rename and the registry write, in the middle of an eviction). The save path
therefore calls `faultpoint("<phase>")` at each of those boundaries, and a test arms the
point it wants with an action: a real SIGKILL (`kill`), a pause that holds a background
write in flight (`sleep`), or an exception (`fail`).

```python
>>> from hf_rl_ckpt import faultpoint
>>> faultpoint.arm("commit.before_rename", faultpoint.fail(OSError("disk gone")), at_hit=2)  # doctest: +SKIP
>>> faultpoint.disarm()  # doctest: +SKIP
```

Subprocess tests arm a SIGKILL on the command line with `python -m hf_rl_ckpt.testing.crash
--at commit.before_rename@3 -- script.py` (see `hf_rl_ckpt.testing.crash`). Nothing reads
the environment: an unarmed call costs one truth test of an empty dict.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

Action = Callable[[], None]

#: The points an ordinary save passes, in the order it passes them.
FAULT_POINTS = (
    "save.staged",  # staging directory created, nothing written yet
    "save.part_written",  # after each part: weights, optimizer, small per-rank state
    "commit.before_fsync",  # training_info.json written, tree not yet fsynced
    "commit.before_rename",  # whole and fsynced under .incomplete/, not yet renamed into place
    "commit.after_rename",  # committed, registry not yet updated (arm `kill` here: a save cannot fail once it is in place)
    "retention.after_trash",  # evicted checkpoints moved to .trash/, registry not yet rewritten
    "retention.before_delete",  # registry rewritten, .trash/ not yet deleted
    "commit.before_hub_enqueue",  # registry final, the Hub push not yet queued
)

#: The points of replacing a directory that exists (`atomic.commit_directory` with `parked`; a re-saved step), off an ordinary save's path.
REPLACE_POINTS = (
    "replace.parked",  # the old directory renamed aside, the new one not yet in its place
    "replace.swapped",  # the new directory in place and durable, the old one not yet deleted
)

#: The points of the remote tier's background upload (`remote.RemoteStore.upload`), after the local commit.
REMOTE_POINTS = (
    "remote.file_uploaded",  # after each file of a checkpoint reached remote_dir
    "remote.before_marker",  # every file uploaded, the marker (training_info.json) not yet: not committed remotely
)

#: Every point the library calls.
ALL_POINTS = FAULT_POINTS + REPLACE_POINTS + REMOTE_POINTS


@dataclass
class _Armed:
    action: Action
    at_hit: int
    hits: int = 0


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()  # parts are written on several threads, each passing `save.part_written`


def faultpoint(name: str) -> None:
    """Run the action armed at `name` if this is the hit it was armed for; otherwise do nothing."""
    if not _armed:
        return
    with _lock:
        armed = _armed.get(name)
        if armed is None:
            return
        armed.hits += 1
        if armed.hits != armed.at_hit:
            return
    armed.action()  # outside the lock: a sleeping action must not hold up other threads' points


def arm(name: str, action: Action, *, at_hit: int = 1) -> None:
    """Run `action` at the `at_hit`-th time the save path passes `name` (counted from now), once.

    ```python
    >>> arm("save.part_written", sleep(60), at_hit=1)   # doctest: +SKIP
    ```

    Raises:
        ValueError: `name` is not one of `ALL_POINTS`, or `at_hit` is below 1.
    """
    if name not in ALL_POINTS:
        raise ValueError(f"unknown fault point {name!r}; the library calls {', '.join(ALL_POINTS)}")
    if at_hit < 1:
        raise ValueError(f"at_hit counts from 1 (got {at_hit})")
    with _lock:
        _armed[name] = _Armed(action, at_hit)


def disarm(name: str | None = None) -> None:
    """Disarm `name`, or every point when no name is given."""
    with _lock:
        if name is None:
            _armed.clear()
        else:
            _armed.pop(name, None)


def kill() -> None:
    """SIGKILL this process: a real kill, nothing mocked, no clean-up handlers run."""
    os.kill(os.getpid(), signal.SIGKILL)


def sleep(seconds: float) -> Action:
    """An action that pauses the thread passing the point (e.g. to hold a background write in flight)."""
    return lambda: time.sleep(seconds)


def fail(error: BaseException) -> Action:
    """An action that raises `error` in the thread passing the point."""

    def raise_error() -> None:
        raise error

    return raise_error
