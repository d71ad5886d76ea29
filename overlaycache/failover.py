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

The unavailable regions are kept by :class:`overlaycache.local.unavailable.UnavailableMap`.
"""

from __future__ import annotations

from overlaycache._impl import core

PO, PB, R = "PO", "PB", "R"
#: Byte codes used internally (as returned by :func:`location_codes`).
CODE_PO, CODE_R, CODE_PB = 0, 1, 2
CODE_NAMES = {CODE_PO: PO, CODE_R: R, CODE_PB: PB}


def location_codes(po_maps: list[core.Bitmap], unavailable: core.Bitmap, first: int, count: int) -> bytearray:
    """One code per region: ``CODE_PO``, ``CODE_R`` or ``CODE_PB`` (the batch ``resolve`` kernel).

    ``po_maps`` are the present-bitmaps of the overlays written since the distributed overlay
    began (newest first); ``unavailable`` the bitmap of regions not valid locally.
    """
    found = core.resolve([*po_maps, unavailable], first, count)
    k = len(po_maps)
    # resolve gives k for "unavailable" and k + 1 for "neither": map to R and PB; < k is PO.
    table = bytes([CODE_PO] * k + [CODE_R, CODE_PB]) + bytes(256 - k - 2)
    return bytearray(found.translate(table))
