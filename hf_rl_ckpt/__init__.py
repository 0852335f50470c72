"""hf_rl_ckpt: production-grade checkpointing for Hugging Face fine-tuning and RL.

```python
from hf_rl_ckpt import CheckpointConfig, CheckpointManager
manager = CheckpointManager(CheckpointConfig(checkpoint_dir="runs/ckpt", save_period=100))
```
"""

from .config import CheckpointConfig, ResumeConfig
from .errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigError,
    CorruptCheckpointError,
    HubAuthError,
    HubPublishError,
    HubUnavailableError,
    ReadOnlyCheckpointDirError,
    RemoteStorageError,
    StateMismatchError,
    UnsupportedVersionError,
    UntrustedPickleError,
)
from .events import CheckpointCommitted, CheckpointEvicted, Subscriber
from .manager import CheckpointManager, CheckpointManagerProtocol, create_manager
from .load import ResumeState
from .records import CheckpointRecord
from .state.dataloader import ResumableDataLoader
from .verify import verify_checkpoint

__version__ = "0.1.0"

# Imported on first use: the callback pulls in transformers.Trainer, which custom loops do not need.
_LAZY = {"CheckpointCallback": "hf_rl_ckpt.integrations.trainer"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_rl_ckpt' has no attribute {name!r}")

__all__ = [
    "CheckpointCallback",
    "CheckpointConfig",
    "ResumeConfig",
    "CheckpointManager",
    "CheckpointManagerProtocol",
    "ResumeState",
    "ResumableDataLoader",
    "create_manager",
    "verify_checkpoint",
    "CheckpointRecord",
    "Subscriber",
    "CheckpointCommitted",
    "CheckpointEvicted",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "ConfigError",
    "CorruptCheckpointError",
    "HubAuthError",
    "HubPublishError",
    "HubUnavailableError",
    "ReadOnlyCheckpointDirError",
    "RemoteStorageError",
    "StateMismatchError",
    "UnsupportedVersionError",
    "UntrustedPickleError",
]
