"""The persistent map of regions whose local data cannot be trusted (``unavailable.map``).

A region is unavailable when a read of it failed (I/O error, SIGBUS on a truncated or failed file),
its bytes did not match their checksum, or the operator declared it lost. The failover
(:mod:`overlaycache.failover`) decides where such regions are read from.

The file (format 2) is replaced atomically when the map changes: :data:`_HEAD` (magic
``OCUNAV02``, version, number of regions, the volume's salt), the bitmap (bit ``r % 8`` of byte
``r // 8``, in 8-byte words), then 16 bytes: mmh3 x64-128 of everything before. A map that fails
its check, or of another volume, is a :class:`FormatError` naming the file: the regions it marks
decide where data is read from. ``volume.json`` says whether the volume has regions marked
(``"unavailable": true``), so a map deleted while it marked some is an error too, never a volume
that quietly trusts them again. A map of format 1 (the magic ``OCUNAV01`` and the bitmap, no
check) is read, and written in format 2 when it next changes.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
from array import array
from collections.abc import Callable, Iterable

from overlaycache._fs import write_file_atomic
from overlaycache._impl import core
from overlaycache.errors import FormatError, Reason
from overlaycache.local.geometry import region_ranges

_log = logging.getLogger(__name__)

_MAGIC_V1 = b"OCUNAV01"
_MAGIC = b"OCUNAV02"
_VERSION = 2
#: magic, version, number of regions, salt.
_HEAD = struct.Struct("<8sIQ16s")
UNAVAILABLE_MAP = "unavailable.map"
#: Reasons are remembered (for messages) for this many regions; beyond, they are reported as
#: "unavailable" (memory stays bounded whatever the number of regions marked).
_MAX_REASONS = 1 << 16


class UnavailableMap:
    """The persistent set of regions whose local data cannot be trusted."""

    def __init__(self, directory: str, num_regions: int, volume_id: str, expected: bool = False,
                 on_change: Callable[[bool], None] | None = None) -> None:
        """Load the map of ``directory``; ``expected``: ``volume.json`` says regions are marked.

        ``on_change(marked)`` is called when the map, as stored, goes from no regions marked to
        some (after it is stored) or back (before it is stored), to keep ``volume.json`` in step.
        """
        self.path = os.path.join(directory, UNAVAILABLE_MAP)
        self.bits = core.Bitmap(num_regions)
        self.salt = bytes(core.checksum(b"overlaycache unavailable.map\0" + volume_id.encode()))
        self.dirty = False
        self.reasons: dict[int, Reason] = {}  # why, for messages (not persisted)
        self._count = 0  # kept so that the read path's any() is O(1), not a scan of the bitmap
        self._on_change = on_change
        self._stored_marked = expected
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            if expected:
                raise FormatError(f"{self.path}: missing, but volume.json says regions of the volume are "
                                  "unavailable: restore the file (which regions cannot be trusted is "
                                  "not known without it)", self.path) from None
            return
        words = 8 * self.bits.nwords
        if raw[:8] == _MAGIC_V1 and len(raw) == 8 + words:
            self.bits.load(raw[8:])
            self.dirty = True  # written in format 2 at the next store
        else:
            size = _HEAD.size
            if (len(raw) != size + words + 16 or raw[:8] != _MAGIC
                    or bytes(core.checksum(raw[:-16])) != raw[-16:]):
                raise FormatError(f"{self.path}: damaged (its checksum does not match, or truncated): which "
                                  "regions cannot be trusted is not known", self.path)
            _magic, version, n, salt = _HEAD.unpack_from(raw)
            if (version, n, salt) != (_VERSION, num_regions, self.salt):
                raise FormatError(f"{self.path}: the unavailable-regions map of another volume", self.path)
            self.bits.load(raw[size : size + words])
        self._count = self.bits.count()
        if self._count and not expected and on_change is not None:
            on_change(True)  # a map from before volume.json said so
            self._stored_marked = True

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
        """Write the map durably (temp file, fsync, rename, fsync of the directory); tell
        ``on_change`` when it goes from no region marked to some, or back."""
        marked = self._count > 0
        changed = marked != self._stored_marked and self._on_change is not None
        if changed and not marked:
            assert self._on_change is not None
            self._on_change(False)
        body = _HEAD.pack(_MAGIC, _VERSION, self.bits.nbits, self.salt) + self.bits.to_bytes()
        write_file_atomic(self.path, body + bytes(core.checksum(body)))
        if changed and marked:
            assert self._on_change is not None
            self._on_change(True)
        self._stored_marked = marked
        self.dirty = False
