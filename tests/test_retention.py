"""Top-k retention: the right set over metric sequences, ties, NaN and missing metrics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.errors import CheckpointError
from hf_rl_ckpt.retention import RetentionPolicy, metric_value

pytestmark = pytest.mark.logic


def _replay(policy: RetentionPolicy, sequence: list[tuple[int, float | None]]) -> set[int]:
    """Apply the policy after each save, as the manager does, and return what survives."""
    kept: dict[int, float | None] = {}
    for step, value in sequence:
        kept.pop(step, None)  # a re-save of a step is a new commit: the newest
        kept[step] = value
        kept = {s: v for s, v in kept.items() if s in policy.retained(kept)}
    return set(kept)


def test_higher_is_better_keeps_best_k_plus_newest():
    policy = RetentionPolicy(2, "val_reward", True)
    assert _replay(policy, [(1, 0.1), (2, 0.5), (3, 0.3), (4, 0.9), (5, 0.2)]) == {2, 4, 5}


def test_lower_is_better():
    policy = RetentionPolicy(2, "eval_loss", False)
    assert _replay(policy, [(1, 3.0), (2, 1.0), (3, 2.0), (4, 0.5), (5, 4.0)]) == {2, 4, 5}


def test_ties_prefer_the_newer_step():
    policy = RetentionPolicy(2, "r", True)
    assert policy.top_k({10: 0.5, 20: 0.5, 30: 0.5}) == [30, 20]
    assert _replay(policy, [(10, 0.5), (20, 0.5), (30, 0.5), (40, 0.1)]) == {20, 30, 40}


def test_missing_metric_is_kept_only_while_newest():
    policy = RetentionPolicy(1, "r", True)
    assert _replay(policy, [(1, 0.4), (2, None), (3, 0.2)]) == {1, 3}


def test_step_metric_keeps_the_most_recent():
    policy = RetentionPolicy(2, "step", True)
    values = {s: metric_value({}, "step", s) for s in (1, 2, 3, 4)}
    assert policy.retained(values) == {3, 4}


def test_nan_metric_rejected_before_writing(tmp_path, make_objects):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="r"))
    with pytest.raises(CheckpointError, match=r"metric 'r' is NaN at step 3"):
        manager.save(3, model=objs.model, metrics={"r": math.nan})
    assert manager.checkpoints() == [] and not any(tmp_path.glob("step_*"))


def test_manager_applies_topk_over_a_run(tmp_path, make_objects, caplog):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="val_reward"))
    sequence = [(1, 0.2), (2, 0.7), (3, 0.7), (4, None), (5, 0.1), (6, 0.9)]
    for step, value in sequence:
        manager.save(step, model=objs.model, metrics={} if value is None else {"val_reward": value})
    assert "metric 'val_reward' is not among this save's metrics" in caplog.text
    rows = {row.step: row.top_k_rank for row in manager.checkpoints()}
    assert rows == {6: 1, 3: 2}
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_3", "step_6"]
    assert manager.best().name == "step_6"
    assert "evicted step(s) 2, 5" in caplog.text


def test_the_newest_is_the_most_recent_commit_not_the_highest_step():
    """Resumed from step 20 of 10..40: the new timeline's save (25) is the newest, and is kept."""
    by_metric = RetentionPolicy(1, "eval_loss", False)
    assert _replay(by_metric, [(10, 1.0), (20, 0.5), (30, 0.7), (25, 0.6)]) == {20, 25}
    assert _replay(by_metric, [(10, 1.0), (20, 0.5), (30, 0.7), (25, 0.6), (26, 0.9)]) == {20, 26}
    by_recency = RetentionPolicy(2, "step", True)  # "the k most recent" follows the new timeline too
    values = {s: metric_value({}, "step", s) for s in (10, 20, 30, 40, 21, 22)}
    assert by_recency.retained(values) == {21, 22}


def test_ties_prefer_the_more_recent_commit():
    assert RetentionPolicy(1, "r", True).top_k({30: 0.5, 20: 0.5}) == [20]


@given(
    saves=st.lists(st.tuples(st.integers(0, 40), st.one_of(st.none(), st.floats(-1, 1))), min_size=1, max_size=30),
    keep_top_k=st.integers(1, 3), metric=st.sampled_from(["r", "step"]), higher_is_better=st.booleans(),
)
def test_the_most_recent_save_always_survives_any_sequence_of_rollbacks(saves, keep_top_k, metric, higher_is_better):
    policy = RetentionPolicy(keep_top_k, metric, higher_is_better)
    sequence = [(step, metric_value({} if value is None else {"r": value}, metric, step)) for step, value in saves]
    kept = _replay(policy, sequence)
    assert sequence[-1][0] in kept
    assert len(kept) <= keep_top_k + 1
