"""JSON for the non-tensor parts of training state, keeping what plain JSON would lose.

Optimizer param groups hold tuples (`betas`), None and sometimes small tensors (a
capturable lr); schedulers hold floats that must round-trip bit-exactly. Tuples and
tensors are tagged so that `decode(encode(x)) == x`, and anything else that JSON cannot
hold is refused with the key path named, instead of being pickled.

`plain` is the other direction, for what `training_info.json` records as plain JSON that
any reader can use (`metrics`, `extra_state`): numpy and tensor scalars become Python
numbers, and anything else that JSON cannot hold is refused before a save writes anything.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import CheckpointError, CheckpointSaveError

logger = logging.getLogger(__name__)

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


def plain(value: Any, where: str) -> Any:
    """`value` as plain JSON (a copy), naming `where` (e.g. `metrics['loss']`) in what it says.

    Numpy scalars, 0-d arrays and 0-d tensors (`np.float32(0.5)`, `torch.tensor(1.5)`) become
    Python numbers; tuples become lists. JSON has no NaN or Infinity (strict parsers refuse
    them), so a non-finite number is recorded as null, with a warning naming it, as
    JavaScript's `JSON.stringify` does. Anything else (a tensor with elements, a non-string
    key, an object) raises CheckpointSaveError naming the key.
    """
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0:
            raise CheckpointSaveError(
                f"{where} is of type {type(value).__name__} with shape {tuple(value.shape)}, which cannot be recorded as a JSON value; "
                "pass a number (.item()) or a list (.tolist())"
            )
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        logger.warning("%s is %s, which JSON cannot hold: recorded as null", where, value)
        return None
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CheckpointSaveError(f"{where} has the key {key!r} ({type(key).__name__}); JSON keys are strings, use str keys")
        return {key: plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise CheckpointSaveError(
        f"{where} is of type {type(value).__name__}, which cannot be recorded as JSON; "
        "keep only numbers, strings, booleans, None, lists and dicts there"
    )
