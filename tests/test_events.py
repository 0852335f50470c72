"""After-commit subscribers: a user's subscriber sees every commit and eviction, in order, and cannot break a save."""

from __future__ import annotations

import logging

import pytest

from hf_rl_ckpt import CheckpointCommitted, CheckpointConfig, CheckpointEvicted, CheckpointManager, Subscriber

pytestmark = pytest.mark.logic


class Recorder(Subscriber):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.drained = self.closed = 0

    def on_committed(self, event: CheckpointCommitted) -> None:
        assert (event.path / "training_info.json").is_file(), "notified before the checkpoint was in place"
        assert event.info.contents is not None and event.info.contents.deployable_dir == "model/consolidated"
        self.events.append(("committed", event.step))

    def on_evicted(self, event: CheckpointEvicted) -> None:
        assert "top 1" in event.reason
        self.events.append(("evicted", event.step))

    def drain(self) -> None:
        self.drained += 1

    def close(self) -> None:
        self.closed += 1


class Broken(Subscriber):
    def on_committed(self, event: CheckpointCommitted) -> None:
        raise RuntimeError("the dashboard is down")


def test_a_subscriber_sees_commits_and_evictions_in_order(tmp_path, make_objects):
    objs = make_objects()
    recorder = Recorder()
    manager = CheckpointManager(
        CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=1, metric_name="r"), subscribers=[recorder]
    )
    for step, reward in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2)]:
        manager.save(step, model=objs.model, metrics={"r": reward})
    manager.finalize()
    # The index evicts before later subscribers hear of the commit that caused it; the newest and the best stay.
    assert recorder.events == [
        ("committed", 1), ("evicted", 1), ("committed", 2), ("committed", 3), ("evicted", 3), ("committed", 4),
    ]
    assert [record.step for record in manager.checkpoints()] == [2, 4]
    assert (recorder.drained, recorder.closed) == (1, 1)


def test_a_failing_subscriber_is_logged_and_the_checkpoint_stays_committed(tmp_path, make_objects, caplog):
    objs = make_objects()
    recorder = Recorder()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)), subscribers=[Broken(), recorder])
    with caplog.at_level(logging.ERROR, logger="hf_rl_ckpt"):
        path = manager.save(1, model=objs.model)
    assert manager.latest() == path and [record.step for record in manager.checkpoints()] == [1]
    assert recorder.events == [("committed", 1)], "a failing subscriber kept the next one from hearing of the commit"
    assert "Broken.on_committed failed for step 1" in caplog.text and "the dashboard is down" in caplog.text
    manager.finalize()
