"""The manifest codec: a PIT snapshot's per-region table, to and from its object's bytes.

A manifest names, per region, the newest stored version with ``seq <= cutoff`` and its checksum.
Its byte format is described in :mod:`overlaycache.remote.layout`. Decoding verifies the manifest's
own checksum first, so a tampered or truncated manifest is a :class:`CorruptionError`, never wrong
data; a manifest of a newer format is a :class:`FormatError`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from overlaycache._impl import core
from overlaycache.errors import CorruptionError, FormatError
from overlaycache.remote.layout import MANIFEST_HEAD, MANIFEST_MAGIC, MANIFEST_VERSION, RECORD, snapshot_id
from overlaycache.snapshots import Snapshot

__all__ = ["Manifest", "decode_manifest", "encode_manifest", "read_manifest_header"]


def encode_manifest(volume_id: str, snap: Snapshot, size: int, region_size: int, records: bytes) -> bytes:
    """The compact binary manifest: header, zlib-compressed records, mmh3 of everything before.

    Parameters
    ----------
    volume_id : str
        The volume.
    snap : Snapshot
        The snapshot (its seq, created_at and label are written).
    size, region_size : int
        The volume's geometry.
    records : bytes
        One :data:`~overlaycache.remote.layout.RECORD` per region, in region order.

    Returns
    -------
    bytes
        The manifest object.

    Raises
    ------
    FormatError
        ``records`` does not hold one record per region.
    """
    n = (size + region_size - 1) // region_size
    if len(records) != n * RECORD.size:
        raise FormatError(f"manifest needs {n} records, got {len(records) // RECORD.size}")
    label = (snap.label or "").encode()
    vid = volume_id.encode()
    out = MANIFEST_HEAD.pack(MANIFEST_MAGIC, MANIFEST_VERSION, region_size, n, size, snap.seq,
                             snap.created_at, len(label), len(vid)) + label + vid
    out += zlib.compress(records, 1)
    return out + bytes(core.checksum(out))


@dataclass(frozen=True)
class Manifest:
    """A decoded manifest: geometry, the snapshot, and one record per region.

    Attributes
    ----------
    volume_id : str
        The volume it belongs to.
    size, region_size : int
        The volume's geometry.
    snapshot : Snapshot
        The snapshot it describes.
    records : bytes
        One :data:`~overlaycache.remote.layout.RECORD` per region.
    """

    volume_id: str
    size: int
    region_size: int
    snapshot: Snapshot
    records: bytes

    @property
    def num_regions(self) -> int:
        """The number of regions."""
        return (self.size + self.region_size - 1) // self.region_size

    def entry(self, region: int) -> tuple[int, bytes]:
        """``(seq, checksum)`` of ``region`` in this snapshot (seq 0: all zeros)."""
        seq, csum = RECORD.unpack_from(self.records, region * RECORD.size)
        return int(seq), bytes(csum)


def decode_manifest(raw: bytes, key: str = "manifest") -> Manifest:
    """Parse and verify a manifest.

    Parameters
    ----------
    raw : bytes
        The object's bytes.
    key : str
        What to call it in errors (its key or file).

    Returns
    -------
    Manifest
        The decoded manifest.

    Raises
    ------
    CorruptionError
        The bytes do not match their checksum (tampered or truncated object).
    FormatError
        Not a manifest, or a newer format.
    """
    if len(raw) < MANIFEST_HEAD.size + 16 or bytes(core.checksum(raw[:-16])) != raw[-16:]:
        raise CorruptionError(f"{key}: manifest checksum mismatch (tampered or truncated)")
    magic, version, rs, n, size, seq, created, llen, vlen = MANIFEST_HEAD.unpack_from(raw)
    if magic != MANIFEST_MAGIC:
        raise FormatError(f"{key}: not a manifest", key)
    if version > MANIFEST_VERSION:
        raise FormatError(f"{key}: manifest format {version} is newer than this overlaycache", key)
    pos = MANIFEST_HEAD.size
    label = raw[pos : pos + llen].decode()
    vid = raw[pos + llen : pos + llen + vlen].decode()
    try:
        records = zlib.decompress(raw[pos + llen + vlen : -16])
    except zlib.error as exc:
        raise CorruptionError(f"{key}: manifest body does not decompress") from exc
    if len(records) != n * RECORD.size:
        raise CorruptionError(f"{key}: manifest has {len(records)} bytes of records for {n} regions")
    snap = Snapshot(snapshot_id(seq), seq, created, label or None)
    return Manifest(vid, size, rs, snap, records)


def read_manifest_header(raw: bytes, key: str = "manifest") -> Snapshot:
    """The snapshot described by the first bytes of a manifest (no checksum check: listing only).

    Parameters
    ----------
    raw : bytes
        At least the header and the label (a ranged GET of the object's first bytes).
    key : str
        What to call it in errors.

    Returns
    -------
    Snapshot
        Its id, seq, created_at and label.

    Raises
    ------
    CorruptionError
        The bytes do not start with a manifest header.
    """
    if len(raw) < MANIFEST_HEAD.size or raw[:8] != MANIFEST_MAGIC:
        raise CorruptionError(f"{key}: not a manifest header")
    _m, _v, _rs, _n, _size, seq, created, llen, _vlen = MANIFEST_HEAD.unpack_from(raw)
    label = raw[MANIFEST_HEAD.size : MANIFEST_HEAD.size + llen].decode(errors="replace")
    return Snapshot(snapshot_id(seq), seq, created, label or None)
