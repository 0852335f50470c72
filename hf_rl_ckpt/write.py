"""Writing a checkpoint: execute a `SavePlan`, synchronously or staged for a background write.

`CheckpointWriter.save` is one save on every rank: rank 0 prepares `.incomplete/<name>/`,
`plan.plan_save` decides what each rank writes, the parts write it (each returns the
(size and digest of the files it wrote), and rank 0 commits (`commit.Committer`). Every step
that can fail is followed by an agreement among the ranks (`_agree`), so a rank that
failed never leaves the others waiting in a collective it will not join, and the error is
raised on every rank with the failed rank named.

With `async_save`, the parts' tensors are first copied into a host staging buffer; the
training loop then goes on while a background thread writes them; the ranks' threads
exchange their digests (or failures) over a gloo process group of their own
(`Ranks.side_channel`, which gives up after `async_rank_timeout`), and rank 0 commits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml

from . import distributed
from .async_save import AsyncCheckpointWriter, SavePart, run_parts
from .commit import CommitRequest, Committer
from .config import CheckpointConfig, parse_duration, parse_size
from .redact import redact_secrets
from .errors import CheckpointError, CheckpointSaveError
from .faultpoint import faultpoint
from .hub.card import Leaderboard, branch_for, card_rows, render_model_card
from .layout import ADAPTER_DIR, CONFIG_YAML, CheckpointLayout, CONSOLIDATED_DIR, MASTER_DIR, MODEL_CARD, OPTIM_DIR, SCHEDULER_JSON, SHARDED_DIR, dataloader_file, rng_file, safe_join
from .atomic import commit_directory, staging_sibling, write_bytes
from .events import Subscribers
from .plan import ModelKind, SavePlan, plan_save
from .verify import build_manifest
from .digest import RECORDED, Digests, FileDigest
from .records import ModelSummary, OptimizerFormat, WeightsFormat
from .registry import Registry
from .retention import RetentionPolicy
from .state.dataloader import capture_dataloader
from .state.deepspeed import whole_weights, write_zero_optimizer
from .state.model import save_consolidated, save_hf_metadata, save_weights, saved_state, total_parameters, weights_dtype
from .state.optim import write_optimizer_dcp, write_optimizer_tensors
from .state.peft import save_adapter
from .state.rng import RngSnapshot, capture_rng
from .state.rollout import capture_rollout, write_rollout
from .state.safetensors_io import write_safetensors
from .state.scheduler import capture_scheduler
from .state.consolidate import write_index, write_rank_files
from .state.sharded import gathered_state, hf_state_dict, save_gathered, save_shards

logger = logging.getLogger("hf_rl_ckpt")


@dataclass
class SaveInputs:
    """What one `CheckpointManager.save` was handed: the objects whose state it writes, and its checked records."""

    record: CommitRequest  # step, metrics, epoch, extra_state (`CommitRequest.checked`)
    model: torch.nn.Module
    optimizer: Any = None
    scheduler: Any = None
    dataloader: Any = None
    tokenizer: Any = None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    rollout_state: Any = None  # this rank's RL rollout state (see `state.rollout`), None for none
    rng: RngSnapshot | None = None  # RNG streams to record instead of this process's (a converted checkpoint's own)
    final: bool = False  # the run's last save (end of training, preemption): `save_consolidated: final` writes the folder


@contextlib.contextmanager
def whole_model_weights(kind: ModelKind) -> Iterator[dict[str, torch.Tensor] | None]:
    """Around writing a deployable folder outside a checkpoint (weight sync); every rank enters it, rank 0 writes inside.

    Yields the full weights by runtime name where the model's own are slices (ZeRO-3 gathered
    bucket by bucket, FSDP2 and tensor parallel gathered to rank 0's host memory; {} on the
    other ranks), None where rank 0 reads them from the model (a plain or DDP model, and an
    adapter, which is gathered in place under ZeRO-3).
    """
    if kind.partitioned:
        with whole_weights(kind.module, peft=kind.peft) as state:
            yield state
    elif kind.sharded and not kind.peft:
        yield gathered_state(kind.module)
    else:
        yield None


def _prefixed(folder: str, digests: Mapping[str, FileDigest]) -> Digests:
    return {f"{folder}/{name}": digest for name, digest in digests.items()}


def _nothing() -> Digests:
    """The write of a part this rank has nothing to write for."""
    return {}


def _describe(failed: Mapping[int, str]) -> str:
    """Failures by rank, as an error message names them: "rank 1: OSError: disk full; rank 3: ..."."""
    return "; ".join(f"rank {rank}: {report}" for rank, report in sorted(failed.items()))


def summarize(plan: SavePlan) -> ModelSummary:
    module = plan.model.module
    dtype = weights_dtype(module)
    return ModelSummary(
        class_name=type(module).__name__, num_parameters=sum(p.numel() for p in module.parameters()),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
    )


class CheckpointWriter:
    """Writes the checkpoints of one run directory; rank 0's `committer` commits them."""

    def __init__(
        self, config: CheckpointConfig, committer: Committer, registry: Registry, policy: RetentionPolicy, training_config: Mapping[str, Any],
        *, ranks: distributed.Ranks = distributed.JOB,
    ) -> None:
        self.config, self.committer, self.registry, self.policy, self.ranks = config, committer, registry, policy, ranks
        self.layout = committer.layout
        self.training_config = dict(training_config)
        self.max_shard_size = parse_size(config.max_shard_size)
        # async_save: the staging buffer and the background write + commit
        self.background = AsyncCheckpointWriter(defer_optimizer_copy=config.async_defer_optimizer_copy)
        self.rank_timeout = parse_duration(config.async_rank_timeout, field_name="async_rank_timeout")
        self._background_ranks: distributed.Ranks | None = None  # the async saves' side channel, made at the first one
        # Node-local disks (see `remote`): some rank does not see rank 0's directory; this one does not (it stages its own files).
        self.node_local = self.own_disk = False

    # ------------------------------------------------------------- the flow
    def save(self, inputs: SaveInputs, started: float, *, in_background: bool = False) -> Path:
        """Write and commit (or, `in_background`, stage for the background thread) one checkpoint on every rank."""
        step = inputs.record.step
        staging = self.layout.incomplete_dir(step)
        error = None
        try:
            if self.ranks.rank == 0:
                self.committer.staging_dir(step)
            elif self.own_disk:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
        except (OSError, CheckpointError) as err:  # read-only dir, lock taken by another process, disk full: reported below
            error = err
        self._agree(step, staging, error)
        plan, parts, error = None, [], None
        try:
            faultpoint("save.staged")
            plan = plan_save(
                step, staging, self.ranks, model=inputs.model, optimizer=inputs.optimizer, scheduler=inputs.scheduler, dataloader=inputs.dataloader,
                save_optimizer=self.config.save_optimizer, save_consolidated=self.config.consolidates(final=inputs.final),
                rollout=inputs.rollout_state is not None, consolidated_dtype=self.config.consolidated_dtype,
                max_shard_size=self.max_shard_size, shards_visible=not self.node_local,
            )
            parts = self._parts(plan, inputs)
        except Exception as err:  # e.g. a dataloader without state_dict(): reported to every rank below
            error = err
        self._agree(step, staging, error)
        if plan.model.sharded:
            self._agree(step, staging, self._consolidation_disagreement(plan))
        request = dataclasses.replace(inputs.record, model=summarize(plan), contents=plan.contents, world_size=plan.world_size, started=started)
        digests: Digests = {}
        here = [part for part in parts if not (in_background and part.background)]
        # A single process writes the parts concurrently (hashing on several cores); ranks of a job one by one.
        for part, error in run_parts(here, concurrently=not self.ranks.is_distributed):
            self._agree(step, staging, error)  # a failure is reported to every rank, then re-raised with the rank named
            digests.update(part)
        if in_background:
            return self._stage_for_background(plan, [part for part in parts if part.background], digests, request)
        if self.own_disk:  # rank 0 cannot hash what is on this rank's disk: files written without a digest (DCP's) too
            digests = {rel: FileDigest(entry["size"], entry[RECORDED]) for rel, entry in build_manifest(staging, digests).items()}
        all_digests: Digests = {}
        for rank_digests in self.ranks.all_gather_object(digests):
            all_digests.update(rank_digests)
        error = None
        if plan.writes_shared_files:
            try:
                self.committer.commit(staging, request, all_digests)
            except Exception as err:  # sealing failed before the rename (disk full, I/O error): reported, staging removed
                error = err
        self._agree(step, staging, error)
        return self.layout.step_dir(step)

    def _consolidation_disagreement(self, plan: SavePlan) -> CheckpointSaveError | None:
        """An error when the ranks planned different consolidated files (each would write what the others do not expect).

        Every rank plans alone, from the same global shapes, so they agree unless their
        inputs differ: `final` passed to `save` on some ranks only, or `LOCAL_WORLD_SIZE`
        differing between nodes. One small all-gather, before anything is written.
        """
        fingerprints = self.ranks.all_gather_object(plan.consolidation.fingerprint() if plan.consolidation is not None else None)
        if len(set(fingerprints)) == 1:
            return None
        return CheckpointSaveError(
            f"the ranks planned different consolidated files for step {plan.step} (rank 0's plan differs from rank "
            f"{next(rank for rank, fingerprint in enumerate(fingerprints) if fingerprint != fingerprints[0])}'s): pass the same "
            "`final` to save() on every rank, and launch every node with the same number of ranks (LOCAL_WORLD_SIZE)"
        )

    def _agree(self, step: int, staging: Path, error: Exception | None) -> None:
        """Raise on every rank if any rank failed (rank 0 removes the staging directory first); else return on every rank."""
        failed = self.ranks.failures(error)
        if not failed:
            return
        if self.ranks.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.ranks.barrier()
        raise self._failed(step, _describe(failed)) from error

    def _failed(self, step: int, detail: str, *, background: bool = False) -> CheckpointSaveError:
        previous = self.layout.latest()
        if background:
            return CheckpointSaveError(
                f"the background (async) save of step {step} failed ({detail}); nothing was committed to {self.layout.root}"
                + (f", the previous checkpoint {previous} is intact" if previous else "")
            )
        return CheckpointSaveError(
            f"saving step {step} failed ({detail}); nothing was committed to {self.layout.root}"
            + (f", the previous checkpoint {previous} is intact" if previous else "")
        )

    # ------------------------------------------------------------- async
    def _stage_for_background(self, plan: SavePlan, parts: list[SavePart], digests: Digests, request: CommitRequest) -> Path:
        """Training thread: copy the parts' tensors into the staging buffer, then hand write + commit to the thread."""
        error, deferred = None, []
        try:
            if self._background_ranks is None:  # every rank is here, in the same order: the group is made collectively
                self._background_ranks = self.ranks.side_channel(self.rank_timeout)
            deferred = self.background.stage(parts)  # optimizer state: copied by the thread before the optimizer's next step
        except Exception as err:  # reported to every rank below, then re-raised with the rank named
            error = err
        self._agree(plan.step, plan.staging, error)
        ranks = self._background_ranks
        self.background.submit(plan.step, lambda: self._write_and_commit(plan, parts, digests, ranks, request, deferred))
        logger.info("async save of step %d staged in %.3fs (%.1f MB buffered); writing and committing in the background",
                    plan.step, time.perf_counter() - request.started, self.background.buffer.nbytes() / 1e6)
        return self.layout.step_dir(plan.step)

    def _write_and_commit(
        self, plan: SavePlan, parts: list[SavePart], digests: Digests, ranks: distributed.Ranks, request: CommitRequest, deferred: list,
    ) -> None:
        """Background thread: write the staged parts, exchange digests or failures over the side channel; rank 0 commits.

        Every rank learns every rank's outcome from one all-gather, so a failure anywhere fails
        the save on every rank, naming the rank; a rank that died or stalls past
        `async_rank_timeout` fails it too, instead of leaving the others waiting.
        """
        error = None
        try:
            for deferred_copy in deferred:  # first: the training loop's next optimizer step waits for these
                deferred_copy.run(self.background.buffer)
            for part in parts:
                digests.update(part.run())
        except Exception as err:
            error = err
        try:
            reports = ranks.all_gather_object((digests, None if error is None else f"{type(error).__name__}: {error}"))
        except Exception as err:  # gloo's timeout, or a peer that died: the save cannot be whole
            reports = None
            error = error or err
            detail = f"rank {ranks.rank}: not every rank reported its part ({type(err).__name__}: {err}; async_rank_timeout is {self.rank_timeout:g}s)"
        else:
            failed = {rank: failure for rank, (_, failure) in enumerate(reports) if failure is not None}
            detail = _describe(failed) if failed else None
        if detail is None:
            try:
                if plan.writes_shared_files:
                    all_digests: Digests = {}
                    for rank_digests, _ in reports:
                        all_digests.update(rank_digests)
                    self.committer.commit(plan.staging, request, all_digests)
                return
            except Exception as err:  # sealing failed before the rename: nothing was committed
                error, detail = err, f"rank {ranks.rank}: {type(err).__name__}: {err}"
        if ranks.rank == 0:
            shutil.rmtree(plan.staging, ignore_errors=True)
        raise self._failed(plan.step, detail, background=True) from error

    def drain(self) -> None:
        """Wait for the async save in flight, if any; if it failed on any rank, raise on every rank.

        Runs in the training thread, at the start of every `save` and in `finalize`, so a
        background failure is never silent. Once every rank's thread is done (agreed here,
        on the job's group), rank 0 removes what a late rank may still have written into the
        staging directory, and the side channel is rebuilt at the next async save (a gloo
        group that timed out cannot be trusted again).
        """
        if not self.config.async_save:
            return
        failure = self.background.wait()
        error = None
        if failure is not None:
            step, cause = failure
            error = cause if isinstance(cause, CheckpointSaveError) else self._failed(step, f"rank {self.ranks.rank}: {type(cause).__name__}: {cause}", background=True)
        reports = [report for report in self.ranks.all_gather_object(None if error is None else str(error)) if report is not None]
        if not reports:
            return
        if self.ranks.rank == 0:
            shutil.rmtree(self.layout.incomplete_dir(self.background.step), ignore_errors=True)
        distributed.destroy_group(self._background_ranks.group if self._background_ranks else None)
        self._background_ranks = None
        if error is not None and error is failure[1]:
            raise error  # keeps its cause: the rank's own exception
        if error is not None:
            raise error from failure[1]
        raise CheckpointSaveError(reports[0])

    # ------------------------------------------------------------- parts
    def _parts(self, plan: SavePlan, inputs: SaveInputs) -> list[SavePart]:
        """The parts of a checkpoint in write order, each holding what it will write as of this call.

        Building them captures the state: small state as bytes, tensors by reference (an
        async save copies them into its staging buffer before the training loop resumes, a
        synchronous one writes them from where they are, holding no second copy). Parts may
        run collectives (DCP) and every rank runs them in the same order.
        """
        parts = [
            self._model_part(plan, inputs.tokenizer, inputs.extra_files),
            self._optimizer_part(plan, inputs.optimizer),
            self._rank_state_part(plan, inputs.scheduler, inputs.dataloader, inputs.rng, inputs.rollout_state),
            self._consolidation_part(plan),
            SavePart("model card", lambda: self._card_part(plan, inputs.record.metrics), after_others=True),  # reads config.yaml, config.json
        ]
        return [part for part in parts if part is not None]

    def _model_part(self, plan: SavePlan, tokenizer: Any, extra_files: dict[str, bytes]) -> SavePart:
        """The weights: per-rank shards (every rank) + consolidated folder for a sharded model, else rank 0's folder."""
        staging, module, shared = plan.staging, plan.model.module, plan.writes_shared_files
        extra_files = dict(extra_files)  # as of this call (an async save writes them later)

        def write_extra_file(name: str, data: bytes) -> FileDigest:
            path = safe_join(staging, name)
            # A converted multi-rank checkpoint names rng/rank_<r> here; the rank-state part, which may run at the
            # same time (one process writes its parts concurrently), creates that folder too.
            path.parent.mkdir(parents=True, exist_ok=True)
            return write_bytes(path, data)

        def write_extra_files() -> Digests:
            return {name: write_extra_file(name, data) for name, data in extra_files.items()} if shared else {}

        weights, cast = plan.contents.weights, plan.consolidated_cast

        def write_master_weights(state: Mapping[str, torch.Tensor]) -> Digests:
            if not plan.writes_master_weights:
                return {}
            (staging / MASTER_DIR).mkdir(parents=True, exist_ok=True)
            return _prefixed(MASTER_DIR, save_weights(state, staging / MASTER_DIR, self.max_shard_size))

        if plan.model.partitioned:  # ZeRO-3: every rank gathers (collectives, bucket by bucket); rank 0 writes

            def write_partitioned() -> Digests:
                with whole_weights(module, peft=plan.model.peft) as state:
                    if not shared:
                        return {}
                    if plan.model.peft:
                        return {**_prefixed(ADAPTER_DIR, save_adapter(module, staging / ADAPTER_DIR, tokenizer=tokenizer)), **write_extra_files()}
                    weights = save_consolidated(
                        module, staging / CONSOLIDATED_DIR, max_shard_size=self.max_shard_size, tokenizer=tokenizer,
                        weights_format=self.config.model_save_format, state=state, dtype=cast,
                    )
                    return {**_prefixed(CONSOLIDATED_DIR, weights), **write_master_weights(saved_state(module, state)), **write_extra_files()}

            return SavePart("model", write_partitioned, background=False)
        if weights is WeightsFormat.SHARDED:
            state = hf_state_dict(module)  # DTensors by reference: no data is copied
            consolidated = staging / CONSOLIDATED_DIR

            def write_sharded() -> Digests:
                save_shards(state, staging / SHARDED_DIR)
                if not plan.contents.consolidated:
                    return write_extra_files()
                if plan.consolidation is None:  # node-local disks: no rank sees the others' shards (see `plan_save`)
                    gathered = save_gathered(module, consolidated, max_shard_size=self.max_shard_size, tokenizer=tokenizer, dtype=cast)
                    return {**_prefixed(CONSOLIDATED_DIR, gathered), **write_extra_files()}
                if not shared:
                    return {}
                # The small files now (a tokenizer must not be saved from another thread); the weights by every rank (`_consolidation_part`).
                consolidated.mkdir(parents=True, exist_ok=True)
                save_hf_metadata(module, consolidated, tokenizer, dtype=cast)
                return {**_prefixed(CONSOLIDATED_DIR, write_index(plan.consolidation, consolidated)), **write_extra_files()}

            return SavePart("model", write_sharded, background=False)  # DCP collectives
        if not shared:
            return SavePart("model", _nothing)
        if weights is WeightsFormat.ADAPTER:  # save_adapter reads the live adapter: written in the training thread (adapters are small)
            return SavePart("model", lambda: {**_prefixed(ADAPTER_DIR, save_adapter(module, staging / ADAPTER_DIR, tokenizer=tokenizer)), **write_extra_files()}, background=False)
        out = staging / CONSOLIDATED_DIR
        out.mkdir(parents=True, exist_ok=True)
        save_hf_metadata(module, out, tokenizer, dtype=cast)  # small, and now: a tokenizer must not be saved from another thread

        def write_weights(state: Mapping[str, torch.Tensor]) -> Digests:
            consolidated = save_weights(state, out, self.max_shard_size, self.config.model_save_format, cast, parameters=parameters)
            return {**_prefixed(CONSOLIDATED_DIR, consolidated), **write_master_weights(state), **write_extra_files()}

        parameters = total_parameters(module)
        return SavePart("model", write_weights, tensors=saved_state(module))  # save_pretrained's names: an MoE's experts one by one

    def _consolidation_part(self, plan: SavePlan) -> SavePart | None:
        """A sharded model's consolidated weights, every rank writing its files from the shards on disk (see `state.consolidate`).

        No collectives: with `async_save` it runs on the background thread. It runs after the
        other parts (`after_others`): the shards it reads are written by the model part.
        """
        if plan.consolidation is None:
            return None
        staging = plan.staging
        return SavePart(
            "consolidated weights",
            lambda: _prefixed(CONSOLIDATED_DIR, write_rank_files(plan.consolidation, staging / SHARDED_DIR, staging / CONSOLIDATED_DIR, plan.rank)),
            after_others=True,
        )

    def _optimizer_part(self, plan: SavePlan, optimizer: Any) -> SavePart:
        """The optimizer state: streamed by rank 0 when every rank holds all of it (single process, DDP), else DCP on every rank.

        A DeepSpeed ZeRO optimizer: every rank writes its own partition (see `state.deepspeed`).
        """
        snapshot, out = plan.optimizer, plan.staging / OPTIM_DIR
        if plan.contents.optimizer is OptimizerFormat.ZERO:
            return SavePart("optimizer", lambda: _prefixed(OPTIM_DIR, write_zero_optimizer(plan.zero, out, plan.rank, plan.world_size)), background=False)
        if snapshot is None:
            return SavePart("optimizer", _nothing)
        if plan.contents.optimizer is OptimizerFormat.TENSORS:
            if not plan.writes_shared_files:
                return SavePart("optimizer", _nothing)
            return SavePart(
                "optimizer", lambda tensors: _prefixed(OPTIM_DIR, write_optimizer_tensors(tensors, snapshot.rest, out)),
                tensors=snapshot.tensors, written_by_step=optimizer,
            )
        return SavePart("optimizer", lambda: _prefixed(OPTIM_DIR, write_optimizer_dcp(snapshot, out)), background=False)  # collective

    def _rank_state_part(self, plan: SavePlan, scheduler: Any, dataloader: Any, rng: RngSnapshot | None, rollout_state: Any) -> SavePart:
        """Small per-rank files (data position, RNG, rollout state) and rank 0's scheduler and config; no collectives.

        Captured now as bytes (and the RNG streams and rollout tensors as fresh host copies), written by the part.
        """
        staging, rank = plan.staging, plan.rank
        files: dict[str, bytes] = {}
        if scheduler is not None and plan.writes_shared_files:
            files[SCHEDULER_JSON] = capture_scheduler(scheduler)
        if dataloader is not None:
            files[dataloader_file(rank)] = capture_dataloader(dataloader)
        if plan.writes_shared_files:
            document = {"checkpoint": self.config.to_dict(redact=True), "training": redact_secrets(self.training_config)}
            files[CONFIG_YAML] = yaml.safe_dump(document, sort_keys=False).encode()
        rng_tensors, rng_metadata = rng or capture_rng()
        rollout = capture_rollout(rollout_state, rank) if rollout_state is not None else None

        def write() -> Digests:
            digests: Digests = {}
            for name, data in files.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digests[name] = write_bytes(target, data)  # no per-file fsync: the commit fsyncs the staging tree
            (staging / "rng").mkdir(exist_ok=True)
            digests[rng_file(rank)] = write_safetensors(staging / rng_file(rank), rng_tensors, rng_metadata)
            if rollout is not None:
                digests.update(write_rollout(rollout, staging, rank))
            return digests

        return SavePart("rank state", write)

    def _card_part(self, plan: SavePlan, metrics: Mapping[str, Any]) -> Digests:
        """README.md (rank 0): the model card as of this save, so it is in the manifest.

        Its leaderboard is the one this commit produces. A committed checkpoint is never
        rewritten, so the local card stays as of the save; the Hub publisher re-renders the
        card with the current leaderboard on every push.
        """
        if not plan.writes_shared_files:
            return {}
        rows = [record.to_json() for record in self.registry.records()]
        board = Leaderboard.from_rows(card_rows(rows, plan.step, metrics), self.policy)
        publishing = self.config.push_to_hub
        card = render_model_card(
            plan.staging, step=plan.step, metrics=metrics, leaderboard=board, local_path=self.layout.step_dir(plan.step),
            repo_id=self.config.hub_model_id if publishing else None, revision=branch_for(plan.step) if publishing else None,
            contents=plan.contents,
        )
        return {MODEL_CARD: write_bytes(plan.staging / MODEL_CARD, str(card).encode())}  # sealed by the commit's fsync_tree


def write_checkpoint(out: str | os.PathLike, inputs: SaveInputs, *, training_config: Mapping[str, Any] | None = None) -> Path:
    """Write `inputs` as the standalone checkpoint directory `out`, from this process alone, whole or not at all.

    The ordinary writer and commit, with default settings, in a hidden scratch run beside
    `out` (no index, no retention, no Hub, no collectives: under `resume.mode: from_path`
    rank 0 converts alone); then the sealed checkpoint is renamed to `out`. This is what
    `hf_rl_ckpt.convert` produces from another framework's state.
    """
    out = Path(out)
    scratch = staging_sibling(out)
    shutil.rmtree(scratch, ignore_errors=True)
    config = CheckpointConfig(checkpoint_dir=str(scratch), resume={"mode": "disable"})
    layout = CheckpointLayout(scratch)
    registry, policy = Registry(layout), RetentionPolicy(None, None)
    committer = Committer(layout, registry, policy, Subscribers())
    try:
        committer.open()
        writer = CheckpointWriter(config, committer, registry, policy, training_config or {}, ranks=distributed.THIS_PROCESS)
        commit_directory(writer.save(inputs, time.perf_counter()), out)  # sealed by the commit
    finally:
        committer.lock.release()
        shutil.rmtree(scratch, ignore_errors=True)
    return out
