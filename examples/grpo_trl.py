"""RL with TRL's `GRPOTrainer` + `CheckpointCallback`: keep the checkpoints with the best reward.

Offline and CPU-only (a tiny model and tokenizer are built locally), in a few seconds:

    python examples/grpo_trl.py --output-dir runs/grpo
    python examples/grpo_trl.py --output-dir runs/grpo --max-steps 12   # same dir: resumes and continues

The policy answers arithmetic prompts ("Question: What is 3 plus 4? Answer:"). GRPOTrainer
logs the mean `reward` of each step; the callback saves every `--save-every` steps with the
metrics logged at that step, and `keep_top_k` keeps the 2 checkpoints with the highest
reward (plus the newest, so a resume never loses progress). Each kept checkpoint's
`model/consolidated/` folder is what you hand to vLLM or SGLang.
"""

from __future__ import annotations

import argparse
import logging

import datasets
from trl import GRPOConfig, GRPOTrainer

from hf_rl_ckpt import CheckpointCallback, CheckpointConfig
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, exact_cpu_args, toy_prompt_dataset


def answer_reward(completions: list[str], answer: list[str], **kwargs: object) -> list[float]:
    """1 for the right answer; otherwise partial credit for answering with digits at all.

    The partial credit makes rewards differ between steps even for an untrained tiny model,
    so the top-k ranking has something to rank. TRL passes the dataset's `answer` column.
    """
    return [1.0 if expected in text else sum(c.isdigit() for c in text) / max(len(text), 1) for text, expected in zip(completions, answer)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/grpo", help="checkpoints go to OUTPUT_DIR/ckpt")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(format="[%(name)s] %(message)s")
    logging.getLogger("hf_rl_ckpt").setLevel(logging.INFO)  # one line per save: step, size, time, evictions
    datasets.disable_progress_bars()  # TRL's per-dataset preprocessing bars would bury those lines

    checkpointing = CheckpointConfig(
        checkpoint_dir=f"{args.output_dir}/ckpt", save_period=args.save_every,
        metric_name="reward", higher_is_better=True, keep_top_k=2,  # "reward" is the name GRPOTrainer logs it under
    )
    callback = CheckpointCallback(checkpointing)
    trainer = GRPOTrainer(
        model=build_model("llama", seed=0),
        reward_funcs=answer_reward,
        args=GRPOConfig(
            output_dir=f"{args.output_dir}/trainer",
            max_steps=args.max_steps, learning_rate=1e-3,
            per_device_train_batch_size=4, num_generations=4, max_completion_length=8,  # 1 prompt x 4 completions a step
            save_strategy="no",  # the callback writes the checkpoints; the Trainer's own (pickled) ones are not needed
            **exact_cpu_args(),  # TRL defaults bf16 and activation checkpointing on; off for exact, fast CPU runs
            logging_steps=1, report_to="none", disable_tqdm=True, seed=0,
        ),
        processing_class=build_tokenizer(),  # saved into every checkpoint, so each one is deployable as is
        train_dataset=toy_prompt_dataset(n=32, seed=0),
        callbacks=[callback],
    )
    trainer.train()  # resumes from the newest checkpoint in OUTPUT_DIR/ckpt, if there is one

    for row in callback.manager.checkpoints():  # the index rows that `hf-rl-ckpt list OUTPUT_DIR/ckpt` prints
        print(f"{row.name}: reward {row.metrics.get('reward', float('nan')):.3f}, top-k rank {row.top_k_rank or '-'}")
    best = callback.manager.best()
    print(f"highest-reward checkpoint: {best}; serve it with `vllm serve {best / 'model' / 'consolidated'}`")


if __name__ == "__main__":
    main()
