"""The persistent map of regions whose local data cannot be trusted (``unavailable.map``).

A region is unavailable when a read of it failed (I/O error, SIGBUS on a truncated or failed file),
its bytes did not match their checksum, or the operator declared it lost. The map is a bitmap
replaced atomically when it changes; the failover (:mod:`overlaycache.failover`) decides where
such regions are read from.
"""

from __future__ import annotations

import itertools
import logging
import os
from array import array
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
        regs = regions if isinstance(regions, (list, range)) else list(regions)
        for r in regs[: max(0, _MAX_REASONS - len(self.reasons))]:
            self.reasons.setdefault(r, reason)
        if not regs:
            return []
        was = self.bits.test_many(array("Q", regs), True)  # tested and set in one pass
        new = list(itertools.compress(regs, (not b for b in was)))
        self._count += len(new)
        if new:
            self.dirty = True
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

    def summary(self, limit: int = 32) -> str:
        """The unavailable regions for a message: the first ``limit`` ranges, and how many there
        are in all (the bitmap is scanned only as far as those ranges go)."""
        runs: list[tuple[int, int]] = []
        n = self.bits.nbits
        pos, step = 0, 1 << 16
        while pos < n and len(runs) <= limit:
            runs += self.bits.runs(pos, min(n, pos + step))
            pos += step
        if runs and pos < n and runs[-1][1] == pos:  # a run cut at the scan's end: leave it out
            runs.pop()
        text = ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in runs[:limit]) or "none"
        shown = sum(b - a for a, b in runs[:limit])
        return text + (f" ... ({self._count:,} regions in all)" if self._count > shown else "")

    def store(self) -> None:
        """Write the map durably (temp file, fsync, rename, fsync of the directory)."""
        write_file_atomic(self.path, _MAGIC + self.bits.to_bytes())
        self.dirty = False
