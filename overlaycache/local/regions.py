"""What the collaborators of a volume may ask of its local regions.

The replicator, hydration and recovery images talk to the volume through these small protocols,
never through its private members. The volume hands them its failover router
(:class:`overlaycache.failover.Router`), which knows where each region's valid copy is and
implements them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from overlaycache.errors import RegionUnavailableError


class LocalRegions(Protocol):
    """A volume's local regions, as the replicator and recovery images see them."""

    @property
    def path(self) -> str:
        """Where the volume is, for messages."""

    @property
    def volume_id(self) -> str:
        """The volume's id (its key in a store)."""

    @property
    def size(self) -> int:
        """Bytes in the volume."""

    @property
    def region_size(self) -> int:
        """Bytes per region."""

    @property
    def num_regions(self) -> int:
        """Regions in the volume."""

    @property
    def closed(self) -> bool:
        """Whether the volume is closed."""

    def read_region(self, r: int) -> bytes:
        """The current local bytes of region ``r``, never a remote copy.

        Raises
        ------
        RegionUnavailableError
            The region is not valid locally (it is then marked unavailable).
        """

    def read_run(self, first: int, count: int) -> bytes:
        """The current local bytes of regions ``first..first+count-1`` in one read, never a
        remote copy.

        Raises
        ------
        RegionUnavailableError
            One of them is not valid locally (read them one by one to know which).
        """

    def checksums(self) -> bytearray:
        """The checksum of every region's current version (16 bytes each), from the tables."""

    def remote_regions(self) -> set[int]:
        """The regions read from the remote PIT (R) now: not valid locally."""

    def local_checksum(self, r: int) -> bytes | None:
        """The checksum of region ``r``'s current local version, or None when it is not known
        valid (remote, or not committed yet)."""

    def written_regions(self) -> Iterable[int]:
        """The regions that may hold data (every other one is all zeros), in order: those held
        by an overlay, and those of the base with a checksum recorded."""

    def note_unreadable(self, exc: RegionUnavailableError) -> None:
        """A read of :meth:`read_run` failed: remember the regions as unavailable."""

    def is_uncommitted(self, r: int) -> bool:
        """Whether region ``r``'s current local version was written since the last commit."""

    def read_if_identical(self, r: int, csum: bytes, offset: int, out: memoryview) -> bool:
        """Read ``out`` at ``offset`` (inside region ``r``) locally if the region's current version
        has checksum ``csum``; returns False, reading nothing, otherwise."""


class ReplicationHost(LocalRegions, Protocol):
    """A volume as its replicator sees it: its regions, and the steps that involve the volume."""

    def ship_pending(self) -> int:
        """Ship every pending region (regions lost during a distributed overlay are recorded);
        returns how many were shipped."""

    def begin_distributed_overlay(self) -> object:
        """A pending region could not be read: begin serving it from the secondary."""

    def snapshot(self) -> object:
        """Publish a consistent PIT (periodic mode)."""
