"""A bounded local cache of region versions fetched from the secondary.

Regions read from the remote PIT (location ``R``) are kept in a cache file of ``capacity`` slots
(``cache.data``, sparse) with an index (``cache.index``: per slot the region, its seq and its
checksum). Entries are keyed by (region, seq): a region version is immutable, so an entry never
goes stale; it only gets evicted (CLOCK: a slot whose reference bit is set gets a second chance).

The cache is not authoritative. Data is written before its index entry and nothing is fsynced; a
crash can leave an entry whose bytes do not match, and every read verifies the checksum, so such an
entry is dropped and fetched again, never returned. The cache survives restarts.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from typing import Any

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
    """

    def __init__(self, directory: str, region_size: int, capacity: int) -> None:
        if capacity < 1:
            raise InvalidArgumentError(f"cache capacity must be >= 1 region, got {capacity}")
        os.makedirs(directory, exist_ok=True)
        self.region_size = region_size
        self.capacity = capacity
        self.index_path = os.path.join(directory, "cache.index")
        self.data_path = os.path.join(directory, "cache.data")
        self._lock = threading.Lock()
        self._slots: dict[tuple[int, int], int] = {}
        self._entries: list[tuple[int, int, bytes] | None] = [None] * capacity
        self._ref = bytearray(capacity)
        self._hand = 0
        self.hits = self.misses = self.dropped = 0
        self._index_fd = self._open_index()
        self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        length = capacity * region_size
        if os.fstat(self._data_fd).st_size != length:
            os.ftruncate(self._data_fd, length)
        self._data = core.DataFile(self._data_fd, length, True, self.data_path)

    def _open_index(self) -> int:
        fd = os.open(self.index_path, os.O_RDWR | os.O_CREAT, 0o644)
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
        return fd

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, region: int, seq: int, csum: bytes, length: int) -> bytes | None:
        """The cached bytes of this region version, verified; None if absent or damaged."""
        with self._lock:
            slot = self._slots.get((region, seq))
            if slot is None:
                self.misses += 1
                return None
            self._ref[slot] = 1
        out = bytearray(length)
        try:
            self._data.readinto(slot * self.region_size, out)
            ok = bytes(core.checksum(out)) == csum
        except MediaError:
            ok = False
        if not ok:
            _log.warning("%s: cached region %d (seq %d) is damaged; dropped", self.data_path, region, seq)
            with self._lock:
                self.dropped += 1
                self._forget(slot)
            return None
        with self._lock:
            self.hits += 1
        return bytes(out)

    def put(self, region: int, seq: int, csum: bytes, data: Any) -> None:
        """Keep a verified region version (evicting by CLOCK when full)."""
        with self._lock:
            if (region, seq) in self._slots:
                return
            slot = self._victim()
            self._forget(slot)
            try:
                self._data.write(slot * self.region_size, data)
            except MediaError:
                _log.warning("%s: cannot write the cache; region %d not cached", self.data_path, region)
                return
            os.pwrite(self._index_fd, _ENTRY.pack(region + 1, seq, csum), _HEADER + slot * _ENTRY.size)
            self._entries[slot] = (region, seq, bytes(csum))
            self._slots[(region, seq)] = slot
            self._ref[slot] = 1

    def _victim(self) -> int:
        while True:
            slot = self._hand
            self._hand = (self._hand + 1) % self.capacity
            if self._entries[slot] is None or not self._ref[slot]:
                return slot
            self._ref[slot] = 0

    def _forget(self, slot: int) -> None:
        entry = self._entries[slot]
        if entry is not None:
            self._slots.pop((entry[0], entry[1]), None)
            self._entries[slot] = None
            os.pwrite(self._index_fd, bytes(_ENTRY.size), _HEADER + slot * _ENTRY.size)

    def close(self) -> None:
        self._data.close()
        os.close(self._data_fd)
        os.close(self._index_fd)
