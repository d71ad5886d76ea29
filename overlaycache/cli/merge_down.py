"""``overlaycache merge-down PATH``: fold the oldest overlay into the base."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import add_json, emit, opened


def register(sub: Any) -> None:
    p = sub.add_parser("merge-down", help="fold the oldest overlay into the base",
                       description="Fold the oldest overlay into the base. The local snapshot whose image was "
                                   "the base alone is released (its image changes): it is named.")
    p.add_argument("path")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args, store="none") as vol:
        before = {s.id: s.label for s in vol.local_snapshots()}
        regions = vol.merge_down()
        after = {s.id for s in vol.local_snapshots()}
    released = [f"{i} ({before[i] or 'no label'})" for i in sorted(before) if i not in after]
    emit(args, {"regions": regions, "released_local_snapshots": sorted(i for i in before if i not in after)},
         [f"merged {regions} regions into the base"]
         + ([f"released local snapshots: {', '.join(released)}"] if released else []))
    return 0
