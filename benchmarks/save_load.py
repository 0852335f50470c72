"""Save / resume benchmark: HF Trainer vs Accelerate vs torch DCP vs hf_rl_ckpt (sync and async), in one run.

For each model size a random-init Llama-style model is built (AdamW state initialised by
one optimizer step) and, alternating the order of the methods on every repeat, measures:

* ``trainer``    `Trainer._save_checkpoint` of a real `transformers.Trainer`, then `os.sync()`;
                 resume = `_load_from_checkpoint` + `_load_optimizer_and_scheduler`.
* ``accelerate`` `Accelerator.save_state`, then `os.sync()`; resume = `load_state`.
* ``dcp``        `torch.distributed.checkpoint.save` of `get_state_dict(model, optimizer)`, then
                 `os.sync()`; resume = `dcp.load` into the same structures + `set_state_dict`.
                 One process, no process group (DCP then assumes a single-process save).
* ``ours_sync``  `CheckpointManager.save` (every file fsynced, digest while writing, atomic
                 commit); resume = `CheckpointManager.load` (every byte verified,
                 `verify_on_resume`, the default); also timed with `verify_on_resume: false`
                 (sizes and headers only, closer to what the Trainer checks, which is nothing):
                 the ``(no verify)`` row.
* ``ours_async`` the same with `async_save=True`: the *stall* (time `save()` blocks the
                 training loop, plus the time the next optimizer step waits for the optimizer
                 state to be staged; a real training step follows every save), the *total*
                 time until the checkpoint is committed, and that next training step's time
                 against a step without a save in flight. Its files are byte-identical to
                 ``ours_sync``'s, so its resume is not timed again.
* ``dcp_async``  `dcp.async_save` with its default stager, measured like ``ours_async``: stall =
                 until `async_save()` returns, total = until its future's result + `os.sync()`.

Every resume is timed twice: from a cold page cache for the checkpoint's files
(`posix_fadvise(DONTNEED)` after `os.sync()`), as after a restart, and warm (every page of
the checkpoint read into the page cache first), as when resuming on the node that just wrote
it. Peak RSS during each save and each cold resume is the kernel's high-water mark (`VmHWM`,
reset through `/proc/self/clear_refs`; a 2 ms sampling thread where that is not allowed)
minus the RSS just before. Every timed operation starts after an `os.sync()` so that earlier
dirty data is not charged to it. The disk's own speed, measured in the same run, is the
physical limit: `--disk-gb` GB written sequentially in 64 MiB blocks and fsynced.

Prints a table of medians and ratios against the Trainer and the targets (with an earlier
run's ratios beside them given `--previous`), writes `results.json`, `table.txt` and
`save_load.png` (save and stall, cold and warm resume, vs model size) under `--out`.

    python benchmarks/save_load.py --sizes 25M,110M,350M --repeats 3 --out benchmarks/out
    python benchmarks/save_load.py --sizes 25M,110M,350M --out benchmarks/out2 --previous benchmarks/out/results.json
    python benchmarks/save_load.py --sizes 1B --device cuda --dtype bf16 --out benchmarks/out-gpu
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the order of the first repeat (it rotates); ``(no verify)`` is timed inside ``ours_sync``.
METHODS = ("trainer", "accelerate", "dcp", "ours_sync", "ours_async", "dcp_async")
#: name -> (hidden, intermediate, layers, heads); vocabulary 32000, untied embeddings (Llama's default).
PRESETS = {
    "TINY": (64, 128, 2, 2),  # ~4M, mostly embeddings: for trying the script out
    "25M": (256, 768, 10, 4),
    "110M": (768, 2048, 9, 12),
    "350M": (1024, 2816, 22, 16),
    "1B": (2048, 5632, 18, 16),
    "3B": (2560, 6912, 32, 20),
}
VOCAB = 32000
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------ helpers
def parse_size(text: str) -> tuple[str, tuple[int, int, int, int]]:
    """A preset name, or any '<N>M'/'<N>B': layers chosen to reach about N parameters."""
    key = text.strip().upper()
    if key in PRESETS:
        return key, PRESETS[key]
    scale = {"M": 1e6, "B": 1e9}[key[-1]]
    target = float(key[:-1]) * scale
    hidden, inter, heads = (512, 1408, 8) if target < 80e6 else (1024, 2816, 16) if target < 600e6 else (2048, 5632, 16) if target < 2e9 else (4096, 11008, 32)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target - 2 * VOCAB * hidden) / per_layer))
    return key, (hidden, inter, layers, heads)


def llama(spec: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads = spec
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def first_step(model: torch.nn.Module, device: str) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW + a linear schedule, state initialised by one real optimizer step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    ids = torch.randint(0, VOCAB, (1, 16), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer, scheduler


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return params + moments


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_cache(path: Path) -> None:
    """Evict `path`'s files from the page cache (they are clean after os.sync), as after a restart."""
    os.sync()
    for file in (p for p in path.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: Path) -> None:
    """Read every file under `path` once, so that all its pages are cached (a resume on the node that wrote it).

    Read explicitly rather than relying on the previous resume: a loader may read with
    O_DIRECT or drop pages itself, and the writes of the save were evicted for the cold resume.
    """
    os.sync()
    buffer = bytearray(16 << 20)
    for file in (p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory over a block: VmHWM after resetting it, else a 2 ms sampling thread."""

    def __init__(self) -> None:
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _hwm() -> int | None:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self) -> "PeakRSS":
        gc.collect()
        self.before = rss()
        self.exact = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.exact = self._hwm() is not None
        except OSError:
            pass
        if not self.exact:
            self.peak = self.before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def read(self) -> int:
        """Peak so far minus the RSS before `start`, in bytes (measuring goes on)."""
        self.peak = (self._hwm() or rss()) if self.exact else max(self.peak, rss())
        return max(0, self.peak - self.before)

    def stop(self) -> int:
        """Peak minus the RSS before `start`, in bytes."""
        if not self.exact and self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.read()


def sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def timed(device: str, out: dict[str, float], key: str) -> Iterator[None]:
    sync_device(device)
    started = time.perf_counter()
    yield
    sync_device(device)
    out[key] = time.perf_counter() - started


def disk_speed(folder: Path, gigabytes: float) -> float:
    """MB/s of a sequential write of `gigabytes` GB in 64 MiB blocks, fsynced (the disk's own limit)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disk_probe.bin"
    block = os.urandom(64 << 20)
    blocks = max(1, int(gigabytes * 1e9) // len(block))
    os.sync()
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(blocks):
            fh.write(block)
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return blocks * len(block) / seconds / 1e6


# ------------------------------------------------------------------ the methods
class Bench:
    """One model size: the objects, the methods, and their measurements."""

    def __init__(self, name: str, spec, args, work: Path) -> None:
        from accelerate import Accelerator
        from transformers import Trainer, TrainingArguments

        from hf_rl_ckpt import CheckpointConfig, CheckpointManager

        self.name, self.args, self.device, self.work = name, args, args.device, work / name
        self.work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.model = llama(spec, DTYPES[args.dtype], args.device)
        self.optimizer, self.scheduler = first_step(self.model, args.device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.state_bytes = state_bytes(self.model, self.optimizer)
        print(f"[{name}] {self.params / 1e6:.1f}M parameters, model+AdamW state {self.state_bytes / 1e9:.2f} GB "
              f"({args.dtype}, {args.device}); built in {time.perf_counter() - started:.1f}s", flush=True)
        self.trainer = Trainer(
            model=self.model,
            args=TrainingArguments(output_dir=str(self.work / "trainer"), report_to=[], use_cpu=args.device == "cpu",
                                   save_total_limit=None, logging_strategy="no", disable_tqdm=True),
            optimizers=(self.optimizer, self.scheduler),
        )
        self.accelerator = Accelerator(cpu=args.device == "cpu")
        self.acc_model, self.acc_optimizer, self.acc_scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        self.CheckpointConfig, self.CheckpointManager = CheckpointConfig, CheckpointManager
        self.async_manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(self.work / "ours_async"), async_save=True))
        self.async_manager.save(0, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)  # allocates the staging buffer once
        self.async_manager.finalize(terminate=False)
        shutil.rmtree(self.work / "ours_async" / "step_0")
        # DCP's default async stager copies into fresh memory and is closed after every save, so
        # there is no buffer to warm up: each dcp_async save pays its allocation, as in training.
        self.samples: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
        self.ckpt_bytes: dict[str, int] = {}

    def record(self, method: str, **values: float) -> None:
        for key, value in values.items():
            self.samples[method].setdefault(key, []).append(value)

    def run(self, method: str, step: int) -> None:
        getattr(self, f"_{method}")(step)
        gc.collect()

    def _timed_save(self, t: dict[str, float], save: Callable[[], Any]) -> Any:
        """`save()` timed into t['save'] after an os.sync(), its peak extra RSS into t['rss']; returns what it returns."""
        os.sync()
        peak = PeakRSS().start()
        with timed(self.device, t, "save"):
            result = save()
        t["rss"] = peak.stop()
        return result

    def _resumes(self, folder: Path, t: dict[str, float], load: Callable[[], Any], key: str = "resume") -> None:
        """The same `load` timed from a cold page cache (t[key], peak extra RSS in t[key + '_rss']), then warm (t[key + '_warm']).

        Cold first, as in earlier runs, so that the cold numbers stay comparable with theirs;
        the same order for every method, so whatever the first load leaves behind (allocator
        caches, huge pages) helps every warm resume alike.
        """
        drop_cache(folder)
        peak = PeakRSS().start()
        with timed(self.device, t, key):
            load()
        t[f"{key}_rss"] = peak.stop()
        gc.collect()
        warm_cache(folder)
        with timed(self.device, t, f"{key}_warm"):
            load()

    def _trainer(self, step: int) -> None:
        self.trainer.state.global_step = step
        folder = Path(self.trainer.args.output_dir) / f"checkpoint-{step}"
        t: dict[str, float] = {}

        def save() -> None:
            self.trainer._save_checkpoint(self.model, trial=None)
            os.sync()

        def load() -> None:
            self.trainer._load_from_checkpoint(str(folder))
            self.trainer._load_optimizer_and_scheduler(str(folder))

        self._timed_save(t, save)
        self.ckpt_bytes["trainer"] = tree_bytes(folder)
        self._resumes(folder, t, load)
        self.record("trainer", **t)
        shutil.rmtree(folder)

    def _accelerate(self, step: int) -> None:
        folder = self.work / "accelerate" / f"checkpoint_{step}"
        t: dict[str, float] = {}

        def save() -> None:
            self.accelerator.save_state(str(folder))
            os.sync()

        self._timed_save(t, save)
        self.ckpt_bytes["accelerate"] = tree_bytes(folder)
        self._resumes(folder, t, lambda: self.accelerator.load_state(str(folder)))
        self.record("accelerate", **t)
        shutil.rmtree(folder)

    def _dcp_state(self) -> dict[str, Any]:
        """DCP's recipe: FQN-keyed model and optimizer state dicts (views of the live tensors, nothing copied)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def _dcp_load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(folder))  # in place, into the structures it was given
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def _dcp(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        folder = self.work / "dcp" / f"checkpoint_{step}"
        t: dict[str, float] = {}

        def save() -> None:
            dcp.save(self._dcp_state(), checkpoint_id=str(folder))  # fsyncs its files; os.sync as for the others
            os.sync()

        self._timed_save(t, save)
        self.ckpt_bytes["dcp"] = tree_bytes(folder)
        self._resumes(folder, t, lambda: self._dcp_load(folder))
        self.record("dcp", **t)
        shutil.rmtree(folder)

    def _ours_sync(self, step: int) -> None:
        root = self.work / f"ours_sync_{step}"
        manager = self.CheckpointManager(self.CheckpointConfig(checkpoint_dir=str(root)))
        t: dict[str, float] = {}
        path = self._timed_save(t, lambda: manager.save(step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler))
        self.ckpt_bytes["ours"] = tree_bytes(path)
        self._resumes(path, t, lambda: manager.load(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler))
        manager.finalize()
        # The Trainer verifies nothing on resume; for reference, ours with sizes and headers checked but no digest:
        unverified = self.CheckpointManager(self.CheckpointConfig(checkpoint_dir=str(root), verify_on_resume=False))
        self._resumes(path, t, lambda: unverified.load(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler),
                      key="resume_no_verify")
        unverified.finalize()
        self.record("ours_sync", **t)
        shutil.rmtree(root)

    def _train_step(self) -> float:
        """One training step (tiny batch); returns its seconds."""
        sync_device(self.device)
        started = time.perf_counter()
        ids = torch.randint(0, VOCAB, (1, 16), device=self.device)
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync_device(self.device)
        return time.perf_counter() - started

    def _ours_async(self, step: int) -> None:
        """Stall = time in save() + time the next optimizer step waited for the optimizer state to be staged.

        As in a training loop, a training step follows the save (the optimizer state is copied
        by the writer thread while that step's forward/backward run; its step() waits for the
        copy if needed). `step_next` is that step's time, `step_plain` the time of a step just
        before, without a save in flight (the difference: CPU and memory bandwidth shared with
        the writer thread); `step_slowdown` their difference, as earlier runs recorded it.
        """
        manager = self.async_manager
        t: dict[str, float] = {"step_plain": self._train_step()}
        os.sync()
        peak = PeakRSS().start()
        with timed(self.device, t, "stall_in_save"):
            path = manager.save(step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        stall_rss = peak.read()
        started = time.perf_counter() - t["stall_in_save"]
        t["step_next"] = self._train_step()
        t["step_slowdown"] = t["step_next"] - t["step_plain"]
        t["step_wait"] = manager._writer.background.step_waited
        t["stall"] = t["stall_in_save"] + t["step_wait"]
        manager.finalize(terminate=False)  # waits until the background write is committed
        t["save"] = time.perf_counter() - started
        t["rss"] = max(stall_rss, peak.stop())
        t["rss_stall"] = stall_rss
        assert path.is_dir()
        self.record("ours_async", **t)
        shutil.rmtree(path)

    def _dcp_async(self, step: int) -> None:
        """`dcp.async_save` with its default stager, measured as `_ours_async` is.

        The default stager copies the whole state into fresh CPU memory inside `async_save()`
        (synchronously), so the stall is that call; the next step never waits for staging.
        `save` runs until the future's result plus `os.sync()` (DCP fsyncs its files itself).
        """
        import torch.distributed.checkpoint as dcp

        folder = self.work / "dcp_async" / f"checkpoint_{step}"
        t: dict[str, float] = {"step_plain": self._train_step()}
        os.sync()
        peak = PeakRSS().start()
        with timed(self.device, t, "stall"):
            response = dcp.async_save(self._dcp_state(), checkpoint_id=str(folder))
        stall_rss = peak.read()
        started = time.perf_counter() - t["stall"]
        t["step_next"] = self._train_step()
        t["step_slowdown"] = t["step_next"] - t["step_plain"]
        # A Future with the default stager; an AsyncSaveResponse where staging itself is asynchronous.
        getattr(response, "upload_completion", response).result()
        os.sync()
        t["save"] = time.perf_counter() - started
        t["rss"] = max(stall_rss, peak.stop())
        t["rss_stall"] = stall_rss
        self.ckpt_bytes["dcp"] = tree_bytes(folder)
        self.record("dcp_async", **t)
        shutil.rmtree(folder)

    def close(self) -> None:
        self.async_manager.finalize()
        self.accelerator.free_memory()
        shutil.rmtree(self.work, ignore_errors=True)


# ------------------------------------------------------------------ report
def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def summarize(bench: Bench, disk_mbps: float) -> dict[str, Any]:
    """Medians and ratios of one size. Sample keys: `resume` is the cold resume (as in earlier runs), `*_warm` the warm one."""
    med = {method: {key: median(vals) for key, vals in bench.samples[method].items()} for method in METHODS}
    tr, sync, asyn, dcp, dcp_async = (med[m] for m in ("trainer", "ours_sync", "ours_async", "dcp", "dcp_async"))
    ours_bytes = bench.ckpt_bytes.get("ours", 0)
    ratios = {
        "async_stall_vs_trainer_save": asyn["stall"] / tr["save"],
        "async_total_vs_trainer_save": asyn["save"] / tr["save"],
        "async_next_step_vs_plain_step": asyn["step_next"] / asyn["step_plain"],
        "sync_save_vs_trainer_save": sync["save"] / tr["save"],
        "resume_cold_vs_trainer": sync["resume"] / tr["resume"],
        "resume_warm_vs_trainer": sync["resume_warm"] / tr["resume_warm"],
        "resume_no_verify_cold_vs_trainer": sync["resume_no_verify"] / tr["resume"],
        "resume_no_verify_warm_vs_trainer": sync["resume_no_verify_warm"] / tr["resume_warm"],
        "resume_peak_rss_vs_state": sync["resume_rss"] / bench.state_bytes,
        "sync_throughput_vs_disk": ours_bytes / sync["save"] / 1e6 / disk_mbps,
        "sync_peak_rss_vs_state": sync["rss"] / bench.state_bytes,
        # torch DCP, for reference (no targets):
        "dcp_save_vs_trainer_save": dcp["save"] / tr["save"],
        "dcp_resume_cold_vs_trainer": dcp["resume"] / tr["resume"],
        "dcp_resume_warm_vs_trainer": dcp["resume_warm"] / tr["resume_warm"],
        "dcp_async_stall_vs_trainer_save": dcp_async["stall"] / tr["save"],
        "dcp_async_total_vs_trainer_save": dcp_async["save"] / tr["save"],
        "dcp_async_next_step_vs_plain_step": dcp_async["step_next"] / dcp_async["step_plain"],
    }
    return {
        "params": bench.params, "state_bytes": bench.state_bytes, "checkpoint_bytes": bench.ckpt_bytes,
        "samples": bench.samples, "median": med, "ratios": ratios,
    }


TARGETS = {  # ratio name -> (comparison, bound, smallest model it applies to, in parameters)
    # Below ~100M parameters the fixed part of a save (config, model card, small files) dominates the stall.
    "async_stall_vs_trainer_save": ("<=", 0.05, 100e6),
    "async_next_step_vs_plain_step": ("<=", 1.10, 0),
    "sync_save_vs_trainer_save": ("<=", 1.0, 0),
    "resume_cold_vs_trainer": ("<=", 1.0, 0),
    "resume_warm_vs_trainer": ("<=", 1.0, 0),
    "resume_peak_rss_vs_state": ("<=", 1.1, 0),
    "sync_throughput_vs_disk": (">=", 0.7, 0),
    "sync_peak_rss_vs_state": ("<=", 1.15, 0),
}

#: ratio names of earlier versions' results.json -> today's; their one resume was cold unless run with --warm-resume.
RENAMED = {
    "resume_vs_trainer_resume": "resume_{cache}_vs_trainer",
    "resume_no_sha256_vs_trainer_resume": "resume_no_verify_{cache}_vs_trainer",
}


def load_previous(path: Path) -> dict[str, dict[str, float]]:
    """size -> ratio name -> value of an earlier run's results.json, old ratio names mapped to today's."""
    data = json.loads(path.read_text())
    cache = "cold" if data.get("meta", {}).get("cold_resume", True) else "warm"
    previous: dict[str, dict[str, float]] = {}
    for size, res in data.get("results", {}).items():
        ratios = dict(res.get("ratios", {}))
        for old, new in RENAMED.items():
            if old in ratios:
                ratios.setdefault(new.format(cache=cache), ratios.pop(old))
        previous[size] = ratios
    return previous


def check_targets(results: dict[str, Any], previous: dict[str, dict[str, float]] | None) -> list[dict[str, Any]]:
    """One row per target and size it applies to, with the earlier run's value (None: not given or not measured then)."""
    rows = []
    for name, (op, bound, min_params) in TARGETS.items():
        for size, res in results.items():
            if res["params"] < min_params:
                continue
            value = res["ratios"][name]
            rows.append({
                "size": size, "ratio": name, "value": value, "op": op, "bound": bound,
                "pass": value <= bound if op == "<=" else value >= bound,
                "previous": (previous or {}).get(size, {}).get(name),
            })
    return rows


#: the table's column groups: (title, ((header, width, decimals), ...)).
GROUPS = (
    ("save", (("s", 7, 2), ("xTrainer", 8, 2))),
    ("stall", (("s", 7, 3), ("xTrainer", 8, 3))),
    ("resume cold", (("s", 7, 2), ("xTrainer", 8, 2))),
    ("resume warm", (("s", 7, 2), ("xTrainer", 8, 2))),
    ("peak RSS xstate", (("save", 7, 2), ("resume", 7, 2))),
    ("write", (("MB/s", 6, 0), ("xdisk", 6, 2))),
)
#: whose checkpoint bytes a method wrote (the async ones write the same files as their sync twin).
CKPT_KEY = {"trainer": "trainer", "accelerate": "accelerate", "dcp": "dcp", "dcp_async": "dcp", "ours_sync": "ours", "ours_async": "ours"}


def cells(values: list[float | None]) -> str:
    columns = [column for _, group in GROUPS for column in group]
    return " ".join(format(v, f"{w}.{d}f") if v is not None else "-".rjust(w) for v, (_, w, d) in zip(values, columns))


def method_row(res: dict[str, Any], method: str, disk_mbps: float, resume: str = "resume") -> list[float | None]:
    """The row's values; `resume` picks the resume samples (`resume_no_verify` for the unverified row, which has no save)."""
    tr, m, state = res["median"]["trainer"], res["median"][method], res["state_bytes"]
    saved = resume == "resume"
    save, stall = (m.get("save"), m.get("stall")) if saved else (None, None)
    cold, warm = m.get(resume), m.get(f"{resume}_warm")
    mbps = ratio(res["checkpoint_bytes"].get(CKPT_KEY[method], 0) / 1e6, save)
    return [
        save, ratio(save, tr["save"]), stall, ratio(stall, tr["save"]),
        cold, ratio(cold, tr["resume"]), warm, ratio(warm, tr["resume_warm"]),
        ratio(m.get("rss") if saved else None, state), ratio(m.get(f"{resume}_rss"), state),
        mbps, ratio(mbps, disk_mbps),
    ]


def table(results: dict[str, Any], disk_mbps: float, targets: list[dict[str, Any]], previous: Path | None) -> str:
    lines = [f"disk: fsynced sequential write {disk_mbps:.0f} MB/s (physical limit)", ""]
    lead = f"{'size':>5} {'method':<11}"
    titles = " ".join(title.center(len(" ".join(h.rjust(w) for h, w, _ in group))) for title, group in GROUPS)
    head = lead + " " + " ".join(h.rjust(w) for _, group in GROUPS for h, w, _ in group)
    lines += [" " * len(lead) + " " + titles.rstrip(), head, "-" * len(head)]
    detail = " " * len(lead) + " "
    for size, res in results.items():
        med, ckpt = res["median"], res["checkpoint_bytes"]
        for method in METHODS:
            m = med[method]
            lines.append(f"{size:>5} {method:<11} {cells(method_row(res, method, disk_mbps))}")
            if method == "ours_sync" and m.get("resume_no_verify") is not None:
                lines.append(f"{size:>5} {'(no verify)':<11} {cells(method_row(res, method, disk_mbps, resume='resume_no_verify'))}")
            if m.get("step_next") is not None:
                waited = (f"{m['stall_in_save']:.3f}s in save() + {m['step_wait']:.3f}s next step() waiting" if method == "ours_async"
                          else f"{m['stall']:.3f}s until async_save() returned (default stager: a copy into fresh memory)")
                lines.append(f"{detail}stall = {waited}; next training step {m['step_next'] / m['step_plain']:.2f}x "
                             f"({m['step_next'] - m['step_plain']:+.3f}s) of one without a save in flight")
        lines.append(f"{'':>5} params {res['params'] / 1e6:.1f}M, state {res['state_bytes'] / 1e9:.2f} GB, checkpoint bytes: "
                     + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in ckpt.items()))
    lines += ["", "targets (ratios of medians" + (f"; previous: {previous}" if previous else "") + "):"]
    for row in targets:
        before = "" if previous is None else "previous -, " if row["previous"] is None else f"previous {row['previous']:.3f}, "
        lines.append(f"  {'PASS' if row['pass'] else 'MISS'} {row['size']:>5} {row['ratio']} = {row['value']:.3f} "
                     f"({before}target {row['op']} {row['bound']})")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    sizes = list(results)
    x = [results[s]["params"] / 1e6 for s in sizes]
    fig, (ax_save, ax_cold, ax_warm) = plt.subplots(1, 3, figsize=(17, 4.8))
    series = [
        ("Trainer _save_checkpoint + os.sync", "trainer", "save", "tab:red", "-"),
        ("Accelerate save_state + os.sync", "accelerate", "save", "tab:orange", "-"),
        ("torch DCP save + os.sync", "dcp", "save", "tab:purple", "-"),
        ("torch DCP async_save: total", "dcp_async", "save", "tab:purple", "--"),
        ("torch DCP async_save: training stall", "dcp_async", "stall", "tab:purple", ":"),
        ("hf_rl_ckpt sync (fsync + digest)", "ours_sync", "save", "tab:blue", "-"),
        ("hf_rl_ckpt async: total until committed", "ours_async", "save", "tab:green", "--"),
        ("hf_rl_ckpt async: training stall", "ours_async", "stall", "tab:green", "-"),
    ]
    for label, method, key, color, style in series:
        ax_save.plot(x, [results[s]["median"][method][key] for s in sizes], style, marker="o", color=color, label=label)
    for ax, suffix in ((ax_cold, ""), (ax_warm, "_warm")):
        for label, method, key, color, style in (
            ("Trainer", "trainer", "resume", "tab:red", "-"),
            ("Accelerate", "accelerate", "resume", "tab:orange", "-"),
            ("torch DCP", "dcp", "resume", "tab:purple", "-"),
            ("hf_rl_ckpt (verified, default)", "ours_sync", "resume", "tab:blue", "-"),
            ("hf_rl_ckpt, verify_on_resume: false", "ours_sync", "resume_no_verify", "tab:blue", "--"),
        ):
            ax.plot(x, [results[s]["median"][method][key + suffix] for s in sizes], style, marker="o", color=color, label=label)
    for ax, what in ((ax_save, "save"), (ax_cold, "resume (cold page cache)"), (ax_warm, "resume (warm page cache)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(what)
        ax.set_xticks(x, [f"{v:.0f}M" for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25M,110M,350M", help="comma-separated: presets %s, or e.g. 200M" % ",".join(PRESETS))
    parser.add_argument("--repeats", type=int, default=3, help="repeats per method and size (>= 3 for medians); methods alternate order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--out", default="benchmarks/out", help="results.json, save_load.png and the run log go here")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: <out>/work); same disk as the probe")
    parser.add_argument("--disk-gb", type=float, default=1.0, help="GB written by the disk-speed probe (fsynced)")
    parser.add_argument("--previous", type=Path, default=None,
                        help="results.json of an earlier run: its ratios are printed beside this run's targets")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    try:  # read before the run, so that a wrong path fails now and not after half an hour
        previous = load_previous(args.previous) if args.previous else None
    except (OSError, ValueError) as exc:
        parser.error(f"--previous {args.previous}: {exc}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    began = time.perf_counter()

    disk = [disk_speed(work, args.disk_gb)]
    print(f"disk probe: {disk[0]:.0f} MB/s fsynced sequential write ({args.disk_gb:g} GB)", flush=True)
    results: dict[str, Any] = {}
    for text in args.sizes.split(","):
        name, spec = parse_size(text)
        bench = Bench(name, spec, args, work)
        size_began = time.perf_counter()
        for repeat in range(args.repeats):
            order = METHODS[repeat % len(METHODS):] + METHODS[: repeat % len(METHODS)]
            for method in order:
                bench.run(method, step=repeat + 1)
            print(f"[{name}] repeat {repeat + 1}/{args.repeats} done ({', '.join(order)}) at {time.perf_counter() - size_began:.0f}s", flush=True)
        disk.append(disk_speed(work, args.disk_gb))
        results[name] = summarize(bench, statistics.median(disk))
        bench.close()
        del bench
        gc.collect()
    disk_mbps = statistics.median(disk)
    for name in results:  # the same disk figure for every size
        results[name]["ratios"]["sync_throughput_vs_disk"] = (
            results[name]["checkpoint_bytes"]["ours"] / results[name]["median"]["ours_sync"]["save"] / 1e6 / disk_mbps
        )
    targets = check_targets(results, previous)
    report = table(results, disk_mbps, targets, args.previous)
    print("\n" + report)
    meta = {
        "command": command, "argv": sys.argv[1:], "device": args.device, "dtype": args.dtype, "repeats": args.repeats,
        # `resume` samples and ratios without a suffix are the cold resume, as in earlier files; `*_warm` the warm one.
        "disk_MBps_samples": disk, "disk_MBps": disk_mbps, "cold_resume": True, "resume_cache": ["cold", "warm"],
        "previous": str(args.previous) if args.previous else None,
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "accelerate", "safetensors")},
        "wall_seconds": time.perf_counter() - began,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "targets": targets}, indent=2) + "\n")
    (out / "table.txt").write_text(f"$ {command}\n\n{report}\n")
    chart(results, out / "save_load.png", f"{args.device} {args.dtype}, disk {disk_mbps:.0f} MB/s, median of {args.repeats}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'save_load.png'} in {meta['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
