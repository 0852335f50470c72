"""Asynchronous checkpointing: the training loop pays for a copy to host memory, not for the disk.

A save is split in two (see `CheckpointManager.save`):

1. **Stage** (training thread). Every part of the checkpoint is captured as of the `save`
   call: small state (scheduler, dataloader position, RNG streams, configs) as bytes or
   fresh tensors, and the model and optimizer tensors into a *reusable staging buffer*
   (`StagingBuffer`: host copies keyed by tensor name, allocated on the first save and
   refilled in place by later ones while shapes match, a plain memcpy for a CPU model, a
   copy into pinned memory for a GPU one). The optimizer state, which only
   `optimizer.step()` changes, is copied by the background thread instead, while the loop
   runs the next forward and backward; a step pre-hook holds the next `step()` until that
   copy is done (`DeferredCopy`). A synchronous save skips the copies and writes straight
   from the live tensors, so it holds no second copy of the model.
2. **Write + commit** (one background thread, `AsyncCheckpointWriter`). The parts are written
   with the streaming writers (hashed while written, fsynced), the manifest is built from
   those digests and the checkpoint is renamed into place, exactly as a synchronous save
   does; both produce the same bytes.

The next `save` waits for the previous one only if it is still running, then refills the
buffer. A background failure is logged at once and raised by the next `save` or by
`finalize()` (as `CheckpointSaveError`); it never passes silently, and since nothing is
renamed into place until every byte is written and fsynced, the previous checkpoint stays
the newest loadable one whatever happens to the background write, SIGKILL included.

In a distributed job each rank's thread writes its own files, then the threads exchange
"done, with these digests" or "failed, with this error" in one all-gather over a gloo
process group of their own (`distributed.Ranks.side_channel`, made by every rank at the
first async save): never the job's group, whose collectives the training loop is running
meanwhile. Rank 0's thread commits when every rank is done; otherwise every thread fails
the save naming the failed ranks, and a rank that died or stalls fails it after
`async_rank_timeout` (the group's timeout) instead of hanging the others. The failure is
raised in the training thread by the next `save`/`finalize`, on every rank. Parts that must
run collectives (DCP writes of sharded FSDP state) or that read live objects we cannot
stage (a PEFT adapter, written by `save_adapter`) run in the training thread before the
rest goes to the background.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Mapping

import numpy
import torch

from .digest import Digests
from .faultpoint import faultpoint
from .shims import runs_step_pre_hooks

logger = logging.getLogger("hf_rl_ckpt")


# ---------------------------------------------------------------- parts
@dataclass
class SavePart:
    """One part of a checkpoint, holding what it will write as captured when `save` was called.

    `write(tensors)` (or `write()` when the part has no `tensors`) writes into the staging
    directory and returns the digests it computed while writing. `tensors` are the live
    tensors it reads: a synchronous save writes them directly; an async save first swaps
    them for host copies in the staging buffer (`StagingBuffer.stage`), after which the
    originals may change. `background=False` marks a part that runs collectives or reads
    live objects: it always runs in the training thread. `written_by_step` names the
    optimizer whose `step()` is the only thing that changes `tensors` (its state): an async
    save may then copy them on the background thread, before that optimizer's next step,
    instead of in the training thread (see `DeferredCopy`). `after_others` marks a part that
    reads what the other parts wrote (the model card): it is never run alongside them.
    """

    name: str
    write: Callable[..., Digests]
    tensors: Mapping[str, torch.Tensor] | None = None
    background: bool = True
    written_by_step: Any = None
    after_others: bool = False

    def run(self) -> Digests:
        digests = self.write(self.tensors) if self.tensors is not None else self.write()
        faultpoint("save.part_written")  # here, inside every caller's error handling: a failure is reported, not escaped
        return digests


def run_parts(parts: list[SavePart], *, concurrently: bool) -> Iterator[tuple[Digests, Exception | None]]:
    """Run the parts' writes; yield (digests, error) for each, in order.

    `concurrently`: the parts are written at once, on threads (hashing and file writes
    release the GIL, so a single process uses several cores), then the `after_others` parts;
    nothing is reported before all have finished, so the clean-up of a failure never races
    a writer. Otherwise each part runs only when the caller asks for the next result (the
    caller checks every rank between parts, and parts may run collectives).
    """
    together = [part for part in parts if not part.after_others]
    if not concurrently or len(together) < 2:
        for part in parts:
            try:
                yield part.run(), None
            except Exception as err:
                yield {}, err
        return
    results: dict[int, tuple[Digests, Exception | None]] = {}
    with ThreadPoolExecutor(len(together), thread_name_prefix="hf_rl_ckpt-part") as pool:
        futures = {id(part): pool.submit(part.run) for part in together}
        wait(futures.values())
    for key, future in futures.items():
        error = future.exception()
        if error is not None and not isinstance(error, Exception):
            raise error
        results[key] = ({} if error is not None else future.result()), error
    for part in parts:
        if part.after_others:
            try:
                results[id(part)] = part.run(), None
            except Exception as err:
                results[id(part)] = {}, err
        yield results[id(part)]


#: Niceness of the writer thread (Linux: per thread, inherited by the threads it starts).
WRITER_NICENESS = 19


def _yield_cpu_to_training() -> None:
    """Let the training threads have the CPU first: the writer runs on what they leave idle.

    Where training keeps every core busy (a CPU job, or data workers saturating the host)
    the write takes longer; on a GPU node the cores it needs are idle anyway.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: the writer keeps the default priority
        pass


def _copy_on_this_thread(target: torch.Tensor, source: torch.Tensor) -> None:
    """memcpy of a contiguous host tensor on the calling thread (numpy releases the GIL meanwhile)."""
    numpy.copyto(target.reshape(-1).view(torch.uint8).numpy(), source.reshape(-1).view(torch.uint8).numpy())


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
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def stage(self, parts: list[SavePart], *, stream: Any = None, background: bool = False) -> None:
        """Replace the `tensors` of `parts` by their host copies (GPU copies on `stream` when given).

        `background`: called from the writer thread while training runs, so host-to-host
        copies run on this thread alone (`_copy_on_this_thread`) instead of starting a second
        team of torch's intra-op threads that would compete with training's for its cores.
        """
        devices = set()
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            for part in parts:
                if not part.tensors:
                    continue
                with self._lock:
                    previous = self._buffers.get(part.name, {})
                staged = {}
                for name, tensor in part.tensors.items():
                    source = tensor.detach()
                    on_gpu = source.device.type == "cuda"
                    buffer = previous.get(name)
                    if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype or buffer.is_pinned() != on_gpu:
                        buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=on_gpu)
                    if background and not on_gpu and source.is_contiguous():
                        _copy_on_this_thread(buffer, source)
                    else:
                        buffer.copy_(source, non_blocking=on_gpu)
                    if on_gpu:
                        devices.add(source.device)
                    staged[name] = buffer
                part.tensors = staged
                with self._lock:
                    self._buffers[part.name] = staged  # names no longer saved are dropped with the old dict
        if stream is not None:
            stream.synchronize()
        else:
            for device in devices:
                torch.cuda.synchronize(device)

    def retain(self, names: set[str]) -> None:
        """Drop the copies of parts not in `names` (parts this save no longer has)."""
        with self._lock:
            self._buffers = {name: tensors for name, tensors in self._buffers.items() if name in names}

    def nbytes(self) -> int:
        """Bytes held by the buffer (the host copies kept for the next save)."""
        with self._lock:
            return sum(t.numel() * t.element_size() for tensors in self._buffers.values() for t in tensors.values())

    def close(self) -> None:
        """Free the host copies (a later `stage` allocates them again)."""
        with self._lock:
            self._buffers = {}


def _hookable(optimizer: Any) -> Any | None:
    """The torch optimizer whose `step()` runs step pre-hooks (unwrapping e.g. Accelerate's), or None."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not runs_step_pre_hooks(optimizer):
        return None
    if any(group.get("capturable") for group in optimizer.param_groups):  # CUDA-graph replays of step() skip Python hooks
        return None
    return optimizer


class DeferredCopy:
    """Stage a part's optimizer state on the background thread, before that optimizer's next `step()`.

    Between a `save` call and the next `optimizer.step()` the training loop runs forward and
    backward, which do not touch the optimizer's state (`step()` is its only writer). So
    instead of copying the state in the training thread, the background thread copies it
    first thing, while the loop computes, and a step pre-hook makes the next `step()` wait
    until the copy is done (usually it already is: the copy takes a memcpy of the state,
    forward and backward take longer). The model weights are still copied inside `save`:
    other code than the optimizer may write them (weight syncs, merges, EMA swaps).
    `async_defer_optimizer_copy: false` copies the optimizer state inside `save` too, for
    loops that change optimizer state outside `step()`.
    """

    def __init__(self, part: SavePart, optimizer: torch.optim.Optimizer) -> None:
        self.part = part
        self.done = threading.Event()
        self.waited = 0.0  # seconds the training loop's step() waited for this copy
        self._events = []
        for device in {t.device for t in (part.tensors or {}).values() if t.device.type == "cuda"}:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))  # the state as of this call, whatever is still queued
            self._events.append((device, event))
        self._handle = optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.done.is_set():
            started = time.perf_counter()
            self.done.wait()
            self.waited += time.perf_counter() - started

    def run(self, buffer: StagingBuffer) -> None:
        """Background thread: copy the part's tensors into `buffer`, then release the optimizer's step."""
        try:
            stream = None
            for device, event in self._events:
                stream = torch.cuda.Stream(device)
                stream.wait_event(event)
            buffer.stage([self.part], stream=stream if len(self._events) == 1 else None, background=True)
        finally:
            self.done.set()

    def remove(self) -> None:
        """Training thread: unregister the hook (never from inside a step, whose hook loop it would disturb)."""
        self.done.set()
        self._handle.remove()


# ---------------------------------------------------------------- background thread
class AsyncCheckpointWriter:
    """Runs one checkpoint's write + commit at a time on a background thread.

    The thread is not a daemon: a process that leaves its training loop without calling
    `finalize()` still finishes (and commits) the save in flight before it exits.

    `defer_optimizer_copy` (the config's `async_defer_optimizer_copy`): copy optimizer state
    on the background thread before the optimizer's next step (`DeferredCopy`) rather than
    inside `save`.

    ```python
    writer = AsyncCheckpointWriter(defer_optimizer_copy=config.async_defer_optimizer_copy)
    ```
    """

    def __init__(self, *, defer_optimizer_copy: bool = True) -> None:
        self.defer_optimizer_copy = defer_optimizer_copy
        self.buffer = StagingBuffer()
        self._thread: threading.Thread | None = None
        self._failure: tuple[int, BaseException] | None = None
        self.step: int | None = None  # of the last save submitted
        self._deferred: list[DeferredCopy] = []

    def stage(self, parts: list[SavePart]) -> list[DeferredCopy]:
        """Training thread: copy the parts' tensors into the buffer now, except optimizer state that
        can be copied by the background thread before the optimizer's next step (returned; run them first)."""
        later = []
        for part in parts:
            optimizer = _hookable(part.written_by_step) if part.tensors and self.defer_optimizer_copy else None
            if optimizer is not None:
                later.append(DeferredCopy(part, optimizer))
        deferred_parts = {id(copy.part) for copy in later}
        self.buffer.retain({part.name for part in parts if part.tensors})
        self.buffer.stage([part for part in parts if id(part) not in deferred_parts])
        self._deferred = later
        return later

    @property
    def step_waited(self) -> float:
        """Seconds the last save's deferred copies held up an optimizer step (0 when they were done in time)."""
        return sum(copy.waited for copy in self._deferred)

    def submit(self, step: int, job: Callable[[], None]) -> None:
        """Start `job` (write + commit of `step`) on the background thread; the previous one must be drained.

        `job` must run the deferred copies returned by `stage` before anything else.
        """
        if self._thread is not None:
            raise RuntimeError("an async save is still pending; wait() for it first")
        self.step = step
        self._thread = threading.Thread(target=self._run, args=(step, job), name=f"hf_rl_ckpt-async-save-{step}", daemon=False)
        self._thread.start()

    def _run(self, step: int, job: Callable[[], None]) -> None:
        try:
            _yield_cpu_to_training()
            job()
        except BaseException as err:  # kept for the training thread, which raises it at the next save/finalize
            logger.error("the background save of step %d failed: %s: %s (raised again at the next save() or finalize())",
                         step, type(err).__name__, err)
            self._failure = (step, err)
        finally:
            for copy in self._deferred:
                copy.done.set()  # never leave an optimizer step waiting, whatever happened

    def wait(self) -> tuple[int, BaseException] | None:
        """Wait for the save in flight (if any); return (step, error) of a failed one, once, else None."""
        if self._thread is not None:
            if self._thread.is_alive():
                started = time.perf_counter()
                self._thread.join()
                logger.info("waited %.2fs for the background save of step %s", time.perf_counter() - started, self.step)
            self._thread = None
        for copy in self._deferred:
            copy.remove()
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
