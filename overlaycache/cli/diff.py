"""``overlaycache diff PATH A [B]``: regions that differ between two snapshots, or one and now."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import add_json, add_store_options, emit, opened, region_list


def register(sub: Any) -> None:
    p = sub.add_parser("diff", help="regions that differ between two PITs, or a PIT and the volume now",
                       description="The regions whose contents differ between PIT snapshots A and B (ids or "
                                   "labels), or between A and the volume as it is now; from the PIT maps and "
                                   "checksums, without reading data.")
    p.add_argument("path")
    p.add_argument("a", help="a PIT snapshot (id or label)")
    p.add_argument("b", nargs="?", help="another one (default: the volume now)")
    add_store_options(p, required=True)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args, store="required") as vol:
        regions = vol.diff(args.a, args.b)
    emit(args, {"a": args.a, "b": args.b, "regions": regions},
         f"{len(regions)} regions differ: {region_list(regions)}")
    return 0
