"""Fork server for fault trials: imports torch/transformers once, then forks one training child per trial.

A fresh interpreter per trial spends seconds importing; forking this warmed-up process
makes a trial cost what its training and saving cost, which is what lets the suite run 30
random SIGKILLs in well under two minutes. Each child is a real process doing real I/O,
killed for real (SIGKILL from the test, or at a fault point armed with `hf_rl_ckpt.testing.crash.arm_kill`).

Protocol: one JSON object per line on stdin, one reply per line on stdout.
    {"cmd": "run", "ckpt": DIR, "ready": FILE, "fault": "commit.before_rename@3" | null, "seed": 0, "config": {...}}
        -> {"pid": PID}       the child resumes from DIR, then trains and saves every step,
                              appending each committed step to FILE, until killed; "config"
                              adds or overrides CheckpointConfig fields (e.g. Hub publishing).
                              Optional: "metric": NAME records each step's training loss under
                              NAME; "stop_after": N exits (code 0) after N saves; "log": FILE
                              appends the library's log records there (the model-based test
                              reads the child's eviction decisions from it)
    {"cmd": "wait", "pid": PID} -> {"signal": 9} or {"exit_code": 1}
    {"cmd": "exit"}

Run from the parent with `python _zygote.py`; stderr of the children is inherited.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, ResumableDataLoader  # noqa: E402
from hf_rl_ckpt.testing.crash import arm_kill  # noqa: E402
from hf_rl_ckpt.state.model import unwrap_model  # noqa: E402
from hf_rl_ckpt.testing.tiny import build_model  # noqa: E402

# What a first save imports lazily, imported here once: unwrapping a model, accelerate imports DeepSpeed when it is
# installed (0.8 s), which every forked child would otherwise pay inside its first save. DeepSpeed's logger writes
# to the stdout of its import: make that stderr, stdout carries the protocol.
with contextlib.redirect_stdout(sys.stderr):
    unwrap_model(torch.nn.Linear(1, 1))

#: Retention in every trial: keep the newest two, so evictions (and their crash windows) happen on every save.
CONFIG = dict(keep_top_k=2, metric_name="step")


def training_objects(seed: int):
    """A tiny model, AdamW, a warm-up schedule and a shuffled resumable loader (the fixture of tests/conftest.py)."""
    model = build_model("llama", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    data = torch.randint(0, model.config.vocab_size, (24, 16), generator=torch.Generator().manual_seed(1234))
    return model, optimizer, scheduler, ResumableDataLoader(DataLoader(data, batch_size=4, shuffle=True))


def train_forever(ckpt: str, ready: str, seed: int, config: dict, metric: str | None = None, stop_after: int | None = None) -> None:
    """Resume, then train and save every step, reporting each committed step, until killed (or `stop_after` saves)."""
    model, optimizer, scheduler, loader = training_objects(seed)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=ckpt, **{**CONFIG, **config}))
    state = manager.resume(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
    step = state.step if state else 0
    saves = 0
    with open(ready, "a") as report:
        while stop_after is None or saves < stop_after:
            for batch in loader:
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                metrics = {metric: loss.item()} if metric else None
                manager.save(step, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader, metrics=metrics)
                report.write(f"{step}\n")
                report.flush()
                saves += 1
                if saves == stop_after:
                    break
    manager.finalize()


def log_to(path: str) -> None:
    """Append this process's `hf_rl_ckpt` log records (INFO and up) to `path`, one per line."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    library = logging.getLogger("hf_rl_ckpt")
    library.addHandler(handler)
    library.setLevel(logging.INFO)


def serve() -> None:
    torch.set_num_threads(1)
    training_objects(0)  # warm every lazy import and the tokenizer cache before forking
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "run":
            pid = os.fork()
            if pid == 0:
                # stdout carries this protocol: whatever the child prints (DeepSpeed's accelerator detection, which
                # accelerate triggers when deepspeed is installed, logs to stdout) must go to stderr instead.
                os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
                code = 0
                try:
                    if request.get("fault"):
                        arm_kill(request["fault"])
                    if request.get("log"):
                        log_to(request["log"])
                    train_forever(
                        request["ckpt"], request["ready"], request.get("seed", 0), request.get("config") or {},
                        metric=request.get("metric"), stop_after=request.get("stop_after"),
                    )
                except BaseException:  # a forked child must never return into this loop: report, then exit 1
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            reply = {"pid": pid}
        elif request["cmd"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            reply = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit_code": os.WEXITSTATUS(status)}
        else:
            return
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
