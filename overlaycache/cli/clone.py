"""``overlaycache clone PATH SNAPSHOT DEST``: a writable local overlay over a snapshot's image."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import add_json, add_store_options, emit, opened


def register(sub: Any) -> None:
    p = sub.add_parser("clone", help="make a writable clone of a local snapshot or PIT",
                       description="Create DEST, a writable local overlay over the image of SNAPSHOT (a local "
                                   "snapshot, or with --store a PIT): writes go to the clone only, never to the "
                                   "volume or the secondary. Open it from Python with Volume.open_clone.")
    p.add_argument("path")
    p.add_argument("snapshot")
    p.add_argument("dest")
    add_store_options(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args, store="optional") as vol, vol.image(args.snapshot) as img, img.clone(args.dest) as c:
        out = {"clone": str(c.path), "snapshot": img.snapshot.id, "volume": vol.id}
    emit(args, out, f"clone of snapshot {out['snapshot']} in {out['clone']}")
    return 0
