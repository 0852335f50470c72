"""An optimizer that does not fit the checkpoint's optimizer state is refused before anything is loaded.

The refusal names what differs (parameters the model does not have, parameter counts,
grouping, state slots, shapes) and what to do; the model keeps its weights and the
optimizer its state, so the run can be rebuilt or continue with a fresh optimizer.
"""

from __future__ import annotations

import pytest
import torch

from hf_rl_ckpt import CheckpointConfig, CheckpointManager, CheckpointSaveError, StateMismatchError
from hf_rl_ckpt.testing.tiny import build_model

WHAT_TO_DO = r"Build the same model and optimizer .* or pass optimizer=None / set resume.load_weight_only: true"


def _decay_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups as the Trainer builds them: weight decay for matrices, none for norms."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1}, {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def _saved(tmp_path, optimizer_args=lambda model: model.parameters()) -> CheckpointManager:
    model = build_model("llama", seed=0)
    optimizer = torch.optim.AdamW(optimizer_args(model), lr=1e-3)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path))).save(1, model=model, optimizer=optimizer)
    return CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))


def _assert_refused_untouched(manager, model, optimizer, match: str) -> None:
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    had_state = list(optimizer.state)
    with pytest.raises(StateMismatchError, match=match) as refused:
        manager.resume(model=model, optimizer=optimizer)
    refused.match(WHAT_TO_DO)
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items()), "a refused resume must not load weights"
    assert list(optimizer.state) == had_state, "a refused resume must not give the optimizer state"


def test_optimizer_built_for_another_model_is_refused_before_the_weights_load(tmp_path):
    manager = _saved(tmp_path)
    model = build_model("llama", seed=1)
    other = torch.optim.AdamW(build_model("llama", seed=2).parameters(), lr=1e-3)
    _assert_refused_untouched(manager, model, other, r"group 0 parameter 0 \(shape \[512, 64\]\) is not a parameter of LlamaForCausalLM")


def test_optimizer_over_other_parameters_is_refused_naming_the_counts(tmp_path):
    manager = _saved(tmp_path)
    model = build_model("llama", seed=1)
    params = list(model.parameters())
    partial = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:5]}], lr=1e-3)
    _assert_refused_untouched(
        manager, model, partial,
        rf"this optimizer holds 5 parameters \(group 0: 3, group 1: 2\), the checkpoint's {len(params)}; not in this optimizer: ",
    )


def test_optimizer_of_another_type_is_refused_naming_its_state(tmp_path):
    manager = _saved(tmp_path)
    model = build_model("llama", seed=1)
    _assert_refused_untouched(
        manager, model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
        r"state differs \(another optimizer type\?\): in the checkpoint only: state\.\S+\.exp_avg.*; in this optimizer only: state\.\S+\.momentum_buffer",
    )


def test_optimizer_grouping_parameters_the_checkpoint_kept_apart_is_refused(tmp_path):
    manager = _saved(tmp_path, _decay_groups)
    model = build_model("llama", seed=1)
    merged = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    _assert_refused_untouched(manager, model, merged, r"group 0 mixes parameters of different groups in the checkpoint: .*weight_decay")


def test_optimizer_of_a_model_of_another_size_names_the_first_shape_mismatch(tmp_path):
    manager = _saved(tmp_path)
    wider = build_model("llama", seed=1, intermediate_size=96)
    _assert_refused_untouched(
        manager, wider, torch.optim.AdamW(wider.parameters(), lr=1e-3),
        r"12 tensor\(s\) differ in shape .*; first shape mismatch: state\.model\.layers\.0\.mlp\.gate_proj\.weight\.exp_avg: "
        r"checkpoint \[128, 64\], this optimizer \[96, 64\]",
    )


def test_regrouped_optimizer_with_the_same_settings_still_resumes(tmp_path):
    manager = _saved(tmp_path, lambda model: [{"params": list(model.parameters())[:4]}, {"params": list(model.parameters())[4:]}])
    model = build_model("llama", seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert manager.resume(model=model, optimizer=optimizer).step == 1
    assert len(optimizer.state) == len(list(model.parameters()))


def test_saving_with_an_optimizer_of_another_model_names_it(tmp_path):
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=str(tmp_path)))
    other = torch.optim.AdamW(build_model("llama", seed=2).parameters(), lr=1e-3)
    with pytest.raises(CheckpointSaveError, match="is not a parameter of LlamaForCausalLM"):
        manager.save(1, model=build_model("llama", seed=1), optimizer=other)
    assert manager.checkpoints() == [] and not any((tmp_path / ".incomplete").iterdir())


def test_a_plain_checkpoint_resumed_into_a_peft_model_names_the_model_kind_before_the_optimizer(tmp_path):
    from peft import LoraConfig, get_peft_model

    manager = _saved(tmp_path)
    peft_model = get_peft_model(build_model("llama", seed=1), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(StateMismatchError, match="has no model/adapter/ to load into a PeftModel; it holds model/consolidated/"):
        manager.resume(model=peft_model, optimizer=torch.optim.AdamW(peft_model.parameters(), lr=1e-3))
