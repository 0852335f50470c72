"""`CheckpointCallback`: hf_rl_ckpt checkpoints for `transformers.Trainer` and the TRL trainers built on it.

```python
from hf_rl_ckpt import CheckpointCallback, CheckpointConfig

config = CheckpointConfig(checkpoint_dir="runs/ckpt", save_period=50,
                          metric_name="eval_loss", higher_is_better=False, keep_top_k=3)
trainer = Trainer(model=model, args=TrainingArguments(..., save_strategy="no"), ...,
                  callbacks=[CheckpointCallback(config)])
trainer.train()   # resume.mode=auto continues exactly from the newest complete checkpoint
```

When a checkpoint is written. A save is owed on every `save_period`-th step, after every
evaluation and at the end of training. It is written at the next point where the training
state is exactly what a resumed run restores: the start of the next optimizer step (its
batches are fetched by then, and that is where the Trainer's resume path restores the RNG
streams), the start of the next epoch (before its data order is drawn), or the end of
training. By then every log and evaluation of the step has happened, so a checkpoint's
metrics are everything logged at its step (`eval_loss` from an evaluation, the `reward` a
GRPO trainer logs, ...) and `keep_top_k` ranks by them.

How resume is wired. The Trainer's own resume path (`train(resume_from_checkpoint=...)`)
is what continues a run exactly: it restores `TrainerState` (global step, epoch, log
history, callback states), skips the consumed batches of the current epoch and restores
the RNG streams after fetching the next batch. The callback reuses that path rather than
re-implementing it. Once attached to its trainer (automatically, from `Trainer.__init__`):

- `trainer.train()` without `resume_from_checkpoint` resumes according to `resume.mode`
  (the newest verified checkpoint for `auto`, falling back past a corrupt one; weights only
  with `resume.load_weight_only`), `trainer.train(resume_from_checkpoint=<one of our
  checkpoints>)` resumes from that one, `resume_from_checkpoint=True` means `resume.mode:
  auto` whatever the config says (the Trainer's own newest `checkpoint-N` in `output_dir`
  only when `checkpoint_dir` has none), and `resume_from_checkpoint=False` starts fresh;
- on that trainer instance only, the loaders of the resume path (`_load_from_checkpoint`,
  `_load_optimizer_and_scheduler`, `_load_rng_state`, `_load_scaler`, see `hf_rl_ckpt.shims`;
  a transformers release without one fails at attach, naming its version) read our pickle-free
  files when handed one of our checkpoints, and defer to the Trainer for anything else, so
  the Trainer's own `checkpoint-N` folders keep working;
- the `TrainerState` is stored at the checkpoint root as `trainer_state.json`, in the
  Trainer's own JSON format, which is where its resume path reads it.

The data position is the Trainer's: global step and epoch in `trainer_state.json` (its
sampler is seeded per epoch, so skipping the consumed batches lands on the same batch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint

from ..config import STEP_METRIC, CheckpointConfig
from ..errors import CheckpointError
from ..layout import TRAINING_INFO
from ..manager import CheckpointManager, create_manager
from ..shims import dispatch_trainer_deepspeed_loader, trainer_loaders
from ..state.model import unwrap_model
from .generation_buffer import GenerationBuffer

logger = logging.getLogger("hf_rl_ckpt")

#: The file name the Trainer's resume path reads its `TrainerState` from.
TRAINER_STATE_FILE = "trainer_state.json"


def is_checkpoint(path: Any) -> bool:
    """True for a committed hf_rl_ckpt checkpoint directory (as opposed to a Trainer `checkpoint-N`)."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / TRAINING_INFO).is_file()


def trainer_state_json(trainer: Trainer) -> bytes:
    """The trainer's `TrainerState` as `Trainer._save_checkpoint` writes it, stateful callbacks included."""
    stateful = [cb for cb in trainer.callback_handler.callbacks + [trainer.control] if isinstance(cb, ExportableState)]
    # TrainerState.__post_init__ turns the callbacks into their exported JSON state.
    snapshot = dataclasses.replace(trainer.state, stateful_callbacks=stateful)
    return (json.dumps(dataclasses.asdict(snapshot), indent=2, sort_keys=True) + "\n").encode()


def _inner_optimizer(optimizer: Any) -> Any:
    # Accelerate wraps the optimizer; the state to save and restore is the wrapped one's.
    return getattr(optimizer, "optimizer", optimizer)


def _find_trainer(callback: TrainerCallback) -> Trainer | None:
    """The trainer whose callbacks include `callback`, found up the call stack.

    Trainer events do not carry the trainer, but the resume path belongs to it; every event
    is called from a method of the trainer, so its frame is on the stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and any(cb is callback for cb in owner.callback_handler.callbacks):
            return owner
        frame = frame.f_back
    return None


class CheckpointCallback(TrainerCallback):
    """Save, retain and resume `Trainer` runs in the hf_rl_ckpt layout (see the module docstring).

    Args:
        config: what and when to save, how many to keep (`keep_top_k` by `metric_name`, any
            metric the trainer logs or evaluates), how to resume.

    Attributes:
        manager: the `CheckpointManager` writing this run's checkpoints; use it for queries
            (`manager.best()`, `manager.checkpoints()`, `manager.consolidated_path()`).
    """

    def __init__(self, config: CheckpointConfig) -> None:
        if not isinstance(config, CheckpointConfig):
            raise TypeError(
                f"CheckpointCallback takes a CheckpointConfig, got {type(config).__name__}; "
                "build one with CheckpointConfig(...), CheckpointConfig.from_dict(...) or CheckpointConfig.from_yaml(path)"
            )
        self.config = config
        self._manager: CheckpointManager | None = None
        self._trainer: Trainer | None = None
        self._generation: GenerationBuffer | None = None  # a TRL online trainer's buffered generations
        self._save_owed = False
        self._saved_step: int | None = None  # last step committed or resumed from, in this process
        self._metrics: dict[str, float] = {}
        self._metrics_step = -1
        self._logged: set[str] = set()

    @property
    def manager(self) -> CheckpointManager:
        if self._manager is None:
            # Created on first use: by then the trainer has set up the process group, so ranks are known.
            training = {"trainer": type(self._trainer).__name__, "args": json.loads(self._trainer.args.to_json_string())} if self._trainer else None
            self._manager = create_manager(self.config, training_config=training)
        return self._manager

    # ------------------------------------------------------------ attaching
    def attach(self, trainer: Trainer) -> None:
        """Bind to `trainer`: check its setup and route its resume path through our checkpoints.

        Happens by itself when the callback is given to the trainer's constructor; call it
        before `trainer.train()` if you add the callback later with `trainer.add_callback`.
        """
        if self._trainer is trainer:
            return
        if self._trainer is not None:
            raise CheckpointError("this CheckpointCallback is already attached to another trainer; create one callback per trainer")
        inner = unwrap_model(trainer.model)
        if getattr(inner, "config", None) is None:
            raise CheckpointError(
                f"CheckpointCallback needs a model with a `config` (a transformers PreTrainedModel or a PeftModel around one) "
                f"to write a loadable model folder; the trainer's model is a {type(inner).__name__} without one. "
                "Wrap your module in a PreTrainedModel subclass, or use CheckpointManager directly in a custom loop."
            )
        if trainer.args.save_strategy != "no":
            logger.warning(
                "TrainingArguments.save_strategy is %r and CheckpointCallback saves checkpoints too: the Trainer will also write "
                "its own (pickled) checkpoint-N folders into output_dir. Set save_strategy='no'; the checkpoints in "
                "CheckpointConfig.checkpoint_dir (%s) resume the Trainer exactly.",
                getattr(trainer.args.save_strategy, "value", trainer.args.save_strategy),
                self.config.checkpoint_dir,
            )
        twins = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CheckpointCallback) and cb is not self
                 and Path(cb.config.checkpoint_dir).resolve() == Path(self.config.checkpoint_dir).resolve()]
        if twins:
            raise CheckpointError(
                f"this trainer has two CheckpointCallbacks on checkpoint_dir {self.config.checkpoint_dir}: every checkpoint would "
                "be written twice and their retention would fight. Pass one CheckpointCallback (give a second one its own checkpoint_dir)"
            )
        self._install_resume_hooks(trainer)
        self._trainer = trainer

    def _install_resume_hooks(self, trainer: Trainer) -> None:
        originals = trainer_loaders(trainer)  # before touching the trainer: a missing loader fails here, naming the version
        train = trainer.train

        @functools.wraps(train)
        def train_with_resume(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
            return train(self._resume(resume_from_checkpoint), *args, **kwargs)

        trainer.train = train_with_resume
        if getattr(trainer, "is_deepspeed_enabled", False):
            # Our checkpoint's weights load before train() (scattered under ZeRO-3) and its ZeRO optimizer partitions
            # in `_load_optimizer_and_scheduler`: DeepSpeed's own loader, which reads global_stepN/ pickles, has nothing to do.
            dispatch_trainer_deepspeed_loader(is_checkpoint)
        loaders = {
            "_load_from_checkpoint": lambda path, model=None: None,  # the train() wrapper loaded and verified the weights
            "_load_optimizer_and_scheduler": self._load_optimizer_and_scheduler,
            "_load_rng_state": self._load_rng_state,
            "_load_scaler": lambda path: None,  # no GradScaler state in our layout: fp16 loss scaling re-calibrates
        }
        for name, ours in loaders.items():
            setattr(trainer, name, _dispatch(ours, originals[name]))

    def _resume(self, requested: Any) -> Any:
        """What to hand `Trainer.train` as `resume_from_checkpoint`, after loading the weights of our checkpoint."""
        trainer = self._trainer
        # TRL trainers set up their generation buffer after Trainer.__init__ (where we attach): looked up now, before
        # anything is loaded, so unknown TRL internals fail here.
        self._generation = GenerationBuffer.of(trainer)
        if requested is None:
            state = self.manager.resume(model=trainer.model)
        elif requested is True:  # `resume.mode: auto`, also when the config says otherwise: the caller asked to resume
            output_dir = trainer.args.output_dir
            if self.manager.latest() is None and os.path.isdir(output_dir) and get_last_checkpoint(output_dir) is not None:
                return True  # a run that saved with the Trainer's own checkpointing: the Trainer resumes its newest checkpoint-N
            state = self.manager.resume(model=trainer.model, mode="auto")
            if state is None:
                logger.warning(
                    "train(resume_from_checkpoint=True): no checkpoint in %s (nor a Trainer checkpoint-N in %s); starting fresh",
                    self.config.checkpoint_dir, output_dir,
                )
        elif is_checkpoint(requested):
            state = self.manager.load(requested, model=trainer.model)
        else:  # False or a Trainer checkpoint-N folder: the Trainer's own business
            return requested
        if state is None or state.weights_only:
            return None
        if not (state.path / TRAINER_STATE_FILE).is_file():
            raise CheckpointError(
                f"{state.path} has no {TRAINER_STATE_FILE}: it was not saved by CheckpointCallback, so the Trainer cannot "
                "continue its step count and data position from it. Set resume.load_weight_only: true to start a new "
                "Trainer run from its weights."
            )
        if self._generation is not None and state.rollout_state is not None:
            self._generation.restore(state.rollout_state)  # continue inside the same generation buffer
        self._saved_step = state.step
        return str(state.path)

    def _load_optimizer_and_scheduler(self, path: Path) -> None:
        trainer = self._trainer
        self.manager.load_optimizer_state(path, model=trainer.model, optimizer=_inner_optimizer(trainer.optimizer), scheduler=trainer.lr_scheduler)

    def _load_rng_state(self, path: Path) -> None:
        self.manager.load_rng_state(path)

    # ------------------------------------------------------------ events
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        trainer = _find_trainer(self)
        if trainer is not None:
            self.attach(trainer)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._trainer is None:
            trainer = _find_trainer(self)
            if trainer is None:
                raise CheckpointError("CheckpointCallback cannot find the trainer it runs in; call callback.attach(trainer) before train()")
            self.attach(trainer)
            if self.manager.should_load():
                raise CheckpointError(
                    f"CheckpointCallback was added after the trainer was built, too late to resume from {self.config.checkpoint_dir}; "
                    "pass it as Trainer(callbacks=[...]) or call callback.attach(trainer) before trainer.train()"
                )
        metric = self.config.metric_name
        if metric and metric.startswith("eval_") and args.eval_strategy == "no":
            logger.warning(
                "metric_name %r is an evaluation metric but TrainingArguments.eval_strategy is 'no': no checkpoint will carry it, "
                "so keep_top_k cannot rank them. Set eval_strategy (and eval_steps) or pick a training metric.", metric,
            )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._save_if_owed(state)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._save_if_owed(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step = state.global_step
        if self.manager.should_save(step):
            self._save_owed = True
            if self.manager.deadline_reached or self.manager.preempted:
                control.should_training_stop = True  # save, then stop before the job's time runs out or the node goes
        if self.config.sync_weight_path:
            self.manager.sync_weights(step, model=self._trainer.model, tokenizer=self._trainer.processing_class)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._record(state.global_step, logs or {})

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self._record(state.global_step, metrics or {})
        if state.global_step > 0 and state.global_step != self._saved_step:
            self._save_owed = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step > 0 and state.global_step != self._saved_step:
            self._save_owed = True
        self._save_if_owed(state, final=True)
        self._check_metric_logged()
        self.manager.finalize()

    # ------------------------------------------------------------ helpers
    def _record(self, step: int, logs: Mapping[str, Any]) -> None:
        if step != self._metrics_step:
            self._metrics, self._metrics_step = {}, step
        numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._metrics.update(numbers)
        self._logged.update(numbers)

    def _save_if_owed(self, state: TrainerState, *, final: bool = False) -> None:
        if not self._save_owed:
            return
        trainer = self._trainer
        step = state.global_step
        self.manager.save(
            step,
            model=trainer.model,
            optimizer=_inner_optimizer(trainer.optimizer),
            scheduler=trainer.lr_scheduler,
            metrics=self._metrics if self._metrics_step == step else {},
            tokenizer=trainer.processing_class,
            epoch=state.epoch,
            extra_files={TRAINER_STATE_FILE: trainer_state_json(trainer)},
            rollout_state=self._generation.capture() if self._generation is not None else None,
            policy_version=self._generation.policy_version() if self._generation is not None else None,
            final=final,
        )
        self._saved_step = step
        self._save_owed = False

    def _check_metric_logged(self) -> None:
        metric = self.config.metric_name
        if metric and metric != STEP_METRIC and metric not in self._logged:
            logger.warning(
                "metric_name %r was never logged in this run, so keep_top_k could not rank any checkpoint (only the newest is kept). "
                "Metrics that were logged: %s. Set metric_name to one of them (evaluation metrics carry the 'eval_' prefix).",
                metric, ", ".join(sorted(self._logged)) or "none",
            )


def _dispatch(ours: Any, original: Any) -> Any:
    """A Trainer loader that reads our checkpoints with `ours` and anything else with the Trainer's `original`."""

    @functools.wraps(original)
    def load(checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
        if is_checkpoint(checkpoint):
            return ours(Path(checkpoint), *args, **kwargs)
        return original(checkpoint, *args, **kwargs)

    return load
