"""Parallel consolidation of an FSDP2 checkpoint, launched by tests/test_parallel_consolidation.py through torchrun.

    torchrun --nproc_per_node N parallel_consolidation.py OUT {sync|async} [DTYPE]

Trains one step of a small tied-embedding Llama sharded with `fully_shard`, writes its full
weights to OUT/reference.safetensors, then saves the same state three ways:

- OUT/never: `save_consolidated: never` (shards only) and OUT/every: `save_consolidated: every`
  (with `async_save` in `async` mode, `consolidated_dtype` = DTYPE if given). The bytes each
  rank's process wrote to storage during each save (`write_bytes` of /proc/self/io, all its
  threads) go to OUT/written.json: their difference is what each rank wrote of the
  consolidated folder.
- OUT/final: `save_consolidated: final`: step 1 without the folder; then the last rank gets a
  real SIGTERM, and step 2, the save on preemption, has it; so does step 3, saved with `final=True`.
- OUT/disagree: rank 0 alone passes `final=True`: the ranks' plans differ, and every rank's
  CheckpointSaveError goes to OUT/refusals.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from dist_helpers import full_state
from hf_rl_ckpt import CheckpointConfig, CheckpointManager, CheckpointSaveError
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer

#: Small enough that the consolidated folder is split into several files, so every rank has some to write.
MAX_SHARD_SIZE = "400KB"


def bytes_written() -> int:
    """What this process (every thread) has sent to storage so far."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["write_bytes"])


def main(out: Path, mode: str, dtype: str | None) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # ~5 MB of weights: the consolidated files are much larger than the pages and small files counted with them
    model = build_model("llama", seed=0, tie_word_embeddings=True, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    reference = full_state(model, optimizer)  # collective
    if rank == 0:
        save_file({name: tensor for name, tensor in reference.items() if name.startswith("model.")}, str(out / "reference.safetensors"))
    tokenizer = build_tokenizer()

    written = {}
    for run, consolidated in (("never", "never"), ("every", "every")):
        config = CheckpointConfig(
            checkpoint_dir=str(out / run), max_shard_size=MAX_SHARD_SIZE, save_consolidated=consolidated,
            async_save=mode == "async" and run == "every", consolidated_dtype=dtype if run == "every" else None,
        )
        manager = CheckpointManager(config)
        dist.barrier()
        before = bytes_written()
        manager.save(1, model=model, optimizer=optimizer, tokenizer=tokenizer)
        manager.finalize()  # an async save is committed here
        written[run] = bytes_written() - before
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, written)

    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(out / "final"), max_shard_size=MAX_SHARD_SIZE, save_consolidated="final"))
    manager.save(1, model=model, optimizer=optimizer, tokenizer=tokenizer)
    if rank == dist.get_world_size() - 1:
        os.kill(os.getpid(), signal.SIGTERM)
    assert manager.should_save(2) and manager.preempted
    manager.save(2, model=model, optimizer=optimizer, tokenizer=tokenizer)
    manager.save(3, model=model, optimizer=optimizer, tokenizer=tokenizer, final=True)
    manager.finalize()

    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(out / "disagree"), max_shard_size=MAX_SHARD_SIZE, save_consolidated="final"))
    try:
        manager.save(1, model=model, optimizer=optimizer, final=rank == 0)  # a loop that says "final" on one rank only
        refused = None
    except CheckpointSaveError as err:
        refused = str(err)
    manager.finalize()
    refusals = [None] * dist.get_world_size()
    dist.all_gather_object(refusals, refused)
    if rank == 0:
        (out / "written.json").write_text(json.dumps(gathered))
        (out / "refusals.json").write_text(json.dumps(refusals))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
