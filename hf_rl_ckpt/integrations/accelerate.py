"""Accelerate: `accelerator.save_state()` and `load_state()` write and read the hf_rl_ckpt layout.

```python
from hf_rl_ckpt import CheckpointConfig
from hf_rl_ckpt.accelerate import register_checkpointing

model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
manager = register_checkpointing(accelerator, CheckpointConfig(checkpoint_dir="runs/ckpt", keep_top_k=3,
                                                               metric_name="eval_loss", higher_is_better=False),
                                 tokenizer=tokenizer)
state = accelerator.load_state()      # newest complete checkpoint (per `resume:`), None on a fresh start
step = state.step if state else 0
for batch in train_dl:                # after a resume this continues with the next unseen batch
    ...
    accelerator.save_state(step=step, metrics={"eval_loss": 1.23})
```

Why `save_state`/`load_state` are replaced on the instance, not only hooked
----------------------------------------------------------------------------
Accelerate's `save_state` runs the save-state pre-hooks with `(models, weights, output_dir)`
and then, whatever the hooks did, pickles the optimizers (`optimizer.bin`), schedulers
(`scheduler.bin`), grad scaler, every process's RNG state (`random_states_<rank>.pkl`) and
each object given to `register_for_checkpointing` (`custom_checkpoint_<i>.pkl`). A hook can
only take over the model (by emptying `weights`), and `load_state` reads those pickles after
its hooks. So no hook can keep pickles out, and `register_checkpointing`:

1. sets `save_state` and `load_state` on this one accelerator (instance attributes: the class
   and other accelerators are untouched) to methods that hand every prepared object to
   `CheckpointManager`: model (consolidated HF folder, plus per-rank shards for FSDP2),
   optimizer (DCP safetensors), scheduler, scaler and registered objects (JSON), per-rank
   RNG (safetensors) and per-rank dataloader position (JSON);
2. registers a save-state and a load-state pre-hook through Accelerate's public API as a
   guard: they run only if Accelerate's own implementation is reached anyway (for example a
   subclass calling `super().save_state()`), and stop it before it writes or reads a pickle;
3. tracks the position of every dataloader Accelerate prepares. Accelerate does not: its
   recipe is `skip_first_batches(dl, n)` with an `n` that the script must compute itself.

Dataloader position
-------------------
A prepared `DataLoaderShard` calls `begin()` when an epoch starts (after synchronising the
sampler's generator across ranks), `_update_state_dict()` for each batch it fetches, before
fetching the next (it runs one batch ahead; the last batch gets a second call once
`end_of_dataloader` is set), and `end()` after the epoch. Wrapping those three on the
instance tells a `PositionTracker` (`hf_rl_ckpt/state/dataloader.py`, the same record, file
format and replay as `ResumableDataLoader`) where the loader is. On resume the interrupted
epoch is replayed: generator and torch RNG go back to their epoch-start states, the loader's
own `skip_batches` (what `skip_first_batches` uses) drops the consumed batches, and the
checkpoint's RNG state is restored before the first batch that was not fetched before the
checkpoint. The resumed run then sees the same batches and the same random draws as an
uninterrupted one. Do not also call `skip_first_batches` after `load_state`: the position is
already restored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderShard
from accelerate.utils import DistributedType

from ..config import CheckpointConfig
from ..errors import CheckpointError, StateMismatchError
from ..manager import CheckpointManager, ResumeState, create_manager
from ..shims import DATALOADER_BATCH_HOOK, prepared, require_accelerator_internals, state_pre_hooks
from ..state import jsoncodec
from ..state.dataloader import DataPosition, PositionTracker

logger = logging.getLogger(__name__)

#: Key of `training_info.json`'s `extra` that holds the accelerator's own counters and objects.
EXTRA_KEY = "accelerate"


def _then(original: Callable[[], None], hook: Callable[[], None]) -> Callable[[], None]:
    """`original`, followed by `hook` (installed on a loader instance, so only that loader is affected)."""

    def wrapped() -> None:
        original()
        hook()

    return wrapped


class TrackedDataLoaderShard:
    """The glue between one prepared `DataLoaderShard` and the `PositionTracker` that holds its position."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.tracker = PositionTracker(self._generator, lookahead=1, epoch=loader.iteration)
        loader.begin = _then(loader.begin, self._on_begin)
        setattr(loader, DATALOADER_BATCH_HOOK, _then(getattr(loader, DATALOADER_BATCH_HOOK), self._on_batch))
        loader.end = _then(loader.end, self._on_end)
        loader._hf_rl_ckpt_tracked = self

    def _generator(self) -> torch.Generator | None:
        """The generator that orders the epoch: the one Accelerate synchronises across ranks, else the sampler's."""
        if self.loader.synchronized_generator is not None:
            return self.loader.synchronized_generator
        return getattr(self.loader.get_sampler(), "generator", None)

    def _on_begin(self) -> None:
        skip = self.tracker.begin_epoch(self.loader.iteration)
        if skip:
            self.loader.skip_batches = skip  # what `skip_first_batches` sets: the shard fetches and drops them

    def _on_batch(self) -> None:
        if self.loader.end_of_dataloader:  # the second call for the last batch (Accelerate snapshots it again at the end)
            return
        if self.tracker.count_batch():
            self.loader.skip_batches = 0

    def _on_end(self) -> None:
        if self.tracker.replaying:
            self.loader.skip_batches = 0
        self.tracker.end_epoch(self.loader.iteration)  # the shard has counted the finished epoch by now

    def restore(self, position: DataPosition) -> None:
        self.tracker.restore(position)
        self.loader.iteration = position.epoch


class PreparedDataLoaders:
    """Positions of all of an accelerator's prepared dataloaders, saved together in each rank's dataloader file."""

    def __init__(self, tracked: list[TrackedDataLoaderShard]) -> None:
        self.tracked = tracked

    def data_positions(self) -> list[DataPosition]:
        return [shard.tracker.position() for shard in self.tracked]

    def restore_data_positions(self, positions: Sequence[DataPosition]) -> None:
        if len(positions) != len(self.tracked):
            raise StateMismatchError(
                f"the checkpoint holds the position of {len(positions)} prepared dataloader(s) but this accelerator has "
                f"{len(self.tracked)}; prepare the same dataloaders, in the same order, as the run that saved it"
            )
        for shard, position in zip(self.tracked, positions):
            shard.restore(position)


class AccelerateCheckpointing:
    """What `register_checkpointing` installs on one `Accelerator` (see the module docstring for why)."""

    def __init__(self, accelerator: Accelerator, manager: CheckpointManager, tokenizer: Any | None = None) -> None:
        if isinstance(getattr(accelerator.save_state, "__self__", None), AccelerateCheckpointing):
            raise CheckpointError("register_checkpointing was already called on this accelerator; keep using the manager it returned")
        require_accelerator_internals(accelerator)
        self.accelerator = accelerator
        self.prepared = prepared(accelerator)
        self.manager = manager
        self.tokenizer = tokenizer
        self.guards = (
            accelerator.register_save_state_pre_hook(self._refuse_accelerate_format),
            accelerator.register_load_state_pre_hook(self._refuse_accelerate_format),
        )
        for loader in self.prepared.dataloaders:
            self._track(loader)
        self._prepare_data_loader = accelerator.prepare_data_loader
        accelerator.prepare_data_loader = self.prepare_data_loader
        accelerator.save_state = self.save_state
        accelerator.load_state = self.load_state

    # ------------------------------------------------------------------ dataloaders
    def prepare_data_loader(self, *args: Any, **kwargs: Any) -> Any:
        """Accelerate's `prepare_data_loader`, plus position tracking of the loader it returns."""
        loader = self._prepare_data_loader(*args, **kwargs)
        self._track(loader)
        return loader

    def _track(self, loader: Any) -> None:
        if type(loader) is not DataLoaderShard or getattr(loader, "_hf_rl_ckpt_tracked", None) is not None:
            return  # other kinds are refused when saved, so an unsaved eval loader of another kind is fine
        if any(ref is loader for ref in self.accelerator.gradient_state.dataloader_references):
            raise CheckpointError(
                "register_checkpointing was called while a prepared dataloader is being iterated; its position "
                "cannot be known. Call it right after accelerator.prepare(), before the training loop"
            )
        TrackedDataLoaderShard(loader)

    def _dataloader_state(self) -> PreparedDataLoaders | None:
        tracked = []
        for index, loader in enumerate(self.prepared.dataloaders):
            shard = getattr(loader, "_hf_rl_ckpt_tracked", None)
            if shard is None:
                raise CheckpointError(
                    f"prepared dataloader {index} is a {type(loader).__name__}, whose position hf_rl_ckpt cannot track "
                    "(only Accelerate's DataLoaderShard is supported: leave dispatch_batches off)"
                )
            tracked.append(shard)
        return PreparedDataLoaders(tracked) if tracked else None

    # ------------------------------------------------------------------ objects
    def _objects(self) -> dict[str, Any]:
        """The prepared model, optimizer and scheduler, as `CheckpointManager` takes them (one of each)."""
        acc, ours = self.accelerator, self.prepared
        for kind, items in (("model", ours.models), ("optimizer", ours.optimizers), ("scheduler", ours.schedulers)):
            if len(items) > 1:
                raise CheckpointError(
                    f"this accelerator has {len(items)} prepared {kind}s; hf_rl_ckpt checkpoints one model with its optimizer "
                    "and scheduler. Save the others with their own CheckpointManager (manager.save(step, model=...))"
                )
        if not ours.models:
            raise CheckpointError("no prepared model to checkpoint: call accelerator.prepare(model, ...) before save_state/load_state")
        if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
            raise CheckpointError(
                "FSDP1 models (flat parameters) are not supported: use FSDP2, whose DTensor parameters hf_rl_ckpt saves "
                "as per-rank shards (FullyShardedDataParallelPlugin(fsdp_version=2), or fsdp_version: 2 in the accelerate config)"
            )
        optimizer = ours.optimizers[0] if ours.optimizers else None
        return dict(
            model=ours.models[0],
            optimizer=getattr(optimizer, "optimizer", optimizer),  # the torch optimizer inside AcceleratedOptimizer
            scheduler=ours.schedulers[0] if ours.schedulers else None,
            dataloader=self._dataloader_state(),
        )

    def _accelerator_state(self) -> dict[str, Any]:
        """The accelerator's own counters, grad scaler and registered objects (what Accelerate pickles), as JSON."""
        acc = self.accelerator
        return jsoncodec.encode(
            {
                "step": acc.step,
                "next_save_iteration": acc.project_configuration.iteration + 1,
                "scaler": None if acc.scaler is None else acc.scaler.state_dict(),
                "custom_objects": [obj.state_dict() for obj in self.prepared.custom_objects],
            },
            "accelerator state (register_for_checkpointing objects, grad scaler)",
        )

    def _restore_accelerator_state(self, saved: Mapping[str, Any], path: Path) -> None:
        acc, custom_objects = self.accelerator, self.prepared.custom_objects
        state = jsoncodec.decode(saved)
        if len(state["custom_objects"]) != len(custom_objects):
            raise StateMismatchError(
                f"{path} holds {len(state['custom_objects'])} object(s) registered with register_for_checkpointing, "
                f"this accelerator has {len(custom_objects)}; register the same objects in the same order"
            )
        if (state["scaler"] is None) != (acc.scaler is None):
            raise StateMismatchError(f"{path} was saved {'with' if state['scaler'] is not None else 'without'} a grad scaler "
                                     f"and this accelerator has {'one' if acc.scaler is not None else 'none'} (mixed_precision changed?)")
        if acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        for obj, obj_state in zip(custom_objects, state["custom_objects"]):
            obj.load_state_dict(obj_state)
        acc.step = state["step"]
        acc.project_configuration.iteration = state["next_save_iteration"]

    # ------------------------------------------------------------------ save / load
    def _step_for(self, output_dir: str | os.PathLike | None) -> int:
        if output_dir is None:
            return self.accelerator.save_iteration
        output_dir = Path(output_dir)
        step = self.manager.layout.parse_step(output_dir.name)
        if step is None or output_dir.parent.resolve() != self.manager.layout.root.resolve():
            example = self.manager.layout.step_dir(self.accelerator.save_iteration)
            raise CheckpointError(
                f"save_state({str(output_dir)!r}): hf_rl_ckpt writes checkpoints into checkpoint_dir "
                f"({self.manager.layout.root}); call save_state(step=N) or save_state('{example}')"
            )
        return step

    def _check_no_other_hooks(self, registry: Mapping[int, Callable[..., None]], method: str) -> None:
        ours = {handle.id for handle in self.guards}
        others = [getattr(hook, "__qualname__", repr(hook)) for key, hook in registry.items() if key not in ours]
        if others:
            raise CheckpointError(
                f"this accelerator has {method} pre-hook(s) {', '.join(others)}; with hf_rl_ckpt they would never run "
                "(the checkpoint's manifest lists only the files hf_rl_ckpt writes, and every model is already saved "
                "as an HF folder). Remove them with the handle register_*_state_pre_hook returned"
            )

    def save_state(
        self,
        output_dir: str | os.PathLike | None = None,
        safe_serialization: bool = True,
        *,
        step: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        epoch: float | None = None,
        extra_state: Mapping[str, Any] | None = None,
        final: bool = False,
    ) -> Path | None:
        """Replaces `Accelerator.save_state`: commit one hf_rl_ckpt checkpoint of everything prepared.

        Call it on every process, as with Accelerate. The step that names the checkpoint is
        `step`, else the one in `output_dir`'s name (`<checkpoint_dir>/step_<N>`), else
        Accelerate's own save counter (`accelerator.save_iteration`). `metrics` rank the
        checkpoint for `keep_top_k`. Everything is safetensors or JSON whatever
        `safe_serialization` says. `final`: the run's last save (see `CheckpointManager.save`).
        Returns the committed directory.
        """
        if not safe_serialization:
            logger.warning("save_state(safe_serialization=False) ignored: hf_rl_ckpt never writes pickles")
        self._check_no_other_hooks(state_pre_hooks(self.accelerator, "save_state"), "save_state")
        step = self._step_for(output_dir) if step is None else step
        extra = {**dict(extra_state or {}), EXTRA_KEY: self._accelerator_state()}
        path = self.manager.save(step, **self._objects(), metrics=metrics, tokenizer=self.tokenizer, epoch=epoch, extra_state=extra, final=final)
        self.accelerator.project_configuration.iteration += 1
        return path

    def load_state(self, input_dir: str | os.PathLike | None = None, *, weights_only: bool | None = None) -> ResumeState | None:
        """Replaces `Accelerator.load_state`: restore everything prepared from an hf_rl_ckpt checkpoint.

        With `input_dir`, load that checkpoint; without, resume as `config.resume` says (the
        newest complete checkpoint for `auto`), returning None on a fresh start. Afterwards the
        prepared dataloaders continue from the saved position; the returned state's `.step`
        and `.extra` (your `extra_state`) tell the loop where it is.
        """
        self._check_no_other_hooks(state_pre_hooks(self.accelerator, "load_state"), "load_state")
        objects = self._objects()
        if input_dir is None:
            state = self.manager.resume(**objects)
        else:
            state = self.manager.load(input_dir, **objects, weights_only=weights_only)
        if state is None:
            return None
        saved = state.extra.pop(EXTRA_KEY, None)
        if saved is not None and not state.weights_only:
            self._restore_accelerator_state(saved, state.path)
        return state

    @staticmethod
    def _refuse_accelerate_format(*_: Any) -> None:
        raise CheckpointError(
            "Accelerate's own save_state/load_state was reached on an accelerator registered with hf_rl_ckpt; it would "
            "write or read pickles (optimizer.bin, random_states_*.pkl). Call accelerator.save_state()/load_state() on "
            "the instance, which hf_rl_ckpt routes to its checkpoint manager"
        )


def register_checkpointing(
    accelerator: Accelerator,
    config: CheckpointConfig,
    *,
    tokenizer: Any | None = None,
    training_config: Mapping[str, Any] | None = None,
) -> CheckpointManager:
    """Make `accelerator.save_state()` / `load_state()` write and read hf_rl_ckpt checkpoints.

    Call it on every process after `accelerator.prepare(...)` and before the training loop.
    `tokenizer` goes into every checkpoint's consolidated folder; `training_config` is
    recorded in each checkpoint's config.yaml. Returns the manager, for queries
    (`latest()`, `best()`, `consolidated_path()`) and direct saves.
    """
    manager = create_manager(config, training_config=training_config)
    if not isinstance(manager, CheckpointManager):
        raise CheckpointError(
            f"checkpoint_manager_class {config.checkpoint_manager_class!r} must subclass hf_rl_ckpt.CheckpointManager "
            "to back accelerator.save_state/load_state"
        )
    AccelerateCheckpointing(accelerator, manager, tokenizer)
    return manager
