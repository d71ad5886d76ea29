"""The object-store protocol shared by every secondary store.

Keys are ``/``-separated strings relative to the store's own prefix. Objects are immutable: a
conditional ``put(..., if_absent=True)`` raises :class:`ObjectExistsError` when the key exists, and
nothing but garbage collection deletes.
"""

from __future__ import annotations

import builtins

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from overlaycache.images import RemoteImage
    from overlaycache.snapshots import Snapshot


@runtime_checkable
class ObjectStore(Protocol):
    """What overlaycache needs from an object store."""

    #: Where the store is, for messages (no credentials).
    location: str

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        """Store ``data`` (bytes-like) under ``key``; with ``if_absent``, fail if the key exists."""

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` bytes from ``start`` (a ranged GET)."""

    def head(self, key: str) -> int | None:
        """The object's size, or None when there is no such object."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in lexicographic order."""

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """The next path components below ``prefix`` (which ends with ``/``), like S3's delimiter."""

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` (missing ones are fine), in batches."""

    def close(self) -> None:
        """Release connections."""


class StoreReader:
    """Reading volumes and PIT snapshots from a store alone (mixed into every store)."""

    location: str

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[str]:
        raise NotImplementedError

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        raise NotImplementedError

    def volumes(self) -> builtins.list[str]:
        """Ids of the volumes that have data in this store."""
        return self.list_dirs("volumes/")

    def volume_info(self, volume_id: str) -> dict[str, Any]:
        """The geometry record a volume wrote when it was attached."""
        from overlaycache.errors import FormatError, ObjectNotFoundError, SnapshotNotFoundError

        key = f"volumes/{volume_id}/volume.json"
        try:
            raw = self.get(key)
        except ObjectNotFoundError as exc:
            raise SnapshotNotFoundError(f"{self.location}: no volume {volume_id!r}", volume_id) from exc
        try:
            info = json.loads(raw)
            int(info["size"]), int(info["region_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{self.location}/{key}: invalid volume record", key) from exc
        return dict(info)

    def snapshots(self, volume_id: str) -> builtins.list[Snapshot]:
        """The PIT snapshots of a volume, oldest first."""
        from overlaycache.snapshots import read_manifest_header

        out = []
        for key in self.list(f"volumes/{volume_id}/snapshots/"):
            if key.endswith(".manifest"):
                out.append(read_manifest_header(self.get(key, 0, 4096), key))
        return sorted(out, key=lambda s: s.seq)

    def image(self, volume_id: str, snapshot: Any, cache_regions: int = 64) -> RemoteImage:
        """A read-only, lazy virtual image of a PIT snapshot; no local volume needed."""
        from overlaycache.errors import CorruptionError
        from overlaycache.images import RemoteImage
        from overlaycache.snapshots import decode_manifest, find_snapshot, manifest_key

        snap = find_snapshot(self.snapshots(volume_id), snapshot, f"{self.location} volume {volume_id}")
        key = manifest_key(volume_id, snap.seq)
        manifest = decode_manifest(self.get(key), f"{self.location}/{key}")
        if manifest.volume_id != volume_id:
            raise CorruptionError(f"{self.location}/{key}: manifest of volume {manifest.volume_id}, not {volume_id}")
        return RemoteImage(self, manifest, cache_regions=cache_regions)
