"""The replication maps of a volume: what is on the secondary, and what is not yet.

``remote.map``
    Per region the newest version stored on the secondary (seq, checksum: the record format of
    :data:`overlaycache.remote.layout.RECORD`), and the highest seq reserved. Records only move to a
    higher seq.
``replication.map``
    The durable write-intent bitmap of regions changed locally and not yet stored; fsynced before
    the data it covers is committed (as Linux md's write-intent bitmap), so a crash can make a
    region ship twice, never skip it.
"""

from __future__ import annotations

import os
import struct

from overlaycache._fs import FILE_MODE
from overlaycache._impl import core
from overlaycache.errors import FormatError
from overlaycache.remote.layout import RECORD

_RMAP_MAGIC = b"OCRMAP01"
_RMAP_HEAD = struct.Struct("<8sIIQQ")  # magic, version, region_size, num_regions, reserved seq
_RMAP_HEADER = 64
_CMAP_MAGIC = b"OCCMAP01"


class RemoteMap:
    """``remote.map``: per region the newest version on the secondary, and the reserved seq."""

    def __init__(self, path: str, region_size: int, num_regions: int, writable: bool) -> None:
        self.path = path
        self.n = num_regions
        length = _RMAP_HEADER + RECORD.size * num_regions
        if not os.path.exists(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                os.ftruncate(fd, length)
                os.pwrite(fd, _RMAP_HEAD.pack(_RMAP_MAGIC, 1, region_size, num_regions, 1), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            head = os.pread(self._fd, _RMAP_HEAD.size, 0)
            if len(head) != _RMAP_HEAD.size or os.fstat(self._fd).st_size < length:
                raise FormatError(f"{path}: truncated", path)
            magic, version, rs, n, reserved = _RMAP_HEAD.unpack(head)
            if magic != _RMAP_MAGIC or version != 1 or (rs, n) != (region_size, num_regions):
                raise FormatError(f"{path}: not a remote map of this volume", path)
            self.region_size = rs
            self.reserved = reserved
            self.data = core.DataFile(self._fd, length, writable, path)
        except BaseException:
            os.close(self._fd)
            raise
        self._rec = bytearray(RECORD.size)

    def get(self, r: int) -> tuple[int, bytes]:
        self.data.readinto(_RMAP_HEADER + RECORD.size * r, self._rec)
        seq, csum = RECORD.unpack(self._rec)
        return int(seq), bytes(csum)

    def set(self, r: int, seq: int, csum: bytes) -> None:
        self.data.write(_RMAP_HEADER + RECORD.size * r, RECORD.pack(seq, csum))

    def records(self) -> bytes:
        out = bytearray(RECORD.size * self.n)
        self.data.readinto(_RMAP_HEADER, out)
        return bytes(out)

    def reset(self) -> None:
        """Forget every record (a new secondary); the reserved seq stays."""
        self.data.write(_RMAP_HEADER, bytes(RECORD.size * self.n))
        self.sync()

    def reserve(self, upto: int) -> None:
        self.data.write(0, _RMAP_HEAD.pack(_RMAP_MAGIC, 1, self.region_size, self.n, upto))
        self.sync()
        self.reserved = upto

    def sync(self) -> None:
        self.data.sync()

    def close(self) -> None:
        self.data.close()
        os.close(self._fd)


class ChangeMap:
    """``replication.map``: the durable write-intent bitmap of regions not yet on the secondary."""

    def __init__(self, path: str, num_regions: int, writable: bool) -> None:
        self.path = path
        self.n = num_regions
        self.nbytes = 8 * ((num_regions + 63) // 64)
        if not os.path.exists(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                os.write(fd, _CMAP_MAGIC + bytes(self.nbytes))
                os.fsync(fd)
            finally:
                os.close(fd)
        self.writable = writable
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        raw = os.pread(self._fd, 8 + self.nbytes, 0)
        if len(raw) != 8 + self.nbytes or raw[:8] != _CMAP_MAGIC:
            os.close(self._fd)
            raise FormatError(f"{path}: not a replication map of this volume (or truncated)", path)
        self.initial = raw[8:]

    def store(self, words: bytes) -> None:
        os.pwrite(self._fd, words, 8)
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
