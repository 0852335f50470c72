"""Driving fault trials and checking the invariants after each one (shared by tests/faults and benchmarks/fault_soak.py).

The invariants, after any fault, once a new manager has started on the directory:
- nothing is left in `.incomplete/` or `.trash/` (cleaned by the start);
- every committed checkpoint verifies (sizes and sha256) and the registry lists exactly them;
- the newest committed checkpoint resumes, at a step at least the last one reported saved;
- no committed checkpoint was lost: every step the retention policy keeps, among those the
  child reported committed plus those present, is present.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.cli import list_rows
from hf_rl_ckpt.retention import RetentionPolicy

ZYGOTE = Path(__file__).with_name("_zygote.py")
sys.path.insert(0, str(ZYGOTE.parent))
from _zygote import CONFIG, training_objects  # noqa: E402


class Zygote:
    """A `_zygote.py` fork server: one warmed-up process that forks a training child per trial."""

    def __init__(self) -> None:
        # huggingface_hub reads these once, at import (in the fork server): plain LFS for the local test Hub, no proxy for it
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                   NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])))
        self.proc = subprocess.Popen(
            [sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ZYGOTE.parent
        )

    def _ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit code {self.proc.poll()})")
        return json.loads(line)

    def run(self, ckpt: Path, ready: Path, fault: str | None = None, seed: int = 0, config: dict | None = None, **options) -> int:
        """Fork a training child; `options` are the optional request fields of `_zygote.py` (metric, stop_after, log)."""
        return self._ask(cmd="run", ckpt=str(ckpt), ready=str(ready), fault=fault, seed=seed, config=config, **options)["pid"]

    def wait(self, pid: int) -> dict:
        return self._ask(cmd="wait", pid=pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def reported(ready: Path) -> list[int]:
    """Steps a child reported committed (its `save` returned)."""
    return [int(line) for line in ready.read_text().split()] if ready.exists() else []


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (the zygote reaps it on `wait`)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class TrialLog:
    """What a series of trials established."""

    trials: int = 0
    in_flight: int = 0  # kills that landed inside a save (a staging directory was left behind)
    failures: list[str] = field(default_factory=list)
    committed: set[int] = field(default_factory=set)
    newest: int = 0


def check_after_fault(ckpt: Path, ever_reported: set[int], config: dict | None = None) -> int:
    """Assert every invariant of the module docstring; return the step the newest checkpoint resumed at."""
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt), **CONFIG, **(config or {})))
    try:
        for leftover_dir in (ckpt / ".incomplete", ckpt / ".trash"):
            assert not leftover_dir.is_dir() or not any(leftover_dir.iterdir()), f"{leftover_dir} not cleaned: {list(leftover_dir.iterdir())}"
        present = sorted(manager.layout.committed_steps())
        rows = list_rows(ckpt, checksums=True)
        assert all(row["status"] == "verified" for row in rows), [row["status"] for row in rows if row["status"] != "verified"]
        assert [row.step for row in manager.checkpoints()] == present, "registry and directories disagree"
        if ever_reported:
            assert present and max(present) >= max(ever_reported), f"newest {present} older than reported {max(ever_reported)}"
        policy = RetentionPolicy(CONFIG["keep_top_k"], CONFIG["metric_name"])
        must_keep = policy.retained({step: float(step) for step in sorted(ever_reported | set(present))})  # in commit order
        lost = sorted(must_keep - set(present))
        assert not lost, f"committed checkpoint(s) {lost} lost; present {present}"
        if not present:
            return 0
        model, optimizer, scheduler, loader = training_objects(seed=99)
        state = manager.resume(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
        assert state is not None and state.step == max(present)
        return state.step
    finally:
        manager.finalize()


def random_kill_trials(zygote: Zygote, ckpt: Path, trials: int, rng: random.Random, max_delay: float, log: TrialLog) -> TrialLog:
    """`trials` rounds of: fork a training child, SIGKILL it after a random delay, check every invariant."""
    ready = ckpt.parent / f"{ckpt.name}.ready"
    for trial in range(trials):
        pid = zygote.run(ckpt, ready, seed=trial)
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(pid, signal.SIGKILL)
        outcome = zygote.wait(pid)
        log.trials += 1
        log.committed |= set(reported(ready))
        log.in_flight += (ckpt / ".incomplete").is_dir() and any((ckpt / ".incomplete").iterdir())
        try:
            assert outcome == {"signal": signal.SIGKILL}, f"the child did not die by our SIGKILL: {outcome}"
            log.newest = check_after_fault(ckpt, log.committed)
        except AssertionError as err:
            log.failures.append(f"trial {trial}: {err}")
    return log
