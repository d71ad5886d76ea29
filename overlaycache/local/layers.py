"""Local layers of a volume: the base file and overlay files, with their bitmaps and checksums.

On-disk format (all little-endian; pinned by golden files in ``tests/golden``):

``base.data``
    The base image, ``size`` bytes, region ``r`` at ``r * region_size``.
``base.sums``
    A 64-byte header, then 16 bytes (mmh3 x64-128) per region.
``overlay-<id>.data``
    Two slots per region: region ``r`` lives at slot ``r`` or slot ``r + num_regions`` (bit ``r`` of
    the *which* bitmap). Sparse: only written slots take space.
``overlay-<id>.table``
    A 64-byte header, the *present* bitmap, the *which* bitmap (8-byte words each), and 16 bytes of
    checksum per region. Written only with entries already committed in the journal.
``overlay-<id>.journal``
    Committed batches since the last checkpoint: a 16-byte header (``OCJB``, count, batch number),
    ``count`` 32-byte records (region, slot, checksum), and a 16-byte checksum of the batch.

Crash safety (shadow paging): a region whose current version is durable is never overwritten in
place; its next version goes to its other slot. ``commit()`` makes the data durable first and only
then appends the journal batch that points at it, so a crash at any point leaves every region at its
last committed version, whole. A torn journal tail fails its checksum and is ignored.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterable
from typing import Any

from overlaycache._fs import FILE_MODE, write_file_new
from overlaycache._impl import core
from overlaycache.errors import FormatError, MediaError, OverlayCacheError
from overlaycache.local.geometry import Geometry, region_ranges

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUM_SIZE = 16
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, region_size, num_regions, size
_HEADER_SIZE = 64
_BASE_MAGIC = b"OCBASE01"
_TABLE_MAGIC = b"OCTABL01"
_BATCH = struct.Struct("<4sIQ")  # magic, count, batch number
_BATCH_MAGIC = b"OCJB"
_RECORD = struct.Struct("<QB7x16s")  # region, slot (0 or 1), checksum
# Checkpoint the journal into the table once it is this large.
JOURNAL_CHECKPOINT_BYTES = 8 << 20


def zero_checksums(size: int, region_size: int) -> bytearray:
    """The checksum table of an all-zero image."""
    n = (size + region_size - 1) // region_size
    full: bytes = core.checksum(bytes(region_size))
    table = bytearray(full * n)
    tail = size - (n - 1) * region_size
    if n and tail != region_size:
        table[16 * (n - 1) :] = core.checksum(bytes(tail))
    return table


def _pack_header(magic: bytes, region_size: int, num_regions: int, size: int) -> bytes:
    head = _HEADER.pack(magic, FORMAT_VERSION, region_size, num_regions, size)
    head += bytes(core.checksum(head))
    return head.ljust(_HEADER_SIZE, b"\0")


def _check_header(raw: bytes, magic: bytes, path: str, region_size: int, num_regions: int, size: int) -> None:
    if len(raw) < _HEADER_SIZE:
        raise FormatError(f"{path}: truncated header", path)
    fields = raw[: _HEADER.size]
    got_magic, version, rs, n, sz = _HEADER.unpack(fields)
    if got_magic != magic:
        kind = {_BASE_MAGIC: "base checksum", _TABLE_MAGIC: "overlay table"}.get(magic, "metadata")
        raise FormatError(f"{path}: not an overlaycache {kind} file", path)
    if raw[_HEADER.size : _HEADER.size + 16] != core.checksum(fields):
        raise FormatError(f"{path}: header checksum mismatch (file corrupted)", path)
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version} is newer than this overlaycache ({FORMAT_VERSION})", path)
    if (rs, n, sz) != (region_size, num_regions, size):
        raise FormatError(f"{path}: geometry {sz}/{rs} does not match the volume's {size}/{region_size}", path)


def _read_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise FormatError(f"{path}: truncated (expected {n} bytes at offset {offset}, got {len(data)})", path)
    return data


def _open_data(path: str, length: int, writable: bool) -> tuple[int, Any, int | None]:
    """Open and map a data file of ``length`` bytes; returns its fd, its mapping, and where it ends
    if it is shorter (truncated under the volume: the bytes past its end cannot be read, and a read
    of them raises :class:`MediaError` through the core's SIGBUS guard, never zeros)."""
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: missing", path) from exc
    try:
        actual = os.fstat(fd).st_size
        short = None
        if actual < length:
            _log.error("%s: truncated (%d bytes, expected %d); the regions stored past its end are unavailable",
                       path, actual, length)
            short = actual
        return fd, core.DataFile(fd, length, writable, path), short
    except BaseException:
        os.close(fd)
        raise


class Layer:
    """What every layer has: a data file, a checksum table, and a verified-regions bitmap."""

    name: str
    data: Any
    sums: bytearray
    verified: Any

    def stack_entry(self) -> tuple[Any, Any, Any, bytearray, Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class BaseLayer(Layer):
    """The base image: region ``r`` at ``r * region_size``, checksums in ``base.sums``."""

    def __init__(self, directory: str, geo: Geometry, writable: bool) -> None:
        self.name = "base"
        self.geo = geo
        self.data_path = os.path.join(directory, "base.data")
        self.sums_path = os.path.join(directory, "base.sums")
        self.writable = writable
        self._fd, self.data, self.truncated_at = _open_data(self.data_path, geo.size, writable)
        try:
            self.sums = self._load_sums()
        except BaseException:
            self.data.close()
            os.close(self._fd)
            raise
        self.verified = core.Bitmap(geo.num_regions)

    @staticmethod
    def create(directory: str, geo: Geometry) -> None:
        """Create an all-zero base (sparse) with its checksum table."""
        fd = os.open(os.path.join(directory, "base.data"), os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.ftruncate(fd, geo.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        head = _pack_header(_BASE_MAGIC, geo.region_size, geo.num_regions, geo.size)
        write_file_new(os.path.join(directory, "base.sums"), head + bytes(zero_checksums(geo.size, geo.region_size)))

    def _load_sums(self) -> bytearray:
        try:
            fd = os.open(self.sums_path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise FormatError(f"{self.sums_path}: missing", self.sums_path) from exc
        try:
            g = self.geo
            _check_header(_read_exact(fd, _HEADER_SIZE, 0, self.sums_path), _BASE_MAGIC, self.sums_path,
                          g.region_size, g.num_regions, g.size)
            return bytearray(_read_exact(fd, 16 * g.num_regions, _HEADER_SIZE, self.sums_path))
        finally:
            os.close(fd)

    def store_sums(self, regions: Iterable[int]) -> None:
        """Write the checksums of ``regions`` to ``base.sums`` and fsync it."""
        fd = os.open(self.sums_path, os.O_WRONLY)
        try:
            for r in regions:
                os.pwrite(fd, self.sums[16 * r : 16 * r + 16], _HEADER_SIZE + 16 * r)
            os.fsync(fd)
        finally:
            os.close(fd)

    def stack_entry(self) -> tuple[Any, Any, Any, bytearray, Any]:
        return (self.data, None, None, self.sums, self.verified)

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
        os.close(self._fd)


class Overlay(Layer):
    """An overlay: two slots per region, present/which bitmaps, checksums, and a journal."""

    def __init__(self, directory: str, layer_id: int, geo: Geometry, writable: bool) -> None:
        self.id = layer_id
        self.name = f"overlay-{layer_id}"
        self.geo = geo
        self.writable = writable
        prefix = os.path.join(directory, self.name)
        self.data_path = prefix + ".data"
        self.table_path = prefix + ".table"
        self.journal_path = prefix + ".journal"
        n = geo.num_regions
        self.present = core.Bitmap(n)
        self.which = core.Bitmap(n)
        self.dirty = core.Bitmap(n)  # written since the last commit (in memory only)
        self.verified = core.Bitmap(n)
        self.sums = bytearray(16 * n)
        self._batch = 0
        self._journal_bytes = 0
        self.untrusted: list[int] = []  # regions a damaged journal may have committed (see _replay_journal)
        self._fd, self.data, self.truncated_at = _open_data(self.data_path, 2 * n * geo.region_size, writable)
        try:
            self._load_table()
            self._replay_journal()
        except BaseException:
            self.data.close()
            os.close(self._fd)
            raise

    # -- files ----------------------------------------------------------------------------------
    @staticmethod
    def create(directory: str, layer_id: int, geo: Geometry) -> None:
        """Create the empty files of an overlay (durably)."""
        prefix = os.path.join(directory, f"overlay-{layer_id}")
        fd = os.open(prefix + ".data", os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.ftruncate(fd, 2 * geo.num_regions * geo.region_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        nw = 8 * ((geo.num_regions + 63) // 64)
        head = _pack_header(_TABLE_MAGIC, geo.region_size, geo.num_regions, geo.size)
        write_file_new(prefix + ".table", head + bytes(2 * nw + 16 * geo.num_regions))
        write_file_new(prefix + ".journal", b"")

    @staticmethod
    def remove_files(directory: str, layer_id: int) -> None:
        """Delete the files of an overlay (missing ones are fine)."""
        for ext in (".data", ".table", ".journal"):
            try:
                os.unlink(os.path.join(directory, f"overlay-{layer_id}{ext}"))
            except FileNotFoundError:
                pass

    def _table_offsets(self) -> tuple[int, int, int]:
        nw = 8 * self.present.nwords
        return _HEADER_SIZE, _HEADER_SIZE + nw, _HEADER_SIZE + 2 * nw

    def _load_table(self) -> None:
        try:
            fd = os.open(self.table_path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise FormatError(f"{self.table_path}: missing", self.table_path) from exc
        try:
            g = self.geo
            _check_header(_read_exact(fd, _HEADER_SIZE, 0, self.table_path), _TABLE_MAGIC, self.table_path,
                          g.region_size, g.num_regions, g.size)
            p_off, w_off, s_off = self._table_offsets()
            nw = 8 * self.present.nwords
            self.present.load(_read_exact(fd, nw, p_off, self.table_path))
            self.which.load(_read_exact(fd, nw, w_off, self.table_path))
            self.sums[:] = _read_exact(fd, 16 * g.num_regions, s_off, self.table_path)
        finally:
            os.close(fd)

    def _batch_end(self, raw: bytes, pos: int) -> int | None:
        """Where the batch starting at ``pos`` ends (after its checksum), if a whole, valid one does."""
        if pos + _BATCH.size > len(raw):
            return None
        magic, count, _batch = _BATCH.unpack_from(raw, pos)
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

    def _replay_journal(self) -> None:
        """Apply the committed batches. A bad batch at the end is a torn tail (never committed: cut
        off). A bad batch followed by valid ones is corruption: the valid ones are applied, the
        regions the damaged span may have named (all, when it cannot be parsed) are left in
        :attr:`untrusted` unless a later batch names them again, the journal is kept as it is and
        a copy of it saved beside it, and it is logged as an error."""
        try:
            with open(self.journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError as exc:
            raise FormatError(f"{self.journal_path}: missing", self.journal_path) from exc
        n = self.geo.num_regions
        suspect = core.Bitmap(n)
        damaged = 0
        pos = 0
        while pos < len(raw):
            end = self._batch_end(raw, pos)
            if end is None:
                later = self._next_batch(raw, pos)
                if later is None:
                    break  # torn or garbage tail: everything before it was committed
                self._suspect_span(raw, pos, later, suspect)
                damaged += later - pos
                pos = later
                continue
            _magic, count, batch = _BATCH.unpack_from(raw, pos)
            for k in range(count):
                r, slot, csum = _RECORD.unpack_from(raw, pos + _BATCH.size + k * _RECORD.size)
                if r >= n or slot > 1:
                    raise FormatError(f"{self.journal_path}: record for region {r} out of range", self.journal_path)
                self._apply(r, slot, csum)
                suspect.clear(r)  # named again after the damage: this version is committed
            self._batch = batch + 1
            pos = end
        self.untrusted = [r for a, b in suspect.runs() for r in range(a, b)]
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

    def _suspect_span(self, raw: bytes, start: int, stop: int, suspect: core.Bitmap) -> None:
        """Mark the regions a damaged span of the journal may name: those of its records when it
        is laid out as one batch whose records are all plausible, else every region."""
        nrec, rest = divmod(stop - start - _BATCH.size - 16, _RECORD.size)
        records = []
        if nrec >= 0 and rest == 0:
            for k in range(nrec):
                r, slot, _csum = _RECORD.unpack_from(raw, start + _BATCH.size + k * _RECORD.size)
                if r >= self.geo.num_regions or slot > 1:
                    break
                records.append(r)
            else:
                for r in records:
                    suspect.set(r)
                return
        suspect.set_range(0, self.geo.num_regions)

    def _apply(self, r: int, slot: int, csum: bytes) -> None:
        self.present.set(r)
        if slot:
            self.which.set(r)
        else:
            self.which.clear(r)
        self.sums[16 * r : 16 * r + 16] = csum

    # -- commit protocol ------------------------------------------------------------------------
    def slot_offset(self, r: int, slot: int) -> int:
        """Byte offset of region ``r``'s slot ``slot`` (0 or 1) in the data file."""
        return (r + slot * self.geo.num_regions) * self.geo.region_size

    def needs_current(self, r: int, intra: int, length: int) -> bool:
        """Whether a write of ``length`` bytes at ``intra`` in region ``r`` needs the region's current
        bytes (see :meth:`write_region`): it covers the region in part, and the region has no
        version written since the last commit to patch in place."""
        return not (intra == 0 and length == self.geo.region_length(r)) and not self.dirty.test(r)

    def write_region(self, r: int, intra: int, piece: memoryview, current: memoryview | None = None) -> None:
        """Write ``piece`` at ``intra`` in region ``r`` (shadow paging: the one place that does).

        A region written since the last commit holds no durable version in its current slot: it is
        patched in place (its checksum is computed once, at commit). Otherwise the region's other
        slot is written whole, so the durable version (if any) stays untouched until the next
        commit. ``current``, which must be given when :meth:`needs_current` says so, holds the
        region's current bytes (from the layers below, or the remote PIT when the region's local
        versions are not valid, even one in this overlay); it is patched with ``piece`` and
        written whole.
        """
        in_place = self.dirty.test(r)
        if in_place:
            slot = int(self.which.test(r))
        else:
            slot = int(not self.which.test(r)) if self.present.test(r) else 0
        geo = self.geo
        off = (r + slot * geo.num_regions) * geo.region_size  # slot_offset, inline: the hot path
        if current is not None:
            current[intra : intra + len(piece)] = piece
            self.data.write(off, current)
        elif in_place or (intra == 0 and len(piece) == min(geo.region_size, geo.size - r * geo.region_size)):
            self.data.write(off + intra, piece)
        else:
            raise OverlayCacheError(f"internal: a partial write of region {r} without its current bytes")
        if not in_place:
            if slot:
                self.which.set(r)
            else:
                self.which.clear(r)
            self.present.set(r)
            self.dirty.set(r)
        self.verified.set(r)

    def lost_regions(self) -> list[int]:
        """The regions whose current version lies (in part) past the end of a truncated data file."""
        end = self.truncated_at
        if end is None:
            return []
        out = []
        for a, b in self.present.runs():
            for r in range(a, b):
                if self.slot_offset(r, int(self.which.test(r))) + self.geo.region_length(r) > end:
                    out.append(r)
        return out

    def restore_length(self) -> None:
        """Give a truncated data file its length back (sparse), so that new versions can be written;
        call it once its lost regions are recorded as unavailable (their slots now read as zeros)."""
        if self.truncated_at is not None:
            os.ftruncate(self._fd, 2 * self.geo.num_regions * self.geo.region_size)
            os.fsync(self._fd)
            self.truncated_at = None

    def hash_dirty(self) -> list[int]:
        """Compute the checksums of the regions written since the last commit; returns them."""
        regions = [r for a, b in self.dirty.runs() for r in range(a, b)]
        for r in regions:
            off = self.slot_offset(r, int(self.which.test(r)))
            self.sums[16 * r : 16 * r + 16] = self.data.checksum(off, self.geo.region_length(r))
        return regions

    def commit(self) -> int:
        """Make every region written since the last commit durable; returns how many."""
        regions = self.hash_dirty()
        if not regions:
            return 0
        self.data.sync()
        os.fsync(self._fd)
        out = bytearray(_BATCH.pack(_BATCH_MAGIC, len(regions), self._batch))
        for r in regions:
            out += _RECORD.pack(r, int(self.which.test(r)), bytes(self.sums[16 * r : 16 * r + 16]))
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
        self.dirty.clear_range(0, self.geo.num_regions)
        if self._journal_bytes >= JOURNAL_CHECKPOINT_BYTES:
            self.checkpoint()
        return len(regions)

    def checkpoint(self) -> None:
        """Fold the journal into the table (committed entries only), then empty the journal."""
        if self.dirty.any():
            raise OverlayCacheError("checkpoint with uncommitted regions")  # internal misuse
        if not self._journal_bytes:
            return
        p_off, w_off, s_off = self._table_offsets()
        fd = os.open(self.table_path, os.O_WRONLY)
        try:
            os.pwrite(fd, self.present.to_bytes(), p_off)
            os.pwrite(fd, self.which.to_bytes(), w_off)
            os.pwrite(fd, self.sums, s_off)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.truncate(self.journal_path, 0)
        fd = os.open(self.journal_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._journal_bytes = 0

    def stack_entry(self) -> tuple[Any, Any, Any, bytearray, Any]:
        return (self.data, self.present, self.which, self.sums, self.verified)

    def close(self) -> None:
        self.data.close()
        os.close(self._fd)
