"""The few torch.distributed facts and collectives the manager needs, safe to call without a process group.

Agreement is the rule: a decision that could come out differently on different ranks (a
clock, a signal, a file listing, the outcome of something only rank 0 does) is made once
and shared, so no rank ever waits in a collective that another rank skipped. Three helpers
carry it: `on_rank0` (rank 0 acts, every rank returns its result or raises its error),
`agreed` (every rank acts; if one fails, all raise) and `any_rank` (flags reduced over the
ranks: true on every rank if true on one).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import CheckpointError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def ranks_per_node() -> int:
    """How many ranks share this node (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate); the world size when unset."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(value: Any, group: Any = None) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(*flags: bool, group: Any = None) -> tuple[bool, ...]:
    """Each flag, true on every rank when it is true on any rank (one small all-reduce; cheap enough for every step).

    On a gloo `group` (`Ranks.side_channel`) the flags stay on the CPU: no GPU stream sync per call.
    """
    if not is_distributed():
        return tuple(bool(flag) for flag in flags)
    backend = str(dist.get_backend(group))
    on_gpu = "gloo" not in backend and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    reduced = torch.tensor([int(bool(flag)) for flag in flags], dtype=torch.int32, device=device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    return tuple(bool(value) for value in reduced.tolist())


def _portable(error: Exception, source: int) -> Exception:
    """`error` if it survives pickling (its type and fields reach the other ranks), else a CheckpointError saying what it was.

    The round trip is in memory, of an exception this process raised: it only tells whether the
    other ranks could rebuild it (an exception whose `__init__` takes other arguments than its
    `args` cannot be), so that they never fail on the error instead of raising it.
    """
    try:
        pickle.loads(pickle.dumps(error))
    except Exception as unpicklable:
        return CheckpointError(f"rank {source}: {type(error).__name__}: {error} (sent as text: {type(unpicklable).__name__})")
    return error


def on_rank0(action: Callable[[], T]) -> T:
    """Run `action` on rank 0 alone; every rank returns its result, or raises the error it raised.

    The one way a rank-0 side effect (taking the lock, recovering the directory, publishing
    weights, verifying a checkpoint) reports its outcome: the other ranks never proceed to a
    collective that rank 0, having failed, will not join. The result travels by pickle, so
    keep it small (paths, records, lists).

    ```python
    >>> on_rank0(lambda: 41 + 1)
    42
    ```
    """
    result: Any = None
    error: Exception | None = None
    if rank() == 0:
        try:
            result = action()
        except Exception as err:
            error = err
    if is_distributed():
        shared_result, shared_error = broadcast_object((result, None if error is None else _portable(error, 0)))
        if rank() != 0:
            result, error = shared_result, shared_error
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def agreed() -> Iterator[None]:
    """Run the block on every rank; if it raised on any rank, every rank raises the error of the lowest rank that failed.

    For steps each rank does on its own (loading its weights, its RNG streams): a rank that
    failed must not leave the others to go on into the training loop's next collective.
    Every rank raises the same error type, so every rank takes the same `except` branch.
    """
    error: Exception | None = None
    try:
        yield
    except Exception as err:
        error = err
    if not is_distributed():
        if error is not None:
            raise error
        return
    for source, shared in enumerate(all_gather_object(None if error is None else _portable(error, rank()))):
        if shared is not None:
            raise error if source == rank() else shared


def failures(error: BaseException | None, group: Any = None) -> dict[int, str]:
    """Every rank's failure ("Type: message") by rank, given this rank's `error` (None: it succeeded); {} when all succeeded."""
    reports = all_gather_object(None if error is None else f"{type(error).__name__}: {error}", group)
    return {index: report for index, report in enumerate(reports) if report is not None}


def seeing_rank0_directory(root: Path) -> list[bool]:
    """For each rank: does it see rank 0's `root` (a shared filesystem), or a directory of that name on its own disk (node-local)?

    Every rank must call it. Rank 0 writes a probe file named by a fresh token, every rank
    looks for it, rank 0 removes it once all have looked. [True] without a process group.
    """
    if not is_distributed():
        return [True]

    def write_probe() -> str:
        name = f".hf_rl_ckpt-shared-{uuid.uuid4().hex}"
        (root / name).write_bytes(b"")
        return name

    probe = on_rank0(write_probe)
    seen = all_gather_object((root / probe).is_file())  # every rank has looked before the probe goes
    if rank() == 0:
        (root / probe).unlink()
    return seen


def destroy_group(group: Any) -> None:
    """Destroy a process group made by `Ranks.side_channel` that may be broken (None: nothing to do); see `Ranks.close`."""
    if group is not None and dist.is_initialized():
        dist.destroy_process_group(group)


@dataclass(frozen=True)
class Ranks:
    """The processes one save coordinates: the job's process group (`JOB`), or this process alone (`THIS_PROCESS`).

    A checkpoint written by one rank for itself (a conversion under `resume.mode: from_path`
    runs on rank 0 only) must not join the job's collectives, which the other ranks are not in.
    `group` is the process group the collectives run on (None: the job's default group).
    """

    alone: bool = False
    group: Any = None

    @property
    def rank(self) -> int:
        return 0 if self.alone else rank()

    @property
    def world_size(self) -> int:
        return 1 if self.alone else world_size()

    @property
    def is_distributed(self) -> bool:
        return not self.alone and is_distributed()

    def all_gather_object(self, value: Any) -> list[Any]:
        return [value] if self.alone else all_gather_object(value, self.group)

    def failures(self, error: BaseException | None) -> dict[int, str]:
        """See `failures`."""
        return failures(error, self.group) if not self.alone else ({0: f"{type(error).__name__}: {error}"} if error else {})

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(group=self.group)

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """See `any_rank`."""
        return tuple(bool(flag) for flag in flags) if self.alone else any_rank(*flags, group=self.group)

    def side_channel(self, timeout: float | None = None) -> Ranks:
        """The same ranks over a new gloo process group of their own; every rank must call this, in the same order.

        Background threads (async saves) coordinate over one: their collectives never
        interleave with the training loop's on the job's group, whatever its backend, and a
        rank that died or stalls makes them fail after `timeout` seconds (None: torch's
        default) instead of hanging. The per-step decisions use another, so they stay on the
        CPU even in an NCCL job.
        """
        if not self.is_distributed:
            return self
        return Ranks(group=dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout) if timeout else None))

    def close(self) -> None:
        """Destroy a healthy side channel once every rank is done with it (every rank calls this).

        The barrier first: no rank tears down its connections while a peer's message on them may
        still be in flight.
        """
        if self.group is not None and dist.is_initialized():
            dist.barrier(group=self.group)
            dist.destroy_process_group(self.group)


JOB = Ranks()
THIS_PROCESS = Ranks(alone=True)


@contextlib.contextmanager
def quiet_single_process_dcp() -> Iterator[None]:
    """Silence DCP's "torch.distributed is disabled" warning: single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
