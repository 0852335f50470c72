"""Loading a checkpoint: verify first, then restore what it holds into the objects handed in.

`CheckpointLoader.load` verifies the manifest (sizes always, sha256 with
`verify_on_resume`) on rank 0 before anything is modified, then loads the weights from the
folder the checkpoint's `contents` names for this kind of model, and the training state
(optimizer, scheduler, data position, RNG). `resume` picks the checkpoint: the newest
commit (`auto`, falling back past damaged ones), or `resume_path` (`from_path`, also
another framework's folder, converted on the fly).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from . import distributed
from .async_save import AsyncCheckpointWriter
from .config import CheckpointConfig
from .convert import convert_checkpoint, detect_format
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, StateMismatchError
from .layout import ADAPTER_DIR, CONSOLIDATED_DIR, CONVERTED_PREFIX, MASTER_DIR, OPTIM_DIR, SCHEDULER_JSON, SHARDED_DIR, TRAINING_INFO, CheckpointLayout, dataloader_file, rng_file, rollout_files
from .plan import ModelKind, classify_model
from .remote import RemoteStore, RemoteTier, fetch, is_remote_url, same_commit
from .records import Contents, OptimizerFormat, TrainingInfo, WeightsFormat
from .state.dataloader import load_dataloader
from .state.deepspeed import check_zero_fits, gathered, load_partitioned, load_zero_optimizer, trainable_parameters, zero_optimizer
from .shims import weight_conversion
from .state.model import load_consolidated, read_weights, weight_files
from .state.optim import check_optimizer_fits, load_optimizer
from .state.peft import load_adapter
from .state.rng import load_rng
from .state.rollout import load_rollout
from .state.safetensors_io import tensors_from_buffer
from .state.scheduler import load_scheduler
from .state.sharded import load_sharded
from .verify import read_training_info, read_verified, verify_checkpoint

logger = logging.getLogger("hf_rl_ckpt")

Preloaded = dict[str, dict[str, torch.Tensor]]


@dataclass
class ResumeState:
    """What a resume restored, for the training loop to continue from.

    Attributes:
        step: the step the checkpoint was saved at.
        epoch: the epoch recorded at save time, if any.
        metrics: the metrics recorded at save time.
        path: the checkpoint directory loaded.
        extra: the JSON `extra_state` passed to `save`.
        weights_only: True when only model weights were loaded (`resume.load_weight_only`).
        rollout_state: this rank's `rollout_state` passed to `save` (tensors on the CPU), None if it passed none.
        policy_version: the `policy_version` passed to `save`, if any.
    """

    step: int
    path: Path
    epoch: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    weights_only: bool = False
    rollout_state: Any = None
    policy_version: int | None = None


def weights_dir(path: Path, contents: Contents, kind: ModelKind) -> str:
    """The folder of checkpoint `path` that a model of `kind` loads from; refused when it holds another kind of model.

    A sharded model reads per-rank slices (DCP reads the slices this rank needs, whatever
    world size wrote them); so does a plain model when the checkpoint has no consolidated folder,
    or one cast to `consolidated_dtype`. A plain model's weights as trained are in `model/master`
    when its consolidated folder is cast.
    """
    cast = contents.consolidated_dtype is not None
    if kind.peft:
        wanted = ADAPTER_DIR if contents.weights is WeightsFormat.ADAPTER else None
    elif contents.weights is WeightsFormat.SHARDED and (kind.sharded or not contents.consolidated or cast):
        wanted = SHARDED_DIR
    elif cast:
        wanted = MASTER_DIR
    else:
        wanted = CONSOLIDATED_DIR if contents.consolidated else None
    if wanted is not None:
        return wanted
    expected = ADAPTER_DIR if kind.peft else CONSOLIDATED_DIR
    held = contents.deployable_dir
    model_kind = "a PeftModel" if kind.peft else "a plain (non-PEFT) model"
    raise StateMismatchError(
        f"{path} has no {expected}/ to load into {model_kind}"
        + (f"; it holds {held}/ (saved from a {'PEFT' if held == ADAPTER_DIR else 'non-PEFT'} model). "
           "Build the same kind of model as the run that saved it, or `hf-rl-ckpt export --merge-lora` "
           "an adapter into a plain model" if held else "")
    )


class CheckpointLoader:
    """Reads the checkpoints of one run directory (and any checkpoint directory) into training objects."""

    def __init__(self, config: CheckpointConfig, layout: CheckpointLayout, background: AsyncCheckpointWriter, *, remote: RemoteTier | None = None) -> None:
        self.config, self.layout, self.background, self.remote = config, layout, background, remote

    # ------------------------------------------------------------- choose
    def resume(self, objects: dict[str, Any], mode: str) -> ResumeState | None:
        """See `CheckpointManager.resume`."""
        if mode == "from_path":
            source = self.config.resume.resume_path or ""
            if is_remote_url(source):
                return self.load(self._localized(distributed.on_rank0(lambda: self._fetch_url(source))), **objects)
            return self._load_from_path(Path(source), objects)
        if self.remote is not None:  # a fresh node: the newest checkpoint may be remote only
            distributed.on_rank0(self.remote.fetch_newest)
        # Rank 0's listing: on storage that lists lazily (NFS, object stores) ranks could see different sets.
        candidates = distributed.on_rank0(lambda: list(reversed(self.layout.committed_steps().items())))
        if not candidates:
            logger.info("resume.mode=auto: no checkpoint in %s, starting fresh", self.layout.root)
            return None
        failures = []
        for _step, path in candidates:
            try:
                return self.load(self._localized(path), **objects)
            except CorruptCheckpointError as err:
                if self.config.resume.on_corrupt == "error":
                    raise
                failures.append(f"{path.name}: {err}")
                logger.warning("checkpoint %s is unusable (%s); falling back to the previous complete checkpoint", path, err)
        raise CorruptCheckpointError(self.layout.root, "no loadable checkpoint: " + " | ".join(failures))

    def _localized(self, path: Path) -> Path:
        """`path`, whole on every rank: with node-local disks a rank on its own disk downloads it first (every rank must call this)."""
        if self.remote is not None and self.remote.node_local:
            with distributed.agreed():  # a rank that cannot get it fails this candidate on every rank
                if self.remote.own_disk:
                    self.remote.localize(path.name)
        return path

    def _fetch_url(self, url: str) -> Path:
        """`resume_path` is a remote checkpoint (`s3://bucket/run/step_40`): its verified copy in `checkpoint_dir` (downloaded unless there already)."""
        parent, _, name = url.rstrip("/").rpartition("/")
        store = RemoteStore(parent, self.config.remote_storage_options)
        info = store.read_info(name)
        if info is None:
            raise CheckpointNotFoundError(f"resume.resume_path {url} is not a committed remote checkpoint (no {TRAINING_INFO}); "
                                          f"`hf-rl-ckpt list {parent}` shows those that are")
        local = self.layout.root / name
        if local.exists():
            if same_commit(read_training_info(local) if (local / TRAINING_INFO).is_file() else None, info):
                return local  # the same save: its local copy
            raise CheckpointError(f"resume.resume_path {url} and {local} are different checkpoints of one name; "
                                  "move the local one away or resume into another checkpoint_dir (nothing was overwritten)")
        return fetch(store, name, self.layout)

    def _load_from_path(self, path: Path, objects: dict[str, Any]) -> ResumeState:
        """`resume.mode: from_path`: our checkpoint, or another framework's folder converted on the fly.

        `hf_rl_ckpt.convert` recognises HF Trainer, Accelerate and NeMo-RL folders; rank 0
        converts such a folder under `.incomplete/` (no collectives), every rank loads it, and
        the copy is deleted (a crash mid-way leaves only `.incomplete/` content, which the
        next start removes). Their pickled files are read only with `resume.trust_pickle`.
        """
        if detect_format(path) is None:
            if not (path / TRAINING_INFO).is_file():
                raise CheckpointNotFoundError(
                    f"resume.resume_path {path} is neither a committed checkpoint (no {TRAINING_INFO}) nor a folder "
                    f"`hf-rl-ckpt convert` recognises; pick one of `hf-rl-ckpt list {self.layout.root}` or set resume.mode: auto"
                )
            return self.load(path, **objects)
        converted = self.layout.incomplete_root / f"{CONVERTED_PREFIX}{path.name}"
        distributed.on_rank0(lambda: convert_checkpoint(
            path, converted, trust_pickle=self.config.resume.trust_pickle, weights_only=self.config.resume.load_weight_only,
        ))
        try:
            return dataclasses.replace(self.load(converted, **objects), path=path)
        finally:
            distributed.barrier()
            if distributed.rank() == 0:
                shutil.rmtree(converted, ignore_errors=True)

    # ------------------------------------------------------------- load
    def load(
        self, path: str | os.PathLike, *, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None, dataloader: Any = None,
        weights_only: bool | None = None,
    ) -> ResumeState:
        """See `CheckpointManager.load`."""
        path = Path(path)
        started = time.perf_counter()
        self.background.join()  # an async save in flight finishes first (its failure is still raised by the next save)
        weights_only = self.config.resume.load_weight_only if weights_only is None else weights_only
        kind = classify_model(model)
        preloaded: Preloaded = {}
        info, contents = self._verified_info(path, kind=kind, load_optimizer=optimizer is not None and not weights_only, preloaded=preloaded)
        rollout_state = None
        with distributed.agreed():  # a rank that cannot load fails the load on every rank, before training goes on
            folder = weights_dir(path, contents, kind)
            if contents.rollout and not weights_only:  # read before anything is modified: it is small, and may be damaged
                rollout_state = self._rollout_state(path, info)
            if optimizer is not None and not weights_only:  # before the weights load: a misfit leaves the model as it was
                self._check_optimizer_fits(path, kind, contents, optimizer)
            if kind.partitioned and folder in (CONSOLIDATED_DIR, MASTER_DIR):
                load_partitioned(kind.module, weight_conversion(kind.module).to_runtime(self._rank0_weights(path / folder)), path / folder)
            elif folder == ADAPTER_DIR and kind.partitioned:  # ZeRO-3: rank 0 loads the gathered adapter, every rank keeps its slice
                with gathered(trainable_parameters(kind.module), from_rank0=True):
                    if distributed.rank() == 0:
                        load_adapter(kind.module, path / ADAPTER_DIR)
            elif folder == ADAPTER_DIR:
                load_adapter(kind.module, path / ADAPTER_DIR)
            elif folder == SHARDED_DIR or kind.sharded:
                load_sharded(kind.module, path / folder)
            else:
                load_consolidated(model, path / folder, trust_pickle=self.config.resume.trust_pickle, preloaded=preloaded)
            if not weights_only:
                self._load_optimizer(path, kind, contents, optimizer, scheduler, preloaded)
                self._load_data_position(path, info, dataloader)
                self.load_rng_state(path)
        state = ResumeState(
            step=info.step, path=path, epoch=info.epoch, metrics=info.metrics, extra=info.extra, weights_only=weights_only,
            rollout_state=rollout_state, policy_version=info.policy_version,
        )
        logger.info("resumed from %s (step %d%s) in %.2fs", path, state.step, ", weights only" if weights_only else "", time.perf_counter() - started)
        self._warn_if_later_steps(state.step)
        return state

    def load_optimizer_state(self, path: str | os.PathLike, *, model: torch.nn.Module, optimizer: Any, scheduler: Any = None) -> None:
        """See `CheckpointManager.load_optimizer_state`."""
        path = Path(path)
        self._load_optimizer(path, classify_model(model), Contents.of(path), optimizer, scheduler)

    def _rank0_weights(self, folder: Path) -> dict[str, torch.Tensor]:
        """The tensors of a consolidated folder on rank 0, as saved (scattered from there into partitioned parameters), {} elsewhere."""
        if distributed.rank() != 0:
            return {}
        return {name: tensor for path in weight_files(folder) for name, tensor in read_weights(path, trust_pickle=self.config.resume.trust_pickle).items()}

    @staticmethod
    def _check_optimizer_fits(path: Path, kind: ModelKind, contents: Contents, optimizer: Any) -> None:
        zero = zero_optimizer(optimizer)
        if zero is not None or contents.optimizer is OptimizerFormat.ZERO:
            if zero is None or contents.optimizer is not OptimizerFormat.ZERO:
                raise StateMismatchError(
                    f"{path} holds {'DeepSpeed ZeRO optimizer partitions' if zero is None else 'an optimizer saved without DeepSpeed'}, "
                    f"this run's optimizer is {'not ' if zero is None else ''}a DeepSpeed ZeRO one; resume with the same setup, "
                    "or set resume.load_weight_only: true to start a fresh optimizer from its weights"
                )
            check_zero_fits(zero, optimizer_dir(path, contents), distributed.rank(), distributed.world_size())
            return
        check_optimizer_fits(kind.module, optimizer, optimizer_dir(path, contents))

    @classmethod
    def _load_optimizer(cls, path: Path, kind: ModelKind, contents: Contents, optimizer: Any, scheduler: Any, preloaded: Preloaded | None = None) -> None:
        zero = zero_optimizer(optimizer)
        if optimizer is not None and (contents.optimizer is OptimizerFormat.ZERO or zero is not None):
            cls._check_optimizer_fits(path, kind, contents, optimizer)
            load_zero_optimizer(zero, optimizer_dir(path, contents), distributed.rank(), distributed.world_size())
        elif optimizer is not None:
            load_optimizer(kind.module, optimizer, optimizer_dir(path, contents), preloaded=preloaded)
        if scheduler is not None:
            load_scheduler(scheduler, path / SCHEDULER_JSON)

    def load_rng_state(self, path: str | os.PathLike) -> None:
        """See `CheckpointManager.load_rng_state`."""
        rank = distributed.rank()
        file = Path(path) / rng_file(rank)
        if file.is_file():
            load_rng(file)
        else:
            logger.warning("%s has no RNG state for rank %d (saved with another world size); RNG streams not restored", path, rank)

    @staticmethod
    def _rollout_state(path: Path, info: TrainingInfo) -> Any:
        rank = distributed.rank()
        if all(name in info.manifest for name in rollout_files(rank)):
            return load_rollout(path, rank)
        logger.warning("%s has no rollout state for rank %d (saved by %d rank(s)); resuming without it", path, rank, info.world_size)
        return None

    def _load_data_position(self, path: Path, info: TrainingInfo, dataloader: Any) -> None:
        rank = distributed.rank()
        if dataloader is None or not self.config.resume.resume_dataloader:
            return
        if dataloader_file(rank) in info.manifest:
            load_dataloader(dataloader, path / dataloader_file(rank))
        else:
            logger.warning("%s has no data position for rank %d (saved without a dataloader, or converted); the data order starts afresh", path, rank)

    def _warn_if_later_steps(self, step: int) -> None:
        """Say so when training goes on from `step` while the run holds checkpoints of later steps (a rollback)."""
        later = [later for later in self.layout.committed_steps() if later > step]
        if later:
            logger.warning(
                "resuming from step %d while %s holds later step(s) %s: training goes on from step %d on a new timeline. "
                "Its saves are the newest checkpoints from now on (resume.mode: auto picks the most recent commit); a save "
                "at one of those steps replaces it, and the others stay until retention evicts them or you delete them",
                step, self.layout.root, ", ".join(map(str, sorted(later))), step,
            )

    # ------------------------------------------------------------- verify
    def _verified_info(self, path: Path, *, kind: ModelKind, load_optimizer: bool, preloaded: Preloaded) -> tuple[TrainingInfo, Contents]:
        """Verify `path` against its manifest (rank 0) and return its training_info and contents on every rank.

        In a single process with `verify_on_resume`, the consolidated weight files and the
        optimizer tensor files (when `load_optimizer`) are memory-mapped and hashed
        (`read_verified`) into `preloaded`, and the loaders copy the tensors from there
        instead of reading the files again. All of them are checked before anything is
        loaded, so a damaged checkpoint still modifies nothing. A mapping holds page cache,
        not memory of its own, so this needs no memory limit.
        """

        def verify() -> tuple[TrainingInfo, Contents]:
            deferred = []
            if self._reads_once():
                unverified = read_training_info(path)
                deferred = self._read_once_files(unverified["manifest"], weights_dir(path, Contents.of(path, unverified), kind), load_optimizer)
            raw = verify_checkpoint(path, checksums=self.config.verify_on_resume, deferred=deferred)
            named = self.layout.parse_step(path.name)
            if named is not None and named != raw["step"]:  # a copied or edited checkpoint: which step is it?
                raise CorruptCheckpointError(
                    path / TRAINING_INFO, f"records step {raw['step']}, but its folder {path.name} is step {named}; it was renamed or edited",
                )
            for name, data in read_verified(path, raw["manifest"], deferred).items():
                tensors = tensors_from_buffer(name, data)
                if tensors is not None:
                    preloaded[name] = tensors
            return TrainingInfo.from_json(raw), Contents.of(path, raw)

        return distributed.on_rank0(verify)  # any failure (corrupt, unreadable, missing) raised on every rank

    def _reads_once(self) -> bool:
        return not distributed.is_distributed() and self.config.verify_on_resume

    @staticmethod
    def _read_once_files(manifest: Mapping[str, Any], weights_folder: str, load_optimizer: bool) -> list[str]:
        """Manifest names `_verified_info` maps and checks for the loaders."""
        folders = [OPTIM_DIR] if load_optimizer else []
        if weights_folder in (CONSOLIDATED_DIR, MASTER_DIR):  # read by `load_consolidated` from `preloaded`
            folders.append(weights_folder)
        return [name for name in manifest if name.endswith(".safetensors") and any(name.startswith(f + "/") for f in folders)]


def optimizer_dir(path: Path, contents: Contents) -> Path:
    """The optimizer state folder of checkpoint `path`; an error saying what to do when it was saved without one."""
    if contents.optimizer is None:
        raise CheckpointError(
            f"{path} has no optimizer state (saved with save_optimizer: false); pass optimizer=None "
            "or set resume.load_weight_only: true to start with a fresh optimizer"
        )
    return path / OPTIM_DIR
