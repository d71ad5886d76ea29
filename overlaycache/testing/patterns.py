"""Data patterns for tests: random writes mirrored in a bytes model, and the one-character-per-region
view of an image used by the worked examples."""

from __future__ import annotations

import random
from typing import Any

__all__ = ["random_writes", "region_chars"]


def region_chars(img: Any, region_size: int, n: int = 8) -> str:
    """One character per region, as the worked examples show them: each region is one repeated byte."""
    out = []
    for r in range(n):
        data = img.read(r * region_size, region_size)
        assert data == data[:1] * region_size, f"region {r} is not uniform"
        out.append(chr(data[0]))
    return " ".join(out)


def random_writes(vol: Any, model: bytearray, rnd: random.Random, writes: int, max_len: int) -> None:
    """``writes`` writes of random bytes at random offsets (1 to ``max_len`` bytes), mirrored in ``model``."""
    for _ in range(writes):
        off = rnd.randrange(vol.size)
        n = rnd.randrange(1, min(max_len, vol.size - off) + 1)
        data = rnd.randbytes(n)
        vol.write(off, data)
        model[off : off + n] = data
