"""Publishing checkpoints to the Hugging Face Hub.

- `publish` — the background publisher (`HubPublisher`, driven by `CheckpointManager` when
  `push_to_hub` is on) and manual pushes (`publish_checkpoint`, `hf-rl-ckpt push`).
- `card` — the model card (README.md) of a checkpoint (`render_model_card`).

```python
from hf_rl_ckpt.hub import publish_checkpoint
publish_checkpoint("runs/ckpt/step_40", "alice/my-run", revision="step-40")
```
"""

from .card import Leaderboard, branch_for, render_model_card
from .publish import (
    HubAuthError,
    HubEntry,
    HubPublishError,
    HubPublisher,
    HubState,
    HubUnavailableError,
    RetryPolicy,
    checkpoint_files,
    publish_checkpoint,
)

__all__ = [
    "HubAuthError",
    "HubEntry",
    "HubPublishError",
    "HubPublisher",
    "HubState",
    "HubUnavailableError",
    "Leaderboard",
    "RetryPolicy",
    "branch_for",
    "checkpoint_files",
    "publish_checkpoint",
    "render_model_card",
]
