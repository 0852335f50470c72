"""Integrations with training frameworks; each module imports its framework, so import the one you use.

- `hf_rl_ckpt.integrations.trainer.CheckpointCallback` (also `hf_rl_ckpt.CheckpointCallback`):
  `transformers.Trainer` and the TRL trainers built on it.
"""
