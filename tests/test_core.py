"""The core kernels, parametrized over the compiled core and the pure-Python reference."""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycache.errors import (
    InvalidArgumentError,
    InvalidBufferError,
    MediaError,
    OutOfRangeError,
    RegionUnavailableError,
    StaleStackError,
)
from overlaycache.testing.cores import IMPLEMENTATIONS


def _model_runs(bits: list[bool], start: int, stop: int, value: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i = start
    while i < stop:
        if bits[i] == value:
            j = i
            while j < stop and bits[j] == value:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=[m.IMPLEMENTATION for m in IMPLEMENTATIONS])
@settings(max_examples=60, deadline=None)
@given(
    nbits=st.integers(0, 300),
    ops=st.lists(
        st.tuples(st.sampled_from(["set", "clear", "set_range", "clear_range"]), st.integers(0, 299), st.integers(0, 300)),
        max_size=40,
    ),
    window=st.tuples(st.integers(0, 300), st.integers(0, 300)),
)
def test_bitmap_against_model(
    impl: ModuleType, nbits: int, ops: list[tuple[str, int, int]], window: tuple[int, int]
) -> None:
    bm = impl.Bitmap(nbits)
    model = [False] * nbits
    for op, a, b in ops:
        if op in ("set", "clear"):
            if a >= nbits:
                with pytest.raises(OutOfRangeError):
                    getattr(bm, op)(a)
                continue
            getattr(bm, op)(a)
            model[a] = op == "set"
        else:
            lo, hi = min(a, b), max(a, b)
            if hi > nbits:
                with pytest.raises(OutOfRangeError):
                    getattr(bm, op)(lo, hi)
                continue
            getattr(bm, op)(lo, hi)
            for i in range(lo, hi):
                model[i] = op == "set_range"
    assert [bm.test(i) for i in range(nbits)] == model
    lo, hi = min(window[0], nbits), min(max(window), nbits)
    lo = min(lo, hi)
    assert bm.count(lo, hi) == sum(model[lo:hi])
    assert bm.count() == sum(model)
    assert bm.runs(lo, hi) == _model_runs(model, lo, hi, True)
    assert bm.runs(lo, hi, value=False) == _model_runs(model, lo, hi, False)
    assert bm.any() == any(model)
    idx = [i for i in range(0, nbits, 3)]
    assert list(bm.test_many(idx)) == [int(model[i]) for i in idx]
    clone = impl.Bitmap(nbits)
    clone.load(bm.to_bytes())
    assert clone.runs() == bm.runs()
    assert bm.copy().runs() == bm.runs()


def test_bitmap_over_external_buffer(core: ModuleType) -> None:
    buf = bytearray(16)
    bm = core.Bitmap(100, buf)
    bm.set(0)
    bm.set(65)
    assert buf[0] == 1 and buf[8] == 2
    with pytest.raises(InvalidBufferError):
        core.Bitmap(200, bytearray(16))
    with pytest.raises(InvalidBufferError):
        core.Bitmap(8, bytes(8))
    with pytest.raises(InvalidArgumentError):
        core.Bitmap(-1)
    with pytest.raises(OutOfRangeError):
        bm.test_many([100])
    with pytest.raises(InvalidArgumentError):
        bm.test_many([-1])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=[m.IMPLEMENTATION for m in IMPLEMENTATIONS])
@settings(max_examples=60, deadline=None)
@given(
    nbits=st.integers(1, 400),
    layers=st.lists(st.lists(st.tuples(st.integers(0, 399), st.integers(0, 64)), max_size=6), max_size=5),
    data=st.data(),
)
def test_resolve_against_model(
    impl: ModuleType, nbits: int, layers: list[list[tuple[int, int]]], data: st.DataObject
) -> None:
    bitmaps = []
    for spans in layers:
        bm = impl.Bitmap(nbits)
        for start, length in spans:
            bm.set_range(min(start, nbits), min(start + length, nbits))
        bitmaps.append(bm)
    first = data.draw(st.integers(0, nbits))
    count = data.draw(st.integers(0, nbits - first))
    got = list(impl.resolve(bitmaps, first, count))
    want = []
    for r in range(first, first + count):
        want.append(next((i for i, b in enumerate(bitmaps) if b.test(r)), len(bitmaps)))
    assert got == want


def test_resolve_errors(core: ModuleType) -> None:
    a, b = core.Bitmap(10), core.Bitmap(5)
    with pytest.raises(OutOfRangeError):
        core.resolve([a, b], 0, 10)
    with pytest.raises(OutOfRangeError):
        core.resolve([a], -1, 2)
    with pytest.raises(InvalidArgumentError):
        core.resolve([a, "x"], 0, 1)
    assert list(core.resolve([], 3, 4)) == [0, 0, 0, 0]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 100, 4096, 65537])
def test_checksum_matches_mmh3(core: ModuleType, n: int) -> None:
    data = random.Random(n).randbytes(n)
    assert core.checksum(data) == mmh3.mmh3_x64_128_digest(data)
    assert core.checksum(memoryview(bytearray(data))) == mmh3.mmh3_x64_128_digest(data)


def test_checksum_rejects_non_buffers(core: ModuleType) -> None:
    with pytest.raises(InvalidBufferError):
        core.checksum("text")
    with pytest.raises(TypeError):  # also a TypeError, as the builtins raise
        core.checksum(12)


@pytest.fixture
def datafile_path() -> Iterator[str]:
    fd, path = tempfile.mkstemp()
    os.close(fd)
    yield path
    os.unlink(path)


def test_datafile_roundtrip_and_truncation(core: ModuleType, datafile_path: str) -> None:
    fd = os.open(datafile_path, os.O_RDWR)
    try:
        os.ftruncate(fd, 1 << 16)
        f = core.DataFile(fd, 1 << 16, True, datafile_path)
        f.write(100, b"hello")
        buf = bytearray(5)
        assert f.readinto(100, buf) == 5 and buf == b"hello"
        assert f.checksum(100, 5) == mmh3.mmh3_x64_128_digest(b"hello")
        g = core.DataFile(fd, 1 << 16, True, datafile_path)
        f.copy_to(100, g, 8000, 5)
        g.readinto(8000, buf)
        assert buf == b"hello"
        with pytest.raises(OutOfRangeError):
            f.readinto((1 << 16) - 2, buf)
        with pytest.raises(InvalidBufferError):
            f.readinto(0, b"read-only")
        f.sync()
        os.ftruncate(fd, 4096)
        with pytest.raises(MediaError) as info:
            f.readinto(8192, buf)
        assert info.value.path == datafile_path and isinstance(info.value, RegionUnavailableError)
        with pytest.raises(MediaError):
            f.write(8192, b"x")
        with pytest.raises(MediaError):
            f.checksum(0, 8192)
        # Still fine below the new end.
        f.readinto(100, buf)
        assert buf == b"hello"
        errors: list[BaseException] = []

        def in_thread() -> None:
            try:
                f.readinto(12288, bytearray(5))
            except MediaError as exc:
                errors.append(exc)

        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
        assert len(errors) == 1
        ro = core.DataFile(fd, 4096, False, datafile_path)
        with pytest.raises(InvalidArgumentError):
            ro.write(0, b"x")
        for obj in (f, g, ro):
            obj.close()
        with pytest.raises(InvalidArgumentError):
            f.readinto(0, buf)
    finally:
        os.close(fd)


def _stack_fixture(core: ModuleType, path: str, region_size: int, n: int) -> tuple[object, ...]:
    """A base with region r filled with byte r and one overlay holding odd regions in slot 1."""
    size = n * region_size - 100  # partial last region
    fd = os.open(path, os.O_RDWR)
    os.ftruncate(fd, 3 * n * region_size)
    base = core.DataFile(fd, size, True, path)
    ov = core.DataFile(fd, 2 * n * region_size, True, path)  # same file, different view is fine here
    base_sums = bytearray()
    ov_sums = bytearray(16 * n)
    for r in range(n):
        rlen = min(region_size, size - r * region_size)
        base.write(r * region_size, bytes([r]) * rlen)
        base_sums += core.checksum(bytes([r]) * rlen)
    present, which = core.Bitmap(n), core.Bitmap(n)
    return fd, size, base, ov, base_sums, ov_sums, present, which


def test_stack_reads_newest_layer_and_verifies(core: ModuleType, datafile_path: str) -> None:
    rs, n = 4096, 6
    fd, size, base, ov, base_sums, ov_sums, present, which = _stack_fixture(core, datafile_path, rs, n)
    try:
        # Overlay data lives in a separate file so the base view stays intact.
        ofd, opath = tempfile.mkstemp()
        os.ftruncate(ofd, 2 * n * rs)
        ov = core.DataFile(ofd, 2 * n * rs, True, opath)
        for r in (1, 3):
            slot = r + n  # slot 1
            ov.write(slot * rs, bytes([0xA0 + r]) * rs)
            ov_sums[16 * r : 16 * r + 16] = core.checksum(bytes([0xA0 + r]) * rs)
            present.set(r)
            which.set(r)
        lock = core.RWLock()
        stack = core.Stack(lock, rs, size, [(ov, present, which, ov_sums, core.Bitmap(n)), (base, None, None, base_sums, core.Bitmap(n))])
        data = stack.read(0, size)
        want = b"".join(
            (bytes([0xA0 + r]) * rs) if r in (1, 3) else bytes([r]) * min(rs, size - r * rs) for r in range(n)
        )
        assert data == want
        assert stack.locate(3) == (0, (3 + n) * rs) and stack.locate(2) == (1, 2 * rs)
        buf = bytearray(10)
        assert stack.readinto(rs - 5, buf) == 10 and bytes(buf) == want[rs - 5 : rs + 5]
        with pytest.raises(OutOfRangeError):
            stack.read(size - 1, 2)
        with pytest.raises(InvalidBufferError):
            stack.readinto(0, b"ro")
        # Corrupt region 4 of the base behind the checksum's back: the first read of it fails.
        verified = core.Bitmap(n)
        stack2 = core.Stack(lock, rs, size, [(base, None, None, base_sums, verified)])
        base.write(4 * rs + 7, b"\xff")
        with pytest.raises(RegionUnavailableError) as info:
            stack2.read(4 * rs, 10)
        assert info.value.regions == (4,) and info.value.reason == "checksum"
        assert stack2.read(0, 10) == bytes(10) and verified.test(0)
        with pytest.raises(InvalidArgumentError):
            base.close()  # pinned by the stacks
        stack.release()
        stack2.release()
        with pytest.raises(StaleStackError):
            stack.read(0, 1)
        base.close()
        ov.close()
        os.close(ofd)
        os.unlink(opath)
    finally:
        os.close(fd)


def test_stack_truncated_file_names_region(core: ModuleType, datafile_path: str) -> None:
    rs, n = 4096, 4
    fd, size, base, _ov, base_sums, _s, _p, _w = _stack_fixture(core, datafile_path, rs, n)
    try:
        stack = core.Stack(core.RWLock(), rs, size, [(base, None, None, base_sums, core.Bitmap(n))])
        assert stack.read(0, 10) == bytes(10)
        os.ftruncate(fd, 2 * rs)
        with pytest.raises(RegionUnavailableError) as info:
            stack.read(2 * rs, 100)
        assert info.value.regions == (2,)
        assert stack.read(rs, 5) == b"\x01" * 5
        stack.release()
        base.close()
    finally:
        os.close(fd)


def test_rwlock_excludes_writers(core: ModuleType) -> None:
    lock = core.RWLock()
    order: list[str] = []
    lock.acquire_read()
    lock.acquire_read()

    def writer() -> None:
        lock.acquire_write()
        order.append("writer")
        lock.release_write()

    t = threading.Thread(target=writer)
    t.start()
    t.join(0.1)
    order.append("readers")
    lock.release_read()
    lock.release_read()
    t.join(5)
    assert order == ["readers", "writer"]


def test_implementations_agree_on_stack_errors() -> None:
    """Both cores raise the same classes for the same misuse."""
    for impl in IMPLEMENTATIONS:
        with pytest.raises(InvalidArgumentError):
            impl.Stack(impl.RWLock(), 4096, 4096, [])
        with pytest.raises(InvalidArgumentError):
            impl.Stack(impl.RWLock(), 3000, 4096, [])
