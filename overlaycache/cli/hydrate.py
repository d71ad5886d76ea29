"""``overlaycache hydrate PATH --store URL``: copy the remote regions of the distributed overlay back."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import Progress, add_json, add_store_options, emit, human, opened


def register(sub: Any) -> None:
    p = sub.add_parser("hydrate", help="copy the regions read from the secondary (R) back to local storage",
                       description="Fetch every region the distributed overlay reads from the PIT (R) and "
                                   "install it locally, so that every read is local again.")
    p.add_argument("path")
    add_store_options(p, required=True)
    p.add_argument("--rate", type=float, metavar="BYTES_PER_S", help="cap the bytes installed per second")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args, store="required") as vol, Progress(args, "hydrate") as bar:
        h = vol.hydrate(progress=bar, rate=args.rate, idle=0.0)
        installed = h.installed
        rs = vol.region_size
    emit(args, {"installed": installed}, f"hydrated {installed} regions ({human(installed * rs)}) from the secondary")
    return 0
