"""Dataloader position, saved per rank as JSON, so a resumed run sees the same next batch.

A plain `torch.utils.data.DataLoader` cannot report where it is, and its shuffle order is
drawn from torch's global RNG when an epoch's iterator is created. `ResumableDataLoader`
records, per epoch, that RNG state and how many batches were handed out; on resume it
replays the epoch's iterator creation from the recorded RNG state, skips the consumed
batches, and then puts every global RNG back exactly where the checkpoint left it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, CorruptCheckpointError
from . import jsoncodec


@contextlib.contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Run a block without moving python, numpy or torch CPU/CUDA global RNG state."""
    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class ResumableDataLoader:
    """Wrap a DataLoader (or any re-iterable of batches) so its position can be checkpointed.

    Iterate it like the wrapped loader; every other attribute (`dataset`, `batch_size`, ...)
    is forwarded. `state_dict()`/`load_state_dict()` are what `CheckpointManager` saves.

    ```python
    >>> from torch.utils.data import DataLoader
    >>> loader = ResumableDataLoader(DataLoader(list(range(10)), batch_size=2, shuffle=True))
    >>> first = next(iter(loader))
    >>> loader.state_dict()["batches_in_epoch"]
    1
    ```

    Skipping consumed batches fetches them again (exact, including random transforms in
    the dataset, at the cost of reading those samples); for very large epochs prefer a
    sampler that can seek, such as `torchdata`'s `StatefulDataLoader`, which the manager
    also accepts.
    """

    def __init__(self, dataloader: Any) -> None:
        self.dataloader = dataloader
        self.epoch = 0
        self.batches_in_epoch = 0
        self._epoch_rng_state: torch.Tensor | None = None
        self._resume_pending = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["dataloader"], name)

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[Any]:
        if self._resume_pending:
            self._resume_pending = False
            iterator = self._replay_epoch()
        else:
            self.batches_in_epoch = 0
            self._set_sampler_epoch()
            self._epoch_rng_state = torch.get_rng_state()
            iterator = iter(self.dataloader)
        for batch in iterator:
            self.batches_in_epoch += 1
            yield batch
        self.epoch += 1
        self.batches_in_epoch = 0

    def _set_sampler_epoch(self) -> None:
        for owner in (self.dataloader, getattr(self.dataloader, "sampler", None), getattr(self.dataloader, "batch_sampler", None)):
            if owner is not None and hasattr(owner, "set_epoch"):
                owner.set_epoch(self.epoch)
                return

    def _replay_epoch(self) -> Iterator[Any]:
        with preserve_global_rng():
            self._set_sampler_epoch()
            if self._epoch_rng_state is not None:
                torch.set_rng_state(self._epoch_rng_state)
            iterator = iter(self.dataloader)
            for index in range(self.batches_in_epoch):
                try:
                    next(iterator)
                except StopIteration:
                    raise CheckpointError(
                        f"the dataloader ran out after {index} batches while skipping to batch {self.batches_in_epoch} "
                        "of the saved position; the dataset or batch size changed since the checkpoint"
                    ) from None
        return iterator

    def state_dict(self) -> dict[str, Any]:
        rng = None if self._epoch_rng_state is None else base64.b64encode(self._epoch_rng_state.numpy().tobytes()).decode()
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "epoch_start_torch_rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        rng = state.get("epoch_start_torch_rng")
        self._epoch_rng_state = None if rng is None else torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8)
        self._resume_pending = True


def capture_dataloader(dataloader: Any) -> bytes:
    """A stateful dataloader's position as the JSON bytes of `dataloader/rank_<r>.json`, captured now."""
    if not (hasattr(dataloader, "state_dict") and hasattr(dataloader, "load_state_dict")):
        raise CheckpointError(
            f"cannot save the position of a {type(dataloader).__name__}: it has no state_dict(). "
            "Wrap it: `loader = hf_rl_ckpt.ResumableDataLoader(loader)` (or use torchdata's StatefulDataLoader), "
            "or pass dataloader=None to skip saving the data position."
        )
    return jsoncodec.dumps(dataloader.state_dict(), "dataloader")


def load_dataloader(dataloader: Any, path: str | os.PathLike) -> None:
    try:
        state = jsoncodec.loads(open(path, "rb").read())
    except FileNotFoundError as err:
        raise CorruptCheckpointError(path, "missing: no dataloader state for this rank") from err
    except ValueError as err:
        raise CorruptCheckpointError(path, f"not valid JSON ({err})") from err
    dataloader.load_state_dict(state)
