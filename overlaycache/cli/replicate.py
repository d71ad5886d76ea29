"""``overlaycache replicate PATH --store URL``: ship every unsynced region now."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import where, Progress, add_json, add_store_options, emit, human, opened


def register(sub: Any) -> None:
    p = sub.add_parser("replicate", help="ship every unsynced region to the secondary now",
                       description="Attach the secondary (the first time: compare and ship what differs) and "
                                   "ship every region changed and not yet stored; with --pit, publish a PIT after.")
    p.add_argument("path")
    add_store_options(p, required=True)
    p.add_argument("--replication", choices=["async", "sync", "periodic"], help="change the replication mode")
    p.add_argument("--period", type=float, metavar="SECONDS", help="seconds between PITs in periodic mode")
    p.add_argument("--pit", action="store_true", help="publish a PIT snapshot once everything is shipped")
    p.add_argument("--label", help="the PIT's label (with --pit)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args, store="required", replication=args.replication, period=args.period) as vol:
        before = vol.replication_lag
        with Progress(args, "replicate") as bar:
            shipped = vol.replicate(progress=bar)
        pit = vol.snapshot(args.label) if args.pit else None
        out = {"shipped": shipped, "lag_before": before.regions, "lag": vol.replication_lag.regions,
               "secondary": where(vol), "mode": vol.replication,
               "pit": None if pit is None else {"id": pit.id, "label": pit.label, "seq": pit.seq}}
    emit(args, out, f"shipped {shipped} regions ({human(before.bytes)} pending before) to {out['secondary']}"
                    + (f"; PIT {pit.id} published" if pit is not None else ""))
    return 0
