"""``overlaycache check STORE VOLUME_ID``: check a volume's objects on its secondary."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import EXIT_DAMAGE, STORE_HELP, add_json, emit, open_store_from


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="check a volume's packs, PITs and map pages on its secondary",
                       description="Check every pack index, PIT root and map page of VOLUME_ID on the store "
                                   f"(with --read-data, every pack's bytes). Exit status {EXIT_DAMAGE} when "
                                   "something is damaged.")
    p.add_argument("store", help=STORE_HELP)
    p.add_argument("volume_id")
    p.add_argument("--endpoint-url", metavar="URL", help="the S3 endpoint")
    p.add_argument("--profile", help="the AWS shared-credentials profile")
    p.add_argument("--repair", action="store_true", help="rebuild damaged PITs from the packs")
    p.add_argument("--read-data", action="store_true", help="read and verify every pack's bytes too")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    store = open_store_from(args)
    assert store is not None
    try:
        report = store.check(args.volume_id, repair=args.repair, read_data=args.read_data)  # type: ignore[attr-defined]
    finally:
        store.close()
    emit(args, {"ok": report.ok, "packs": report.packs, "region_versions": report.region_versions,
                "snapshots": report.snapshots, "pages": report.pages, "problems": report.problems,
                "repaired": report.repaired}, str(report))
    return 0 if report.ok else EXIT_DAMAGE
