"""Snapshots of a volume: local ones (frozen overlays) and point-in-time ones on the secondary, and
finding one by id or label.

A *local snapshot* freezes the top overlay of a volume and pushes an empty one (the seed's overlay
snapshot, Fig. 2). Its image is the stack of layers from the base up to the frozen overlay.

A *PIT snapshot* lives on the secondary: a cutoff ``seq`` and a map that names, per region, the
newest stored version with ``seq <= cutoff`` and its checksum. Its keys and object formats are in
:mod:`overlaycache.remote.layout`, the map trees in :mod:`overlaycache.remote.tree`.

This module holds only the values and the lookup: both the local side (``local/``) and the
secondary's (``remote/``) use it, and it imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from overlaycache.errors import InvalidArgumentError, SnapshotNotFoundError


@dataclass(frozen=True)
class LocalSnapshot:
    """A frozen level of a volume's local layer stack.

    Attributes
    ----------
    id : str
        Unique within the volume, never reused.
    label : str or None
        Optional unique name.
    created_at : float
        Seconds since the epoch.
    layer : int
        Id of the newest layer of its image (0 is the base).
    """

    id: str
    label: str | None
    created_at: float
    layer: int

    def to_json(self) -> dict[str, Any]:
        """The snapshot as plain data, as ``volume.json`` records it (see :meth:`from_json`)."""
        return {"id": self.id, "label": self.label, "created_at": self.created_at, "layer": self.layer}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LocalSnapshot:
        """The snapshot :meth:`to_json` described.

        Parameters
        ----------
        obj : dict
            The output of :meth:`to_json` (``label`` may be missing).

        Returns
        -------
        LocalSnapshot

        Raises
        ------
        KeyError, TypeError, ValueError
            ``obj`` lacks a field or has one of the wrong type.
        """
        return cls(str(obj["id"]), obj.get("label"), float(obj["created_at"]), int(obj["layer"]))


@dataclass(frozen=True)
class Snapshot:
    """A point-in-time snapshot on the secondary.

    Attributes
    ----------
    id : str
        The cutoff seq as 16 hex digits (the name of its root).
    seq : int
        Cutoff: the snapshot holds, per region, the newest version with ``seq <= cutoff``.
    created_at : float
        Seconds since the epoch.
    label : str or None
        Optional name, unique per volume.
    """

    id: str
    seq: int
    created_at: float
    label: str | None


_S = TypeVar("_S", Snapshot, LocalSnapshot)


def find_snapshot(snapshots: Sequence[_S], key: Any, where: str) -> _S:
    """The snapshot named by ``key``: a snapshot, its id, or its label. One rule for local and PIT
    snapshots: an id matches first; a label must name exactly one snapshot.

    Parameters
    ----------
    snapshots : list of Snapshot or of LocalSnapshot
        Where to look.
    key : Snapshot, LocalSnapshot or str
        The snapshot, its id, or its label where labels are unique.
    where : str
        What to call the place looked in (the volume or store), for errors.

    Returns
    -------
    Snapshot or LocalSnapshot
        The snapshot found.

    Raises
    ------
    SnapshotNotFoundError
        No such snapshot.
    InvalidArgumentError
        ``key`` is not a snapshot, id or label, or the label names several snapshots.
    """
    if isinstance(key, (Snapshot, LocalSnapshot)):
        key = key.id
    if not isinstance(key, str):
        raise InvalidArgumentError(f"expected a snapshot, its id or label, got {type(key).__name__}")
    for s in snapshots:
        if s.id == key:
            return s
    labelled = [s for s in snapshots if s.label == key]
    if len(labelled) == 1:
        return labelled[0]
    if labelled:
        raise InvalidArgumentError(f"{where}: label {key!r} names {len(labelled)} snapshots; use an id")
    raise SnapshotNotFoundError(f"{where}: no snapshot {key!r}", key)
