"""File digests: how a manifest proves that a file holds the bytes that were written.

A manifest entry (in `training_info.json`, a weight-sync version's `weight_sync.json`, a
bundle's file list) is `{"size": <bytes>, "<algorithm>": "<hex digest>"}`: the key names the
algorithm, so every reader knows how to check it. New entries record XXH3-128 (`RECORDED`):
it catches what a checksum is for (bit flips, truncation, a file swapped for another) as
surely as sha256, at about 8 GB/s per core against sha256's 1.3-1.7, which made sha256 the
largest cost of a verified resume. Neither proves a file was not forged: whoever can rewrite
a file can rewrite the manifest beside it. Entries written before format 2 hold "sha256" and
still verify. sha256 is computed where a consumer needs that algorithm: the Hub's LFS object ids.

```python
>>> digest = digest_bytes(b"weights")
>>> digest.entry()
{'size': 7, 'xxh3_128': 'bdbda1eb6e05adc4800d98e5524fefbc'}
>>> recorded_digest({"size": 7, "sha256": "7b2e..."})   # an entry written before format 2
('sha256', '7b2e...')
```
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import xxhash


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


#: The algorithm new manifest entries record.
RECORDED = "xxh3_128"
#: Every algorithm a manifest entry may name, in the order a reader prefers them (fastest first).
ALGORITHMS: dict[str, Callable[[], Hasher]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


class FileDigest(NamedTuple):
    """Size and `RECORDED` digest of a file, computed while it was written."""

    size: int
    hexdigest: str

    def entry(self) -> dict[str, Any]:
        """The manifest entry for this file."""
        return {"size": self.size, RECORDED: self.hexdigest}


#: The digests of the files a writer wrote, by path relative to the folder it wrote into.
Digests = dict[str, FileDigest]


def new_hasher(algorithm: str = RECORDED) -> Hasher:
    return ALGORITHMS[algorithm]()


def hexdigest(data: bytes | memoryview, algorithm: str = RECORDED) -> str:
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def digest_bytes(data: bytes | memoryview) -> FileDigest:
    return FileDigest(len(memoryview(data).cast("B")), hexdigest(data))


def recorded_digest(entry: Mapping[str, Any]) -> tuple[str, str] | None:
    """(algorithm, hex digest) that a manifest entry records, the fastest known one first; None when it names none."""
    for algorithm in ALGORITHMS:
        value = entry.get(algorithm)
        if isinstance(value, str):
            return algorithm, value
    return None
