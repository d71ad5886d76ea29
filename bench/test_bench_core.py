"""Kernels of the compiled core: batch resolve over 16M regions, and region checksums.

``resolve`` maps each region to the newest layer bitmap holding it (DESIGN.md section 7: at least
500M regions/s over 16M regions). Its baseline is the floor of any batch lookup that returns one byte
per region: allocating the zeroed output (``bytearray(n)``). Bitmaps are about half set, either at
random (the worst case: every 8-region group needs work in every layer) or in runs (clustered
writes, the usual case).

``checksum`` is what a cold read or a write pays per region; its baseline is the ``mmh3`` package
(``mmh3_x64_128_digest`` on a memoryview, no copy) on the same bytes.
"""

from __future__ import annotations

import random
from typing import Any

import mmh3
import pytest

from _support import MiB, interleaved, pattern, record
from overlaycache._impl import core

NREGIONS = 16 * 2**20
RESOLVE_ROUNDS = 4  # per pass


def _random_bitmap(seed: int) -> Any:
    bm = core.Bitmap(NREGIONS)
    bm.load(pattern(b"resolve-%d" % seed, NREGIONS // 8))
    return bm


def _runs_bitmap(seed: int, mean_run: int = 512) -> Any:
    """Alternating clear/set runs of exponential length (mean ``mean_run`` regions)."""
    bm = core.Bitmap(NREGIONS)
    rng = random.Random(seed)
    pos, on = rng.randrange(mean_run), False
    while pos < NREGIONS:
        length = int(rng.expovariate(1 / mean_run)) + 1
        if on:
            bm.set_range(pos, min(NREGIONS, pos + length))
        pos += length
        on = not on
    return bm


@pytest.fixture(scope="module")
def bitmaps() -> dict[str, list[Any]]:
    """Three 16M-bit bitmaps per pattern, about half of the bits set."""
    out = {
        "random": [_random_bitmap(i) for i in range(3)],
        "runs": [_runs_bitmap(i) for i in range(3)],
    }
    for bms in out.values():
        for bm in bms:
            assert 0.45 < bm.count() / NREGIONS < 0.55
    return out


def _check_resolve(bms: list[Any], first: int, out: Any) -> None:
    rng = random.Random(3)
    count = len(out)
    for i in [0, count - 1, *(rng.randrange(count) for _ in range(2000))]:
        r = first + i
        want = next((l for l, bm in enumerate(bms) if bm.test(r)), len(bms))
        assert out[i] == want, f"region {r}: resolve says layer {out[i]}, bitmaps say {want}"


#: variant -> (bitmap pattern, number of bitmaps, first region); None is the baseline
RESOLVE_VARIANTS: dict[str, tuple[str, int, int] | None] = {
    "random-2": ("random", 2, 0),
    "random-3": ("random", 3, 0),
    "runs-2": ("runs", 2, 0),
    "runs-3": ("runs", 3, 0),
    "random-3-unaligned": ("random", 3, 1),
    "bytearray_alloc": None,
}


@pytest.mark.parametrize("pass_,variant", interleaved(list(RESOLVE_VARIANTS)))
def test_resolve_16M(benchmark: Any, bitmaps: dict[str, list[Any]], pass_: int, variant: str) -> None:
    """``core.resolve`` over 16M regions with 2 or 3 layer bitmaps, and the allocation floor."""
    spec = RESOLVE_VARIANTS[variant]
    if spec is None:
        record(benchmark, "resolve_16M", "baseline", variant, items=NREGIONS,
               note="allocating the zeroed one-byte-per-region output")
        out = benchmark.pedantic(bytearray, args=(NREGIONS,), rounds=RESOLVE_ROUNDS, warmup_rounds=1)
        assert len(out) == NREGIONS
        return
    pattern_name, nmaps, first = spec
    bms = bitmaps[pattern_name][:nmaps]
    count = NREGIONS - first
    record(benchmark, "resolve_16M", "ours", variant, items=count, target_rate=500e6,
           note="regions/s; first=1 shifts every 64-bit word" if first else "regions/s")
    out = benchmark.pedantic(core.resolve, args=(bms, first, count), rounds=RESOLVE_ROUNDS, warmup_rounds=1)
    _check_resolve(bms, first, out)


CSUM_BYTES = 64 * MiB
CSUM_REGION = 64 << 10


@pytest.fixture(scope="module")
def checksum_data() -> bytes:
    return pattern(b"checksum", CSUM_BYTES)


@pytest.mark.parametrize("pass_,variant", interleaved(["overlaycache", "mmh3_digest"]))
def test_checksum_64KiB(benchmark: Any, pass_: int, variant: str, checksum_data: bytes) -> None:
    """MurmurHash3 x64-128 of 64 MiB in 64 KiB regions (one call per region)."""
    view = memoryview(checksum_data)
    fn = core.checksum if variant == "overlaycache" else mmh3.mmh3_x64_128_digest
    pieces = [view[o : o + CSUM_REGION] for o in range(0, CSUM_BYTES, CSUM_REGION)]

    def run() -> list[bytes]:
        return [fn(p) for p in pieces]

    record(benchmark, "checksum_64KiB", "ours" if variant == "overlaycache" else "baseline", variant,
           nbytes=CSUM_BYTES, note="cost of a cold read or a write per region")
    sums = benchmark.pedantic(run, rounds=4, warmup_rounds=1)
    assert bytes(sums[5]) == mmh3.mmh3_x64_128_digest(pieces[5])
    for p in pieces:
        p.release()
    view.release()
