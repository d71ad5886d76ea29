"""Listing a volume's PIT snapshots on a store, reading a pack's index, and refusing a volume of
another format.

The lowest layer of reading a store: the catalog, the checker and the collapse build on it.
"""

from __future__ import annotations

from collections.abc import Iterable

from overlaycache.errors import CorruptionError, FormatError, ObjectNotFoundError, OverlayCacheError, SnapshotNotFoundError
from overlaycache.remote.layout import (
    PackIndex,
    Root,
    check_volume_format,
    decode_pack_index,
    decode_root,
    decode_root_header,
    decode_volume_record,
    parse_root_key,
    pit_roots_prefix,
    root_header_length,
    roots_prefix,
    snapshot_id,
    verify_root_digest,
    volume_key,
)
from overlaycache.snapshots import Snapshot
from overlaycache.store.base import ObjectStore

__all__ = ["check_format", "find_root_key", "list_roots", "list_snapshots", "read_pack_index", "read_root",
           "roots_by_seq"]

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
    """The PIT snapshots of a volume, oldest first; each root is verified (see :func:`list_roots`).

    Returns
    -------
    list of Snapshot
        Sorted by ``seq``; empty for an unknown volume.

    Raises
    ------
    FormatError
        The store holds the volume in another format.
    CorruptionError
        A root does not match the digest in its key, its header is damaged, it names another
        volume or seq than its key, or a PIT has more than one root.
    """
    return [snap for snap, _key in list_roots(store, volume_id)]


def list_roots(store: ObjectStore, volume_id: str) -> list[tuple[Snapshot, str]]:
    """The PIT snapshots of a volume with their roots' keys, oldest first.

    A root whose key carries a digest (every root written since digests were added) is read whole
    and checked against it, so an overwritten root is refused, never listed; a root of the older
    key form has its header's checksum verified. A PIT with two roots (overlaycache writes one: the
    other was put there by someone else) is refused naming both.

    Raises
    ------
    FormatError
        The store holds the volume in another format.
    CorruptionError
        As for :func:`list_snapshots`.
    """
    check_format(store, volume_id)
    listed = list(store.list(roots_prefix(volume_id)))
    for key in listed:
        if key.endswith(".manifest"):
            where = f"{store.location}/{key}"
            raise FormatError(f"{where}: a PIT manifest of format 1; this overlaycache reads format 2 only", where)
    out = []
    for seq, keys in sorted(roots_by_seq(listed).items()):
        key = _one_root(store, seq, keys)
        where = f"{store.location}/{key}"
        try:
            if parse_root_key(key)[1] is not None:
                raw = store.get(key)
                verify_root_digest(raw, key, where)
            else:
                raw = store.get(key, 0, _HEADER_BYTES)
                if root_header_length(raw) > len(raw) == _HEADER_BYTES:  # a long label
                    raw = store.get(key, 0, root_header_length(raw))
        except ObjectNotFoundError:
            continue  # listed, then removed (a collapse): no longer a PIT
        got, created, label, vid = decode_root_header(raw, where)
        if vid != volume_id or got != seq:
            raise CorruptionError(f"{where}: root of volume {vid!r} seq {got:016x}, not of this key")
        out.append((Snapshot(snapshot_id(seq), seq, created, label), key))
    return out


def roots_by_seq(keys: Iterable[str]) -> dict[int, list[str]]:
    """The PIT root keys among ``keys``, by the seq they name (one each, unless tampered with)."""
    out: dict[int, list[str]] = {}
    for key in keys:
        try:
            seq, _digest = parse_root_key(key)
        except ValueError:
            continue
        out.setdefault(seq, []).append(key)
    return out


def _one_root(store: ObjectStore, seq: int, keys: list[str]) -> str:
    if len(keys) > 1:
        raise CorruptionError(
            f"{store.location}: PIT {snapshot_id(seq)} has {len(keys)} roots ({', '.join(sorted(keys))}); "
            "overlaycache writes one, so the others were put there by someone else: see overlaycache check")
    return keys[0]


def find_root_key(store: ObjectStore, volume_id: str, seq: int) -> str:
    """The key of the root of PIT ``seq`` (one LIST).

    Raises
    ------
    SnapshotNotFoundError
        There is none.
    CorruptionError
        There are several.
    """
    keys = roots_by_seq(store.list(pit_roots_prefix(volume_id, seq))).get(seq, [])
    if not keys:
        sid = snapshot_id(seq)
        raise SnapshotNotFoundError(f"{store.location}: volume {volume_id} has no PIT {sid}", sid)
    return _one_root(store, seq, keys)


def read_root(store: ObjectStore, volume_id: str, key: str) -> Root:
    """The root under ``key``, verified: against the digest in its key, its checksums, and the
    volume and seq its key names.

    Raises
    ------
    ObjectNotFoundError
        No object under ``key``.
    CorruptionError
        The root is overwritten, damaged, or of another volume or PIT.
    FormatError
        Not a root, or of another format.
    """
    where = f"{store.location}/{key}"
    raw = store.get(key)
    verify_root_digest(raw, key, where)
    root = decode_root(raw, where)
    seq, _digest = parse_root_key(key)
    if root.volume_id != volume_id or root.seq != seq:
        raise CorruptionError(f"{where}: root of volume {root.volume_id!r} seq {root.seq:016x}, not of this key")
    return root


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
