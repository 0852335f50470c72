"""Every rank agrees on every decision: preemption, the time budget, rank 0's side effects.

The single-process tests here pin the semantics (a real SIGTERM to this process, the
handlers chained and given back, `should_save` asked twice); the multi-process ones run
tests/dist/agreement.py under torchrun (gloo) and fail on a timeout, never waiting forever.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, verify_checkpoint
from hf_rl_ckpt.layout import CheckpointLayout
from hf_rl_ckpt.distributed import on_rank0
from hf_rl_ckpt.errors import CheckpointLockedError, CorruptCheckpointError
from training_objects import make_training_objects

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dist_helpers import REPO, torchrun  # noqa: E402

pytestmark = pytest.mark.logic


def _loop(manager: CheckpointManager, objs, steps: range, signal_at: int | None = None, signum: int = signal.SIGTERM) -> list[int]:
    """Train over `steps`, sending this process `signum` during step `signal_at`; the steps saved, stopping when preempted."""
    saved, batches = [], objs.endless_batches()
    for step in steps:
        if step == signal_at:
            os.kill(os.getpid(), signum)
        objs.train_step(next(batches))
        if manager.should_save(step):
            manager.save(step, **objs.as_kwargs())
            saved.append(step)
            if manager.preempted:
                break
    return saved


def test_sigterm_is_saved_once_at_the_next_step_then_preempted_and_the_previous_handler_still_runs(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), save_period=4))
        objs = make_training_objects()
        assert _loop(manager, objs, range(1, 11), signal_at=6) == [4, 6]
        assert manager.preempted and calls == [signal.SIGTERM], "the handler installed before ours is chained"
        assert manager.should_save(6) and not manager.should_save(7), "one preemption save, then only periodic ones"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal after (or during) the save changes nothing
        assert not manager.should_save(7) and manager.checkpoints()[-1].step == 6
        verify_checkpoint(tmp_path / "step_6")
        manager.finalize()
        assert signal.getsignal(signal.SIGTERM) is not None and len(calls) == 2
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert len(calls) == 3, "finalize gave SIGTERM back to the handler found at start"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigusr1_preemption_with_async_save_writes_synchronously(tmp_path):
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), save_period=2, async_save=True))
    try:
        assert _loop(manager, make_training_objects(), range(1, 9), signal_at=5, signum=signal.SIGUSR1) == [2, 4, 5]
        assert manager.preempted
        assert [record.step for record in manager.checkpoints()] == [2, 4, 5], "committed when save() returns: the job is about to end"
        verify_checkpoint(tmp_path / "step_4")  # the async save in flight was drained first
    finally:
        manager.finalize()


def test_save_on_preemption_false_leaves_the_signals_alone(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), save_on_preemption=False))
    assert signal.getsignal(signal.SIGUSR1) == before and not manager.preempted
    manager.finalize()


def test_must_save_by_saves_once_and_asking_twice_for_a_step_gives_one_answer(tmp_path):
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), checkpoint_must_save_by="00:00:00:00"))
    assert manager.should_save(1) and manager.should_save(1) and manager.deadline_reached
    manager.save(1, **make_training_objects().as_kwargs())
    assert not manager.should_save(2) and not manager.should_save(3) and manager.deadline_reached
    manager.finalize()


def test_errors_raised_on_rank_0_reach_the_other_ranks_with_their_type_and_fields(tmp_path):
    """on_rank0 pickles rank 0's error to the others: `except CorruptCheckpointError` (resume's fallback) must work there too."""
    for error in (CorruptCheckpointError(tmp_path / "step_3", "size differs"), CheckpointLockedError(tmp_path / ".lock", {"pid": 7})):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
    assert on_rank0(lambda: {"step": 3}) == {"step": 3}


# ---------------------------------------------------------------- under torchrun (gloo)
AGREEMENT = Path(__file__).parent / "dist" / "agreement.py"
#: fault-matrix cases per rank: 5 points x 2 wraps x 2 modes, on rank 0 (5 each) and on the last rank (3 each)
MATRIX_CASES = 4 * (5 + 3)


def launch(nproc: int, *scenarios: dict, timeout: float) -> str:
    """One torchrun of tests/dist/agreement.py running `scenarios` in turn (each launch costs seconds of start-up)."""
    return torchrun(AGREEMENT, nproc, json.dumps([{**scenario, "paths": [str(path) for path in scenario["paths"]]} for scenario in scenarios]),
                    timeout=timeout)


def assert_passed(output: str, name: str, nproc: int) -> None:
    """Scenario `name` ended well on every rank; else its own failure, as the rank reported it."""
    for rank in range(nproc):
        failed = output.find(f"rank {rank}: {name} FAILED")
        assert failed < 0, f"scenario {name} failed on rank {rank}:\n{output[failed:failed + 6000]}"
        assert f"rank {rank}: {name} OK" in output, f"scenario {name} did not end on rank {rank}:\n{output[-6000:]}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank launch: a locked run directory, skewed clocks, the uninterrupted DDP run, the fault matrix, a stalled rank."""
    work = tmp_path_factory.mktemp("agreement")
    locked = work / "locked"
    locked.mkdir()
    holder = subprocess.Popen(  # another live job (not an ancestor of the ranks, whose lock they would share)
        [sys.executable, "-c", "import sys, time; from hf_rl_ckpt.lock import DirectoryLock; lock = DirectoryLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); time.sleep(300)", str(locked)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        output = launch(
            2,
            {"name": "lock", "mode": "lock", "paths": [locked]},
            {"name": "skew", "mode": "skew", "paths": [work / "skew"]},
            {"name": "straight", "mode": "train", "paths": [work / "straight", work / "straight.jsonl"]},
            {"name": "faults", "mode": "faults", "paths": [work / "runs", work / "faults"]},
            {"name": "stall", "mode": "faults", "paths": [work / "stalled", work / "stalled"], "stall": True},
            timeout=600,
        )
    finally:
        holder.kill()
        holder.wait()
    return SimpleNamespace(work=work, output=output)


def _assert_fault_matrix(output: str, results: Path, nproc: int) -> None:
    assert_passed(output, "faults", nproc)
    for rank in range(nproc):
        rows = [json.loads(line) for line in (results / f"rank_{rank}.jsonl").read_text().splitlines()]
        assert len(rows) == MATRIX_CASES
        bad = [row for row in rows if not (
            row["error"] and row["names_target"] and row["seconds"] < 60 and row["latest"] == "step_1"
            and not row["committed"] and not row["leftovers"]
        )]
        assert not bad, f"rank {rank}: {bad[:3]}"


@pytest.mark.slow
def test_a_failure_at_any_fault_point_on_any_rank_fails_the_save_on_every_rank_and_keeps_the_previous(two_ranks):
    _assert_fault_matrix(two_ranks.output, two_ranks.work / "faults", 2)


@pytest.mark.slow
def test_a_failure_at_any_fault_point_on_any_of_4_ranks_fails_the_save_on_every_rank(tmp_path):
    output = launch(4, {"name": "faults", "mode": "faults", "paths": [tmp_path / "runs", tmp_path]}, timeout=300)
    _assert_fault_matrix(output, tmp_path, 4)


@pytest.mark.slow
def test_a_rank_that_stalls_past_async_rank_timeout_fails_the_async_save_on_every_rank_instead_of_hanging_it(two_ranks):
    assert_passed(two_ranks.output, "stall", 2)
    for rank in range(2):
        (row,) = [json.loads(line) for line in (two_ranks.work / "stalled" / f"rank_{rank}.jsonl").read_text().splitlines()]
        assert "not every rank reported its part" in row["error"] and "async_rank_timeout is 8s" in row["error"], row
        assert row["seconds"] < 60 and row["latest"] == "step_1" and not row["leftovers"], row


@pytest.mark.slow
def test_ranks_whose_clocks_started_apart_write_one_checkpoint_at_one_step(two_ranks):
    assert_passed(two_ranks.output, "skew", 2)


@pytest.mark.slow
def test_a_locked_checkpoint_dir_fails_the_constructor_on_every_rank(two_ranks):
    assert_passed(two_ranks.output, "lock", 2)


def _losses(log: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, log.read_text().splitlines())}


@pytest.mark.slow
def test_sigterm_on_one_rank_saves_once_on_every_rank_exits_0_and_resumes_exactly(two_ranks, tmp_path):
    assert_passed(two_ranks.output, "straight", 2)
    reference = _losses(two_ranks.work / "straight.jsonl")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    runs = {name: (tmp_path / name, tmp_path / f"{name}.jsonl", mode) for name, mode in (("preempted", False), ("preempted-async", True))}
    preempted = launch(2, *({"name": name, "mode": "train", "paths": [run_dir, log], "sigterm_at": 3, "async": mode}
                            for name, (run_dir, log, mode) in runs.items()), timeout=300)  # exits 0
    for name, (run_dir, _, _) in runs.items():
        assert_passed(preempted, name, 2)
        assert f"{name}: saved step 3 and stopped" in preempted
        assert CheckpointLayout(run_dir).latest().name == "step_3" and sorted(CheckpointLayout(run_dir).committed_steps()) == [2, 3]
        assert verify_checkpoint(run_dir / "step_3")["world_size"] == 2
    resumed = launch(2, *({"name": name, "mode": "train", "paths": [run_dir, log], "async": mode} for name, (run_dir, log, mode) in runs.items()),
                     timeout=300)
    for name, (run_dir, log, _) in runs.items():
        assert_passed(resumed, name, 2)
        assert f"{name}: resumed from step 3" in resumed
        assert _losses(log) == reference, name
        final = [load_file(str(path / "step_6" / "model" / "consolidated" / "model.safetensors")) for path in (two_ranks.work / "straight", run_dir)]
        assert all(torch.equal(final[0][key], final[1][key]) for key in final[0]), name
