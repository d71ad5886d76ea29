"""Convert a volume of local format 1 (overlays of two slots per region) to format 2, in place.

Format 1 kept each overlay region at slot ``r`` or ``r + num_regions`` of a data file twice the
volume's size, a table of present/which bitmaps and checksums, and a journal of
``(region, slot, checksum)`` batches; ``base.sums`` had a 64-byte header. :func:`convert_volume`
reads all of that (the journal replayed as format 1 did), verifies every region version against
its checksum, and builds the format-2 files in ``.convert/`` inside the volume: the base's
checksums moved to the new offsets, each overlay's versions copied into slots. Only once they are
all durable (marked by ``.convert/READY``) are they moved over the old files, and ``volume.json``
rewritten last. A conversion interrupted before ``READY`` is started again; after it, finished.
``base.data`` is not touched.

A region version that does not match its format-1 checksum, or cannot be read, is not carried
over: the region is recorded in ``unavailable.map`` (served from the secondary, or an error naming
it), never converted into a version with a fresh checksum.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from dataclasses import dataclass

from overlaycache._fs import DIR_MODE, FILE_MODE, fsync_dir, lock_directory, read_json_checked, write_json_atomic
from overlaycache._impl import core
from overlaycache.errors import FormatError, OverlayCacheError
from overlaycache.local.geometry import Geometry
from overlaycache.local.layers import SUM_SIZE, SUMS_OFFSET, Overlay, create_sparse, pack_header
from overlaycache.local.meta import META_KIND, META_NAME, META_VERSION, VolumeMeta
from overlaycache.local.unavailable import UNAVAILABLE_MAP, UnavailableMap

_log = logging.getLogger(__name__)

__all__ = ["ConvertReport", "convert_volume"]

_V1_HEADER = struct.Struct("<8sIIQQ")  # magic, version, region_size, num_regions, size
_V1_HEADER_SIZE = 64
_V1_BATCH = struct.Struct("<4sIQ")  # OCJB, count, batch number
_V1_RECORD = struct.Struct("<QB7x16s")  # region, slot (0 or 1), checksum
_WORK = ".convert"
_READY = "READY"
_CHUNK = 1 << 20


@dataclass
class ConvertReport:
    """What :func:`convert_volume` did.

    Attributes
    ----------
    path : str
        The volume.
    overlays : int
        Overlays converted.
    regions : int
        Overlay region versions carried over.
    unavailable : list of int
        Regions whose version could not be carried over (damaged), now unavailable.
    resumed : bool
        A conversion interrupted after its files were complete was finished.
    """

    path: str
    overlays: int
    regions: int
    unavailable: list[int]
    resumed: bool = False


def _read_v1_header(path: str, magic: bytes, geo: Geometry) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    head = raw[: _V1_HEADER.size]
    if len(raw) < _V1_HEADER_SIZE or head[:8] != magic:
        raise FormatError(f"{path}: not a file of local format 1", path)
    if raw[_V1_HEADER.size : _V1_HEADER.size + 16] != core.checksum(head):
        raise FormatError(f"{path}: header checksum mismatch (file corrupted)", path)
    _magic, version, rs, n, size = _V1_HEADER.unpack(head)
    if (version, rs, n, size) != (1, geo.region_size, geo.num_regions, geo.size):
        raise FormatError(f"{path}: not of this volume's geometry (format {version})", path)
    return raw


def _v1_overlay(directory: str, layer_id: int, geo: Geometry) -> dict[int, tuple[int, bytes]]:
    """The committed versions of a format-1 overlay: ``{region: (slot 0/1, checksum)}``."""
    prefix = os.path.join(directory, f"overlay-{layer_id}")
    n = geo.num_regions
    nw = 8 * ((n + 63) // 64)
    raw = _read_v1_header(prefix + ".table", b"OCTABL01", geo)
    if len(raw) < _V1_HEADER_SIZE + 2 * nw + 16 * n:
        raise FormatError(f"{prefix}.table: truncated", prefix + ".table")
    present = core.Bitmap(n)
    which = core.Bitmap(n)
    present.load(raw[_V1_HEADER_SIZE : _V1_HEADER_SIZE + nw])
    which.load(raw[_V1_HEADER_SIZE + nw : _V1_HEADER_SIZE + 2 * nw])
    sums = raw[_V1_HEADER_SIZE + 2 * nw :]
    out = {r: (int(which.test(r)), sums[16 * r : 16 * r + 16]) for a, b in present.runs() for r in range(a, b)}
    with open(prefix + ".journal", "rb") as f:
        journal = f.read()
    pos = 0
    while pos + _V1_BATCH.size <= len(journal):
        magic, count, _batch = _V1_BATCH.unpack_from(journal, pos)
        end = pos + _V1_BATCH.size + count * _V1_RECORD.size
        if magic != b"OCJB" or end + 16 > len(journal) or core.checksum(journal[pos:end]) != journal[end : end + 16]:
            break
        for k in range(count):
            r, slot, csum = _V1_RECORD.unpack_from(journal, pos + _V1_BATCH.size + k * _V1_RECORD.size)
            if r >= n or slot > 1:
                raise FormatError(f"{prefix}.journal: record for region {r} out of range", prefix + ".journal")
            out[r] = (slot, csum)
        pos = end + 16
    if journal.find(b"OCJB", pos + 1) >= 0 and pos < len(journal):
        raise FormatError(f"{prefix}.journal: a damaged batch before valid ones; cannot convert safely",
                          prefix + ".journal")
    return out


def _build(directory: str, meta: VolumeMeta, work: str) -> tuple[int, list[int]]:
    """Build the format-2 files in ``work``; returns the versions carried over and the damaged regions."""
    geo = meta.geometry
    n = geo.num_regions
    # base.sums: the same entries, after the new header.
    old = _read_v1_header(os.path.join(directory, "base.sums"), b"OCBASE01", geo)
    if len(old) < _V1_HEADER_SIZE + SUM_SIZE * n:
        raise FormatError(f"{directory}/base.sums: truncated", os.path.join(directory, "base.sums"))
    sums_path = os.path.join(work, "base.sums")
    create_sparse(sums_path, pack_header(b"OCBASE02", geo, meta.id, 0), SUMS_OFFSET + SUM_SIZE * n)
    fd = os.open(sums_path, os.O_WRONLY)
    try:
        for start in range(0, SUM_SIZE * n, _CHUNK):
            chunk = old[_V1_HEADER_SIZE + start : _V1_HEADER_SIZE + min(start + _CHUNK, SUM_SIZE * n)]
            os.pwrite(fd, chunk, SUMS_OFFSET + start)
        os.fsync(fd)
    finally:
        os.close(fd)
    carried = 0
    damaged: list[int] = []
    rs = geo.region_size
    for layer_id in meta.layers:
        versions = _v1_overlay(directory, layer_id, geo)
        Overlay.create(work, layer_id, geo, meta.id)
        ov = Overlay(work, layer_id, geo, True, meta.id, top=True)
        try:
            with open(os.path.join(directory, f"overlay-{layer_id}.data"), "rb") as data:
                for r in sorted(versions):
                    slot, csum = versions[r]
                    length = geo.region_length(r)
                    raw = os.pread(data.fileno(), length, (r + slot * n) * rs)
                    if len(raw) != length or core.checksum(raw) != csum:
                        damaged.append(r)
                        continue
                    ov.write_region(r, 0, memoryview(raw))
                    carried += 1
                    if ov.regions_dirty >= 4096:
                        ov.commit()
            ov.commit()
            ov.checkpoint()
        finally:
            ov.close()
    fsync_dir(work)
    return carried, sorted(set(damaged))


def convert_volume(path: str | os.PathLike[str]) -> ConvertReport:
    """Convert the volume in ``path`` from local format 1 to format 2 (see the module docstring).

    Raises
    ------
    FormatError
        ``path`` is not a volume, is of format 2 already, or a file needed to convert it is damaged.
    VolumeLockedError
        The volume is open.
    """
    path = os.fspath(path)
    obj = read_json_checked(path, META_NAME, META_KIND, META_VERSION, "volume")
    if obj["version"] == META_VERSION:
        raise FormatError(f"{path}: already of local format {META_VERSION}", os.path.join(path, META_NAME))
    lock = lock_directory(path, False, "volume is open; close it to convert it")
    try:
        v2 = dict(obj)
        v2["version"] = META_VERSION
        meta = VolumeMeta.from_json(v2, os.path.join(path, META_NAME))
        if meta.merging is not None:
            raise FormatError(f"{path}: a merge was interrupted; finish it with the overlaycache that began it",
                              os.path.join(path, META_NAME))
        work = os.path.join(path, _WORK)
        resumed = os.path.exists(os.path.join(work, _READY))
        carried, damaged = 0, list[int]()
        if not resumed:
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work, mode=DIR_MODE)
            carried, damaged = _build(path, meta, work)
            unavail = UnavailableMap(path, meta.geometry.num_regions, meta.id)
            for r in damaged:
                unavail.add(r)
            if damaged:
                unavail.store()
            fd = os.open(os.path.join(work, _READY), os.O_WRONLY | os.O_CREAT, FILE_MODE)
            os.fsync(fd)
            os.close(fd)
            fsync_dir(work)
        # The switch: every new file over its old one (idempotent), then volume.json.
        for name in sorted(os.listdir(work)):
            if name != _READY:
                os.replace(os.path.join(work, name), os.path.join(path, name))
        fsync_dir(path)
        if damaged or os.path.exists(os.path.join(path, UNAVAILABLE_MAP)):
            v2 = {**v2, "unavailable": True}  # unavailable.map must be there from now on
        write_json_atomic(path, META_NAME, {k: v for k, v in v2.items() if k != "checksum"})
        shutil.rmtree(work)
        fsync_dir(path)
        if damaged:
            _log.error("%s: regions %s did not match their checksums and were not converted; they are unavailable",
                       path, damaged)
        _log.warning("%s: converted from local format %s to %d", path, obj["version"], META_VERSION)
        return ConvertReport(path, len(meta.layers), carried, damaged, resumed)
    except OSError as exc:
        raise OverlayCacheError(f"{path}: conversion failed: {exc}") from exc
    finally:
        os.close(lock)

