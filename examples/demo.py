"""Fine-tune with `transformers.Trainer` + `CheckpointCallback`: get interrupted, resume, serve the best checkpoint.

Offline and CPU-only, in well under a minute (a tiny model and tokenizer are built locally):

    python examples/demo.py                       # everything, in ./runs/demo (wiped first)
    python examples/demo.py --output-dir /tmp/x

What happens:
1. A training process fine-tunes for 30 steps, evaluating every 5 steps and keeping the
   2 best checkpoints by eval_loss (plus the newest). At step 12 its job "runs out of
   time" and the process exits.
2. A new process runs the very same script: `resume.mode: auto` picks up the newest
   checkpoint and the Trainer continues at step 13, same data order, same RNG streams.
3. The best checkpoint's `model/consolidated/` is loaded with `from_pretrained` and
   generates a few tokens.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

MAX_STEPS = 30
EVAL_EVERY = 5
STOP_AT = 12


def train(output_dir: Path, stop_at: int | None) -> None:
    """One training process: resumes from `output_dir/ckpt` if it holds a checkpoint, stops after `stop_at`."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from hf_rl_ckpt import CheckpointCallback, CheckpointConfig
    from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, toy_lm_dataset

    logging.basicConfig(format="  [hf_rl_ckpt] %(message)s")
    logging.getLogger("hf_rl_ckpt").setLevel(logging.INFO)

    class Report(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            print(f"  training from step {state.global_step}" + (" (resumed)" if state.global_step else ""))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            print(f"  step {state.global_step:>2}: eval_loss {metrics['eval_loss']:.4f}")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                print(f"  step {stop_at}: out of time, stopping (the process exits)")
                control.should_training_stop = True

    tokenizer = build_tokenizer()
    config = CheckpointConfig(
        checkpoint_dir=str(output_dir / "ckpt"), save_period=EVAL_EVERY,
        metric_name="eval_loss", higher_is_better=False, keep_top_k=2,
    )
    args = TrainingArguments(
        str(output_dir / "trainer"), max_steps=MAX_STEPS, per_device_train_batch_size=8, learning_rate=3e-3,
        warmup_steps=3, eval_strategy="steps", eval_steps=EVAL_EVERY, save_strategy="no", logging_steps=EVAL_EVERY,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(
        model=build_model("llama", seed=0, dropout=0.1), args=args, processing_class=tokenizer,
        train_dataset=toy_lm_dataset(tokenizer, n=96, seq_len=32, seed=0),
        eval_dataset=toy_lm_dataset(tokenizer, n=16, seq_len=32, seed=1),
        callbacks=[CheckpointCallback(config), Report()],
    )
    trainer.remove_callback(PrinterCallback)  # the Report lines above are enough
    trainer.train()


def print_table(ckpt_dir: Path) -> None:
    from hf_rl_ckpt import CheckpointConfig, CheckpointManager

    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt_dir)))
    print(f"  {'checkpoint':<10} {'eval_loss':>9} {'top-k':>5} {'size':>8}")
    for row in manager.checkpoints():
        loss = row.metrics.get("eval_loss")
        print(
            f"  {row.name:<10} {'-' if loss is None else format(loss, '.4f'):>9} "
            f"{row.top_k_rank or '-':>5} {row.size_bytes / 1e6:>6.1f}MB"
        )


def serve_best(ckpt_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.logging import disable_progress_bar

    from hf_rl_ckpt import CheckpointConfig, CheckpointManager

    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(ckpt_dir), metric_name="eval_loss", higher_is_better=False))
    folder = manager.best() / "model" / "consolidated"
    print(f"  AutoModelForCausalLM.from_pretrained('{folder}')")
    disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "The cat sat on"
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, min_new_tokens=6, max_new_tokens=6, do_sample=False)  # 30 steps of a tiny model: expect babble
    print(f"  {prompt!r} -> {tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)!r}")


def run_phase(output_dir: Path, stop_at: int | None) -> None:
    command = [sys.executable, __file__, "--output-dir", str(output_dir), "--train"]
    if stop_at is not None:
        command += ["--stop-at", str(stop_at)]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/demo", type=Path)
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)  # one training process (used internally)
    parser.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.train:
        train(options.output_dir, options.stop_at)
        return
    started = time.perf_counter()
    shutil.rmtree(options.output_dir, ignore_errors=True)
    ckpt_dir = options.output_dir / "ckpt"
    print(f"1) train {MAX_STEPS} steps (eval every {EVAL_EVERY}, keep top-2 by eval_loss); this job ends at step {STOP_AT}")
    run_phase(options.output_dir, STOP_AT)
    print_table(ckpt_dir)
    print("2) a new process runs the same script: resume.mode=auto continues from the newest checkpoint")
    run_phase(options.output_dir, None)
    print_table(ckpt_dir)
    print("3) serve the best checkpoint")
    serve_best(ckpt_dir)
    print(f"done in {time.perf_counter() - started:.0f}s; checkpoints in {ckpt_dir}")


if __name__ == "__main__":
    main()
