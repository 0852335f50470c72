"""NexRL's `DCPCheckpointManager` (train_service_backend/utils/checkpoint_manager.py), same calls, over the hf_rl_ckpt layout.

```python
from hf_rl_ckpt.compat.nexrl import DCPCheckpointManager     # the only line that changes

ckpt = DCPCheckpointManager(model, optimizer, lr_scheduler, tokenizer)
ckpt.save_checkpoint(f"{checkpoint_path}/global_step_{step}", global_step=step,
                     remove_previous_ckpt=config.trainer.remove_previous_ckpt)
ckpt.load_checkpoint(path, load_weight_only=True)           # start a new run from the weights
```

`local_path` names the checkpoint: its parent is the run's checkpoint directory and its
name, with the step number replaced by `{step}`, the name template (`global_step_{step}`),
so checkpoints land exactly where NexRL put them. Every rank calls both methods, as in
NexRL. What differs, deliberately:

- the checkpoint is our layout (consolidated safetensors that vLLM loads directly, optimizer
  and RNG without pickle, a manifest), committed atomically, verified on load;
- `remove_previous_ckpt` removes the older checkpoints of that directory *after* the new
  one is committed (NexRL deletes the previous one before saving, so a crash in between
  leaves nothing); it is top-1 retention by recency (the most recent save);
- `save_weight_only` saves the model (and RNG, config) but no optimizer or scheduler;
- `saved_fully_shared_ckpt` is accepted and not needed: a sharded (FSDP2) model is saved
  both per rank and consolidated, a plain one consolidated;
- `del_local_after_load` is accepted and ignored (NexRL's DCP manager ignores it too): a
  checkpoint is never deleted by loading it.

`load_checkpoint(path)` takes a checkpoint directory, or a run directory (its newest
checkpoint); `load_weight_only` is `resume.load_weight_only`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..config import STEP_METRIC, CheckpointConfig
from ..errors import CheckpointError, CheckpointNotFoundError
from ..layout import TRAINING_INFO, CheckpointLayout
from ..manager import CheckpointManager, ResumeState


def name_template(local_path: Path, global_step: int) -> str:
    """`global_step_10` at step 10 -> `global_step_{step}`: NexRL's directory name with the step as a field."""
    matches = list(re.finditer(rf"(?<!\d){global_step}(?!\d)", local_path.name))
    if not matches:
        raise CheckpointError(
            f"checkpoint path {local_path} does not contain the step {global_step} in its name; name checkpoints like "
            f"'global_step_{global_step}' so that each step gets its own directory"
        )
    last = matches[-1]
    return local_path.name[: last.start()] + "{step}" + local_path.name[last.end():]


class DCPCheckpointManager:
    """NexRL's checkpoint manager API over hf_rl_ckpt (see the module docstring).

    Args:
        model, optimizer, lr_scheduler, tokenizer: the objects to save and restore; the
            tokenizer goes into the consolidated model folder.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        self.model, self.optimizer, self.lr_scheduler, self.tokenizer = model, optimizer, lr_scheduler, tokenizer
        self.previous_global_step: int | None = None
        self.previous_save_local_path: str | None = None
        self._managers: dict[tuple[str, str, bool], CheckpointManager] = {}

    def _manager(self, root: Path, template: str, remove_previous: bool) -> CheckpointManager:
        key = (os.path.realpath(root), template, remove_previous)
        if key not in self._managers:
            retention = {"keep_top_k": 1, "metric_name": STEP_METRIC} if remove_previous else {}
            config = CheckpointConfig(checkpoint_dir=str(root), checkpoint_name_template=template, resume={"mode": "disable"}, **retention)
            self._managers[key] = CheckpointManager(config)
        return self._managers[key]

    def save_checkpoint(
        self,
        local_path: str,
        global_step: int,
        remove_previous_ckpt: bool = False,
        save_weight_only: bool = False,
        saved_fully_shared_ckpt: bool = True,
        *args: Any,
        **kwargs: Any,
    ) -> Path | None:
        """Save `global_step` to `local_path` (committed atomically); returns the checkpoint directory."""
        target = Path(os.path.abspath(local_path))
        manager = self._manager(target.parent, name_template(target, global_step), remove_previous_ckpt)
        weights_only = save_weight_only or self.optimizer is None
        path = manager.save(
            global_step, model=self.model, tokenizer=self.tokenizer,
            optimizer=None if weights_only else self.optimizer, scheduler=None if weights_only else self.lr_scheduler,
        )
        self.previous_global_step, self.previous_save_local_path = global_step, str(path)
        return path

    def load_checkpoint(
        self, path: str | None = None, del_local_after_load: bool = True, load_weight_only: bool = False, *args: Any, **kwargs: Any
    ) -> ResumeState | None:
        """Restore from a checkpoint directory, or the newest checkpoint of a run directory; None for `path=None`."""
        if path is None:
            return None
        path = Path(path)
        layout = CheckpointLayout.of_run(path.parent if (path / TRAINING_INFO).is_file() else path)
        manager = CheckpointManager(
            CheckpointConfig(checkpoint_dir=str(layout.root), checkpoint_name_template=layout.name_template, resume={"mode": "disable"})
        )
        target = path if (path / TRAINING_INFO).is_file() else manager.latest()
        if target is None:
            raise CheckpointNotFoundError(f"{path} is neither a committed checkpoint nor a directory holding one")
        try:
            return manager.load(
                target, model=self.model, weights_only=load_weight_only,
                optimizer=None if load_weight_only else self.optimizer, scheduler=None if load_weight_only else self.lr_scheduler,
            )
        finally:
            manager.finalize()


def get_checkpoint_manager(manager_type: str) -> type[DCPCheckpointManager]:
    """NexRL's factory: `"dcp"` -> `DCPCheckpointManager`."""
    if manager_type != "dcp":
        raise ValueError(f"Unknown checkpoint manager type '{manager_type}'. Available types: dcp")
    return DCPCheckpointManager
