"""The consolidated folder describes the model as it is: compiled or wrapped models, cast dtypes.

A compiled model (`torch.compile`, also inside DDP/DataParallel, or Accelerate's regional
compilation) must save the same HF folder as the plain model, and resume in either
direction. A model cast after construction (`.to(torch.bfloat16)`) must say the dtype its
weights were written in, so `from_pretrained` loads it in that dtype. No compiled forward
runs here: wrapping is enough to get the compile wrappers, and a CPU compile is slow.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import compile_regions
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.export import export_checkpoint
from hf_rl_ckpt.accelerate import register_checkpointing
from hf_rl_ckpt.testing.tiny import build_model

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dist_helpers import full_state  # noqa: E402

INPUT_IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 8]])

WRAPPERS = {
    "torch.compile": torch.compile,
    # What `accelerator.prepare` makes of a model compiled before it under DDP: the compile wrapper inside the parallel one.
    "compiled-then-DataParallel": lambda model: torch.nn.DataParallel(torch.compile(model)),
    "accelerate-regional-compilation": compile_regions,
}


@pytest.fixture(scope="module", autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; leave none behind for other test modules."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def trained(make_objects, steps: int = 2):
    objs = make_objects(seed=0)
    batches = iter(objs.loader)
    for _ in range(steps):
        objs.train_step(next(batches))
    return objs


def assert_same_training_state(actual, expected) -> None:
    got, want = full_state(actual.model, actual.optimizer), full_state(expected.model, expected.optimizer)
    assert sorted(got) == sorted(want)
    assert [name for name in want if not torch.equal(got[name], want[name])] == []
    assert actual.optimizer.state_dict()["param_groups"] == expected.optimizer.state_dict()["param_groups"]
    assert actual.scheduler.state_dict() == expected.scheduler.state_dict()


def assert_plain_hf_folder(folder: Path, source: torch.nn.Module) -> None:
    """`folder` names the real architecture, holds unprefixed keys, and from_pretrained rebuilds `source` exactly."""
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with safe_open(folder / "model.safetensors", framework="pt") as fh:
        assert not [key for key in fh.keys() if "_orig_mod" in key or key.startswith("module.")]
    loaded, loading_info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert {kind: names for kind, names in loading_info.items() if names} == {}, "from_pretrained must find every weight"
    assert torch.equal(logits(loaded), logits(source))


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_compiled_model_saves_a_plain_folder_and_resumes_into_an_uncompiled_model(tmp_path, make_objects, wrap):
    objs = trained(make_objects)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    path = manager.save(2, **{**objs.as_kwargs(), "model": wrap(objs.model)})

    assert_plain_hf_folder(path / "model" / "consolidated", objs.model)
    assert "AutoModelForCausalLM" in (path / "README.md").read_text(), "the model card must name the loadable class"
    restored = make_objects(seed=1)
    assert CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**restored.as_kwargs()).step == 2
    assert_same_training_state(restored, objs)


def test_uncompiled_checkpoint_resumes_into_a_compiled_model(tmp_path, make_objects):
    objs = trained(make_objects)
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).save(2, **objs.as_kwargs())

    restored = make_objects(seed=1)
    compiled = torch.compile(restored.model)
    state = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**{**restored.as_kwargs(), "model": compiled})
    assert state.step == 2
    assert_same_training_state(restored, objs)


def test_weight_sync_of_a_compiled_model_is_a_plain_folder(tmp_path):
    model = build_model("llama", seed=0)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), sync_weight_path=str(tmp_path / "serve")))
    published = manager.sync_weights(1, model=torch.compile(model))
    assert_plain_hf_folder(published, model)


def test_accelerate_model_compiled_before_prepare_resumes_into_an_uncompiled_run(tmp_path):
    def start(model: torch.nn.Module):
        accelerator = Accelerator(cpu=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
        prepared = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=4))
        register_checkpointing(accelerator, CheckpointConfig(checkpoint_dir=str(tmp_path)))
        return accelerator, prepared

    source = build_model("llama", seed=0)
    accelerator, (compiled, optimizer, loader) = start(torch.compile(source))
    for batch in loader:  # trains the module inside the compile wrapper (same parameters), so nothing is compiled
        source(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = accelerator.save_state(step=2)
    assert_plain_hf_folder(path / "model" / "consolidated", source)

    AcceleratorState._reset_state(reset_partial_state=True)
    plain = build_model("llama", seed=1)
    accelerator, (model, resumed_optimizer, _) = start(plain)
    assert accelerator.load_state().step == 2
    got, want = full_state(plain, resumed_optimizer.optimizer), full_state(source, optimizer.optimizer)
    assert sorted(got) == sorted(want) and all(torch.equal(got[name], want[name]) for name in want)


# ------------------------------------------------------------------ dtype (defect 7)
def test_model_cast_after_construction_records_the_dtype_it_was_written_in(tmp_path):
    model = build_model("llama", seed=0).to(torch.bfloat16)  # built in fp32: its config says float32 until saved
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), sync_weight_path=str(tmp_path / "serve")))
    path = manager.save(1, model=model)
    published = manager.sync_weights(1, model=model)
    exported = export_checkpoint(path, tmp_path / "export")

    for folder in (path / "model" / "consolidated", published, exported):
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16", folder
        loaded = AutoModelForCausalLM.from_pretrained(folder)  # default dtype: what config.json says
        assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}, folder
        # Weights, not logits: `.to()` also cast the rotary inv_freq buffer, which from_pretrained keeps in fp32.
        assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in loaded.state_dict().items())
    assert os.path.realpath(tmp_path / "serve") == str(published)
    assert json.loads((path / "training_info.json").read_text())["model"]["dtype"] == "bfloat16"


# ---------------------------------------------------------------- consolidated_dtype
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_consolidated_dtype_serves_bf16_and_resumes_the_fp32_master_weights(tmp_path, async_save):
    """`consolidated_dtype: bfloat16` with fp32 training weights: model/consolidated is bf16 (config.json says so),
    the weights as trained are kept in model/master, and a resume restores those bit for bit."""
    from hf_rl_ckpt.verify import verify_checkpoint

    model = build_model("llama", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    optimizer.step()
    config = CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), consolidated_dtype="bfloat16", async_save=async_save)
    manager = CheckpointManager(config)
    manager.save(1, model=model, optimizer=optimizer)
    manager.finalize()
    step = tmp_path / "ckpt" / "step_1"
    verify_checkpoint(step, checksums=True)
    info = json.loads((step / "training_info.json").read_text())
    assert info["contents"]["consolidated_dtype"] == "bfloat16"
    served = manager.consolidated_path(1)
    assert json.loads((served / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(served)
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)) for name, tensor in model.state_dict().items())
    with safe_open(step / "model" / "master" / "model.safetensors", framework="pt") as reader:
        assert {reader.get_slice(name).get_dtype() for name in reader.keys()} == {"F32"}

    other = build_model("llama", seed=1)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    CheckpointManager(config).resume(model=other, optimizer=other_optimizer)
    expected, actual = full_state(model, optimizer), full_state(other, other_optimizer)
    assert expected.keys() == actual.keys() and all(torch.equal(actual[name], expected[name]) for name in expected)


def test_consolidated_dtype_equal_to_the_training_dtype_writes_no_second_copy(tmp_path):
    model = build_model("llama", seed=0, dtype=torch.bfloat16)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt"), consolidated_dtype="bfloat16"))
    manager.save(1, model=model)
    manager.finalize()
    step = tmp_path / "ckpt" / "step_1"
    assert not (step / "model" / "master").exists()
    assert json.loads((step / "training_info.json").read_text())["contents"]["consolidated_dtype"] is None


def test_sharded_consolidation_casts_the_consolidated_files_only(tmp_path):
    """The FSDP path: the consolidated files are assembled from the shards and written in the export dtype
    (split by their bf16 sizes, index total as cast); the shards the model resumes from stay fp32."""
    from hf_rl_ckpt import distributed
    from hf_rl_ckpt.state.consolidate import plan_consolidation, write_index, write_rank_files
    from hf_rl_ckpt.state.sharded import hf_state_dict, save_shards

    model = build_model("qwen2", seed=3, tie_word_embeddings=True)
    state = hf_state_dict(model)
    with distributed.quiet_single_process_dcp():
        save_shards(state, tmp_path / "sharded")
    plan = plan_consolidation(state, max_shard_size=100_000, world_size=1, dtype=torch.bfloat16)
    write_rank_files(plan, tmp_path / "sharded", tmp_path / "consolidated", 0)
    write_index(plan, tmp_path / "consolidated")
    model.config.save_pretrained(tmp_path / "consolidated")
    index = json.loads((tmp_path / "consolidated" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(param.numel() * 2 for param in model.parameters())
    assert len(set(index["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "consolidated", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)) for name, tensor in model.state_dict().items())
    for path in (tmp_path / "sharded").glob("*.safetensors"):
        with safe_open(path, framework="pt") as reader:
            assert {reader.get_slice(name).get_dtype() for name in reader.keys()} == {"F32"}
