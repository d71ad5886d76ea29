"""``overlaycache snapshots PATH``: the local snapshots, and the PITs on the secondary."""

from __future__ import annotations

import argparse
from typing import Any

from overlaycache.cli._common import add_json, add_store_options, emit, open_store_from, snapshot_json, when


def register(sub: Any) -> None:
    p = sub.add_parser("snapshots", help="list the local snapshots and the PITs on the secondary",
                       description="List a volume's local snapshots and, with --store, its PIT snapshots on "
                                   "the secondary. Works while another process has the volume open.")
    p.add_argument("path")
    add_store_options(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from overlaycache.local.meta import read_meta

    meta = read_meta(args.path)  # no lock: the metadata is replaced atomically
    local = [snapshot_json(s) for s in meta.snapshots]
    pits: list[dict[str, Any]] = []
    store = open_store_from(args, required=False)
    if store is not None:
        try:
            pits = [snapshot_json(s) for s in store.snapshots(meta.id)]  # type: ignore[attr-defined]
        finally:
            store.close()
    lines = [f"{'kind':<6} {'id':<17} {'created (UTC)':<21} label"]
    lines += [f"{'local':<6} {s['id']:<17} {when(s['created_at']):<21} {s['label'] or ''}" for s in local]
    lines += [f"{'pit':<6} {s['id']:<17} {when(s['created_at']):<21} {s['label'] or ''}" for s in pits]
    if store is None:
        lines.append("(PITs on the secondary: give --store)")
    emit(args, {"volume": meta.id, "local": local, "pits": pits if store is not None else None}, lines)
    return 0
