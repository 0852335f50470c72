"""Ranks that agree on every decision and never hang, launched by tests/test_agreement.py through torchrun (gloo).

    torchrun --nproc_per_node N agreement.py SCENARIOS    # a JSON list, run in turn by every rank:
        {"name": NAME, "mode": "lock", "paths": [RUN_DIR]}                        # RUN_DIR locked by another live process
        {"name": NAME, "mode": "skew", "paths": [RUN_DIR]}                        # rank clocks 2 s apart, checkpoint_must_save_by
        {"name": NAME, "mode": "train", "paths": [RUN_DIR, LOG], "sigterm_at": STEP, "async": true}   # the last two optional
        {"name": NAME, "mode": "faults", "paths": [RUN_DIR, RESULTS], "stall": true}                  # "stall" optional

`lock`: every rank raises CheckpointLockedError from the constructor. `skew`: rank 1 builds its
manager 2 s after rank 0, so their clocks differ; exactly one checkpoint is written, by both
ranks at one step. `train`: a DDP loop with `save_period: 2` and resume `auto`, logging each
step's loss (rank 0, JSONL); with `sigterm_at`, the last rank sends itself a real SIGTERM
during that step and every rank must save that step and stop (the launch exits 0). `faults`: the fault
matrix (DDP and FSDP2, sync and async): an exception injected at each fault point on rank 0
and on the last rank must fail the save on every rank naming the failed rank, within 60 s,
leave nothing committed and step 1 loadable (and a load that fails on the last rank only must
raise on every rank); `stall` instead holds the last rank's async
write past `async_rank_timeout`. Each rank appends one JSON line per case to RESULTS/rank_<r>.jsonl.

One launch runs several scenarios (each launch pays seconds of start-up on a small machine). Every rank prints
`rank R: NAME OK`, or `rank R: NAME FAILED` with the traceback, for each scenario, and goes on to the next one:
each test reads its own scenario's lines. Output a scenario prints is prefixed with its name.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dist_helpers import full_state
from hf_rl_ckpt import CheckpointConfig, CheckpointManager, CheckpointSaveError, ResumableDataLoader, faultpoint
from hf_rl_ckpt.errors import CheckpointLockedError
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, toy_lm_dataset

#: (fault point, hit, on which ranks): the hits of `save.part_written` are the model, ..., the 4th part: the model card
#: (DDP) or every rank's share of the consolidated weights (FSDP2, written in the background by an async save).
FAULTS = [
    ("save.staged", 1, "both"), ("save.part_written", 1, "both"), ("save.part_written", 4, "both"),
    ("commit.before_fsync", 1, "rank0"), ("commit.before_rename", 1, "rank0"),
]
AGREE_WITHIN = 60.0


def rank() -> int:
    return dist.get_rank()


def last_rank() -> int:
    return dist.get_world_size() - 1


# ---------------------------------------------------------------- lock, skew
def check_lock(run_dir: Path) -> None:
    try:
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(run_dir)))
    except CheckpointLockedError as err:
        assert "is in use by pid" in str(err), str(err)
    else:
        raise AssertionError(f"rank {rank()}: a locked checkpoint_dir was opened")


def skewed_clocks(run_dir: Path) -> None:
    if rank() == 1:
        time.sleep(2.0)  # this rank's clock starts 2 s after rank 0's (rank 0 waits for it inside the constructor)
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(run_dir), checkpoint_must_save_by="00:00:00:03"))
    model = DistributedDataParallel(build_model("llama", seed=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    saved = []
    for step in range(1, 41):
        batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step * 10 + rank()))
        model(input_ids=batch, labels=batch).loss.backward()  # DDP's gradient all-reduce: a collective every step
        optimizer.step()
        optimizer.zero_grad()
        time.sleep(0.2)
        if manager.should_save(step):
            manager.save(step, model=model, optimizer=optimizer)
            saved.append(step)
        if manager.deadline_reached:
            break
    manager.finalize()
    steps = [None] * dist.get_world_size()
    dist.all_gather_object(steps, saved)
    assert all(s == steps[0] for s in steps) and len(steps[0]) == 1, f"saves per rank: {steps}"
    committed = sorted(path.name for path in run_dir.glob("step_*"))
    assert committed == [f"step_{steps[0][0]}"], committed
    info = json.loads((run_dir / committed[0] / "training_info.json").read_text())
    assert info["world_size"] == dist.get_world_size(), info["world_size"]


# ---------------------------------------------------------------- preempted training loop
def train(name: str, run_dir: Path, log: Path, sigterm_at: int | None = None, in_background: bool = False) -> None:
    tokenizer = build_tokenizer()
    model = DistributedDataParallel(build_model("llama", seed=0, dropout=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    dataset = toy_lm_dataset(tokenizer, n=32, seq_len=16, seed=0).with_format("torch")
    loader = ResumableDataLoader(DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, shuffle=True, seed=0)))
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(run_dir), save_period=2, async_save=in_background))
    objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
    torch.manual_seed(1000 + rank())  # dropout's stream; a resume restores it as it was at the checkpoint
    state = manager.resume(**objects)
    step = state.step if state else 0
    if state and rank() == 0:
        print(f"{name}: resumed from step {step}", flush=True)
    signalled = None
    while step < 6 and not manager.preempted:
        for batch in loader:
            step += 1
            if step == sigterm_at and rank() == last_rank():
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to one rank only
                signalled = time.monotonic()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            if rank() == 0:
                with log.open("a") as out:
                    out.write(json.dumps({"step": step, "loss": mean.item()}) + "\n")
            if manager.should_save(step):
                manager.save(step, **objects)
                if manager.preempted:
                    break
            if step == 6:
                break
    manager.finalize()
    if sigterm_at is not None:
        assert manager.preempted and step == sigterm_at, (manager.preempted, step)
        if signalled is not None:
            print(f"rank {rank()}: {name}: saved step {step} and stopped {time.monotonic() - signalled:.2f}s after SIGTERM", flush=True)


# ---------------------------------------------------------------- fault matrix
def build(wrap: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model("llama", seed=seed)
    if wrap == "fsdp":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step_once(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed * 10 + rank()))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


class Position:
    """A data position (stateful dataloader) whose restore fails on rank `refuse_on`, like a rank with a different dataset."""

    def __init__(self, refuse_on: int | None = None) -> None:
        self.refuse_on = refuse_on

    def state_dict(self) -> dict:
        return {"batches": 7}

    def load_state_dict(self, state: dict) -> None:
        if rank() == self.refuse_on:
            raise ValueError(f"data position refused on rank {rank()}")


def failed_save(manager: CheckpointManager, step: int, objects: dict) -> tuple[str | None, float]:
    """The CheckpointSaveError of saving `step` (an async one surfaces at finalize), and the seconds until it was raised."""
    started = time.monotonic()
    try:
        manager.save(step, **objects)
        manager.finalize(terminate=False)  # drains an async save in flight: its failure is raised here
    except CheckpointSaveError as err:
        return str(err), time.monotonic() - started
    return None, time.monotonic() - started


def fault_matrix(run_root: Path, results: Path, stall: bool = False) -> None:
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"rank_{rank()}.jsonl"
    combos = [("ddp", True)] if stall else [(wrap, background) for wrap in ("ddp", "fsdp") for background in (False, True)]
    for wrap, background in combos:
        run_dir = run_root / f"{wrap}-{'async' if background else 'sync'}{'-stall' if stall else ''}"
        timeout = "00:00:00:08" if stall else "00:00:10:00"
        manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(run_dir), async_save=background, async_rank_timeout=timeout))
        model, optimizer = build(wrap, seed=0)
        objects = dict(model=model, optimizer=optimizer, tokenizer=build_tokenizer(), dataloader=Position())
        step_once(model, optimizer, 1)
        manager.save(1, **objects)
        manager.finalize(terminate=False)
        reference = full_state(model, optimizer)
        cases = [("save.part_written", 1, last_rank())] if stall else [
            (point, hit, target) for point, hit, on in FAULTS for target in ((0, last_rank()) if on == "both" else (0,))
        ]
        for number, (point, hit, target) in enumerate(cases, start=2):
            step_once(model, optimizer, number)
            if rank() == target:
                faultpoint.arm(point, faultpoint.sleep(12) if stall else faultpoint.fail(OSError(f"injected at {point}@{hit}")), at_hit=hit)
            error, seconds = failed_save(manager, number, objects)
            faultpoint.disarm()
            dist.barrier()
            leftovers = sorted(p.name for p in (run_dir / ".incomplete").iterdir()) if (run_dir / ".incomplete").is_dir() else []
            row = {
                "wrap": wrap, "async": background, "point": f"{point}@{hit}", "target": target, "error": error, "seconds": round(seconds, 2),
                "names_target": error is not None and f"rank {target}: " in error, "latest": manager.latest().name,
                "committed": (run_dir / f"step_{number}").exists(), "leftovers": leftovers,
            }
            with out.open("a") as file:
                file.write(json.dumps(row) + "\n")
        fresh, fresh_optimizer = build(wrap, seed=5)
        try:  # a load that fails on one rank only fails on every rank, with that rank's error
            manager.load(run_dir / "step_1", model=fresh, optimizer=fresh_optimizer, dataloader=Position(refuse_on=last_rank()))
        except ValueError as err:
            assert str(err) == f"data position refused on rank {last_rank()}", err
        else:
            raise AssertionError(f"rank {rank()}: a load that failed on rank {last_rank()} returned here")
        manager.load(run_dir / "step_1", model=fresh, optimizer=fresh_optimizer)
        restored = full_state(fresh, fresh_optimizer)
        assert all(torch.equal(restored[name], tensor) for name, tensor in reference.items()), f"{wrap}: step_1 does not load back"
        manager.save(99, **objects)  # the manager still works after the failures (an async one over a new side channel)
        manager.finalize()
        assert manager.latest().name == "step_99", manager.latest()
        del model, optimizer, fresh, fresh_optimizer, objects
        gc.collect()


def run_scenario(scenario: dict) -> None:
    paths = [Path(path) for path in scenario["paths"]]
    if scenario["mode"] == "lock":
        check_lock(*paths)
    elif scenario["mode"] == "skew":
        skewed_clocks(*paths)
    elif scenario["mode"] == "train":
        train(scenario["name"], *paths, scenario.get("sigterm_at"), scenario.get("async", False))
    else:
        fault_matrix(*paths, scenario.get("stall", False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", type=json.loads, help="a JSON list of scenarios (see the module docstring)")
    scenarios = parser.parse_args().scenarios
    dist.init_process_group("gloo")
    try:
        for scenario in scenarios:
            try:
                run_scenario(scenario)
            except Exception:  # reported for this scenario's test; the next scenarios still run
                print(f"rank {rank()}: {scenario['name']} FAILED\n{traceback.format_exc()}", flush=True)
            else:
                print(f"rank {rank()}: {scenario['name']} OK", flush=True)
            # Every rank done with every collective of this scenario before the next one starts, and before any tears
            # the groups down: a gloo send still in flight when its peer closes the connection can abort the process
            # at exit (seen once in CI, after the checks passed).
            dist.barrier()
    finally:
        gc.collect()  # see examples/fsdp_custom_loop.py
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
