"""The catalog: what a store holds, read from the store alone.

A :class:`Catalog` reads over any :class:`~overlaycache.store.base.ObjectStore`: the volumes that
have data there, a volume's geometry record, its PIT snapshots, and a read-only image of one of
them. It needs no local volume, so a fresh client that knows only the store can find and read every
PIT. The stores themselves stay pure key-value; :class:`CatalogMixin` gives the built-in stores the
catalog's methods (``store.volumes()``, ``store.image(...)``) by delegating to a ``Catalog``.

The keys and objects read here are those the replicator writes (see :mod:`overlaycache.remote.layout`).
"""

from __future__ import annotations

from typing import Any

from overlaycache.errors import CorruptionError, ObjectNotFoundError, SnapshotNotFoundError
from overlaycache.images import RemoteImage
from overlaycache.remote.layout import (
    VOLUMES_PREFIX,
    decode_volume_record,
    is_manifest_key,
    manifest_key,
    manifests_prefix,
    volume_key,
)
from overlaycache.remote.manifest import decode_manifest, read_manifest_header
from overlaycache.snapshots import Snapshot, find_snapshot
from overlaycache.store.base import ObjectStore

__all__ = ["Catalog", "CatalogMixin"]

#: Enough bytes of a manifest for its header and label (:func:`read_manifest_header`).
_HEADER_BYTES = 4096


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
            raise SnapshotNotFoundError(f"{self.store.location}: no volume {volume_id!r}", volume_id) from exc
        return decode_volume_record(raw, key, self.store.location)

    def snapshots(self, volume_id: str) -> list[Snapshot]:
        """The PIT snapshots of a volume, oldest first.

        Parameters
        ----------
        volume_id : str
            The volume.

        Returns
        -------
        list of Snapshot
            Sorted by ``seq``; empty for an unknown volume.
        """
        out = []
        for key in self.store.list(manifests_prefix(volume_id)):
            if is_manifest_key(key):
                out.append(read_manifest_header(self.store.get(key, 0, _HEADER_BYTES), key))
        return sorted(out, key=lambda s: s.seq)

    def image(self, volume_id: str, snapshot: Any, cache_regions: int = 64) -> RemoteImage:
        """A read-only, lazy virtual image of a PIT snapshot; no local volume needed.

        Parameters
        ----------
        volume_id : str
            The volume.
        snapshot : Snapshot or str
            The snapshot, its id, or its label where labels are unique.
        cache_regions : int
            Regions the image keeps in memory.

        Returns
        -------
        RemoteImage
            Reads its regions from the store on demand.

        Raises
        ------
        SnapshotNotFoundError
            No such snapshot.
        CorruptionError
            The manifest is damaged or belongs to another volume.
        """
        store = self.store
        snap = find_snapshot(self.snapshots(volume_id), snapshot, f"{store.location} volume {volume_id}")
        key = manifest_key(volume_id, snap.seq)
        manifest = decode_manifest(store.get(key), f"{store.location}/{key}")
        if manifest.volume_id != volume_id:
            raise CorruptionError(f"{store.location}/{key}: manifest of volume {manifest.volume_id}, not {volume_id}")
        return RemoteImage(store, manifest, cache_regions=cache_regions)


class CatalogMixin:
    """The catalog's methods on a store class: each delegates to a :class:`Catalog` over the store.

    Mixed into :class:`~overlaycache.store.S3Store` and :class:`~overlaycache.store.LocalStore`; the
    class must implement :class:`~overlaycache.store.base.ObjectStore`.
    """

    def volumes(self: ObjectStore) -> list[str]:
        """Ids of the volumes that have data in this store (see :meth:`Catalog.volumes`)."""
        return Catalog(self).volumes()

    def volume_info(self: ObjectStore, volume_id: str) -> dict[str, Any]:
        """The geometry record of a volume (see :meth:`Catalog.volume_info`)."""
        return Catalog(self).volume_info(volume_id)

    def snapshots(self: ObjectStore, volume_id: str) -> list[Snapshot]:
        """The PIT snapshots of a volume, oldest first (see :meth:`Catalog.snapshots`)."""
        return Catalog(self).snapshots(volume_id)

    def image(self: ObjectStore, volume_id: str, snapshot: Any, cache_regions: int = 64) -> RemoteImage:
        """A read-only, lazy virtual image of a PIT snapshot (see :meth:`Catalog.image`)."""
        return Catalog(self).image(volume_id, snapshot, cache_regions)
