"""`hf-rl-ckpt plot`: the metric history, including evicted checkpoints, drawn from checkpoints.json."""

from __future__ import annotations

import json

import pytest

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.cli import main
from hf_rl_ckpt.errors import CheckpointError
from hf_rl_ckpt.plot import plot_run

pytestmark = pytest.mark.logic


def test_plot_draws_every_save_and_the_retained_top_k(tmp_path, make_objects):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="val_reward"))
    for step, reward in [(10, 0.2), (20, 0.6), (30, 0.4), (40, 0.9), (50, 0.1)]:
        manager.save(step, model=objs.model, metrics={"val_reward": reward})
    registry = json.loads((tmp_path / "checkpoints.json").read_text())
    assert [entry["step"] for entry in registry["history"]] == [10, 20, 30, 40, 50], "evicted saves stay in the history"
    assert main(["plot", str(tmp_path)]) == 0
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(CheckpointError, match=r"metric 'accuracy' was never recorded .* recorded: val_reward"):
        plot_run(tmp_path, tmp_path / "other.png", metric="accuracy")
