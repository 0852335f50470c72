"""Named kill points for fault-injection tests: no-ops unless `HF_RL_CKPT_FAULT_POINT` is set.

Crash safety is a claim about every instant of a save. Random SIGKILLs test it broadly but
rarely land in the narrow windows that matter most (between the fsync and the rename,
between the rename and the registry write, in the middle of an eviction). The save path
therefore calls `faultpoint("<phase>")` at each of those boundaries; a test process sets

    HF_RL_CKPT_FAULT_POINT=commit.before_rename       # die at the first hit
    HF_RL_CKPT_FAULT_POINT=commit.before_rename@3     # die at the third hit (two saves commit first)

and the process SIGKILLs itself there: a real kill, nothing mocked, no cleanup handlers run.
Without the variable a call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "HF_RL_CKPT_FAULT_POINT"

#: The points an ordinary save passes, in the order it passes them.
FAULT_POINTS = (
    "save.staged",  # staging directory created, nothing written yet
    "save.part_written",  # after each part: weights, optimizer, small per-rank state
    "commit.before_fsync",  # training_info.json written, tree not yet fsynced
    "commit.before_rename",  # whole and fsynced under .incomplete/, not yet renamed into place
    "commit.after_rename",  # committed, registry not yet updated
    "retention.after_trash",  # evicted checkpoints moved to .trash/, registry not yet rewritten
    "retention.before_delete",  # registry rewritten, .trash/ not yet deleted
    "commit.before_hub_enqueue",  # registry final, the Hub push not yet queued
)

#: The points of replacing a directory that exists (`atomic.commit_directory` with `parked`; a re-saved step), off an ordinary save's path.
REPLACE_POINTS = (
    "replace.parked",  # the old directory renamed aside, the new one not yet in its place
    "replace.swapped",  # the new directory in place and durable, the old one not yet deleted
)

_hits: dict[str, int] = {}


def faultpoint(name: str) -> None:
    """SIGKILL this process if `HF_RL_CKPT_FAULT_POINT` names `name` (at its Nth hit with `name@N`)."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
