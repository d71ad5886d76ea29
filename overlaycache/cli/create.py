"""``overlaycache create PATH SIZE``: a new, empty volume (optionally replicated from the start)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from overlaycache.cli._common import where, ENV_REGION_SIZE, add_json, add_store_options, emit, open_store_from, parse_size


def register(sub: Any) -> None:
    p = sub.add_parser("create", help="create an empty volume",
                       description="Create an empty volume of SIZE bytes in the directory PATH (which must not "
                                   "exist, or be empty). A failed create leaves nothing behind.")
    p.add_argument("path")
    p.add_argument("size", type=parse_size, help="bytes: 4096, 64K, 10G, 1.5TiB (powers of 1024)")
    p.add_argument("--region-size", type=parse_size, default=os.environ.get(ENV_REGION_SIZE, "64K"),
                   help=f"bytes per region, a power of two (default: ${ENV_REGION_SIZE}, else 64K)")
    add_store_options(p)
    p.add_argument("--replication", choices=["async", "sync", "periodic"],
                   help="replication mode to the --store (default async)")
    p.add_argument("--period", type=float, metavar="SECONDS", help="seconds between PITs in periodic mode")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from overlaycache.volume import Volume

    store = open_store_from(args, required=False)
    try:
        with Volume.create(args.path, args.size, region_size=args.region_size, secondary=store,
                           replication=args.replication if store is not None else None,
                           period=args.period) as vol:
            info = {"path": vol.path, "id": vol.id, "size": vol.size, "region_size": vol.region_size,
                    "regions": vol.num_regions, "secondary": where(vol), "replication": vol.replication}
    finally:
        if store is not None:
            store.close()
    emit(args, info, f"created {info['path']}: {info['size']} bytes, {info['regions']} regions of "
                     f"{info['region_size']}" + (f", replicated ({info['replication']}) to {info['secondary']}"
                                                 if info["secondary"] else ""))
    return 0
