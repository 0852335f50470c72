"""`nemo_rl.utils.checkpoint.CheckpointManager`, same names and call pattern, over the hf_rl_ckpt layout.

NeMo-RL's algorithm loop owns what goes into a checkpoint and the manager owns the
directory around it:

```python
from hf_rl_ckpt.compat.nemo_rl import CheckpointManager      # the only line that changes

checkpointer = CheckpointManager(master_config["checkpointing"])
last = checkpointer.get_latest_checkpoint_path()
training_info = checkpointer.load_training_info(last)        # None on a fresh start
...
path = checkpointer.init_tmp_checkpoint(step + 1, {"step": step + 1, "val:accuracy": acc}, master_config)
policy.save_checkpoint(weights_path=os.path.join(path, "policy", "weights"), ...)
torch.save(dataloader.state_dict(), os.path.join(path, "train_dataloader.pt"))
checkpointer.finalize_checkpoint(path)
```

What is the same: the `checkpointing:` config (dict or pydantic model), `step_N` directory
names, `training_info.json` content as `load_training_info` returns it, `config.yaml`,
`get_best_checkpoint_path` / `get_latest_checkpoint_path` (strings, None when empty),
`get_resume_paths`, the async-finalization methods and the context manager.

What is safer: `init_tmp_checkpoint` returns `<checkpoint_dir>/.incomplete/step_N` (not
`tmp_step_N`); `finalize_checkpoint` lists every file the loop wrote with size and sha256,
fsyncs, and renames it into place atomically, so `hf-rl-ckpt verify` and our resume
fallback work on these checkpoints and a crash at any point leaves the newest complete one
loadable; `training_info.json` is ours (the loop's dict is kept and returned as given).
Retention is the library's: `keep_top_k` by `metric_name` plus always the newest (NeMo-RL's
`ft_keep_latest_k`/`save_period` alignment rules are not implemented and are refused by
name); `remove_old_checkpoints(exclude_latest=False)` still keeps the newest. Finalization
runs synchronously (`begin_finalization` waits for `wait_fn` then finalizes).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import numpy as np
import torch
import yaml

from ..atomic import atomic_write_bytes
from ..commit import CommitRequest, checked_step
from ..config import STEP_METRIC, CheckpointConfig
from ..errors import CheckpointError
from ..layout import CONFIG_YAML
from ..manager import CheckpointManager as _Manager
from ..verify import read_training_info

logger = logging.getLogger("hf_rl_ckpt")

PathLike = str | os.PathLike
#: NeMo-RL's key for the dict the loop passes to `init_tmp_checkpoint`, inside our training_info.json.
TRAINING_INFO_KEY = "nemo_rl_training_info"


def _plain(training_info: Mapping[str, Any]) -> dict[str, Any]:
    """The loop's dict with tensors and numpy scalars turned into Python numbers, as NeMo-RL does."""
    return {k: v.item() if isinstance(v, (torch.Tensor, np.ndarray, np.generic)) else v for k, v in training_info.items()}


class CheckpointManager:
    """NeMo-RL's checkpoint manager over hf_rl_ckpt (see the module docstring).

    Args:
        config: NeMo-RL's `checkpointing:` block, as a dict or a pydantic `CheckpointingConfig`.
    """

    def __init__(self, config: Any) -> None:
        block = dict(config.model_dump() if hasattr(config, "model_dump") else config)
        if block.get("keep_top_k") is not None and not block.get("metric_name"):
            block["metric_name"] = STEP_METRIC  # NeMo-RL keeps the most recent k when no metric is set
        self.config = CheckpointConfig.from_dict({"checkpointing": block})
        self._manager = _Manager(self.config)
        self.checkpoint_dir = Path(self.config.checkpoint_dir)
        self.metric_name = self.config.metric_name
        self.higher_is_better = self.config.higher_is_better
        self.keep_top_k = self.config.keep_top_k
        self.save_period = self.config.save_period
        self.save_optimizer = self.config.save_optimizer
        self._staged: dict[Path, tuple[int, dict[str, Any]]] = {}  # staging path -> (step, the loop's training_info)

    @staticmethod
    def get_resume_paths(
        last_checkpoint_path: Optional[PathLike], *, model_component: Literal["policy", "value"] = "policy"
    ) -> tuple[Optional[Path], Optional[Path]]:
        """(weights_path, optimizer_path) under a checkpoint, optimizer None when it was not saved; (None, None) without one."""
        if not last_checkpoint_path:
            return None, None
        component = Path(last_checkpoint_path) / model_component
        optimizer = component / "optimizer"
        if not optimizer.exists():
            logger.warning("no optimizer state at %s; the optimizer starts fresh", optimizer)
            return component / "weights", None
        return component / "weights", optimizer

    def init_tmp_checkpoint(self, step: int, training_info: Mapping[str, Any], run_config: Any = None) -> Path:
        """A fresh staging directory for `step` (absolute path); the loop writes its files there, then `finalize_checkpoint`."""
        staging = self._manager.committer.staging_dir(checked_step(step))
        if run_config is not None:
            document = run_config.model_dump(mode="json") if hasattr(run_config, "model_dump") else dict(run_config)
            atomic_write_bytes(staging / CONFIG_YAML, yaml.safe_dump(document, sort_keys=False).encode())
        self._staged[staging.resolve()] = (step, _plain(training_info))
        return staging.resolve()

    def finalize_checkpoint(self, checkpoint_path: PathLike) -> None:
        """Seal and commit the staged checkpoint atomically, then apply retention."""
        key = Path(checkpoint_path).resolve()
        if key not in self._staged:
            raise CheckpointError(f"{checkpoint_path} was not returned by init_tmp_checkpoint of this manager")
        step, info = self._staged.pop(key)
        try:
            request = CommitRequest.checked(step, info, None, {TRAINING_INFO_KEY: info}, self.config.metric_name)
        except CheckpointError:
            shutil.rmtree(key, ignore_errors=True)  # refused records: nothing staged stays behind
            raise
        self._manager.committer.commit_staged(request.step, request)

    def begin_finalization(self, checkpoint_path: PathLike, wait_fn: Optional[Callable[[], None]] = None) -> None:
        """Wait for the loop's async writers (`wait_fn`), then finalize; synchronous here."""
        if wait_fn is not None:
            wait_fn()
        self.finalize_checkpoint(checkpoint_path)

    def finalize_pending(self) -> None:
        """Nothing is ever pending: finalization is synchronous."""

    @property
    def has_pending_finalization(self) -> bool:
        return False

    def shutdown(self) -> None:
        """Release the checkpoint directory (its lock); safe to call more than once."""
        self._manager.finalize()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        self.shutdown()
        return False

    def remove_old_checkpoints(self, exclude_latest: bool = True) -> None:
        """Nothing left to do: retention runs inside every `finalize_checkpoint`, crash-safely, and always keeps the newest."""

    def get_best_checkpoint_path(self) -> Optional[str]:
        best = self._manager.best()
        return str(best) if best is not None else None

    def get_latest_checkpoint_path(self) -> Optional[str]:
        latest = self._manager.latest()
        return str(latest) if latest is not None else None

    def load_training_info(self, checkpoint_path: Optional[PathLike] = None) -> Optional[dict[str, Any]]:
        """The dict the loop passed to `init_tmp_checkpoint` for this checkpoint (None for None)."""
        if checkpoint_path is None:
            return None
        info = read_training_info(checkpoint_path)
        return (info.get("extra") or {}).get(TRAINING_INFO_KEY, info.get("metrics") or {})
