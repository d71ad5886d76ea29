"""The object layout on the secondary (format v2): every key and every object format, in one place.

This module is the single reference for what overlaycache stores. Nothing else spells a key or
packs an object's bytes: the replicator, the catalog, the region source and the map tree
(:mod:`overlaycache.remote.tree`) build and parse them through the names here.

Format v2 packs region versions into large immutable objects and keeps each PIT snapshot's map as
a tree of immutable, content-addressed pages, so that replication writes few objects, a PIT after
``k`` changed regions writes ``O(k)`` bytes whatever the volume's size, and a read of adjacent
regions is one ranged GET. A store of format v1 (one object per region version, one full manifest
per PIT) is refused with a :class:`~overlaycache.errors.FormatError` naming its version.

Keys
----
Keys are relative to the store's own prefix; every key of a volume is under ``volumes/<id>/``, so
several volumes share a bucket::

    volumes/<id>/volume.json                          the volume record
    volumes/<id>/packs/<shard>/<pack>.pack            a pack of region versions
    volumes/<id>/packs/<shard>/<pack>.<gen>.pack      generation <gen> of a pack a collapse repacked
    volumes/<id>/pages/<hh>/<hash>                    a map page (content-addressed)
    volumes/<id>/snapshots/<seq>.<digest>.root        a PIT snapshot's root
    volumes/<id>/gc/<stamp>.json                      a collapse run's record
    volumes/<id>/leases/<snapshot>/<expires>-<holder>.json   a PIT in use until a time

``<pack>`` and ``<seq>`` are 16 hex digits, ``<gen>`` 8 (from 1); ``<digest>`` is the BLAKE2b-128
of the root object's bytes (:func:`root_digest`, 32 hex digits), so a root overwritten with other
bytes is refused by every reader (:func:`verify_root_digest`); roots written before digests were
added are keyed ``<seq>.root`` and still read, their header checksum verified. One root per PIT:
a second one for the same seq is refused, naming both; ``<shard>`` is the first byte, as 2 hex digits, of the
mmh3 x64-128 checksum of the pack number as 8 little-endian bytes (it spreads consecutive packs
over the store's partitions); ``<hash>`` is the page's address (32 hex digits) and ``<hh>`` its
first two.

Collapse records
----------------
``volumes/<id>/gc/<stamp>.json``: one per collapse run (:mod:`overlaycache.remote.collapse`),
UTF-8 JSON written before anything is deleted: the run's time, the policy, the PITs kept and
removed, and the map pages found unreferenced (*condemned*); a page is deleted only by a later run
that finds it still unreferenced. A ``checksum`` key holds the mmh3 x64-128 of the JSON of the
others (:func:`encode_gc_record`). ``check`` reads the newest records to name a PIT whose root is
gone although no collapse removed it.

Leases
------
``volumes/<id>/leases/<snapshot>/<expires>-<holder>.json``: PIT ``<snapshot>`` is in use by
``<holder>`` (a volume serving a distributed overlay from it, a recovery image or a clone elsewhere)
until ``<expires>`` (seconds since the epoch); the key says it all, the object holds the same as
JSON. A collapse keeps every PIT with a lease that has not expired. A holder renews by writing a new
lease; expired ones are deleted by a collapse.

Generations
-----------
``seq`` numbers the region versions, packs and PIT snapshots of a volume from one counter:
volume-wide, strictly increasing, each handed out once (the replicator reserves them in blocks,
durably). A pack's number is a seq; a PIT snapshot is a cutoff seq, its id that seq as 16 hex
digits (:func:`snapshot_id`). A PIT holds, per region, the newest version with ``seq <= cutoff``.

The volume record
-----------------
``volume.json``: UTF-8 JSON with sorted keys, ``{"checksum": <hex>, "format": 2, "id": <id>,
"region_size": <int>, "size": <int>}`` (:func:`encode_volume_record`); the checksum is the mmh3
x64-128 of the JSON of the other keys (a record without one, written before it was added, is
read as it is), and the id must be the one in the key. Written once, with a conditional PUT, when the
volume is first attached; a volume of another geometry with the same id is refused, and so is a
record of another format.

The pack
--------
Many region versions in one object, written once with a conditional PUT (:func:`encode_pack`):

* :data:`PACK_HEAD`, little-endian: magic ``OCPACK02``, version (uint32, :data:`PACK_VERSION`), region_size
  (uint32), number of entries (uint32), volume id length (uint32), the pack's seq (uint64),
  created_at (float64); then the volume id (UTF-8);
* the index: one :data:`PACK_ENTRY` per region version, in the order of the data: region (uint64),
  seq (uint64), offset of its bytes from the start of the pack (uint64), length (uint32), 4 bytes of
  zeros, checksum (16 bytes, mmh3 x64-128 of the region's bytes), digest (16 bytes: the BLAKE3
  hash of the region's bytes, cut to 16, :func:`version_digest`). A version that is all zeros has
  length 0 and no bytes in the pack (its checksum is that of the region's length of zeros, its
  digest zeros): it is listed so that the maps can be rebuilt from the packs alone;
* 16 bytes: mmh3 x64-128 of the header, volume id and index (the index alone is read and verified
  with one ranged GET of the pack's first bytes);
* the regions' bytes, back to back;
* 16 bytes: mmh3 x64-128 of everything before, so a damaged pack is detected by a full check.

A pack of version 2 (:data:`PACK_ENTRY_V2`, written before digests) has entries without the
digest; it is read, its versions having :data:`NO_DIGEST`.

A pack describes itself: :func:`decode_pack_index` lists what it holds, so the maps can be rebuilt
from the packs alone. The bytes of a region version that is all zeros are never stored: the pack
lists it with length 0, the map records it with that pack, length 0 and the checksum of zeros (so
the pack is kept while a PIT needs the listing), and a reader serves it without a request.

Repacked generations
--------------------
A collapse that finds a pack mostly dead (:mod:`overlaycache.remote.collapse`) writes its live
versions, in their order, as a new pack object of the same number and format under
``<pack>.<gen>.pack`` (``gen`` one above any generation there), then deletes the older object. Its
header names the same pack number and creation time; its index gives each version's new offset.
The maps are never rewritten: a record keeps naming the pack and the original offset, and a reader
that finds ``<pack>.pack`` gone lists the pack's generations and reads the version, by region and
seq, from the newest. The original, while it is there, is always whole and is read first.

The map record
--------------
:data:`RECORD`, 64 bytes: seq (uint64; 0: never replicated, the region is all zeros), pack (uint64),
offset in the pack (uint64), length (uint32; with pack 0 or length 0 the version is all zeros and
no bytes are stored), 4 bytes of zeros, checksum (16 bytes), digest (16 bytes; :data:`NO_DIGEST`
for a version shipped before digests). The primary's local ``remote.map`` holds one per region
(the newest version on the secondary); map pages hold the records of the regions they cover.

Two hashes, for two jobs. The checksum (mmh3 x64-128, 8 GB/s here) is what the primary computes on
every write and compares with: it tells whether the local copy of a region is the version a PIT
holds (distributed-overlay routing, resync, diff, restore). The digest (BLAKE3, 6 GB/s here) is
what a reader checks every version fetched from the store against: it is reached from the root
through addresses that are BLAKE2b digests, so replacing a version's bytes undetected means a
second preimage of BLAKE3, not a collision of mmh3, which is not built to resist one.

Map pages and the root
----------------------
A PIT's map is a tree of fixed span. A *leaf* covers :data:`LEAF_SPAN` consecutive regions; a node
of level ``l >= 1`` covers :data:`FANOUT` consecutive pages of level ``l - 1``. The *depth* is the
smallest ``d >= 1`` for which the volume has at most :data:`FANOUT` pages of level ``d - 1``
(:func:`tree_shape`): 1 up to 64 GiB of 64 KiB regions, 2 up to 64 TiB, 3 beyond. The root lists
the pages of level ``d - 1``.

A page (:func:`encode_page`): :data:`PAGE_HEAD` (magic ``OCPAGE02``, version (:data:`PAGE_VERSION`), level (uint32),
index of the page within its level (uint64), number of entries (uint32)), then the entries
zlib-compressed. A leaf's entries are :data:`LEAF_ENTRY` (the region's position within the leaf
(uint32) and its record's fields, the digest included; :data:`LEAF_ENTRY_V2` in a page of version
2, which has none), only for regions with ``seq > 0``; a node's are
:data:`NODE_ENTRY` (the child's position within the node (uint32) and the child's address), only
for children that have an entry. An empty page is never written. A page's *address* is
the BLAKE2b-128 digest of its header and its uncompressed entries (:func:`page_address`); its key
names the address, so a page that did not change between two PITs is one object, shared, and a
page whose bytes do not match its address is detected when read.

The root (:func:`encode_root`), one object per PIT snapshot:

* :data:`ROOT_HEAD`, little-endian: magic ``OCROOT02``, version, region_size (uint32), size
  (uint64), the cutoff seq (uint64), created_at (float64), leaf span, fan-out and depth (uint32
  each), label length, volume id length and number of entries (uint32 each); the label (UTF-8,
  empty for none) and the volume id;
* 16 bytes: mmh3 x64-128 of the header, label and volume id, so a listing verifies what it shows
  with one ranged GET of the first bytes;
* the top-level entries (:data:`NODE_ENTRY`, positions being page indexes at level ``d - 1``),
  zlib-compressed;
* 16 bytes: mmh3 x64-128 of everything before.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from overlaycache._impl import core
import blake3

from overlaycache.errors import CorruptionError, FormatError, InvalidArgumentError

__all__ = [
    "FANOUT",
    "LEAF_ENTRY",
    "LEAF_ENTRY_V2",
    "NO_DIGEST",
    "LEAF_SPAN",
    "NODE_ENTRY",
    "PACK_ENTRY",
    "PACK_ENTRY_V2",
    "PACK_VERSION",
    "PAGE_VERSION",
    "PACK_HEAD",
    "PAGE_HEAD",
    "RECORD",
    "RECORD_V2",
    "ROOT_HEAD",
    "ROOT_SUFFIX",
    "VOLUMES_PREFIX",
    "VOLUME_FORMAT",
    "PackEntry",
    "PackIndex",
    "Root",
    "check_volume_format",
    "decode_gc_record",
    "decode_pack_index",
    "decode_page",
    "decode_root",
    "decode_root_header",
    "root_header_length",
    "pack_index_size",
    "verify_pack",
    "decode_volume_record",
    "encode_gc_record",
    "encode_pack",
    "encode_page",
    "encode_root",
    "encode_volume_record",
    "gc_prefix",
    "gc_record_key",
    "is_pack_key",
    "lease_key",
    "leases_prefix",
    "is_root_key",
    "pack_generations_prefix",
    "pack_key",
    "packs_prefix",
    "page_address",
    "page_key",
    "pages_prefix",
    "parse_lease_key",
    "parse_pack_key",
    "parse_pack_key_generation",
    "parse_root_key",
    "pit_roots_prefix",
    "root_digest",
    "root_key",
    "verify_root_digest",
    "version_digest",
    "roots_prefix",
    "snapshot_id",
    "tree_shape",
    "volume_key",
]

#: Every volume's keys are under ``volumes/<id>/``.
VOLUMES_PREFIX = "volumes/"
#: The format version of the secondary this module reads and writes.
VOLUME_FORMAT = 2
#: The last part of a root's key.
ROOT_SUFFIX = ".root"
#: Regions per leaf page.
LEAF_SPAN = 1024
#: Children per node page (and at most in the root).
FANOUT = 1024

PACK_MAGIC = b"OCPACK02"
PAGE_MAGIC = b"OCPAGE02"
ROOT_MAGIC = b"OCROOT02"
#: magic, version, region_size, count, volume id length, pack seq, created_at.
PACK_HEAD = struct.Struct("<8sIIIIQd")
#: The version of the packs written (version 2, without digests, is read).
PACK_VERSION = 3
#: The version of the map pages written (version 2, whose leaves have no digests, is read).
PAGE_VERSION = 3
#: region, seq, offset, length, (zeros), checksum, digest.
PACK_ENTRY = struct.Struct("<QQQI4x16s16s")
#: A pack entry of version 2: region, seq, offset, length, (zeros), checksum.
PACK_ENTRY_V2 = struct.Struct("<QQQI4x16s")
#: seq, pack, offset, length, (zeros), checksum, digest.
RECORD = struct.Struct("<QQQI4x16s16s")
#: A record without a digest (``remote.map`` of format 3 and before).
RECORD_V2 = struct.Struct("<QQQI4x16s")
#: magic, version, level, index within the level, count.
PAGE_HEAD = struct.Struct("<8sIIQI")
#: position in the leaf, then a record's fields.
LEAF_ENTRY = struct.Struct("<IQQQI16s16s")
#: A leaf entry of version 2 (no digest).
LEAF_ENTRY_V2 = struct.Struct("<IQQQI16s")
#: The digest of a version that has none (written before digests, or all zeros).
NO_DIGEST = bytes(16)
#: position in the node (or, in the root, the page's index), child address.
NODE_ENTRY = struct.Struct("<I16s")
#: magic, version, region_size, size, seq, created_at, leaf span, fan-out, depth, label length,
#: volume id length, count.
ROOT_HEAD = struct.Struct("<8sIIQQdIIIIII")

_SUM = 16


def version_digest(data: Any) -> bytes:
    """A region version's digest: the first 16 bytes of the BLAKE3 hash of its bytes (what a
    reader checks a version fetched from the store against; the mmh3 checksum beside it is for
    comparing with the local copy)."""
    return blake3.blake3(data).digest(16)


def _sum(data: Any) -> bytes:
    return bytes(core.checksum(data))


# -- keys ------------------------------------------------------------------------------------------

def _volume_prefix(volume_id: str) -> str:
    return f"{VOLUMES_PREFIX}{volume_id}/"


def volume_key(volume_id: str) -> str:
    """Key of a volume's record: ``volumes/<id>/volume.json``."""
    return f"{_volume_prefix(volume_id)}volume.json"


def packs_prefix(volume_id: str) -> str:
    """The prefix of every pack of a volume: ``volumes/<id>/packs/``."""
    return f"{_volume_prefix(volume_id)}packs/"


def pack_key(volume_id: str, pack: int, generation: int = 0) -> str:
    """Key of pack number ``pack`` (> 0): ``volumes/<id>/packs/<shard>/<pack>.pack``; a repacked
    ``generation`` (> 0) of it: ``volumes/<id>/packs/<shard>/<pack>.<generation>.pack``."""
    shard = _sum(pack.to_bytes(8, "little"))[0]
    if generation:
        return f"{packs_prefix(volume_id)}{shard:02x}/{pack:016x}.{generation:08x}.pack"
    return f"{packs_prefix(volume_id)}{shard:02x}/{pack:016x}.pack"


def pack_generations_prefix(volume_id: str, pack: int) -> str:
    """The prefix of pack ``pack``'s key and of every repacked generation of it."""
    return pack_key(volume_id, pack)[: -len("pack")]


_PACK_NAME = re.compile(r"([0-9a-f]{16})(?:\.([0-9a-f]{8}))?\.pack")


def parse_pack_key(key: str) -> tuple[str, int]:
    """The volume and the pack number named by a pack's key (of any generation).

    Raises
    ------
    ValueError
        ``key`` is not a pack's key.
    """
    vid, pack, _gen = parse_pack_key_generation(key)
    return vid, pack


def parse_pack_key_generation(key: str) -> tuple[str, int, int]:
    """The volume, the pack number and the generation (0: as the primary stored it) named by a
    pack's key.

    Raises
    ------
    ValueError
        ``key`` is not a pack's key.
    """
    parts = key.split("/")
    if len(parts) != 5 or f"{parts[0]}/" != VOLUMES_PREFIX or parts[2] != "packs" or not parts[4].endswith(".pack"):
        raise ValueError(f"not a pack's key: {key!r}")
    m = _PACK_NAME.fullmatch(parts[4])
    if m is not None and (m.group(2) is None or int(m.group(2), 16) > 0):
        return parts[1], int(m.group(1), 16), int(m.group(2) or "0", 16)
    raise ValueError(f"not a pack's key: {key!r}")


def is_pack_key(key: str) -> bool:
    """Whether ``key`` names a pack (see :func:`pack_key`)."""
    try:
        parse_pack_key(key)
    except ValueError:
        return False
    return True


def pages_prefix(volume_id: str) -> str:
    """The prefix of every map page of a volume: ``volumes/<id>/pages/``."""
    return f"{_volume_prefix(volume_id)}pages/"


def page_key(volume_id: str, address: bytes) -> str:
    """Key of the page with ``address``: ``volumes/<id>/pages/<hh>/<hash>``."""
    h = address.hex()
    return f"{pages_prefix(volume_id)}{h[:2]}/{h}"


def roots_prefix(volume_id: str) -> str:
    """The prefix of a volume's PIT roots: ``volumes/<id>/snapshots/``."""
    return f"{_volume_prefix(volume_id)}snapshots/"


def root_key(volume_id: str, seq: int, digest: bytes | None = None) -> str:
    """Key of the root of the PIT with cutoff ``seq``:
    ``volumes/<id>/snapshots/<seq>.<digest>.root``, ``digest`` being the root's
    :func:`root_digest`; without one, the key roots had before digests were added
    (``volumes/<id>/snapshots/<seq>.root``, still read)."""
    if digest is None:
        return f"{roots_prefix(volume_id)}{snapshot_id(seq)}{ROOT_SUFFIX}"
    return f"{roots_prefix(volume_id)}{snapshot_id(seq)}.{digest.hex()}{ROOT_SUFFIX}"


def pit_roots_prefix(volume_id: str, seq: int) -> str:
    """The prefix of every root key of the PIT with cutoff ``seq`` (one, unless tampered with)."""
    return f"{roots_prefix(volume_id)}{snapshot_id(seq)}."


def root_digest(raw: Any) -> bytes:
    """The digest a root's key carries: BLAKE2b-128 of the root object's bytes."""
    return hashlib.blake2b(raw, digest_size=16).digest()


_ROOT_NAME = re.compile(r"([0-9a-f]{16})(?:\.([0-9a-f]{32}))?\.root")


def parse_root_key(key: str) -> tuple[int, bytes | None]:
    """The cutoff seq and the digest (None for a key without one) a root's key names.

    Raises
    ------
    ValueError
        ``key`` is not a root's key.
    """
    m = _ROOT_NAME.fullmatch(key.rsplit("/", 1)[-1])
    if m is None:
        raise ValueError(f"not a PIT root's key: {key!r}")
    return int(m.group(1), 16), None if m.group(2) is None else bytes.fromhex(m.group(2))


def is_root_key(key: str) -> bool:
    """Whether ``key`` names a PIT root (see :func:`root_key`)."""
    try:
        parse_root_key(key)
    except ValueError:
        return False
    return True


def verify_root_digest(raw: Any, key: str, where: str | None = None) -> None:
    """Check a root's bytes against the digest its key carries (a key without one: nothing to check).

    Raises
    ------
    CorruptionError
        They differ: the object was overwritten or damaged.
    """
    _seq, digest = parse_root_key(key)
    if digest is not None and root_digest(raw) != digest:
        raise CorruptionError(f"{where or key}: the root's bytes do not match the BLAKE2b digest in its key "
                              "(overwritten or damaged)")


def gc_prefix(volume_id: str) -> str:
    """The prefix of a volume's collapse records: ``volumes/<id>/gc/``."""
    return f"{_volume_prefix(volume_id)}gc/"


def gc_record_key(volume_id: str, stamp: int) -> str:
    """Key of the record of one collapse run: ``volumes/<id>/gc/<stamp>.json`` (``stamp``: the
    run's time in microseconds since the epoch, 16 hex digits, so records list in time order)."""
    return f"{gc_prefix(volume_id)}{stamp:016x}.json"


def leases_prefix(volume_id: str) -> str:
    """The prefix of a volume's leases: ``volumes/<id>/leases/``."""
    return f"{_volume_prefix(volume_id)}leases/"


def lease_key(volume_id: str, snapshot: str, expires: float, holder: str) -> str:
    """Key of a lease on PIT ``snapshot`` until ``expires`` (seconds since the epoch) by ``holder``:
    ``volumes/<id>/leases/<snapshot>/<expires>-<holder>.json`` (``expires`` in whole seconds, 12
    digits; ``holder`` a name of letters, digits, ``.``, ``_`` and ``-``). A renewal is a new lease."""
    if not isinstance(holder, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", holder):
        raise InvalidArgumentError(f"a lease holder is 1 to 100 letters, digits, '.', '_' or '-', got {holder!r}")
    return f"{leases_prefix(volume_id)}{snapshot}/{int(expires):012d}-{holder}.json"


def parse_lease_key(key: str) -> tuple[str, float, str] | None:
    """``(snapshot, expires, holder)`` of a lease's key, or None when it is not one."""
    parts = key.split("/")
    if len(parts) != 5 or parts[2] != "leases" or not parts[4].endswith(".json"):
        return None
    stamp, sep, holder = parts[4][: -len(".json")].partition("-")
    if not sep or not stamp.isdigit():
        return None
    return parts[3], float(stamp), holder


def snapshot_id(seq: int) -> str:
    """The id of the snapshot with cutoff ``seq``: the seq as 16 hex digits."""
    return f"{seq:016x}"


# -- the volume record -------------------------------------------------------------------------------

def encode_volume_record(volume_id: str, size: int, region_size: int) -> bytes:
    """The volume record's bytes: UTF-8 JSON with sorted keys ``checksum``, ``format``, ``id``,
    ``region_size``, ``size``; ``checksum`` is the mmh3 x64-128 (hex) of the record's JSON without
    it (see :func:`_record_checksum`)."""
    info: dict[str, Any] = {"format": VOLUME_FORMAT, "id": volume_id, "size": size, "region_size": region_size}
    info["checksum"] = _record_checksum(info)
    return json.dumps(info, sort_keys=True).encode()


def encode_gc_record(record: dict[str, Any]) -> bytes:
    """A collapse run's record (UTF-8 JSON, sorted keys) with a ``checksum`` key: the mmh3 x64-128
    of the JSON of the others, as the volume record's."""
    info = dict(record)
    info["checksum"] = _record_checksum(info)
    return json.dumps(info, sort_keys=True).encode()


def decode_gc_record(raw: bytes, where: str) -> dict[str, Any]:
    """Parse a collapse run's record (one written before checksums were added is read as it is).

    Raises
    ------
    CorruptionError
        Not a JSON object, or its checksum does not match.
    """
    try:
        info = json.loads(raw)
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise CorruptionError(f"{where}: damaged collapse record ({exc})") from exc
    if "checksum" in info and info["checksum"] != _record_checksum(info):
        raise CorruptionError(f"{where}: damaged collapse record (its checksum does not match)")
    info.pop("checksum", None)
    return info


def _record_checksum(info: dict[str, Any]) -> str:
    body = {k: v for k, v in info.items() if k != "checksum"}
    return _sum(json.dumps(body, sort_keys=True).encode()).hex()


def decode_volume_record(raw: bytes, key: str, location: str | None = None) -> dict[str, Any]:
    """Parse a volume record.

    Returns
    -------
    dict
        The record; it has at least integer ``format``, ``size`` and ``region_size``.

    Raises
    ------
    FormatError
        The record is not valid JSON or lacks the geometry.
    CorruptionError
        The record fails its checksum, or names another volume than its key.
    """
    where = key if location is None else f"{location}/{key}"
    try:
        info = json.loads(raw)
        int(info["size"]), int(info["region_size"]), int(info.get("format", 1))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{where}: invalid volume record", key) from exc
    if "checksum" in info:
        if info["checksum"] != _record_checksum(info):
            raise CorruptionError(f"{where}: damaged volume record (its checksum does not match)")
    elif not set(info) <= {"format", "id", "region_size", "size"}:  # a record from before checksums
        raise CorruptionError(f"{where}: damaged volume record (no checksum, and keys {sorted(info)})")
    parts = key.split("/")
    if len(parts) == 3 and parts[2] == "volume.json" and "id" in info and info["id"] != parts[1]:
        raise CorruptionError(f"{where}: the record of volume {info['id']!r}, not of this key")
    info = dict(info)
    info.pop("checksum", None)
    info["format"] = int(info.get("format", 1))
    return info


def check_volume_format(info: dict[str, Any], where: str) -> None:
    """Refuse a volume record of another format than :data:`VOLUME_FORMAT`.

    Raises
    ------
    FormatError
        Names the format found and the one this overlaycache reads.
    """
    found = info.get("format")
    if found != VOLUME_FORMAT:
        raise FormatError(f"{where}: the secondary holds this volume in format {found}; this overlaycache "
                          f"reads and writes format {VOLUME_FORMAT} only", where)


# -- packs -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackEntry:
    """One region version in a pack: its region, seq, where its bytes are, and their checksum."""

    region: int
    seq: int
    offset: int
    length: int
    checksum: bytes
    #: :func:`version_digest` of its bytes (:data:`NO_DIGEST` in a pack of version 2, and for a
    #: version that is all zeros).
    digest: bytes = NO_DIGEST


@dataclass(frozen=True)
class PackIndex:
    """What a pack says about itself (:func:`decode_pack_index`)."""

    volume_id: str
    region_size: int
    pack: int
    created_at: float
    entries: tuple[PackEntry, ...]
    #: Bytes of header, volume id, index and index checksum: where the data starts.
    data_offset: int


def pack_index_size(count: int, volume_id: str, version: int = PACK_VERSION) -> int:
    """Bytes before a pack's data: header, volume id, ``count`` index entries, index checksum."""
    entry = PACK_ENTRY if version >= 3 else PACK_ENTRY_V2
    return PACK_HEAD.size + len(volume_id.encode()) + count * entry.size + _SUM


def encode_pack(volume_id: str, region_size: int, pack: int, created_at: float,
                versions: Sequence[tuple[Any, ...]]) -> tuple[bytearray, list[PackEntry]]:
    """A pack object of ``versions``.

    Parameters
    ----------
    volume_id : str
        The volume.
    region_size : int
        Bytes per region.
    pack : int
        The pack's number (a seq).
    created_at : float
        Seconds since the epoch.
    versions : sequence of (region, seq, data, checksum[, digest])
        The region versions, in the order to store them; ``data`` empty for a version that is all
        zeros (listed, not stored). A digest missing (or :data:`NO_DIGEST`) is computed
        (:func:`version_digest`) for a version with bytes.

    Returns
    -------
    raw : bytearray
        The pack's bytes.
    entries : list of PackEntry
        Where each version is in it, in the order given.
    """
    vid = volume_id.encode()
    pos = pack_index_size(len(versions), volume_id)
    entries = []
    for region, seq, data, csum, *rest in versions:
        digest = rest[0] if rest else NO_DIGEST
        if len(data) and digest == NO_DIGEST:
            digest = version_digest(data)
        entries.append(PackEntry(region, seq, pos, len(data), csum, digest if len(data) else NO_DIGEST))
        pos += len(data)
    head = bytearray(PACK_HEAD.pack(PACK_MAGIC, PACK_VERSION, region_size, len(versions), len(vid), pack,
                                    created_at))
    head += vid
    for e in entries:
        head += PACK_ENTRY.pack(e.region, e.seq, e.offset, e.length, e.checksum, e.digest)
    head += _sum(head)
    out = bytearray(pos + _SUM)  # one buffer, filled in place: no copy of the whole pack
    out[: len(head)] = head
    for e, version in zip(entries, versions):
        out[e.offset : e.offset + e.length] = version[2]
    view = memoryview(out)
    out[pos:] = _sum(view[:pos])
    view.release()
    return out, entries


def decode_pack_index(raw: bytes, key: str = "pack") -> PackIndex | int:
    """A pack's index, from its first bytes.

    Parameters
    ----------
    raw : bytes
        The pack's first bytes (or all of it).
    key : str
        What to call it in errors.

    Returns
    -------
    PackIndex or int
        The index; or, when ``raw`` is too short to hold it, how many bytes are needed.

    Raises
    ------
    CorruptionError
        The index does not match its checksum.
    FormatError
        Not a pack, or of another format.
    """
    if len(raw) < PACK_HEAD.size:
        return PACK_HEAD.size
    magic, version, rs, count, vlen, pack, created = PACK_HEAD.unpack_from(raw)
    if magic != PACK_MAGIC:
        raise FormatError(f"{key}: not a pack", key)
    if version not in (2, PACK_VERSION):
        raise FormatError(f"{key}: pack of format {version}, not {PACK_VERSION} (or 2)", key)
    entry = PACK_ENTRY if version == PACK_VERSION else PACK_ENTRY_V2
    need: int = PACK_HEAD.size + vlen + count * entry.size + _SUM
    if len(raw) < need:
        return need
    if _sum(raw[: need - _SUM]) != raw[need - _SUM : need]:
        raise CorruptionError(f"{key}: pack index checksum mismatch (damaged object)")
    vid = raw[PACK_HEAD.size : PACK_HEAD.size + vlen].decode(errors="replace")
    entries = []
    pos = PACK_HEAD.size + vlen
    for fields in entry.iter_unpack(raw[pos : pos + count * entry.size]):
        region, seq, off, length, csum = fields[:5]
        entries.append(PackEntry(region, seq, off, length, bytes(csum),
                                 bytes(fields[5]) if len(fields) > 5 else NO_DIGEST))
    return PackIndex(vid, rs, pack, created, tuple(entries), need)


def verify_pack(raw: bytes, key: str = "pack") -> PackIndex:
    """Decode and verify a whole pack: its index, its trailing checksum and every region's checksum.

    Raises
    ------
    CorruptionError
        Any of them does not match, or the pack is truncated.
    FormatError
        Not a pack, or of another format.
    """
    index = decode_pack_index(raw, key)
    if isinstance(index, int) or len(raw) < _SUM or _sum(raw[:-_SUM]) != raw[-_SUM:]:
        raise CorruptionError(f"{key}: pack checksum mismatch (damaged or truncated object)")
    for e in index.entries:
        if e.length == 0:
            continue  # all zeros: listed, not stored
        data = memoryview(raw)[e.offset : e.offset + e.length]
        if e.offset + e.length > len(raw) - _SUM or _sum(data) != e.checksum or (
                e.digest != NO_DIGEST and version_digest(data) != e.digest):
            raise CorruptionError(f"{key}: region {e.region} version {e.seq:016x} does not match its checksum")
    return index


# -- map pages ----------------------------------------------------------------------------------------

def tree_shape(num_regions: int) -> tuple[int, list[int]]:
    """The depth of a volume's map tree and the number of pages at each level.

    Returns
    -------
    depth : int
        Levels of pages below the root (>= 1).
    counts : list of int
        ``counts[l]``: pages at level ``l`` (0: leaves), for ``l < depth``.
    """
    counts = [max(1, -(-num_regions // LEAF_SPAN))]
    while counts[-1] > FANOUT:
        counts.append(-(-counts[-1] // FANOUT))
    return len(counts), counts


def page_address(head: bytes, body: bytes) -> bytes:
    """A page's address: BLAKE2b-128 of its header and uncompressed entries."""
    h = hashlib.blake2b(head, digest_size=16)
    h.update(body)
    return h.digest()


def encode_page(level: int, index: int, entries: bytes, count: int) -> tuple[bytes, bytes]:
    """A map page.

    Parameters
    ----------
    level : int
        0 for a leaf.
    index : int
        The page's index within its level.
    entries : bytes
        ``count`` :data:`LEAF_ENTRY` (a leaf) or :data:`NODE_ENTRY` (a node), by position.
    count : int
        How many.

    Returns
    -------
    address : bytes
        16 bytes (:func:`page_address`).
    raw : bytes
        The object's bytes.
    """
    head = PAGE_HEAD.pack(PAGE_MAGIC, PAGE_VERSION, level, index, count)
    return page_address(head, entries), head + zlib.compress(entries, 1)


def decode_page(raw: bytes, address: bytes, level: int, index: int, key: str = "page") -> tuple[bytes, int]:
    """Parse and verify a map page.

    Parameters
    ----------
    raw : bytes
        The object's bytes.
    address : bytes
        The address it was fetched by.
    level, index : int
        Where in the tree it was expected.
    key : str
        What to call it in errors.

    Returns
    -------
    entries : bytes
        Its uncompressed entries.
    count : int
        How many.

    Raises
    ------
    CorruptionError
        The page does not match its address, or is not where it was expected.
    FormatError
        Not a page, or of another format.
    """
    if len(raw) < PAGE_HEAD.size:
        raise CorruptionError(f"{key}: truncated map page")
    magic, version, lvl, idx, count = PAGE_HEAD.unpack_from(raw)
    if magic != PAGE_MAGIC:
        raise FormatError(f"{key}: not a map page", key)
    if version not in (2, PAGE_VERSION):
        raise FormatError(f"{key}: map page of format {version}, not {PAGE_VERSION} (or 2)", key)
    try:
        body = zlib.decompress(raw[PAGE_HEAD.size :])
    except zlib.error as exc:
        raise CorruptionError(f"{key}: map page does not decompress (damaged object)") from exc
    if page_address(raw[: PAGE_HEAD.size], body) != address:
        raise CorruptionError(f"{key}: map page does not match its address (damaged object)")
    size = NODE_ENTRY.size if lvl else LEAF_ENTRY.size if version == PAGE_VERSION else LEAF_ENTRY_V2.size
    if (lvl, idx) != (level, index) or len(body) != count * size:
        raise CorruptionError(f"{key}: map page for level {lvl} page {idx}, expected level {level} page {index}")
    if lvl == 0 and version != PAGE_VERSION:  # a leaf of version 2: its entries with no digest
        body = b"".join(LEAF_ENTRY.pack(*fields, NO_DIGEST) for fields in LEAF_ENTRY_V2.iter_unpack(body))
    return body, count


# -- roots ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Root:
    """A decoded PIT root: the snapshot, the volume's geometry, the tree's shape and its top entries."""

    volume_id: str
    size: int
    region_size: int
    seq: int
    created_at: float
    label: str | None
    depth: int
    #: Page index at level ``depth - 1`` -> address.
    children: dict[int, bytes]

    @property
    def num_regions(self) -> int:
        """The number of regions."""
        return (self.size + self.region_size - 1) // self.region_size


def encode_root(volume_id: str, size: int, region_size: int, seq: int, created_at: float, label: str | None,
                children: Iterable[tuple[int, bytes]]) -> bytes:
    """A PIT root object (see the module docstring); ``children`` are (page index, address) at the
    tree's top level, by index."""
    n = (size + region_size - 1) // region_size
    depth, _counts = tree_shape(n)
    lab = (label or "").encode()
    vid = volume_id.encode()
    body = b"".join(NODE_ENTRY.pack(i, a) for i, a in children)
    count = len(body) // NODE_ENTRY.size
    head = ROOT_HEAD.pack(ROOT_MAGIC, VOLUME_FORMAT, region_size, size, seq, created_at, LEAF_SPAN, FANOUT, depth,
                          len(lab), len(vid), count) + lab + vid
    out = head + _sum(head) + zlib.compress(body, 1)
    return out + _sum(out)


def _root_head(raw: bytes, key: str) -> tuple[tuple[Any, ...], str | None, str, int]:
    if len(raw) < ROOT_HEAD.size + _SUM:
        raise CorruptionError(f"{key}: truncated PIT root")
    fields = ROOT_HEAD.unpack_from(raw)
    magic, version = fields[0], fields[1]
    if magic != ROOT_MAGIC:
        if raw[:8] == b"OCMANIF1":
            raise FormatError(f"{key}: a PIT manifest of format 1; this overlaycache reads format "
                              f"{VOLUME_FORMAT} only", key)
        raise FormatError(f"{key}: not a PIT root", key)
    if version != VOLUME_FORMAT:
        raise FormatError(f"{key}: PIT root of format {version}, not {VOLUME_FORMAT}", key)
    llen, vlen = fields[9], fields[10]
    end = ROOT_HEAD.size + llen + vlen
    if len(raw) < end + _SUM:
        raise CorruptionError(f"{key}: truncated PIT root")
    if _sum(raw[:end]) != raw[end : end + _SUM]:
        raise CorruptionError(f"{key}: PIT root header checksum mismatch (damaged object)")
    label = raw[ROOT_HEAD.size : ROOT_HEAD.size + llen].decode()
    vid = raw[ROOT_HEAD.size + llen : end].decode()
    return fields, label or None, vid, end + _SUM


def root_header_length(raw: bytes) -> int:
    """How many first bytes of a root hold its header, label, volume id and header checksum (0
    when ``raw`` does not start with a root's header)."""
    if len(raw) < ROOT_HEAD.size or raw[:8] != ROOT_MAGIC:
        return 0
    fields = ROOT_HEAD.unpack_from(raw)
    return int(ROOT_HEAD.size + fields[9] + fields[10] + _SUM)


def decode_root_header(raw: bytes, key: str = "root") -> tuple[int, float, str | None, str]:
    """The cutoff seq, created_at, label and volume id from a root's first bytes, verified.

    Raises
    ------
    CorruptionError
        The header does not match its checksum, or ``raw`` is too short.
    FormatError
        Not a root, or of another format (a v1 manifest is named as such).
    """
    fields, label, vid, _end = _root_head(raw, key)
    return int(fields[4]), float(fields[5]), label, vid


def decode_root(raw: bytes, key: str = "root") -> Root:
    """Parse and verify a whole PIT root.

    Raises
    ------
    CorruptionError
        The root does not match its checksums, or its shape is not the one its geometry implies.
    FormatError
        Not a root, or of another format.
    """
    fields, label, vid, end = _root_head(raw, key)
    if _sum(raw[:-_SUM]) != raw[-_SUM:]:
        raise CorruptionError(f"{key}: PIT root checksum mismatch (tampered or truncated)")
    _m, _v, rs, size, seq, created, span, fanout, depth, _l, _vl, count = fields
    n = (size + rs - 1) // rs if rs else 0
    if rs <= 0 or (span, fanout, depth) != (LEAF_SPAN, FANOUT, tree_shape(n)[0]):
        raise CorruptionError(f"{key}: PIT root has a tree shape ({span}, {fanout}, {depth}) this volume cannot have")
    try:
        body = zlib.decompress(raw[end:-_SUM])
    except zlib.error as exc:
        raise CorruptionError(f"{key}: PIT root body does not decompress") from exc
    if len(body) != count * NODE_ENTRY.size:
        raise CorruptionError(f"{key}: PIT root has {len(body)} bytes of entries for {count}")
    children = {}
    for k in range(count):
        i, addr = NODE_ENTRY.unpack_from(body, k * NODE_ENTRY.size)
        children[int(i)] = bytes(addr)
    return Root(vid, size, rs, seq, created, label, depth, children)
