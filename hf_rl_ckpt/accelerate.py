"""Public import path of the Accelerate integration: `from hf_rl_ckpt.accelerate import register_checkpointing`."""

from .integrations.accelerate import register_checkpointing

__all__ = ["register_checkpointing"]
