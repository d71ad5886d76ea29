"""Regenerate tests/golden/v1: a small volume in on-disk format version 1.

Run only on a deliberate format change: ``python tests/golden/make_v1.py``. The volume has three
regions of 4 KiB plus a partial one, a frozen overlay behind a snapshot, a writable overlay with a
committed journal batch, and one region in each slot.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def build(path: str) -> None:
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
        vol.flush()
        vol._overlays[-1].commit()
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


if __name__ == "__main__":
    target = os.path.join(HERE, "v1")
    shutil.rmtree(target, ignore_errors=True)
    build(target)
    normalise(target)
    sys.exit(0)
