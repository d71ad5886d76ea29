"""Reading and forging a closed volume's files, for the damage and crash tests.

These helpers know the on-disk format of :mod:`overlaycache.local.layers`, so that tests can find
where a region's version lives, or write a journal batch as a volume would, without reaching into
an open volume.
"""

from __future__ import annotations

import json
import os
import struct

from overlaycache._impl import core
from overlaycache.local.layers import MAP_OFFSET, REC, overlay_salt

__all__ = ["journal_batch", "overlay_slot", "volume_id"]


def volume_id(directory: str | os.PathLike[str]) -> str:
    """The id in a volume's ``volume.json``."""
    with open(os.path.join(directory, "volume.json"), "rb") as f:
        return str(json.loads(f.read())["id"])


def overlay_slot(directory: str | os.PathLike[str], layer_id: int, region: int) -> int:
    """The slot of ``region`` in ``overlay-<layer_id>.data`` as the overlay's map file records it
    (checkpointed versions only; -1: none)."""
    with open(os.path.join(directory, f"overlay-{layer_id}.map"), "rb") as f:
        f.seek(MAP_OFFSET + REC.size * region)
        slot, _csum, _check = REC.unpack(f.read(REC.size))
    return int(slot) - 1


def journal_batch(directory: str | os.PathLike[str], layer_id: int, batch: int, slots_end: int,
                  records: list[tuple[int, int, bytes]], salt: bytes | None = None) -> bytes:
    """The bytes of a well-formed journal batch of overlay ``layer_id``: ``records`` are
    ``(region, slot, checksum)``; ``salt`` defaults to the overlay's own."""
    if salt is None:
        salt = overlay_salt(volume_id(directory), layer_id)
    out = struct.pack("<4sIQQ16s", b"OCJ2", len(records), batch, slots_end, salt)
    for r, slot, csum in records:
        out += struct.pack("<QQ16s", r, slot, csum)
    return out + bytes(core.checksum(out))
