"""Every RNG stream a training step draws from, saved per rank as safetensors.

Python's `random`, NumPy's legacy global generator, torch's CPU generator and every CUDA
device's generator. Their states are integer arrays plus a few scalars (kept in the
safetensors metadata as exact decimal strings), so no pickle is involved.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from safetensors import safe_open

from ..errors import CorruptCheckpointError
from .safetensors_io import check_safetensors_header

logger = logging.getLogger(__name__)


RngSnapshot = tuple[dict[str, torch.Tensor], dict[str, str]]


def capture_rng() -> RngSnapshot:
    """This process's RNG streams as (tensors, safetensors header metadata), captured now.

    The file is written later from these values (by `write_safetensors`, maybe from the
    async writer's thread), so it records the RNG exactly where the training loop was.
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return rng_snapshot(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)


def rng_snapshot(python_state: tuple, numpy_state: tuple, torch_cpu: torch.Tensor, torch_cuda: list[torch.Tensor] = ()) -> RngSnapshot:
    """Given RNG states (as `random.getstate()`, `np.random.get_state()`, `torch.get_rng_state()` return them) in the file format.

    What `capture_rng` records for this process; converters record another framework's saved streams with it.
    """
    py_version, py_state, py_gauss = python_state
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = numpy_state
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch_cpu": torch_cpu.clone(),
    }
    for index, state in enumerate(torch_cuda):
        tensors[f"torch_cuda_{index}"] = state
    metadata = {
        "python_version": str(py_version),
        "python_gauss_next": repr(py_gauss),
        "numpy_kind": str(np_kind),
        "numpy_pos": str(np_pos),
        "numpy_has_gauss": str(np_has_gauss),
        "numpy_cached_gaussian": repr(float(np_gauss)),
    }
    return tensors, metadata


def load_rng(path: str | os.PathLike) -> None:
    """Restore the RNG states captured by `capture_rng` (and written with `write_safetensors`)."""
    try:
        check_safetensors_header(path)
        with safe_open(os.fspath(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        gauss = meta["python_gauss_next"]
        random.setstate((int(meta["python_version"]), tuple(tensors["python"].tolist()), None if gauss == "None" else float(gauss)))
        np.random.set_state(
            (
                meta["numpy_kind"],
                tensors["numpy"].numpy().astype(np.uint32),
                int(meta["numpy_pos"]),
                int(meta["numpy_has_gauss"]),
                float(meta["numpy_cached_gaussian"]),
            )
        )
        torch.set_rng_state(tensors["torch_cpu"])
    except FileNotFoundError as err:
        raise CorruptCheckpointError(path, "missing: no RNG state for this rank (was the checkpoint saved with fewer ranks?)") from err
    except (KeyError, ValueError, TypeError) as err:
        raise CorruptCheckpointError(path, f"malformed RNG state ({err})") from err
    except Exception as err:  # safetensors' own error type for a malformed file
        if isinstance(err, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(path, f"not a readable safetensors file ({err})") from err
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("%s holds %d CUDA RNG states but this process sees %d devices; CUDA RNG not restored",
                           path, len(cuda_states), torch.cuda.device_count() if torch.cuda.is_available() else 0)
