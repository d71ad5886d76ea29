"""``overlaycache failover PATH --store URL``: begin the distributed overlay."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import add_json, add_store_options, emit, opened, region_list
from overlaycache.errors import InvalidArgumentError


def _regions(text: str) -> list[int]:
    """``0-3,7`` as a list of regions."""
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out.extend(range(int(a), int(b or a) + 1))
    except ValueError:
        raise InvalidArgumentError(f"not a list of regions: {text!r} (example: 0-3,7)") from None
    return out


def register(sub: Any) -> None:
    p = sub.add_parser("failover", help="begin the distributed overlay (serve lost regions from the secondary)",
                       description="Force replication of what is unsynced and still readable, publish a PIT, "
                                   "and push a fresh local overlay: from then on each region is read from the "
                                   "local overlay (PO), the local base where still valid (PB) or the PIT (R). "
                                   "With --lost, those regions are declared lost first.")
    p.add_argument("path")
    add_store_options(p, required=True)
    p.add_argument("--lost", metavar="REGIONS", help="regions to declare lost, e.g. 0-99,512")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args, store="required") as vol:
        if args.lost:
            regions = _regions(args.lost)
            vol.mark_unavailable(regions)  # begins the distributed overlay too
        else:
            vol.begin_distributed_overlay()
        do = vol.distributed_overlay or {}
        lost = sorted(vol.unavailable)
    emit(args, {"distributed_overlay": do, "unavailable": lost},
         [f"distributed overlay active: remote reads from PIT {do.get('snapshot_id')}",
          f"unavailable regions: {region_list(lost)}",
          "run 'overlaycache hydrate' to copy them back, 'overlaycache restore' to end it"])
    return 0
