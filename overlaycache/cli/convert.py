"""``overlaycache convert PATH``: convert a closed volume of local format 1 to format 2, in place."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import add_json, emit


def register(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a closed volume of local format 1 to format 2, in place",
                       description="Convert a closed volume of local format 1 in place; each version is "
                                   "verified on the way, and one that fails its checksum becomes unavailable. "
                                   "An interrupted conversion is finished by running it again.")
    p.add_argument("path")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from overlaycache.local.convert import convert_volume

    rep = convert_volume(args.path)
    emit(args, {"path": rep.path, "overlays": rep.overlays, "regions": rep.regions,
                "unavailable": rep.unavailable, "resumed": rep.resumed},
         f"converted {rep.path} to local format 2: {rep.overlays} overlays, {rep.regions} region versions"
         + (f"; regions {rep.unavailable} failed their checksums and are unavailable" if rep.unavailable else "")
         + (" (an interrupted conversion finished)" if rep.resumed else ""))
    return 0
