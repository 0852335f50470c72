"""FSDP2 (`fully_shard`) checkpoints on gloo, launched by tests/test_distributed.py through torchrun.

    torchrun --nproc_per_node 2 fsdp_checkpoint.py save CKPT_DIR REF_DIR
    torchrun --nproc_per_node 4 fsdp_checkpoint.py reshard CKPT_DIR REF_DIR

`save` (world size 2): load step_1 (written by the test at world size 1, consolidated only) and
check it bit for bit; train; save step_3 sharded + consolidated and write its full tensors to
REF_DIR/step_3.safetensors; then make rank 0, and separately rank 1, fail while saving step_4
(through objects this script hands to the manager, not by patching the library) and check
that every rank gets an error naming the failed rank, that nothing was committed and that
step_3 still loads; publish step_3 with `sync_weights` (REF_DIR/policy); and train, save and
publish a sharded Qwen3-MoE model (loaded from REF_DIR/moe_single/step_1, written by the test at world size 1,
one tensor per expert) into REF_DIR/moe, with `save_pretrained` of its gathered weights
written by rank 0 as the test's reference (REF_DIR/moe/save_pretrained). `reshard` (world size 4): load step_3 and check it; train; save step_5 with
`save_consolidated: false` (shards only, which the test then loads into a plain model).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from dist_helpers import assert_state_equal, full_state
from hf_rl_ckpt import CheckpointConfig, CheckpointManager, CheckpointSaveError
from hf_rl_ckpt.testing.families import build_family
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer

#: Small enough that the consolidated folder is split into several files (exercises the index).
MAX_SHARD_SIZE = "300KB"


def build(seed: int, family: str | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_family(family, seed=seed) if family else build_model("llama", seed=seed, tie_word_embeddings=True)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def publish_and_save_moe(manager: CheckpointManager, model: torch.nn.Module, ref_dir: Path) -> None:
    """`sync_weights` of the sharded Llama, then a sharded MoE model saved and published beside `save_pretrained` of its gathered weights."""
    tokenizer = build_tokenizer()
    manager.sync_weights(3, model=model, tokenizer=tokenizer)
    moe, moe_optimizer = build(seed=9, family="qwen3_moe")
    manager.load(ref_dir / "moe_single" / "step_1", model=moe, optimizer=moe_optimizer)  # save_pretrained's names, one tensor per expert
    assert_state_equal(full_state(moe, moe_optimizer), ref_dir / "moe_step_1.safetensors", "MoE world size 1 -> 2")
    train(moe, moe_optimizer, 1)
    config = CheckpointConfig(checkpoint_dir=str(ref_dir / "moe" / "ckpt"), max_shard_size="100KB", sync_weight_path=str(ref_dir / "moe" / "policy"))
    moe_manager = CheckpointManager(config)
    moe_manager.save(1, model=moe, optimizer=moe_optimizer, tokenizer=tokenizer)
    moe_manager.sync_weights(1, model=moe, tokenizer=tokenizer)
    moe_manager.finalize()
    full = get_model_state_dict(moe, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective
    if dist.get_rank() == 0:
        gathered = build_family("qwen3_moe", seed=5)
        gathered.load_state_dict(full)
        gathered.save_pretrained(ref_dir / "moe" / "save_pretrained", max_shard_size="100KB")
        tokenizer.save_pretrained(ref_dir / "moe" / "save_pretrained")
    dist.barrier()


def save_reference(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = full_state(model, optimizer)  # collective: every rank gathers
    if dist.get_rank() == 0:
        save_file(state, str(path))
    dist.barrier()


class FailingTokenizer:
    """Stands in for a tokenizer whose files cannot be written (rank 0 writes them into the consolidated folder)."""

    def save_pretrained(self, _directory: str) -> None:
        raise OSError("injected: disk full while writing tokenizer files")


class FailingOnRank:
    """A stateful dataloader whose state cannot be captured on one rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def state_dict(self) -> dict:
        if dist.get_rank() == self.rank:
            raise RuntimeError(f"injected: rank {self.rank} cannot write its dataloader state")
        return {"position": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def expect_failed_save(manager: CheckpointManager, failing_rank: int, **state) -> None:
    try:
        manager.save(4, **state)
    except CheckpointSaveError as err:
        assert f"rank {failing_rank}: " in str(err) and "nothing was committed" in str(err), str(err)
    else:
        raise AssertionError(f"rank {dist.get_rank()}: the save with a failing rank {failing_rank} did not raise")
    root = manager.layout.root
    assert not (root / "step_4").exists() and not (root / ".incomplete" / "step_4").exists()
    assert manager.latest() == root / "step_3", manager.latest()
    dist.barrier()  # before any rank starts the next save, which recreates .incomplete/step_4


def main(mode: str, ckpt_dir: Path, ref_dir: Path) -> None:
    dist.init_process_group("gloo")
    try:
        run(mode, ckpt_dir, ref_dir)
    finally:
        gc.collect()  # free the FSDP2 models (kept by reference cycles) while the group is alive; see examples/fsdp_custom_loop.py
        dist.destroy_process_group()


def run(mode: str, ckpt_dir: Path, ref_dir: Path) -> None:
    torch.manual_seed(0)
    config = CheckpointConfig(
        checkpoint_dir=str(ckpt_dir), max_shard_size=MAX_SHARD_SIZE, save_consolidated=mode == "save", sync_weight_path=str(ref_dir / "policy"),
    )
    manager = CheckpointManager(config)
    if mode == "save":
        model, optimizer = build(seed=1)
        manager.load(ckpt_dir / "step_1", model=model, optimizer=optimizer)
        assert_state_equal(full_state(model, optimizer), ref_dir / "step_1.safetensors", "world size 1 -> 2")
        train(model, optimizer, 2)
        manager.save(3, model=model, optimizer=optimizer, tokenizer=build_tokenizer())
        save_reference(model, optimizer, ref_dir / "step_3.safetensors")
        expect_failed_save(manager, 0, model=model, optimizer=optimizer, tokenizer=FailingTokenizer())
        expect_failed_save(manager, 1, model=model, optimizer=optimizer, dataloader=FailingOnRank(1))
        fresh, fresh_optimizer = build(seed=2)
        manager.load(ckpt_dir / "step_3", model=fresh, optimizer=fresh_optimizer)
        assert_state_equal(full_state(fresh, fresh_optimizer), ref_dir / "step_3.safetensors", "reload after failed saves")
        publish_and_save_moe(manager, fresh, ref_dir)
    elif mode == "reshard":
        model, optimizer = build(seed=3)
        manager.load(ckpt_dir / "step_3", model=model, optimizer=optimizer)
        assert_state_equal(full_state(model, optimizer), ref_dir / "step_3.safetensors", "world size 2 -> 4")
        train(model, optimizer, 1)
        manager.save(5, model=model, optimizer=optimizer)
        save_reference(model, optimizer, ref_dir / "step_5.safetensors")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"rank {dist.get_rank()}: {mode} OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
