"""A streaming safetensors writer.

`safetensors.torch.save_file` serialises the whole file into one bytes object first, a
second copy of the weights in memory. This writer emits the same format tensor by tensor
(a device tensor is copied to the host one at a time), hashing as it writes, so the extra
memory of a save stays near one tensor and the manifest needs no second read. Reading
uses the safetensors library itself (memory-mapped).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from ..atomic import HashingWriter

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


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
) -> tuple[int, str]:
    """Write `tensors` as a safetensors file, fsync it, and return (size, sha256)."""
    header: dict[str, object] = {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(Path(path), "wb") as fh:
        writer = HashingWriter(fh)
        writer.write(struct.pack("<Q", len(header_bytes)))
        writer.write(header_bytes)
        for tensor in tensors.values():
            if tensor.numel():
                writer.write(tensor_bytes(tensor))
        fh.flush()
        os.fsync(fh.fileno())
    return writer.size, writer.sha256
