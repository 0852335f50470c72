"""JSON for the non-tensor parts of training state, keeping what plain JSON would lose.

Optimizer param groups hold tuples (`betas`), None and sometimes small tensors (a
capturable lr); schedulers hold floats that must round-trip bit-exactly. Tuples and
tensors are tagged so that `decode(encode(x)) == x`, and anything else that JSON cannot
hold is refused with the key path named, instead of being pickled.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..errors import CheckpointError

_TUPLE = "__tuple__"
_TENSOR = "__tensor__"


def encode(value: Any, where: str = "state") -> Any:
    """A JSON-able copy of `value`; raises naming `where.<key>` for unsupported objects."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}; only str/int keys can be saved")
            out[str(key) if isinstance(key, str) else f"__int__{key}"] = encode(item, f"{where}.{key}")
        return out
    if isinstance(value, torch.Tensor):
        host = value.detach().cpu()
        return {_TENSOR: {"dtype": str(host.dtype).removeprefix("torch."), "shape": list(host.shape), "data": host.reshape(-1).tolist()}}
    raise CheckpointError(
        f"{where} holds a {type(value).__name__}, which cannot be saved without pickle; "
        "keep only numbers, strings, lists, dicts and tensors in this state"
    )


def decode(value: Any) -> Any:
    """Inverse of `encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(decode(v) for v in value[_TUPLE])
        if set(value) == {_TENSOR}:
            spec = value[_TENSOR]
            return torch.tensor(spec["data"], dtype=getattr(torch, spec["dtype"])).reshape(spec["shape"])
        return {(int(k[7:]) if k.startswith("__int__") else k): decode(v) for k, v in value.items()}
    return value


def dumps(value: Any, where: str = "state") -> bytes:
    return (json.dumps(encode(value, where), indent=1) + "\n").encode()


def loads(data: bytes | str) -> Any:
    return decode(json.loads(data))
