"""Golden volumes: the builders of the files that pin the on-disk format (``tests/golden/``).

``tests/test_golden.py`` rebuilds them and compares byte for byte. Regenerate only on a deliberate
format change: ``python -m overlaycache.testing.golden tests/golden/v1``. The v1 volume has three
regions of 4 KiB plus a partial one, a frozen overlay behind a snapshot, a writable overlay with a
committed journal batch, and one region in each slot.

The v1 manifest (an object on the secondary) is built by :func:`build_manifest_v1`; regenerate it
with ``python -m overlaycache.testing.golden --manifest tests/golden/v1.manifest``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

__all__ = ["MANIFEST_V1", "build_manifest_v1", "build_v1", "normalise"]

#: What the v1 golden manifest holds: volume id, size, region size, seq, created_at, label, and per
#: region the seq of its version (0: never stored) and the byte its checksum is taken over (16 of them).
MANIFEST_V1 = ("vol-1", 2 * 4096 + 100, 4096, 0x1234, 1700000000.5, "golden", ((0, 0), (7, 7), (0x1234, 0x34)))


def build_v1(path: str) -> None:
    """Create the v1 golden volume at ``path`` (a new directory); call `normalise` after."""
    from overlaycache import Volume

    rs = 4096
    with Volume.create(path, 3 * rs + 100, region_size=rs) as vol:
        vol.write(0, b"A" * rs)
        vol.write(rs, b"B" * rs)
        vol.merge_down()  # A, B into the base
        vol.write(2 * rs, b"C" * rs)
        vol.local_snapshot("golden")
        vol.write(rs + 10, b"overlay")  # partial write: copy-up from the base
        vol.flush()
        vol.write(rs + 10, b"OVERLAY")  # second version goes to the other slot
        vol.write(3 * rs, b"tail" * 25)
        vol.flush()  # commits the top overlay's journal batch
        # Keep the journal un-checkpointed: skip close()'s checkpoint by tearing down directly.
        vol._teardown()


def normalise(path: str) -> None:
    """Fixed id and times, so the files are reproducible."""
    from overlaycache._fs import write_json_atomic

    with open(os.path.join(path, "volume.json")) as f:
        meta = json.load(f)
    meta.pop("checksum")
    meta["id"] = "0" * 32
    meta["created_at"] = 0.0
    for snap in meta["snapshots"]:
        snap["created_at"] = 0.0
    write_json_atomic(path, "volume.json", meta)
    os.unlink(os.path.join(path, "lock"))


def build_manifest_v1() -> bytes:
    """The v1 golden manifest (see :data:`MANIFEST_V1`)."""
    from overlaycache._impl import core
    from overlaycache.remote.layout import RECORD, snapshot_id
    from overlaycache.remote.manifest import encode_manifest
    from overlaycache.snapshots import Snapshot

    vid, size, rs, seq, created_at, label, regions = MANIFEST_V1
    records = b"".join(RECORD.pack(s, bytes(core.checksum(bytes([b]) * 16))) for s, b in regions)
    return encode_manifest(vid, Snapshot(snapshot_id(seq), seq, created_at, label), size, rs, records)


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--manifest":
        with open(argv[1], "wb") as f:
            f.write(build_manifest_v1())
        return 0
    if len(argv) != 1:
        print("usage: python -m overlaycache.testing.golden DIR   (replaces DIR, e.g. tests/golden/v1)\n"
              "       python -m overlaycache.testing.golden --manifest FILE   (e.g. tests/golden/v1.manifest)",
              file=sys.stderr)
        return 2
    target = argv[0]
    shutil.rmtree(target, ignore_errors=True)
    build_v1(target)
    normalise(target)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
