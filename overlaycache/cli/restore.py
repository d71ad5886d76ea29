"""``overlaycache restore PATH SNAPSHOT --store URL``: make the volume equal to a PIT."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import Progress, add_json, add_store_options, emit, opened, region_list


def register(sub: Any) -> None:
    p = sub.add_parser("restore", help="make the volume equal to a PIT snapshot (ends the distributed overlay)",
                       description="Rewrite the regions that differ from the PIT SNAPSHOT (id or label), end "
                                   "the distributed overlay, and fold the overlays into the base.")
    p.add_argument("path")
    p.add_argument("snapshot")
    add_store_options(p, required=True)
    p.add_argument("--no-fold", action="store_true", help="keep the overlays (do not merge them into the base)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args, store="required") as vol, Progress(args, "restore") as bar:
        before = {s.id for s in vol.local_snapshots()}
        rewritten = vol.restore(args.snapshot, progress=bar, fold=not args.no_fold)
        released = sorted(before - {s.id for s in vol.local_snapshots()})
    emit(args, {"rewritten": rewritten, "released_local_snapshots": released},
         [f"restored PIT {args.snapshot}: rewrote {len(rewritten)} regions ({region_list(rewritten)})"]
         + ([f"local snapshots released by folding the overlays: {', '.join(released)}"] if released else []))
    return 0
