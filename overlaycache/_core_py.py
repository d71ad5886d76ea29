"""Pure-Python reference of :mod:`overlaycache._core`: the same API and the same exceptions.

It is slow and simple on purpose: the compiled core is tested against it. Files are accessed with
``os.pread``/``os.pwrite`` instead of mmap, so a truncated file gives a short read (reported as
:class:`MediaError`) rather than SIGBUS.
"""

from __future__ import annotations

import mmap
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
#: Bitmaps of at least this many bytes are backed by an anonymous mapping (untouched pages are free).
BITMAP_MMAP_BYTES = 1 << 16
_PAGE = 4096
REC_SIZE = 32  # a slot record (see local.layers)


def record_check(salt: bytes, r: int, rec: bytes) -> bytes:
    """The check of an overlay's slot record (see ``_core.Stack``): 8 bytes."""
    return checksum(bytes(salt) + r.to_bytes(8, "little") + bytes(rec[:24]))[:8]


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
            nbytes = max(self.nwords, 1) * 8
            # A large one in zero pages of its own: memory only where bits were ever set.
            buffer = mmap.mmap(-1, nbytes) if nbytes >= BITMAP_MMAP_BYTES else bytearray(nbytes)
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

    def test_many(self, indices: Any, set_them: bool = False) -> bytearray:
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
        if not set_them:
            return bytearray(self._get(i) for i in idx)
        out = bytearray(len(idx))
        for k, i in enumerate(idx):
            out[k] = self._get(i)
            self.set(i)
        return out

    def any(self) -> bool:
        return any(self._get(i) for i in range(self.nbits))

    def to_bytes(self, start: int = 0, stop: int | None = None) -> bytes:
        end = self.nwords if stop is None else stop
        if start < 0 or end < start or end > self.nwords:
            raise OutOfRangeError(f"words [{start}, {end}) out of [0, {self.nwords})")
        return bytes(_readonly_view(self._owner)[start * 8 : end * 8])

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
    """A file accessed at byte offsets (see ``_core.DataFile``); uses pread/pwrite. A ``private``
    one keeps its writes in memory, a page at a time, as copy-on-write pages of a mapping would."""

    def __init__(self, fd: int, length: int, writable: bool, path: str = "", private: bool = False) -> None:
        if length < 0:
            raise InvalidArgumentError(f"length must be >= 0, got {length}")
        self.fd = fd
        self.length = length
        self.writable = writable
        self.private = private
        self.path = path
        self.pins = 0
        self.closed = False
        self._pages: dict[int, bytearray] = {}  # private copies, by page number

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
        if self._pages:
            return self._private_read(offset, n)
        try:
            data = os.pread(self.fd, n, offset)
        except OSError as exc:
            raise self._fault(offset) from exc
        if len(data) != n:
            raise self._fault(offset + len(data))
        return data

    def _file_page(self, page: int) -> bytearray:
        """Page ``page`` as the file has it; a page past the end of the file faults, as a mapping would."""
        try:
            data = os.pread(self.fd, _PAGE, page * _PAGE)
        except OSError as exc:
            raise self._fault(page * _PAGE) from exc
        want = min(_PAGE, self.length - page * _PAGE)
        if len(data) < want:
            if not data:
                raise self._fault(page * _PAGE)
            data += bytes(want - len(data))  # a mapping reads zeros after the end in the last page
        return bytearray(data[:want])

    def _private_read(self, offset: int, n: int) -> bytes:
        out = bytearray()
        pos, end = offset, offset + n
        while pos < end:
            page = pos // _PAGE
            stop = min(end, (page + 1) * _PAGE)
            got = self._pages.get(page)
            if got is not None:
                out += got[pos - page * _PAGE : stop - page * _PAGE]
            else:
                try:
                    data = os.pread(self.fd, stop - pos, pos)
                except OSError as exc:
                    raise self._fault(pos) from exc
                if len(data) != stop - pos:
                    raise self._fault(pos + len(data))
                out += data
            pos = stop
        return bytes(out)

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
        if self.private:
            pos, end = offset, offset + len(src)
            while pos < end:
                page = pos // _PAGE
                stop = min(end, (page + 1) * _PAGE)
                copy = self._pages.get(page)
                if copy is None:
                    copy = self._pages[page] = self._file_page(page)
                copy[pos - page * _PAGE : stop - page * _PAGE] = src[pos - offset : stop - offset]
                pos = stop
            return len(src)
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

    def discard(self) -> None:
        if not self.private:
            raise InvalidArgumentError(f"{self.path}: not a private mapping")
        self._pages.clear()

    def sync(self) -> None:
        if self.writable and not self.closed and not self.private:
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
        if layers[-1][1] is not None or layers[-1][5] is not None:
            raise InvalidArgumentError("the last layer must be the base (present=None, salt=None)")
        self.lock = lock
        self.region_size = region_size
        self.size = size
        self.num_regions = (size + region_size - 1) // region_size
        self.layers = list(layers)
        self._route: tuple[Any, ...] | None = None
        self._zero = checksum(bytes(region_size))
        self._zero_tail = checksum(bytes(size - (self.num_regions - 1) * region_size))
        for _datafile, present, verified, records, offset, salt in self.layers:
            stride = 16 if salt is None else REC_SIZE
            if salt is not None and len(bytes(salt)) != 16:
                raise InvalidArgumentError("a salt is 16 bytes")
            for bm, what in ((present, "present"), (verified, "verified")):
                if bm is not None and bm.nbits < self.num_regions:
                    raise InvalidArgumentError(f"{what} bitmap too small")
            if offset < 0 or offset + stride * self.num_regions > records.length:
                raise InvalidArgumentError("record table too small")
        for layer in self.layers:
            layer[0].pins += 1
            layer[3].pins += 1
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            for layer in self.layers:
                layer[0].pins -= 1
                layer[3].pins -= 1
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

    def _record(self, idx: int, r: int) -> tuple[int, bytes]:
        """Slot of region ``r`` in layer ``idx`` and its record (the base: ``r`` and its checksum)."""
        datafile, _present, _verified, records, offset, salt = self.layers[idx]
        try:
            if salt is None:
                return r, records._pread(offset + 16 * r, 16)
            rec = records._pread(offset + REC_SIZE * r, REC_SIZE)
        except MediaError as exc:
            raise RegionUnavailableError(
                f"region {r} cannot be read (I/O error or file truncated)", regions=(r,), reason=Reason.IO
            ) from exc
        v = int.from_bytes(rec[:8], "little")
        if v == 0 or v - 1 >= datafile.length // self.region_size:
            raise RegionUnavailableError(f"region {r} does not match its checksum", regions=(r,),
                                         reason=Reason.CHECKSUM)
        return v - 1, rec

    def _want(self, idx: int, r: int, rec: bytes, rlen: int) -> bytes:
        salt = self.layers[idx][5]
        if salt is None:
            if rec == bytes(16):
                return self._zero if rlen == self.region_size else self._zero_tail
            return rec
        if record_check(salt, r, rec) != rec[24:32]:
            raise RegionUnavailableError(f"region {r} does not match its checksum", regions=(r,),
                                         reason=Reason.CHECKSUM)
        return rec[8:24]

    def locate(self, region: int) -> tuple[int, int]:
        if region < 0 or region >= self.num_regions:
            raise OutOfRangeError(f"region {region} out of [0, {self.num_regions})")
        idx = self._find(region)
        slot, _rec = self._record(idx, region)
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
            idx = self._find(r)
            slot, rec = self._record(idx, r)
            base = slot * self.region_size
            datafile, _present, verified, _records, _offset, _salt = self.layers[idx]
            try:
                if verified is not None and not verified._get(r):
                    rlen = min(self.region_size, self.size - r * self.region_size)
                    if datafile.checksum(base, rlen) != self._want(idx, r, rec, rlen):
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
