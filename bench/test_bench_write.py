"""Writes into the top overlay vs raw mmap writes of the same bytes into a plain file.

The volume and the plain file are 64 MiB (64 KiB regions), and every page of both overlay slots and
of the plain file was written before, so no round pays for allocating file blocks. Each round writes
the same bytes that are already there, so the image stays equal to the source and can be checked.

Two states of the volume are measured, because writes take different paths in them:

``overlaycache``
    Steady state between flushes: every region written is already dirty (written since the last
    commit), so the write patches its current slot in place and re-hashes the region.
``overlaycache_after_flush``
    Every region clean (each round starts after a flush, outside the timing): the first write to a
    region goes to its other slot (shadow paging); a partial write first copies the rest of the
    region from the current version.

The after-flush measurements form their own pairs (``..._after_flush``) whose baseline writes into the
plain mapping right after an ``msync``, so that both sides pay the write faults of pages that were
just written back. The plain file is written with ``write()``, which gives it large page-cache
folios (one fault maps many pages); the diagnostic ``mmap_small_folios_after_msync`` writes into a
second plain file that was filled through its mapping, as the volume fills its files, and so has
4 KiB folios and one write fault per page.

Flush cost is measured apart: 16 MiB of dirty regions made durable, vs ``msync`` + ``fsync`` of the
same bytes written into the plain mapping.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mmh3
import pytest

from _support import MiB, fill_through_map, interleaved, pattern, record
from overlaycache import Volume

SIZE = 64 * MiB
REGION = 64 << 10
BIG = 1 << 20
SMALL = 4 << 10
FLUSH_BYTES = 16 * MiB
ROUNDS = 4  # per pass


@dataclass
class WriteEnv:
    vol: Volume
    source: memoryview
    fd: int
    mm: mmap.mmap
    view: memoryview
    #: a second plain file filled through its mapping, as the volume fills its files (diagnostic)
    small_fd: int
    small_mm: mmap.mmap
    small_view: memoryview


def _map(path: str) -> tuple[int, mmap.mmap, memoryview]:
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, SIZE)
    return fd, mm, memoryview(mm)


@pytest.fixture(scope="module")
def write_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WriteEnv]:
    """A writable 64 MiB volume and plain mapped file, both slots of every region allocated."""
    root = tmp_path_factory.mktemp("write")
    data = pattern(b"write", SIZE)
    source = memoryview(data)
    vol = Volume.create(str(root / "volume"), SIZE, region_size=REGION)
    plain = str(root / "plain.img")
    with open(plain, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    small = str(root / "plain-small-folios.img")
    fill_through_map(small, data)
    fd, mm, view = _map(plain)
    sfd, smm, sview = _map(small)
    try:
        for _ in range(2):  # slot 0, then (after the commit) slot 1
            vol.write(0, source)
            vol.flush()
        yield WriteEnv(vol, source, fd, mm, view, sfd, smm, sview)
    finally:
        for v, m, d in ((view, mm, fd), (sview, smm, sfd)):
            v.release()
            m.close()
            os.close(d)
        vol.close()
        source.release()
        shutil.rmtree(root, ignore_errors=True)


def _writer(variant: str, env: WriteEnv, n: int) -> Callable[[list[int]], None]:
    """A loop writing ``source[off:off+n]`` at each offset; each variant's loop is written out."""
    src = env.source
    if variant.startswith("overlaycache"):
        write = env.vol.write

        def run(offsets: list[int]) -> None:
            for off in offsets:
                write(off, src[off : off + n])

    elif variant in ("mmap_memoryview", "mmap_memoryview_after_msync", "mmap_small_folios_after_msync"):
        dst = env.small_view if "small_folios" in variant else env.view

        def run(offsets: list[int]) -> None:
            for off in offsets:
                dst[off : off + n] = src[off : off + n]

    elif variant == "mmap_memoryview+mmh3":
        # Diagnostic: the raw write plus one mmh3 of each whole region touched, the least a design
        # that checksums on every write can cost.
        dst = env.view
        digest = mmh3.mmh3_x64_128_digest

        def run(offsets: list[int]) -> None:
            for off in offsets:
                dst[off : off + n] = src[off : off + n]
                r0 = off - off % REGION
                for r in range(r0, off + n, REGION):
                    digest(src[r : r + REGION])

    else:  # pragma: no cover
        raise ValueError(variant)
    return run


def _role(variant: str) -> str:
    if variant.startswith("overlaycache"):
        return "ours"
    return "diagnostic" if "+" in variant or "small_folios" in variant else "baseline"


def _bench_writes(benchmark: Any, env: WriteEnv, variant: str, pair: str, n: int, offsets: list[int],
                  note: str) -> None:
    run = _writer(variant, env, n)
    after_flush = variant.endswith(("_after_flush", "_after_msync"))
    if after_flush:
        pair += "_after_flush"
    record(benchmark, pair, _role(variant), variant, nbytes=n * len(offsets), note=note,
           writes_per_round=len(offsets))
    env.vol.flush()
    if variant == "overlaycache_after_flush":
        benchmark.pedantic(run, args=(offsets,), setup=env.vol.flush, rounds=ROUNDS, warmup_rounds=1)
    elif variant.endswith("_after_msync"):
        # Same state as the volume after a flush: pages written back, so the next write to each
        # page faults to make it writable again.
        mm = env.small_mm if "small_folios" in variant else env.mm
        benchmark.pedantic(run, args=(offsets,), setup=mm.flush, rounds=ROUNDS, warmup_rounds=1)
    else:
        benchmark.pedantic(run, args=(offsets,), rounds=ROUNDS, warmup_rounds=1)
    env.vol.flush()
    assert env.vol.read(0, SIZE) == env.source, "volume image differs from what was written"
    assert env.view == env.source and env.small_view == env.source, "plain file differs from the source"


VARIANTS = [
    "overlaycache", "mmap_memoryview", "mmap_memoryview+mmh3",
    "overlaycache_after_flush", "mmap_memoryview_after_msync", "mmap_small_folios_after_msync",
]


@pytest.mark.parametrize("pass_,variant", interleaved(VARIANTS))
def test_write_1MiB_aligned(benchmark: Any, pass_: int, variant: str, write_env: WriteEnv) -> None:
    """1 MiB writes of whole regions, walking the volume (64 writes per round)."""
    offsets = list(range(0, SIZE, BIG))
    _bench_writes(benchmark, write_env, variant, "write_1MiB_aligned", BIG, offsets,
                  "16 whole regions per write")


def _small_offsets() -> list[int]:
    """One 4 KiB write per region, regions in a shuffled order, at an unaligned offset inside it."""
    rng = random.Random(11)
    regions = list(range(SIZE // REGION))
    rng.shuffle(regions)
    out = []
    for r in regions:
        intra = rng.randrange(1, REGION - SMALL)
        if intra % SMALL == 0:
            intra += 1
        out.append(r * REGION + intra)
    return out


@pytest.mark.parametrize("pass_,variant", interleaved(VARIANTS))
def test_write_4KiB_unaligned(benchmark: Any, pass_: int, variant: str, write_env: WriteEnv) -> None:
    """4 KiB writes at unaligned offsets, one per region per round (1024 writes per round)."""
    _bench_writes(benchmark, write_env, variant, "write_4KiB_unaligned", SMALL, _small_offsets(),
                  "partial region writes")


@pytest.mark.parametrize("pass_,variant", interleaved(["overlaycache", "mmap_msync"]))
def test_flush_16MiB(benchmark: Any, pass_: int, variant: str, write_env: WriteEnv) -> None:
    """Making 16 MiB of freshly written whole regions durable (the writes are outside the timing)."""
    env = write_env
    offsets = list(range(0, FLUSH_BYTES, BIG))
    src = env.source
    env.vol.flush()
    if variant == "overlaycache":
        write = env.vol.write

        def setup() -> None:
            for off in offsets:
                write(off, src[off : off + BIG])

        target = env.vol.flush
    else:
        dst = env.view

        def setup() -> None:
            for off in offsets:
                dst[off : off + BIG] = src[off : off + BIG]

        def target() -> None:
            env.mm.flush()
            os.fsync(env.fd)

    record(benchmark, "flush_16MiB", "ours" if variant == "overlaycache" else "baseline", variant,
           nbytes=FLUSH_BYTES, note="durability of 256 dirty regions")
    benchmark.pedantic(target, setup=setup, rounds=2, warmup_rounds=1)
    assert not env.vol._layers.overlays[-1].regions_dirty
    assert env.vol.read(0, FLUSH_BYTES) == src[:FLUSH_BYTES]
