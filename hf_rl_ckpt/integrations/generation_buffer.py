"""The generation buffer of TRL's online trainers (GRPO, RLOO), saved and restored as rollout state.

`GRPOTrainer` generates completions for `steps_per_generation` optimizer steps at once and,
with `num_iterations > 1`, reuses them for that many passes: between generations, the
trainer's `_buffered_inputs` (the scored completions, split into one slice per micro-step)
and its micro-step counter `_step` (which slice comes next, and when to generate again) are
the state a resumed run must continue from. Without them a checkpoint inside the buffer
resumes with a fresh generation: other completions, other rewards, other weights.

Saved per rank as the checkpoint's rollout state (`CheckpointManager.save(...,
rollout_state=...)`): the buffer's tensors as safetensors, the rest as JSON. Also saved:
the metrics the trainer has gathered but not logged yet (with `logging_steps > 1`), so the
resumed run logs the same averages. The names read are TRL internals with no public
equivalent; they are checked at attach time against what TRL releases have (see
`hf_rl_ckpt.shims`), so a release that changes them fails there, naming its version, rather
than resuming silently off the buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..shims import TrlGenerationState, trl_generation_state

logger = logging.getLogger("hf_rl_ckpt")

FORMAT = "trl.generation_buffer"


@dataclass(frozen=True)
class GenerationBuffer:
    """Reads and restores one TRL trainer's in-flight generations (see the module docstring)."""

    trainer: Any
    internals: TrlGenerationState

    @classmethod
    def of(cls, trainer: Any) -> GenerationBuffer | None:
        """The buffer of `trainer`, None for a trainer that keeps none (SFT, DPO, a plain `Trainer`)."""
        internals = trl_generation_state(trainer)
        return cls(trainer, internals) if internals is not None else None

    def capture(self) -> dict[str, Any]:
        """The state to save now, at an optimizer-step boundary (tensors referenced; the save copies them)."""
        return {
            "format": FORMAT,
            "trainer": type(self.trainer).__name__,
            "micro_step": self.internals.micro_step(),
            "buffered_inputs": self.internals.buffered_inputs(),
            "pending_metrics": {key: list(values) for key, values in self.internals.train_metrics().items()},
        }

    def policy_version(self) -> int:
        """The global step whose weights generated the buffered completions (the current step when nothing is buffered)."""
        micro_step = self.internals.micro_step()
        if self.internals.buffered_inputs() is not None:
            micro_step -= micro_step % self.internals.generate_every()  # the micro-step that generated the buffer
        return micro_step // self.internals.micro_steps_per_step()

    def restore(self, state: Any) -> None:
        """Put a saved buffer back before training resumes."""
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            logger.warning("the checkpoint's rollout state is not a TRL generation buffer; %s regenerates at its next step", type(self.trainer).__name__)
            return
        device = self.trainer.accelerator.device
        self.internals.set(
            micro_step=state["micro_step"], buffered_inputs=_to_device(state["buffered_inputs"], device), train_metrics=state["pending_metrics"],
        )


def _to_device(value: Any, device: Any) -> Any:
    """`value` with every tensor moved to `device` (the checkpoint's tensors load on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value
