"""Child process for crash tests: trains a tiny model and saves every step until killed.

Usage: python _crash_child.py CKPT_DIR READY_FILE [--hang-in-save]
With --hang-in-save, the save of step 3 blocks inside the write (its dataloader state
hangs) after announcing itself in READY_FILE, so the parent can SIGKILL it mid-save.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from training_objects import make_training_objects

from hf_rl_ckpt import CheckpointConfig, CheckpointManager


class HangingLoaderState:
    """Wraps a loader; its state_dict() signals the parent and blocks, simulating a slow write."""

    def __init__(self, loader, ready: Path) -> None:
        self.loader, self.ready = loader, ready

    def state_dict(self):
        self.ready.write_text("in-save")
        time.sleep(600)

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def main() -> None:
    ckpt_dir, ready = sys.argv[1], Path(sys.argv[2])
    hang = "--hang-in-save" in sys.argv
    objs = make_training_objects()
    manager = CheckpointManager(CheckpointConfig(checkpoint_dir=ckpt_dir, keep_top_k=2, metric_name="step"))
    state = manager.resume(**objs.as_kwargs())
    step = state.step if state else 0
    batches = objs.endless_batches()
    while True:
        batch = next(batches)
        objs.train_step(batch)
        step += 1
        loader = HangingLoaderState(objs.loader, ready) if hang and step == 3 else objs.loader
        manager.save(step, model=objs.model, optimizer=objs.optimizer, scheduler=objs.scheduler, dataloader=loader)
        if not hang:
            ready.write_text(str(step))


if __name__ == "__main__":
    main()
