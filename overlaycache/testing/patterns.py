"""Data patterns for tests: random writes mirrored in a bytes model, and the one-character-per-region
view of an image used by the worked examples.

Standard library only; used by the unit suite (``tests/``) and the integration suite (``localstack/``).
"""

from __future__ import annotations

import random
from typing import Any, Protocol

__all__ = ["random_writes", "region_chars"]


class _Readable(Protocol):
    def read(self, offset: int, length: int, /) -> bytes: ...


class _Writable(Protocol):
    @property
    def size(self) -> int: ...

    def write(self, offset: int, data: Any, /) -> int: ...


def region_chars(img: _Readable, region_size: int, n: int = 8) -> str:
    """One character per region, as the worked examples show them: each region is one repeated byte."""
    out = []
    for r in range(n):
        data = img.read(r * region_size, region_size)
        assert data == data[:1] * region_size, f"region {r} is not uniform"
        out.append(chr(data[0]))
    return " ".join(out)


def random_writes(vol: _Writable, model: bytearray, rnd: random.Random, writes: int, max_len: int) -> None:
    """``writes`` writes of random bytes at random offsets (1 to ``max_len`` bytes), mirrored in ``model``."""
    for _ in range(writes):
        off = rnd.randrange(vol.size)
        n = rnd.randrange(1, min(max_len, vol.size - off) + 1)
        data = rnd.randbytes(n)
        vol.write(off, data)
        model[off : off + n] = data
