"""A volume's metadata (``volume.json``) as dataclasses, and its reading and writing.

``volume.json`` names the layers and local snapshots, the secondary the volume replicates to and
the distributed overlay in progress. It is a checksummed JSON descriptor replaced atomically (see
:mod:`overlaycache._fs`), so a crash leaves the old or the new one, and damage is a
:class:`FormatError` naming the file. The JSON layout is pinned by ``tests/golden/v1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from overlaycache._fs import read_json_checked, write_json_atomic
from overlaycache.errors import FormatError, OverlayCacheError
from overlaycache.local.geometry import Geometry, check_geometry
from overlaycache.snapshots import LocalSnapshot

META_NAME = "volume.json"
META_KIND = "overlaycache-volume"
META_VERSION = 2  # 2: overlays of slots and slot maps (local/layers.py); 1 is refused with a message
_KNOWN = {"kind", "version", "checksum", "id", "size", "region_size", "created_at", "layers", "next_layer",
          "snapshots", "next_snapshot", "merging", "secondary", "distributed_overlay", "unavailable"}


@dataclass
class SecondaryRecord:
    """The secondary a volume was last attached to.

    Attributes
    ----------
    location : str
        Where the store is (no credentials).
    mode : str
        Replication mode ("sync", "async" or "periodic").
    period : float or None
        Seconds between PITs in periodic mode.
    clean : bool
        Closed cleanly: everything shipped had been flushed, so no check is needed on open.
    resync : bool
        Opened without its secondary since: changes went untracked, so compare on the next attach.
    """

    location: str
    mode: str
    period: float | None = None
    clean: bool = False
    resync: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"location": self.location, "mode": self.mode, "period": self.period,
                               "clean": self.clean}
        if self.resync:
            out["resync"] = True
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SecondaryRecord:
        period = obj.get("period")
        return cls(str(obj["location"]), str(obj["mode"]), None if period is None else float(period),
                   bool(obj.get("clean", False)), bool(obj.get("resync", False)))


@dataclass
class DistributedOverlayState:
    """An active distributed overlay (seed Fig. 3F).

    Attributes
    ----------
    layer : int
        The first overlay written since it began: regions held by it or a newer one are PO.
    snapshot : int
        The seq of the PIT that serves the regions not valid locally (R).
    snapshot_id : str
        That PIT's id.
    started_at : float
        When it began (seconds since the epoch).
    lost : list of int
        Regions whose newest versions could not be read for shipping: the PIT has their last
        replicated ones.
    """

    layer: int
    snapshot: int
    snapshot_id: str
    started_at: float
    lost: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "snapshot": self.snapshot, "snapshot_id": self.snapshot_id,
                "started_at": self.started_at, "lost": list(self.lost)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DistributedOverlayState:
        return cls(int(obj["layer"]), int(obj["snapshot"]), str(obj["snapshot_id"]), float(obj["started_at"]),
                   sorted(int(r) for r in obj.get("lost", [])))


@dataclass
class VolumeMeta:
    """The contents of ``volume.json``.

    Attributes
    ----------
    id : str
        The volume's id (its key in a store).
    size, region_size : int
        Geometry.
    created_at : float
        Seconds since the epoch.
    layers : list of int
        Overlay ids, oldest first (the base is implicit, id 0).
    next_layer, next_snapshot : int
        The next overlay id and local snapshot id (never reused).
    snapshots : list of LocalSnapshot
        The local snapshots, oldest first.
    merging : int or None
        The overlay being folded into the base (an interrupted merge is finished on open).
    secondary : SecondaryRecord or None
        The secondary last attached.
    distributed_overlay : DistributedOverlayState or None
        The distributed overlay in progress.
    unavailable : bool
        ``unavailable.map`` marks regions (so it must be there).
    """

    id: str
    size: int
    region_size: int
    created_at: float
    layers: list[int]
    next_layer: int
    snapshots: list[LocalSnapshot]
    next_snapshot: int
    merging: int | None = None
    secondary: SecondaryRecord | None = None
    distributed_overlay: DistributedOverlayState | None = None
    unavailable: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer writer, kept as they are

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.region_size)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update({
            "kind": META_KIND, "version": META_VERSION, "id": self.id, "size": self.size,
            "region_size": self.region_size, "created_at": self.created_at, "layers": list(self.layers),
            "next_layer": self.next_layer, "snapshots": [s.to_json() for s in self.snapshots],
            "next_snapshot": self.next_snapshot, "merging": self.merging,
        })
        if self.secondary is not None:
            out["secondary"] = self.secondary.to_json()
        if self.distributed_overlay is not None:
            out["distributed_overlay"] = self.distributed_overlay.to_json()
        if self.unavailable:
            out["unavailable"] = True
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: str) -> VolumeMeta:
        """Check and decode ``obj`` read from ``path``.

        Raises
        ------
        FormatError
            A field is missing or invalid.
        """
        try:
            check_geometry(obj["size"], obj["region_size"])
            layers = obj["layers"]
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in layers):
                raise ValueError("bad layer list")
            merging = obj.get("merging")
            secondary = obj.get("secondary")
            do = obj.get("distributed_overlay")
            return cls(
                id=str(obj["id"]), size=obj["size"], region_size=obj["region_size"],
                created_at=float(obj.get("created_at", 0.0)), layers=list(layers),
                next_layer=int(obj["next_layer"]),
                snapshots=[LocalSnapshot.from_json(s) for s in obj["snapshots"]],
                next_snapshot=int(obj["next_snapshot"]),
                merging=None if merging is None else int(merging),
                secondary=None if secondary is None else SecondaryRecord.from_json(secondary),
                distributed_overlay=None if do is None else DistributedOverlayState.from_json(do),
                unavailable=obj.get("unavailable", False) is True,
                extra={k: v for k, v in obj.items() if k not in _KNOWN},
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverlayCacheError) as exc:
            raise FormatError(f"{path}: invalid contents ({exc})", path) from exc


def read_meta(directory: str) -> VolumeMeta:
    """Read and check ``volume.json`` in ``directory``.

    Raises
    ------
    FormatError
        Not a volume, damaged, or of a newer format.
    """
    obj = read_json_checked(directory, META_NAME, META_KIND, META_VERSION, "volume")
    path = os.path.join(directory, META_NAME)
    if obj["version"] != META_VERSION:
        raise FormatError(f"{directory}: a volume of local format {obj['version']} (overlays of two slots per "
                          f"region); this overlaycache reads format {META_VERSION}: convert it with "
                          f"`overlaycache convert {directory}`", path)
    return VolumeMeta.from_json(obj, path)


def write_meta(directory: str, meta: VolumeMeta) -> None:
    """Replace ``volume.json`` in ``directory`` atomically and durably."""
    write_json_atomic(directory, META_NAME, meta.to_json())


def remove_meta_temp(directory: str) -> None:
    """Delete the temporary file an interrupted :func:`write_meta` left behind."""
    try:
        os.unlink(os.path.join(directory, META_NAME + ".tmp"))
    except FileNotFoundError:
        pass
