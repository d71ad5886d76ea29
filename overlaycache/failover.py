"""Unavailable regions and the distributed overlay snapshot (seed Figs. 3B-3H).

When regions of the primary cannot be read (I/O error, SIGBUS on a truncated or failed file, a
checksum mismatch, or the operator declaring them lost), the volume:

1. ships every unsynced region that is still readable (unsynced regions that cannot be read are
   *lost*: their newest copy is the last replicated version; they are logged and reported),
2. publishes a PIT snapshot on the secondary (a manifest: no data is copied),
3. pushes a fresh overlay: every later write goes there; the layers below are never written again
   until the distributed overlay ends (``merge_down`` is refused meanwhile).

Each region is then read from one of three places, its *location code*:

``PO``
    the primary overlay: written since the distributed overlay began;
``PB``
    the primary base (the local layers below the distributed overlay), still valid;
``R``
    the remote PIT snapshot: not valid locally.

The unavailable regions are a bitmap in ``unavailable.map``, replaced atomically when it changes.
"""

from __future__ import annotations

import os

from overlaycache._impl import core
from overlaycache.errors import FormatError
from overlaycache.layers import fsync_dir

PO, PB, R = "PO", "PB", "R"
#: Byte codes used internally (as returned by :func:`location_codes`).
CODE_PO, CODE_R, CODE_PB = 0, 1, 2
CODE_NAMES = {CODE_PO: PO, CODE_R: R, CODE_PB: PB}
_MAGIC = b"OCUNAV01"


class UnavailableMap:
    """The persistent set of regions whose local data cannot be trusted."""

    def __init__(self, directory: str, num_regions: int) -> None:
        self.path = os.path.join(directory, "unavailable.map")
        self.bits = core.Bitmap(num_regions)
        self.dirty = False
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

    def discard(self, r: int) -> None:
        """Unmark region ``r``."""
        if self.bits.test(r):
            self.bits.clear(r)
            self._count -= 1
            self.dirty = True

    def clear(self) -> None:
        """Unmark every region."""
        self.bits.clear_range(0, self.bits.nbits)
        self._count = 0
        self.dirty = True

    def regions(self) -> frozenset[int]:
        return frozenset(r for a, b in self.bits.runs() for r in range(a, b))

    def store(self) -> None:
        """Write the map durably (temp file, fsync, rename, fsync of the directory)."""
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_MAGIC + self.bits.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(os.path.dirname(self.path))
        self.dirty = False


def location_codes(po_maps: list[object], unavailable: object, first: int, count: int) -> bytearray:
    """One code per region: ``CODE_PO``, ``CODE_R`` or ``CODE_PB`` (the batch ``resolve`` kernel).

    ``po_maps`` are the present-bitmaps of the overlays written since the distributed overlay
    began (newest first); ``unavailable`` the bitmap of regions not valid locally.
    """
    found = core.resolve([*po_maps, unavailable], first, count)
    k = len(po_maps)
    # resolve gives k for "unavailable" and k + 1 for "neither": map to R and PB; < k is PO.
    table = bytes([CODE_PO] * k + [CODE_R, CODE_PB]) + bytes(256 - k - 2)
    return bytearray(found.translate(table))
