"""Supervised fine-tuning with TRL's `SFTTrainer` + `CheckpointCallback`, resumable and ranked by eval_loss.

Offline and CPU-only (a tiny model and tokenizer are built locally), in a few seconds:

    python examples/sft_trainer.py --output-dir runs/sft                  # trains 12 steps
    python examples/sft_trainer.py --output-dir runs/sft --max-steps 20   # same dir: resumes at step 12

Every `--save-every` steps the trainer evaluates, and a checkpoint is written with the
`eval_loss` of that step; only the 2 best by `eval_loss` (plus the newest, for resume) are
kept. Because `resume.mode` defaults to `auto`, running the script again on the same
directory continues from the newest checkpoint, exactly where it stopped.
"""

from __future__ import annotations

import argparse
import logging

import datasets
from trl import SFTConfig, SFTTrainer

from hf_rl_ckpt import CheckpointCallback, CheckpointConfig
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, exact_cpu_args, toy_text_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/sft", help="checkpoints go to OUTPUT_DIR/ckpt")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4, help="evaluate and checkpoint every N steps")
    args = parser.parse_args(argv)
    # One INFO line per save (step, size, time, evicted checkpoints) comes from the "hf_rl_ckpt" logger.
    logging.basicConfig(format="[%(name)s] %(message)s")
    logging.getLogger("hf_rl_ckpt").setLevel(logging.INFO)
    datasets.disable_progress_bars()  # TRL's per-dataset preprocessing bars would bury those lines

    tokenizer = build_tokenizer()
    checkpointing = CheckpointConfig(
        checkpoint_dir=f"{args.output_dir}/ckpt",
        save_period=args.save_every,
        metric_name="eval_loss", higher_is_better=False, keep_top_k=2,
    )
    training_args = SFTConfig(
        output_dir=f"{args.output_dir}/trainer",
        max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=3e-3, max_length=32,
        eval_strategy="steps", eval_steps=args.save_every,  # each evaluation gives the checkpoint of that step its eval_loss
        save_strategy="no",  # the callback writes the checkpoints; the Trainer's own (pickled) ones are not needed
        **exact_cpu_args(),  # TRL defaults bf16 and activation checkpointing on; off for exact, fast CPU runs
        logging_steps=args.save_every, report_to="none", disable_tqdm=True, seed=0,
    )
    callback = CheckpointCallback(checkpointing)
    trainer = SFTTrainer(
        model=build_model("qwen2", seed=0),
        args=training_args,
        processing_class=tokenizer,  # saved into every checkpoint, so each one is deployable as is
        train_dataset=toy_text_dataset(n=64, seed=0),
        eval_dataset=toy_text_dataset(n=16, seed=1),
        callbacks=[callback],
    )
    trainer.train()  # resumes from the newest checkpoint in OUTPUT_DIR/ckpt, if there is one

    for row in callback.manager.checkpoints():  # the index rows that `hf-rl-ckpt list OUTPUT_DIR/ckpt` prints
        print(f"{row.name}: eval_loss {row.metrics.get('eval_loss', float('nan')):.4f}, top-k rank {row.top_k_rank or '-'}")
    # The best checkpoint's model/consolidated/ folder is a plain HF model folder (weights, config, tokenizer):
    # AutoModelForCausalLM.from_pretrained(...) and `vllm serve ...` load it as is.
    best = callback.manager.best()
    print(f"best checkpoint by eval_loss: {best}; serve {best / 'model' / 'consolidated'}")


if __name__ == "__main__":
    main()
