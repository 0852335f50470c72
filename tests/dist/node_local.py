"""Node-local disks and one `remote_dir`: each rank's checkpoint_dir is a folder of its own (as if on its node's disk).

    torchrun --nproc_per_node 2 node_local.py save BASE URL REF_DIR
    torchrun --nproc_per_node N node_local.py resume BASE URL REF_DIR     # N = 1 or 2, BASE fresh
    torchrun --nproc_per_node 2 node_local.py unshared BASE               # no remote_dir: refused on every rank

`save`: FSDP2 over 2 ranks, rank r writing to BASE/node_r; saves steps 2, 4 and 6 with the
newest 2 kept; each rank uploads its own files and rank 0 commits the remote copy once they
are all there. Checks that the remote holds exactly steps 4 and 6, that rank 1's disk holds
only its own files of them, and writes the full tensors of step 6 to REF_DIR. `resume`: a
fresh job on empty disks resumes `auto` from the remote copy (each rank downloads it) and
must match REF_DIR bit for bit. `unshared`: without `remote_dir` such disks are refused. Run with `AWS_ENDPOINT_URL` etc. in the environment.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from dist_helpers import assert_state_equal, full_state
from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ConfigError
from hf_rl_ckpt.remote import MARKER, RemoteStore
from hf_rl_ckpt.testing.tiny import build_model


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model("llama", seed=seed)
    if dist.get_world_size() > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def manager(base: Path, url: str) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(
        checkpoint_dir=str(base / f"node_{dist.get_rank()}"), remote_dir=url, keep_top_k=2, metric_name="step",
        remote_retry={"attempts": 2, "initial_delay": 0.05},
    ))


def save(base: Path, url: str, ref_dir: Path) -> None:
    model, optimizer = build(seed=0)
    checkpoints = manager(base, url)
    for step in range(1, 7):
        batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(100 * step + dist.get_rank()))
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            checkpoints.save(step, model=model, optimizer=optimizer)
    checkpoints.finalize()
    state = full_state(model, optimizer)
    dist.barrier()
    if dist.get_rank() == 0:
        ref_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, ref_dir / "step_6.safetensors")
        assert [c.name for c in RemoteStore(url).committed()] == ["step_4", "step_6"], RemoteStore(url).committed()
    else:
        own = base / f"node_{dist.get_rank()}"
        held = sorted(path.name for path in own.iterdir() if path.name.startswith("step_"))
        assert held == ["step_4", "step_6"], held
        files = sorted(path.relative_to(own / "step_6").as_posix() for path in (own / "step_6").rglob("*") if path.is_file())
        assert not (own / "step_6" / MARKER).exists() and "rng/rank_1.safetensors" in files, files
        assert not any(name.startswith("model/consolidated/") for name in files), "rank 0 writes the shared files"


def resume(base: Path, url: str, ref_dir: Path) -> None:
    model, optimizer = build(seed=1)
    checkpoints = manager(base, url)
    state = checkpoints.resume(model=model, optimizer=optimizer)
    assert state is not None and state.step == 6, state
    assert (base / f"node_{dist.get_rank()}" / "step_6" / MARKER).is_file(), "every rank holds the whole checkpoint"
    assert_state_equal(full_state(model, optimizer), ref_dir / "step_6.safetensors", f"resumed at world size {dist.get_world_size()}")
    checkpoints.finalize()


def unshared(base: Path) -> None:
    try:
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(base / f"node_{dist.get_rank()}")))
    except ConfigError as err:
        assert "is not shared by every rank: rank(s) 1 do not see rank 0's files" in str(err) and "set remote_dir" in str(err), err
    else:
        raise AssertionError("node-local disks without remote_dir were accepted")


def main(mode: str, base: str, url: str = "", ref_dir: str = "") -> None:
    dist.init_process_group("gloo")
    try:
        if mode == "unshared":
            unshared(Path(base))
        else:
            (save if mode == "save" else resume)(Path(base), url, Path(ref_dir))
        print(f"rank {dist.get_rank()}: {mode} OK", flush=True)
    finally:
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
