"""Train a tiny causal LM with Accelerate; `accelerator.save_state()`/`load_state()` go through hf_rl_ckpt.

Runs alike on one process and many:

    python examples/accelerate_train.py --output-dir runs/acc
    torchrun --nproc_per_node 2 examples/accelerate_train.py --cpu --output-dir runs/acc
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --output-dir runs/acc
    torchrun --nproc_per_node 2 examples/accelerate_train.py --cpu --zero-stage 3 --output-dir runs/acc-zero3

(`accelerate launch --multi_gpu` starts its processes through torchrun, so on a machine
without GPUs it works too when the script gets `--cpu`; `accelerate launch --cpu` runs
several CPU processes only through MPI.)

Stop early with `--stop-at N` (the run saves at step N and exits, as a preempted job would),
then run the same command without it: the run resumes from the newest checkpoint in
`--output-dir` mid-epoch, with the same batches, dropout masks and learning rates it would
have had without the interruption. Each checkpoint's `model/consolidated/` folder loads with
`AutoModelForCausalLM.from_pretrained` (and serves with vLLM); no file in it is a pickle.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from hf_rl_ckpt import CheckpointConfig
from hf_rl_ckpt.accelerate import register_checkpointing
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, toy_lm_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="checkpoint directory (resumed from when it holds checkpoints)")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--stop-at", type=int, default=None, help="save at this step and exit, to simulate preemption")
    parser.add_argument("--keep", type=int, default=2, help="keep_top_k: best checkpoints by loss kept (the newest always is)")
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is visible")
    parser.add_argument("--log-file", default=None, help="append one JSON line per step (step, loss) from the main process")
    parser.add_argument("--zero-stage", type=int, choices=(2, 3), default=None, help="train under DeepSpeed ZeRO-2 or ZeRO-3")
    return parser.parse_args(argv)


def deepspeed_accelerator(stage: int, cpu: bool) -> Accelerator:
    """An Accelerator with a DeepSpeed ZeRO plugin; on CPU, over gloo (DeepSpeed would ask for oneCCL)."""
    import os

    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin

    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        PartialState(backend="gloo")
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}  # partition even tiny tensors
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
              "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu) if args.zero_stage is None else deepspeed_accelerator(args.zero_stage, args.cpu)
    try:
        train(accelerator, args)
    finally:
        # Leaves the process group on every rank before the interpreter exits: a rank exiting with it
        # still up tears its connections down during shutdown, which can abort a process under gloo.
        # The prepared model (DDP) holds the group too, and the Accelerator holds the model: release
        # both first, or the group outlives `end_training` and is torn down at shutdown all the same
        # (SIGABRT, "terminate called without an active exception", about 1 run in 20 on 2 busy cores).
        accelerator.free_memory()
        accelerator.end_training()


def train(accelerator: Accelerator, args: argparse.Namespace) -> None:
    set_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model("llama", seed=args.seed, dropout=0.1)
    dataset = toy_lm_dataset(tokenizer, n=48, seq_len=32, seed=args.seed).with_format("torch")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    # Accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=2 * accelerator.num_processes, num_training_steps=args.max_steps * accelerator.num_processes
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    config = CheckpointConfig(checkpoint_dir=args.output_dir, metric_name="loss", higher_is_better=False, keep_top_k=args.keep)
    manager = register_checkpointing(accelerator, config, tokenizer=tokenizer, training_config=vars(args))
    state = accelerator.load_state()  # the newest complete checkpoint, or None on a fresh start
    step = state.step if state else 0
    accelerator.print(f"resumed from step {step} ({state.path})" if state else "starting fresh")

    model.train()
    while step < args.max_steps:
        for batch in loader:  # after a resume, continues with the first batch the interrupted run had not seen
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            mean_loss = accelerator.gather(loss.detach()).mean().item()
            accelerator.print(f"step {step}: loss {mean_loss:.4f}")
            if args.log_file and accelerator.is_main_process:
                with open(args.log_file, "a") as log:
                    log.write(json.dumps({"step": step, "loss": mean_loss}) + "\n")
            if step % args.save_every == 0 or step in (args.stop_at, args.max_steps):
                accelerator.save_state(step=step, metrics={"loss": mean_loss})
            if step == args.stop_at:
                accelerator.print(f"stopping at step {step} as asked; run again without --stop-at to resume")
                manager.finalize()
                return
            if step == args.max_steps:
                break
    manager.finalize()  # waits for background work (Hub pushes) and releases the checkpoint directory
    accelerator.print(f"done; deployable weights of the best checkpoint: {manager.best() / 'model' / 'consolidated'}")


if __name__ == "__main__":
    main()
