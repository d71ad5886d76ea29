"""Checking a volume's objects on the secondary, and rebuilding damaged PIT maps from the packs.

Packs describe themselves (:func:`~overlaycache.remote.layout.decode_pack_index`): every region
version they hold, all-zero ones included, with its seq, place and checksum. So a volume's maps can
be checked against its packs, and rebuilt from them alone, as restic's ``check`` and
``rebuild-index`` do for its repositories.

:func:`check_volume` reads the volume record, every pack's index (and with ``read_data`` every
pack's bytes, verified against its checksums), every PIT root and every map page those roots
reach, and reports what does not hold together: a damaged or missing object, a map record naming
a version its pack does not hold. With ``repair``, a PIT whose root, pages or records are damaged
is rebuilt from the undamaged packs (per region, the newest version with ``seq <= cutoff``) and its
root replaced; the replaced root is the only object ever overwritten, and only by this explicit
repair.
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
    RECORD,
    PackEntry,
    check_volume_format,
    decode_root,
    decode_root_header,
    decode_volume_record,
    encode_root,
    is_root_key,
    packs_prefix,
    page_key,
    parse_pack_key,
    roots_prefix,
    snapshot_id,
    verify_pack,
    volume_key,
)
from overlaycache.remote.listing import read_pack_index
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
        """Whether nothing is wrong (or everything found was repaired)."""
        return not self.problems or set(self.damaged_snapshots) <= set(self.repaired) and not self.damaged_packs

    def __str__(self) -> str:
        head = (f"volume {self.volume_id}: {self.packs} packs, {self.region_versions} region versions, "
                f"{self.snapshots} PITs, {self.pages} map pages")
        if not self.problems:
            return f"{head}: no problems"
        lines = [f"{head}: {len(self.problems)} problems"] + [f"  {p}" for p in self.problems]
        if self.repaired:
            lines.append(f"  rebuilt from the packs: PITs {', '.join(self.repaired)}")
        return "\n".join(lines)


def _read_index(store: ObjectStore, key: str, read_data: bool) -> list[PackEntry]:
    if read_data:
        return list(verify_pack(store.get(key), f"{store.location}/{key}").entries)
    return list(read_pack_index(store, key).entries)


def check_volume(store: ObjectStore, volume_id: str, repair: bool = False, read_data: bool = False) -> CheckReport:
    """Check a volume's packs, PIT roots and map pages against each other.

    Parameters
    ----------
    store : ObjectStore
        The secondary.
    volume_id : str
        The volume.
    repair : bool
        Rebuild the damaged PITs from the packs.
    read_data : bool
        Read and verify every pack's bytes too, not only its index (reads all the volume's data).

    Returns
    -------
    CheckReport
        What was found (and repaired).

    Raises
    ------
    SnapshotNotFoundError
        The store has no record of this volume.
    FormatError
        The store holds the volume in another format.
    SecondaryUnavailableError
        The store cannot be reached.
    """
    key = volume_key(volume_id)
    try:
        raw = store.get(key)
    except ObjectNotFoundError as exc:
        raise SnapshotNotFoundError(f"{store.location}: no volume {volume_id!r}", volume_id) from exc
    info = decode_volume_record(raw, key, store.location)
    check_volume_format(info, f"{store.location}/{key}")
    size, rs = int(info["size"]), int(info["region_size"])
    n = (size + rs - 1) // rs
    report = CheckReport(volume_id)
    # Every version the packs hold: region -> {seq: (pack, offset, length, checksum)}.
    versions: dict[int, dict[int, tuple[int, int, int, bytes]]] = {}
    good_packs: set[int] = set()
    for key in store.list(packs_prefix(volume_id)):
        try:
            _vid, pack = parse_pack_key(key)
        except ValueError:
            report.problems.append(f"{key}: not a pack's key")
            continue
        report.packs += 1
        try:
            entries = _read_index(store, key, read_data)
        except (CorruptionError, FormatError) as exc:
            report.problems.append(f"{key}: {exc}")
            report.damaged_packs.append(key)
            continue
        good_packs.add(pack)
        for e in entries:
            if e.region >= n:
                report.problems.append(f"{key}: lists region {e.region}, beyond the volume's {n}")
                continue
            report.region_versions += 1
            versions.setdefault(e.region, {})[e.seq] = (pack, e.offset, e.length, e.checksum)
    roots = [k for k in store.list(roots_prefix(volume_id)) if is_root_key(k) or k.endswith(".manifest")]
    for key in roots:
        where = f"{store.location}/{key}"
        if key.endswith(".manifest"):
            raise FormatError(f"{where}: a PIT manifest of format 1; this overlaycache reads format 2 only", where)
        report.snapshots += 1
        sid = key.rsplit("/", 1)[1][: -len(".root")]
        bad: list[str] = []
        try:
            root = decode_root(store.get(key), where)
            if root.volume_id != volume_id or snapshot_id(root.seq) != sid:
                raise CorruptionError(f"{where}: root of volume {root.volume_id!r} seq {root.seq:016x}")
            pit = PitMap(root, PageSource(store, volume_id), cache_leaves=4)
            report.pages += sum(1 for _ in pit.page_addresses())
            for r, seq, pack, off, length, csum in pit.stored():
                held = versions.get(r, {}).get(seq)
                if held is None:
                    bad.append(f"region {r} version {seq:016x} is in no pack")
                elif held != (pack, off, length, csum) and not (pack == 0 and held[2] == 0 and held[3] == csum):
                    # (pack 0: an all-zero version recorded without its pack, as it may be)
                    bad.append(f"region {r} version {seq:016x} differs from its pack's index")
                elif pack and pack not in good_packs:
                    bad.append(f"region {r} version {seq:016x} is in a damaged pack")
        except ObjectNotFoundError as exc:
            bad.append(f"missing object: {exc}")
        except (CorruptionError, FormatError) as exc:
            bad.append(str(exc))
        if bad:
            report.damaged_snapshots.append(sid)
            report.problems.extend(f"PIT {sid}: {b}" for b in bad[:10])
            if len(bad) > 10:
                report.problems.append(f"PIT {sid}: ... and {len(bad) - 10} more")
            if repair:
                _rebuild(store, volume_id, key, sid, size, rs, versions, good_packs)
                report.repaired.append(sid)
    return report


def _rebuild(store: ObjectStore, volume_id: str, key: str, sid: str, size: int, rs: int,
             versions: dict[int, dict[int, tuple[int, int, int, bytes]]], good_packs: set[int]) -> None:
    """Rebuild the PIT ``sid`` from the packs and replace its root."""
    cutoff = int(sid, 16)
    label: str | None = None
    created = time.time()
    try:
        _seq, created, label, _vid = decode_root_header(store.get(key, 0, 4096), key)
    except (OverlayCacheError, ValueError):
        label = f"rebuilt-{sid}"
    n = (size + rs - 1) // rs
    leaves: dict[int, bytearray] = {}
    for r, by_seq in versions.items():
        usable = [s for s, (pack, _o, _l, _c) in by_seq.items() if s <= cutoff and pack in good_packs]
        if not usable:
            continue
        seq = max(usable)
        pack, off, length, csum = by_seq[seq]
        leaf = leaves.setdefault(r // LEAF_SPAN, bytearray(RECORD.size * LEAF_SPAN))
        RECORD.pack_into(leaf, (r % LEAF_SPAN) * RECORD.size, seq, pack, off, length, csum)
    pages, top = build_tree(n, {i: bytes(b) for i, b in leaves.items()})
    for _level, _index, addr, raw in pages:
        try:
            store.put(page_key(volume_id, addr), raw, if_absent=True)
        except ObjectExistsError:
            pass  # content-addressed: the same page
    store.delete([key])
    store.put(key, encode_root(volume_id, size, rs, cutoff, created, label, top), if_absent=True)
    _log.warning("%s/%s: PIT %s rebuilt from the packs", store.location, key, sid)
