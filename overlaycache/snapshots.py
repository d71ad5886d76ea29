"""Snapshots of a volume: local ones (frozen overlays) and point-in-time ones on the secondary.

A *local snapshot* freezes the top overlay of a volume and pushes an empty one (the seed's overlay
snapshot, Fig. 2). Its image is the stack of layers from the base up to the frozen overlay.

A *PIT snapshot* lives on the secondary: a cutoff ``seq`` and a manifest that names, per region, the
newest stored version with ``seq <= cutoff`` and its checksum. Manifests are compact binary (fixed
records, zlib-compressed) and carry a checksum of themselves, so a tampered or truncated manifest is
a :class:`CorruptionError`, never wrong data.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from overlaycache._impl import core
from overlaycache.errors import CorruptionError, FormatError, InvalidArgumentError, SnapshotNotFoundError


@dataclass(frozen=True)
class LocalSnapshot:
    """A frozen level of a volume's local layer stack.

    Attributes
    ----------
    id : str
        Unique within the volume, never reused.
    label : str or None
        Optional unique name.
    created_at : float
        Seconds since the epoch.
    layer : int
        Id of the newest layer of its image (0 is the base).
    """

    id: str
    label: str | None
    created_at: float
    layer: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "created_at": self.created_at, "layer": self.layer}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LocalSnapshot:
        return cls(str(obj["id"]), obj.get("label"), float(obj["created_at"]), int(obj["layer"]))


# -- point-in-time snapshots on the secondary ------------------------------------------------------

MANIFEST_VERSION = 1
_MANIFEST_MAGIC = b"OCMANIF1"
# magic, version, region_size, num_regions, size, seq, created_at, label bytes, volume id bytes
_MANIFEST_HEAD = struct.Struct("<8sIIQQQdII")
#: One region in the remote map and in manifests: seq (0 = all zeros, never stored), checksum, spare.
RECORD = struct.Struct("<Q16s8x")


@dataclass(frozen=True)
class Snapshot:
    """A point-in-time snapshot on the secondary.

    Attributes
    ----------
    id : str
        The cutoff seq as 16 hex digits (the manifest's key).
    seq : int
        Cutoff: the snapshot holds, per region, the newest version with ``seq <= cutoff``.
    created_at : float
        Seconds since the epoch.
    label : str or None
        Optional name, unique per volume.
    """

    id: str
    seq: int
    created_at: float
    label: str | None


#: Every volume's keys are under ``volumes/<id>/``.
VOLUMES_PREFIX = "volumes/"


def volume_key(volume_id: str) -> str:
    """Key of a volume's geometry record: ``volumes/<id>/volume.json``."""
    return f"{VOLUMES_PREFIX}{volume_id}/volume.json"


def region_key(volume_id: str, region: int, seq: int) -> str:
    """Key of one region version: ``volumes/<id>/regions/<shard>/<region>/<seq>``."""
    shard = bytes(core.checksum(region.to_bytes(8, "little")))[0]
    return f"{VOLUMES_PREFIX}{volume_id}/regions/{shard:02x}/{region:012x}/{seq:016x}"


def manifests_prefix(volume_id: str) -> str:
    """The prefix of a volume's snapshot manifests: ``volumes/<id>/snapshots/``."""
    return f"{VOLUMES_PREFIX}{volume_id}/snapshots/"


def manifest_key(volume_id: str, seq: int) -> str:
    """Key of the manifest of the snapshot with cutoff ``seq``."""
    return f"{manifests_prefix(volume_id)}{seq:016x}.manifest"


def snapshot_id(seq: int) -> str:
    """The id of the snapshot with cutoff ``seq``."""
    return f"{seq:016x}"


def encode_manifest(volume_id: str, snap: Snapshot, size: int, region_size: int, records: bytes) -> bytes:
    """The compact binary manifest: header, zlib-compressed records, mmh3 of everything before."""
    n = (size + region_size - 1) // region_size
    if len(records) != n * RECORD.size:
        raise FormatError(f"manifest needs {n} records, got {len(records) // RECORD.size}")
    label = (snap.label or "").encode()
    vid = volume_id.encode()
    out = _MANIFEST_HEAD.pack(_MANIFEST_MAGIC, MANIFEST_VERSION, region_size, n, size, snap.seq,
                              snap.created_at, len(label), len(vid)) + label + vid
    out += zlib.compress(records, 1)
    return out + bytes(core.checksum(out))


@dataclass(frozen=True)
class Manifest:
    """A decoded manifest: geometry, the snapshot, and one record per region."""

    volume_id: str
    size: int
    region_size: int
    snapshot: Snapshot
    records: bytes

    @property
    def num_regions(self) -> int:
        return (self.size + self.region_size - 1) // self.region_size

    def entry(self, region: int) -> tuple[int, bytes]:
        """``(seq, checksum)`` of ``region`` in this snapshot (seq 0: all zeros)."""
        seq, csum = RECORD.unpack_from(self.records, region * RECORD.size)
        return int(seq), bytes(csum)


def decode_manifest(raw: bytes, key: str = "manifest") -> Manifest:
    """Parse and verify a manifest.

    Raises
    ------
    CorruptionError
        The bytes do not match their checksum (tampered or truncated object).
    FormatError
        Not a manifest, or a newer format.
    """
    if len(raw) < _MANIFEST_HEAD.size + 16 or bytes(core.checksum(raw[:-16])) != raw[-16:]:
        raise CorruptionError(f"{key}: manifest checksum mismatch (tampered or truncated)")
    magic, version, rs, n, size, seq, created, llen, vlen = _MANIFEST_HEAD.unpack_from(raw)
    if magic != _MANIFEST_MAGIC:
        raise FormatError(f"{key}: not a manifest", key)
    if version > MANIFEST_VERSION:
        raise FormatError(f"{key}: manifest format {version} is newer than this overlaycache", key)
    pos = _MANIFEST_HEAD.size
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
    """The snapshot described by the first bytes of a manifest (no checksum check: listing only)."""
    if len(raw) < _MANIFEST_HEAD.size or raw[:8] != _MANIFEST_MAGIC:
        raise CorruptionError(f"{key}: not a manifest header")
    _m, _v, _rs, _n, _size, seq, created, llen, _vlen = _MANIFEST_HEAD.unpack_from(raw)
    label = raw[_MANIFEST_HEAD.size : _MANIFEST_HEAD.size + llen].decode(errors="replace")
    return Snapshot(snapshot_id(seq), seq, created, label or None)


_S = TypeVar("_S", Snapshot, LocalSnapshot)


def find_snapshot(snapshots: Sequence[_S], key: Any, where: str) -> _S:
    """The snapshot named by ``key``: a snapshot, its id, or its label. One rule for local and PIT
    snapshots: an id matches first; a label must name exactly one snapshot.

    Raises
    ------
    SnapshotNotFoundError
        Nothing has that id or label.
    InvalidArgumentError
        ``key`` is not a snapshot or a string, or the label names several snapshots.
    """
    if isinstance(key, (Snapshot, LocalSnapshot)):
        key = key.id
    if not isinstance(key, str):
        raise InvalidArgumentError(f"expected a snapshot, its id or label, got {type(key).__name__}")
    for s in snapshots:
        if s.id == key:
            return s
    labelled = [s for s in snapshots if s.label == key]
    if len(labelled) == 1:
        return labelled[0]
    if labelled:
        raise InvalidArgumentError(f"{where}: label {key!r} names {len(labelled)} snapshots; use an id")
    raise SnapshotNotFoundError(f"{where}: no snapshot {key!r}", key)
