"""The object layout on the secondary (format v1): every key and every object format, in one place.

This module is the single reference for what overlaycache stores. Nothing else spells a key or
packs an object's bytes: the replicator, the catalog, the region source and the manifest codec
(:mod:`overlaycache.remote.manifest`) build and parse them through the names here. A new format
(v2: regions packed into large objects) replaces this module and the codecs behind it.

Keys
----
Keys are relative to the store's own prefix; every key of a volume is under ``volumes/<id>/``, so
several volumes share a bucket::

    volumes/<id>/volume.json                           the volume record
    volumes/<id>/regions/<shard>/<region>/<seq>        one region version
    volumes/<id>/snapshots/<seq>.manifest              one PIT snapshot

``<region>`` is the region number as 12 hex digits, ``<seq>`` 16 hex digits, and ``<shard>`` the
first byte, as 2 hex digits, of the mmh3 x64-128 checksum of the region number as 8 little-endian
bytes: it spreads the keys of neighbouring regions over the store's partitions.

Generations
-----------
``seq`` numbers the region versions of a volume: volume-wide, strictly increasing, each handed out
once (the replicator reserves them in blocks, durably). A PIT snapshot is a cutoff ``seq``; its id is
that seq as 16 hex digits (:func:`snapshot_id`), which is also the name of its manifest.

The volume record
-----------------
``volume.json``: UTF-8 JSON with sorted keys, ``{"format": 1, "id": <id>, "region_size": <int>,
"size": <int>}`` (:func:`encode_volume_record`). Written once, with a conditional PUT, when the
volume is first attached; a volume of another geometry with the same id is refused.

The region object
-----------------
Exactly the region's bytes, no header: ``region_size`` bytes, the last region of a volume
``size - region * region_size``. It carries no checksum of its own: its manifest record has it, and a
read that does not match is a :class:`~overlaycache.errors.CorruptionError`. Written once with a
conditional PUT under a new seq, never overwritten. A version that is all zeros is never stored:
the manifest records it with the checksum of zeros, and a reader serves it without a request.

The record
----------
:data:`RECORD`, 32 bytes per region: ``seq`` (uint64 little-endian; 0 means never stored, the region
is all zeros), the region's checksum (16 bytes, mmh3 x64-128 of its bytes; zeros where seq is 0),
8 spare bytes of zeros. The manifests hold one per region; so does the primary's local
``remote.map`` (the newest version of each region on the secondary).

The manifest
------------
One per PIT snapshot (codec: :mod:`overlaycache.remote.manifest`):

* :data:`MANIFEST_HEAD`, little-endian: magic ``OCMANIF1``, format version (uint32,
  :data:`MANIFEST_VERSION`), region_size (uint32), number of regions (uint64), size (uint64), the
  cutoff seq (uint64), created_at (float64, seconds since the epoch), label length and volume id
  length (uint32 each);
* the label (UTF-8, empty for none), then the volume id (UTF-8);
* the records, one per region in region order, zlib-compressed;
* 16 bytes: mmh3 x64-128 of everything before, so a tampered or truncated manifest is detected.

A listing needs only the header and the label, read with a ranged GET of the first bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from overlaycache._impl import core
from overlaycache.errors import FormatError

__all__ = [
    "MANIFEST_HEAD",
    "MANIFEST_MAGIC",
    "MANIFEST_SUFFIX",
    "MANIFEST_VERSION",
    "RECORD",
    "VOLUMES_PREFIX",
    "VOLUME_FORMAT",
    "decode_volume_record",
    "encode_volume_record",
    "is_manifest_key",
    "is_region_key",
    "manifest_key",
    "manifests_prefix",
    "parse_region_key",
    "region_key",
    "regions_prefix",
    "snapshot_id",
    "volume_key",
]

#: Every volume's keys are under ``volumes/<id>/``.
VOLUMES_PREFIX = "volumes/"
#: The format version written in the volume record.
VOLUME_FORMAT = 1
#: The last part of a manifest's key.
MANIFEST_SUFFIX = ".manifest"
#: The manifest format this module reads and writes; newer ones are refused.
MANIFEST_VERSION = 1
#: The first bytes of every manifest.
MANIFEST_MAGIC = b"OCMANIF1"
#: The manifest's header: magic, version, region_size, num_regions, size, seq, created_at, label
#: length, volume id length; the label and the volume id follow it.
MANIFEST_HEAD = struct.Struct("<8sIIQQQdII")
#: One region in the remote map and in manifests: seq (0 = all zeros, never stored), checksum, spare.
RECORD = struct.Struct("<Q16s8x")


# -- keys ------------------------------------------------------------------------------------------

def _volume_prefix(volume_id: str) -> str:
    return f"{VOLUMES_PREFIX}{volume_id}/"


def volume_key(volume_id: str) -> str:
    """Key of a volume's record.

    Parameters
    ----------
    volume_id : str
        The volume.

    Returns
    -------
    str
        ``volumes/<id>/volume.json``.
    """
    return f"{_volume_prefix(volume_id)}volume.json"


def regions_prefix(volume_id: str) -> str:
    """The prefix of every region object of a volume.

    Parameters
    ----------
    volume_id : str
        The volume.

    Returns
    -------
    str
        ``volumes/<id>/regions/``.
    """
    return f"{_volume_prefix(volume_id)}regions/"


def region_key(volume_id: str, region: int, seq: int) -> str:
    """Key of one region version.

    Parameters
    ----------
    volume_id : str
        The volume.
    region : int
        The region number.
    seq : int
        The version's generation (> 0: versions with seq 0 are never stored).

    Returns
    -------
    str
        ``volumes/<id>/regions/<shard>/<region>/<seq>``.
    """
    shard = bytes(core.checksum(region.to_bytes(8, "little")))[0]
    return f"{regions_prefix(volume_id)}{shard:02x}/{region:012x}/{seq:016x}"


def parse_region_key(key: str) -> tuple[str, int, int]:
    """The volume, region and seq named by a region object's key.

    Parameters
    ----------
    key : str
        A key as made by :func:`region_key`.

    Returns
    -------
    tuple of (str, int, int)
        ``(volume_id, region, seq)``.

    Raises
    ------
    ValueError
        ``key`` is not a region object's key.
    """
    parts = key.split("/")
    if len(parts) != 6 or f"{parts[0]}/" != VOLUMES_PREFIX or parts[2] != "regions":
        raise ValueError(f"not a region object's key: {key!r}")
    return parts[1], int(parts[4], 16), int(parts[5], 16)


def is_region_key(key: str) -> bool:
    """Whether ``key`` names a region object (see :func:`region_key`)."""
    try:
        parse_region_key(key)
    except ValueError:
        return False
    return True


def manifests_prefix(volume_id: str) -> str:
    """The prefix of a volume's snapshot manifests.

    Parameters
    ----------
    volume_id : str
        The volume.

    Returns
    -------
    str
        ``volumes/<id>/snapshots/``.
    """
    return f"{_volume_prefix(volume_id)}snapshots/"


def manifest_key(volume_id: str, seq: int) -> str:
    """Key of the manifest of the snapshot with cutoff ``seq``.

    Parameters
    ----------
    volume_id : str
        The volume.
    seq : int
        The snapshot's cutoff.

    Returns
    -------
    str
        ``volumes/<id>/snapshots/<seq>.manifest``.
    """
    return f"{manifests_prefix(volume_id)}{snapshot_id(seq)}{MANIFEST_SUFFIX}"


def is_manifest_key(key: str) -> bool:
    """Whether ``key`` names a manifest (see :func:`manifest_key`)."""
    return key.endswith(MANIFEST_SUFFIX)


def snapshot_id(seq: int) -> str:
    """The id of the snapshot with cutoff ``seq``: the seq as 16 hex digits."""
    return f"{seq:016x}"


# -- the volume record -------------------------------------------------------------------------------

def encode_volume_record(volume_id: str, size: int, region_size: int) -> bytes:
    """The volume record's bytes.

    Parameters
    ----------
    volume_id : str
        The volume.
    size : int
        The volume's size in bytes.
    region_size : int
        Bytes per region.

    Returns
    -------
    bytes
        UTF-8 JSON with sorted keys: ``format``, ``id``, ``region_size``, ``size``.
    """
    info = {"format": VOLUME_FORMAT, "id": volume_id, "size": size, "region_size": region_size}
    return json.dumps(info, sort_keys=True).encode()


def decode_volume_record(raw: bytes, key: str, location: str | None = None) -> dict[str, Any]:
    """Parse a volume record.

    Parameters
    ----------
    raw : bytes
        The object's bytes.
    key : str
        Its key, named by the error.
    location : str, optional
        The store, named in the error's message.

    Returns
    -------
    dict
        The record; it has at least integer ``size`` and ``region_size``.

    Raises
    ------
    FormatError
        The record is not valid JSON or lacks the geometry.
    """
    try:
        info = json.loads(raw)
        int(info["size"]), int(info["region_size"])
    except (ValueError, KeyError, TypeError) as exc:
        where = key if location is None else f"{location}/{key}"
        raise FormatError(f"{where}: invalid volume record", key) from exc
    return dict(info)
