"""Drop-in APIs: NeMo-RL's and NexRL's checkpoint managers, used exactly as their training loops use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ConfigError, verify_checkpoint
from hf_rl_ckpt.compat import nemo_rl, nexrl
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer

FIXTURES = Path(__file__).with_name("fixtures")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------ NeMo-RL
def nemo_rl_loop(manager_cls, master_config: dict, steps: list[tuple[int, float]], model) -> None:
    """What NeMo-RL's GRPO loop does around a save (nemo_rl/algorithms/grpo.py), with a DCP policy checkpoint."""
    checkpointer = manager_cls(master_config["checkpointing"])
    for step, accuracy in steps:
        path = checkpointer.init_tmp_checkpoint(step, {"step": step, "val:accuracy": torch.tensor(accuracy)}, master_config)
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(Path(path) / "policy" / "weights"))
        torch.save({"epoch": 0, "batches": step}, Path(path) / "train_dataloader.pt")
        checkpointer.finalize_checkpoint(path)
    checkpointer.shutdown()


@pytest.fixture
def master_config(tmp_path) -> dict:
    config = yaml.safe_load((FIXTURES / "nemo_rl_grpo.yaml").read_text())
    config["checkpointing"].update(checkpoint_dir=str(tmp_path / "results"), keep_top_k=2)
    return config


def test_nemo_rl_loop_runs_unchanged_on_our_layout(master_config, tmp_path):
    model = build_model("llama", seed=0)
    nemo_rl_loop(nemo_rl.CheckpointManager, master_config, [(10, 0.2), (20, 0.6), (30, 0.4), (40, 0.1)], model)

    checkpointer = nemo_rl.CheckpointManager(master_config["checkpointing"])
    root = tmp_path / "results"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_20", "step_30", "step_40"], "top-2 by val:accuracy plus the newest"
    assert checkpointer.get_latest_checkpoint_path() == str(root / "step_40")
    assert checkpointer.get_best_checkpoint_path() == str(root / "step_20")
    assert checkpointer.load_training_info(root / "step_20") == {"step": 20, "val:accuracy": pytest.approx(0.6)}
    assert checkpointer.load_training_info(None) is None
    weights, optimizer = checkpointer.get_resume_paths(checkpointer.get_latest_checkpoint_path())
    assert weights == root / "step_40" / "policy" / "weights" and optimizer is None
    info = verify_checkpoint(root / "step_40")  # every file the loop wrote is in the manifest
    assert {"policy/weights/.metadata", "train_dataloader.pt", "config.yaml"} <= set(info["manifest"])
    assert yaml.safe_load((root / "step_40" / "config.yaml").read_text())["grpo"]["seed"] == 42

    staged = checkpointer.init_tmp_checkpoint(50, {"step": 50}, master_config)  # the run dies before finalize
    (Path(staged) / "train_dataloader.pt").write_bytes(b"partial")
    checkpointer.shutdown()
    restarted = nemo_rl.CheckpointManager(master_config["checkpointing"])
    assert restarted.get_latest_checkpoint_path() == str(root / "step_40")
    assert not any((root / ".incomplete").iterdir())


def test_nemo_rl_options_we_do_not_implement_are_refused_by_name(master_config):
    block = dict(master_config["checkpointing"], ft_keep_latest_k=2)
    with pytest.raises(ConfigError, match="ft_keep_latest_k"):
        nemo_rl.CheckpointManager(block)


# ------------------------------------------------------------------ NexRL
def _objects(seed: int):
    model = build_model("llama", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler) -> None:
    batch = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_nexrl_save_and_load_checkpoint(tmp_path):
    model, optimizer, scheduler = _objects(0)
    manager = nexrl.DCPCheckpointManager(model, optimizer, scheduler, build_tokenizer())
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        _train(model, optimizer, scheduler)
        manager.save_checkpoint(str(root / f"global_step_{step}"), global_step=step, remove_previous_ckpt=True)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["checkpoints.json", "global_step_3"]
    assert manager.previous_save_local_path == str(root / "global_step_3")

    restored = _objects(5)
    nexrl.DCPCheckpointManager(*restored, None).load_checkpoint(str(root / "global_step_3"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored[0].state_dict().values()))
    assert restored[1].state_dict()["state"][0]["step"] == 3 and restored[2].last_epoch == 3

    weights_only = _objects(6)
    state = nexrl.DCPCheckpointManager(*weights_only, None).load_checkpoint(str(root), load_weight_only=True)  # a run dir: its newest
    assert state.weights_only and state.step == 3
    assert not weights_only[1].state_dict()["state"], "a weight-only load leaves the optimizer fresh"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights_only[0].state_dict().values()))


def test_nexrl_weight_only_save_and_the_resume_option(tmp_path):
    model, optimizer, scheduler = _objects(0)
    _train(model, optimizer, scheduler)
    path = nexrl.DCPCheckpointManager(model, optimizer, scheduler, None).save_checkpoint(
        str(tmp_path / "ckpt" / "global_step_7"), global_step=7, save_weight_only=True
    )
    manifest = json.loads((path / "training_info.json").read_text())["manifest"]
    assert not any(name.startswith("optim/") or name == "scheduler.json" for name in manifest)
    fresh = build_model("llama", seed=3)
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "new-run"), resume={"mode": "from_path", "resume_path": str(path), "load_weight_only": True})
    assert CheckpointManager(config).resume(model=fresh).weights_only
    with pytest.raises(Exception, match="does not contain the step 8"):
        nexrl.DCPCheckpointManager(model, optimizer, scheduler, None).save_checkpoint(str(tmp_path / "ckpt" / "latest"), global_step=8)
