"""A tree of tensors and JSON values, stored as one safetensors file + one JSON document, never pickle.

Per-rank state whose shape only its owner knows (a DeepSpeed ZeRO optimizer partition, an
RL loop's buffered rollouts) is a nest of dicts, lists and tuples with tensors at some
leaves. `split` moves every tensor out into a flat `{path: tensor}` mapping (what
safetensors stores) and returns the rest as JSON that refers to them by path; `join` puts
them back. Dict keys keep their type (str or int) and tuples stay tuples, so
`join(*split(x)) == x` for everything `split` accepts; anything else is refused, naming its
path, before anything is written.

```python
structure, tensors = split({"step": 6, "batch": [{"ids": torch.ones(2, 3)}]}, "rollout_state")
# structure == {"dict": [["step", 6], ["batch", [{"dict": [["ids", {"tensor": "rollout_state.batch.0.ids"}]]}]]]}
assert join(structure, tensors)["batch"][0]["ids"].shape == (2, 3)
```
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointSaveError


def split(
    value: Any, root: str, *, adapt: Callable[[Any], Any] | None = None, unsupported_hint: str = "keep only tensors, numbers, strings, "
    "booleans, None, lists, tuples and dicts with str or int keys there",
) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON structure, {path: tensor}) for `value`; tensors are referenced as they are (detached, not copied).

    Args:
        root: names the value in paths and errors (e.g. `rollout_state`).
        adapt: applied to each value before it is encoded (e.g. an enum to its value).
        unsupported_hint: what an error about an unsupported value tells the user to do.

    Raises:
        CheckpointSaveError: a value that is neither a tensor nor JSON (naming its path).
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(item: Any, path: str) -> Any:
        if adapt is not None:
            item = adapt(item)
        if isinstance(item, torch.Tensor):
            tensors[path] = item.detach()
            return {"tensor": path}
        if isinstance(item, Mapping):
            bad = [key for key in item if not isinstance(key, (str, int)) or isinstance(key, bool)]
            if bad:
                raise CheckpointSaveError(f"{path} has the key {bad[0]!r} ({type(bad[0]).__name__}); only str and int keys can be saved")
            return {"dict": [[key, encode(element, f"{path}.{key}")] for key, element in item.items()]}
        if isinstance(item, tuple):
            return {"tuple": [encode(element, f"{path}.{i}") for i, element in enumerate(item)]}
        if isinstance(item, list):
            return [encode(element, f"{path}.{i}") for i, element in enumerate(item)]
        if item is None or isinstance(item, (str, int, float, bool)):
            return item
        raise CheckpointSaveError(f"{path} holds a {type(item).__name__}, which hf_rl_ckpt stores only as a tensor or JSON (never pickle); {unsupported_hint}")

    return encode(value, root), tensors


def join(structure: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The value `split` took apart."""
    if isinstance(structure, list):
        return [join(item, tensors) for item in structure]
    if isinstance(structure, dict):
        if "tensor" in structure:
            return tensors[structure["tensor"]]
        if "tuple" in structure:
            return tuple(join(item, tensors) for item in structure["tuple"])
        return {key: join(item, tensors) for key, item in structure["dict"]}
    return structure
