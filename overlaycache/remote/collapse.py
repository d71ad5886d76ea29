"""Collapsing a volume's PIT history by a retention policy, and collecting what no PIT needs.

:func:`collapse_volume` drops the PITs a :class:`~overlaycache.retention.RetentionPolicy` does not
keep and deletes the objects no retained PIT references. Dropping a PIT is metadata work: the
survivors are represented by what they already reference, no region data is read or written again.

Order (crash-safe and resumable: a kill at any point leaves every retained PIT fully readable, and
a rerun finishes the job):

1. List the volume's packs and map pages, *then* its PITs (so an object stored after the listing
   is never a candidate), and decide what survives: what the policy keeps, and always the newest
   PIT (the primary's next PIT reuses its pages).
2. Walk the retained PITs' trees: every page and pack they reach is live.
3. Write the run's record (``volumes/<id>/gc/<stamp>.json``): what is kept, what is removed, and
   the pages found unreferenced.
4. Delete the removed roots, then the dead packs; repack the packs partly dead; then, after a look
   at the PITs published since the listing (what they reach stays), the dead pages.

A pack is dead when no retained PIT references it and its number is below the newest PIT's cutoff:
every pack below it was complete when that PIT was published, and a later PIT never goes back to a
version an earlier one had replaced. A newer pack may hold versions of the live head: it is never
touched. A map page has no number, and a publish stores its pages before its root (and may find
one already stored, from an earlier PIT, and count on it): a page found unreferenced is only
*condemned* by the run that finds it, and deleted by a later run that finds it still unreferenced
at least ``page_grace`` seconds (default an hour) after it was first condemned: longer than any
publish takes between its pages and its root. Two collapses racing each other delete only objects
that neither's retained PITs reference.

A pack below the cutoff that retained PITs reference, but whose *dead* bytes (versions no retained
PIT references) are more than ``max_unused`` of its region bytes, is *repacked*: its live versions
are copied, verified, into a new generation of the same pack number
(``packs/<shard>/<pack>.<generation>.pack``, a conditional PUT), and then the older object is
deleted. The maps are not rewritten: they keep naming the pack number and the original offsets, and
a reader that finds the original gone reads the newest generation, where its index says each
version is (:mod:`overlaycache.remote.source`). A kill between the PUT and the delete leaves both;
the next run deletes the older one once it has checked the newer holds every live version.

A PIT with a lease that has not expired (:mod:`overlaycache.remote.leases`: a distributed overlay
serving from it) is kept whatever the policy says; expired leases are deleted, and so are the
collapse records beyond the newest :data:`KEEP_RECORDS`.

What a run costs: the listing of the volume's packs, pages and roots; every node page and every
leaf of the retained PITs, read once (the versions of one leaf are merged, so memory holds one
leaf's versions and a few integers per pack); for each pack that may be repacked, a ranged GET of
its index, and the leaves that name it a second time; and a whole GET and one PUT per pack
repacked. No region data is read or written otherwise.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from overlaycache.errors import (
    CorruptionError,
    FormatError,
    InvalidArgumentError,
    ObjectExistsError,
    ObjectNotFoundError,
)
from overlaycache.remote.layout import (
    PackIndex,
    decode_gc_record,
    encode_gc_record,
    encode_pack,
    gc_prefix,
    gc_record_key,
    packs_prefix,
    pack_index_size,
    pack_key,
    pages_prefix,
    parse_pack_key_generation,
    verify_pack,
    volume_key,
)
from overlaycache.remote.leases import active_leases, expired_leases
from overlaycache.remote.listing import check_format, list_roots, no_volume_error, read_pack_index, read_root
from overlaycache.remote.tree import PageSource, leaf_versions, reachable, reachable_leaves
from overlaycache.retention import RetentionPolicy
from overlaycache.snapshots import Snapshot
from overlaycache.store.base import ObjectStore, list_sizes

__all__ = ["MAX_UNUSED", "CollapseReport", "collapse_volume"]

_log = logging.getLogger(__name__)


@dataclass
class CollapseReport:
    """What :func:`collapse_volume` did (or, with ``dry_run``, would do).

    Attributes
    ----------
    volume_id : str
        The volume.
    kept, removed : list of Snapshot
        The PITs retained and the PITs dropped.
    reasons : dict of str to tuple of str
        Per kept PIT id, the rules that keep it.
    objects_deleted, bytes_freed : int
        Objects deleted (roots, packs, pages, leases, packs repacked); the bytes the store holds
        less (the new generations of repacked packs counted against them).
    pages_condemned : int
        Pages found unreferenced for the first time: a later run deletes them if they still are.
    packs_repacked, bytes_moved : int
        Packs partly dead whose live versions were copied into a new generation, and their bytes.
    bytes_read, bytes_written : int
        Bytes this run read from and wrote to the store (maps and records, and the packs repacked).
    duration : float
        Seconds.
    dry_run : bool
        Nothing was written or deleted.
    """

    volume_id: str
    kept: list[Snapshot] = field(default_factory=list)
    removed: list[Snapshot] = field(default_factory=list)
    reasons: dict[str, tuple[str, ...]] = field(default_factory=dict)
    objects_deleted: int = 0
    bytes_freed: int = 0
    pages_condemned: int = 0
    packs_repacked: int = 0
    bytes_moved: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    duration: float = 0.0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        """The report as plain data (for ``--json``)."""
        return {"volume_id": self.volume_id, "dry_run": self.dry_run,
                "kept": [{"id": s.id, "label": s.label, "created_at": s.created_at,
                          "reasons": list(self.reasons.get(s.id, ()))} for s in self.kept],
                "removed": [{"id": s.id, "label": s.label, "created_at": s.created_at} for s in self.removed],
                "objects_deleted": self.objects_deleted, "bytes_freed": self.bytes_freed,
                "pages_condemned": self.pages_condemned, "packs_repacked": self.packs_repacked,
                "bytes_moved": self.bytes_moved, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "duration": self.duration}


class _Counted:
    """The store, with the bytes read and written counted (the report's figures)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.location = inner.location
        self.read = 0
        self.written = 0

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(key, start, length)
        self.read += len(data)
        return data

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        self.written += memoryview(data).nbytes
        self.inner.put(key, data, if_absent=if_absent)

    def head(self, key: str) -> int | None:
        return self.inner.head(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int | None]]:
        return list_sizes(self.inner, prefix)

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        return self.inner.list_dirs(prefix)

    def delete(self, keys: Iterable[str]) -> None:
        self.inner.delete(keys)

    def close(self) -> None:
        """The wrapped store stays open."""


def _previous_condemned(store: _Counted, volume_id: str, records: list[str]) -> dict[str, float]:
    """The pages the newest earlier run (of ``records``, sorted) condemned, with the time each was
    first condemned."""
    if not records:
        return {}
    try:
        info = decode_gc_record(store.get(records[-1]), f"{store.location}/{records[-1]}")
        return {str(a): float(t) for a, t in dict(info.get("condemned", {})).items()}
    except (ValueError, TypeError, ObjectNotFoundError, AttributeError, CorruptionError):
        _log.warning("%s/%s: unreadable collapse record; no page is deleted this run", store.location, records[-1])
        return {}


#: Collapse records kept (the newest): the last runs' decisions, which ``check`` reads.
KEEP_RECORDS = 100

#: Seconds a map page stays condemned before a run may delete it (longer than any publish takes
#: between storing its pages and its root).
PAGE_GRACE = 3600.0


def _present(store: _Counted, keys: list[str]) -> list[tuple[str, int]]:
    """The keys still there (others are gone already: another run, or a rerun after a crash), with
    their sizes; asked in parallel."""
    if not keys:
        return []
    with ThreadPoolExecutor(16, thread_name_prefix="oc-collapse") as pool:
        sizes = list(pool.map(store.head, keys))
    return [(k, size) for k, size in zip(keys, sizes) if size is not None]


def _delete(store: _Counted, keys: list[str], report: CollapseReport, dry_run: bool = False) -> None:
    """Delete ``keys`` (in the store's batches; with ``dry_run`` only count them), counting those
    still there and their bytes."""
    present = _present(store, keys)
    if present and not dry_run:
        store.delete([k for k, _size in present])
    report.objects_deleted += len(present)
    report.bytes_freed += sum(size for _k, size in present)


#: A pack is repacked when more than this share of its region bytes is dead (see the module).
MAX_UNUSED = 0.5


@dataclass
class _Usage:
    """What the retained PITs use of one pack: bytes and versions, and the leaves naming them."""

    live_bytes: int = 0
    live_versions: int = 0
    leaves: list[int] = field(default_factory=list)


def _pack_usage(roots: list[Any], pages: PageSource) -> tuple[set[bytes], dict[int, set[bytes]], dict[int, _Usage]]:
    """The pages the roots reach, their leaves by index, and per pack what they use of it (each
    version once, however many PITs and leaves record it)."""
    live_pages, leaves = reachable_leaves(roots, pages)
    usage: dict[int, _Usage] = {}
    for index in sorted(leaves):
        touched: set[int] = set()
        for _region, _seq, pack, length in leaf_versions(index, leaves[index], pages):
            if not pack:
                continue
            u = usage.get(pack)
            if u is None:
                usage[pack] = u = _Usage()
            u.live_bytes += length
            u.live_versions += 1
            touched.add(pack)
        for pack in touched:
            usage[pack].leaves.append(index)
    return live_pages, leaves, usage


def _may_repack(volume_id: str, objects: list[tuple[int, str, int | None]], use: _Usage, max_unused: float,
                store: _Counted) -> bool:
    """Whether a pack may be more than ``max_unused`` dead, by its size (an upper bound: its index
    lists at least the live versions), or has objects a crashed run left."""
    if len(objects) > 1:
        return True
    _gen, key, size = objects[0]
    if size is None:
        size = store.head(key)
        if size is None:
            return False
    data = size - pack_index_size(use.live_versions, volume_id, version=2) - 16  # the smaller entries: an upper bound
    dead = data - use.live_bytes
    return dead > 0 and dead > max_unused * data


def _holds(index: PackIndex, live: set[tuple[int, int]]) -> bool:
    """Whether a pack's index lists every version of ``live`` (``(region, seq)``)."""
    return live <= {(e.region, e.seq) for e in index.entries}


def _repack(store: _Counted, volume_id: str, pack: int, objects: list[tuple[int, str, int | None]],
            live: set[tuple[int, int]], max_unused: float, dry_run: bool, report: CollapseReport) -> None:
    """Repack ``pack`` if more than ``max_unused`` of it is dead; delete what an earlier run left."""
    where = store.location
    chosen: tuple[int, str, PackIndex] | None = None
    for gen, key, _size in sorted(objects, reverse=True):  # the newest generation first, the original last
        try:
            index = read_pack_index(store, key)
        except ObjectNotFoundError:
            continue
        except (CorruptionError, FormatError) as exc:
            _log.warning("%s: not repacked: %s", f"{where}/{key}", exc)
            return
        if index.volume_id != volume_id or index.pack != pack:
            _log.warning("%s/%s: not repacked: the index names pack %016x of volume %r", where, key, index.pack,
                         index.volume_id)
            return
        if _holds(index, live):
            chosen = (gen, key, index)
            break
        if gen:
            # A generation without every live version (a racing collapse kept less): the older
            # objects must stay; leave it all to check.
            _log.warning("%s/%s: a repacked generation lacks versions retained PITs need; left as it is",
                         where, key)
            return
    if chosen is None:
        return
    gen, key, index = chosen
    superseded = [k for g, k, _s in objects if g < gen]
    data_bytes = sum(e.length for e in index.entries)
    keep = sorted((e for e in index.entries if (e.region, e.seq) in live), key=lambda e: e.offset)
    kept_bytes = sum(e.length for e in keep)
    dead = data_bytes - kept_bytes
    if not (dead > 0 and dead > max_unused * data_bytes):
        if superseded:
            _delete(store, superseded, report, dry_run)
        return
    new_key = pack_key(volume_id, pack, max(g for g, _k, _s in objects) + 1)
    if dry_run:
        _delete(store, [key] + superseded, report, dry_run)
        report.bytes_freed -= pack_index_size(len(keep), volume_id) + kept_bytes + 16
        report.packs_repacked += 1
        report.bytes_moved += kept_bytes
        return
    try:
        raw = store.get(key)
        whole = verify_pack(raw, f"{where}/{key}")
    except ObjectNotFoundError:
        return  # a collapse racing this one repacked it meanwhile: a later run looks again
    except (CorruptionError, FormatError) as exc:
        _log.warning("%s: not repacked: %s", f"{where}/{key}", exc)
        return
    view = memoryview(raw)  # the whole object's own index says where each version is
    versions = [(e.region, e.seq, view[e.offset : e.offset + e.length], e.checksum, e.digest)
                for e in whole.entries if (e.region, e.seq) in live]
    out, _entries = encode_pack(volume_id, whole.region_size, pack, whole.created_at, versions)
    try:
        store.put(new_key, out, if_absent=True)
    except ObjectExistsError:  # a racing collapse repacked it first: use its generation if it will do
        try:
            theirs = read_pack_index(store, new_key)
        except ObjectNotFoundError:
            return  # and repacked it once more: a later run looks again
        if not _holds(theirs, live):
            _log.warning("%s/%s: a racing collapse's generation lacks versions retained PITs need; the "
                         "older one stays", where, new_key)
            return
    else:
        report.packs_repacked += 1
        report.bytes_moved += kept_bytes
        report.bytes_freed -= len(out)
    _delete(store, [key] + superseded, report, dry_run)


def collapse_volume(store: ObjectStore, volume_id: str, policy: RetentionPolicy, now: float | None = None,
                    dry_run: bool = False, page_grace: float = PAGE_GRACE,
                    progress: Callable[[int, int], None] | None = None,
                    max_unused: float = MAX_UNUSED) -> CollapseReport:
    """Drop the PITs ``policy`` does not keep and delete what no retained PIT references.

    Parameters
    ----------
    store : ObjectStore
        The secondary, with credentials that may delete.
    volume_id : str
        The volume.
    policy : RetentionPolicy
        What to keep (the newest PIT, and PITs with an unexpired lease, are always kept too).
    now : float, optional
        The time the policy measures ages from (default: the current time).
    dry_run : bool
        Report what would be done; write and delete nothing.
    page_grace : float
        Seconds (by the clock) a map page must have been condemned before it is deleted.
    progress : callable, optional
        ``progress(done, total)``: the kept PITs' maps walked (one step), then each batch of
        objects deleted or packs repacked.
    max_unused : float
        Repack a pack when more than this share (0 to 1) of its region bytes is dead: 0 repacks
        every pack with a dead version, 1 never repacks.

    Returns
    -------
    CollapseReport

    Raises
    ------
    InvalidArgumentError
        ``policy`` is not a :class:`RetentionPolicy`, or ``max_unused`` is not within 0 to 1.
    SnapshotNotFoundError
        The store has no record of this volume.
    FormatError
        The store holds the volume in another format.
    CorruptionError
        A retained PIT's root or pages are damaged (nothing is deleted then; see ``store.check``).
    """
    if not isinstance(policy, RetentionPolicy):
        raise InvalidArgumentError(f"policy must be a RetentionPolicy, got {policy!r}")
    if isinstance(max_unused, bool) or not isinstance(max_unused, (int, float)) or not 0 <= max_unused <= 1:
        raise InvalidArgumentError(f"max_unused must be a share from 0 to 1, got {max_unused!r}")
    t0 = time.monotonic()
    now = time.time() if now is None else float(now)
    counted = _Counted(store)
    report = CollapseReport(volume_id, dry_run=dry_run)
    if counted.head(volume_key(volume_id)) is None:
        raise no_volume_error(store, volume_id)
    check_format(counted, volume_id)
    # 1. Candidates first, then the PITs: what is stored after this listing is never a candidate.
    pages_listed = {key.rsplit("/", 1)[1]: key for key in counted.list(pages_prefix(volume_id))}
    packs_listed: dict[int, list[tuple[int, str, int | None]]] = {}  # pack -> its objects (generation, key, size)
    for key, size in list_sizes(counted, packs_prefix(volume_id)):
        try:
            _vid, pack, gen = parse_pack_key_generation(key)
        except ValueError:
            continue
        packs_listed.setdefault(pack, []).append((gen, key, size))
    records = sorted(counted.list(gc_prefix(volume_id)))
    condemned_before = _previous_condemned(counted, volume_id, records)
    listed = list_roots(counted, volume_id)
    snaps = [snap for snap, _key in listed]
    keys = {snap.id: key for snap, key in listed}
    if not snaps:
        report.duration = time.monotonic() - t0
        return report
    newest = snaps[-1]
    decisions = {d.snapshot.id: d.reasons for d in policy.decide(snaps, now)}
    if not decisions[newest.id]:
        decisions[newest.id] = ("newest",)
    # A PIT in use (a distributed overlay's, an image's elsewhere) is pinned by a lease, measured
    # against the clock (not ``now``, which may be a policy's what-if).
    clock = time.time()
    for sid, holders in active_leases(counted, volume_id, clock).items():
        if sid in decisions:
            decisions[sid] = decisions[sid] + tuple(
                f"lease {holder} until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))}"
                for holder, until in holders)
    report.kept = [s for s in snaps if decisions[s.id]]
    report.removed = [s for s in snaps if not decisions[s.id]]
    report.reasons = {s.id: decisions[s.id] for s in report.kept}
    # 2. What the retained PITs reach, and how much of each pack.
    roots = []
    for s in list(report.kept):
        try:
            roots.append(read_root(counted, volume_id, keys[s.id]))
        except ObjectNotFoundError:  # removed since the listing, by a collapse racing this one
            report.kept.remove(s)
            del report.reasons[s.id]
    source = PageSource(counted, volume_id)
    live_pages, leaves, usage = _pack_usage(roots, source)
    if progress is not None:
        progress(len(roots), len(roots))
    dead_packs = [key for pack, objs in sorted(packs_listed.items()) if pack < newest.seq and pack not in usage
                  for _gen, key, _size in sorted(objs)]
    repack = {pack: objs for pack, objs in sorted(packs_listed.items())
              if pack < newest.seq and pack in usage and _may_repack(volume_id, objs, usage[pack], max_unused, counted)}
    unreferenced = {h for h in pages_listed if bytes.fromhex(h) not in live_pages}
    since = {h: condemned_before.get(h, clock) for h in unreferenced}  # when each was first condemned
    dead_pages = sorted(h for h in unreferenced if h in condemned_before and clock - since[h] >= page_grace)
    condemned = {h: since[h] for h in sorted(unreferenced - set(dead_pages))}
    report.pages_condemned = len(condemned)
    # The oldest collapse records beyond the newest KEEP_RECORDS (this run's counted).
    old_records = records[: max(0, len(records) - (KEEP_RECORDS - 1))]
    doomed = ([keys[s.id] for s in report.removed] + dead_packs + expired_leases(counted, volume_id, clock)
              + old_records)
    doomed_pages = [pages_listed[h] for h in dead_pages]
    if not dry_run:
        # 3. Record what survives before deleting anything.
        record = {"format": 2, "at": now, "policy": str(policy), "kept": [s.id for s in report.kept],
                  "removed": [s.id for s in report.removed], "condemned": condemned}
        stamp = int(time.time() * 1e6)
        while True:
            try:
                counted.put(gc_record_key(volume_id, stamp), encode_gc_record(record), if_absent=True)
                break
            except ObjectExistsError:
                stamp += 1  # another run in the same microsecond
    # 4. Roots first (a reader no longer finds what is removed), then the data they alone used.
    total = len(doomed) + len(repack) + len(doomed_pages)
    if progress is not None:
        progress(0, total)
    _delete(counted, doomed, report, dry_run)
    if progress is not None:
        progress(len(doomed), total)
    if repack:
        # The versions retained PITs use of each pack to repack (their leaves read once more).
        live: dict[int, set[tuple[int, int]]] = {pack: set() for pack in repack}
        for index in sorted({i for pack in repack for i in usage[pack].leaves}):
            for region, seq, pack, _length in leaf_versions(index, leaves[index], source):
                if pack in live:
                    live[pack].add((region, seq))
        for done, (pack, objs) in enumerate(repack.items(), 1):
            _repack(counted, volume_id, pack, objs, live.pop(pack), max_unused, dry_run, report)
            if progress is not None:
                progress(len(doomed) + done, total)
    # Last, the pages; a PIT published since the listing is looked at first: what it reaches stays.
    if doomed_pages and not dry_run:
        seen = {s.seq for s in snaps}
        fresh = [(s, key) for s, key in list_roots(counted, volume_id) if s.seq not in seen]
        if fresh:
            fresh_roots = []
            for _s, key in fresh:
                try:
                    fresh_roots.append(read_root(counted, volume_id, key))
                except ObjectNotFoundError:
                    continue  # published and already collapsed away
            fresh_pages, _packs = reachable(fresh_roots, PageSource(counted, volume_id))
            doomed_pages = [k for k in doomed_pages if bytes.fromhex(k.rsplit("/", 1)[1]) not in fresh_pages]
    _delete(counted, doomed_pages, report, dry_run)
    if progress is not None:
        progress(total, total)
    report.bytes_read, report.bytes_written = counted.read, counted.written
    report.duration = time.monotonic() - t0
    if not dry_run:
        _log.info("%s: volume %s collapsed by %s: %d PITs kept, %d removed, %d objects (%d bytes) deleted, "
                  "%d packs repacked (%d bytes moved), %d pages condemned", store.location, volume_id, policy,
                  len(report.kept), len(report.removed), report.objects_deleted, report.bytes_freed,
                  report.packs_repacked, report.bytes_moved, report.pages_condemned)
    return report
