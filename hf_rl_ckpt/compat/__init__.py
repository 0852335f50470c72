"""Drop-in checkpoint APIs of the RL frameworks this library's config follows, over the hf_rl_ckpt layout.

Switching is an import change:

    from nemo_rl.utils.checkpoint import CheckpointManager        # before
    from hf_rl_ckpt.compat.nemo_rl import CheckpointManager       # after: same methods, atomic commits,
                                                                  # manifests, crash recovery, the .lock
    from nexrl.train_service_backend.utils.checkpoint_manager import DCPCheckpointManager   # before
    from hf_rl_ckpt.compat.nexrl import DCPCheckpointManager                                 # after

Each module documents where its semantics deliberately differ from the original (always
safer: e.g. nothing is deleted before the new checkpoint is committed).
"""
