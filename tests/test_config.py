"""CheckpointConfig: loading NeMo-RL/NexRL YAML as-is and clear errors for bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_rl_ckpt import CheckpointConfig, ConfigError
from hf_rl_ckpt.layout import CheckpointLayout

pytestmark = pytest.mark.logic

FIXTURES = Path(__file__).parent / "fixtures"


def test_kwargs_defaults_and_resume_mapping():
    cfg = CheckpointConfig(checkpoint_dir="out", save_period=5, resume={"mode": "disable"})
    assert cfg.save_period == 5 and cfg.resume.mode == "disable" and cfg.keep_top_k is None


def test_flat_dict_with_alias_and_nested_resume():
    cfg = CheckpointConfig.from_dict({"checkpoint_dir": "x", "save_freq": 7, "resume": {"mode": "from_path", "resume_path": "x/step_7"}})
    assert cfg.save_period == 7 and cfg.resume.resume_path == "x/step_7"


def test_nemo_rl_yaml_loads_as_is():
    cfg = CheckpointConfig.from_yaml(FIXTURES / "nemo_rl_grpo.yaml")
    assert cfg.enabled is True
    assert cfg.metric_name and cfg.keep_top_k and cfg.save_period
    assert cfg.checkpoint_dir.startswith("results")


def test_nemo_rl_sft_yaml_loads_as_is():
    cfg = CheckpointConfig.from_yaml(FIXTURES / "nemo_rl_sft.yaml")
    assert cfg.metric_name == "val:val_loss" and cfg.higher_is_better is False


def test_nexrl_yaml_loads_as_is():
    cfg = CheckpointConfig.from_yaml(FIXTURES / "nexrl.yaml")
    assert cfg.checkpoint_dir and cfg.save_period
    assert cfg.resume.mode == "auto" and cfg.resume.resume_dataloader is True


def test_nexrl_remove_previous_ckpt_keeps_only_the_newest():
    cfg = CheckpointConfig.from_dict({"trainer": {"checkpoint_path": "ck", "save_freq": 5, "remove_previous_ckpt": True}})
    assert (cfg.keep_top_k, cfg.metric_name) == (1, "step")


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"'keep_topk'.*Did you mean 'keep_top_k'"):
        CheckpointConfig.from_dict({"checkpointing": {"keep_topk": 3}})
    with pytest.raises(ConfigError, match=r"'resume.mdoe'.*Did you mean 'resume.mode'"):
        CheckpointConfig.from_dict({"resume": {"mdoe": "auto"}, "checkpointing": {}})


def test_trainer_block_ignores_non_checkpoint_keys():
    cfg = CheckpointConfig.from_dict({"trainer": {"checkpoint_path": "ck", "save_freq": 3, "total_train_steps": 100}, "model": {"x": 1}})
    assert cfg.checkpoint_dir == "ck" and cfg.save_period == 3


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"save_period": "10"}, r"'save_period' must be int or null, got '10'"),
        ({"higher_is_better": "yes"}, r"'higher_is_better' must be bool"),
        ({"keep_top_k": 0, "metric_name": "r"}, r"keep_top_k must be >= 1"),
        ({"keep_top_k": 3}, r"metric_name is not set"),
        ({"model_save_format": "pickle"}, r"'model_save_format' must be one of 'safetensors', 'torch_save'"),
        ({"resume": {"mode": "sometimes"}}, r"'resume.mode' must be one of 'disable', 'auto', 'from_path'"),
        ({"resume": {"mode": "from_path"}}, r"resume.resume_path is empty"),
        ({"max_shard_size": "lots"}, r"max_shard_size 'lots' is not a size"),
        ({"checkpoint_must_save_by": "tomorrow"}, r"checkpoint_must_save_by must look like 'DD:HH:MM:SS'"),
    ],
)
def test_bad_values_name_the_field(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        CheckpointConfig.from_dict(data)


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "ckpt.yaml"
    path.write_text("checkpointing:\n  keep_top_k: [1,\n")
    with pytest.raises(ConfigError, match=str(path)):
        CheckpointConfig.from_yaml(path)


def test_secrets_are_redacted():
    cfg = CheckpointConfig(hub_token="hf_secret")
    assert cfg.to_dict()["hub_token"] == "<redacted>"
    assert "hf_secret" not in repr(cfg)


def test_subclass_adds_fields():
    @dataclasses.dataclass
    class MyConfig(CheckpointConfig):
        upload_bucket: str | None = None

    cfg = MyConfig.from_dict({"checkpointing": {"upload_bucket": "s3://x", "save_period": 2}})
    assert cfg.upload_bucket == "s3://x" and cfg.save_period == 2


# ---------------------------------------------------------------- checkpoint_name_template: one rule that formats and parses
@pytest.mark.parametrize("template", ["step_{step}", "ckpt_{step:06d}", "{step:d}", "run-{step:03}-final", "a{{b}}_{step}", "{step}"])
@settings(max_examples=200, deadline=None)
@given(step=st.integers(min_value=0, max_value=10**12))
def test_name_template_round_trips_every_step(template, step):
    layout = CheckpointLayout("runs", CheckpointConfig(checkpoint_name_template=template).checkpoint_name_template)
    assert layout.parse_step(layout.step_name(step)) == step


def test_a_name_counts_only_if_it_is_the_step_name():
    assert CheckpointLayout("runs", "ckpt_{step:06d}").parse_step("ckpt_40") is None
    assert CheckpointLayout("runs").parse_step("step_040") is None


@pytest.mark.parametrize(
    "template", ["{step:.2f}", "{step:x}", "{step:>6}", "{step:6d}", "{step!r}", "ckpt_{step}_{epoch}", "{}", "ckpt", "a/{step}", "x{step"]
)
def test_name_template_that_cannot_parse_back_is_refused(template):
    with pytest.raises(ConfigError, match=r"checkpoint_name_template .*'ckpt_\{step:06d\}'"):
        CheckpointConfig(checkpoint_name_template=template)
