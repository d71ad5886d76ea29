"""Checking a volume's objects on the secondary, and rebuilding damaged PIT maps from the packs.

Packs describe themselves (:func:`~overlaycache.remote.layout.decode_pack_index`): every region
version they hold, all-zero ones included, with its seq, place and checksum. So a volume's maps can
be checked against its packs, and rebuilt from them alone, as restic's ``check`` and
``rebuild-index`` do for its repositories.

:func:`check_volume` reads the volume record, every pack's index (and with ``read_data`` every
pack's bytes, verified against its checksums), every PIT root and every map page those roots
reach, and reports what does not hold together: a damaged or missing object, a pack that is not
the one its key names, a map record naming a version its pack does not hold, a volume record
that disagrees with the (checksummed) PIT roots. With ``repair``, a PIT whose root, pages or
records are damaged is rebuilt from the packs (per region, the newest version with
``seq <= cutoff``) and its root replaced, but only when no pack is damaged or missing: a version
in a lost pack cannot be told from an older one, and a rebuild must never serve older bytes as the
PIT's. The replaced root, and a page found damaged under its own address, are the only objects
ever overwritten, and only by this explicit repair.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from overlaycache.errors import (
    CorruptionError,
    FormatError,
    ObjectExistsError,
    ObjectNotFoundError,
    OverlayCacheError,
    SnapshotNotFoundError,
)
from overlaycache.remote.layout import (
    LEAF_SPAN,
    NO_DIGEST,
    RECORD,
    PackIndex,
    Root,
    check_volume_format,
    decode_page,
    decode_root_header,
    decode_gc_record,
    decode_volume_record,
    encode_root,
    gc_prefix,
    is_root_key,
    pack_key,
    packs_prefix,
    page_key,
    parse_pack_key_generation,
    parse_root_key,
    root_digest,
    root_key,
    roots_prefix,
    snapshot_id,
    verify_pack,
    verify_root_digest,
    volume_key,
)
from overlaycache.remote.leases import active_leases
from overlaycache.remote.listing import read_pack_index, read_root, roots_by_seq
from overlaycache.remote.tree import PageSource, PitMap, build_tree
from overlaycache.store.base import ObjectStore

__all__ = ["CheckReport", "check_volume"]

_log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """What :func:`check_volume` found.

    Attributes
    ----------
    volume_id : str
        The volume checked.
    packs, region_versions, snapshots, pages : int
        Packs read, region versions they list, PIT roots and map pages checked.
    problems : list of str
        Each problem found, naming its object.
    damaged_packs : list of str
        Keys of packs that are damaged (their versions are not used by a rebuild).
    damaged_snapshots : list of str
        Ids of PITs whose root, pages or records do not hold together.
    repaired : list of str
        Ids of PITs rebuilt from the packs (with ``repair=True``).
    """

    volume_id: str
    packs: int = 0
    region_versions: int = 0
    snapshots: int = 0
    pages: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_packs: list[str] = field(default_factory=list)
    damaged_snapshots: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong, or every problem found was in a PIT that was repaired."""
        fixed = tuple(f"PIT {sid}:" for sid in self.repaired)
        return not self.damaged_packs and all(p.startswith(fixed) for p in self.problems) if fixed else \
            not self.problems

    def __str__(self) -> str:
        head = (f"volume {self.volume_id}: {self.packs} packs, {self.region_versions} region versions, "
                f"{self.snapshots} PITs, {self.pages} map pages")
        if not self.problems:
            return f"{head}: no problems"
        lines = [f"{head}: {len(self.problems)} problems"] + [f"  {p}" for p in self.problems]
        if self.repaired:
            lines.append(f"  rebuilt from the packs: PITs {', '.join(self.repaired)}")
        return "\n".join(lines)


def check_volume(store: ObjectStore, volume_id: str, repair: bool = False, read_data: bool = False) -> CheckReport:
    """Check a volume's packs, PIT roots and map pages against each other.

    Parameters
    ----------
    store : ObjectStore
        The secondary.
    volume_id : str
        The volume.
    repair : bool
        Rebuild the PITs whose maps (root, pages, records) are damaged, from the packs. A PIT is
        rebuilt only when nothing it may need is missing: no pack is damaged or missing (a missing
        version cannot be told from an older one). The geometry comes from the intact PIT roots
        (checksummed), or from the volume record when none is intact, checked against the packs. Damaged packs are reported, never "repaired" by falling back to older
        versions: the regions they held stay unreadable, naming the pack.
    read_data : bool
        Read and verify every pack's bytes too, not only its index (reads all the volume's data).

    Returns
    -------
    CheckReport
        What was found (and repaired).

    Raises
    ------
    SnapshotNotFoundError
        The store has nothing of this volume.
    FormatError
        The store holds the volume in another format.
    SecondaryUnavailableError
        The store cannot be reached.
    """
    report = CheckReport(volume_id)
    vkey = volume_key(volume_id)
    vwhere = f"{store.location}/{vkey}"
    roots = [k for k in store.list(roots_prefix(volume_id)) if is_root_key(k) or k.endswith(".manifest")]
    info: dict[str, object] | None = None
    try:
        info = decode_volume_record(store.get(vkey), vkey, store.location)
        check_volume_format(info, vwhere)
    except ObjectNotFoundError as exc:
        if not roots and not any(True for _ in store.list(packs_prefix(volume_id))):
            raise SnapshotNotFoundError(f"{store.location}: no volume {volume_id!r}", volume_id) from exc
        report.problems.append(f"{vwhere}: missing (the volume's PITs and packs are there)")
    except CorruptionError as exc:
        report.problems.append(str(exc))
    # The PIT roots first: they carry the geometry too, checksummed.
    decoded: dict[str, Root | OverlayCacheError] = {}
    for key in roots:
        where = f"{store.location}/{key}"
        if key.endswith(".manifest"):
            raise FormatError(f"{where}: a PIT manifest of format 1; this overlaycache reads format 2 only", where)
        try:
            decoded[key] = read_root(store, volume_id, key)
        except ObjectNotFoundError as exc:  # listed, then gone (a collapse): not damage
            decoded[key] = exc
        except (CorruptionError, FormatError) as exc:
            decoded[key] = exc
    by_seq = roots_by_seq(roots)
    for seq, keys in sorted(by_seq.items()):
        if len(keys) > 1:
            report.problems.append(
                f"PIT {snapshot_id(seq)}: {len(keys)} roots ({', '.join(sorted(keys))}); overlaycache writes one "
                "per PIT, so all but one were put there by someone else: readers refuse the PIT until they are "
                "removed")
    report.problems.extend(_vanished(store, volume_id, {snapshot_id(seq) for seq in by_seq}))
    shapes = {(r.size, r.region_size) for r in decoded.values() if isinstance(r, Root)}
    geometry: tuple[int, int] | None = None
    if len(shapes) == 1:
        geometry = next(iter(shapes))
        if info is not None and (int(str(info["size"])), int(str(info["region_size"]))) != geometry:
            report.problems.append(f"{vwhere}: size {info['size']} and region size {info['region_size']} differ "
                                   f"from the PITs' {geometry[0]} and {geometry[1]} (damaged record)")
    elif len(shapes) > 1:
        report.problems.append(f"volume {volume_id}: PIT roots of different geometries {sorted(shapes)}")
    elif info is not None:
        geometry = (int(str(info["size"])), int(str(info["region_size"])))
    if geometry is None:
        return report  # nothing to check the packs against
    size, rs = geometry
    n = (size + rs - 1) // rs
    # Every version the packs hold: region -> {seq: (pack, offset, length, checksum)}, from the
    # pack as stored, or where a collapse repacked it, its newest generation (whose offsets are its
    # own: the maps keep the original's).
    versions: dict[int, dict[int, tuple[int, int, int, bytes, bytes]]] = {}
    good: dict[int, tuple[int, PackIndex]] = {}  # pack -> the generation read and its index
    damaged: set[int] = set()
    for key in store.list(packs_prefix(volume_id)):
        try:
            _vid, pack, gen = parse_pack_key_generation(key)
        except ValueError:
            report.problems.append(f"{key}: not a pack's key")
            continue
        report.packs += 1
        where = f"{store.location}/{key}"
        try:
            index = _read_index(store, key, read_data)
            if index.volume_id != volume_id or index.pack != pack:
                raise CorruptionError(f"{where}: pack {index.pack:016x} of volume {index.volume_id!r}, not of this key")
            if index.region_size != rs:
                raise CorruptionError(f"{where}: regions of {index.region_size} bytes, not the volume's {rs}")
        except (CorruptionError, FormatError) as exc:
            report.problems.append(str(exc) if where in str(exc) else f"{where}: {exc}")
            report.damaged_packs.append(key)
            damaged.add(pack)
            continue
        for e in index.entries:
            if e.region >= n:
                report.problems.append(f"{where}: lists region {e.region}, beyond the volume's {n}")
        # The original wins over a generation (a kill between a repack's PUT and its delete).
        if pack not in good or (good[pack][0] != 0 and (gen == 0 or gen > good[pack][0])):
            good[pack] = (gen, index)
    moved = {pack for pack, (gen, _index) in good.items() if gen}
    for pack, (_gen, index) in good.items():
        for e in index.entries:
            if e.region >= n:
                continue
            report.region_versions += 1
            versions.setdefault(e.region, {})[e.seq] = (pack, e.offset, e.length, e.checksum, e.digest)
    good_packs = set(good)
    missing_packs: set[int] = set()
    to_rebuild: list[tuple[str, str]] = []
    for key in roots:
        where = f"{store.location}/{key}"
        report.snapshots += 1
        sid = snapshot_id(parse_root_key(key)[0])
        map_bad: list[str] = []
        data_bad: list[str] = []
        got = decoded[key]
        if isinstance(got, ObjectNotFoundError):
            report.snapshots -= 1
            continue
        try:
            if not isinstance(got, Root):
                raise got
            pit = PitMap(got, PageSource(store, volume_id), cache_leaves=4)
            report.pages += sum(1 for _ in pit.page_addresses())
            for r, seq, pack, off, length, csum, digest in pit.stored():
                held = versions.get(r, {}).get(seq)
                pname = pack_key(volume_id, pack) if pack else "no pack (all zeros)"
                if pack and pack not in good_packs:
                    if pack not in damaged:
                        missing_packs.add(pack)
                    data_bad.append(f"region {r} version {seq:016x}: {pname} is damaged or missing")
                elif held is None:
                    data_bad.append(f"region {r} version {seq:016x} is not in {pname}")
                elif digest != NO_DIGEST and held[4] != digest:
                    map_bad.append(f"region {r} version {seq:016x}: the map's digest differs from the index of {pname}")
                elif pack in moved and (held[0], held[2], held[3]) == (pack, length, csum):
                    pass  # repacked: the generation holds it at an offset of its own
                elif held[:4] != (pack, off, length, csum) and not (pack == 0 and held[2] == 0 and held[3] == csum):
                    # (pack 0: an all-zero version recorded without its pack, as it may be)
                    map_bad.append(f"region {r} version {seq:016x} differs from the index of {pname}")
        except ObjectNotFoundError as exc:
            map_bad.append(f"missing object: {exc}")
        except (CorruptionError, FormatError) as exc:
            map_bad.append(str(exc))
        bad = map_bad + data_bad
        if bad:
            report.damaged_snapshots.append(sid)
            report.problems.extend(f"PIT {sid}: {b}" for b in bad[:10])
            if len(bad) > 10:
                report.problems.append(f"PIT {sid}: ... and {len(bad) - 10} more")
            if map_bad:
                to_rebuild.append((key, sid))
    for pack in sorted(missing_packs):
        report.problems.append(f"{store.location}/{pack_key(volume_id, pack)}: missing (a PIT names it)")
    if repair and to_rebuild:
        refuse = []
        if report.damaged_packs or missing_packs:
            refuse.append("packs are damaged or missing (a rebuild could not tell their versions from older ones)")
        if len(shapes) > 1:
            refuse.append("the PIT roots disagree on the volume's geometry")
        if refuse:
            report.problems.append(f"repair refused: {'; '.join(refuse)}")
        else:
            for key, sid in to_rebuild:
                _rebuild(store, volume_id, key, sid, size, rs, versions, good_packs)
                report.repaired.append(sid)
    return report


#: Collapse records read to tell a PIT gone by a collapse from one gone otherwise.
_RECORDS_LOOKED_AT = 10


def _vanished(store: ObjectStore, volume_id: str, listed: set[str]) -> list[str]:
    """PITs whose root is gone though nothing that deletes PITs removed them: kept by the newest
    collapse run (and removed by none of the last few, which may have raced it), or leased now."""
    problems = []
    removed: set[str] = set()
    kept: list[str] = []
    at = 0.0
    newest = ""
    for key in sorted(store.list(gc_prefix(volume_id)))[-_RECORDS_LOOKED_AT:]:
        where = f"{store.location}/{key}"
        try:
            info = decode_gc_record(store.get(key), where)
            removed.update(str(sid) for sid in info.get("removed", ()))
            kept, at, newest = [str(sid) for sid in info.get("kept", ())], float(info.get("at", 0.0)), where
        except ObjectNotFoundError:
            continue  # deleted since the listing
        except (ValueError, TypeError, AttributeError, CorruptionError) as exc:
            problems.append(str(exc) if where in str(exc) else f"{where}: unreadable collapse record ({exc})")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    for sid in kept:
        if sid not in listed and sid not in removed:
            problems.append(f"PIT {sid}: kept by the collapse of {when} ({newest}), but its root is gone: "
                            "deleted by something other than collapse")
    for sid, holders in sorted(active_leases(store, volume_id, time.time()).items()):
        if sid not in listed:
            problems.append(f"PIT {sid}: leased by {', '.join(h for h, _until in holders)}, but its root is gone")
    return problems


def _read_index(store: ObjectStore, key: str, read_data: bool) -> PackIndex:
    if read_data:
        return verify_pack(store.get(key), f"{store.location}/{key}")
    return read_pack_index(store, key)


def _rebuild(store: ObjectStore, volume_id: str, key: str, sid: str, size: int, rs: int,
             versions: dict[int, dict[int, tuple[int, int, int, bytes, bytes]]], good_packs: set[int]) -> None:
    """Rebuild the PIT ``sid`` from the packs and replace its root."""
    cutoff = int(sid, 16)
    label: str | None = f"rebuilt-{sid}"
    created = time.time()
    try:
        raw = store.get(key)
        verify_root_digest(raw, key)  # an overwritten root's label and time are not the PIT's
        seq, when, old_label, vid = decode_root_header(raw, key)
        if vid == volume_id and seq == cutoff:  # the header is this PIT's: keep its time and label
            created, label = when, old_label
    except (OverlayCacheError, ValueError):
        pass
    n = (size + rs - 1) // rs
    leaves: dict[int, bytearray] = {}
    for r, by_seq in versions.items():
        usable = [s for s, (pack, _o, _l, _c, _d) in by_seq.items() if s <= cutoff and pack in good_packs]
        if not usable:
            continue
        seq = max(usable)
        pack, off, length, csum, digest = by_seq[seq]
        leaf = leaves.setdefault(r // LEAF_SPAN, bytearray(RECORD.size * LEAF_SPAN))
        RECORD.pack_into(leaf, (r % LEAF_SPAN) * RECORD.size, seq, pack, off, length, csum, digest)
    pages, top = build_tree(n, {i: bytes(b) for i, b in leaves.items()})
    for level, index, addr, raw in pages:
        pkey = page_key(volume_id, addr)
        try:
            store.put(pkey, raw, if_absent=True)
        except ObjectExistsError:
            # Content-addressed: the same page, unless the object there is damaged: replace it.
            try:
                decode_page(store.get(pkey), addr, level, index, pkey)
            except (CorruptionError, FormatError):
                store.delete([pkey])
                store.put(pkey, raw, if_absent=True)
    raw = encode_root(volume_id, size, rs, cutoff, created, label, top)
    store.delete([key])
    store.put(root_key(volume_id, cutoff, root_digest(raw)), raw, if_absent=True)
    _log.warning("%s/%s: PIT %s rebuilt from the packs", store.location, key, sid)
