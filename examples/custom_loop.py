"""A plain PyTorch training loop with `CheckpointManager`: train, stop, resume, finish.

Runs offline on a tiny locally built model in a few seconds:

    python examples/custom_loop.py --output-dir runs/custom_loop            # whole run, stopping and resuming once
    python examples/custom_loop.py --output-dir runs/x --max-steps 30 --stop-at 12   # one process, exits at step 12

With `--stop-at`, the process exits after that step as a crash would (no finalize); run the
same command again without it and `resume.mode=auto` continues from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import torch
from torch.utils.data import DataLoader

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ResumableDataLoader
from hf_rl_ckpt.cli import main as cli_main
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, toy_lm_dataset


def train(output_dir: str, max_steps: int, stop_at: int | None) -> list[float]:
    """Train until `max_steps` (or `stop_at`), checkpointing every 5 steps; return this process's losses."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model("llama", seed=0, dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    dataset = toy_lm_dataset(tokenizer, n=48, seq_len=32).with_format("torch")
    loader = ResumableDataLoader(DataLoader(dataset, batch_size=8, shuffle=True))
    validation = toy_lm_dataset(tokenizer, n=16, seq_len=32, seed=1).with_format("torch")[:]

    config = CheckpointConfig(checkpoint_dir=output_dir, save_period=5, metric_name="val_loss", higher_is_better=False, keep_top_k=2)
    manager = CheckpointManager(config)
    state = manager.resume(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
    step = state.step if state else 0
    losses = []
    while step < max_steps:
        for batch in loader:
            model.train()
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            losses.append(round(loss.item(), 6))
            if manager.should_save(step) or step == max_steps:
                manager.save(step, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader,
                             metrics={"val_loss": evaluate(model, validation), "train_loss": loss.item()}, tokenizer=tokenizer)
            if manager.preempted:  # SIGTERM/SIGUSR1 (save_on_preemption): this step is saved; stop before the grace period ends
                print(f"preempted: step {step} is saved; run again to resume")
                sys.exit(0)
            if step == stop_at:
                print(f"stopping at step {step} (simulated interruption)")
                sys.exit(0)
            if step >= max_steps:
                break
    manager.finalize()
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: dict[str, torch.Tensor]) -> float:
    model.eval()
    return model(input_ids=dataset["input_ids"], attention_mask=dataset["attention_mask"], labels=dataset["labels"]).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/custom_loop")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--stop-at", type=int, default=None, help="exit after this step, as an interruption would")
    parser.add_argument("--single-process", action="store_true", help="run once in this process (used with --stop-at)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    if args.single_process or args.stop_at is not None:
        losses = train(args.output_dir, args.max_steps, args.stop_at)
        print(f"finished at step {args.max_steps}; losses of this process: {losses}")
        return
    stop_at = args.max_steps // 2 + 2
    command = [sys.executable, __file__, "--output-dir", args.output_dir, "--max-steps", str(args.max_steps)]
    print(f"== run 1: train and get interrupted at step {stop_at}")
    subprocess.run([*command, "--stop-at", str(stop_at)], check=True)
    cli_main(["list", args.output_dir])
    print("== run 2: resume.mode=auto picks up the newest checkpoint and finishes")
    subprocess.run([*command, "--single-process"], check=True)
    cli_main(["list", args.output_dir])


if __name__ == "__main__":
    main()
