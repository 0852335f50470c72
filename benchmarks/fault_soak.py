"""Fault soak: SIGKILL a real training process at random moments, many times, and check every invariant after each kill.

    python benchmarks/fault_soak.py                  # 200 random kills, then one kill at each named phase
    python benchmarks/fault_soak.py --trials 1000 --max-delay 1.5 --seed 3

Each trial forks a training child (tiny model, AdamW, saving every step with top-2
retention) from a warmed-up fork server, kills it with SIGKILL after a random delay, then
starts a new manager on the directory and asserts what `tests/faults/faultlib.py` lists:
leftovers cleaned, every checkpoint verifies, registry consistent, the newest resumes, and
no committed checkpoint lost. Prints one JSON summary line (trials, failures, kills that
landed inside a save, newest step reached, seconds) and exits 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "faults"))
from faultlib import TrialLog, Zygote, alive, check_after_fault, random_kill_trials, reported, wait_for  # noqa: E402

from hf_rl_ckpt.faultpoint import FAULT_POINTS  # noqa: E402


def phase_trials(zygote: Zygote, work: Path, log: TrialLog) -> None:
    """One kill at each named phase of a save (its third hit), in a fresh directory each."""
    for point in FAULT_POINTS:
        if point == "commit.before_hub_enqueue":
            continue  # only reached when publishing to a Hub
        ckpt, ready = work / point / "ckpt", work / point / "ready"
        ckpt.parent.mkdir(parents=True)
        pid = zygote.run(ckpt, ready, fault=f"{point}@3")
        log.trials += 1
        try:
            wait_for(lambda: not alive(pid), timeout=120, what=f"a kill at {point}")
            outcome = zygote.wait(pid)
            assert outcome == {"signal": signal.SIGKILL}, f"the child did not die at {point}: {outcome}"
            check_after_fault(ckpt, set(reported(ready)))
        except AssertionError as err:
            log.failures.append(f"{point}: {err}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="random kills (default 200)")
    parser.add_argument("--max-delay", type=float, default=1.2, help="kill after uniform(0, this) seconds (default 1.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args()
    logging.getLogger("hf_rl_ckpt").setLevel(logging.ERROR)  # every kill is followed by expected recovery warnings
    started = time.monotonic()
    zygote = Zygote()
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as work:
            random_log = random_kill_trials(zygote, Path(work) / "random" / "ckpt", args.trials, random.Random(args.seed), args.max_delay, TrialLog())
            phase_log = TrialLog()
            phase_trials(zygote, Path(work) / "phases", phase_log)
    finally:
        zygote.close()
    summary = {
        "random_trials": random_log.trials,
        "random_failures": len(random_log.failures),
        "kills_inside_a_save": random_log.in_flight,
        "newest_step": random_log.newest,
        "phase_trials": phase_log.trials,
        "phase_failures": len(phase_log.failures),
        "seconds": round(time.monotonic() - started, 1),
    }
    for failure in random_log.failures + phase_log.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if random_log.failures or phase_log.failures else 0


if __name__ == "__main__":
    sys.exit(main())
