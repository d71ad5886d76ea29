"""The replication maps of a volume: what is on the secondary, and what is not yet.

``remote.map``
    Per region the newest version stored on the secondary (seq, pack, offset, length, checksum: the
    record format of :data:`overlaycache.remote.layout.RECORD`, whose 4 bytes of padding hold a
    check here, see :class:`RemoteMap`), and the highest seq reserved. Records only move to a
    higher seq. Beside it, ``remote.tree`` (:class:`TreeState`) has the
    newest PIT tree's page addresses and the leaves whose records changed since; it is synced
    before the records are, so a changed record is never missed by the next PIT.
``replication.map``
    The durable write-intent bitmap of regions changed locally and not yet stored; fsynced before
    the data it covers is committed (as Linux md's write-intent bitmap), so a crash can make a
    region ship twice, never skip it.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import struct
import threading
import time
import zlib

from overlaycache._fs import FILE_MODE, data_extents, fsync_dir
from overlaycache._impl import core
from overlaycache.errors import FormatError
from overlaycache.local.geometry import region_ranges
from overlaycache.remote.layout import LEAF_SPAN, NO_DIGEST, RECORD, RECORD_V2
from overlaycache.remote.tree import TreeState, leaf_entries

_log = logging.getLogger(__name__)

_RMAP_MAGIC = b"OCRMAP01"
_RMAP_VERSION = 4
_RMAP_HEAD = struct.Struct("<8sIIQQ")  # magic, version, region_size, num_regions, reserved seq
_RMAP_HEADER = 64
#: A record of ``remote.map``: :data:`RECORD` with its padding holding a check.
_RREC = struct.Struct("<QQQI4s16s16s")
_NO_RECORD = bytes(RECORD.size)
#: A record's seq and check, for checking a leaf's records in one pass.
_SEQ_CHECK = struct.Struct("<Q20xI32x")
#: The same for the 48-byte records of formats 2 and 3 (:data:`RECORD_V2`), read to convert them.
_SEQ_CHECK_V3 = struct.Struct("<Q20xI16x")
#: The write-intent map's file name in the volume's directory.
CHANGE_MAP = "replication.map"
_CMAP_MAGIC_V1 = b"OCCMAP01"
_CMAP_MAGIC = b"OCCMAP02"
_CMAP_VERSION = 2
_CMAP_PAGE = 4096
#: Bitmap words in a page of ``replication.map`` (the page's last 16 bytes are its check).
_CMAP_WORDS = (_CMAP_PAGE - 16) // 8
#: magic, version, words per page, flags (1: dense), number of regions, salt.
_CMAP_HEAD = struct.Struct("<8sIIIQ16s")


def map_salt(volume_id: str) -> bytes:
    """The salt of a volume's ``replication.map`` pages: a page of another volume fails its check."""
    return bytes(core.checksum(b"overlaycache replication.map\0" + volume_id.encode()))


def open_change_map(path: str, num_regions: int, salt: bytes) -> tuple[ChangeMap, bool]:
    """``replication.map`` opened for writing; and whether what it held is lost (its header was
    damaged, or it was missing: :func:`os.path.exists` is the caller's to check before). A damaged
    one is kept beside it as evidence (``replication.map.damaged-<time>``) and a new one made; the
    caller then compares the volume with its secondary."""
    try:
        return ChangeMap(path, num_regions, True, salt), False
    except FormatError as exc:
        aside = f"{path}.damaged-{int(time.time())}"
        os.replace(path, aside)
        _log.error("%s; set aside as %s: every region is compared with the secondary", exc, aside)
        return ChangeMap(path, num_regions, True, salt), True


class RemoteMap:
    """``remote.map``: per region the newest version on the secondary, and the reserved seq; with
    ``remote.tree`` beside it.

    Format 4: a header of 64 bytes (:data:`_RMAP_HEAD`: magic ``OCRMAP01``, version, region_size,
    number of regions, the reserved seq; then the volume's salt (16 bytes) and 16 bytes of mmh3
    x64-128 of the 48 before), then one :data:`_RREC` per region: a :data:`RECORD` whose 4 bytes of
    padding hold a CRC-32 of the salt, the region (8 bytes) and the record's other 60 bytes (a
    check against damage, fast enough for every record of a leaf at each PIT). A record of all zeros is a region never replicated (the file is
    sparse). A header that fails its check is a :class:`FormatError` naming the file (the reserved
    seq must never go back: it orders every version and PIT on the store). A record that fails its
    check is reported by :meth:`get` as absent and by :meth:`leaf_body` as damaged: either way the
    region is in :attr:`damaged`, and the replicator ships it again (which rewrites the record)
    before it publishes a PIT.

    A ``remote.map`` of format 1 (from an overlaycache that wrote one object per region) is set
    aside as ``remote.map.v1-<time>`` and a fresh one made; :attr:`recreated` says so, and the
    caller compares the volume with its secondary again. One of format 2 or 3 (48-byte records,
    without the digest; format 2 without checks) is converted when opened for writing (see
    :meth:`_convert`): its versions then have no digest, and are checked by their checksum alone
    until they are shipped again.
    """

    def __init__(self, path: str, region_size: int, num_regions: int, writable: bool, volume_id: str = "") -> None:
        self.path = path
        self.n = num_regions
        self.recreated = False
        self.salt = bytes(core.checksum(b"overlaycache remote.map\0" + volume_id.encode()))
        self._salt_crc = zlib.crc32(self.salt)
        self.damaged: set[int] = set()
        length = _RMAP_HEADER + RECORD.size * num_regions
        if os.path.exists(path) and writable:
            with open(path, "rb") as f:
                head = f.read(_RMAP_HEAD.size)
            if len(head) == _RMAP_HEAD.size and head[:8] == _RMAP_MAGIC and _RMAP_HEAD.unpack(head)[1] == 1:
                aside = f"{path}.v1-{int(time.time())}"
                os.replace(path, aside)
                _log.warning("%s: remote map of format 1 set aside as %s; the secondary is compared again",
                             path, aside)
                self.recreated = True
        if not os.path.exists(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                os.ftruncate(fd, length)
                os.pwrite(fd, self._header(region_size, num_regions, 1), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            tree = path[: -len(".map")] + ".tree" if path.endswith(".map") else path + ".tree"
            try:
                os.unlink(tree)  # describes records that are gone
            except FileNotFoundError:
                pass
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            head = os.pread(self._fd, _RMAP_HEADER, 0)
            if len(head) != _RMAP_HEADER:
                raise FormatError(f"{path}: truncated", path)
            magic, version, rs, n, reserved = _RMAP_HEAD.unpack_from(head)
            rsize = RECORD.size if version == _RMAP_VERSION else RECORD_V2.size
            if os.fstat(self._fd).st_size < _RMAP_HEADER + rsize * num_regions:
                raise FormatError(f"{path}: truncated", path)
            if magic != _RMAP_MAGIC or version not in (2, 3, _RMAP_VERSION) or (rs, n) != (region_size, num_regions):
                raise FormatError(f"{path}: not a remote map of this volume (format {version})", path)
            if version >= 3 and head != self._header(rs, n, reserved, version):
                raise FormatError(f"{path}: damaged header (its checksum does not match, or of another volume)",
                                  path)
            if version < _RMAP_VERSION:
                if not writable:
                    raise FormatError(f"{path}: a remote map of format {version}: open the volume for writing once "
                                      "to convert it", path)
                self._convert(version, rs, n, reserved)
                os.close(self._fd)
                self._fd = os.open(path, os.O_RDWR)
            self.region_size = rs
            self.reserved = reserved
            self.data = core.DataFile(self._fd, length, writable, path)
            tree_path = path[: -len(".map")] + ".tree" if path.endswith(".map") else path + ".tree"
            self.tree = TreeState(tree_path, rs, num_regions)
        except BaseException:
            os.close(self._fd)
            raise
        self._rec = bytearray(RECORD.size)

    def _header(self, region_size: int, num_regions: int, reserved: int, version: int = _RMAP_VERSION) -> bytes:
        body = _RMAP_HEAD.pack(_RMAP_MAGIC, version, region_size, num_regions, reserved) + self.salt
        return body + bytes(core.checksum(body))

    def _record(self, r: int, seq: int, pack: int, offset: int, length: int, csum: bytes, digest: bytes) -> bytes:
        rec = _RREC.pack(seq, pack, offset, length, b"\0\0\0\0", csum, digest)
        return rec[:28] + self._check(r, rec) + rec[32:]

    def _check(self, r: int, rec: bytes | bytearray | memoryview) -> bytes:
        mv = memoryview(rec)
        c = zlib.crc32(mv[32:], zlib.crc32(mv[:28], zlib.crc32(r.to_bytes(8, "little"), self._salt_crc)))
        return c.to_bytes(4, "little")

    def _invalid(self, first: int, raw: bytes | bytearray) -> list[int]:
        """The regions from ``first`` on whose records in ``raw`` fail their checks."""
        mv = memoryview(raw)
        salt, crc32 = self._salt_crc, zlib.crc32
        bad = []
        for j, (seq, check) in enumerate(_SEQ_CHECK.iter_unpack(raw)):
            pos = RECORD.size * j
            if seq == 0 and check == 0:
                if mv[pos : pos + RECORD.size] != _NO_RECORD:
                    bad.append(first + j)
            elif check != crc32(mv[pos + 32 : pos + RECORD.size], crc32(mv[pos : pos + 28],
                                                                       crc32((first + j).to_bytes(8, "little"), salt))):
                bad.append(first + j)
        return bad

    def _convert(self, version: int, region_size: int, num_regions: int, reserved: int) -> None:
        """Formats 2 and 3 (48-byte records, without digests; format 2 without checks either) to
        4: every record written is copied, with no digest and a check of format 4, into a new file
        that then replaces the old (a crash leaves the old one whole). A record of format 3 that
        failed its check gets one that fails too, so that its region is still shipped again."""
        old = RECORD_V2.size
        tmp = self.path + ".convert"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        done = bad = 0
        try:
            os.ftruncate(fd, _RMAP_HEADER + RECORD.size * num_regions)
            salt, crc32 = self._salt_crc, zlib.crc32
            for start, stop in data_extents(self._fd, _RMAP_HEADER, _RMAP_HEADER + old * num_regions):
                first = (start - _RMAP_HEADER) // old
                last = min(num_regions, (stop - _RMAP_HEADER + old - 1) // old)
                for r0 in range(first, last, 4096):
                    r1 = min(last, r0 + 4096)
                    raw = os.pread(self._fd, old * (r1 - r0), _RMAP_HEADER + old * r0)
                    out = bytearray(RECORD.size * (r1 - r0))
                    for i, (_seq, check) in enumerate(_SEQ_CHECK_V3.iter_unpack(raw)):
                        rec = raw[old * i : old * (i + 1)]
                        if rec == bytes(old):
                            continue
                        r = r0 + i
                        ok = version == 2 or check == crc32(rec[32:], crc32(rec[:28], crc32(r.to_bytes(8, "little"),
                                                                                             salt)))
                        seq_, pack, off, length, csum = RECORD_V2.unpack(rec)
                        new = bytearray(self._record(r, seq_, pack, off, length, csum, NO_DIGEST))
                        if not ok:
                            new[28] ^= 1
                            bad += 1
                        out[RECORD.size * i : RECORD.size * (i + 1)] = new
                        done += 1
                    if any(out):
                        os.pwrite(fd, out, _RMAP_HEADER + RECORD.size * r0)
            os.pwrite(fd, self._header(region_size, num_regions, reserved), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")
        _log.info("%s: remote map converted from format %d to %d (%d records, %d failing their checks)",
                  self.path, version, _RMAP_VERSION, done, bad)

    def get(self, r: int) -> tuple[int, bytes]:
        """``(seq, checksum)`` of region ``r``'s newest version on the secondary (seq 0: none, or
        a record that fails its check: the region is then compared and shipped again)."""
        self.data.readinto(_RMAP_HEADER + RECORD.size * r, self._rec)
        if self._invalid(r, self._rec):
            self._note_damaged([r])
            return 0, bytes(16)
        seq, _pack, _off, _len, csum, _digest = RECORD.unpack(self._rec)
        return int(seq), bytes(csum)

    def set(self, r: int, seq: int, pack: int, offset: int, length: int, csum: bytes,
            digest: bytes = NO_DIGEST) -> None:
        """Record region ``r``'s newest version (``pack`` 0: all zeros, not stored)."""
        self.data.write(_RMAP_HEADER + RECORD.size * r, self._record(r, seq, pack, offset, length, csum, digest))
        self.damaged.discard(r)
        self.tree.mark(r)

    def _note_damaged(self, regions: list[int]) -> None:
        new = [r for r in regions if r not in self.damaged]
        if new:
            self.damaged.update(new)
            _log.error("%s: records of regions %s fail their checks: shipped again", self.path,
                       region_ranges(new))

    def has_records(self) -> bool:
        """Whether any region has a record (the file is not all holes past its header)."""
        chunk = 1 << 20
        for start, stop in data_extents(self._fd, _RMAP_HEADER, _RMAP_HEADER + RECORD.size * self.n):
            for off in range(start, stop, chunk):  # allocated blocks may hold only zeros
                if any(os.pread(self._fd, min(chunk, stop - off), off)):
                    return True
        return False

    def leaf_body(self, i: int) -> tuple[bytes, int]:
        """The map-page entries of leaf ``i``, from the records; the regions whose records fail
        their checks are left out and added to :attr:`damaged` (the caller must not publish a PIT
        while it is not empty)."""
        first = i * LEAF_SPAN
        count = min(LEAF_SPAN, self.n - first)
        out = bytearray(RECORD.size * count)
        self.data.readinto(_RMAP_HEADER + RECORD.size * first, out)
        bad = self._invalid(first, out)
        if bad:
            self._note_damaged(bad)
            for r in bad:
                j = RECORD.size * (r - first)
                out[j : j + RECORD.size] = _NO_RECORD
        return leaf_entries(out)

    def reset(self) -> None:
        """Forget every record (a new secondary); the reserved seq stays. The records are dropped
        by cutting the file back to its header and extending it again (sparse, whatever the
        volume's size); nothing reads them meanwhile."""
        self.sync()
        length = _RMAP_HEADER + RECORD.size * self.n
        os.ftruncate(self._fd, _RMAP_HEADER)
        os.ftruncate(self._fd, length)
        os.fsync(self._fd)
        self.tree.reset()
        self.sync()

    def reserve(self, upto: int) -> None:
        self.data.write(0, self._header(self.region_size, self.n, upto))
        self.sync()
        self.reserved = upto

    def sync(self) -> None:
        """Make the records durable, the tree's dirty marks first."""
        self.tree.sync()
        self.data.sync()

    def close(self) -> None:
        self.tree.close()
        self.data.close()
        os.close(self._fd)


class ChangeMap:
    """``replication.map``: the durable write-intent bitmap of regions not yet on the secondary.

    Format 2, in pages of 4 KiB so that every write is one page:

    * page 0, the header: :data:`_CMAP_HEAD` (magic ``OCCMAP02``, version, words per page, flags,
      number of regions, the volume's salt), then 16 bytes: mmh3 x64-128 of those; zeros after;
    * page ``k >= 1``: :data:`_CMAP_WORDS` bitmap words (regions ``64 * _CMAP_WORDS * (k - 1)``
      on, bit ``r % 8`` of byte ``r // 8``), then 16 bytes: mmh3 x64-128 of the salt, ``k`` (8
      bytes, little-endian) and the words.

    A page never written is a hole in the file: no region of it is pending. The map is created
    sparse where the file system reports holes (``SEEK_HOLE``); elsewhere every page is written
    (flag 1, *dense*). A page that fails its check (a bit flipped, a range zeroed, a page of another
    volume) makes every region it covers pending: they are shipped again, which is harmless (a
    write intent may make a region ship twice, never skip it). :attr:`damaged_pages` counts them.
    A header that fails its check is a :class:`FormatError` naming the file (the caller sets the
    file aside and compares the volume with its secondary). A map of format 1 (a bare bitmap after
    the magic ``OCCMAP01``) is read as it is and rewritten in format 2 when opened for writing.
    """

    def __init__(self, path: str, num_regions: int, writable: bool, salt: bytes) -> None:
        self.path = path
        self.n = num_regions
        self.salt = salt
        self.nwords = (num_regions + 63) // 64
        self.npages = (self.nwords + _CMAP_WORDS - 1) // _CMAP_WORDS
        self.length = _CMAP_PAGE * (1 + self.npages)
        self.writable = writable
        self.damaged_pages = 0
        if not os.path.exists(path):
            self._create(path)
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            head = os.pread(self._fd, _CMAP_PAGE, 0)
            #: The map's bitmap words as found on open (empty: no region pending).
            self.initial: bytes | bytearray
            if head[:8] == _CMAP_MAGIC_V1:
                self.dense = False
                self.initial = self._load_v1(head)
            else:
                self.dense = self._check_header(head)
                self.initial = self._load()
        except BaseException:
            os.close(self._fd)
            raise

    def _create(self, path: str) -> None:
        """A new, empty map: sparse where holes are reported, else every page written."""
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.ftruncate(fd, self.length)
            dense = self.npages > 0 and not _reports_holes(fd, self.length)
            os.pwrite(fd, self._header(dense), 0)
            if dense:
                for k in range(1, self.npages + 1):
                    os.pwrite(fd, self._page(k, bytes(8 * _CMAP_WORDS)), _CMAP_PAGE * k)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")

    def _header(self, dense: bool) -> bytes:
        body = _CMAP_HEAD.pack(_CMAP_MAGIC, _CMAP_VERSION, _CMAP_WORDS, int(dense), self.n, self.salt)
        return body + bytes(core.checksum(body))

    def _page(self, k: int, words: bytes) -> bytes:
        return words + bytes(core.checksum(self.salt + k.to_bytes(8, "little") + words))

    def _check_header(self, head: bytes) -> bool:
        """Whether the map is dense; a header that is not this volume's is a FormatError."""
        size = _CMAP_HEAD.size
        if len(head) < size + 16 or bytes(core.checksum(head[:size])) != head[size : size + 16]:
            raise FormatError(f"{self.path}: damaged header (not a replication map, or truncated)", self.path)
        _magic, version, words, flags, n, salt = _CMAP_HEAD.unpack_from(head)
        if (version, words, n, salt) != (_CMAP_VERSION, _CMAP_WORDS, self.n, self.salt):
            raise FormatError(f"{self.path}: a replication map of another volume or format", self.path)
        if os.fstat(self._fd).st_size < self.length:
            raise FormatError(f"{self.path}: truncated", self.path)
        return bool(flags & 1)

    def _load(self) -> bytes | bytearray:
        """The bitmap, from the pages written (holes are empty pages); a damaged page is full.
        Empty (``b""``) when no page holds a bit: nothing to load, whatever the volume's size."""
        extents = [(_CMAP_PAGE, self.length)] if self.dense else data_extents(self._fd, _CMAP_PAGE, self.length)
        if not extents:
            return b""
        out = bytearray(8 * self.npages * _CMAP_WORDS)
        full = b"\xff" * (8 * _CMAP_WORDS)
        for start, stop in extents:
            for k in range(start // _CMAP_PAGE, (stop + _CMAP_PAGE - 1) // _CMAP_PAGE):
                raw = os.pread(self._fd, _CMAP_PAGE, _CMAP_PAGE * k)
                words = raw[: 8 * _CMAP_WORDS]
                pos = 8 * _CMAP_WORDS * (k - 1)
                if len(raw) == _CMAP_PAGE and self._page(k, words) == raw:
                    out[pos : pos + len(words)] = words
                else:  # a page written holds its check: zeros where data was written are damage
                    self.damaged_pages += 1
                    out[pos : pos + len(full)] = full
        if self.damaged_pages:
            _log.error("%s: %d damaged page(s): every region they cover is shipped again", self.path,
                       self.damaged_pages)
        return self._trim(out)

    def _trim(self, out: bytearray) -> bytearray:
        """``out`` cut to the map's words, without bits past the last region (in place)."""
        del out[8 * self.nwords :]
        extra = 64 * self.nwords - self.n
        if extra:
            last = int.from_bytes(out[-8:], "little") & ((1 << (64 - extra)) - 1)
            out[-8:] = last.to_bytes(8, "little")
        return out

    def _load_v1(self, head: bytes) -> bytes:
        raw = os.pread(self._fd, 8 + 8 * self.nwords, 0)
        if len(raw) != 8 + 8 * self.nwords:
            raise FormatError(f"{self.path}: not a replication map of this volume (or truncated)", self.path)
        bits = raw[8:]
        if self.writable:  # rewrite in format 2: a new file with the same bits, then replace
            os.close(self._fd)
            self._fd = -1
            tmp = self.path + ".v2"
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            fresh = ChangeMap(tmp, self.n, True, self.salt)
            for k in range(1, self.npages + 1):
                words = bits[8 * _CMAP_WORDS * (k - 1) : 8 * _CMAP_WORDS * k]
                if any(words):
                    fresh.store_page(k, words)
            fresh.sync()
            fresh.close()
            os.replace(tmp, self.path)
            fsync_dir(os.path.dirname(self.path) or ".")
            self._fd = os.open(self.path, os.O_RDWR)
            self.dense = fresh.dense
            _log.info("%s: replication map rewritten in format 2", self.path)
        return bits

    def store_page(self, k: int, words: bytes) -> None:
        """Write page ``k`` (from 1) with ``words`` (at most a page's worth; not synced, see
        :meth:`sync`)."""
        words = words + bytes(8 * _CMAP_WORDS - len(words))
        os.pwrite(self._fd, self._page(k, words), _CMAP_PAGE * k)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _reports_holes(fd: int, length: int) -> bool:
    """Whether the file system of ``fd`` (a sparse file of ``length`` bytes with nothing written)
    reports holes of one page: the generic ``SEEK_HOLE`` of file systems without holes says the
    whole file is data, and blocks larger than a page would make the pages beside a written one
    read as zeros in data."""
    if os.fstat(fd).st_blksize > _CMAP_PAGE:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) >= _CMAP_PAGE and os.lseek(fd, 0, os.SEEK_HOLE) == 0
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data at all: holes are reported


class DetachedChanges:
    """The write intents of a volume opened without its secondary: the regions written go into
    ``replication.map`` (durably before the data is committed, as with the secondary attached), so
    that attaching the secondary again ships them, without comparing every region."""

    def __init__(self, path: str, num_regions: int, salt: bytes) -> None:
        cmap, self.lost = open_change_map(path, num_regions, salt)
        self.set = ChangeSet(cmap)
        self._lock = threading.Lock()

    def note_written(self, first: int, last: int) -> None:
        """Regions ``first..last`` changed."""
        with self._lock:
            self.set.add_range(first, last + 1)

    def before_commit(self) -> None:
        """Make the intents durable (before the data they cover is committed)."""
        with self._lock:
            self.set.persist()

    def after_commit(self) -> None:
        """Nothing was shipped: nothing to confirm."""

    def close(self) -> None:
        self.before_commit()
        self.set.map.close()


class ChangeSet:
    """The regions changed locally and not yet on the secondary, kept with ``replication.map``.

    ``pending`` (a bitmap, with its count kept) are waiting to be shipped; ``inflight`` are being
    shipped; ``unconfirmed`` were shipped from a version that was not committed locally yet, so a
    crash could take the local volume back to an older version than the secondary's newest: they
    stay in the durable map until a local commit makes what was shipped durable (then a crash
    cannot undo it), so an unclean reopen ships them again instead of comparing every region. The
    durable map holds the union of the three; :meth:`persist` writes only its words that changed.
    The caller serialises access.
    """

    _WORDS = _CMAP_WORDS  # words per page of the map, written at once

    def __init__(self, cmap: ChangeMap) -> None:
        self.map = cmap
        self.pending = core.Bitmap(cmap.n)
        if cmap.initial:  # empty: nothing pending (no bitmap to scan)
            self.pending.load(cmap.initial)
        self.count = self.pending.count() if cmap.initial else 0
        self.inflight: set[int] = set()
        self.unconfirmed: set[int] = set()
        self._touched: set[int] = set()

    def _touch(self, first: int, last: int) -> None:
        span = 64 * self._WORDS
        self._touched.update(range(first // span, last // span + 1))

    def lag(self) -> int:
        """Regions pending or in flight."""
        return self.count + len(self.inflight)

    def add_range(self, first: int, stop: int) -> None:
        """Mark regions ``first..stop-1`` pending."""
        new = (stop - first) - self.pending.count(first, stop)
        if new:
            self.pending.set_range(first, stop)
            self.count += new
            self._touch(first, stop - 1)

    def add(self, r: int) -> None:
        if not self.pending.test(r):
            self.pending.set(r)
            self.count += 1
            self._touch(r, r)

    def take(self, r: int) -> bool:
        """Move ``r`` from pending to in flight (the durable map does not change); whether it was
        pending and not in flight already."""
        if not self.pending.test(r) or r in self.inflight:
            return False
        self.pending.clear(r)
        self.count -= 1
        self.inflight.add(r)
        return True

    def settle(self, r: int, failed: bool, uncommitted: bool = False) -> None:
        """A shipment of ``r`` ended: back to pending if it ``failed``, else done (and kept in the
        durable map if the version shipped was ``uncommitted`` locally)."""
        self.inflight.discard(r)
        if failed:
            self.add(r)
        elif uncommitted:
            self.unconfirmed.add(r)
        self._touch(r, r)

    def confirm(self, regions: set[int]) -> None:
        """A local commit made the versions shipped of ``regions`` durable."""
        done = regions & self.unconfirmed
        self.unconfirmed -= done
        for r in done:
            self._touch(r, r)

    def persist(self) -> None:
        """Write the changed words of the durable map (the union of the three sets), then sync."""
        if not self._touched:
            return
        extra = sorted(self.inflight | self.unconfirmed)
        nwords = self.pending.nwords
        for page in sorted(self._touched):
            w0 = page * self._WORDS
            w1 = min(nwords, w0 + self._WORDS)
            words = bytearray(self.pending.to_bytes(w0, w1))
            lo, hi = 64 * w0, 64 * w1
            i = bisect.bisect_left(extra, lo)
            while i < len(extra) and extra[i] < hi:
                r = extra[i] - lo
                words[r >> 3] |= 1 << (r & 7)
                i += 1
            self.map.store_page(page + 1, bytes(words))
        self.map.sync()
        self._touched.clear()
