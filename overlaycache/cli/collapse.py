"""``overlaycache collapse STORE VOLUME_ID --policy SPEC``: retention and garbage collection.

Runs with the store's own (admin) credentials, on any machine: the primary's need not delete.
"""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import STORE_HELP, Progress, add_json, emit, open_store_from, when


def register(sub: Any) -> None:
    p = sub.add_parser("collapse", help="drop the PITs a retention policy does not keep, and collect the garbage",
                       description="Apply a retention policy to VOLUME_ID's PITs on the store: drop the PITs no "
                                   "rule keeps and delete what no kept PIT references. Crash-safe and resumable.")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("volume_id")
    p.add_argument("--endpoint-url", metavar="URL", help="the S3 endpoint")
    p.add_argument("--profile", help="the AWS shared-credentials profile (the store's admin identity)")
    p.add_argument("--policy", required=True, help='tiers EVERY@WITHIN, e.g. "all@3h,15m@1d,1h@7d,1d@90d" '
                   "(durations in s, m, h, d, w)")
    p.add_argument("--keep-last", type=int, default=0, help="always keep the N newest PITs")
    p.add_argument("--pin", action="append", default=[], metavar="LABEL", help="always keep PITs with this label")
    p.add_argument("--now", type=float, help="measure ages from this time (seconds since the epoch)")
    p.add_argument("--page-grace", type=float, default=3600.0, metavar="SECONDS",
                   help="delete a map page only once it has been unreferenced this long (default: an hour)")
    p.add_argument("--max-unused", type=float, default=0.5, metavar="SHARE",
                   help="repack a pack (copy its live versions into a smaller generation of it) when more than "
                        "this share of its bytes is dead: 0 to 1 (default 0.5; 1 never repacks)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from overlaycache.retention import RetentionPolicy

    policy = RetentionPolicy.parse(args.policy, keep_last=args.keep_last, pinned=args.pin)
    store = open_store_from(args)
    assert store is not None
    try:
        with Progress(args, "collapse", "object") as bar:
            report = store.collapse(args.volume_id, policy, now=args.now, dry_run=args.dry_run,  # type: ignore[attr-defined]
                                    page_grace=args.page_grace, progress=bar, max_unused=args.max_unused)
    finally:
        store.close()
    verb = "would remove" if report.dry_run else "removed"
    lines = [f"keep   {s.id}  {when(s.created_at)}  {s.label or '':<20} {', '.join(report.reasons[s.id])}"
             for s in report.kept]
    lines += [f"remove {s.id}  {when(s.created_at)}  {s.label or ''}" for s in report.removed]
    lines.append(f"{len(report.kept)} PITs kept, {len(report.removed)} {verb}; {report.objects_deleted} objects "
                 f"({report.bytes_freed} bytes) {'would be ' if report.dry_run else ''}deleted, "
                 f"{report.packs_repacked} packs {'would be ' if report.dry_run else ''}repacked "
                 f"({report.bytes_moved} bytes moved), "
                 f"{report.pages_condemned} map pages condemned (deleted by the next run if still unreferenced); "
                 f"{report.duration:.2f}s")
    emit(args, report.to_json(), lines)
    return 0
