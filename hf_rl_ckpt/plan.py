"""Decide once what a save writes: the model's kind, the optimizer's format, each rank's role.

`plan_save` runs at the start of every save. It unwraps the model once (DDP, FSDP,
`torch.compile`, Accelerate wrappers), classifies it and the optimizer, and returns a
`SavePlan` the writers execute without asking again; its `contents` is recorded in
`training_info.json`, so that readers ask the checkpoint what it holds. `classify_model`
is the same decision for loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .records import Contents, OptimizerFormat, WeightsFormat
from .state.deepspeed import is_partitioned, zero_optimizer
from .state.model import unwrap_model, weights_dtype
from .state.optim import OptimizerSnapshot, capture_optimizer
from .state.peft import is_peft_model
from .state.consolidate import ConsolidationPlan, plan_consolidation
from .state.sharded import hf_state_dict, is_sharded


@dataclass(frozen=True)
class ModelKind:
    """What a model is, as checkpointing sees it: the module under its wrappers, PEFT or not, sharded or not."""

    module: torch.nn.Module
    peft: bool
    sharded: bool  # parameters are DTensors (FSDP2, tensor parallel): every rank holds a slice
    partitioned: bool = False  # DeepSpeed ZeRO-3: every rank holds a slice; gathered into the consolidated folder

    @property
    def weights(self) -> WeightsFormat:
        """How a save of this model holds its weights: the adapter alone for PEFT; per-rank slices when sharded."""
        if self.peft:
            return WeightsFormat.ADAPTER
        return WeightsFormat.SHARDED if self.sharded else WeightsFormat.CONSOLIDATED


def classify_model(model: torch.nn.Module) -> ModelKind:
    inner = unwrap_model(model)
    return ModelKind(module=inner, peft=is_peft_model(inner), sharded=is_sharded(inner), partitioned=is_partitioned(inner))


def export_dtype(consolidated_dtype: str | None, kind: ModelKind) -> torch.dtype | None:
    """The dtype a full model's deployable weights are written in (`consolidated_dtype`); None: as trained.

    A PEFT adapter is written as trained: it is small, and serving engines cast adapters themselves.
    """
    if consolidated_dtype is None or kind.peft:
        return None
    return getattr(torch, consolidated_dtype)


@dataclass(frozen=True)
class SavePlan:
    """What one rank writes for one checkpoint, decided before anything is written.

    Rank 0 writes the shared files (consolidated weights, config, scheduler, model card)
    and commits; every rank writes its own data position and RNG streams, and its slices
    of a sharded model or a DCP optimizer state (collectives, run by every rank in order).
    """

    step: int
    staging: Path
    rank: int
    world_size: int
    model: ModelKind
    optimizer: OptimizerSnapshot | None  # the optimizer state, tensors referenced (not copied)
    contents: Contents
    zero: Any = None  # the DeepSpeed ZeRO optimizer, whose partitions every rank writes (instead of `optimizer`)
    consolidated_cast: torch.dtype | None = None  # the dtype model/consolidated is written in when not the training one
    consolidation: ConsolidationPlan | None = None  # a sharded model's consolidated files, written by every rank from the shards

    @property
    def writes_master_weights(self) -> bool:
        """model/consolidated is cast and the model resumes from its folder: the weights as trained go to model/master too."""
        return self.consolidated_cast is not None and self.contents.weights is WeightsFormat.CONSOLIDATED

    @property
    def writes_shared_files(self) -> bool:
        return self.rank == 0


def plan_save(
    step: int, staging: Path, ranks: distributed.Ranks, *, model: torch.nn.Module, optimizer: Any | None, scheduler: Any | None, dataloader: Any | None,
    save_optimizer: bool, save_consolidated: bool, rollout: bool, consolidated_dtype: str | None, max_shard_size: int,
    shards_visible: bool = True,
) -> SavePlan:
    """The plan of one save among `ranks` (every rank makes the same decisions from the same objects).

    `save_consolidated`: a sharded model's consolidated folder is written by this save.
    `shards_visible=False` (node-local disks): no rank can read the others' shards, so that
    folder is gathered to rank 0 instead of consolidated from the shards by every rank.

    Raises:
        StateMismatchError: the optimizer holds parameters that are not the model's.
    """
    kind = classify_model(model)
    zero = zero_optimizer(optimizer) if save_optimizer else None
    snapshot = capture_optimizer(kind.module, optimizer) if optimizer is not None and save_optimizer and zero is None else None
    if zero is not None:
        optimizer_format = OptimizerFormat.ZERO
    elif snapshot is None:
        optimizer_format = None
    elif snapshot.plain and not kind.sharded:  # every rank holds the whole (replicated) state: rank 0 streams it
        optimizer_format = OptimizerFormat.TENSORS
    else:
        optimizer_format = OptimizerFormat.DCP
    weights = kind.weights
    cast = export_dtype(consolidated_dtype, kind)
    if cast == weights_dtype(kind.module):
        cast = None  # already trained in it: the consolidated folder is the training state
    contents = Contents(
        weights=weights,
        consolidated=weights is WeightsFormat.CONSOLIDATED or (weights is WeightsFormat.SHARDED and save_consolidated),
        optimizer=optimizer_format,
        scheduler=scheduler is not None,
        dataloader=dataloader is not None,
        rollout=rollout,
        consolidated_dtype=str(cast).removeprefix("torch.") if cast is not None else None,
    )
    consolidation = None
    if weights is WeightsFormat.SHARDED and contents.consolidated and shards_visible:
        consolidation = plan_consolidation(
            hf_state_dict(kind.module), max_shard_size=max_shard_size, world_size=ranks.world_size,
            ranks_per_node=distributed.ranks_per_node(), dtype=cast, model=kind.module,
        )
    return SavePlan(
        step=step, staging=staging, rank=ranks.rank, world_size=ranks.world_size, model=kind,
        optimizer=snapshot, contents=contents, zero=zero, consolidated_cast=cast, consolidation=consolidation,
    )
