"""A bounded local cache of region versions fetched from the secondary.

Regions read from the remote PIT (location ``R``) are kept in a cache file of ``capacity`` slots
(``cache.data``, sparse) with an index (``cache.index``: per slot the region, its seq and its
checksum). Entries are keyed by (region, seq): a region version is immutable, so an entry never
goes stale; it only gets evicted (CLOCK: a slot whose reference bit is set gets a second chance).

The cache is not authoritative. Data is written before its index entry and nothing is fsynced; a
crash can leave an entry whose bytes do not match, and a slot is verified against its checksum on
its first read after it was opened (it is trusted after a fill, whose bytes were just verified), so
such an entry is dropped and fetched again, never returned. The cache survives restarts.

The volume's read kernel reads cached regions directly (``Stack.route``): :meth:`RegionCache.bind`
keeps a *slot table* for one PIT snapshot, one int64 per region (``k > 0``: slot ``k - 1``; ``-1``:
the version is all zeros; ``0``: not cached). The table is an anonymous mapping: only its pages that
hold an entry take memory (at most one per cached slot or all-zero region noted), so it costs what
the cache holds, not the volume's size. The table and the slots change only while holding the
stack's lock for writing, so a reader never sees a slot being refilled.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

from overlaycache._fs import DIR_MODE, FILE_MODE
from overlaycache._impl import core
from overlaycache.errors import FormatError, InvalidArgumentError, MediaError

_log = logging.getLogger(__name__)

_MAGIC = b"OCCACHE1"
_HEAD = struct.Struct("<8sIIQ")  # magic, version, region_size, capacity
_HEADER = 64
_ENTRY = struct.Struct("<QQ16s")  # region + 1 (0: empty slot), seq, checksum


class RegionCache:
    """A CLOCK-evicted cache of immutable region versions in a local file.

    Parameters
    ----------
    directory : str
        Where ``cache.data`` and ``cache.index`` live (created if missing).
    region_size : int
        Bytes per region (a slot).
    capacity : int
        Number of slots; the data file is ``capacity * region_size`` bytes at most.
    lock : RWLock, optional
        The lock of the stack that reads this cache (see :meth:`bind`); taken for writing while
        slots change.
    """

    def __init__(self, directory: str, region_size: int, capacity: int, lock: Any = None) -> None:
        if capacity < 1:
            raise InvalidArgumentError(f"cache capacity must be >= 1 region, got {capacity}")
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        self.region_size = region_size
        self.capacity = capacity
        self.index_path = os.path.join(directory, "cache.index")
        self.data_path = os.path.join(directory, "cache.data")
        self._rw = lock
        self._lock = threading.Lock()
        self._slots: dict[tuple[int, int], int] = {}
        self._entries: list[tuple[int, int, bytes] | None] = [None] * capacity
        self._ref = bytearray(capacity)
        self._hand = 0
        #: Per slot: the checksum of its version, and whether its bytes were checked since open.
        self.sums = bytearray(16 * capacity)
        self.verified = core.Bitmap(capacity)
        self.slot_table: mmap.mmap | None = None
        self._table: memoryview | None = None
        self._bound: Any = None
        self.hits = self.misses = self.dropped = 0
        self._index_fd = self._open_index()
        self._free = [slot for slot in reversed(range(capacity)) if self._entries[slot] is None]
        self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        length = capacity * region_size
        if os.fstat(self._data_fd).st_size != length:
            os.ftruncate(self._data_fd, length)
        self.data = core.DataFile(self._data_fd, length, True, self.data_path)

    def _open_index(self) -> int:
        fd = os.open(self.index_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        head = os.pread(fd, _HEAD.size, 0)
        want = _HEAD.pack(_MAGIC, 1, self.region_size, self.capacity)
        if head != want:
            if head:
                _log.warning("%s: cache of another geometry or damaged; starting empty", self.index_path)
            os.ftruncate(fd, 0)
            os.pwrite(fd, want.ljust(_HEADER, b"\0"), 0)
            os.ftruncate(fd, _HEADER + _ENTRY.size * self.capacity)
            return fd
        raw = os.pread(fd, _ENTRY.size * self.capacity, _HEADER)
        if len(raw) != _ENTRY.size * self.capacity:
            os.close(fd)
            raise FormatError(f"{self.index_path}: truncated cache index", self.index_path)
        for slot in range(self.capacity):
            region1, seq, csum = _ENTRY.unpack_from(raw, slot * _ENTRY.size)
            if region1:
                self._entries[slot] = (region1 - 1, seq, bytes(csum))
                self._slots[(region1 - 1, seq)] = slot
                self.sums[16 * slot : 16 * slot + 16] = csum
        return fd

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the reader's lock for writing (if any) while slots change."""
        if self._rw is None:
            yield
            return
        self._rw.acquire_write()
        try:
            yield
        finally:
            self._rw.release_write()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._slots

    # -- the slot table of one snapshot ----------------------------------------------------------
    def bind(self, manifest: Any) -> None:
        """Keep :attr:`slot_table` for the PIT snapshot of ``manifest`` from now on."""
        table = mmap.mmap(-1, 8 * manifest.num_regions)  # zero pages, allocated when written
        view = memoryview(table).cast("q")
        with self._lock, self._exclusive():
            for slot, entry in enumerate(self._entries):
                if entry is not None and manifest.entry(entry[0])[0] == entry[1]:
                    view[entry[0]] = slot + 1
            self.slot_table, self._table, self._bound = table, view, manifest

    def unbind(self) -> None:
        """Stop keeping the slot table (the stack that read it is released)."""
        with self._lock:
            self.slot_table = self._table = self._bound = None

    def note_zero(self, region: int, seq: int) -> None:
        """Version ``seq`` of ``region`` is all zeros: if it is the bound snapshot's, the reader
        serves it without a request from now on."""
        with self._lock:
            if self._table is not None and self._table[region] == 0 and self._bound.entry(region)[0] == seq:
                with self._exclusive():
                    self._table[region] = -1

    # -- entries ---------------------------------------------------------------------------------
    def get(self, region: int, seq: int, csum: bytes, length: int) -> bytes | None:
        """The cached bytes of this region version, verified; None if absent or damaged."""
        out = bytearray(length)
        with self._lock:
            slot = self._slots.get((region, seq))
            if slot is None:
                self.misses += 1
                return None
            self._ref[slot] = 1
            try:
                self.data.readinto(slot * self.region_size, out)
                ok = bytes(core.checksum(out)) == csum
            except MediaError:
                ok = False
            if not ok:
                _log.warning("%s: cached region %d (seq %d) is damaged; dropped", self.data_path, region, seq)
                self.dropped += 1
                with self._exclusive():
                    self._forget(slot)
                return None
            self.hits += 1
        return bytes(out)

    def drop(self, region: int, seq: int) -> None:
        """Forget a cached version found damaged by a reader."""
        with self._lock:
            slot = self._slots.get((region, seq))
            if slot is not None:
                _log.warning("%s: cached region %d (seq %d) is damaged; dropped", self.data_path, region, seq)
                self.dropped += 1
                with self._exclusive():
                    self._forget(slot)

    def put(self, region: int, seq: int, csum: bytes, data: Any) -> None:
        """Keep a verified region version (evicting by CLOCK when full)."""
        with self._lock:
            if (region, seq) in self._slots:
                return
            slot = self._victim()
            with self._exclusive():
                self._forget(slot)
                if self._free and self._free[-1] == slot:
                    self._free.pop()  # the evicted slot is taken at once
                try:
                    self.data.write(slot * self.region_size, data)
                except MediaError:
                    self._free.append(slot)
                    _log.warning("%s: cannot write the cache; region %d not cached", self.data_path, region)
                    return
                self.sums[16 * slot : 16 * slot + 16] = csum
                self.verified.set(slot)
                if self._table is not None and self._bound.entry(region)[0] == seq:
                    self._table[region] = slot + 1
            os.pwrite(self._index_fd, _ENTRY.pack(region + 1, seq, csum), _HEADER + slot * _ENTRY.size)
            self._entries[slot] = (region, seq, bytes(csum))
            self._slots[(region, seq)] = slot
            self._ref[slot] = 1

    def clear(self) -> None:
        """Drop every entry and give the file's space back."""
        with self._lock, self._exclusive():
            for slot in range(self.capacity):
                self._forget(slot)
            os.ftruncate(self._data_fd, 0)
            os.ftruncate(self._data_fd, self.capacity * self.region_size)

    def _victim(self) -> int:
        """A free slot if there is one, else CLOCK's choice (never an entry while slots are free)."""
        if self._free:
            return self._free.pop()
        while True:
            slot = self._hand
            self._hand = (self._hand + 1) % self.capacity
            if self._entries[slot] is None or not self._ref[slot]:
                return slot
            self._ref[slot] = 0

    def _forget(self, slot: int) -> None:
        """Empty ``slot``; the caller holds both locks."""
        entry = self._entries[slot]
        if entry is not None:
            self._slots.pop((entry[0], entry[1]), None)
            self._entries[slot] = None
            self._free.append(slot)
            if self._table is not None and self._table[entry[0]] == slot + 1:
                self._table[entry[0]] = 0
            self.verified.clear(slot)
            os.pwrite(self._index_fd, bytes(_ENTRY.size), _HEADER + slot * _ENTRY.size)

    def close(self) -> None:
        self.data.close()
        os.close(self._data_fd)
        os.close(self._index_fd)
