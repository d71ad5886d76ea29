"""Hydration: copying the remote (R) regions of a distributed overlay back to local storage.

During a distributed overlay the regions not valid locally are read from the remote PIT (R).
Hydration fetches them (through the region cache) and installs each as a whole local version in
the volume's top overlay, so that the volume stops depending on the secondary for reads; the
restore that ends the distributed overlay then folds them into the base. A hydrated region is the
PIT's version, which the secondary already holds: it is not shipped again.

Like dm-clone's background hydration, it is a :class:`~overlaycache.jobs.Job`: small batches,
yielding to foreground I/O, an optional byte rate, progress as ``progress(done, total)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from overlaycache.jobs import IDLE, Job

__all__ = ["BATCH", "IDLE", "Hydration", "HydrationTarget"]

#: Regions fetched per batch (in parallel).
BATCH = 16


class HydrationTarget(Protocol):
    """What hydration needs of a volume."""

    @property
    def path(self) -> str:
        """Where the volume is, for messages."""

    @property
    def region_size(self) -> int:
        """Bytes per region."""

    @property
    def io_count(self) -> int:
        """Foreground reads and writes so far (hydration yields to them)."""

    def hydrate_batch(self, regions: list[int]) -> int:
        """Install the PIT's version of those of ``regions`` still R; returns how many."""


class Hydration(Job):
    """The handle of a hydration run (see :class:`~overlaycache.jobs.Job`).

    Attributes
    ----------
    total : int
        R regions found when it started.
    done : int
        Regions dealt with so far: installed locally, or found no longer remote (written meanwhile).
    installed : int
        Regions installed from the PIT.
    error : BaseException or None
        Why it stopped early, if it did.
    """

    def __init__(self, target: HydrationTarget, regions: list[int],
                 progress: Callable[[int, int], None] | None, rate: float | None, idle: float = IDLE) -> None:
        super().__init__("hydration", target.path, regions, target.hydrate_batch, batch=BATCH,
                         unit_bytes=target.region_size, progress=progress, rate=rate, idle=idle,
                         activity=lambda: target.io_count)

    @property
    def installed(self) -> int:
        """Regions installed from the PIT."""
        return self.moved
