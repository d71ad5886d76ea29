"""The core kernels, parametrized over the compiled core and the pure-Python reference."""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

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


def _records_file(core: ModuleType, raw: bytes) -> tuple[int, str, object]:
    """A temporary file holding ``raw`` (a record table), mapped copy-on-write."""
    rfd, rpath = tempfile.mkstemp()
    os.write(rfd, raw)
    return rfd, rpath, core.DataFile(rfd, len(raw), True, rpath, private=True)


def _slot_record(salt: bytes, r: int, slot: int, csum: bytes) -> bytes:
    body = (slot + 1).to_bytes(8, "little") + csum
    return body + bytes(mmh3.mmh3_x64_128_digest(salt + r.to_bytes(8, "little") + body))[:8]


def _stack_fixture(core: ModuleType, path: str, region_size: int, n: int) -> tuple[Any, ...]:
    """A base with region r filled with byte r (region 0 left zero, with an all-zero checksum entry)
    and its table of checksums."""
    size = n * region_size - 100  # partial last region
    fd = os.open(path, os.O_RDWR)
    os.ftruncate(fd, 3 * n * region_size)
    base = core.DataFile(fd, size, True, path)
    base_sums = bytearray(16)  # region 0: all zeros
    for r in range(1, n):
        rlen = min(region_size, size - r * region_size)
        base.write(r * region_size, bytes([r]) * rlen)
        base_sums += core.checksum(bytes([r]) * rlen)
    return fd, size, base, bytes(base_sums)


def test_stack_reads_newest_layer_and_verifies(core: ModuleType, datafile_path: str) -> None:
    rs, n = 4096, 6
    fd, size, base, base_sums = _stack_fixture(core, datafile_path, rs, n)
    salt = bytes(range(16))
    sfd, spath, sums = _records_file(core, b"H" * 8 + base_sums)  # records after an 8-byte header
    # The overlay holds regions 1 and 3, in slots 4 and 0 of its own file.
    ofd, opath = tempfile.mkstemp()
    os.ftruncate(ofd, 6 * rs)
    ov = core.DataFile(ofd, 6 * rs, True, opath)
    raw = bytearray(32 * n)
    slots = {1: 4, 3: 0}
    present = core.Bitmap(n)
    for r, slot in slots.items():
        ov.write(slot * rs, bytes([0xA0 + r]) * rs)
        raw[32 * r : 32 * r + 32] = _slot_record(salt, r, slot, core.checksum(bytes([0xA0 + r]) * rs))
        present.set(r)
    rfd, rpath, recs = _records_file(core, bytes(raw))
    try:
        lock = core.RWLock()
        verified = core.Bitmap(n)
        stack = core.Stack(lock, rs, size, [(ov, present, verified, recs, 0, salt),
                                            (base, None, verified, sums, 8, None)])
        data = stack.read(0, size)
        want = b"".join(
            (bytes([0xA0 + r]) * rs) if r in slots else bytes([r]) * min(rs, size - r * rs) for r in range(n)
        )
        assert data == want and all(verified.test(r) for r in range(n))
        assert stack.locate(3) == (0, 0) and stack.locate(1) == (0, 4 * rs) and stack.locate(2) == (1, 2 * rs)
        buf = bytearray(10)
        assert stack.readinto(rs - 5, buf) == 10 and bytes(buf) == want[rs - 5 : rs + 5]
        with pytest.raises(OutOfRangeError):
            stack.read(size - 1, 2)
        with pytest.raises(InvalidBufferError):
            stack.readinto(0, b"ro")
        # Corrupt region 4 of the base behind the checksum's back: the first read of it fails.
        v2 = core.Bitmap(n)
        stack2 = core.Stack(lock, rs, size, [(base, None, v2, sums, 8, None)])
        base.write(4 * rs + 7, b"\xff")
        with pytest.raises(RegionUnavailableError) as info:
            stack2.read(4 * rs, 10)
        assert info.value.regions == (4,) and info.value.reason == "checksum"
        assert stack2.read(0, 10) == bytes(10) and v2.test(0)  # an all-zero entry: a zero region
        # A region 0 that is not zero fails against the all-zero entry.
        base.write(7, b"\x01")
        v2.clear(0)
        with pytest.raises(RegionUnavailableError):
            stack2.read(0, 10)
        with pytest.raises(InvalidArgumentError):
            base.close()  # pinned by the stacks
        # An overlay record that fails its check, or names a slot past the file, is an error; the
        # records are read in the private view, which the file never sees.
        verified.clear(3)
        recs.write(32 * 3 + 9, b"\x01")
        with pytest.raises(RegionUnavailableError) as info:
            stack.read(3 * rs, 1)
        assert info.value.regions == (3,) and info.value.reason == "checksum"
        assert os.pread(rfd, 32, 32 * 3) == raw[32 * 3 : 32 * 4]
        recs.write(32 * 3, _slot_record(salt, 3, 6, bytes(16)))
        with pytest.raises(RegionUnavailableError):
            stack.locate(3)
        with pytest.raises(RegionUnavailableError):
            stack.read(3 * rs, 1)
        recs.discard()  # back to the file's records
        assert stack.read(3 * rs, 1) == b"\xa3"
        # A record copied from another region (or salt) fails its check too.
        recs.write(32 * 3, bytes(raw[32:64]))
        verified.clear(3)
        with pytest.raises(RegionUnavailableError):
            stack.read(3 * rs, 1)
        stack.release()
        stack2.release()
        with pytest.raises(StaleStackError):
            stack.read(0, 1)
        for obj in (base, ov, recs, sums):
            obj.close()
    finally:
        for f in (fd, ofd, rfd, sfd):
            os.close(f)
        for p in (opath, rpath, spath):
            os.unlink(p)


def test_stack_truncated_file_names_region(core: ModuleType, datafile_path: str) -> None:
    rs, n = 4096, 4
    fd, size, base, base_sums = _stack_fixture(core, datafile_path, rs, n)
    sfd, spath, sums = _records_file(core, base_sums)
    try:
        stack = core.Stack(core.RWLock(), rs, size, [(base, None, core.Bitmap(n), sums, 0, None)])
        assert stack.read(0, 10) == bytes(10)
        os.ftruncate(fd, 2 * rs)
        with pytest.raises(RegionUnavailableError) as info:
            stack.read(2 * rs, 100)
        assert info.value.regions == (2,)
        assert stack.read(rs, 5) == b"\x01" * 5
        # A checksum table truncated under the stack: the regions whose entries are gone cannot
        # be verified, an I/O error rather than a crash.
        os.ftruncate(sfd, 0)
        fresh = core.Stack(core.RWLock(), rs, size, [(base, None, core.Bitmap(n), sums, 0, None)])
        with pytest.raises(RegionUnavailableError) as info:
            fresh.read(0, 1)
        assert info.value.reason == "io"
        fresh.release()
        stack.release()
        base.close()
        sums.close()
    finally:
        os.close(fd)
        os.close(sfd)
        os.unlink(spath)


def test_private_datafile_keeps_writes_from_the_file(core: ModuleType, datafile_path: str) -> None:
    """A private mapping shows its own writes, never writes them to the file, and shows the file
    again (with changes made to it meanwhile) after discard()."""
    fd = os.open(datafile_path, os.O_RDWR)
    try:
        os.ftruncate(fd, 3 * 4096)
        os.pwrite(fd, b"F" * (3 * 4096), 0)
        priv = core.DataFile(fd, 3 * 4096, True, datafile_path, private=True)
        priv.write(4096 + 10, b"mine")
        buf = bytearray(6)
        priv.readinto(4096 + 9, buf)
        assert bytes(buf) == b"Fmine" + b"F"
        assert os.pread(fd, 4, 4096 + 10) == b"FFFF"
        priv.sync()  # nothing reaches the file
        assert os.pread(fd, 4, 4096 + 10) == b"FFFF"
        os.pwrite(fd, b"new!", 2 * 4096)  # a page not copied shows the file's change
        priv.readinto(2 * 4096, buf)
        assert bytes(buf[:4]) == b"new!"
        os.pwrite(fd, b"file", 4096 + 10)
        priv.discard()
        priv.readinto(4096 + 9, buf)
        assert bytes(buf) == b"Ffile" + b"F"
        with pytest.raises(InvalidArgumentError):
            core.DataFile(fd, 4096, True, datafile_path).discard()
        priv.close()
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
