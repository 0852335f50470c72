"""The registry (checkpoints.json) as an index of the run's directory: what the model-based test found beyond issue 11's list.

Each test is a sequence `tests/test_manager_model_based.py` shrank a failure to, replayed
with real saves; the module docstrings of the fixes say why.
"""

from __future__ import annotations

import shutil

import pytest

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ConfigError
from hf_rl_ckpt.cli import list_rows

pytestmark = pytest.mark.logic


def test_a_checkpoint_deleted_by_hand_mid_run_does_not_stop_retention(tmp_path, make_objects, caplog):
    """rm -r of one checkpoint while the run goes on: the next saves still index themselves and evict as configured.

    The running manager used to keep the deleted checkpoint's registry row; retention then tried
    to move that missing directory away at every commit, failed, and gave up updating the index
    and evicting for the rest of the process (the disk filled with every later save).
    """
    objects = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="step"))
    manager.save(1, **objects.as_kwargs())
    manager.save(2, **objects.as_kwargs())
    shutil.rmtree(tmp_path / "step_1")
    for step in (3, 4):
        manager.save(step, **objects.as_kwargs())
    assert sorted(manager.layout.committed_steps()) == [3, 4], "retention stopped evicting after the hand deletion"
    assert [row.step for row in manager.checkpoints()] == [3, 4], "the index still lists what is gone, or misses new saves"
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_an_index_rebuilt_at_start_keeps_the_name_template(tmp_path, make_objects):
    """checkpoints.json moved aside (as its corruption message says to) or never written (a crash between the first
    commit's rename and its indexing): the start rebuilds it, and `hf-rl-ckpt list` still finds the checkpoints."""
    objects = make_objects()
    config = CheckpointConfig(checkpoint_dir=str(tmp_path), checkpoint_name_template="ckpt-{step}-run")
    manager = CheckpointManager(config)
    manager.save(1, **objects.as_kwargs())
    manager.save(2, **objects.as_kwargs())
    manager.finalize()
    (tmp_path / "checkpoints.json").rename(tmp_path / "checkpoints.json.bad")
    restarted = CheckpointManager(config)
    assert [row.step for row in restarted.checkpoints()] == [1, 2]
    assert [row["step"] for row in list_rows(tmp_path)] == [1, 2], "`hf-rl-ckpt list` reads the rebuilt index with the default template"
    restarted.finalize()


@pytest.mark.parametrize("template", ["ckpt-{step}-run", "step-{step}"])
def test_a_restart_with_another_name_template_is_refused(tmp_path, make_objects, template):
    """The run's checkpoints are named by the template they were saved with: a start with another one would not see
    them (a silent fresh start that trains from step 0 next to them), so it is refused before anything is written."""
    objects = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="step"))
    manager.save(5, **objects.as_kwargs())
    manager.finalize()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"checkpoint_name_template") as refused:
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), checkpoint_name_template=template))
    assert "'step_{step}'" in str(refused.value) and "step_5" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # An empty directory (or one whose checkpoints are all gone) takes any template.
    shutil.rmtree(tmp_path / "step_5")
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), checkpoint_name_template=template)).finalize()


def test_the_save_after_the_newest_checkpoint_was_garbled_is_not_evicted(tmp_path, make_objects):
    """The newest checkpoint's training_info.json becomes unreadable (a disk error); the next save is the most recent
    commit and must be kept. Its commit order used to come from the readable training_info.json files only, so it
    could rank below the garbled checkpoint's indexed order, and retention evicted the save just made."""
    objects = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=2, metric_name="loss"))
    manager.save(1, **objects.as_kwargs(), metrics={"loss": 0.5})
    manager.save(3, **objects.as_kwargs())
    manager.save(3, **objects.as_kwargs())  # a re-save of the step: a later commit
    (tmp_path / "step_3" / "training_info.json").write_text('{"format_version": 1, "manifest": {')
    saved = manager.save(4, **objects.as_kwargs())
    assert (saved / "training_info.json").is_file(), "the save just made was evicted"
    assert manager.latest() == saved
    assert [row.step for row in manager.checkpoints()][-1] == 4, "the index does not order the save just made last"


def test_queries_do_not_return_a_checkpoint_deleted_by_hand(tmp_path, make_objects):
    """Between a hand deletion and the next save, `best()` returned the deleted checkpoint's path and `checkpoints()`
    listed it: the index only catches up at a save or start, the queries must not present what is gone."""
    objects = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), keep_top_k=3, metric_name="reward"))
    manager.save(1, **objects.as_kwargs(), metrics={"reward": 2.5})
    manager.save(2, **objects.as_kwargs(), metrics={"reward": 1.0})
    shutil.rmtree(tmp_path / "step_1")
    assert manager.best() == tmp_path / "step_2"
    assert [row.step for row in manager.checkpoints()] == [2]
