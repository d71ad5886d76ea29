"""Local layers of a volume: the base file and overlay files, with their maps and checksums.

On-disk format 2 (all little-endian; pinned by golden files in ``tests/golden``). Every header is
:data:`_HEAD` (magic, format version, region size, region count, size, volume id, layer id)
followed by its checksum, so a file of another volume, layer or geometry is refused by name.

``base.data``
    The base image, ``size`` bytes, region ``r`` at ``r * region_size``.
``base.sums``
    A 128-byte header, then the 16-byte checksum (mmh3 x64-128) of region ``r`` at
    ``128 + 16 * r``. Created sparse: an entry of 16 zero bytes stands for an all-zero region, so
    an empty volume of any size costs nothing here.
``overlay-<id>.data``
    The overlay's region versions in *slots* of ``region_size`` bytes, allocated on demand and
    reused once free: the file grows with the regions the overlay holds, never past what they need
    (plus the versions written since the last commit).
``overlay-<id>.map``
    A 4 KiB header, then region ``r``'s 32-byte *slot record* at ``4096 + 32 * r``: slot + 1
    (u64; 0: none), the region's checksum, and the record's *check*, the first 8 bytes of the
    mmh3 x64-128 of the overlay's salt, ``r`` and the record's first 24 bytes (see
    :func:`record_check`). The salt is derived from the volume's id and the layer's, so a record
    copied from elsewhere fails its check. Created sparse; written only at checkpoints, with
    records already committed in the journal. The volume maps it copy-on-write and keeps the
    records of new versions in that private view until they are checkpointed.
``overlay-<id>.table``
    The checkpoint: a header (the journal batch it is current up to, the slot count, the number of
    free slots), the free slots (u64 each), the *present* bitmap (8-byte words; omitted while
    empty), and a checksum of all of it. Replaced atomically (temp file, rename).
``overlay-<id>.journal``
    Committed batches since the last checkpoint: a 40-byte header (``OCJ2``, count, batch number,
    slot count, the overlay's salt), ``count`` 32-byte records (region, slot, checksum), and a
    16-byte checksum of the batch.

Crash safety (shadow paging): a region whose current version is durable is never overwritten in
place; its next version goes to a free slot, and the old slot is free again only once the new
version's journal batch is durable. ``commit()`` makes the data durable first and only then
appends the batch that points at it, so a crash at any point leaves every region at its last
committed version, whole. A checkpoint writes the table, then the map's changed pages, then
empties the journal: the table's free list already counts the batches it covers, whose records are
applied again on replay, so a crash between any two steps loses nothing.

Memory: per region, a present bit for each overlay; the regions written since the last commit
(at most :data:`MAX_UNCOMMITTED`) and their slots in a dict; the checksums and slots stay in the
files, read through the page cache.
"""

from __future__ import annotations

import heapq
import logging
import os
import struct
import time
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

import mmh3

from overlaycache._fs import FILE_MODE, write_chunks_atomic, write_file_new
from overlaycache._impl import core
from overlaycache.errors import FormatError, MediaError, OverlayCacheError
from overlaycache.local.geometry import Geometry, region_ranges

_log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SUM_SIZE = 16
_HEAD = struct.Struct("<8sIIQQ16sQ")  # magic, version, region_size, num_regions, size, volume id, layer id
_BASE_MAGIC = b"OCBASE02"
_MAP_MAGIC = b"OCOMAP02"
_TABLE_MAGIC = b"OCTABL02"
_V1_MAGICS = {b"OCBASE01", b"OCTABL01"}
#: Where base.sums's checksums and an overlay map's records begin.
SUMS_OFFSET = 128
MAP_OFFSET = 4096
REC = struct.Struct("<Q16s8s")  # slot + 1, checksum, check
REC_SIZE = REC.size
_PAGE = 4096
_TABLE = struct.Struct("<QQQQ")  # batch_next, slots_end, nfree, bitmap words stored (0: empty)
_BATCH = struct.Struct("<4sIQQ16s")  # magic, count, batch number, slot count, salt
_BATCH_MAGIC = b"OCJ2"
_RECORD = struct.Struct("<QQ16s")  # region, slot, checksum
# Checkpoint the journal into the map and table once it is this large.
JOURNAL_CHECKPOINT_BYTES = 8 << 20
# A checkpoint writes the table's bitmap this many words at a time (1 MiB).
_TABLE_CHUNK_WORDS = 1 << 17
# The data file grows by this many slots at a time (trimmed to the slots used at a checkpoint).
_GROW_SLOTS = 16
#: A writer commits before this many regions are written since the last commit (see
#: Overlay.max_slots): it bounds the slots held by versions replaced since.
MAX_UNCOMMITTED = 1 << 16


def volume_key(volume_id: str) -> bytes:
    """The 16 bytes that stand for a volume id in headers (its UUID, or a hash of another id)."""
    try:
        raw = bytes.fromhex(volume_id)
    except ValueError:
        raw = b""
    return raw if len(raw) == 16 else bytes(core.checksum(volume_id.encode()))


def overlay_salt(volume_id: str, layer_id: int) -> bytes:
    """The salt of an overlay's records and journal batches: bound to the volume and the layer."""
    return bytes(core.checksum(b"overlaycache overlay" + volume_key(volume_id) + layer_id.to_bytes(8, "little")))


def record_check(salt: bytes, r: int, body: bytes) -> bytes:
    """The 8-byte check of region ``r``'s slot record whose first 24 bytes are ``body``."""
    return bytes(core.checksum(salt + r.to_bytes(8, "little") + body))[:8]


def zero_checksum(length: int) -> bytes:
    """The checksum of ``length`` zero bytes."""
    return bytes(core.checksum(bytes(length)))


def pack_header(magic: bytes, geo: Geometry, volume_id: str, layer_id: int) -> bytes:
    head = _HEAD.pack(magic, FORMAT_VERSION, geo.region_size, geo.num_regions, geo.size, volume_key(volume_id),
                      layer_id)
    return head + bytes(core.checksum(head))


def _check_header(raw: bytes, magic: bytes, path: str, geo: Geometry, volume_id: str, layer_id: int) -> None:
    if len(raw) >= 8 and raw[:8] in _V1_MAGICS:
        raise FormatError(f"{path}: a file of local format 1; convert the volume with `overlaycache convert`", path)
    if len(raw) < _HEAD.size + 16:
        raise FormatError(f"{path}: truncated header", path)
    fields = raw[: _HEAD.size]
    got_magic, version, rs, n, sz, vkey, lid = _HEAD.unpack(fields)
    if got_magic != magic:
        kind = {_BASE_MAGIC: "base checksum", _MAP_MAGIC: "overlay map", _TABLE_MAGIC: "overlay table"}[magic]
        raise FormatError(f"{path}: not an overlaycache {kind} file", path)
    if raw[_HEAD.size : _HEAD.size + 16] != core.checksum(fields):
        raise FormatError(f"{path}: header checksum mismatch (file corrupted)", path)
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version}, this overlaycache reads {FORMAT_VERSION}", path)
    if (rs, n, sz) != (geo.region_size, geo.num_regions, geo.size):
        raise FormatError(f"{path}: geometry {sz}/{rs} does not match the volume's {geo.size}/{geo.region_size}",
                          path)
    if vkey != volume_key(volume_id) or lid != layer_id:
        raise FormatError(f"{path}: belongs to another volume or layer (layer {lid})", path)


def _open_file(path: str, writable: bool) -> int:
    try:
        return os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: missing", path) from exc


def _read_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise FormatError(f"{path}: truncated (expected {n} bytes at offset {offset}, got {len(data)})", path)
    return data


def _map_records(fd: int, path: str, length: int) -> Any:
    """Map a record file copy-on-write, after checking its length."""
    if os.fstat(fd).st_size < length:
        raise FormatError(f"{path}: truncated ({os.fstat(fd).st_size} bytes, expected {length})", path)
    return core.DataFile(fd, length, True, path, private=True)


def create_sparse(path: str, head: bytes, length: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.pwrite(fd, head, 0)
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)


class Layer:
    """What every layer has: a data file and a checksum per region, found through its records."""

    name: str
    data: Any
    geo: Geometry

    def stack_entry(self, verified: Any) -> tuple[Any, ...]:
        """The layer as ``core.Stack`` takes it, checked against ``verified``."""
        raise NotImplementedError

    def offset_of(self, r: int) -> int:
        """Byte offset of region ``r``'s current version in :attr:`data`."""
        raise NotImplementedError

    def checksum_of(self, r: int) -> bytes:
        """The checksum of region ``r``'s version in this layer (as recorded, not read)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _open_data(path: str, length: int, mapped: int, writable: bool) -> tuple[int, Any, int | None]:
    """Open a data file that should be ``length`` bytes long, mapping ``mapped`` bytes; returns its
    fd, its mapping, and where it ends if it is shorter (truncated under the volume: the bytes past
    its end cannot be read, and a read of them raises :class:`MediaError` through the core's SIGBUS
    guard, never zeros)."""
    fd = _open_file(path, writable)
    try:
        actual = os.fstat(fd).st_size
        short = None
        if actual < length:
            _log.error("%s: truncated (%d bytes, expected %d); the regions stored past its end are unavailable",
                       path, actual, length)
            short = actual
        return fd, core.DataFile(fd, mapped, writable, path), short
    except BaseException:
        os.close(fd)
        raise


class BaseLayer(Layer):
    """The base image: region ``r`` at ``r * region_size``, checksums in ``base.sums``."""

    def __init__(self, directory: str, geo: Geometry, writable: bool, volume_id: str) -> None:
        self.name = "base"
        self.geo = geo
        self.data_path = os.path.join(directory, "base.data")
        self.sums_path = os.path.join(directory, "base.sums")
        self.writable = writable
        self._zero = zero_checksum(geo.region_size)
        self._zero_tail = zero_checksum(geo.region_length(geo.num_regions - 1))
        self._fd, self.data, self.truncated_at = _open_data(self.data_path, geo.size, geo.size, writable)
        self._sums_fd = -1
        try:
            self._sums_fd = _open_file(self.sums_path, writable)
            _check_header(os.pread(self._sums_fd, _HEAD.size + 16, 0), _BASE_MAGIC, self.sums_path, geo,
                          volume_id, 0)
            length = SUMS_OFFSET + SUM_SIZE * geo.num_regions
            if os.fstat(self._sums_fd).st_size < length:
                raise FormatError(f"{self.sums_path}: truncated ({os.fstat(self._sums_fd).st_size} bytes, expected "
                                  f"{length})", self.sums_path)
            self.records = core.DataFile(self._sums_fd, length, False, self.sums_path)
        except BaseException:
            self.data.close()
            os.close(self._fd)
            if self._sums_fd >= 0:
                os.close(self._sums_fd)
            raise

    @staticmethod
    def create(directory: str, geo: Geometry, volume_id: str) -> None:
        """Create an all-zero base (sparse) with its (sparse) checksum table."""
        fd = os.open(os.path.join(directory, "base.data"), os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.ftruncate(fd, geo.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        create_sparse(os.path.join(directory, "base.sums"), pack_header(_BASE_MAGIC, geo, volume_id, 0),
                       SUMS_OFFSET + SUM_SIZE * geo.num_regions)

    def checksum_of(self, r: int) -> bytes:
        raw = bytearray(SUM_SIZE)
        self.records.readinto(SUMS_OFFSET + SUM_SIZE * r, raw)
        if not any(raw):
            return self._zero if r != self.geo.num_regions - 1 else self._zero_tail
        return bytes(raw)

    def offset_of(self, r: int) -> int:
        return r * self.geo.region_size

    def written_runs(self) -> list[tuple[int, int]]:
        """Runs of regions with a checksum recorded in ``base.sums`` (any other one is all zeros),
        found from the file's allocated extents: the time follows what the base holds."""
        n = self.geo.num_regions
        end = SUMS_OFFSET + SUM_SIZE * n
        runs: list[tuple[int, int]] = []
        pos = SUMS_OFFSET
        while pos < end:
            try:
                start = os.lseek(self._sums_fd, pos, os.SEEK_DATA)
                stop = min(end, os.lseek(self._sums_fd, start, os.SEEK_HOLE))
            except OSError:  # no more data (ENXIO), or no hole support: the rest
                if pos == SUMS_OFFSET and not runs:
                    return [(0, n)]
                break
            if start >= end:
                break
            first = max(0, (start - SUMS_OFFSET) // SUM_SIZE)
            last = min(n, (stop - SUMS_OFFSET + SUM_SIZE - 1) // SUM_SIZE)
            raw = os.pread(self._sums_fd, SUM_SIZE * (last - first), SUMS_OFFSET + SUM_SIZE * first)
            r = first
            while r < last:
                while r < last and not any(raw[SUM_SIZE * (r - first) : SUM_SIZE * (r - first + 1)]):
                    r += 1
                a = r
                while r < last and any(raw[SUM_SIZE * (r - first) : SUM_SIZE * (r - first + 1)]):
                    r += 1
                if r > a:
                    runs.append((a, r))
            pos = stop
        return runs

    def store_sums(self, sums: dict[int, bytes]) -> None:
        """Write the checksums of regions (``{region: checksum}``) to ``base.sums`` and fsync it."""
        for r in sorted(sums):
            os.pwrite(self._sums_fd, sums[r], SUMS_OFFSET + SUM_SIZE * r)
        os.fsync(self._sums_fd)

    def stack_entry(self, verified: Any) -> tuple[Any, ...]:
        return (self.data, None, verified, self.records, SUMS_OFFSET, None)

    def repair(self) -> bool:
        """Make the base file writable again before regions are folded into it: a file truncated
        under the volume gets its length back (the lost tail reads as zeros, and its regions fail
        their checksums until rewritten). Returns whether it had to.

        Raises
        ------
        MediaError
            The file on disk is not the one the volume has open (deleted or replaced).
        """
        try:
            on_disk = os.stat(self.data_path)
        except FileNotFoundError as exc:
            raise MediaError(f"{self.data_path}: deleted under the volume") from exc
        st = os.fstat(self._fd)
        if (on_disk.st_dev, on_disk.st_ino) != (st.st_dev, st.st_ino):
            raise MediaError(f"{self.data_path}: replaced under the volume")
        if st.st_size >= self.geo.size:
            return False
        os.ftruncate(self._fd, self.geo.size)
        os.fsync(self._fd)
        return True

    def close(self) -> None:
        self.data.close()
        self.records.close()
        os.close(self._fd)
        os.close(self._sums_fd)


class Overlay(Layer):
    """An overlay: region versions in slots, a map of slot records, a present bitmap, a journal.

    Parameters
    ----------
    directory : str
        Where its files are.
    layer_id : int
        Its id (``overlay-<id>.*``).
    geo : Geometry
        The volume's geometry.
    writable : bool
        Open for writing.
    volume_id : str
        The volume's id (headers and records are bound to it).
    top : bool
        It takes writes: its data file is mapped with room to grow.
    """

    def __init__(self, directory: str, layer_id: int, geo: Geometry, writable: bool, volume_id: str,
                 top: bool = False) -> None:
        self.id = layer_id
        self.name = f"overlay-{layer_id}"
        self.geo = geo
        self.writable = writable
        self.volume_id = volume_id
        self.salt = overlay_salt(volume_id, layer_id)
        prefix = os.path.join(directory, self.name)
        self.directory = directory
        self.data_path = prefix + ".data"
        self.map_path = prefix + ".map"
        self.table_path = prefix + ".table"
        self.journal_path = prefix + ".journal"
        n = geo.num_regions
        self.present = core.Bitmap(n)
        # Regions written since the last commit, and their slots: at most MAX_UNCOMMITTED (a
        # writer commits before), so a dict, not a bit per region of the volume.
        self._dirty: dict[int, int] = {}
        self._releasing = array("Q")  # slots of versions replaced since the last commit: free after it
        self._free: list[int] = []  # a heap of free slots (lowest reused first)
        self.slots_end = 0  # slots in use or free below this
        self._batch = 0  # the next journal batch
        self._journal_bytes = 0
        self._pages: set[int] = set()  # map pages changed since the last checkpoint
        self.untrusted: list[int] = []  # regions a damaged journal may have committed (see _replay_journal)
        self._map_fd = self._fd = -1
        self.records: Any = None
        self.data: Any = None
        self._retired: list[Any] = []  # mappings replaced by a smaller one, closed once unpinned
        #: The most slots the data file can need: every region, plus the versions replaced since
        #: the last commit, plus the slots a growth adds and one more (see _allocate).
        self.max_slots = n + MAX_UNCOMMITTED + _GROW_SLOTS + 1
        try:
            self._map_fd = _open_file(self.map_path, writable)
            _check_header(os.pread(self._map_fd, _HEAD.size + 16, 0), _MAP_MAGIC, self.map_path, geo, volume_id,
                          layer_id)
            self.records = _map_records(self._map_fd, self.map_path, MAP_OFFSET + REC_SIZE * n)
            free = self._load_table()
            free = self._replay_journal(free)
            self._free = sorted(free)
            need = self.slots_end * geo.region_size
            self._fd = _open_file(self.data_path, writable)
            actual = os.fstat(self._fd).st_size
            self.truncated_at = None
            if actual < need:
                _log.error("%s: truncated (%d bytes, expected %d); the regions stored past its end are unavailable",
                           self.data_path, actual, need)
                self.truncated_at = actual
            elif actual > need + _PAGE and writable:
                os.ftruncate(self._fd, need + _PAGE)  # slots of versions never committed
            self._file_slots = self.slots_end
            # The top overlay's slots never pass the regions it holds plus those written since the
            # last commit (a writer commits before MAX_UNCOMMITTED): its mapping has room for that.
            mapped = self.max_slots * geo.region_size if (writable and top) else need
            self.data = core.DataFile(self._fd, mapped, writable, self.data_path)
        except BaseException:
            self._close_files()
            raise

    # -- files ----------------------------------------------------------------------------------
    @staticmethod
    def create(directory: str, layer_id: int, geo: Geometry, volume_id: str) -> None:
        """Create the empty files of an overlay (durably; the caller fsyncs the directory)."""
        prefix = os.path.join(directory, f"overlay-{layer_id}")
        fd = os.open(prefix + ".data", os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        create_sparse(prefix + ".map", pack_header(_MAP_MAGIC, geo, volume_id, layer_id).ljust(MAP_OFFSET, b"\0"),
                       MAP_OFFSET + REC_SIZE * geo.num_regions)
        head = pack_header(_TABLE_MAGIC, geo, volume_id, layer_id) + _TABLE.pack(0, 0, 0, 0)
        write_file_new(prefix + ".table", head + bytes(core.checksum(head)))
        write_file_new(prefix + ".journal", b"")

    @staticmethod
    def remove_files(directory: str, layer_id: int) -> None:
        """Delete the files of an overlay (missing ones are fine)."""
        for ext in (".data", ".map", ".table", ".table.tmp", ".journal"):
            try:
                os.unlink(os.path.join(directory, f"overlay-{layer_id}{ext}"))
            except FileNotFoundError:
                pass

    def _load_table(self) -> set[int]:
        """Read the checkpoint: the present bitmap, the slot count, the next batch; returns the
        free slots."""
        try:
            with open(self.table_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError as exc:
            raise FormatError(f"{self.table_path}: missing", self.table_path) from exc
        path = self.table_path
        _check_header(raw, _TABLE_MAGIC, path, self.geo, self.volume_id, self.id)
        pos = _HEAD.size + 16
        if len(raw) < pos + _TABLE.size + 16 or raw[-16:] != core.checksum(raw[:-16]):
            raise FormatError(f"{path}: checksum mismatch (file corrupted or truncated)", path)
        self._batch, self.slots_end, nfree, words = _TABLE.unpack_from(raw, pos)
        pos += _TABLE.size
        if words not in (0, self.present.nwords) or len(raw) != pos + 8 * nfree + 8 * words + 16:
            raise FormatError(f"{path}: inconsistent lengths (file corrupted)", path)
        free = array("Q")
        free.frombytes(raw[pos : pos + 8 * nfree])
        pos += 8 * nfree
        if words:
            self.present.load(raw[pos : pos + 8 * words])
        if any(s >= self.slots_end for s in free):
            raise FormatError(f"{path}: a free slot past the slot count (file corrupted)", path)
        return set(free)

    def _store_table(self) -> None:
        """Replace the table; the bitmap is written (and hashed) a chunk at a time, so that a
        checkpoint of a huge volume holds no copy of it in memory."""
        head = (pack_header(_TABLE_MAGIC, self.geo, self.volume_id, self.id)
                + _TABLE.pack(self._batch, self.slots_end, len(self._free), self.present.nwords))
        free = array("Q", sorted(self._free)).tobytes()

        def chunks() -> Iterator[bytes]:
            hasher = mmh3.mmh3_x64_128()  # the same digest as core.checksum of the whole
            for part in (head, free):
                hasher.update(part)
                yield part
            nwords = self.present.nwords
            for w in range(0, nwords, _TABLE_CHUNK_WORDS):
                part = self.present.to_bytes(w, min(nwords, w + _TABLE_CHUNK_WORDS))
                hasher.update(part)
                yield part
            yield hasher.digest()

        write_chunks_atomic(self.table_path, chunks())

    # -- records ------------------------------------------------------------------------------------
    def _record(self, r: int) -> tuple[int, bytes]:
        """``(slot, checksum)`` of region ``r``'s current record (slot -1: none)."""
        raw = bytearray(REC_SIZE)
        self.records.readinto(MAP_OFFSET + REC_SIZE * r, raw)
        slot, csum, _check = REC.unpack(raw)
        return int(slot) - 1, bytes(csum)

    def _put(self, r: int, slot: int, csum: bytes) -> None:
        body = struct.pack("<Q16s", slot + 1, csum)
        self.records.write(MAP_OFFSET + REC_SIZE * r, body + record_check(self.salt, r, body))

    def slot_of(self, r: int) -> int:
        """Region ``r``'s slot in the data file (-1: the overlay does not hold it)."""
        return self._record(r)[0] if self.present.test(r) else -1

    def offset_of(self, r: int) -> int:
        return self._record(r)[0] * self.geo.region_size

    def checksum_of(self, r: int) -> bytes:
        """The recorded checksum of region ``r`` (of a region written since the last commit:
        only once :meth:`hash_dirty` has run)."""
        return self._record(r)[1]

    def is_dirty(self, r: int) -> bool:
        """Whether region ``r`` was written since the last commit."""
        return r in self._dirty

    @property
    def regions_dirty(self) -> int:
        """How many regions were written since the last commit."""
        return len(self._dirty)

    # -- journal replay -------------------------------------------------------------------------------
    def _batch_end(self, raw: bytes, pos: int) -> int | None:
        """Where the batch starting at ``pos`` ends (after its checksum), if a whole, valid one does."""
        if pos + _BATCH.size > len(raw):
            return None
        magic, count, _batch, _slots, _salt = _BATCH.unpack_from(raw, pos)
        end = pos + _BATCH.size + count * _RECORD.size
        if magic != _BATCH_MAGIC or end + 16 > len(raw) or core.checksum(raw[pos:end]) != raw[end : end + 16]:
            return None
        return int(end) + 16

    def _next_batch(self, raw: bytes, pos: int) -> int | None:
        """The start of the first valid batch after ``pos``, if any."""
        at = raw.find(_BATCH_MAGIC, pos + 1)
        while at >= 0:
            if self._batch_end(raw, at) is not None:
                return at
            at = raw.find(_BATCH_MAGIC, at + 1)
        return None

    def _replay_journal(self, free: set[int]) -> set[int]:
        """Apply the committed batches. A bad batch at the end is a torn tail (never committed: cut
        off). A bad batch followed by valid ones is corruption: the valid ones are applied, every
        region is left in :attr:`untrusted` unless a later batch names it again (the damaged span
        may have named any), the journal is kept as it is and
        a copy of it saved beside it, and it is logged as an error. A valid batch of another
        overlay or volume is refused (:class:`FormatError`). Batches the table already counts
        (copied before a checkpoint finished) set their records again but free nothing."""
        try:
            with open(self.journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError as exc:
            raise FormatError(f"{self.journal_path}: missing", self.journal_path) from exc
        n = self.geo.num_regions
        counted = self._batch
        suspect: Any = None
        damaged = 0
        pos = 0
        while pos < len(raw):
            end = self._batch_end(raw, pos)
            if end is None:
                later = self._next_batch(raw, pos)
                if later is None:
                    break  # torn or garbage tail: everything before it was committed
                if suspect is None:
                    suspect = core.Bitmap(n)
                self._suspect_span(raw, pos, later, suspect)
                damaged += later - pos
                pos = later
                continue
            _magic, count, batch, slots_end, salt = _BATCH.unpack_from(raw, pos)
            if salt != self.salt:
                raise FormatError(f"{self.journal_path}: batch {batch} belongs to another volume or overlay",
                                  self.journal_path)
            self.slots_end = max(self.slots_end, slots_end)
            for k in range(count):
                r, slot, csum = _RECORD.unpack_from(raw, pos + _BATCH.size + k * _RECORD.size)
                if r >= n or slot >= slots_end:
                    raise FormatError(f"{self.journal_path}: record for region {r} (slot {slot}) out of range",
                                      self.journal_path)
                if batch >= counted:
                    old = self._record(r)[0] if self.present.test(r) else -1
                    if old >= 0 and old != slot:
                        free.add(old)
                    free.discard(slot)
                self._put(r, slot, csum)
                self.present.set(r)
                self._pages.add(r * REC_SIZE // _PAGE)
                if suspect is not None:
                    suspect.clear(r)  # named again after the damage: this version is committed
            self._batch = max(self._batch, batch + 1)
            pos = end
        self.untrusted = [] if suspect is None else [r for a, b in suspect.runs() for r in range(a, b)]
        if damaged:
            _log.error("%s: %d bytes of committed journal are damaged; regions %s cannot be trusted and are "
                       "unavailable; the journal is kept as it was", self.journal_path, damaged,
                       region_ranges(self.untrusted))
            if self.writable:
                with open(self.journal_path + f".damaged-{int(time.time())}", "wb") as f:
                    f.write(raw)
                    f.flush()
                    os.fsync(f.fileno())
        if pos != len(raw):
            _log.warning("%s: ignoring %d bytes of uncommitted journal tail", self.journal_path, len(raw) - pos)
            if self.writable:
                os.truncate(self.journal_path, pos)
        self._journal_bytes = pos
        return free

    def _suspect_span(self, raw: bytes, start: int, stop: int, suspect: Any) -> None:
        """Mark the regions a damaged span of the journal may name: every one. No byte of a batch
        that fails its checksum can be trusted, its region numbers included (a damaged number
        names another region, and the one it named would be missed)."""
        suspect.set_range(0, self.geo.num_regions)

    # -- slots ----------------------------------------------------------------------------------------
    def _allocate(self) -> int:
        """A free slot for a new version (the lowest free one, else a new one at the end)."""
        if self._free:
            return heapq.heappop(self._free)
        slot = self.slots_end
        if slot + _GROW_SLOTS + 1 >= self.max_slots:
            raise OverlayCacheError(f"{self.data_path}: {len(self._dirty)} regions written since the last "
                                    f"commit; commit at least every {MAX_UNCOMMITTED}")  # internal misuse
        self.slots_end += 1
        if self.slots_end >= self._file_slots:
            # One slot more at least: the core's read of a slot probes the page after it.
            self._file_slots = self.slots_end + _GROW_SLOTS
            os.ftruncate(self._fd, self._file_slots * self.geo.region_size)
        return slot

    # -- commit protocol ------------------------------------------------------------------------
    def needs_current(self, r: int, intra: int, length: int) -> bool:
        """Whether a write of ``length`` bytes at ``intra`` in region ``r`` needs the region's current
        bytes (see :meth:`write_region`): it covers the region in part, and the region has no
        version written since the last commit to patch in place."""
        return not (intra == 0 and length == self.geo.region_length(r)) and r not in self._dirty

    def write_region(self, r: int, intra: int, piece: memoryview, current: memoryview | None = None) -> None:
        """Write ``piece`` at ``intra`` in region ``r`` (shadow paging: the one place that does).

        A region written since the last commit holds no durable version in its current slot: it is
        patched in place (its checksum is computed once, at commit). Otherwise the region's new
        version goes whole to a free slot, so the durable version (if any) stays untouched until
        the next commit frees its slot. ``current``, which must be given when
        :meth:`needs_current` says so, holds the region's current bytes (from the layers below, or
        the remote PIT when the region's local versions are not valid, even one in this overlay);
        it is patched with ``piece`` and written whole.
        """
        geo = self.geo
        dirty_slot = self._dirty.get(r)
        in_place = dirty_slot is not None
        if dirty_slot is not None:
            slot = dirty_slot
        elif current is None and not (intra == 0 and len(piece) == geo.region_length(r)):
            raise OverlayCacheError(f"internal: a partial write of region {r} without its current bytes")
        else:
            slot = self._allocate()
        off = slot * geo.region_size
        if current is not None:
            current[intra : intra + len(piece)] = piece
            self.data.write(off, current)
        else:
            self.data.write(off + intra, piece)
        if not in_place:
            if self.present.test(r):
                self._releasing.append(self._record(r)[0])
            self._put(r, slot, bytes(16))  # its checksum comes at commit
            self.present.set(r)
            self._dirty[r] = slot

    def lost_regions(self) -> list[int]:
        """The regions whose current version lies (in part) past the end of a truncated data file."""
        end = self.truncated_at
        if end is None:
            return []
        out = []
        for a, b in self.present.runs():
            for r in range(a, b):
                if (self._record(r)[0] + 1) * self.geo.region_size > end:
                    out.append(r)
        return out

    def restore_length(self) -> None:
        """Give a truncated data file its length back (sparse), so that new versions can be written;
        call it once its lost regions are recorded as unavailable (their slots now read as zeros)."""
        if self.truncated_at is not None:
            os.ftruncate(self._fd, self._file_slots * self.geo.region_size)
            os.fsync(self._fd)
            self.truncated_at = None

    def hash_dirty(self) -> list[int]:
        """Compute the checksums of the regions written since the last commit (into their
        records); returns them, sorted."""
        regions = sorted(self._dirty)
        rs = self.geo.region_size
        for r in regions:
            slot = self._dirty[r]
            self._put(r, slot, bytes(self.data.checksum(slot * rs, self.geo.region_length(r))))
        return regions

    def commit(self) -> int:
        """Make every region written since the last commit durable; returns how many."""
        if not self._dirty:
            return 0
        regions = self.hash_dirty()
        self.data.sync()
        os.fsync(self._fd)
        out = bytearray(_BATCH.pack(_BATCH_MAGIC, len(regions), self._batch, self.slots_end, self.salt))
        for r in regions:
            slot, csum = self._record(r)
            out += _RECORD.pack(r, slot, csum)
        out += core.checksum(out)
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        try:
            written = os.write(fd, out)
            if written != len(out):
                raise MediaError(f"{self.journal_path}: short write", path=self.journal_path)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._batch += 1
        self._journal_bytes += len(out)
        for slot in self._releasing:
            heapq.heappush(self._free, slot)
        self._releasing = array("Q")
        for r in regions:
            self._pages.add(r * REC_SIZE // _PAGE)
        self._dirty = {}
        if self._journal_bytes >= JOURNAL_CHECKPOINT_BYTES:
            self.checkpoint()
        return len(regions)

    def checkpoint(self) -> None:
        """Fold the journal into the table and the map (committed entries only), then empty the
        journal."""
        if self._dirty:
            raise OverlayCacheError("checkpoint with uncommitted regions")  # internal misuse
        if not self._journal_bytes and not self._pages:
            return
        # Free slots at the end of the file are given back to the file system.
        if self._free:
            free = set(self._free)
            while self.slots_end and self.slots_end - 1 in free:
                self.slots_end -= 1
                free.discard(self.slots_end)
            self._free = sorted(free)
        self._store_table()
        page = bytearray(_PAGE)
        for p in sorted(self._pages):
            off = MAP_OFFSET + p * _PAGE
            n = min(_PAGE, self.records.length - off)
            self.records.readinto(off, memoryview(page)[:n])
            os.pwrite(self._map_fd, memoryview(page)[:n], off)
        os.fsync(self._map_fd)
        os.truncate(self.journal_path, 0)
        fd = os.open(self.journal_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._journal_bytes = 0
        self._pages.clear()
        self.records.discard()  # the private copies now equal the file
        if self._file_slots > self.slots_end and self.truncated_at is None:
            # Kept: a page past the last slot, which reads of it probe (see _allocate).
            os.ftruncate(self._fd, self.slots_end * self.geo.region_size + _PAGE)
            self._file_slots = self.slots_end

    def freeze(self) -> None:
        """Stop taking writes (a newer overlay takes them): the data file is mapped again at the length its slots need (read stacks built from now on use
        that; the large mapping is closed once no stack uses it, see :meth:`release_retired`).
        Call it with the stack lock held for writing, before the stacks are built again."""
        if self._dirty:
            raise OverlayCacheError("freeze with uncommitted regions")  # internal misuse
        need = self.slots_end * self.geo.region_size
        if self.data is not None and self.data.length > need and self.truncated_at is None:
            self._retired.append(self.data)
            self.data = core.DataFile(self._fd, need, self.writable, self.data_path)

    def release_retired(self) -> None:
        """Close the mappings :meth:`freeze` replaced that no read stack uses any more."""
        keep = []
        for old in self._retired:
            try:
                old.close()
            except OverlayCacheError:
                keep.append(old)  # still pinned by a stack
        self._retired = keep

    def stack_entry(self, verified: Any) -> tuple[Any, ...]:
        return (self.data, self.present, verified, self.records, MAP_OFFSET, self.salt)

    def regions(self) -> Iterable[int]:
        """The regions the overlay holds, in order."""
        for a, b in self.present.runs():
            yield from range(a, b)

    def _close_files(self) -> None:
        self.release_retired()
        for obj in (self.data, self.records):
            if obj is not None:
                obj.close()
        for fd in (self._fd, self._map_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._map_fd = -1

    def close(self) -> None:
        self._close_files()
