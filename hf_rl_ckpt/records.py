"""Typed records of what a checkpoint holds and how the run indexes it.

`training_info.json` (one per checkpoint, the last file written) is a `TrainingInfo`; a row
of `checkpoints.json` (the run's index) is a `CheckpointRecord`; `Contents` says which state
a checkpoint holds and in which folder, so that every reader (resume, export, the Hub, the
CLI, the model card) asks the checkpoint instead of probing folders. Each record reads the
JSON of every earlier version of the format and writes the same keys it always did.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .layout import ADAPTER_DIR, COMMIT_SEQ, CONSOLIDATED_DIR, FORMAT_VERSION, OPTIM_DIR, SCHEDULER_JSON, SHARDED_DIR, commit_order
from .retention import RetentionPolicy


class WeightsFormat(str, enum.Enum):
    """How a checkpoint holds the model's weights."""

    CONSOLIDATED = "consolidated"  # model/consolidated: one HF folder (single process, DDP)
    ADAPTER = "adapter"  # model/adapter: the PEFT adapter alone
    SHARDED = "sharded"  # model/sharded: each rank's DCP slices (FSDP, DTensor), plus model/consolidated unless disabled


class OptimizerFormat(str, enum.Enum):
    """How a checkpoint holds the optimizer state (both are DCP-readable safetensors under optim/)."""

    TENSORS = "tensors"  # streamed by rank 0: every rank held the whole state
    DCP = "dcp"  # written by every rank through torch.distributed.checkpoint
    ZERO = "zero"  # written by every rank: its DeepSpeed ZeRO partition, optim/zero/rank_<r>.safetensors + .json


@dataclass(frozen=True)
class Contents:
    """Which state a checkpoint holds, recorded as `contents` in its training_info.json.

    ```python
    contents = Contents.of(Path("runs/ckpt/step_100"))
    contents.deployable_dir   # "model/consolidated" or "model/adapter" (None: shards only)
    ```
    """

    weights: WeightsFormat | None
    consolidated: bool  # model/consolidated is there (always for CONSOLIDATED; for SHARDED as save_consolidated says)
    optimizer: OptimizerFormat | None
    scheduler: bool
    dataloader: bool  # per-rank data positions under dataloader/
    rng: bool = True
    rollout: bool = False  # per-rank RL rollout state under rollout/ (`save(..., rollout_state=...)`)
    # The dtype model/consolidated was cast to from the training weights (`consolidated_dtype`; None: as trained). Then a
    # resume reads the weights as trained from model/master (CONSOLIDATED) or model/sharded (SHARDED) instead.
    consolidated_dtype: str | None = None

    @property
    def deployable_dir(self) -> str | None:
        """The folder to serve or publish: the adapter of a PEFT model, else the consolidated model (None: shards only)."""
        if self.weights is WeightsFormat.ADAPTER:
            return ADAPTER_DIR
        return CONSOLIDATED_DIR if self.consolidated else None

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights.value if self.weights else None,
            "consolidated": self.consolidated,
            "optimizer": self.optimizer.value if self.optimizer else None,
            "scheduler": self.scheduler,
            "dataloader": self.dataloader,
            "rng": self.rng,
            "rollout": self.rollout,
            "consolidated_dtype": self.consolidated_dtype,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Contents:
        return cls(
            weights=WeightsFormat(data["weights"]) if data.get("weights") else None,
            consolidated=bool(data.get("consolidated")),
            optimizer=OptimizerFormat(data["optimizer"]) if data.get("optimizer") else None,
            scheduler=bool(data.get("scheduler")),
            dataloader=bool(data.get("dataloader")),
            rng=bool(data.get("rng", True)),
            rollout=bool(data.get("rollout")),
            consolidated_dtype=data.get("consolidated_dtype"),
        )

    @classmethod
    def of(cls, ckpt_dir: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Contents:
        """What checkpoint `ckpt_dir` holds: its recorded `contents`, or, for one written before they were recorded, its folders.

        `info` is its training_info.json when the caller has read it already. The folder
        probe for older checkpoints lives here and nowhere else.
        """
        if info is None:
            from .verify import read_training_info  # verify reads records too

            info = read_training_info(ckpt_dir)
        if isinstance(info.get("contents"), Mapping):
            return cls.from_json(info["contents"])
        path = Path(ckpt_dir)
        manifest = info.get("manifest") or {}
        if (path / ADAPTER_DIR).is_dir():
            weights = WeightsFormat.ADAPTER
        elif (path / SHARDED_DIR).is_dir():
            weights = WeightsFormat.SHARDED
        elif (path / CONSOLIDATED_DIR).is_dir():
            weights = WeightsFormat.CONSOLIDATED
        else:
            weights = None
        return cls(
            weights=weights,
            consolidated=(path / CONSOLIDATED_DIR).is_dir(),
            # Format 1 wrote both optimizer formats as the same DCP-readable files; either reader loads them.
            optimizer=OptimizerFormat.DCP if (path / OPTIM_DIR).is_dir() else None,
            scheduler=SCHEDULER_JSON in manifest,
            dataloader=any(name.startswith("dataloader/") for name in manifest),
            rng=any(name.startswith("rng/") for name in manifest),
        )


@dataclass(frozen=True)
class ModelSummary:
    """The model a checkpoint was saved from, for the CLI and the model card."""

    class_name: str
    num_parameters: int
    dtype: str | None

    def to_json(self) -> dict[str, Any]:
        return {"class": self.class_name, "num_parameters": self.num_parameters, "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ModelSummary | None:
        if not isinstance(data, Mapping):
            return None
        return cls(class_name=str(data.get("class")), num_parameters=int(data.get("num_parameters") or 0), dtype=data.get("dtype"))


@dataclass(frozen=True)
class TrainingInfo:
    """A checkpoint's `training_info.json`: what was saved, when, by what, and the manifest that seals it."""

    step: int
    epoch: Any
    metrics: dict[str, Any]
    created_at: str | None
    commit_seq: int | None  # what makes it the newest checkpoint, whatever its step (None: written before it existed)
    retention: RetentionPolicy | None  # the settings it was saved under: retention never evicts it under others
    save_seconds: float | None
    world_size: int
    versions: dict[str, str]
    model: ModelSummary | None
    extra: dict[str, Any]
    contents: Contents | None  # None: written before contents were recorded (see `Contents.of`)
    manifest: dict[str, dict[str, Any]]
    format_version: int = FORMAT_VERSION
    policy_version: int | None = None  # RL: the version (step) of the policy that produced the rollouts in flight

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "created_at": self.created_at,
            COMMIT_SEQ: self.commit_seq,
            "retention": dataclasses.asdict(self.retention) if self.retention else None,
            "save_seconds": self.save_seconds,
            "world_size": self.world_size,
            "versions": self.versions,
            "model": self.model.to_json() if self.model else None,
            "extra": self.extra,
            "policy_version": self.policy_version,
            "contents": self.contents.to_json() if self.contents else None,
            "manifest": self.manifest,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainingInfo:
        return cls(
            step=int(data["step"]),
            epoch=data.get("epoch"),
            metrics=dict(data.get("metrics") or {}),
            created_at=data.get("created_at"),
            commit_seq=data.get(COMMIT_SEQ),
            retention=policy_from_json(data.get("retention")),
            save_seconds=data.get("save_seconds"),
            world_size=int(data.get("world_size") or 1),
            versions=dict(data.get("versions") or {}),
            model=ModelSummary.from_json(data.get("model")),
            extra=dict(data.get("extra") or {}),
            contents=Contents.from_json(data["contents"]) if isinstance(data.get("contents"), Mapping) else None,
            manifest=dict(data.get("manifest") or {}),
            format_version=int(data.get("format_version") or FORMAT_VERSION),
            policy_version=data.get("policy_version"),
        )


def policy_from_json(data: Any) -> RetentionPolicy | None:
    """A recorded retention policy, None when not recorded (or not readable as one)."""
    if not isinstance(data, Mapping):
        return None
    try:
        return RetentionPolicy(data["keep_top_k"], data["metric_name"], data["higher_is_better"])
    except KeyError:
        return None


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint as the run's index (`checkpoints.json`) lists it; `CheckpointManager.checkpoints()` returns these.

    `top_k_rank` is its place in the top-k by `metric_name` (1 = best), None when it does
    not rank; `retention` the settings it was saved under.
    """

    step: int
    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: Any = None
    created_at: str | None = None
    commit_seq: int | None = None
    retention: RetentionPolicy | None = None
    size_bytes: int = 0
    top_k_rank: int | None = None

    @property
    def order(self) -> tuple[int, str, int]:
        """Its sort key by when it was committed (see `layout.commit_order`)."""
        return commit_order(self.step, {COMMIT_SEQ: self.commit_seq, "created_at": self.created_at})

    @classmethod
    def from_training_info(cls, name: str, info: TrainingInfo) -> CheckpointRecord:
        return cls(
            step=info.step, name=name, metrics=info.metrics, epoch=info.epoch, created_at=info.created_at,
            commit_seq=info.commit_seq, retention=info.retention,
            size_bytes=sum(int(entry.get("size", 0)) for entry in info.manifest.values()),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "name": self.name,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "created_at": self.created_at,
            COMMIT_SEQ: self.commit_seq,
            "retention": dataclasses.asdict(self.retention) if self.retention else None,
            "size_bytes": self.size_bytes,
            "top_k_rank": self.top_k_rank,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], run_policy: RetentionPolicy | None = None) -> CheckpointRecord:
        """A row of checkpoints.json; `run_policy` is what rows written before each recorded its own settings were saved under."""
        recorded = policy_from_json(data.get("retention"))
        return cls(
            step=int(data["step"]),
            name=str(data.get("name") or ""),
            metrics=dict(data.get("metrics") or {}),
            epoch=data.get("epoch"),
            created_at=data.get("created_at"),
            commit_seq=data.get(COMMIT_SEQ),
            retention=recorded if recorded is not None else run_policy,
            size_bytes=int(data.get("size_bytes") or 0),
            top_k_rank=data.get("top_k_rank"),
        )
