"""SIGKILL a real training process at random moments and at every named phase of a save.

After each kill a new manager starts on the directory, and `faultlib.check_after_fault`
asserts: leftovers cleaned, every checkpoint verifies, the registry matches, the newest
resumes, and nothing committed was lost. `benchmarks/fault_soak.py` runs the same trials
longer (200 by default).
"""

from __future__ import annotations

import random
import signal

import pytest
from faultlib import TrialLog, alive, check_after_fault, random_kill_trials, reported, wait_for

from hf_rl_ckpt.faultpoint import FAULT_POINTS

pytestmark = pytest.mark.logic

RANDOM_TRIALS = 30


def test_random_sigkills_never_lose_or_break_a_checkpoint(tmp_path, zygote):
    log = random_kill_trials(zygote, tmp_path / "ckpt", RANDOM_TRIALS, random.Random(20240611), max_delay=0.9, log=TrialLog())
    assert log.trials == RANDOM_TRIALS
    assert not log.failures, "\n".join(log.failures)
    assert log.newest >= 10, f"the trials made too little progress to mean much (newest step {log.newest})"
    assert log.in_flight >= RANDOM_TRIALS // 6, f"only {log.in_flight} kills landed inside a save"


#: Which hit of each point to die at: late enough that earlier saves committed and retention has evicted.
HIT = {"save.part_written": 7, "retention.after_trash": 1, "commit.before_hub_enqueue": None}  # the Hub point: its own test below


@pytest.mark.parametrize("point", [p for p in FAULT_POINTS if HIT.get(p, 3) is not None])
def test_kill_at_each_phase_of_a_save(tmp_path, zygote, point):
    ckpt, ready = tmp_path / "ckpt", tmp_path / "ready"
    pid = zygote.run(ckpt, ready, fault=f"{point}@{HIT.get(point, 3)}")
    wait_for(lambda: not alive(pid), timeout=60, what=f"the child to reach {point}")
    assert zygote.wait(pid) == {"signal": signal.SIGKILL}
    before = reported(ready)
    staged = sorted(p.name for p in (ckpt / ".incomplete").iterdir())
    trashed = sorted(p.name for p in (ckpt / ".trash").iterdir()) if (ckpt / ".trash").is_dir() else []
    if point.startswith(("save.", "commit.before")):
        assert staged == [f"step_{max(before, default=0) + 1}"], "the kill should leave the save in flight under .incomplete/"
    if point == "retention.after_trash":
        assert trashed == ["evicted-step_1"]
    resumed = check_after_fault(ckpt, set(before))
    committed_unreported = point.startswith(("commit.after", "retention."))
    assert resumed == max(before, default=0) + committed_unreported
