"""`resume.mode: from_path` of another framework's folder in a distributed job, launched by tests/test_distributed.py.

    torchrun --nproc_per_node 2 from_path.py FOREIGN_DIR RUN_DIR

FOREIGN_DIR is an HF Trainer `checkpoint-3` folder of `build_model("llama", seed=0)`, with a
pickled `optimizer.pt`. Rank 0 converts its weights alone (no collectives the other ranks would
have to join) while the others wait; then every rank loads it into a model built from other
weights and checks it bit for bit, and the converted copy is gone from the run's `.incomplete/`.
Resuming its optimizer too, without `resume.trust_pickle`, fails the conversion on rank 0:
every rank must raise the same UntrustedPickleError, not wait for rank 0.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_rl_ckpt import CheckpointConfig, CheckpointManager
from hf_rl_ckpt.errors import UntrustedPickleError
from hf_rl_ckpt.testing.tiny import build_model


def run(foreign: Path, run_dir: Path) -> None:
    model = build_model("llama", seed=1)
    config = CheckpointConfig(checkpoint_dir=str(run_dir), resume={"mode": "from_path", "resume_path": str(foreign), "load_weight_only": True})
    manager = CheckpointManager(config)
    state = manager.resume(model=model)
    assert state is not None and state.step == 3 and state.path == foreign, state
    expected = build_model("llama", seed=0).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=f"rank {dist.get_rank()}: {name}")
    manager.finalize()
    assert not any((run_dir / ".incomplete").iterdir()), "the converted copy was left behind"
    config = CheckpointConfig(checkpoint_dir=str(run_dir), resume={"mode": "from_path", "resume_path": str(foreign)})
    manager = CheckpointManager(config)
    try:
        manager.resume(model=model, optimizer=torch.optim.AdamW(model.parameters()))
    except UntrustedPickleError as err:
        assert "optimizer.pt" in str(err), err
    else:
        raise AssertionError(f"rank {dist.get_rank()}: a pickled optimizer.pt was converted without trust_pickle")
    manager.finalize()
    print(f"rank {dist.get_rank()}: from_path OK", flush=True)


def main(foreign: Path, run_dir: Path) -> None:
    dist.init_process_group("gloo")
    try:
        run(foreign, run_dir)
    finally:
        gc.collect()  # see examples/fsdp_custom_loop.py
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
