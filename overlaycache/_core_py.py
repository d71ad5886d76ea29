"""Pure-Python reference of :mod:`overlaycache._core`: the same API and the same exceptions.

It is slow and simple on purpose: the compiled core is tested against it. Files are accessed with
``os.pread``/``os.pwrite`` instead of mmap, so a truncated file gives a short read (reported as
:class:`MediaError`) rather than SIGBUS.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Sequence
from typing import Any

import mmh3

from overlaycache.errors import (
    InvalidArgumentError,
    InvalidBufferError,
    MediaError,
    OutOfRangeError,
    Reason,
    RegionUnavailableError,
    StaleStackError,
)

IMPLEMENTATION = "python"

_ALL = (1 << 64) - 1


def _readonly_view(obj: Any) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError as exc:
        raise InvalidBufferError(f"expected a bytes-like object, got {type(obj).__name__}") from exc
    if not view.c_contiguous:
        raise InvalidBufferError("buffer must be C-contiguous")
    return view.cast("B")


def _writable_view(obj: Any) -> memoryview:
    view = _readonly_view(obj)
    if view.readonly:
        raise InvalidBufferError("a writable buffer is required")
    return view


class Bitmap:
    """A fixed-size bitmap of ``nbits`` bits in 64-bit little-endian words (see ``_core.Bitmap``)."""

    def __init__(self, nbits: int, buffer: Any = None) -> None:
        if nbits < 0:
            raise InvalidArgumentError(f"nbits must be >= 0, got {nbits}")
        self.nbits = nbits
        self.nwords = (nbits + 63) >> 6
        if buffer is None:
            buffer = bytearray(max(self.nwords, 1) * 8)
        view = _writable_view(buffer)
        if len(view) < self.nwords * 8:
            raise InvalidBufferError(f"buffer of {len(view)} bytes is too small for {nbits} bits")
        self._owner = buffer
        self.words = view[: max(self.nwords, 1) * 8].cast("Q") if len(view) >= 8 else None

    def __len__(self) -> int:
        return self.nbits

    def _check(self, i: int) -> None:
        if i < 0 or i >= self.nbits:
            raise OutOfRangeError(f"bit {i} out of range [0, {self.nbits})")

    def _check_range(self, start: int, stop: int) -> None:
        if start < 0 or stop > self.nbits or start > stop:
            raise OutOfRangeError(f"range [{start}, {stop}) out of [0, {self.nbits})")

    def _get(self, i: int) -> int:
        assert self.words is not None
        return (self.words[i >> 6] >> (i & 63)) & 1

    def test(self, i: int) -> bool:
        self._check(i)
        return bool(self._get(i))

    def set(self, i: int) -> None:
        self._check(i)
        assert self.words is not None
        self.words[i >> 6] |= 1 << (i & 63)

    def clear(self, i: int) -> None:
        self._check(i)
        assert self.words is not None
        self.words[i >> 6] &= _ALL ^ (1 << (i & 63))

    def set_range(self, start: int, stop: int) -> None:
        self._check_range(start, stop)
        for i in range(start, stop):
            self.set(i)

    def clear_range(self, start: int, stop: int) -> None:
        self._check_range(start, stop)
        for i in range(start, stop):
            self.clear(i)

    def count(self, start: int = 0, stop: int | None = None) -> int:
        end = self.nbits if stop is None else stop
        self._check_range(start, end)
        return sum(self._get(i) for i in range(start, end))

    def runs(self, start: int = 0, stop: int | None = None, value: bool = True) -> list[tuple[int, int]]:
        end = self.nbits if stop is None else stop
        self._check_range(start, end)
        out: list[tuple[int, int]] = []
        i = start
        while i < end:
            if self._get(i) == value:
                j = i
                while j < end and self._get(j) == value:
                    j += 1
                out.append((i, j))
                i = j
            else:
                i += 1
        return out

    def test_many(self, indices: Any) -> bytearray:
        try:
            idx = list(memoryview(indices).cast("B").cast("Q"))
        except (TypeError, ValueError):
            try:
                idx = list(array("Q", indices))
            except (TypeError, OverflowError) as exc:
                raise InvalidArgumentError(f"indices must be non-negative integers: {exc}") from exc
        for i in idx:
            if i >= self.nbits:
                raise OutOfRangeError(f"bit {i} out of range [0, {self.nbits})")
        return bytearray(self._get(i) for i in idx)

    def any(self) -> bool:
        return any(self._get(i) for i in range(self.nbits))

    def to_bytes(self) -> bytes:
        return bytes(_readonly_view(self._owner)[: self.nwords * 8])

    def load(self, data: Any) -> None:
        src = _readonly_view(data)
        if len(src) != self.nwords * 8:
            raise InvalidArgumentError(f"expected {self.nwords * 8} bytes of bitmap, got {len(src)}")
        _writable_view(self._owner)[: self.nwords * 8] = src

    def copy(self) -> Bitmap:
        b = Bitmap(self.nbits)
        if self.nwords:
            b.load(self.to_bytes())
        return b


def resolve(bitmaps: Sequence[Bitmap], first: int, count: int) -> bytearray:
    """Index of the newest layer holding each region (see ``_core.resolve``)."""
    if len(bitmaps) > 254:
        raise InvalidArgumentError(f"at most 254 layers, got {len(bitmaps)}")
    for b in bitmaps:
        if not isinstance(b, Bitmap):
            raise InvalidArgumentError(f"expected Bitmap, got {type(b).__name__}")
        if first < 0 or count < 0 or first + count > b.nbits:
            raise OutOfRangeError(f"regions [{first}, {first + count}) out of [0, {b.nbits})")
    if first < 0 or count < 0:
        raise OutOfRangeError(f"regions [{first}, {first + count}) out of range")
    out = bytearray([len(bitmaps)]) * count
    for k in range(count):
        for idx, b in enumerate(bitmaps):
            if b._get(first + k):
                out[k] = idx
                break
    return out


def checksum(data: Any) -> bytes:
    """MurmurHash3 x64-128 (seed 0) of a buffer, as 16 bytes."""
    return mmh3.mmh3_x64_128_digest(_readonly_view(data))


class RWLock:
    """A readers-writer lock (writer-preferring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class DataFile:
    """A file accessed at byte offsets (see ``_core.DataFile``); uses pread/pwrite."""

    def __init__(self, fd: int, length: int, writable: bool, path: str = "") -> None:
        if length < 0:
            raise InvalidArgumentError(f"length must be >= 0, got {length}")
        self.fd = fd
        self.length = length
        self.writable = writable
        self.path = path
        self.pins = 0
        self.closed = False

    def _check(self, offset: int, n: int) -> None:
        if self.closed:
            raise InvalidArgumentError(f"{self.path}: mapping is closed")
        if offset < 0 or n < 0 or offset + n > self.length:
            raise OutOfRangeError(f"{self.path}: bytes [{offset}, {offset + n}) out of [0, {self.length})")

    def _fault(self, offset: int) -> MediaError:
        return MediaError(
            f"{self.path}: cannot access bytes at offset {offset} (file truncated or device failed)",
            path=self.path,
            offset=offset,
        )

    def _pread(self, offset: int, n: int) -> bytes:
        try:
            data = os.pread(self.fd, n, offset)
        except OSError as exc:
            raise self._fault(offset) from exc
        if len(data) != n:
            raise self._fault(offset + len(data))
        return data

    def readinto(self, offset: int, buffer: Any) -> int:
        out = _writable_view(buffer)
        self._check(offset, len(out))
        out[:] = self._pread(offset, len(out))
        return len(out)

    def write(self, offset: int, data: Any) -> int:
        src = _readonly_view(data)
        if not self.writable:
            raise InvalidArgumentError(f"{self.path}: mapped read-only")
        self._check(offset, len(src))
        try:
            size = os.fstat(self.fd).st_size
            if offset + len(src) > size:  # a mapping would fault past the end of the file
                raise self._fault(max(offset, size))
            os.pwrite(self.fd, src, offset)
        except OSError as exc:
            raise self._fault(offset) from exc
        return len(src)

    def copy_to(self, offset: int, dst: DataFile, dst_offset: int, length: int) -> None:
        if not dst.writable:
            raise InvalidArgumentError(f"{dst.path}: mapped read-only")
        self._check(offset, length)
        dst._check(dst_offset, length)
        dst.write(dst_offset, self._pread(offset, length))

    def checksum(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return checksum(self._pread(offset, length))

    def sync(self) -> None:
        if self.writable and not self.closed:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise MediaError(f"{self.path}: sync failed: {exc}", path=self.path, offset=0) from exc

    def close(self) -> None:
        if self.pins:
            raise InvalidArgumentError(f"{self.path}: still in use by {self.pins} reader(s)")
        self.closed = True


class Stack:
    """The read path of one virtual image (see ``_core.Stack``)."""

    def __init__(self, lock: RWLock, region_size: int, size: int, layers: list[tuple[Any, ...]]) -> None:
        if region_size <= 0 or region_size & (region_size - 1):
            raise InvalidArgumentError(f"region_size {region_size} is not a power of two")
        if not layers:
            raise InvalidArgumentError("a stack needs at least a base layer")
        if layers[-1][1] is not None:
            raise InvalidArgumentError("the last layer must be the base (present=None)")
        self.lock = lock
        self.region_size = region_size
        self.size = size
        self.num_regions = (size + region_size - 1) // region_size
        self.layers = list(layers)
        self._route: tuple[Any, ...] | None = None
        for datafile, _present, _which, sums, _verified in self.layers:
            if len(_readonly_view(sums)) < self.num_regions * 16:
                raise InvalidArgumentError("checksum table too small")
            datafile.pins += 1
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            for layer in self.layers:
                layer[0].pins -= 1
            if self._route is not None:
                self._route[2].pins -= 1

    def route(self, po_layers: int, unavailable: Bitmap, cache: DataFile, slots: Any, verified: Bitmap,
              sums: Any) -> None:
        if self.released:
            raise StaleStackError("the layers of this image changed; retry with the new stack")
        if self._route is not None:
            raise InvalidArgumentError("this stack is already routed")
        if not 0 <= po_layers < len(self.layers):
            raise InvalidArgumentError(f"po_layers must be in [0, {len(self.layers)}), got {po_layers}")
        if unavailable.nbits < self.num_regions:
            raise InvalidArgumentError("unavailable bitmap too small")
        capacity = cache.length // self.region_size
        sl, sm = _readonly_view(slots), _readonly_view(sums)
        if len(sl) < 8 * self.num_regions or len(sm) < 16 * capacity or verified.nbits < capacity:
            raise InvalidArgumentError("slot table, checksums or verified bitmap too small")
        cache.pins += 1
        self._route = (po_layers, unavailable, cache, sl.cast("q"), verified, sm, capacity)

    @property
    def routed(self) -> bool:
        return self._route is not None

    def _remote(self, r: int, out: memoryview, intra: int, misses: list[int] | None) -> bool:
        """Serve region ``r`` if it is remote; returns False for a local region."""
        assert self._route is not None
        po_layers, unavailable, cache, slots, verified, sums, capacity = self._route
        if self._find(r) < po_layers or not unavailable._get(r):
            return False
        k = slots[r]
        if misses is None and k != -1:
            raise RegionUnavailableError(f"region {r} is remote and not cached: read it with readinto_routed",
                                         regions=(r,), reason=Reason.REMOTE)
        if k == -1:
            out[:] = bytes(len(out))
            return True
        if not 0 < k <= capacity:
            misses.append(r)  # type: ignore[union-attr]
            return True
        slot = k - 1
        base = slot * self.region_size
        try:
            if not verified._get(slot):
                rlen = min(self.region_size, self.size - r * self.region_size)
                if cache.checksum(base, rlen) != bytes(sums[16 * slot : 16 * slot + 16]):
                    misses.append(-r - 1)  # type: ignore[union-attr]
                    return True
                verified.set(slot)
            cache.readinto(base + intra, out)
        except MediaError:
            misses.append(-r - 1)  # type: ignore[union-attr]
        return True

    def _find(self, r: int) -> int:
        for idx, layer in enumerate(self.layers[:-1]):
            if layer[1]._get(r):
                return idx
        return len(self.layers) - 1

    def locate(self, region: int) -> tuple[int, int]:
        if region < 0 or region >= self.num_regions:
            raise OutOfRangeError(f"region {region} out of [0, {self.num_regions})")
        idx = self._find(region)
        which = self.layers[idx][2]
        slot = region + (self.num_regions if which is not None and which._get(region) else 0)
        return idx, slot * self.region_size

    def _read(self, offset: int, buffer: Any, misses: list[int] | None = None) -> int:
        out = _writable_view(buffer)
        n = len(out)
        if offset < 0 or offset + n > self.size:
            raise OutOfRangeError(f"bytes [{offset}, {offset + n}) out of the volume [0, {self.size})")
        if self.released:
            raise StaleStackError("the layers of this image changed; retry with the new stack")
        pos, end = offset, offset + n
        while pos < end:
            r = pos // self.region_size
            intra = pos - r * self.region_size
            take = min(self.region_size - intra, end - pos)
            if self._route is not None and self._remote(r, out[pos - offset : pos - offset + take], intra, misses):
                pos += take
                continue
            idx, base = self.locate(r)
            datafile, _present, _which, sums, verified = self.layers[idx]
            try:
                if verified is not None and not verified._get(r):
                    rlen = min(self.region_size, self.size - r * self.region_size)
                    if datafile.checksum(base, rlen) != bytes(_readonly_view(sums)[16 * r : 16 * r + 16]):
                        raise RegionUnavailableError(
                            f"region {r} does not match its checksum", regions=(r,), reason=Reason.CHECKSUM
                        )
                    verified.set(r)
                datafile.readinto(base + intra, out[pos - offset : pos - offset + take])
            except MediaError as exc:
                raise RegionUnavailableError(
                    f"region {r} cannot be read (I/O error or file truncated)", regions=(r,), reason=Reason.IO
                ) from exc
            pos += take
        return n

    def readinto(self, offset: int, buffer: Any) -> int:
        self.lock.acquire_read()
        try:
            return self._read(offset, buffer)
        finally:
            self.lock.release_read()

    def readinto_locked(self, offset: int, buffer: Any) -> int:
        return self._read(offset, buffer)

    def readinto_routed(self, offset: int, buffer: Any) -> tuple[int, list[int]]:
        if self._route is None:
            raise InvalidArgumentError("this stack is not routed")
        out = _writable_view(buffer)
        got: list[int] = []
        self.lock.acquire_read()
        try:
            n = self._read(offset, out, got)
        finally:
            self.lock.release_read()
        return n, got

    def read(self, offset: int, length: int) -> bytes:
        if length < 0:
            raise OutOfRangeError(f"length must be >= 0, got {length}")
        out = bytearray(length)
        self.readinto(offset, out)
        return bytes(out)
