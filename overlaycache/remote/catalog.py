"""The catalog: what a store holds, read from the store alone.

A :class:`Catalog` reads over any :class:`~overlaycache.store.base.ObjectStore`: the volumes that
have data there, a volume's geometry record, its PIT snapshots, and a read-only image of one of
them. It needs no local volume, so a fresh client that knows only the store can find and read every
PIT. The stores themselves stay pure key-value; :class:`CatalogMixin` gives the built-in stores the
catalog's methods (``store.volumes()``, ``store.image(...)``) by delegating to a ``Catalog``.

The keys and objects read here are those the replicator writes (see :mod:`overlaycache.remote.layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from overlaycache.errors import ObjectNotFoundError
from overlaycache.images import RemoteImage
from overlaycache.remote.layout import (
    VOLUMES_PREFIX,
    decode_volume_record,
    volume_key,
)
from overlaycache.remote.leases import LeaseKeeper, holder_name
from overlaycache.remote.listing import check_format, list_roots, list_snapshots, no_volume_error, read_root
from overlaycache.remote.tree import PageSource, PitMap
from overlaycache.retention import parse_duration
from overlaycache.snapshots import Snapshot, find_snapshot
from overlaycache.store.base import ObjectStore

__all__ = ["Catalog", "CatalogMixin"]



class Catalog:
    """The volumes and PIT snapshots kept in a store.

    Parameters
    ----------
    store : ObjectStore
        The store to read. Every read goes through it, so a wrapping store (fault injection,
        request counting) sees the catalog's requests too.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"Catalog({self.store!r})"

    def volumes(self) -> list[str]:
        """Ids of the volumes that have data in the store.

        Returns
        -------
        list of str
            Volume ids, sorted.
        """
        return self.store.list_dirs(VOLUMES_PREFIX)

    def volume_info(self, volume_id: str) -> dict[str, Any]:
        """The geometry record a volume wrote when it was attached to the store.

        Parameters
        ----------
        volume_id : str
            The volume.

        Returns
        -------
        dict
            The record; it has at least integer ``size`` and ``region_size``.

        Raises
        ------
        SnapshotNotFoundError
            The store has no record of this volume.
        FormatError
            The record is not valid JSON or lacks the geometry.
        """
        key = volume_key(volume_id)
        try:
            raw = self.store.get(key)
        except ObjectNotFoundError as exc:
            raise no_volume_error(self.store, volume_id) from exc
        return decode_volume_record(raw, key, self.store.location)

    def check_format(self, volume_id: str) -> None:
        """Refuse a volume the store holds in another format (see :func:`listing.check_format`)."""
        check_format(self.store, volume_id)

    def snapshots(self, volume_id: str) -> list[Snapshot]:
        """The PIT snapshots of a volume, oldest first; each root's header is verified (see
        :func:`listing.list_snapshots`)."""
        return list_snapshots(self.store, volume_id)

    def pit_map(self, volume_id: str, snapshot: Any, mirror: str | None = None) -> PitMap:
        """The map of one PIT snapshot, read lazily.

        Parameters
        ----------
        volume_id : str
            The volume.
        snapshot : Snapshot or str
            The snapshot, its id, or its label where labels are unique.
        mirror : str, optional
            A directory of page files to read before the store (see :class:`PageSource`).

        Raises
        ------
        SnapshotNotFoundError
            No such snapshot.
        CorruptionError
            The root is damaged or belongs to another volume.
        FormatError
            The store holds the volume in another format.
        """
        store = self.store
        roots = list_roots(store, volume_id)
        snap = find_snapshot([s for s, _key in roots], snapshot, f"{store.location} volume {volume_id}")
        root = read_root(store, volume_id, dict((s.id, key) for s, key in roots)[snap.id])
        return PitMap(root, PageSource(store, volume_id, mirror))

    def image(self, volume_id: str, snapshot: Any, cache_regions: int = 256,
              readahead: int | None = None, lease: float | str | None = None,
              holder: str | None = None) -> RemoteImage:
        """A read-only, lazy virtual image of a PIT snapshot; no local volume needed.

        Parameters
        ----------
        volume_id, snapshot
            As for :meth:`pit_map`.
        cache_regions : int
            Regions the image keeps in memory.
        readahead : int, optional
            Regions a sequential read keeps in flight ahead of it (default: 64 MiB worth).
        lease : float or str, optional
            Pin the PIT with a lease of this length (seconds, or a duration such as ``"6h"``),
            renewed in the background while the image is open (every third of it), so a collapse
            keeps the PIT however long the reader takes; closing the image lets the last lease run
            out. Needs credentials that may PUT. Default: no lease.
        holder : str, optional
            The lease holder's name (default: this host and the volume).

        Returns
        -------
        RemoteImage
            Reads its regions from the store on demand.

        Raises
        ------
        SnapshotNotFoundError, CorruptionError, FormatError
            As :meth:`pit_map` raises them.
        InvalidArgumentError
            A bad ``lease`` or ``holder``.
        StoreError
            The lease could not be stored.
        """
        ttl = None if lease is None else parse_duration(lease)
        pit = self.pit_map(volume_id, snapshot)
        keeper = None
        if ttl is not None:  # renewed while the image is open, so a long reader keeps its PIT
            keeper = LeaseKeeper(self.store, volume_id, pit.snapshot.id, holder or holder_name(volume_id), ttl)
        image = RemoteImage(self.store, pit, cache_regions=cache_regions, readahead=readahead)
        image.lease = keeper
        return image


class CatalogMixin:
    """The catalog's methods on a store class: each delegates to a :class:`Catalog` over the store.

    Mixed into :class:`~overlaycache.store.S3Store` and :class:`~overlaycache.store.LocalStore`; the
    class must implement :class:`~overlaycache.store.base.ObjectStore`.
    """

    def volumes(self: ObjectStore) -> list[str]:
        """Ids of the volumes that have data in this store (see :meth:`Catalog.volumes`)."""
        return Catalog(self).volumes()

    def volume_info(self: ObjectStore, volume_id: str) -> dict[str, Any]:
        """The geometry record of a volume (see :meth:`Catalog.volume_info`).

        Parameters
        ----------
        volume_id : str
            The volume.

        Returns
        -------
        dict
            At least integer ``size`` and ``region_size``.

        Raises
        ------
        SnapshotNotFoundError
            The store has no record of this volume.
        FormatError
            The record is damaged or of another format.
        """
        return Catalog(self).volume_info(volume_id)

    def snapshots(self: ObjectStore, volume_id: str) -> list[Snapshot]:
        """The PIT snapshots of a volume, oldest first (see :meth:`Catalog.snapshots`).

        Parameters
        ----------
        volume_id : str
            The volume (see :meth:`volumes`).

        Returns
        -------
        list of Snapshot
            Sorted by ``seq``; empty for a volume the store does not know.

        Raises
        ------
        FormatError
            The store holds the volume in another format.
        CorruptionError
            A PIT root's header is damaged, or names another volume or seq than its key.
        """
        return Catalog(self).snapshots(volume_id)

    def check(self: ObjectStore, volume_id: str, repair: bool = False, read_data: bool = False) -> Any:
        """Check a volume's packs, PIT roots and map pages; rebuild damaged PITs from the packs
        with ``repair`` (see :func:`overlaycache.remote.check.check_volume`).

        Parameters
        ----------
        volume_id : str
            The volume.
        repair : bool
            Rebuild the PITs whose roots, pages or records are damaged, from the packs, and replace
            their roots (needs credentials that may overwrite). Refused for a PIT while a pack it
            may need is damaged or missing.
        read_data : bool
            Also read every pack's bytes and verify them (reads all the volume's data).

        Returns
        -------
        CheckReport
            What was found (``problems``, ``damaged_packs``, ``damaged_snapshots``) and repaired.

        Raises
        ------
        SnapshotNotFoundError
            The store has nothing of this volume.
        FormatError
            The store holds the volume in another format.
        SecondaryUnavailableError
            The store cannot be reached.
        """
        from overlaycache.remote.check import check_volume  # it builds on this module

        return check_volume(self, volume_id, repair, read_data)

    def collapse(self: ObjectStore, volume_id: str, policy: Any, now: float | None = None,
                 dry_run: bool = False, page_grace: float | None = None,
                 progress: Callable[[int, int], None] | None = None, max_unused: float | None = None) -> Any:
        """Drop the PITs ``policy`` does not keep and delete what no retained PIT needs (see
        :func:`overlaycache.remote.collapse.collapse_volume`).

        Needs credentials that may delete. Dropping PITs reads and writes no region data; only a
        pack mostly dead is copied (its live versions, into a smaller generation of it). A kill at
        any point leaves every retained PIT readable, and a rerun finishes the job.

        Parameters
        ----------
        volume_id : str
            The volume.
        policy : RetentionPolicy
            What to keep; the newest PIT and the PITs with an unexpired lease are kept too.
        now : float, optional
            The time ages are measured from, in seconds since the epoch (default: now).
        dry_run : bool
            Report what would be done; write and delete nothing.
        page_grace : float, optional
            Seconds a map page must have been found unreferenced before a run deletes it
            (default 3600).
        progress : callable, optional
            ``progress(done, total)``: the kept PITs' maps walked, then the objects deleted.
        max_unused : float, optional
            Repack a pack when more than this share of its region bytes is dead (default 0.5;
            0: every pack with a dead version, 1: never).

        Returns
        -------
        CollapseReport
            The PITs kept (with their reasons) and removed, objects deleted, packs repacked and
            bytes freed.

        Raises
        ------
        InvalidArgumentError
            ``policy`` is not a :class:`~overlaycache.RetentionPolicy`, or ``max_unused`` is not
            within 0 to 1.
        SnapshotNotFoundError
            The store has no record of this volume.
        FormatError
            The store holds the volume in another format.
        CorruptionError
            A retained PIT's root or pages are damaged: nothing is deleted (see :meth:`check`).
        """
        from overlaycache.remote.collapse import MAX_UNUSED, PAGE_GRACE, collapse_volume  # it builds on this module

        return collapse_volume(self, volume_id, policy, now, dry_run, PAGE_GRACE if page_grace is None else page_grace,
                               progress, MAX_UNUSED if max_unused is None else max_unused)

    def image(self: ObjectStore, volume_id: str, snapshot: Any, cache_regions: int = 256,
              readahead: int | None = None, lease: float | str | None = None,
              holder: str | None = None) -> RemoteImage:
        """A read-only, lazy virtual image of a PIT snapshot (see :meth:`Catalog.image`).

        Needs only this store: a machine without the volume reads any PIT.

        Parameters
        ----------
        volume_id : str
            The volume.
        snapshot : Snapshot or str
            The PIT, its id, or its label where labels are unique.
        cache_regions : int
            Regions the image keeps in memory.
        readahead : int, optional
            Regions a sequential read keeps in flight ahead of it (default: 64 MiB worth).
        lease : float or str, optional
            Pin the PIT for this long (seconds, or a duration such as ``"6h"``) so that a collapse
            keeps it; taken once, not renewed. Needs credentials that may PUT.
        holder : str, optional
            The lease holder's name (default: this host and the volume).

        Returns
        -------
        RemoteImage
            A context manager; close it when done.

        Raises
        ------
        SnapshotNotFoundError
            No such PIT.
        CorruptionError
            The PIT's root is damaged or belongs to another volume.
        FormatError
            The store holds the volume in another format.
        InvalidArgumentError
            A bad ``lease`` or ``holder``.
        StoreError
            The lease could not be stored, or the store failed.
        """
        return Catalog(self).image(volume_id, snapshot, cache_regions, readahead, lease, holder)
