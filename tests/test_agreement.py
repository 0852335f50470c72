"""Every rank agrees on every decision: preemption, the time budget, rank 0's side effects.

The single-process tests here pin the semantics (a real SIGTERM to this process, the
handlers chained and given back, `should_save` asked twice); the multi-process ones run
tests/dist/agreement.py under torchrun (gloo) and fail on a timeout, never waiting forever.
"""

from __future__ import annotations

import os
import pickle
import signal


from hf_rl_ckpt import CheckpointConfig, CheckpointManager, verify_checkpoint
from hf_rl_ckpt.distributed import on_rank0
from hf_rl_ckpt.errors import CheckpointLockedError, CorruptCheckpointError
from training_objects import make_training_objects


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
