"""The one place hf_rl_ckpt reads pickles, and only when the user has said to trust them.

Our own checkpoints need no pickle (safetensors + JSON). Pickles appear only in formats we
read on the user's behalf: the legacy `model_save_format: torch_save` weights, HF Trainer
`checkpoint-N` folders (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `pytorch_model.bin`),
Accelerate `save_state` folders (`*.bin`, `random_states_*.pkl`) and torch.distributed.checkpoint
(DCP) folders (`.distcp` items and the `.metadata` index). A pickle can run code when loaded,
so two rules hold here:

1. Nothing is unpickled unless the caller passes `trust_pickle=True` (CLI `--trust-pickle`,
   config `resume.trust_pickle: true`); otherwise `UntrustedPickleError` names the file.
2. Even then, nothing goes through a general unpickler: files go through
   `torch.load(weights_only=True)` (tensors, containers and primitives only; plus the three
   numpy types an RNG state needs, the allowlist transformers and accelerate use), and DCP's
   `.metadata` through `_DcpMetadataUnpickler`, which resolves only DCP's own metadata
   classes, `torch.Size`, dtypes and layouts and refuses every other global by name.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from ..digest import FileDigest
from ..atomic import HashingWriter
from ..errors import CorruptCheckpointError, UntrustedPickleError
from ..layout import safe_join
from ..shims import unflatten_state_dict

#: The numpy types of `np.random.get_state()`, as transformers' and accelerate's `safe_globals` allow them.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
_NUMPY_RNG_TYPES = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
DCP_METADATA = ".metadata"


def require_trust(paths: list[Path], trust_pickle: bool, what: str) -> None:
    """Raise `UntrustedPickleError` for `paths` unless `trust_pickle` (no-op when there are none)."""
    if paths and not trust_pickle:
        raise UntrustedPickleError(paths, what)


def _torch_load(source: str | os.PathLike | io.BytesIO, name: str | os.PathLike, stand_ins: tuple[tuple[Any, str], ...] = ()) -> Any:
    with torch.serialization.safe_globals([*_NUMPY_RNG_TYPES, *stand_ins]):
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CorruptCheckpointError(
                name, f"refused by torch.load(weights_only=True): it holds objects other than tensors and plain data ({first_line})"
            ) from err
        except (RuntimeError, EOFError, ValueError, KeyError) as err:
            raise CorruptCheckpointError(name, f"not a readable torch.save file ({type(err).__name__}: {err})") from err


def load_pickled(path: str | os.PathLike, *, trust_pickle: bool, what: str, stand_ins: tuple[tuple[Any, str], ...] = ()) -> Any:
    """`torch.load(path, weights_only=True)` behind the trust gate; errors name the file.

    `stand_ins`: (harmless callable, "module.Name") pairs that the pickle's references to
    `module.Name` build instead of the real class (e.g. a plain object keeping a DeepSpeed
    loss scaler's numbers), so a file holding a few known objects still loads weights-only.
    """
    path = Path(path)
    require_trust([path], trust_pickle, what)
    if not path.is_file():
        raise CorruptCheckpointError(path, "missing")
    return _torch_load(path, path, stand_ins)


def load_pickled_tensors(path: str | os.PathLike, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """A `torch.save`d dict of named tensors (`pytorch_model.bin`), refusing anything else."""
    state = load_pickled(path, trust_pickle=trust_pickle, what=f"loading the torch_save weights {path}")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CorruptCheckpointError(path, "expected a dict of parameter name -> tensor")
    return state


def write_torch_bin(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> FileDigest:
    """`torch.save` a dict of host tensors (nothing else, so `weights_only=True` reads it); return its digest."""
    host = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    with open(path, "wb") as fh:
        writer = HashingWriter(fh)
        writer.flush = fh.flush  # type: ignore[attr-defined]  # torch.save flushes its target
        torch.save(host, writer)
        fh.flush()
        os.fsync(fh.fileno())
    return writer.digest


# ------------------------------------------------------------------ DCP folders
def _dcp_globals() -> set[tuple[str, str]]:
    names = {("torch.distributed.checkpoint.metadata", cls.__name__) for cls in (
        dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta, dcp_metadata._MEM_FORMAT_ENCODING,
    )}
    names |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
              ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
              ("collections", "OrderedDict")}
    names |= {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))}
    return names


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` index and nothing else: any other global is refused by name."""

    _allowed = _dcp_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP metadata")
        return super().find_class(module, name)


def read_dcp_metadata(dcp_dir: str | os.PathLike, *, trust_pickle: bool) -> dcp_metadata.Metadata:
    """The `.metadata` index of a DCP folder, read with the allowlist unpickler."""
    path = Path(dcp_dir) / DCP_METADATA
    require_trust([path], trust_pickle, f"reading the torch.distributed.checkpoint folder {dcp_dir}")
    try:
        with open(path, "rb") as fh:
            metadata = _DcpMetadataUnpickler(fh).load()
    except FileNotFoundError as err:
        raise CorruptCheckpointError(path, "missing: not a torch.distributed.checkpoint folder") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(path, f"not a DCP metadata file ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CorruptCheckpointError(path, f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def read_dcp(dcp_dir: str | os.PathLike, *, trust_pickle: bool) -> dict[str, Any]:
    """A whole DCP folder as one nested state dict on CPU, whatever world size wrote it.

    Each tensor is assembled from its chunks (one per writing rank), each non-tensor value
    is read back; every item goes through `torch.load(weights_only=True)`, every file path
    in the index through `safe_join`, and every byte range is checked against its file.
    """
    dcp_dir = Path(dcp_dir)
    metadata = read_dcp_metadata(dcp_dir, trust_pickle=trust_pickle)
    files: dict[str, bytes] = {}

    def item(index: dcp_metadata.MetadataIndex) -> Any:
        info = metadata.storage_data.get(index)
        if info is None:
            raise CorruptCheckpointError(dcp_dir / DCP_METADATA, f"no storage entry for {index.fqn} at {index.offset}")
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpointError(dcp_dir / info.relative_path, f"uses DCP storage extensions {info.transform_descriptors}, not supported")
        if info.relative_path not in files:
            files[info.relative_path] = safe_join(dcp_dir, info.relative_path).read_bytes()
        data = files[info.relative_path]
        if info.offset < 0 or info.length < 0 or info.offset + info.length > len(data):
            raise CorruptCheckpointError(dcp_dir / info.relative_path, f"item {index.fqn} at bytes [{info.offset}, +{info.length}) lies beyond the file")
        return _torch_load(io.BytesIO(data[info.offset:info.offset + info.length]), dcp_dir / info.relative_path)

    flat: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, dcp_metadata.BytesStorageMetadata):
            flat[fqn] = item(dcp_metadata.MetadataIndex(fqn))
            continue
        full = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for chunk in meta.chunks:
            piece = item(dcp_metadata.MetadataIndex(fqn, tuple(chunk.offsets)))
            if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != tuple(chunk.sizes):
                raise CorruptCheckpointError(dcp_dir, f"chunk of {fqn} at {list(chunk.offsets)} is not a tensor of shape {list(chunk.sizes)}")
            region = full
            for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes)):
                region = region.narrow(dim, start, length)
            region.copy_(piece)
        flat[fqn] = full
    return unflatten_state_dict(flat, metadata.planner_data) if metadata.planner_data else flat
