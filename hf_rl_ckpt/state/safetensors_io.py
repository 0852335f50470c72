"""A streaming safetensors writer.

`safetensors.torch.save_file` serialises the whole file into one bytes object first, a
second copy of the weights in memory. This writer emits the same format tensor by tensor
(a device tensor is copied to the host one at a time), hashing as it writes, so the extra
memory of a save stays near one tensor and the manifest needs no second read. Reading
uses the safetensors library itself (memory-mapped), after `check_safetensors_header` has
validated the header: a file from disk may be hostile, and a header that claims huge or
overlapping tensors should be refused with the file named before any library maps it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import save

from ..digest import FileDigest
from ..atomic import StreamingFileWriter
from ..documents import refuse_constant
from ..errors import CorruptCheckpointError

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is already on the host."""
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.to("cpu")
    host = host.contiguous().reshape(-1)
    if host.dtype == torch.bool:
        host = host.to(torch.uint8)
    return memoryview(host.view(torch.uint8).numpy()).cast("B")


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> FileDigest:
    """Write `tensors` as a safetensors file, fsync it, and return its digest.

    The bytes are those `safetensors.torch.save_file` writes (`file_order`). They are hashed
    while a helper thread writes them (`StreamingFileWriter`, with `O_DIRECT` where the
    filesystem allows it), so the digest costs no extra pass.
    """
    specs = {name: TensorSpec(tensors[name].dtype, tuple(tensors[name].shape)) for name in file_order({n: t.dtype for n, t in tensors.items()})}
    return stream_safetensors(path, specs, (tensors[name] for name in specs), metadata)


@functools.cache
def _dtype_rank() -> dict[torch.dtype, int]:
    """The safetensors library's order of dtypes in a file, probed from the library itself (one tiny tensor per dtype)."""
    probe = {f"t{i:02d}": torch.zeros(1, dtype=dtype) for i, dtype in enumerate(_DTYPES)}
    data = save(probe)
    (length,) = struct.unpack("<Q", data[:8])
    order = [name for name in json.loads(data[8 : 8 + length]) if name != "__metadata__"]
    return {probe[name].dtype: rank for rank, name in enumerate(order)}


def file_order(dtypes: Mapping[str, torch.dtype]) -> list[str]:
    """Tensor names in the order `safetensors.torch.save_file` lays them out (by dtype, then name), so our files equal its byte for byte."""
    rank = _dtype_rank()
    return sorted(dtypes, key=lambda name: (rank[dtypes[name]], name))


@dataclass(frozen=True)
class TensorSpec:
    """What a safetensors header says of one tensor: its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def stream_safetensors(
    path: str | os.PathLike, specs: Mapping[str, TensorSpec], tensors: Iterable[torch.Tensor], metadata: Mapping[str, str] | None = None,
) -> FileDigest:
    """Write a safetensors file whose header is `specs` from `tensors`, produced one at a time in the same order.

    For tensors that do not exist all at once (assembled from shards, cast as they go): the
    header is written first, from `specs`, in their order (`file_order` gives the library's);
    each tensor must match its spec (else ValueError, and the caller's staging directory holds
    a partial file it removes).
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, spec in specs.items():
        if spec.dtype not in _DTYPES:
            raise TypeError(f"tensor '{name}' has dtype {spec.dtype}, which safetensors cannot store")
        header[name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with StreamingFileWriter(path) as writer:
        writer.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for (name, spec), tensor in zip(specs.items(), tensors, strict=True):
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{path}: tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, but the header says {spec.dtype} {spec.shape}")
            if tensor.numel():
                writer.write(tensor_bytes(tensor))
    return writer.digest


#: Bits per element of every safetensors dtype.
_DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32,
    "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}
#: The safetensors library's own bound on the JSON header.
MAX_HEADER_BYTES = 100_000_000


def check_safetensors_header(path: str | os.PathLike, data: memoryview | None = None) -> dict[str, dict[str, object]]:
    """Validate a safetensors file's header against the file itself; return the tensor entries.

    `data`, when given, is the whole file already in memory (see `tensors_from_buffer`);
    it is checked instead of reading `path`, which then only names the file in errors.

    Checks, reading only the header: the 8-byte length is within the file and below 100 MB;
    the header is a JSON object; every tensor has a known dtype, a shape of non-negative
    ints and `data_offsets` whose byte length equals shape x dtype size; and the tensors,
    sorted by offset, tile the data section exactly (no gaps, no overlaps, nothing past the
    end of the file). Raises `CorruptCheckpointError` naming the file and the first problem.
    """
    path = Path(path)
    size = path.stat().st_size if data is None else len(data)

    def bad(reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(path, f"invalid safetensors header: {reason}")

    if size < 8:
        raise bad(f"the file is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") if data is None else contextlib.nullcontext() as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8) if fh is not None else data[:8])
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header length {header_len} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte limit")
        raw = fh.read(header_len) if fh is not None else bytes(data[8 : 8 + header_len])
    try:
        header = json.loads(raw, parse_constant=refuse_constant)
    except RecursionError as err:
        raise bad("not JSON a safetensors writer produces (nested too deeply)") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
        raise bad(f"not JSON ({err})") from err
    if not isinstance(header, dict):
        raise bad("not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad(f"__metadata__ is {metadata!r:.80}; expected an object of strings")
    data_size = size - 8 - header_len
    spans = []
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPE_BITS:
            raise bad(f"tensor {name!r:.200} has no known dtype ({entry.get('dtype') if isinstance(entry, dict) else entry!r:.80})")
        if entry["dtype"] not in _TORCH_DTYPES:
            raise bad(f"tensor {name!r:.200} has dtype {entry['dtype']}, which torch {torch.__version__} cannot hold")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape):
            raise bad(f"tensor {name!r:.200} has shape {shape!r:.80}; expected a list of non-negative 64-bit integers")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1] < 2**63
        ):
            raise bad(f"tensor {name!r:.200} has data_offsets {offsets!r:.80}; expected [begin, end] with 0 <= begin <= end")
        numel = 1
        for dim in shape:
            numel *= dim
        expected_bits = numel * _DTYPE_BITS[entry["dtype"]]
        if expected_bits != (offsets[1] - offsets[0]) * 8:
            raise bad(
                f"tensor {name!r} ({entry['dtype']} {shape}) needs {expected_bits / 8:g} bytes but data_offsets span "
                f"{offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise bad(f"tensor {name!r} at bytes [{begin}, {end}) {what}")
        position = end
    if position != data_size:
        raise bad(f"tensors cover {position} bytes of data but the file holds {data_size} after the header (truncated or padded)")
    return tensors


def tensors_from_buffer(path: str | os.PathLike, data: memoryview) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file already read into memory (`data`), as views of it, no copy.

    The header is validated first (`check_safetensors_header`). A tensor whose offset is not
    aligned to its element size is copied out instead of viewed. Returns None when the file
    holds a dtype torch cannot view (the caller then reads it with the safetensors library).
    """
    entries = check_safetensors_header(path, data)
    if any(entry["dtype"] not in _TORCH_DTYPES for entry in entries.values()):
        return None
    (header_len,) = struct.unpack("<Q", data[:8])
    raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    base = 8 + header_len
    tensors = {}
    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        dtype = _TORCH_DTYPES[entry["dtype"]]
        piece = raw[base + begin : base + end]
        if (base + begin) % dtype.itemsize:
            piece = piece.clone()
        tensors[name] = piece.view(dtype).reshape(entry["shape"])
    return tensors
