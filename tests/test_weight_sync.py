"""Weight sync to an inference engine (`sync_weight_path`): what a reader of the published folder can rely on.

Each version carries `weight_sync.json` (step, policy version, dtype, files with sizes and XXH3-128 digests);
the newest `sync_weight_keep` versions stay whole, so a slow engine that resolved an older one keeps
reading a complete folder; `consolidated_dtype` publishes bf16 weights from fp32 master weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.errors import CheckpointError, ConfigError, CorruptCheckpointError
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer
from hf_rl_ckpt.weight_sync import PublishedWeights, published
from training_objects import make_training_objects


def test_each_version_describes_itself(tmp_path):
    objs = make_training_objects()
    link = tmp_path / "serve" / "policy"
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), sync_weight_path=str(link)))
    with pytest.raises(CheckpointError, match="nothing published"):
        published(link)
    manager.sync_weights(1, model=objs.model, tokenizer=build_tokenizer())
    folder = manager.sync_weights(2, model=objs.model, tokenizer=build_tokenizer(), policy_version=1)
    version = published(link)
    assert (version.folder, version.step, version.policy_version, version.dtype, version.sequence) == (folder, 2, 1, "float32", 2)
    on_disk = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and path.name != "weight_sync.json")
    assert sorted(version.files) == on_disk and "model.safetensors" in on_disk and "tokenizer.json" in on_disk
    for name, entry in version.files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}, name
    (folder / "model.safetensors").write_bytes(b"cut short")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        PublishedWeights.read(folder)


@pytest.mark.parametrize(("keep", "survives"), [(4, True), (2, False)], ids=["keep-4", "keep-2-default"])
def test_a_slow_reader_keeps_its_folder_while_newer_versions_are_published(tmp_path, keep, survives):
    """An engine resolved version 1 and reads it slowly while the trainer publishes 2, 3 and 4."""
    objs = make_training_objects()
    link = tmp_path / "policy"
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), sync_weight_path=str(link), sync_weight_keep=keep))
    manager.sync_weights(1, model=objs.model)
    expected = {name: tensor.clone() for name, tensor in objs.model.state_dict().items()}
    held = published(link).folder  # what the slow reader resolved
    with safe_open(held / "model.safetensors", framework="pt") as reader:  # it has started reading
        first = reader.keys()[0]
        assert torch.equal(reader.get_tensor(first), expected[first])
        for step in (2, 3, 4):
            objs.train_step(next(objs.endless_batches()))
            manager.sync_weights(step, model=objs.model)
    assert published(link).step == 4
    if not survives:  # documented: the default keeps the published version and the one before it
        assert not held.exists() and sorted(path.name for path in held.parent.iterdir()) == ["step_3", "step_4"]
        return
    assert PublishedWeights.read(held).step == 1  # every file whole, as recorded
    loaded = AutoModelForCausalLM.from_pretrained(held)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
    assert sorted(path.name for path in held.parent.iterdir()) == ["step_1", "step_2", "step_3", "step_4"]
    manager.sync_weights(5, model=objs.model)
    assert not held.exists()  # the fifth version pushes the first out


def test_consolidated_dtype_publishes_bf16_from_fp32_master_weights(tmp_path):
    model = build_model("qwen2", seed=3, tie_word_embeddings=True)
    assert model.dtype == torch.float32
    link = tmp_path / "policy"
    manager = CheckpointManager(CheckpointConfig(
        checkpoint_dir=str(tmp_path / "ckpt"), sync_weight_path=str(link), consolidated_dtype="bfloat16", max_shard_size="100KB",
    ))
    folder = manager.sync_weights(1, model=model, tokenizer=build_tokenizer())
    assert published(link).dtype == "bfloat16" and json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]  # split by bf16 sizes; tied once
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for name, p in model.named_parameters())
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    assert model.dtype == torch.float32  # the training model is untouched


def test_sync_weight_keep_below_one_is_refused():
    with pytest.raises(ConfigError, match="sync_weight_keep must be >= 1"):
        CheckpointConfig(sync_weight_keep=0)


def test_a_link_left_by_an_older_release_is_taken_over(tmp_path):
    """Versions published before weight_sync.json existed: the link's target is kept as the previous version."""
    objs = make_training_objects()
    link = tmp_path / "policy"
    old = tmp_path / ".policy.versions" / "step_7"
    objs.model.save_pretrained(old)
    os.symlink(os.path.relpath(old, tmp_path), link)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), sync_weight_path=str(link)))
    manager.sync_weights(8, model=objs.model)
    assert old.is_dir() and published(link).step == 8
    manager.sync_weights(9, model=objs.model)
    assert not old.exists() and sorted(path.name for path in old.parent.iterdir()) == ["step_8", "step_9"]
    assert Path(os.path.realpath(link)).name == "step_9"
