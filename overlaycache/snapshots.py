"""Snapshots of a volume.

A *local snapshot* freezes the top overlay of a volume and pushes an empty one (the seed's overlay
snapshot, Fig. 2). Its image is the stack of layers from the base up to the frozen overlay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
        return {"id": self.id, "label": self.label, "created_at": self.created_at, "layer": self.layer}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LocalSnapshot:
        return cls(str(obj["id"]), obj.get("label"), float(obj["created_at"]), int(obj["layer"]))
