"""LoRA fine-tuning with TRL's `SFTTrainer` + peft + `CheckpointCallback`: adapter-only checkpoints, merged for serving.

Offline and CPU-only (a tiny model and tokenizer are built locally), in a few seconds:

    python examples/lora_sft.py --output-dir runs/lora

1. The tiny base model is written to OUTPUT_DIR/base; it stands in for the Hub model you
   would fine-tune (`SFTTrainer(model="Qwen/Qwen2.5-0.5B", ...)` loads it the same way).
2. LoRA trains on the attention projections. Each checkpoint holds only the adapter
   (`model/adapter/`: kilobytes, not a copy of the frozen base), whose
   `adapter_config.json` names the base folder.
3. The best adapter is merged into its base with `hf-rl-ckpt export CKPT OUT --merge-lora`,
   which writes a plain HF model folder for engines that do not apply LoRA themselves.
   (vLLM can also serve the adapter unmerged: `vllm serve BASE --enable-lora --lora-modules run=CKPT/model/adapter`.)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import datasets
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from hf_rl_ckpt import CheckpointCallback, CheckpointConfig
from hf_rl_ckpt.cli import main as hf_rl_ckpt_cli
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, exact_cpu_args, toy_text_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/lora", type=Path)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4, help="evaluate and checkpoint every N steps")
    args = parser.parse_args(argv)
    logging.basicConfig(format="[%(name)s] %(message)s")
    logging.getLogger("hf_rl_ckpt").setLevel(logging.INFO)  # one line per save: step, size, time, evictions
    datasets.disable_progress_bars()  # TRL's per-dataset preprocessing bars would bury those lines

    base = args.output_dir / "base"
    if not (base / "config.json").is_file():
        build_model("llama", seed=0).save_pretrained(base)
        build_tokenizer().save_pretrained(base)

    checkpointing = CheckpointConfig(
        checkpoint_dir=str(args.output_dir / "ckpt"), save_period=args.save_every,
        metric_name="eval_loss", higher_is_better=False, keep_top_k=2,
    )
    callback = CheckpointCallback(checkpointing)
    trainer = SFTTrainer(
        model=str(base),  # loaded with from_pretrained, so the adapter records where its base lives
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        args=SFTConfig(
            output_dir=str(args.output_dir / "trainer"),
            max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=1e-2, max_length=32,
            eval_strategy="steps", eval_steps=args.save_every,  # each evaluation gives the checkpoint of that step its eval_loss
            save_strategy="no",  # the callback writes the checkpoints; the Trainer's own (pickled) ones are not needed
            **exact_cpu_args(),  # TRL defaults bf16 and activation checkpointing on; off for exact, fast CPU runs
            logging_steps=args.save_every, report_to="none", disable_tqdm=True, seed=0,
        ),
        processing_class=AutoTokenizer.from_pretrained(base),
        train_dataset=toy_text_dataset(n=64, seed=0),
        eval_dataset=toy_text_dataset(n=16, seed=1),
        callbacks=[callback],
    )
    trainer.train()  # resumes from the newest checkpoint in OUTPUT_DIR/ckpt, if there is one

    best = callback.manager.best()
    adapter_kb = sum(f.stat().st_size for f in (best / "model" / "adapter").iterdir()) / 1e3
    print(f"best checkpoint by eval_loss: {best} (model/adapter/: {adapter_kb:.0f} KB, the base is not copied)")

    merged = args.output_dir / f"merged_{best.name}"
    if not merged.exists():  # export never overwrites; a re-run that ends on the same best keeps its merge
        hf_rl_ckpt_cli(["export", str(best), str(merged), "--merge-lora"])  # = `hf-rl-ckpt export BEST MERGED --merge-lora`
    model = AutoModelForCausalLM.from_pretrained(merged)  # a plain model: serving it needs no peft
    print(f"{merged} loads with from_pretrained: {type(model).__name__}, {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
