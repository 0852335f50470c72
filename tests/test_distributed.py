"""Multi-process checkpoints with the real torch.distributed (gloo on CPU), launched through torchrun.

Each launch costs several seconds of start-up on a small machine, so every launched script
covers several scenarios; see the docstrings of tests/dist/*.py and examples/accelerate_train.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, verify_checkpoint
from hf_rl_ckpt.testing.families import build_family
from hf_rl_ckpt.testing.tiny import build_model
from hf_rl_ckpt.weight_sync import PublishedWeights

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dist_helpers import REPO, assert_state_equal, full_state, pickle_files, torchrun  # noqa: E402

FSDP_SCRIPT = Path(__file__).parent / "dist" / "fsdp_checkpoint.py"
EXAMPLE = REPO / "examples" / "accelerate_train.py"

pytestmark = pytest.mark.slow


def _plain(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model("llama", seed=seed, tie_word_embeddings=True)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _load_plain(manager: CheckpointManager, path: Path) -> dict[str, torch.Tensor]:
    model, optimizer = _plain(seed=7)
    manager.load(path, model=model, optimizer=optimizer)
    return full_state(model, optimizer)


def test_fsdp2_sharded_save_consolidates_reshards_and_survives_a_failing_rank(tmp_path):
    ckpt, refs = tmp_path / "ckpt", tmp_path / "refs"
    refs.mkdir()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt)))
    model, optimizer = _plain(seed=0)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    manager.save(1, model=model, optimizer=optimizer)  # world size 1, consolidated only: loaded at 2 below
    save_file(full_state(model, optimizer), str(refs / "step_1.safetensors"))
    moe = build_family("qwen3_moe", seed=4)
    moe_optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    moe(input_ids=batch, labels=batch).loss.backward()
    moe_optimizer.step()
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(refs / "moe_single"))).save(1, model=moe, optimizer=moe_optimizer)
    save_file(full_state(moe, moe_optimizer), str(refs / "moe_step_1.safetensors"))

    torchrun(FSDP_SCRIPT, 2, "save", str(ckpt), str(refs))

    step_3 = ckpt / "step_3"
    info = verify_checkpoint(step_3)  # every file, shards of both ranks included, matches the manifest's digest
    manifest = info["manifest"]
    assert {"model/sharded/shard-00001-model-00001-of-00001.safetensors", "model/sharded/shard-00002-model-00001-of-00001.safetensors"} <= set(manifest)
    assert "model/consolidated/model.safetensors.index.json" in manifest and "model/consolidated/tokenizer.json" in manifest
    assert sum(name.startswith("model/consolidated/model-") for name in manifest) >= 2, "max_shard_size splits the folder"
    assert {"rng/rank_0.safetensors", "rng/rank_1.safetensors"} <= set(manifest) and info["world_size"] == 2

    reference = load_file(str(refs / "step_3.safetensors"))
    deployed = AutoModelForCausalLM.from_pretrained(step_3 / "model" / "consolidated")
    assert deployed.lm_head.weight is deployed.model.embed_tokens.weight, "tied weights are stored once and re-tied"
    weights = {name: tensor for name, tensor in reference.items() if name.startswith("model.")}
    state = deployed.state_dict()
    assert all(torch.equal(state[name.removeprefix("model.")], tensor) for name, tensor in weights.items())

    assert_state_equal(_load_plain(manager, step_3), refs / "step_3.safetensors", "world size 2 -> 1")
    published = PublishedWeights.read((refs / "policy").resolve())
    assert published.step == 3 and _same_files(published.folder, step_3 / "model" / "consolidated", besides={"weight_sync.json"}), (
        "sync_weights of the sharded model publishes the full weights: the consolidated folder, byte for byte"
    )
    moe = refs / "moe"
    for folder in (moe / "ckpt" / "step_1" / "model" / "consolidated", (moe / "policy").resolve()):
        assert _same_files(folder, moe / "save_pretrained", besides={"weight_sync.json"}), f"{folder} is save_pretrained of the gathered MoE model"

    torchrun(FSDP_SCRIPT, 4, "reshard", str(ckpt), str(refs))
    manifest = verify_checkpoint(ckpt / "step_5")["manifest"]
    assert sum(name.startswith("model/sharded/shard-") for name in manifest) == 4
    assert not any(name.startswith("model/consolidated/") for name in manifest), "save_consolidated: false"
    assert_state_equal(_load_plain(manager, ckpt / "step_5"), refs / "step_5.safetensors", "world size 4 -> 1")
    assert pickle_files(ckpt) == []


def _same_files(folder: Path, reference: Path, *, besides: set[str]) -> bool:
    names = sorted(path.name for path in folder.iterdir() if path.name not in besides)
    return names == sorted(path.name for path in reference.iterdir()) and all((folder / n).read_bytes() == (reference / n).read_bytes() for n in names)


def _losses(log: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, log.read_text().splitlines())}


def test_ddp_accelerate_run_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    common = ["--cpu", "--max-steps", "8", "--save-every", "4"]
    torchrun(EXAMPLE, 2, *common, "--output-dir", str(tmp_path / "straight"), "--log-file", str(tmp_path / "straight.jsonl"))
    resumed = ["--output-dir", str(tmp_path / "resumed"), "--log-file", str(tmp_path / "resumed.jsonl")]
    torchrun(EXAMPLE, 2, *common, *resumed, "--stop-at", "5")  # both processes exit after the step-5 checkpoint
    assert sorted(path.name for path in (tmp_path / "resumed").glob("step_*")) == ["step_4", "step_5"]
    output = torchrun(EXAMPLE, 2, *common, *resumed)  # a new torchrun resumes from step_5
    assert "resumed from step 5" in output

    assert _losses(tmp_path / "resumed.jsonl") == _losses(tmp_path / "straight.jsonl")
    assert len(_losses(tmp_path / "straight.jsonl")) == 8
    final = [load_file(str(tmp_path / run / "step_8" / "model" / "consolidated" / "model.safetensors")) for run in ("straight", "resumed")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    manifest = verify_checkpoint(tmp_path / "resumed" / "step_5")["manifest"]
    assert {f"{kind}/rank_{rank}.{ext}" for kind, ext in (("rng", "safetensors"), ("dataloader", "json")) for rank in (0, 1)} <= set(manifest)
    assert pickle_files(tmp_path / "straight") == [] and pickle_files(tmp_path / "resumed") == []


def test_from_path_converts_a_foreign_folder_on_rank_0_alone_in_a_distributed_job(tmp_path):
    """Converting used to build a nested manager on rank 0, whose collectives the other ranks never joined: a hang."""
    foreign = tmp_path / "checkpoint-3"
    build_model("llama", seed=0).save_pretrained(foreign)
    (foreign / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    torch.save({"state": {}, "param_groups": []}, foreign / "optimizer.pt")
    output = torchrun(Path(__file__).parent / "dist" / "from_path.py", 2, str(foreign), str(tmp_path / "run"), timeout=180)
    assert output.count("from_path OK") == 2, output
