"""``overlaycache scrub PATH``: verify every local region against its checksum."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import EXIT_DAMAGE, Progress, add_json, add_store_options, emit, opened, region_list


def register(sub: Any) -> None:
    p = sub.add_parser("scrub", help="verify every local region against its checksum",
                       description="Read every local region and verify it against its checksum. Regions that "
                                   "fail become unavailable (with --store, reads of them go to the secondary). "
                                   f"Exit status {EXIT_DAMAGE} when any failed.")
    p.add_argument("path")
    add_store_options(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args, store="optional") as vol, Progress(args, "scrub") as bar:
        bad = vol.scrub(progress=bar)
        total = vol.num_regions
    emit(args, {"regions": total, "bad": bad},
         f"scrubbed {total} regions: " + (f"{len(bad)} failed their checksums ({region_list(bad)}), now unavailable"
                                          if bad else "all match their checksums"))
    return EXIT_DAMAGE if bad else 0
