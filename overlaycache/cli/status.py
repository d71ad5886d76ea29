"""``overlaycache status PATH``: is the volume healthy, where is each region read from."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from overlaycache.cli._common import add_json, emit
from overlaycache.cli.info import gather
from overlaycache.errors import VolumeLockedError

#: Up to this many regions, status counts where each is read from (PO, PB, R).
LOCATION_LIMIT = 1 << 24


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="health in a few lines: lag, unavailable regions, where reads come from",
                       description="The volume's health: replication mode and lag, unavailable regions, the "
                                   "distributed overlay, and how many regions are read from the local overlay "
                                   "(PO), the local base (PB) and the remote PIT (R). Works while another "
                                   "process writes the volume (without the location counts).")
    p.add_argument("path")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from overlaycache.volume import Volume

    info = gather(args.path)
    locations: dict[str, int] | None = None
    try:
        with Volume.open(args.path, readonly=True) as vol:
            if vol.num_regions <= LOCATION_LIMIT:
                counts: Counter[str] = Counter()
                step = 1 << 20
                for first in range(0, vol.num_regions, step):
                    counts.update(vol.location_map(first, min(step, vol.num_regions - first)))
                locations = {k: counts.get(k, 0) for k in ("PO", "PB", "R")}
    except VolumeLockedError as exc:
        info["in_use_by"] = str(exc)
    sec = info["secondary"]
    healthy = info["unavailable_regions"] == 0 and info["distributed_overlay"] is None
    out = {"healthy": healthy, "secondary": sec, "replication_lag_regions": info["replication_lag_regions"],
           "unavailable_regions": info["unavailable_regions"], "distributed_overlay": info["distributed_overlay"],
           "locations": locations, "in_use_by": info["in_use_by"]}
    lines = [f"{'healthy' if healthy else 'DEGRADED'}: {info['unavailable_regions']} unavailable regions"
             + (", distributed overlay active" if info["distributed_overlay"] else "")]
    if sec is not None:
        lines.append(f"replication  {sec['mode']} to {sec['location']}, lag {info['replication_lag_regions']} regions")
    else:
        lines.append("replication  none (no secondary)")
    if locations is not None:
        lines.append(f"reads        {locations['PO']} regions from the local overlay (PO), {locations['PB']} from "
                     f"the local base (PB), {locations['R']} from the remote PIT (R)")
    if info["in_use_by"]:
        lines.append(f"in use       {info['in_use_by']}")
    emit(args, out, lines)
    return 0
