"""CheckpointManager round trips, resume modes, the pickle-free guarantee and custom managers."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
import xxhash

from hf_rl_ckpt import (
    CheckpointConfig,
    CheckpointManager,
    CheckpointManagerProtocol,
    CheckpointNotFoundError,
    CheckpointSaveError,
    StateMismatchError,
    create_manager,
)
from hf_rl_ckpt.manager import PROTOCOL_MEMBERS
from hf_rl_ckpt.testing.tiny import build_model


def _rng_draws() -> list:
    return [(random.random(), float(np.random.rand()), torch.rand(1).item()) for _ in range(3)]


def _assert_same_state(a, b):
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, slots in sa["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, sb["state"][index][slot]), (index, slot)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()


def test_round_trip_restores_every_state_exactly(tmp_path, make_objects):
    trained = make_objects(seed=0)
    batches = iter(trained.loader)
    for _ in range(3):
        trained.train_step(next(batches))
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    path = manager.save(3, **trained.as_kwargs(), metrics={"loss": 1.5}, epoch=0.5, extra_state={"tokens_seen": 192})
    saved_position = trained.loader.state_dict()
    expected_batch, expected_draws = next(batches), _rng_draws()

    restored = make_objects(seed=1)
    state = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**restored.as_kwargs())
    assert (state.step, state.path, state.epoch, state.extra) == (3, path, 0.5, {"tokens_seen": 192})
    assert restored.loader.state_dict() == saved_position
    assert _rng_draws() == expected_draws
    _assert_same_state(trained, restored)
    assert torch.equal(next(iter(restored.loader)), expected_batch)


def _seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resumed_training_continues_identically(tmp_path, make_objects):
    _seed_everything()
    reference = make_objects()
    ref_losses = [reference.train_step(batch) for _, batch in zip(range(10), reference.endless_batches())]

    _seed_everything()
    first = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    batches = first.endless_batches()
    losses = [first.train_step(next(batches)) for _ in range(7)]  # crosses an epoch boundary (6 batches/epoch)
    manager.save(7, **first.as_kwargs())

    _seed_everything(99)
    second = make_objects(seed=5)
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**second.as_kwargs())
    batches = second.endless_batches()
    losses += [second.train_step(next(batches)) for _ in range(3)]
    assert losses == ref_losses
    _assert_same_state(reference, second)


def test_checkpoint_loads_without_unpickling(tmp_path, make_objects, monkeypatch):
    objs = make_objects()
    objs.train_step(next(iter(objs.loader)))
    path = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).save(1, **objs.as_kwargs())
    for file in path.rglob("*"):
        if file.is_file():
            head = file.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{file} looks like a pickle/torch.save archive"

    class NoUnpickling(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            raise AssertionError("a checkpoint file was unpickled")

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint file was unpickled")

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickling)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    fresh = make_objects(seed=3)
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**fresh.as_kwargs())
    _assert_same_state(objs, fresh)


def test_layout_and_training_info(tmp_path, make_objects):
    objs = make_objects()
    path = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), hub_token="hf_x")).save(2, **objs.as_kwargs(), metrics={"r": 1.0})
    info = json.loads((path / "training_info.json").read_text())
    assert info["format_version"] == 2 and info["step"] == 2 and info["world_size"] == 1
    assert {"torch", "transformers", "safetensors"} <= set(info["versions"])
    expected = {"model/consolidated/model.safetensors", "model/consolidated/config.json", "scheduler.json",
                "dataloader/rank_0.json", "rng/rank_0.safetensors", "config.yaml"}
    assert expected <= set(info["manifest"])
    for rel, entry in info["manifest"].items():  # the size and XXH3-128 of each file's bytes
        assert entry == {"size": len(data := (path / rel).read_bytes()), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}, rel
    assert "hf_x" not in (path / "config.yaml").read_text()
    assert json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"][0]["step"] == 2


def test_consolidated_folder_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model("llama", seed=0, tie_word_embeddings=True)
    path = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), max_shard_size="200KB")).save(1, model=model)
    folder = path / "model/consolidated"
    assert (folder / "model.safetensors.index.json").is_file(), "expected shards above max_shard_size"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"], "tied weights must be stored once"
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 4]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_resume_modes(tmp_path, make_objects, caplog):
    objs = make_objects()
    assert CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**objs.as_kwargs()) is None
    assert "no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).save(4, **objs.as_kwargs())
    disabled = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), resume={"mode": "disable"}))
    assert not disabled.should_load() and disabled.resume(**objs.as_kwargs()) is None
    missing = tmp_path / "step_99"
    from_path = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), resume={"mode": "from_path", "resume_path": str(missing)}))
    with pytest.raises(CheckpointNotFoundError, match=str(missing)):
        from_path.resume(**objs.as_kwargs())
    weights = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path), resume={"mode": "auto", "load_weight_only": True}))
    state = weights.resume(model=objs.model)
    assert state.weights_only and state.step == 4


def test_failed_save_commits_nothing(tmp_path, make_objects):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    manager.save(1, **objs.as_kwargs())

    class ExplodingLoader:
        def state_dict(self):
            raise OSError("disk went away")

        def load_state_dict(self, state):
            raise AssertionError("never loaded")

    with pytest.raises(CheckpointSaveError, match=r"saving step 2 failed \(rank 0: OSError: disk went away\).*step_1 is intact"):
        manager.save(2, model=objs.model, optimizer=objs.optimizer, dataloader=ExplodingLoader())
    assert [row.step for row in manager.checkpoints()] == [1]
    assert not any((tmp_path / ".incomplete").iterdir())
    assert CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(**make_objects().as_kwargs()).step == 1


def test_resave_of_same_step_replaces_it(tmp_path, make_objects):
    objs = make_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    manager.save(5, **objs.as_kwargs(), metrics={"v": 1})
    manager.save(5, **objs.as_kwargs(), metrics={"v": 2})
    assert [(r.step, r.metrics) for r in manager.checkpoints()] == [(5, {"v": 2})]
    assert not any((tmp_path / ".trash").iterdir())


def test_other_architecture_is_refused_naming_keys(tmp_path, make_objects):
    objs = make_objects()
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).save(1, **objs.as_kwargs())
    other = build_model("qwen2", seed=0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StateMismatchError, match=r"shape mismatch: .*k_proj"):
        CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).resume(model=other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items()), "a refused load must not modify the model"


def _delegate(name):
    def method(self, *args, **kwargs):
        self.calls.append(name)
        return getattr(self.inner, name)(*args, **kwargs)

    return method


def _delegating_init(self, config, **kwargs):
    self.inner, self.calls = CheckpointManager(config, **kwargs), []


PROPERTIES = ("deadline_reached", "preempted")

#: A custom manager with exactly the protocol's members, by delegation (not a CheckpointManager subclass).
ProtocolOnlyManager = type(
    "ProtocolOnlyManager", (),
    {"__init__": _delegating_init, **{name: property(lambda self, name=name: getattr(self.inner, name)) for name in PROPERTIES},
     **{name: _delegate(name) for name in PROTOCOL_MEMBERS if name not in PROPERTIES}},
)


class OldProtocolManager:
    """What the protocol used to ask for: five methods. The Trainer integration also calls resume, load_rng_state, ..."""

    def __init__(self, config, **kwargs):
        self.config = config

    def save(self, step, **state):
        return None

    def load(self, path, **state):
        return None

    def should_save(self, step):
        return False

    def should_load(self):
        return False

    def finalize(self, terminate=True):
        return None


def test_custom_manager_class_is_loaded_and_checked(tmp_path):
    manager = create_manager(CheckpointConfig(checkpoint_dir=str(tmp_path), checkpoint_manager_class=f"{__name__}.ProtocolOnlyManager"))
    assert isinstance(manager, ProtocolOnlyManager) and isinstance(manager, CheckpointManagerProtocol)
    missing = "resume, load_optimizer_state, load_rng_state, sync_weights, latest, deadline_reached, preempted"
    with pytest.raises(TypeError, match=f"missing {missing} "):
        create_manager(CheckpointConfig(checkpoint_manager_class=f"{__name__}.OldProtocolManager"))
