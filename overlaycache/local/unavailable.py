"""The persistent map of regions whose local data cannot be trusted (``unavailable.map``).

A region is unavailable when a read of it failed (I/O error, SIGBUS on a truncated or failed file),
its bytes did not match their checksum, or the operator declared it lost. The map is a bitmap
replaced atomically when it changes; the failover (:mod:`overlaycache.failover`) decides where
such regions are read from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from overlaycache._fs import write_file_atomic
from overlaycache._impl import core
from overlaycache.errors import FormatError, Reason
from overlaycache.local.geometry import region_ranges

_log = logging.getLogger(__name__)

_MAGIC = b"OCUNAV01"
#: Reasons are remembered (for messages) for this many regions; beyond, they are reported as
#: "unavailable" (memory stays bounded whatever the number of regions marked).
_MAX_REASONS = 1 << 16


class UnavailableMap:
    """The persistent set of regions whose local data cannot be trusted."""

    def __init__(self, directory: str, num_regions: int) -> None:
        self.path = os.path.join(directory, "unavailable.map")
        self.bits = core.Bitmap(num_regions)
        self.dirty = False
        self.reasons: dict[int, Reason] = {}  # why, for messages (not persisted)
        self._count = 0  # kept so that the read path's any() is O(1), not a scan of the bitmap
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        if raw[:8] != _MAGIC or len(raw) != 8 + 8 * self.bits.nwords:
            raise FormatError(f"{self.path}: not an unavailable-regions map of this volume", self.path)
        self.bits.load(raw[8:])
        self._count = self.bits.count()

    def any(self) -> bool:
        return self._count > 0

    def add(self, r: int) -> bool:
        """Mark region ``r``; returns whether it was not marked before."""
        if self.bits.test(r):
            return False
        self.bits.set(r)
        self._count += 1
        self.dirty = True
        return True

    def mark(self, regions: Iterable[int], reason: Reason) -> list[int]:
        """Mark ``regions`` for ``reason`` and store the map if that changed it (the caller holds
        the volume's writer lock); returns the newly marked ones, which are logged."""
        new = []
        for r in regions:
            if len(self.reasons) < _MAX_REASONS:
                self.reasons.setdefault(r, reason)
            if self.add(r):
                new.append(r)
        if new:
            self.store()
            _log.error("%s: regions %s are unavailable locally (%s)", os.path.dirname(self.path),
                       region_ranges(new), reason)
        return new

    def reason(self, r: int) -> Reason:
        """Why region ``r`` is unavailable (as first found since the volume was opened)."""
        return self.reasons.get(r, Reason.UNAVAILABLE)

    def discard(self, r: int) -> None:
        """Unmark region ``r``."""
        self.reasons.pop(r, None)
        if self.bits.test(r):
            self.bits.clear(r)
            self._count -= 1
            self.dirty = True

    def clear(self) -> None:
        """Unmark every region."""
        self.bits.clear_range(0, self.bits.nbits)
        self.reasons.clear()
        self._count = 0
        self.dirty = True

    def regions(self) -> frozenset[int]:
        return frozenset(r for a, b in self.bits.runs() for r in range(a, b))

    def store(self) -> None:
        """Write the map durably (temp file, fsync, rename, fsync of the directory)."""
        write_file_atomic(self.path, _MAGIC + self.bits.to_bytes())
        self.dirty = False
