"""Virtual-image reads through two overlays vs a raw mmap read of the same bytes (DESIGN.md section 7).

The volume (see ``conftest.read_image``) serves a quarter of its regions from the top overlay, a
quarter from the older overlay and half from the base. Warm reads: page cache and verified bitmaps
warm, reading into one page-aligned buffer. Baselines read the same offsets of a page-cached plain
file into the same kind of buffer; the report compares against the fastest of them.

The plain file of the baselines is written with ``write()``, which leaves large folios in the page
cache; the volume fills its files through mappings, which leaves 4 KiB folios. The diagnostic
``mmap_small_folios`` reads a plain file filled the volume's way, to show how much of a gap is that.
``core_stack`` reads through the compiled read stack without the ``Volume`` wrapper, to show the
wrapper's per-call cost.

Cold reads (first read after open, which hashes every region against its checksum) are measured
apart: each round opens the volume afresh, and the baseline maps the plain file afresh, so both pay
the page-table faults of a new mapping and the difference is mostly the verification.
"""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from _support import MiB, PlainMap, ReadImage, interleaved, read_all, record
from overlaycache import Volume

SEQ = 1 << 20
RND = 64 << 10
WARM_ROUNDS = 5  # per pass
COLD_ROUNDS = 2  # per pass

BASELINES = ["mmap_memoryview", "mmap_slice", "os_preadv"]
WARM_VARIANTS = ["overlaycache", "core_stack", *BASELINES, "mmap_small_folios"]


def _runner(variant: str, vol: Volume, plain: PlainMap, small: PlainMap,
            buf: mmap.mmap) -> Callable[[list[int]], None]:
    """A loop reading each offset into ``buf``; each variant's loop is written out (no extra call)."""
    n = len(buf)
    if variant == "overlaycache":
        readinto = vol.readinto

        def run(offsets: list[int]) -> None:
            for off in offsets:
                readinto(off, buf)

    elif variant == "core_stack":
        # Diagnostic: the compiled Stack without the Volume wrapper (shows the Python overhead).
        stack_readinto = vol._layers.live.readinto

        def run(offsets: list[int]) -> None:
            for off in offsets:
                stack_readinto(off, buf)

    elif variant in ("mmap_memoryview", "mmap_small_folios"):
        src = small.view if variant == "mmap_small_folios" else plain.view

        def run(offsets: list[int]) -> None:
            with memoryview(buf) as dst:
                for off in offsets:
                    dst[:] = src[off : off + n]

    elif variant == "mmap_slice":
        mm = plain.mm

        def run(offsets: list[int]) -> None:
            for off in offsets:
                buf[:] = mm[off : off + n]

    elif variant == "os_preadv":
        fd = plain.fd
        bufs = [buf]
        preadv = os.preadv

        def run(offsets: list[int]) -> None:
            for off in offsets:
                preadv(fd, bufs, off)

    else:  # pragma: no cover
        raise ValueError(variant)
    return run


def _role(variant: str) -> str:
    if variant == "overlaycache":
        return "ours"
    return "baseline" if variant in BASELINES else "diagnostic"


def _check(run: Callable[[list[int]], None], offsets: list[int], buf: mmap.mmap, expected: bytes) -> None:
    n = len(buf)
    for off in offsets[:: max(1, len(offsets) // 32)]:
        buf.seek(0)
        buf.write(b"\xa5" * n)
        run([off])
        assert buf[:] == expected[off : off + n], f"bytes at {off} differ"


@pytest.mark.parametrize("pass_,variant", interleaved(WARM_VARIANTS))
def test_read_seq_1MiB(
    benchmark: Any, pass_: int, variant: str, read_image: ReadImage, ro_volume: Volume, plain_map: PlainMap,
    plain_small_map: PlainMap, aligned: Callable[[int], mmap.mmap],
) -> None:
    """1 MiB sequential reads walking the whole volume (256 reads of 1 MiB per round)."""
    buf = aligned(SEQ)
    offsets = list(range(0, read_image.size, SEQ))
    run = _runner(variant, ro_volume, plain_map, plain_small_map, buf)
    record(benchmark, "read_seq_1MiB", _role(variant), variant, nbytes=read_image.size, target=0.75,
           note="warm: page cache + verified bitmaps")
    benchmark.pedantic(run, args=(offsets,), rounds=WARM_ROUNDS, warmup_rounds=1)
    _check(run, offsets, buf, read_image.expected)


@pytest.mark.parametrize("pass_,variant", interleaved(WARM_VARIANTS))
def test_read_random_64KiB(
    benchmark: Any, pass_: int, variant: str, read_image: ReadImage, ro_volume: Volume, plain_map: PlainMap,
    plain_small_map: PlainMap, aligned: Callable[[int], mmap.mmap],
) -> None:
    """64 KiB reads at 64 KiB-aligned pseudo-random offsets (a fixed sequence, one volume's worth)."""
    buf = aligned(RND)
    rng = random.Random(7)
    count = read_image.size // RND
    offsets = [rng.randrange(count) * RND for _ in range(count)]
    run = _runner(variant, ro_volume, plain_map, plain_small_map, buf)
    record(benchmark, "read_random_64KiB", _role(variant), variant, nbytes=count * RND, target=0.6,
           note="target 0.6 (brief); DESIGN.md section 7 says 0.75", reads_per_round=count)
    benchmark.pedantic(run, args=(offsets,), rounds=WARM_ROUNDS, warmup_rounds=1)
    _check(run, offsets, buf, read_image.expected)


class _FreshVolume:
    """The volume opened anew (read-only): its verified bitmaps are empty, its mappings untouched."""

    def __init__(self, path: str) -> None:
        self.vol = Volume.open(path, readonly=True)

    def read_all(self, buf: mmap.mmap, size: int) -> None:
        readinto = self.vol.readinto
        for off in range(0, size, len(buf)):
            readinto(off, buf)

    def close(self) -> None:
        self.vol.close()


class _FreshMap:
    """The plain file mapped anew."""

    def __init__(self, fd: int, size: int) -> None:
        self.mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        self.view = memoryview(self.mm)

    def read_all(self, buf: mmap.mmap, size: int) -> None:
        src, n = self.view, len(buf)
        with memoryview(buf) as dst:
            for off in range(0, size, n):
                dst[:] = src[off : off + n]

    def close(self) -> None:
        self.view.release()
        self.mm.close()


@pytest.mark.parametrize("pass_,variant", interleaved(["overlaycache", "mmap_memoryview"]))
def test_read_cold_seq_1MiB(
    benchmark: Any, pass_: int, variant: str, read_image: ReadImage, ro_volume: Volume, plain_map: PlainMap,
    aligned: Callable[[int], mmap.mmap],
) -> None:
    """First sequential read after open (hashes every region once), page cache warm.

    The volume is opened afresh each round (read-only, outside the timing); the baseline maps the
    plain file afresh each round, so both pay the first-touch page faults of a new mapping.
    """
    buf = aligned(SEQ)
    size = read_image.size
    record(benchmark, "read_cold_seq_1MiB", "ours" if variant == "overlaycache" else "baseline", variant,
           nbytes=size, note="first read after open: verifies mmh3 of each region; page cache warm")
    opened: list[_FreshVolume | _FreshMap] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        fresh: _FreshVolume | _FreshMap
        if variant == "overlaycache":
            fresh = _FreshVolume(read_image.volume_path)
        else:
            fresh = _FreshMap(plain_map.fd, size)
        opened.append(fresh)
        return (fresh,), {}

    def target(fresh: _FreshVolume | _FreshMap) -> None:
        fresh.read_all(buf, size)

    def teardown(fresh: _FreshVolume | _FreshMap) -> None:
        opened.remove(fresh)
        fresh.close()

    try:
        benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=COLD_ROUNDS)
    finally:
        # pytest-benchmark skips teardown when benchmarks are disabled: close what is left.
        for fresh in opened:
            fresh.close()
    with Volume.open(read_image.volume_path, readonly=True) as vol:
        read_all(vol.readinto, buf, size, read_image.expected)


def test_read_layout(read_image: ReadImage, ro_volume: Volume) -> None:
    """The read volume serves half its regions from two overlays and half from the base."""
    n = read_image.size // read_image.region_size
    counts = read_image.layer_regions
    assert len(counts) >= 3 and counts[-1] == n - 2 * (n // 4)
    assert sum(1 for c in counts[:-1] if c) >= 2
    assert sum(1 for ov in ro_volume._layers.overlays if ov.present.any()) >= 2
    assert MiB == SEQ
