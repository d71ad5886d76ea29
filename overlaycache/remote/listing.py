"""Listing a volume's PIT snapshots on a store, reading a pack's index, and refusing a volume of
another format.

The lowest layer of reading a store: the catalog, the checker and the collapse build on it.
"""

from __future__ import annotations

from overlaycache.errors import CorruptionError, FormatError, ObjectNotFoundError, OverlayCacheError, SnapshotNotFoundError
from overlaycache.remote.layout import (
    PackIndex,
    check_volume_format,
    decode_pack_index,
    decode_root_header,
    decode_volume_record,
    is_root_key,
    root_header_length,
    root_key,
    roots_prefix,
    snapshot_id,
    volume_key,
)
from overlaycache.snapshots import Snapshot
from overlaycache.store.base import ObjectStore

__all__ = ["check_format", "list_snapshots", "read_pack_index"]

#: Enough bytes of a root for its header, label and volume id (:func:`decode_root_header`).
_HEADER_BYTES = 4096
#: The first GET of a pack's index: the index of a full 8 MiB pack of 64 KiB regions and more.
_INDEX_BYTES = 64 << 10


def check_format(store: ObjectStore, volume_id: str) -> None:
    """Refuse a volume the store holds in another format (a v1 store: one object per region).

    Raises
    ------
    FormatError
        The volume record names another format.
    """
    key = volume_key(volume_id)
    try:
        raw = store.get(key)
        info = decode_volume_record(raw, key, store.location)
    except (ObjectNotFoundError, CorruptionError):
        # Nothing stored yet, or a record missing or damaged (check() reports it): the PIT roots
        # carry their own format and geometry, checksummed, and say the rest.
        return
    check_volume_format(info, f"{store.location}/{key}")


def list_snapshots(store: ObjectStore, volume_id: str) -> list[Snapshot]:
    """The PIT snapshots of a volume, oldest first; each root's header is verified.

    Returns
    -------
    list of Snapshot
        Sorted by ``seq``; empty for an unknown volume.

    Raises
    ------
    FormatError
        The store holds the volume in another format.
    CorruptionError
        A root's header is damaged, or names another volume or seq than its key.
    """
    check_format(store, volume_id)
    out = []
    for key in store.list(roots_prefix(volume_id)):
        where = f"{store.location}/{key}"
        if key.endswith(".manifest"):
            raise FormatError(f"{where}: a PIT manifest of format 1; this overlaycache reads format 2 only", where)
        if not is_root_key(key):
            continue
        raw = store.get(key, 0, _HEADER_BYTES)
        if root_header_length(raw) > len(raw) == _HEADER_BYTES:  # a long label
            raw = store.get(key, 0, root_header_length(raw))
        seq, created, label, vid = decode_root_header(raw, where)
        if vid != volume_id or root_key(volume_id, seq) != key:
            raise CorruptionError(f"{where}: root of volume {vid!r} seq {seq:016x}, not of this key")
        out.append(Snapshot(snapshot_id(seq), seq, created, label))
    return sorted(out, key=lambda s: s.seq)


def read_pack_index(store: ObjectStore, key: str) -> PackIndex:
    """A pack's index, verified, from ranged GETs of its first bytes (a second one when the index
    is longer than the first asked for).

    Raises
    ------
    CorruptionError
        The index does not match its checksum, or the object is shorter than its index says.
    FormatError
        Not a pack, or of another format.
    """
    where = f"{store.location}/{key}"
    need = _INDEX_BYTES
    while True:
        got = decode_pack_index(store.get(key, 0, need), where)
        if not isinstance(got, int):
            return got
        if got <= need:  # the object is shorter than its index says
            raise CorruptionError(f"{where}: truncated pack index")
        need = got


def no_volume_error(store: ObjectStore, volume_id: str) -> OverlayCacheError:
    """The error for a volume whose record is missing: no such volume, or, when PIT roots of it are
    there, a missing record (damage), named."""
    key = volume_key(volume_id)
    if any(True for _ in store.list(roots_prefix(volume_id))):
        where = f"{store.location}/{key}"
        return CorruptionError(f"{where}: missing (the volume's PITs are there): restore the record, or "
                               "run overlaycache check")
    return SnapshotNotFoundError(f"{store.location}: no volume {volume_id!r}", volume_id)
