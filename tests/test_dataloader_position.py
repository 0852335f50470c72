"""The one dataloader-position format (`hf_rl_ckpt/state/dataloader.py`), for plain loops and Accelerate alike.

The fixtures are files of the two unversioned formats, written by the code of commit 11b40b9 (before
issue 13 gave the position one record and one format) from exactly the runs `plain_run` and
`accelerate_run` rebuild here, after 8 batches: epoch 1, 2 of its 6 batches handed out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from hf_rl_ckpt import CheckpointError, CorruptCheckpointError, ResumableDataLoader, StateMismatchError
from hf_rl_ckpt.integrations.accelerate import PreparedDataLoaders, TrackedDataLoaderShard
from hf_rl_ckpt.state.dataloader import (
    FORMAT_VERSION,
    DataPosition,
    GlobalRngState,
    LoaderStateDict,
    capture_dataloader,
    load_dataloader,
    read_dataloader_file,
)

FIXTURES = Path(__file__).parent / "fixtures"
RESUMABLE_V0 = FIXTURES / "dataloader_position_resumable_v0.json"
ACCELERATE_V0 = FIXTURES / "dataloader_position_accelerate_v0.json"
SAVED_AFTER = 8  # batches; the fixtures' position
CONTINUE_FOR = 10  # batches compared after the resume: the rest of epoch 1 and all of epoch 2


@pytest.fixture(scope="module", autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; leave none behind for other test modules."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def endless(loader: Any) -> Iterator[list[int]]:
    while True:
        for batch in loader:
            yield batch.tolist()


def take(streams: list[Iterator[list[int]]], n: int) -> list[list[list[int]]]:
    return [[next(stream) for stream in streams] for _ in range(n)]


def plain_run(seed: int = 0) -> ResumableDataLoader:
    torch.manual_seed(seed)
    return ResumableDataLoader(DataLoader(torch.arange(24), batch_size=4, shuffle=True))


def accelerate_run(seed: int = 0) -> tuple[list[Any], PreparedDataLoaders]:
    """Three prepared loaders: shuffled by torch's global RNG, shuffled by their own generator, unshuffled."""
    set_seed(seed)
    loaders = Accelerator(cpu=True).prepare(
        DataLoader(torch.arange(24), batch_size=4, shuffle=True),
        DataLoader(torch.arange(24), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7 + seed)),
        DataLoader(torch.arange(8), batch_size=4),
    )
    return loaders, PreparedDataLoaders([TrackedDataLoaderShard(loader) for loader in loaders])


def uninterrupted(streams: list[Iterator[list[int]]], save_after: int, save: Callable[[], None] = lambda: None) -> tuple[GlobalRngState, list]:
    """Run `save_after` batches, `save`, and return the RNG a checkpoint restores and the batches that follow."""
    take(streams, save_after)
    save()
    rng_at_save = GlobalRngState.capture()
    return rng_at_save, take(streams, CONTINUE_FOR)


def test_resumable_loader_file_of_before_the_format_version_resumes_exactly():
    reference = plain_run()
    rng_at_save, expected = uninterrupted([endless(reference)], SAVED_AFTER)

    saved = read_dataloader_file(RESUMABLE_V0)
    assert [(p.epoch, p.batches_in_epoch, p.generator_recorded) for p in saved] == [(1, 2, False)]
    resumed = plain_run(seed=99)
    load_dataloader(resumed, RESUMABLE_V0)
    rng_at_save.restore()  # what the checkpoint's rng/rank_<r>.safetensors does
    assert take([endless(resumed)], CONTINUE_FOR) == expected

    # those files recorded no generator: a loader that has one keeps it as it is, and saves it from then on
    with_generator = ResumableDataLoader(DataLoader(torch.arange(24), batch_size=4, shuffle=True, generator=torch.Generator()))
    load_dataloader(with_generator, RESUMABLE_V0)
    assert with_generator.state_dict()["epoch_start_generator"] is not None


def test_accelerate_file_of_before_the_format_version_resumes_exactly():
    loaders, _ = accelerate_run()
    rng_at_save, expected = uninterrupted([endless(loader) for loader in loaders[:2]], SAVED_AFTER)

    saved = read_dataloader_file(ACCELERATE_V0)
    assert [(p.epoch, p.batches_in_epoch, p.epoch_start_generator is not None) for p in saved] == [(1, 2, False), (1, 2, True), (0, 0, False)]
    loaders, prepared = accelerate_run(seed=5)
    load_dataloader(prepared, ACCELERATE_V0)
    rng_at_save.restore()
    assert take([endless(loader) for loader in loaders[:2]], CONTINUE_FOR) == expected
    assert [batch.tolist() for batch in loaders[2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("save_after", [2, 6, 8, 12], ids=["epoch-0", "last-batch-of-epoch-0", "epoch-1", "last-batch-of-epoch-1"])
def test_new_saves_write_the_versioned_format_and_resume_exactly(tmp_path, save_after):
    reference = plain_run()
    loaders, prepared = accelerate_run()

    def save() -> None:
        (tmp_path / "plain.json").write_bytes(capture_dataloader(reference))
        (tmp_path / "accelerate.json").write_bytes(capture_dataloader(prepared))

    rng_at_save, expected = uninterrupted([endless(reference)] + [endless(loader) for loader in loaders[:2]], save_after, save)
    for name, count in (("plain.json", 1), ("accelerate.json", 3)):
        saved = json.loads((tmp_path / name).read_text())
        assert saved["format_version"] == FORMAT_VERSION and len(saved["positions"]) == count

    resumed = plain_run(seed=99)
    loaders, prepared = accelerate_run(seed=5)
    load_dataloader(resumed, tmp_path / "plain.json")
    load_dataloader(prepared, tmp_path / "accelerate.json")
    rng_at_save.restore()
    assert take([endless(resumed)] + [endless(loader) for loader in loaders[:2]], CONTINUE_FOR) == expected


def test_position_saved_after_an_epoch_loop_ended_starts_the_next_epoch_afresh(tmp_path):
    """A loop that saves once `for batch in loader` is exhausted: the next epoch's order is drawn from the
    RNG the checkpoint restores, as in the uninterrupted run (not replayed from the finished epoch's start)."""
    reference = plain_run()
    list(reference)
    (tmp_path / "rank_0.json").write_bytes(capture_dataloader(reference))
    rng_at_save = GlobalRngState.capture()
    expected = [batch.tolist() for batch in reference]

    resumed = plain_run(seed=99)
    load_dataloader(resumed, tmp_path / "rank_0.json")
    rng_at_save.restore()
    assert [batch.tolist() for batch in resumed] == expected


def test_a_dataloader_that_checkpoints_itself_is_saved_as_its_state_dict(tmp_path):
    class Stateful:
        def __init__(self) -> None:
            self.state = {"seen": 0}

        def state_dict(self) -> dict[str, Any]:
            return self.state

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.state = state

    loader = Stateful()
    loader.state = {"seen": 3, "order": (2, 0, 1)}
    (tmp_path / "new.json").write_bytes(capture_dataloader(loader))
    assert json.loads((tmp_path / "new.json").read_text())["format_version"] == FORMAT_VERSION
    (tmp_path / "unversioned.json").write_text(json.dumps({"seen": 3, "order": {"__tuple__": [2, 0, 1]}}))
    for name in ("new.json", "unversioned.json"):
        restored = Stateful()
        load_dataloader(restored, tmp_path / name)
        assert restored.state == {"seen": 3, "order": (2, 0, 1)}, name
    assert read_dataloader_file(tmp_path / "new.json") == LoaderStateDict({"seen": 3, "order": (2, 0, 1)})
    with pytest.raises(StateMismatchError, match="cannot load one"):
        load_dataloader(object(), tmp_path / "new.json")


def test_positions_that_do_not_fit_the_loader_are_refused(tmp_path):
    with pytest.raises(StateMismatchError, match="3 dataloaders"):
        load_dataloader(plain_run(), ACCELERATE_V0)
    with pytest.raises(StateMismatchError, match="ResumableDataLoader"):
        load_dataloader(object(), RESUMABLE_V0)
    with_generator = ResumableDataLoader(DataLoader(torch.arange(24), batch_size=4, shuffle=True, generator=torch.Generator()))
    (tmp_path / "rank_0.json").write_bytes(capture_dataloader(with_generator))
    with pytest.raises(StateMismatchError, match="generator"):
        load_dataloader(plain_run(), tmp_path / "rank_0.json")

    short = ResumableDataLoader(DataLoader(torch.arange(4), batch_size=4, shuffle=True))
    short.load_state_dict(DataPosition(epoch=0, batches_in_epoch=3, epoch_start_torch_rng=torch.get_rng_state()).to_json())
    rng = GlobalRngState.capture()
    with pytest.raises(CheckpointError, match="ran out after 1 batches while skipping to batch 3"):
        list(short)
    assert torch.equal(torch.get_rng_state(), rng.torch_cpu), "the global RNG is put back even when the replay fails"


def test_a_newer_format_version_is_refused(tmp_path):
    (tmp_path / "rank_0.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "positions": []}))
    with pytest.raises(CorruptCheckpointError, match="format_version"):
        load_dataloader(plain_run(), tmp_path / "rank_0.json")
