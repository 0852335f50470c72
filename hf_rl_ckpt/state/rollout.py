"""An RL loop's in-flight rollout state, per rank: `rollout/rank_<r>.safetensors` + `rollout/rank_<r>.json`.

What a resumed RL loop needs besides weights, optimizer and data position: generations that
were produced but not yet consumed (GRPO reuses one generation batch for several optimizer
steps), a replay buffer, a rollout cursor. Each rank holds its own. The state is a tree of
dicts, lists and tuples with tensors and JSON values at the leaves (`tensortree`); the
tensors are stored as safetensors, the rest as JSON, so loading it never runs pickle.

The tensors are copied to host memory when the save is called: a loop refills its buffers
right after `save` returns, and an async save writes the files later.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..digest import Digests
from ..atomic import write_bytes
from ..errors import CorruptCheckpointError
from ..layout import rollout_files
from . import tensortree
from .safetensors_io import write_safetensors

FORMAT = "hf_rl_ckpt.rollout_state"


@dataclass(frozen=True)
class RolloutSnapshot:
    """One rank's rollout state as of `save`: host copies of its tensors and the JSON document of the rest."""

    tensors: dict[str, torch.Tensor]
    document: bytes


def capture_rollout(state: Any, rank: int) -> RolloutSnapshot:
    """Snapshot `state` now; raises CheckpointSaveError (naming the path) for a value that is neither a tensor nor JSON."""
    structure, tensors = tensortree.split(
        state, "rollout_state", unsupported_hint="convert it to tensors, numbers, strings, lists or dicts before saving it",
    )
    copies = {path: tensor.to("cpu", copy=True).contiguous() for path, tensor in tensors.items()}
    document = json.dumps({"format": FORMAT, "version": 1, "rank": rank, "state": structure}).encode()
    return RolloutSnapshot(copies, document)


def write_rollout(snapshot: RolloutSnapshot, staging: Path, rank: int) -> Digests:
    """Write this rank's files under the checkpoint's staging folder; their digests by relative path."""
    tensor_file, json_file = rollout_files(rank)
    (staging / tensor_file).parent.mkdir(parents=True, exist_ok=True)
    return {
        tensor_file: write_safetensors(staging / tensor_file, snapshot.tensors),
        json_file: write_bytes(staging / json_file, snapshot.document),
    }


def load_rollout(checkpoint: Path, rank: int) -> Any:
    """The rollout state rank `rank` saved in `checkpoint` (whose manifest lists both of its files)."""
    tensor_file, json_file = rollout_files(rank)
    try:
        document = json.loads((checkpoint / json_file).read_bytes())
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT!r}")
        with safe_open(os.fspath(checkpoint / tensor_file), framework="pt") as reader:
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
        return tensortree.join(document["state"], tensors)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(checkpoint, f"rollout state of rank {rank} unreadable: {err}") from err
