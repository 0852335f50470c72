"""Per-rank rollout state in a distributed job, launched by tests/test_rollout_state.py.

    torchrun --nproc_per_node 2 rollout.py RUN_DIR

Each rank saves a rollout buffer of its own shape and contents; a new manager resumes and
every rank must get exactly its own back (not rank 0's), with the policy version rank 0 recorded.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.testing.tiny import build_model


def buffer_of(rank: int) -> dict:
    return {"rank": rank, "completions": torch.arange(6 * (rank + 1)).reshape(rank + 1, 6), "prompts": [f"prompt {rank}"] * (rank + 1)}


def main(run_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        config = CheckpointConfig(checkpoint_dir=str(run_dir))
        manager = CheckpointManager(config)
        model = build_model("llama", seed=0)
        manager.save(3, model=model, rollout_state=buffer_of(rank), policy_version=2)
        manager.finalize()
        manager = CheckpointManager(config)
        state = manager.resume(model=build_model("llama", seed=1))
        expected = buffer_of(rank)
        assert state.rollout_state["rank"] == rank and state.rollout_state["prompts"] == expected["prompts"], state.rollout_state
        assert torch.equal(state.rollout_state["completions"], expected["completions"]), state.rollout_state
        assert state.policy_version == 2, state.policy_version
        manager.finalize()
        print(f"rank {rank}: rollout OK", flush=True)
    finally:
        gc.collect()  # see examples/fsdp_custom_loop.py
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
