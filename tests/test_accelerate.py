"""`register_checkpointing`: Accelerate's save_state/load_state through hf_rl_ckpt, in one process.

The multi-process runs (torchrun, DDP) are in tests/test_distributed.py.
"""

from __future__ import annotations

import copy
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from hf_rl_ckpt import CheckpointConfig, CheckpointError
from hf_rl_ckpt.accelerate import register_checkpointing
from hf_rl_ckpt.testing.tiny import build_model, build_tokenizer, toy_lm_dataset

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dist_helpers import pickle_files  # noqa: E402

BATCHES_PER_EPOCH = 6


@pytest.fixture(scope="module", autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; leave none behind for other test modules."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class Counter:
    """An object registered with `accelerator.register_for_checkpointing` (Accelerate pickles those)."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


@dataclass
class Run:
    accelerator: Accelerator
    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    counter: Counter


def start_run(ckpt_dir: Path, model_seed: int = 0) -> Run:
    set_seed(0)
    accelerator = Accelerator(cpu=True)
    model = build_model("llama", seed=model_seed, dropout=0.1)  # dropout: the RNG must be restored too
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    dataset = toy_lm_dataset(build_tokenizer(), n=4 * BATCHES_PER_EPOCH, seq_len=16).with_format("torch")
    loader = DataLoader(dataset, batch_size=4, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    register_checkpointing(accelerator, CheckpointConfig(checkpoint_dir=str(ckpt_dir)))
    return Run(accelerator, model, optimizer, scheduler, loader, counter)


def train(run: Run, start: int, stop: int, save_at: int | None = None, save_after_epoch: bool = False) -> tuple[dict[int, float], dict | None]:
    """Steps start+1..stop, with one save: at step `save_at` (inside an epoch) or, with `save_after_epoch`,
    once the first epoch's loop has ended. Returns the losses and a snapshot of everything taken right after the save."""
    losses, saved, step = {}, None, start
    while step < stop:
        for batch in run.loader:
            loss = run.model(**batch).loss
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad()
            step += 1
            run.counter.count += 1
            losses[step] = loss.item()
            if step == save_at:
                saved = save(run, step)
            if step == stop:
                break
        else:
            if save_after_epoch and saved is None:
                saved = save(run, step)
    return losses, saved


def save(run: Run, step: int) -> dict[str, Any]:
    assert run.accelerator.save_state(step=step).name == f"step_{step}"
    return {"step": step, **snapshot(run)}


def snapshot(run: Run) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in run.model.state_dict().items()},
        "optimizer": copy.deepcopy(run.optimizer.state_dict()),
        "scheduler": run.scheduler.state_dict(),
        "counter": run.counter.count,
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(actual, expected), where
    else:
        assert actual == expected, where


@pytest.mark.parametrize(
    "save_at, save_after_epoch",
    [(4, False), (BATCHES_PER_EPOCH, False), (None, True)],
    ids=["mid-epoch", "last-batch-of-epoch", "after-epoch-loop"],
)
def test_save_state_writes_no_pickle_and_load_state_restores_exactly(tmp_path, save_at, save_after_epoch):
    total = BATCHES_PER_EPOCH + 3
    losses, saved = train(start_run(tmp_path), 0, total, save_at, save_after_epoch)
    assert pickle_files(tmp_path) == [], "save_state must not write pickles (optimizer.bin, random_states_0.pkl, ...)"

    resumed = start_run(tmp_path, model_seed=1)
    state = resumed.accelerator.load_state()
    assert state.step == saved["step"]
    assert_same({"step": state.step, **snapshot(resumed)}, saved)
    assert train(resumed, state.step, total)[0] == {step: loss for step, loss in losses.items() if step > state.step}


def test_save_state_step_naming_and_guards(tmp_path):
    run = start_run(tmp_path / "ckpt")
    acc = run.accelerator
    assert acc.save_state(tmp_path / "ckpt" / "step_7").name == "step_7"  # Accelerate-style output_dir
    assert acc.save_state().name == "step_1"  # default: Accelerate's own save counter, one save so far
    with pytest.raises(CheckpointError, match="checkpoint_dir"):
        acc.save_state(tmp_path / "elsewhere" / "step_3")

    for call in (lambda: Accelerator.save_state(acc, str(tmp_path / "plain")), lambda: Accelerator.load_state(acc, str(tmp_path / "ckpt" / "step_7"))):
        with pytest.raises(CheckpointError, match="pickles"):
            call()  # Accelerate's own implementation, reached past the instance: stopped before it writes anything
    assert pickle_files(tmp_path) == []

    handle = acc.register_save_state_pre_hook(lambda models, weights, output_dir: None)
    with pytest.raises(CheckpointError, match="pre-hook"):
        acc.save_state(step=8)
    handle.remove()
    with pytest.raises(CheckpointError, match="already"):
        register_checkpointing(acc, CheckpointConfig(checkpoint_dir=str(tmp_path / "ckpt")))


def test_accelerate_release_without_a_hooked_internal_fails_at_registration(tmp_path, monkeypatch):
    import accelerate
    from accelerate.data_loader import DataLoaderShard

    owner = next(cls for cls in DataLoaderShard.__mro__ if "_update_state_dict" in vars(cls))
    monkeypatch.delattr(owner, "_update_state_dict")  # what a release that renamed it would look like
    with pytest.raises(CheckpointError) as raised:
        start_run(tmp_path / "ckpt")
    message = str(raised.value)
    assert "DataLoaderShard._update_state_dict" in message and f"accelerate {accelerate.__version__}" in message
