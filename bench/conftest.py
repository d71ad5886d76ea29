"""Shared fixtures of the benchmark suites, and the bookkeeping that pairs each run with its baseline.

Every suite in ``bench/`` measures overlaycache and a raw baseline doing the same work in the same
run, so that the result is a ratio (ours / baseline throughput) rather than an absolute number that
depends on the machine and on whatever else it runs. ``bench/report.py`` runs the suites and prints
the ratios.

Labels that pair each measurement with its baseline, and the interleaving of variants, are
described in ``_support.py``.

Rounds are few and fixed (``benchmark.pedantic``) to keep the whole run short on a 2-core machine
that other people use too; nothing here asserts on timing, only on the bytes read or written.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
from collections.abc import Callable, Iterator

import pytest

from _support import MiB, READ_REGION, READ_SIZE, PlainMap, ReadImage, fill_through_map, pattern, read_all
from overlaycache import Volume


@pytest.fixture
def aligned() -> Iterator[Callable[[int], mmap.mmap]]:
    """Factory of page-aligned anonymous buffers (``mmap(-1, n)``), closed after the test."""
    made: list[mmap.mmap] = []

    def make(n: int) -> mmap.mmap:
        buf = mmap.mmap(-1, n)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()


@pytest.fixture(scope="session")
def read_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadImage]:
    """Build the read volume: base filled, 25% of regions in overlay A, another 25% in overlay B.

    The volume is closed when this returns; :func:`ro_volume` opens it read-only. The files (about
    1 GiB) are deleted at the end of the session rather than left to pytest's temp-dir rotation.
    """
    root = tmp_path_factory.mktemp("read")
    size, rs = READ_SIZE, READ_REGION
    n = size // rs
    image = bytearray(pattern(b"base", size))
    vpath = str(root / "volume")
    with Volume.create(vpath, size, region_size=rs) as vol:
        vol.write(0, image)
        # merge_down() folds the oldest overlay into the base (pushing an empty overlay first when the
        # data sits in the only one); repeat until no overlay holds data.
        merges = 0
        while any(ov.present.any() for ov in vol._layers.overlays):
            vol.merge_down()
            merges += 1
            assert merges <= 2, "the base did not absorb the data"
        order = list(range(n))
        random.Random(20240501).shuffle(order)
        for tag, regions in ((b"overlay-a", order[: n // 4]), (b"overlay-b", order[n // 4 : n // 2])):
            data = pattern(tag, len(regions) * rs)
            for k, r in enumerate(sorted(regions)):
                piece = data[k * rs : (k + 1) * rs]
                vol.write(r * rs, piece)
                image[r * rs : (r + 1) * rs] = piece
            if tag == b"overlay-a":
                vol.local_snapshot("bench-a")
        vol.flush()
        holders = [ov for ov in vol._layers.overlays if ov.present.any()]
        assert len(holders) >= 2, "expected two overlays holding data"
        stack = vol._layers.live
        layer_regions = [0] * (len(vol._layers.overlays) + 1)
        for r in range(n):
            layer_regions[stack.locate(r)[0]] += 1
    assert layer_regions[-1] == n - 2 * (n // 4), layer_regions
    plain = str(root / "plain.img")
    with open(plain, "wb") as f:
        f.write(image)
    plain_small = str(root / "plain-small-folios.img")
    fill_through_map(plain_small, image)
    try:
        yield ReadImage(vpath, plain, plain_small, size, rs, bytes(image), layer_regions)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ro_volume(read_image: ReadImage) -> Iterator[Volume]:
    """The read volume opened read-only, page cache and per-layer verified bitmaps warm."""
    vol = Volume.open(read_image.volume_path, readonly=True)
    buf = mmap.mmap(-1, MiB)
    try:
        # First reads verify every region's checksum; later ones are the steady state measured.
        read_all(vol.readinto, buf, read_image.size, read_image.expected)
        yield vol
    finally:
        buf.close()
        vol.close()


def _open_plain(path: str, size: int) -> Iterator[PlainMap]:
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    view = memoryview(mm)
    try:
        buf = mmap.mmap(-1, MiB)
        bv = memoryview(buf)
        try:
            for off in range(0, size, MiB):
                bv[:] = view[off : off + MiB]
        finally:
            bv.release()
            buf.close()
        yield PlainMap(fd, mm, view)
    finally:
        view.release()
        mm.close()
        os.close(fd)


@pytest.fixture(scope="session")
def plain_map(read_image: ReadImage) -> Iterator[PlainMap]:
    """The same bytes as the volume in a plain file written with write(), mmap'd and page-cached."""
    yield from _open_plain(read_image.plain_path, read_image.size)


@pytest.fixture(scope="session")
def plain_small_map(read_image: ReadImage) -> Iterator[PlainMap]:
    """The same bytes in a plain file filled through a mapping (4 KiB folios, like the volume's)."""
    yield from _open_plain(read_image.plain_small_path, read_image.size)
