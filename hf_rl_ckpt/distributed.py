"""The few torch.distributed facts the manager needs, safe to call without a process group."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclass(frozen=True)
class Ranks:
    """The processes one save coordinates: the job's process group (`JOB`), or this process alone (`THIS_PROCESS`).

    A checkpoint written by one rank for itself (a conversion under `resume.mode: from_path`
    runs on rank 0 only) must not join the job's collectives, which the other ranks are not in.
    """

    alone: bool = False

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
        return [value] if self.alone else all_gather_object(value)

    def barrier(self) -> None:
        if not self.alone:
            barrier()


JOB = Ranks()
THIS_PROCESS = Ranks(alone=True)


@contextlib.contextmanager
def quiet_single_process_dcp() -> Iterator[None]:
    """Silence DCP's "torch.distributed is disabled" warning: single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
