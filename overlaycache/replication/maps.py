"""The replication maps of a volume: what is on the secondary, and what is not yet.

``remote.map``
    Per region the newest version stored on the secondary (seq, pack, offset, length, checksum: the
    record format of :data:`overlaycache.remote.layout.RECORD`), and the highest seq reserved.
    Records only move to a higher seq. Beside it, ``remote.tree`` (:class:`TreeState`) has the
    newest PIT tree's page addresses and the leaves whose records changed since; it is synced
    before the records are, so a changed record is never missed by the next PIT.
``replication.map``
    The durable write-intent bitmap of regions changed locally and not yet stored; fsynced before
    the data it covers is committed (as Linux md's write-intent bitmap), so a crash can make a
    region ship twice, never skip it.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
import time

from overlaycache._fs import FILE_MODE
from overlaycache._impl import core
from overlaycache.errors import FormatError
from overlaycache.remote.layout import LEAF_SPAN, RECORD
from overlaycache.remote.tree import TreeState, leaf_entries

_log = logging.getLogger(__name__)

_RMAP_MAGIC = b"OCRMAP01"
_RMAP_VERSION = 2
_RMAP_HEAD = struct.Struct("<8sIIQQ")  # magic, version, region_size, num_regions, reserved seq
_RMAP_HEADER = 64
_CMAP_MAGIC = b"OCCMAP01"


class RemoteMap:
    """``remote.map``: per region the newest version on the secondary, and the reserved seq; with
    ``remote.tree`` beside it.

    A ``remote.map`` of format 1 (from an overlaycache that wrote one object per region) is set
    aside as ``remote.map.v1-<time>`` and a fresh one made; :attr:`recreated` says so, and the
    caller compares the volume with its secondary again.
    """

    def __init__(self, path: str, region_size: int, num_regions: int, writable: bool) -> None:
        self.path = path
        self.n = num_regions
        self.recreated = False
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
                os.pwrite(fd, _RMAP_HEAD.pack(_RMAP_MAGIC, _RMAP_VERSION, region_size, num_regions, 1), 0)
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
            head = os.pread(self._fd, _RMAP_HEAD.size, 0)
            if len(head) != _RMAP_HEAD.size or os.fstat(self._fd).st_size < length:
                raise FormatError(f"{path}: truncated", path)
            magic, version, rs, n, reserved = _RMAP_HEAD.unpack(head)
            if magic != _RMAP_MAGIC or version != _RMAP_VERSION or (rs, n) != (region_size, num_regions):
                raise FormatError(f"{path}: not a remote map of this volume (format {version})", path)
            self.region_size = rs
            self.reserved = reserved
            self.data = core.DataFile(self._fd, length, writable, path)
            tree_path = path[: -len(".map")] + ".tree" if path.endswith(".map") else path + ".tree"
            self.tree = TreeState(tree_path, rs, num_regions)
        except BaseException:
            os.close(self._fd)
            raise
        self._rec = bytearray(RECORD.size)

    def get(self, r: int) -> tuple[int, bytes]:
        """``(seq, checksum)`` of region ``r``'s newest version on the secondary (seq 0: none)."""
        self.data.readinto(_RMAP_HEADER + RECORD.size * r, self._rec)
        seq, _pack, _off, _len, csum = RECORD.unpack(self._rec)
        return int(seq), bytes(csum)

    def set(self, r: int, seq: int, pack: int, offset: int, length: int, csum: bytes) -> None:
        """Record region ``r``'s newest version (``pack`` 0: all zeros, not stored)."""
        self.data.write(_RMAP_HEADER + RECORD.size * r, RECORD.pack(seq, pack, offset, length, csum))
        self.tree.mark(r)

    def has_records(self) -> bool:
        """Whether any region has a record (the file is not all holes past its header)."""
        end = _RMAP_HEADER + RECORD.size * self.n
        pos = _RMAP_HEADER
        chunk = 1 << 20
        while pos < end:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
                stop = min(end, os.lseek(self._fd, start, os.SEEK_HOLE))
            except OSError:
                return False  # ENXIO: no data past ``pos``
            for off in range(start, stop, chunk):  # allocated blocks may hold only zeros
                if any(os.pread(self._fd, min(chunk, stop - off), off)):
                    return True
            pos = stop
        return False

    def leaf_body(self, i: int) -> tuple[bytes, int]:
        """The map-page entries of leaf ``i``, from the records."""
        first = i * LEAF_SPAN
        count = min(LEAF_SPAN, self.n - first)
        out = bytearray(RECORD.size * count)
        self.data.readinto(_RMAP_HEADER + RECORD.size * first, out)
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
        self.data.write(0, _RMAP_HEAD.pack(_RMAP_MAGIC, _RMAP_VERSION, self.region_size, self.n, upto))
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
    """``replication.map``: the durable write-intent bitmap of regions not yet on the secondary."""

    def __init__(self, path: str, num_regions: int, writable: bool) -> None:
        self.path = path
        self.n = num_regions
        self.nbytes = 8 * ((num_regions + 63) // 64)
        if not os.path.exists(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                os.write(fd, _CMAP_MAGIC)
                os.ftruncate(fd, 8 + self.nbytes)  # sparse: an empty map costs nothing
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

    def store_words(self, first_word: int, words: bytes) -> None:
        """Write bitmap words from ``first_word`` on (not synced: see :meth:`sync`)."""
        os.pwrite(self._fd, words, 8 + 8 * first_word)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class DetachedChanges:
    """The write intents of a volume opened without its secondary: the regions written go into
    ``replication.map`` (durably before the data is committed, as with the secondary attached), so
    that attaching the secondary again ships them, without comparing every region."""

    def __init__(self, path: str, num_regions: int) -> None:
        self.set = ChangeSet(ChangeMap(path, num_regions, True))
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

    _WORDS = 512  # words per page of the map written at once (4 KiB)

    def __init__(self, cmap: ChangeMap) -> None:
        self.map = cmap
        self.pending = core.Bitmap(cmap.n)
        self.pending.load(cmap.initial)
        self.count = self.pending.count()
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
            self.map.store_words(w0, bytes(words))
        self.map.sync()
        self._touched.clear()
