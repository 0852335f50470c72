"""A plain training loop with FSDP2 (`fully_shard`) and `CheckpointManager`, on CPU with the gloo backend.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_custom_loop.py --output-dir runs/fsdp
    python examples/fsdp_custom_loop.py --output-dir runs/fsdp        # world size 1, no launcher needed

Offline (a tiny model is built locally), in a few seconds. Every rank calls `manager.save`
together. Each checkpoint holds:
- `model/sharded/`: every rank's own slice of the weights, written in parallel (no rank ever
  gathers the full model);
- `model/consolidated/`: the HF folder assembled from those slices, every rank writing its
  share of the files, one tensor at a time, which `from_pretrained` and vLLM load
  (`save_consolidated: final` writes it only in the save marked `final=True`, `never` skips it);
- `optim/`: the sharded optimizer state; `dataloader/rank_<r>.json` and `rng/rank_<r>.safetensors`.

Stop early with `--stop-at N` (the process exits right after the step-N checkpoint, as a
preempted job would), then run again without it: the run resumes from the newest checkpoint.
Weights and optimizer state are resharded on load, so a resume may use another world size
(say, saved by 2 ranks, resumed by 1); the data position is per rank, so only a resume at the
same world size continues with exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ResumableDataLoader
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, toy_lm_dataset


def init_distributed() -> None:
    """Join the job torchrun started, or form a one-process group so `fully_shard` also runs without a launcher."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")  # on GPUs: "nccl", with the model on cuda:LOCAL_RANK
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def train(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    logging.basicConfig(format=f"[rank {rank}] %(message)s")
    logging.getLogger("hf_rl_ckpt").setLevel(logging.INFO if rank == 0 else logging.WARNING)  # one save line, not one per rank

    tokenizer = build_tokenizer()
    model = build_model("llama", seed=0)  # seeded: every rank starts from the same weights, then keeps its shard
    for layer in model.model.layers:  # shard each decoder layer, then the rest (embeddings, norm, head)
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # created after sharding: its state is sharded too
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    dataset = toy_lm_dataset(tokenizer, n=64, seq_len=32, seed=0).with_format("torch")
    # Each rank reads its own part of every epoch; the wrapper makes that position checkpointable.
    loader = ResumableDataLoader(DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, shuffle=True, seed=0)))

    manager = CheckpointManager(CheckpointConfig(
        checkpoint_dir=args.output_dir, save_period=args.save_every, metric_name="loss", higher_is_better=False, keep_top_k=2,
    ))
    state = manager.resume(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)  # None on a fresh start
    step = state.step if state else 0

    model.train()
    while step < args.max_steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)  # every rank must save with the same metrics
            if rank == 0:
                print(f"step {step}: loss {mean_loss.item():.4f}", flush=True)
            if manager.should_save(step) or step in (args.stop_at, args.max_steps):
                manager.save(step, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader,
                             metrics={"loss": mean_loss.item()}, tokenizer=tokenizer, final=step == args.max_steps)
            if manager.preempted:  # SIGTERM/SIGUSR1 (save_on_preemption): this step is saved on every rank
                print(f"rank {rank}: preempted, step {step} is saved; run again to resume", flush=True)
                return
            if step == args.stop_at:
                print(f"rank {rank}: stopping at step {step}; run again without --stop-at to resume", flush=True)
                return  # without finalize(), as a preempted job would end
            if step == args.max_steps:
                break
    manager.finalize()  # waits for background work and releases the checkpoint directory
    if rank == 0:
        print(f"done; best checkpoint by loss: {manager.best()}, deployable folder: {manager.best() / 'model' / 'consolidated'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/fsdp", help="the checkpoint directory")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--stop-at", type=int, default=None, help="exit right after the checkpoint of this step")
    args = parser.parse_args(argv)
    init_distributed()
    try:
        train(args)
    finally:
        # FSDP2's hooks form reference cycles that keep the sharded model, and through its device
        # mesh the process group, alive after train() returns; left to interpreter shutdown, gloo's
        # threads are torn down out of order and the process can abort (SIGABRT) after a clean run.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
