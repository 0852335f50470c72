"""`CheckpointConfig`: the one configuration object of hf_rl_ckpt.

Field names follow NeMo-RL's `checkpointing:` block and NexRL's `trainer:`/`resume:` blocks so
that their YAML loads unchanged. Validation happens once, at construction, and every error
names the offending field (and the nearest valid key for a typo): a checkpoint config that
is wrong should fail before the first training step, not at the first save an hour later.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .background import RetryPolicy
from .errors import ConfigError
from .layout import parse_name_template
from .redact import redact_secrets

ResumeMode = Literal["disable", "auto", "from_path"]

#: Metric name that ranks checkpoints by recency: `keep_top_k: 3` + `metric_name: step` keeps the last 3.
STEP_METRIC = "step"



@dataclass
class ResumeConfig:
    """How a run picks up from an earlier checkpoint (NexRL's `resume:` block).

    Attributes:
        mode: `disable` always starts fresh; `auto` resumes from the newest complete
            checkpoint in `checkpoint_dir` and starts fresh (with a log line) when there is
            none; `from_path` resumes from `resume_path` and fails if it is missing.
        resume_path: checkpoint directory for `from_path`.
        load_weight_only: load only the model weights (start a new run from a checkpoint's
            weights with a fresh optimizer, scheduler and data order).
        resume_dataloader: restore the data position (skip consumed batches); False starts
            the data order afresh while optimizer and scheduler still resume.
        on_corrupt: what `auto` does when the newest checkpoint fails verification:
            `fallback` to the previous complete one with a warning, or `error`.
        trust_pickle: allow reading pickled files, which our own format never needs: a
            `model_save_format: torch_save` checkpoint, or a foreign `resume_path` (HF
            Trainer, Accelerate, NeMo-RL folder) converted on the fly. Even then they are read
            only with `torch.load(weights_only=True)`; see `hf_rl_ckpt.state.pickled`.
    """

    mode: ResumeMode = "auto"
    resume_path: str | None = None
    load_weight_only: bool = False
    resume_dataloader: bool = True
    on_corrupt: Literal["fallback", "error"] = "fallback"
    trust_pickle: bool = False


@dataclass
class CheckpointConfig:
    """Everything hf_rl_ckpt needs to know to save, retain, resume and publish checkpoints.

    Build it from keyword arguments, a dict, or YAML (NeMo-RL `checkpointing:` and NexRL
    `trainer:` + `resume:` blocks are read as-is):

    ```python
    >>> from hf_rl_ckpt import CheckpointConfig
    >>> cfg = CheckpointConfig(checkpoint_dir="runs/ckpt", save_period=50,
    ...                        metric_name="val_reward", keep_top_k=3)
    >>> cfg.resume.mode
    'auto'
    >>> CheckpointConfig.from_dict({"checkpointing": {"checkpoint_dir": "out", "save_freq": 10}}).save_period
    10

    ```

    Sub-blocks (`resume:`, `hub_retry:`) may be given as dicts, as in YAML:

    ```python
    >>> CheckpointConfig(hub_retry={"attempts": 3, "initial_delay": 0.5}).hub_retry.max_delay
    30.0

    ```

    Subclass it (as a dataclass) to add fields for a custom manager class.
    """

    enabled: bool = True
    checkpoint_dir: str = "checkpoints"
    save_period: int | None = None
    metric_name: str | None = None
    higher_is_better: bool = True
    keep_top_k: int | None = None
    model_save_format: Literal["safetensors", "torch_save"] = "safetensors"
    save_consolidated: Literal["every", "final", "never"] | bool = "every"
    save_optimizer: bool = True
    async_save: bool = False
    async_defer_optimizer_copy: bool = True
    async_rank_timeout: str = "00:30:00"
    sync_weight_path: str | None = None
    sync_weight_period: int = 1
    sync_weight_keep: int = 2
    consolidated_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    model_cache_dir: str | None = None
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    max_shard_size: int | str = "5GB"
    checkpoint_name_template: str = "step_{step}"
    verify_on_resume: bool = True
    checkpoint_must_save_by: str | None = None
    save_on_preemption: bool = True
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True
    hub_endpoint: str | None = None
    hub_token: str | None = field(default=None, repr=False)
    hub_push_training_state: bool = False
    hub_keep_evicted: bool = False
    hub_retry: RetryPolicy = field(default_factory=RetryPolicy)
    remote_dir: str | None = None
    remote_storage_options: dict[str, Any] | None = field(default=None, repr=False)
    remote_retry: RetryPolicy = field(default_factory=RetryPolicy)
    checkpoint_manager_class: str | None = None

    #: Keys accepted under other names: NeMo-RL/NexRL spellings -> field.
    ALIASES: typing.ClassVar[dict[str, str]] = {"save_freq": "save_period", "checkpoint_path": "checkpoint_dir"}
    #: Keys of NexRL's `trainer:` block that configure checkpointing; the rest of that block is not ours.
    TRAINER_KEYS: typing.ClassVar[tuple[str, ...]] = (
        "checkpoint_path", "checkpoint_dir", "save_freq", "save_period", "sync_weight_path", "remove_previous_ckpt",
    )

    def __post_init__(self) -> None:
        if isinstance(self.resume, Mapping):
            self.resume = _build(ResumeConfig, dict(self.resume), "resume.")
        if isinstance(self.hub_retry, Mapping):
            self.hub_retry = _build(RetryPolicy, dict(self.hub_retry), "hub_retry.")
        if isinstance(self.remote_retry, Mapping):
            self.remote_retry = _build(RetryPolicy, dict(self.remote_retry), "remote_retry.")
        for f in dataclasses.fields(self):
            _check_type(type(self), f.name, getattr(self, f.name))
        for f in dataclasses.fields(self.resume):
            _check_type(ResumeConfig, f.name, getattr(self.resume, f.name), prefix="resume.")
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.save_consolidated, bool):  # NeMo-RL's and earlier configs' spelling
            self.save_consolidated = "every" if self.save_consolidated else "never"
        if self.save_period == 0:
            self.save_period = None  # NexRL's save_freq: 0 means "no periodic saves"
        if self.save_period is not None and self.save_period < 0:
            raise ConfigError(f"save_period must be >= 1 (got {self.save_period}); leave it unset to save only on evaluation/end.")
        if self.sync_weight_period < 1:
            raise ConfigError(f"sync_weight_period must be >= 1 (got {self.sync_weight_period}).")
        if self.sync_weight_keep < 1:
            raise ConfigError(
                f"sync_weight_keep must be >= 1 (got {self.sync_weight_keep}): the published version is always kept; "
                "2 (the default) also keeps the one an engine may still be reading"
            )
        if self.keep_top_k is not None:
            if self.keep_top_k < 1:
                raise ConfigError(f"keep_top_k must be >= 1 (got {self.keep_top_k}); leave it unset (null) to keep every checkpoint.")
            if not self.metric_name:
                raise ConfigError(
                    f"keep_top_k={self.keep_top_k} ranks checkpoints by a metric, but metric_name is not set. "
                    f"Set metric_name to the metric to rank by (e.g. 'val_reward' or 'eval_loss' with "
                    f"higher_is_better: false), or metric_name: '{STEP_METRIC}' to keep the most recent {self.keep_top_k}."
                )
        parse_name_template(self.checkpoint_name_template)
        if self.resume.mode == "from_path" and not self.resume.resume_path:
            raise ConfigError("resume.mode is 'from_path' but resume.resume_path is empty; set it to a checkpoint directory.")
        if self.checkpoint_must_save_by is not None:
            parse_duration(self.checkpoint_must_save_by, field_name="checkpoint_must_save_by")
        if parse_duration(self.async_rank_timeout, field_name="async_rank_timeout") <= 0:
            raise ConfigError(f"async_rank_timeout must be longer than zero (got {self.async_rank_timeout!r}); e.g. '00:30:00' for 30 minutes.")
        parse_size(self.max_shard_size)
        if self.checkpoint_manager_class is not None and "." not in self.checkpoint_manager_class:
            raise ConfigError(
                f"checkpoint_manager_class must be a dotted path 'package.module.ClassName' (got {self.checkpoint_manager_class!r})."
            )
        self._validate_hub()
        self._validate_remote()

    def _validate_hub(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub is true but hub_model_id is not set; set hub_model_id to the repo to publish to, e.g. 'your-name/my-run'.")
        if self.hub_model_id is not None:
            check_repo_id(self.hub_model_id, "hub_model_id")
        if self.hub_endpoint is not None and not re.match(r"https?://[^/\s]+", self.hub_endpoint):
            raise ConfigError(f"hub_endpoint must be an http(s) URL such as 'https://huggingface.co' (got {self.hub_endpoint!r}); leave it unset for the default Hub.")

    def _validate_remote(self) -> None:
        """Refuse what cannot work before anything is written; reaching the storage is checked when the manager starts."""
        from .remote import RemoteStore, is_remote_url

        if self.remote_storage_options is not None and not isinstance(self.remote_storage_options, Mapping):
            raise ConfigError(f"remote_storage_options must be a mapping of fsspec options (got {type(self.remote_storage_options).__name__}).")
        if self.remote_dir is not None:
            RemoteStore(self.remote_dir, self.remote_storage_options)  # a URL whose filesystem is installed
        if is_remote_url(self.resume.resume_path) and not self.resume.resume_path.startswith("file://"):
            RemoteStore(self.resume.resume_path.rsplit("/", 1)[0], self.remote_storage_options)

    def consolidates(self, *, final: bool) -> bool:
        """Whether a save writes a sharded model's consolidated folder: every save, the `final` one (end of training, preemption), or none."""
        return self.save_consolidated == "every" or (self.save_consolidated == "final" and final)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CheckpointConfig":
        """Build a config from a dict: either the fields themselves, or a whole training config.

        A dict with a top-level `checkpointing:` or `trainer:` block is read as a training
        config: `checkpointing:` (NeMo-RL) holds our fields, `trainer:` (NexRL) is read for its
        checkpoint keys only, `resume:` may sit at the top level or inside `checkpointing:`, and
        every other top-level block is ignored.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a checkpoint config must be a mapping, got {type(data).__name__}.")
        if "checkpointing" in data or "trainer" in data:
            merged = _merge_blocks(data)
        else:
            merged = dict(data)
        return _build(cls, merged, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "CheckpointConfig":
        """Read a YAML file (a bare checkpoint block or a whole training config)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read checkpoint config {path}: {err.strerror}") from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        try:
            return cls.from_dict(data or {})
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain dict of every field; with `redact`, secrets (hub_token, ...) become '<redacted>'."""
        out = dataclasses.asdict(self)
        return redact_secrets(out) if redact else out


# ---------------------------------------------------------------------- helpers
def _merge_blocks(data: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    trainer = data.get("trainer") or {}
    if not isinstance(trainer, Mapping):
        raise ConfigError("trainer: must be a mapping.")
    for key in CheckpointConfig.TRAINER_KEYS:
        if key in trainer:
            merged[key] = trainer[key]
    if merged.pop("remove_previous_ckpt", False) is True:
        # NexRL's "keep only the newest checkpoint" is top-1 by recency.
        merged.setdefault("keep_top_k", 1)
        merged.setdefault("metric_name", STEP_METRIC)
    block = data.get("checkpointing") or {}
    if not isinstance(block, Mapping):
        raise ConfigError("checkpointing: must be a mapping.")
    merged.update(block)
    if "resume" in data:
        if "resume" in block:
            raise ConfigError("resume: appears both at the top level and inside checkpointing:; keep one.")
        merged["resume"] = data["resume"]
    return merged


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases = getattr(cls, "ALIASES", {})
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in names:
            valid = sorted(names | set(aliases))
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f" Did you mean '{prefix}{near[0]}'?" if near else f" Valid keys: {', '.join(valid)}."
            raise ConfigError(f"unknown checkpoint config key '{prefix}{key}'.{hint}")
        if name in kwargs:
            raise ConfigError(f"'{prefix}{name}' is given twice (as '{key}' and under another name); keep one.")
        kwargs[name] = value
    if prefix == "":
        return cls(**kwargs)  # sub-blocks given as mappings are built by CheckpointConfig.__post_init__
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a sub-block's own check names the field without its block
        raise ConfigError(f"{prefix}{err}") from err


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class: evaluated once per class (tens of milliseconds), not per field."""
    return typing.get_type_hints(cls)


def _check_type(cls: type, name: str, value: Any, prefix: str = "") -> None:
    expected = _field_types(cls)[name]
    if not _matches(value, expected):
        raise ConfigError(
            f"checkpoint config field '{prefix}{name}' must be {_describe(expected)}, got {value!r} ({type(value).__name__})."
        )


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if origin is Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dataclasses.is_dataclass(expected):
        return isinstance(value, expected)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(expected))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(expected))
    if expected is type(None):
        return "null"
    if dataclasses.is_dataclass(expected):  # a sub-block: resume, hub_retry
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(expected))
    return getattr(expected, "__name__", str(expected))


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in a size like 5GB, 500MB, 2GiB or a plain integer (the notation `save_pretrained` accepts)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ConfigError(f"max_shard_size must be positive, got {size}.")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ConfigError(f"max_shard_size {size!r} is not a size; use e.g. '5GB', '500MB' or a number of bytes.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_duration(text: str, field_name: str) -> float:
    """Seconds in NeMo-RL's 'DD:HH:MM:SS' notation (leading parts optional)."""
    parts = str(text).split(":")
    if not 1 <= len(parts) <= 4 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"{field_name} must look like 'DD:HH:MM:SS' (e.g. '00:03:50:00'), got {text!r}.")
    seconds = 0
    for part, unit in zip(reversed(parts), (1, 60, 3600, 86400)):
        seconds += int(part) * unit
    return float(seconds)


def check_repo_id(repo_id: str, field_name: str) -> None:
    """Refuse a Hub repo id that huggingface_hub's own validator rejects, naming the field it came from."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"{field_name} {repo_id!r} is not a Hub repo id ({err}); use 'namespace/name', e.g. 'your-name/my-run'.") from err
