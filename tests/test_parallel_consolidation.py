"""Every rank writes its share of an FSDP2 checkpoint's consolidated folder (`state.consolidate`).

The multi-process runs (torchrun, gloo) compare the folder written in parallel with the one
torch's rank-0 consolidation (`consolidate_safetensors_files`, what the library did before)
assembles from the same shards, load it with `from_pretrained`, and measure how many bytes
each rank's process wrote for it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
from transformers import AutoModelForCausalLM

from hf_rl_ckpt import CheckpointConfig, distributed, verify_checkpoint
from hf_rl_ckpt.errors import CheckpointSaveError
from hf_rl_ckpt.state.consolidate import plan_consolidation, write_rank_files
from hf_rl_ckpt.state.sharded import hf_state_dict, save_shards
from hf_rl_ckpt.testing.tiny import build_model

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dist_helpers import torchrun  # noqa: E402

SCRIPT = Path(__file__).parent / "dist" / "parallel_consolidation.py"
#: A page per file: buffered writes are accounted in whole pages.
PAGE = 4096


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _rank0_consolidation(sharded: Path, out: Path) -> dict[str, torch.Tensor]:
    """What the library wrote before: torch's consolidation of every rank's shards, by one process."""
    names = set()
    for path in sharded.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    out.mkdir()
    consolidate_safetensors_files(str(sharded), str(out), fqn_to_index_mapping={name: 1 for name in names})
    return _tensors(out)


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "mode", "dtype"), [(2, "sync", None), (4, "async", "bfloat16")])
def test_every_rank_writes_its_share_of_the_consolidated_folder_identical_to_rank_0s(tmp_path, ranks, mode, dtype):
    torchrun(SCRIPT, ranks, str(tmp_path), mode, *([dtype] if dtype else []))
    step = tmp_path / "every" / "step_1"
    verify_checkpoint(step)  # every consolidated file's digest, computed while it was written, matches the file
    consolidated = step / "model" / "consolidated"
    files = sorted(consolidated.glob("model-*.safetensors"))
    assert len(files) >= ranks, "max_shard_size splits the folder into a file or more per rank"

    today = _rank0_consolidation(step / "model" / "sharded", tmp_path / "rank0")
    parallel = _tensors(consolidated)
    cast = getattr(torch, dtype) if dtype else None
    assert sorted(parallel) == sorted(today)
    expected = {name: tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor for name, tensor in today.items()}
    different = [name for name in expected if parallel[name].dtype != expected[name].dtype or not torch.equal(parallel[name], expected[name])]
    assert not different, f"tensors differ from the rank-0 consolidation: {different[:4]}"
    assert "lm_head.weight" not in parallel, "the tied lm_head is stored once, as save_pretrained does"

    deployed = AutoModelForCausalLM.from_pretrained(consolidated)
    assert deployed.lm_head.weight is deployed.model.embed_tokens.weight
    reference = load_file(str(tmp_path / "reference.safetensors"))
    state = deployed.state_dict()
    for name, tensor in reference.items():
        assert torch.equal(state[name.removeprefix("model.")], tensor.to(cast) if cast is not None else tensor), name
    if dtype:
        assert deployed.dtype == cast
        with safe_open(str(next((step / "model" / "sharded").glob("*.safetensors"))), framework="pt") as shard:
            assert {shard.get_slice(name).get_dtype() for name in shard.keys()} == {"F32"}, "the shards stay as trained"

    # What each rank wrote for the folder: its bytes written with it minus without it (same state, same ranks).
    written = json.loads((tmp_path / "written.json").read_text())
    share = [rank["every"] - rank["never"] for rank in written]
    weights = sum(path.stat().st_size for path in files)
    small = sum(path.stat().st_size for path in consolidated.iterdir() if path.suffix != ".safetensors")
    slack = PAGE * len(list(consolidated.iterdir()))  # at most a partly filled page per file
    assert weights + small <= sum(share) <= weights + small + slack * ranks, f"the ranks wrote {share}, the folder holds {weights + small} bytes"
    assert share[0] <= weights / ranks + small + slack, f"rank 0 wrote {share[0]} bytes, more than its fair share of {weights / ranks:.0f} + {small}"
    assert all(share[rank] >= weights / ranks / 2 for rank in range(1, ranks)), f"every other rank writes part of {weights}: {share}"

    final = tmp_path / "final"
    assert not (final / "step_1" / "model" / "consolidated").exists(), "save_consolidated: final skips the folder before the last save"
    for name in ("step_2", "step_3"):  # the save on preemption, the one marked final
        last = AutoModelForCausalLM.from_pretrained(final / name / "model" / "consolidated").state_dict()
        assert all(torch.equal(last[key.removeprefix("model.")], tensor) for key, tensor in reference.items()), f"{name} has it, as trained"

    refusals = json.loads((tmp_path / "refusals.json").read_text())
    assert all(refusal and "planned different consolidated files" in refusal and "same `final`" in refusal for refusal in refusals), refusals
    assert not list((tmp_path / "disagree").glob("step_*")) and not any((tmp_path / "disagree" / ".incomplete").glob("*")), "nothing written"


def test_plan_gives_rank_0_no_more_than_its_fair_share_and_spreads_files_over_nodes():
    state = {f"layers.{i}.weight": torch.empty(64 + 16 * i, 1024, device="meta") for i in range(12)}
    total = sum(t.numel() * 4 for t in state.values())
    for world, per_node in ((2, 2), (4, 4), (16, 8), (64, 8)):
        plan = plan_consolidation(state, max_shard_size=400_000, world_size=world, ranks_per_node=per_node)
        assert sorted(name for file in plan.files for name in file.tensors) == sorted(state)
        load = [sum(file.nbytes for file in plan.files_of(rank)) for rank in range(world)]
        assert load[0] <= total / world, (world, load)
        assert max(load) <= total / world + max(file.nbytes for file in plan.files), f"unbalanced: {load}"
    plan = plan_consolidation(state, max_shard_size=400_000, world_size=16, ranks_per_node=8)
    writers = {file.rank for file in plan.files}
    assert {rank // 8 for rank in writers} == {0, 1}, "both nodes write"
    files_per_node = [sum(file.rank // 8 == node for file in plan.files) for node in (0, 1)]
    assert abs(files_per_node[0] - files_per_node[1]) <= 1, files_per_node


def test_a_rank_that_cannot_see_every_shard_fails_the_save_naming_the_tensor(tmp_path):
    model = build_model("llama", seed=0)
    state = hf_state_dict(model)
    with distributed.quiet_single_process_dcp():
        save_shards(state, tmp_path / "sharded")
    shard = next((tmp_path / "sharded").glob("*.safetensors"))
    plan = plan_consolidation(state, max_shard_size=10**9, world_size=1)
    shard.unlink()  # as if it were on another node's disk
    with pytest.raises(CheckpointSaveError, match=r"slices cover 0 of .* elements.*shared filesystem or set remote_dir"):
        write_rank_files(plan, tmp_path / "sharded", tmp_path / "consolidated", 0)


def test_save_consolidated_accepts_earlier_booleans_and_refuses_other_values():
    assert CheckpointConfig(save_consolidated=False).save_consolidated == "never"
    assert CheckpointConfig(save_consolidated=True).save_consolidated == "every"
    final = CheckpointConfig(save_consolidated="final")
    assert not final.consolidates(final=False) and final.consolidates(final=True)
    with pytest.raises(Exception, match="save_consolidated.*'every', 'final', 'never'"):
        CheckpointConfig(save_consolidated="sometimes")
