"""hf_rl_ckpt: production-grade checkpointing for Hugging Face training."""
