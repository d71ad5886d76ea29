"""``overlaycache snapshot PATH``: a local snapshot, or with ``--pit`` a PIT on the secondary;
``overlaycache snapshot delete PATH ID``: forget a local snapshot."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import where, add_json, add_store_options, emit, opened, snapshot_json
from overlaycache.errors import InvalidArgumentError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot", help="take a local snapshot (or --pit: a PIT on the secondary); 'snapshot delete PATH ID'",
        usage="overlaycache snapshot [-h] [--label LABEL] [--pit --store URL] [--json] PATH\n"
              "       overlaycache snapshot delete [--json] PATH ID",
        description="A local snapshot freezes the top overlay on this machine (instant, no secondary needed); "
                    "a PIT (--pit) is a consistent point-in-time snapshot published on the secondary, "
                    "readable from any machine. 'snapshot delete PATH ID' forgets a local snapshot (its "
                    "layer stays until merge-down folds it); PITs are removed by 'collapse'.")
    p.add_argument("words", nargs="+", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--label", help="a unique name for the snapshot")
    p.add_argument("--pit", action="store_true", help="publish a PIT snapshot on the secondary (needs --store)")
    add_store_options(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    words = list(args.words)
    if words[0] == "delete":
        if len(words) != 3:
            raise InvalidArgumentError("usage: overlaycache snapshot delete PATH ID")
        if args.pit:
            raise InvalidArgumentError("PITs are removed by 'overlaycache collapse' (with the store's admin "
                                       "credentials), not by snapshot delete")
        args.path = words[1]
        with opened(args, store="none") as vol:
            snap = vol.delete_local_snapshot(words[2])
        emit(args, snapshot_json(snap), f"deleted local snapshot {snap.id} ({snap.label or 'no label'}); "
                                        f"its layer stays until merge-down")
        return 0
    if len(words) != 1:
        raise InvalidArgumentError(f"expected one PATH, got {' '.join(words)!r}")
    args.path = words[0]
    if args.pit:
        with opened(args, store="required") as vol:
            snap = vol.snapshot(args.label)
            location = where(vol)
        emit(args, {"kind": "pit", **snapshot_json(snap), "secondary": location},
             f"PIT snapshot {snap.id} ({snap.label or 'no label'}) published on {location}")
        return 0
    with opened(args, store="optional") as vol:
        lsnap = vol.local_snapshot(args.label)
    emit(args, {"kind": "local", **snapshot_json(lsnap)},
         f"local snapshot {lsnap.id} ({lsnap.label or 'no label'}) at layer {lsnap.layer}")
    return 0
