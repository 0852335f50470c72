"""Which checkpoints a run sees and keeps: name templates with format specs, rollbacks (the newest is the
most recent commit, not the highest step), retention settings changed on a restart, and a working
directory that changes under a running manager."""

from __future__ import annotations

import json

import pytest

from hf_rl_ckpt import CheckpointConfig, CheckpointManager

pytestmark = pytest.mark.logic


def _names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_dir())


# ------------------------------------------------------------------ checkpoint_name_template with a format spec
def test_zero_padded_name_template_is_seen_by_latest_resume_list_and_a_restart(tmp_path, make_objects, cli):
    config = CheckpointConfig(checkpoint_dir=str(tmp_path), checkpoint_name_template="ckpt_{step:06d}")
    objs = make_objects()
    manager = CheckpointManager(config)
    manager.save(1, **objs.as_kwargs(), metrics={"loss": 2.0})
    manager.save(2, **objs.as_kwargs(), metrics={"loss": 1.5})
    assert _names(tmp_path) == ["ckpt_000001", "ckpt_000002"]
    assert manager.latest() == tmp_path / "ckpt_000002"
    assert manager.consolidated_path().parent.parent.name == "ckpt_000002"
    manager.finalize()

    restarted = CheckpointManager(config)  # its start re-indexes the registry from the directories
    assert [row.step for row in restarted.checkpoints()] == [1, 2], "the restart dropped the registry rows"
    assert restarted.resume(**make_objects(seed=3).as_kwargs()).step == 2
    restarted.finalize()

    listed = json.loads(cli("list", str(tmp_path), "--json").stdout)
    assert [(row["step"], row["name"]) for row in listed] == [(1, "ckpt_000001"), (2, "ckpt_000002")]


# ------------------------------------------------------------------ rollbacks: the newest is the most recent commit
def test_rollback_keeps_the_new_timeline_and_auto_resume_follows_it(tmp_path, make_objects, caplog):
    config = dict(checkpoint_dir=str(tmp_path), keep_top_k=1, metric_name="eval_loss", higher_is_better=False)
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(**config))
    for step, loss in [(10, 1.0), (20, 0.5), (30, 0.7)]:
        manager.save(step, **objs.as_kwargs(), metrics={"eval_loss": loss})
    assert _names(tmp_path) == ["step_20", "step_30"]  # the best, and the newest
    manager.finalize()

    caplog.clear()
    rollback = CheckpointManager(CheckpointConfig(**config, resume={"mode": "from_path", "resume_path": str(tmp_path / "step_20")}))
    assert rollback.resume(**objs.as_kwargs()).step == 20
    assert "resuming from step 20 while" in caplog.text and "holds later step(s) 30" in caplog.text
    rollback.save(25, **objs.as_kwargs(), metrics={"eval_loss": 0.6})
    assert _names(tmp_path) == ["step_20", "step_25"], "the save just made was evicted, or the abandoned step 30 kept"
    assert rollback.latest() == tmp_path / "step_25"
    assert f"evicting {tmp_path / 'step_30'}: its eval_loss=0.7 is not in the top 1" in caplog.text
    rollback.finalize()  # a crash here is the same for the next process: it only reads the directory

    after_crash = CheckpointManager(CheckpointConfig(**config))
    assert after_crash.resume(**make_objects(seed=4).as_kwargs()).step == 25
    assert [row.step for row in after_crash.checkpoints()] == [20, 25]


def test_auto_resume_follows_the_most_recent_commit_over_a_higher_step(tmp_path, make_objects, cli):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    for step in (10, 20, 30):
        manager.save(step, **objs.as_kwargs())
    manager.load(tmp_path / "step_10", **objs.as_kwargs())
    manager.save(15, **objs.as_kwargs())
    assert manager.latest() == tmp_path / "step_15"
    manager.finalize()
    assert CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**make_objects().as_kwargs()).step == 15
    rows = json.loads(cli("list", str(tmp_path), "--json").stdout)
    assert [row["step"] for row in rows] == [10, 20, 30, 15], "list shows the commit order"


def test_checkpoints_saved_before_commit_order_was_recorded_still_order_by_step(tmp_path, make_objects):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="step"))
    for step in (1, 2, 3):
        manager.save(step, **objs.as_kwargs())
    manager.finalize()
    for path in tmp_path.glob("step_*"):  # as an earlier version wrote them
        info = json.loads((path / "training_info.json").read_text())
        del info["commit_seq"], info["retention"]
        (path / "training_info.json").write_text(json.dumps(info))
    registry = json.loads((tmp_path / "checkpoints.json").read_text())
    for row in registry["checkpoints"]:
        del row["commit_seq"], row["retention"]
    (tmp_path / "checkpoints.json").write_text(json.dumps(registry))

    restarted = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="step"))
    assert restarted.latest() == tmp_path / "step_3"
    assert restarted.resume(**make_objects().as_kwargs()).step == 3
    restarted.save(4, **objs.as_kwargs())
    assert _names(tmp_path) == ["step_3", "step_4"]
    assert json.loads((tmp_path / "step_4" / "training_info.json").read_text())["commit_seq"] == 1


# ------------------------------------------------------------------ retention settings changed on a restart
def test_changed_retention_settings_keep_earlier_checkpoints_and_name_them(tmp_path, make_objects, caplog):
    objs = make_objects()
    first = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="eval_loss", higher_is_better=False))
    for step, loss in [(1, 0.9), (2, 0.5), (3, 0.4)]:
        first.save(step, **objs.as_kwargs(), metrics={"eval_loss": loss})
    first.finalize()
    assert _names(tmp_path) == ["step_2", "step_3"]

    caplog.clear()
    changed = CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=1, metric_name="reward")  # a typo or a new metric
    second = CheckpointManager(changed)
    assert "keeping step_2, step_3 although this run's retention settings" in caplog.text
    assert "metric_name='eval_loss'" in caplog.text and f"rm -r {tmp_path / 'step_2'} {tmp_path / 'step_3'}" in caplog.text
    for step, reward in [(4, 0.1), (5, 0.3), (6, 0.2)]:
        second.save(step, **objs.as_kwargs(), metrics={"reward": reward})
    assert _names(tmp_path) == ["step_2", "step_3", "step_5", "step_6"], "checkpoints of the earlier settings were deleted"
    assert "evicting" in caplog.text and f"evicting {tmp_path / 'step_4'}: its reward=0.1 is not in the top 1" in caplog.text
    second.finalize()

    caplog.clear()
    CheckpointManager(changed).finalize()  # settings unchanged since the last save: only the earlier ones are named
    assert "keeping step_2, step_3 although" in caplog.text and "step_5" not in caplog.text


# ------------------------------------------------------------------ the working directory changes under the manager
def test_relative_checkpoint_dir_is_resolved_once(tmp_path, make_objects, monkeypatch):
    (tmp_path / "launch").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "launch")
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir="ckpt", sync_weight_path="weights"))
    manager.save(1, **objs.as_kwargs())
    monkeypatch.chdir(tmp_path / "elsewhere")  # what Hydra does after the config is built
    manager.save(2, **objs.as_kwargs())
    manager.sync_weights(2, model=objs.model)
    assert _names(tmp_path / "launch" / "ckpt") == ["step_1", "step_2"]
    assert (tmp_path / "launch" / "weights").is_dir()
    assert not any((tmp_path / "elsewhere").iterdir()), "the run was split over two directories"
    assert manager.latest() == tmp_path / "launch" / "ckpt" / "step_2"
