"""Asynchronous checkpointing: the training loop pays for a copy to host memory, not for the disk.

A save is split in two (see `CheckpointManager.save`):

1. **Stage** (training thread). Every part of the checkpoint is captured as of the `save`
   call: small state (scheduler, dataloader position, RNG streams, configs) as bytes or
   fresh tensors, and the model and optimizer tensors into a *reusable staging buffer*
   (`StagingBuffer`: host copies keyed by tensor name, allocated on the first save and
   refilled in place by later ones while shapes match, a plain memcpy for a CPU model, a
   copy into pinned memory for a GPU one). A synchronous save skips the copy
   and writes straight from the live tensors, so it holds no second copy of the model.
2. **Write + commit** (one background thread, `AsyncCheckpointWriter`). The parts are written
   with the streaming writers (hashed while written, fsynced), the manifest is built from
   those digests and the checkpoint is renamed into place, exactly as a synchronous save
   does; both produce the same bytes.

The next `save` waits for the previous one only if it is still running, then refills the
buffer. A background failure is logged at once and raised by the next `save` or by
`finalize()` (as `CheckpointSaveError`); it never passes silently, and since nothing is
renamed into place until every byte is written and fsynced, the previous checkpoint stays
the newest loadable one whatever happens to the background write, SIGKILL included.

Distributed jobs never run a collective from the background thread. Each rank writes its
own files and then reports, through a marker file in `.incomplete/<name>.ranks/`, either
"done" with the digests of what it wrote or "failed" with the error; rank 0's thread waits
for every rank's marker before it commits. Failures are agreed on by all ranks in the
training thread at the next `save`/`finalize` (one `all_gather_object`), so every rank
raises together. Parts that must run collectives (DCP writes of sharded FSDP state) or
that read live objects we cannot stage (a PEFT adapter, written by `save_adapter`) run in
the training thread before the rest goes to the background.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .atomic import atomic_write_json
from .errors import CheckpointError, CheckpointSaveError
from .state import jsoncodec

logger = logging.getLogger("hf_rl_ckpt")

Digests = dict[str, tuple[int, str]]

#: Seconds rank 0's background commit waits for the other ranks' markers before giving up.
RANK_TIMEOUT_ENV = "HF_RL_CKPT_ASYNC_RANK_TIMEOUT"
DEFAULT_RANK_TIMEOUT = 1800.0
#: Test hook: seconds the background writer sleeps after each part, to hold a write in flight.
PART_DELAY_ENV = "HF_RL_CKPT_ASYNC_TEST_PART_DELAY"


# ---------------------------------------------------------------- capture (training thread)
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG streams as `state.rng.save_rng` stores them: (tensors, header metadata).

    Captured when `save` is called; the file is written later from these values, so an
    async save records the RNG exactly where the training loop was, not where it is by the
    time the background thread writes.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    metadata = {
        "python_version": str(py_version),
        "python_gauss_next": repr(py_gauss),
        "numpy_kind": str(np_kind),
        "numpy_pos": str(np_pos),
        "numpy_has_gauss": str(np_has_gauss),
        "numpy_cached_gaussian": repr(float(np_gauss)),
    }
    return tensors, metadata


def capture_scheduler(scheduler: Any) -> bytes:
    """The scheduler's state as the JSON `state.scheduler.save_scheduler` writes."""
    return jsoncodec.dumps(scheduler.state_dict(), "scheduler")


def capture_dataloader(dataloader: Any) -> bytes:
    """The dataloader position as the JSON `state.dataloader.save_dataloader` writes."""
    if not (hasattr(dataloader, "state_dict") and hasattr(dataloader, "load_state_dict")):
        raise CheckpointError(
            f"cannot save the position of a {type(dataloader).__name__}: it has no state_dict(). "
            "Wrap it: `loader = hf_rl_ckpt.ResumableDataLoader(loader)` (or use torchdata's StatefulDataLoader), "
            "or pass dataloader=None to skip saving the data position."
        )
    return jsoncodec.dumps(dataloader.state_dict(), "dataloader")


# ---------------------------------------------------------------- parts
@dataclass
class SavePart:
    """One part of a checkpoint, holding what it will write as captured when `save` was called.

    `write(tensors)` (or `write()` when the part has no `tensors`) writes into the staging
    directory and returns the digests it computed while writing. `tensors` are the live
    tensors it reads: a synchronous save writes them directly; an async save first swaps
    them for host copies in the staging buffer (`StagingBuffer.stage`), after which the
    originals may change. `background=False` marks a part that runs collectives or reads
    live objects: it always runs in the training thread.
    """

    name: str
    write: Callable[..., Digests]
    tensors: Mapping[str, torch.Tensor] | None = None
    background: bool = True

    def run(self) -> Digests:
        return self.write(self.tensors) if self.tensors is not None else self.write()


class StagingBuffer:
    """Host copies of the tensors of async saves, allocated once and refilled in place by later saves.

    Keyed by part and tensor name: a tensor whose shape and dtype match the previous save's
    is copied into the same host tensor (a plain memcpy for a CPU model); others get a new
    one, and names no longer saved are dropped, so the buffer never holds more than one
    copy of the staged state. Copies from a GPU go to pinned memory, non-blocking, and are
    synchronised before `stage` returns. The caller must not stage again while a background
    write still reads the previous copies (`AsyncCheckpointWriter` ensures it).

    torch's `DefaultStager`/`StateDictStager` (torch.distributed.checkpoint.staging) keys its
    cache by the *storage object* of the source tensor instead; a resume or any
    `optimizer.load_state_dict` replaces the optimizer's state tensors, after which it would
    allocate (and page-fault) the whole optimizer copy again on the next save, and hold both
    until the old storages are collected. Keying by name keeps the copy in place.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}

    def stage(self, parts: list[SavePart]) -> None:
        """Replace the `tensors` of `parts` by their host copies."""
        fresh: dict[tuple[int, str], torch.Tensor] = {}
        devices = set()
        with torch.no_grad():
            for index, part in enumerate(parts):
                if not part.tensors:
                    continue
                staged = {}
                for name, tensor in part.tensors.items():
                    key = (index, name)
                    source = tensor.detach()
                    on_gpu = source.device.type == "cuda"
                    buffer = self._buffers.get(key)
                    if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype or buffer.is_pinned() != on_gpu:
                        buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=on_gpu)
                    buffer.copy_(source, non_blocking=on_gpu)
                    if on_gpu:
                        devices.add(source.device)
                    fresh[key] = staged[name] = buffer
                part.tensors = staged
        for device in devices:
            torch.cuda.synchronize(device)
        self._buffers = fresh

    def nbytes(self) -> int:
        """Bytes held by the buffer (the host copies kept for the next save)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def close(self) -> None:
        """Free the host copies (a later `stage` allocates them again)."""
        self._buffers = {}


# ---------------------------------------------------------------- background thread
class AsyncCheckpointWriter:
    """Runs one checkpoint's write + commit at a time on a background thread.

    The thread is not a daemon: a process that leaves its training loop without calling
    `finalize()` still finishes (and commits) the save in flight before it exits.
    """

    def __init__(self) -> None:
        self.buffer = StagingBuffer()
        self._thread: threading.Thread | None = None
        self._failure: tuple[int, BaseException] | None = None
        self._step: int | None = None

    @property
    def busy(self) -> bool:
        """True while a background save is still running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, step: int, job: Callable[[], None]) -> None:
        """Start `job` (write + commit of `step`) on the background thread; the previous one must be drained."""
        if self._thread is not None:
            raise RuntimeError("an async save is still pending; wait() for it first")
        self._step = step
        self._thread = threading.Thread(target=self._run, args=(step, job), name=f"hf_rl_ckpt-async-save-{step}", daemon=False)
        self._thread.start()

    def _run(self, step: int, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as err:  # kept for the training thread, which raises it at the next save/finalize
            logger.error("the background save of step %d failed: %s: %s (raised again at the next save() or finalize())",
                         step, type(err).__name__, err)
            self._failure = (step, err)

    def wait(self) -> tuple[int, BaseException] | None:
        """Wait for the save in flight (if any); return (step, error) of a failed one, once, else None."""
        if self._thread is not None:
            if self._thread.is_alive():
                started = time.perf_counter()
                self._thread.join()
                logger.info("waited %.2fs for the background save of step %s", time.perf_counter() - started, self._step)
            self._thread = None
        failure, self._failure = self._failure, None
        return failure

    def join(self) -> None:
        """Wait for the save in flight without consuming its failure (the next `wait` still reports it)."""
        if self._thread is not None:
            self._thread.join()

    def close(self) -> tuple[int, BaseException] | None:
        """`wait`, then free the staging buffer."""
        try:
            return self.wait()
        finally:
            self.buffer.close()


def background_failure(step: int, error: BaseException, previous: Path | None) -> CheckpointSaveError:
    """The error the training thread raises for a background save that failed."""
    raised = CheckpointSaveError(
        f"the background (async) save of step {step} failed ({type(error).__name__}: {error}); nothing was committed"
        + (f", the newest checkpoint is still {previous}" if previous else "")
    )
    raised.__cause__ = error
    return raised


def hold_for_tests() -> None:
    """Sleep `HF_RL_CKPT_ASYNC_TEST_PART_DELAY` seconds (tests hold a background write in flight with it)."""
    delay = os.environ.get(PART_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


# ---------------------------------------------------------------- cross-rank completion
class RankMarkers:
    """Per-rank completion markers of one async save, in `.incomplete/<name>.ranks/`.

    Each rank's background thread writes `rank_<r>.json` when its files are written (with
    their digests) or when it failed (with the error); rank 0's thread commits once every
    rank reported success. Files, not collectives: a background thread must never join a
    collective that could interleave with the training loop's own.
    """

    def __init__(self, staging: Path) -> None:
        self.root = staging.parent / f"{staging.name}.ranks"

    def reset(self) -> None:
        """Rank 0, before the ranks start writing: remove markers of an earlier attempt at the same step."""
        shutil.rmtree(self.root, ignore_errors=True)

    def report(self, rank: int, digests: Digests | None, error: BaseException | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        body = {"rank": rank, "ok": error is None, "digests": digests or {}, "error": None if error is None else f"{type(error).__name__}: {error}"}
        atomic_write_json(self.root / f"rank_{rank}.json", body)

    def collect(self, world_size: int, staging: Path, timeout: float | None = None) -> Digests:
        """Rank 0: wait until every rank reported; return their digests, or raise naming the ranks that failed."""
        timeout = float(os.environ.get(RANK_TIMEOUT_ENV, DEFAULT_RANK_TIMEOUT)) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        exiting_since: float | None = None
        reports: dict[int, dict[str, Any]] = {}
        while True:
            for rank in range(world_size):
                if rank not in reports:
                    try:
                        reports[rank] = json.loads((self.root / f"rank_{rank}.json").read_text())
                    except (FileNotFoundError, json.JSONDecodeError):
                        pass
            if len(reports) == world_size:
                break
            missing = sorted(set(range(world_size)) - set(reports))
            now = time.monotonic()
            if not threading.main_thread().is_alive():  # the interpreter is exiting: other ranks are likely gone too
                exiting_since = exiting_since or now
                if now - exiting_since > 60:
                    raise CheckpointSaveError(f"rank(s) {missing} never reported their part of {staging.name}; the process is exiting")
            if now > deadline:
                raise CheckpointSaveError(f"rank(s) {missing} did not report their part of {staging.name} within {timeout:.0f}s")
            time.sleep(0.05)
        failed = {rank: report["error"] for rank, report in sorted(reports.items()) if not report["ok"]}
        if failed:
            raise CheckpointSaveError("; ".join(f"rank {rank}: {error}" for rank, error in failed.items()))
        digests: Digests = {}
        for report in reports.values():
            digests.update({name: (int(size), str(sha)) for name, (size, sha) in report["digests"].items()})
        return digests
