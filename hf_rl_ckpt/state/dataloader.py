"""Dataloader position: one record, one file format (`dataloader/rank_<r>.json`), one replay.

A plain `torch.utils.data.DataLoader` cannot report where it is, and its shuffle order is
drawn when an epoch's iterator is created: from the sampler's own generator when it has one
(Accelerate gives every multi-process loader one, synchronised across ranks), else from
torch's global RNG. `DataPosition` records, per loader, the epoch, the batches handed out in
it and both of those RNG states at the epoch start. `PositionTracker` keeps that record up
to date and, on resume, replays the interrupted epoch: generator and torch RNG go back to
their epoch-start states, the consumed batches are fetched again and dropped, and then every
global RNG is put back exactly where the checkpoint left it. A tracker only needs to be told
when an epoch begins, when a batch is handed out and when the epoch ends; that glue is
`ResumableDataLoader` for plain loops and `integrations/accelerate.py` for the loaders
Accelerate prepares.

`capture_dataloader` and `load_dataloader` write and read the file, as JSON:

```
{"format_version": 1, "positions": [{"epoch": 1, "batches_in_epoch": 2,
                                     "epoch_start_torch_rng": "<base64>", "epoch_start_generator": null}]}
```

one entry per tracked loader (one for `ResumableDataLoader`, one per prepared dataloader for
Accelerate). A loader that checkpoints itself (torchdata's `StatefulDataLoader`, a converted
NeMo-RL run's state) is saved as `{"format_version": 1, "state_dict": ...}`. Files written
before the format had a version are read too: `ResumableDataLoader`'s one position, the
Accelerate hooks' `{"dataloaders": [...]}`, and any other loader's bare state dict.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from . import jsoncodec

#: Version of the `dataloader/rank_<r>.json` format that `capture_dataloader` writes.
FORMAT_VERSION = 1
#: Keys of the unversioned files: one `ResumableDataLoader` position, and the Accelerate hooks' list.
_UNVERSIONED_POSITION_KEYS = {"epoch", "batches_in_epoch", "epoch_start_torch_rng"}
_UNVERSIONED_ACCELERATE_KEY = "dataloaders"


@dataclasses.dataclass(frozen=True, eq=False)
class GlobalRngState:
    """The python, numpy and torch CPU/CUDA global RNG states, captured together to be put back together."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> GlobalRngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _rng_state_to_json(state: torch.Tensor | None) -> str | None:
    return None if state is None else base64.b64encode(state.numpy().tobytes()).decode()


def _rng_state_from_json(value: str | torch.Tensor | None) -> torch.Tensor | None:
    """An RNG state as saved: base64 text, or a tensor (the Accelerate hooks' unversioned files, via jsoncodec)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.frombuffer(bytearray(base64.b64decode(value)), dtype=torch.uint8)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: RNG states are tensors, which `==` does not reduce to a bool
class DataPosition:
    """Where one dataloader is: what a resumed run needs to hand out the same next batch.

    Args:
        epoch: the epoch in progress, or the next one when `batches_in_epoch` is 0.
        batches_in_epoch: batches of `epoch` handed out so far; 0 at an epoch boundary.
        epoch_start_torch_rng: torch's global CPU RNG state when `epoch` began (None at a boundary).
        epoch_start_generator: the state of the generator the sampler shuffles with (None if it has
            none) when `epoch` began, or at a boundary its state now.
        generator_recorded: False only for positions read from `ResumableDataLoader`'s unversioned
            files, which did not record a generator; restoring one leaves the loader's generator as it
            is, to start the epoch with.
    """

    epoch: int
    batches_in_epoch: int = 0
    epoch_start_torch_rng: torch.Tensor | None = None
    epoch_start_generator: torch.Tensor | None = None
    generator_recorded: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "epoch_start_torch_rng": _rng_state_to_json(self.epoch_start_torch_rng),
            "epoch_start_generator": _rng_state_to_json(self.epoch_start_generator),
        }

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> DataPosition:
        """Read a position written by `to_json`, or by an unversioned file (`generator` was the Accelerate hooks' key)."""
        generator_key = next((key for key in ("epoch_start_generator", "generator") if key in state), None)
        return cls(
            epoch=int(state["epoch"]),
            batches_in_epoch=int(state["batches_in_epoch"]),
            epoch_start_torch_rng=_rng_state_from_json(state["epoch_start_torch_rng"]),
            epoch_start_generator=None if generator_key is None else _rng_state_from_json(state[generator_key]),
            generator_recorded=generator_key is not None,
        )


@dataclasses.dataclass
class _Replay:
    """A restored mid-epoch position being replayed: batches to fetch again, and the RNG to put back after them."""

    skip: int
    rng_after: GlobalRngState


class PositionTracker:
    """The position of one dataloader, kept up to date by its glue, and the replay that restores it.

    The glue calls `begin_epoch` before the epoch's order is drawn (before the sampler is
    iterated) and skips as many batches as it returns, `count_batch` for every batch the
    loader fetches, skipped ones included, and `end_epoch` once the epoch is exhausted.

    Args:
        generator: returns the generator the loader's sampler shuffles with, or None.
        lookahead: batches the loader fetches before it hands out the current one (Accelerate's
            `DataLoaderShard` fetches one ahead). The replay ends after the batch that was fetched
            last before the checkpoint, so the batches fetched after it see the checkpoint's RNG.
        epoch: the epoch the loader starts in.
    """

    def __init__(self, generator: Callable[[], torch.Generator | None], *, lookahead: int = 0, epoch: int = 0) -> None:
        self._generator = generator
        self._lookahead = lookahead
        self.epoch = epoch
        self.batches = 0
        self._epoch_start_torch_rng: torch.Tensor | None = None
        self._epoch_start_generator: torch.Tensor | None = None
        self._pending: DataPosition | None = None  # a restored mid-epoch position, until its epoch begins again
        self._replay: _Replay | None = None

    def _generator_state(self) -> torch.Tensor | None:
        generator = self._generator()
        return None if generator is None else generator.get_state()

    @property
    def replaying(self) -> bool:
        """Whether batches consumed before the checkpoint are being fetched again."""
        return self._replay is not None

    def position(self) -> DataPosition:
        """The position now, as a checkpoint records it."""
        if self._pending is not None:  # restored, and its epoch has not begun again yet
            return self._pending
        if self.batches:
            return DataPosition(self.epoch, self.batches, self._epoch_start_torch_rng, self._epoch_start_generator)
        return DataPosition(self.epoch, epoch_start_generator=self._generator_state())

    def restore(self, position: DataPosition) -> None:
        """Go back to `position`; a mid-epoch one is replayed when its epoch begins.

        Raises:
            StateMismatchError: the position was saved from a loader that shuffles with a generator
                and this one does not, or the other way round.
        """
        if not position.generator_recorded:  # the generator, if any, starts the epoch as it is now (what such files did)
            position = dataclasses.replace(position, epoch_start_generator=self._generator_state(), generator_recorded=True)
        generator = self._generator()
        if (position.epoch_start_generator is None) != (generator is None):
            raise StateMismatchError(
                "the saved dataloader position does not fit this dataloader: one shuffles with a generator and the other "
                "does not (was shuffle, the sampler or the number of processes changed?)"
            )
        if generator is not None and position.epoch_start_generator is not None:
            generator.set_state(position.epoch_start_generator)
        self.epoch, self.batches = position.epoch, 0
        self._pending = position if position.batches_in_epoch else None

    def begin_epoch(self, epoch: int) -> int:
        """Epoch `epoch` begins; returns how many of its batches to fetch and drop (the restored position's)."""
        skip = 0
        if self._pending is not None:
            skip = self._pending.batches_in_epoch
            self._replay = _Replay(skip, GlobalRngState.capture())
            if self._pending.epoch_start_torch_rng is not None:
                torch.set_rng_state(self._pending.epoch_start_torch_rng)
            self._pending = None
        self.epoch, self.batches = epoch, 0
        self._epoch_start_torch_rng = torch.get_rng_state()
        self._epoch_start_generator = self._generator_state()
        return skip

    def count_batch(self) -> bool:
        """One more batch fetched; returns True when that ends the replay (the global RNG is then the checkpoint's)."""
        self.batches += 1
        if self._replay is not None and self.batches == self._replay.skip + self._lookahead:
            self._finish_replay()
            return True
        return False

    def end_epoch(self, next_epoch: int) -> None:
        """The epoch is exhausted; `next_epoch` begins next.

        Raises:
            CheckpointError: the epoch ran out before the restored position was reached.
        """
        if self._replay is not None:
            skip = self._replay.skip
            self._finish_replay()
            if self.batches < skip:
                raise CheckpointError(
                    f"the dataloader ran out after {self.batches} batches while skipping to batch {skip} of the saved "
                    "position; the dataset, batch size or number of processes changed since the checkpoint"
                )
        self.epoch, self.batches = next_epoch, 0

    def _finish_replay(self) -> None:
        assert self._replay is not None
        self._replay.rng_after.restore()
        self._replay = None


@runtime_checkable
class TracksDataPositions(Protocol):
    """A dataloader (or a group of them) whose position hf_rl_ckpt tracks: `ResumableDataLoader`, Accelerate's prepared loaders."""

    def data_positions(self) -> list[DataPosition]: ...

    def restore_data_positions(self, positions: Sequence[DataPosition]) -> None: ...


class ResumableDataLoader:
    """Wrap a DataLoader (or any re-iterable of batches) so its position can be checkpointed.

    Iterate it like the wrapped loader; every other attribute (`dataset`, `batch_size`, ...)
    is forwarded. Pass it as `dataloader=` to `CheckpointManager.save`/`resume`.
    `state_dict()`/`load_state_dict()` give the position as a JSON-able dict.

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
        self._tracker = PositionTracker(self._generator)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["dataloader"], name)

    def __len__(self) -> int:
        return len(self.dataloader)

    @property
    def epoch(self) -> int:
        return self._tracker.epoch

    @property
    def batches_in_epoch(self) -> int:
        return self._tracker.batches

    def __iter__(self) -> Iterator[Any]:
        tracker = self._tracker
        skip = tracker.begin_epoch(tracker.epoch)
        self._set_sampler_epoch()
        for batch in self.dataloader:
            tracker.count_batch()
            if tracker.batches > skip:
                yield batch
        tracker.end_epoch(tracker.epoch + 1)

    def _generator(self) -> torch.Generator | None:
        return getattr(getattr(self.dataloader, "sampler", None), "generator", None)

    def _set_sampler_epoch(self) -> None:
        for owner in (self.dataloader, getattr(self.dataloader, "sampler", None), getattr(self.dataloader, "batch_sampler", None)):
            if owner is not None and hasattr(owner, "set_epoch"):
                owner.set_epoch(self._tracker.epoch)
                return

    def data_positions(self) -> list[DataPosition]:
        return [self._tracker.position()]

    def restore_data_positions(self, positions: Sequence[DataPosition]) -> None:
        if len(positions) != 1:
            raise StateMismatchError(
                f"the checkpoint holds the position of {len(positions)} dataloaders (an Accelerate run's prepared loaders?) "
                "and a ResumableDataLoader takes one"
            )
        self._tracker.restore(positions[0])

    def state_dict(self) -> dict[str, Any]:
        return self._tracker.position().to_json()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._tracker.restore(DataPosition.from_json(state))


@dataclasses.dataclass(frozen=True)
class LoaderStateDict:
    """The `state_dict()` of a loader that checkpoints itself (torchdata's `StatefulDataLoader`), saved as it is."""

    state: Any


def capture_dataloader(dataloader: Any) -> bytes:
    """A dataloader's position as the JSON bytes of `dataloader/rank_<r>.json`, captured now.

    ```python
    >>> from torch.utils.data import DataLoader
    >>> loader = ResumableDataLoader(DataLoader(list(range(10)), batch_size=2))
    >>> json.loads(capture_dataloader(loader))["positions"][0]["epoch"]
    0
    ```

    Raises:
        CheckpointError: `dataloader` is neither tracked by hf_rl_ckpt nor has a `state_dict()`.
    """
    if isinstance(dataloader, TracksDataPositions):
        payload: dict[str, Any] = {"positions": [position.to_json() for position in dataloader.data_positions()]}
    elif hasattr(dataloader, "state_dict") and hasattr(dataloader, "load_state_dict"):
        payload = {"state_dict": jsoncodec.encode(dataloader.state_dict(), "dataloader")}
    else:
        raise CheckpointError(
            f"cannot save the position of a {type(dataloader).__name__}: it has no state_dict(). "
            "Wrap it: `loader = hf_rl_ckpt.ResumableDataLoader(loader)` (or use torchdata's StatefulDataLoader), "
            "or pass dataloader=None to skip saving the data position."
        )
    return (json.dumps({"format_version": FORMAT_VERSION, **payload}, indent=1) + "\n").encode()


def read_dataloader_file(path: str | os.PathLike) -> list[DataPosition] | LoaderStateDict:
    """The positions (or a self-checkpointing loader's state) in a `dataloader/rank_<r>.json` of any format version.

    Raises:
        CorruptCheckpointError: the file is missing, not JSON, or of a newer format version.
    """
    try:
        saved = json.loads(Path(path).read_bytes())
    except FileNotFoundError as err:
        raise CorruptCheckpointError(path, "missing: no dataloader state for this rank") from err
    except ValueError as err:
        raise CorruptCheckpointError(path, f"not valid JSON ({err})") from err
    if isinstance(saved, dict) and "format_version" in saved:
        if saved["format_version"] != FORMAT_VERSION:
            raise CorruptCheckpointError(
                path, f"dataloader format_version {saved['format_version']!r}; this hf_rl_ckpt reads {FORMAT_VERSION} (upgrade it)"
            )
        if "positions" in saved:
            return [DataPosition.from_json(position) for position in saved["positions"]]
        return LoaderStateDict(jsoncodec.decode(saved["state_dict"]))
    state = jsoncodec.decode(saved)  # an unversioned file, written before format_version 1
    if isinstance(state, dict) and set(state) == {_UNVERSIONED_ACCELERATE_KEY}:
        return [DataPosition.from_json(position) for position in state[_UNVERSIONED_ACCELERATE_KEY]]
    if isinstance(state, dict) and set(state) == _UNVERSIONED_POSITION_KEYS:
        return [DataPosition.from_json(state)]
    return LoaderStateDict(state)


def load_dataloader(dataloader: Any, path: str | os.PathLike) -> None:
    """Restore `dataloader` to the position saved in `path` (a `dataloader/rank_<r>.json`).

    A tracked loader continues, at its next iteration, with the first batch it had not handed
    out; a self-checkpointing loader gets its `load_state_dict()` called.

    Raises:
        CorruptCheckpointError: the file is missing or unreadable.
        StateMismatchError: the saved position does not fit `dataloader`.
    """
    saved = read_dataloader_file(path)
    if isinstance(saved, LoaderStateDict):
        if not hasattr(dataloader, "load_state_dict"):
            raise StateMismatchError(f"{path} holds a dataloader's own state_dict(), and a {type(dataloader).__name__} cannot load one")
        dataloader.load_state_dict(saved.state)
    elif isinstance(dataloader, TracksDataPositions):
        dataloader.restore_data_positions(saved)
    else:
        raise StateMismatchError(
            f"{path} holds a position tracked by hf_rl_ckpt, which a {type(dataloader).__name__} cannot take; "
            "wrap the loader in hf_rl_ckpt.ResumableDataLoader as the run that saved it did"
        )
