"""``overlaycache info PATH``: geometry, layers, snapshots, secondary, lag and unavailable regions.

It reads the metadata and maps without taking the volume's lock (each is replaced atomically or
written a page at a time), so it works while another process has the volume open for writing,
as ``qemu-img info -U`` does; the regions per layer need the layers opened, which only a volume
not open for writing allows (it says so, naming the writer's PID, otherwise).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from overlaycache.cli._common import add_json, emit, human, snapshot_json, when
from overlaycache.errors import VolumeLockedError


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="show a volume's geometry, layers, snapshots, secondary and health",
                       description="Show a volume: geometry, layers with their sizes and times, local snapshots, "
                                   "the secondary and replication mode, the replication lag, unavailable regions "
                                   "and the distributed overlay. Works while another process writes the volume.")
    p.add_argument("path")
    add_json(p)
    p.set_defaults(run=run)


def _file(path: str) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"bytes": None, "allocated": None, "modified": None}
    return {"bytes": st.st_size, "allocated": st.st_blocks * 512, "modified": st.st_mtime}


def gather(path: str) -> dict[str, Any]:
    """What ``info`` shows, as JSON-ready values."""
    from overlaycache.local.meta import read_meta
    from overlaycache.local.unavailable import UNAVAILABLE_MAP, UnavailableMap
    from overlaycache.replication.maps import CHANGE_MAP, ChangeMap, map_salt

    meta = read_meta(path)
    n = meta.geometry.num_regions
    layers = [{"id": 0, "name": "base", **_file(os.path.join(path, "base.data"))}]
    layers += [{"id": i, "name": f"overlay-{i}", **_file(os.path.join(path, f"overlay-{i}.data"))}
               for i in meta.layers]
    unavailable, unavailable_count = "none", 0
    if meta.unavailable or os.path.exists(os.path.join(path, UNAVAILABLE_MAP)):
        unav = UnavailableMap(path, n, meta.id, meta.unavailable)
        unavailable_count = unav.bits.count()
        unavailable = unav.summary()
    lag = None
    if meta.secondary is not None and os.path.exists(os.path.join(path, CHANGE_MAP)):
        cmap = ChangeMap(os.path.join(path, CHANGE_MAP), n, False, map_salt(meta.id))
        try:
            lag = int.from_bytes(cmap.initial, "little").bit_count()
        finally:
            cmap.close()
    sec = meta.secondary
    do = meta.distributed_overlay
    out: dict[str, Any] = {
        "path": os.path.abspath(path), "id": meta.id, "size": meta.size, "region_size": meta.region_size,
        "regions": n, "created_at": meta.created_at, "layers": layers,
        "snapshots": [snapshot_json(s) for s in meta.snapshots],
        "secondary": None if sec is None else {"location": sec.location, "mode": sec.mode, "period": sec.period,
                                               "closed_cleanly": sec.clean, "compare_on_attach": sec.resync},
        "replication_lag_regions": lag,
        "unavailable_regions": unavailable_count, "unavailable": unavailable,
        "distributed_overlay": None if do is None else do.to_json(),
        "in_use_by": None, "regions_per_layer": None,
    }
    return out


def run(args: argparse.Namespace) -> int:
    from overlaycache.volume import Volume

    info = gather(args.path)
    try:
        with Volume.open(args.path, readonly=True) as vol:
            info["regions_per_layer"] = {str(k): v for k, v in sorted(vol.layer_counts().items())}
    except VolumeLockedError as exc:
        info["in_use_by"] = str(exc)
    emit(args, info, _text(info))
    return 0


def _text(i: dict[str, Any]) -> list[str]:
    lines = [f"volume       {i['id']}", f"path         {i['path']}",
             f"size         {i['size']} bytes ({human(i['size'])}), {i['regions']} regions of {i['region_size']}",
             f"created      {when(i['created_at'])}"]
    if i["in_use_by"]:
        lines.append(f"in use       {i['in_use_by']} (regions per layer not shown)")
    counts = i["regions_per_layer"] or {}
    for layer in i["layers"]:
        size = "missing" if layer["bytes"] is None else f"{human(layer['allocated'])} allocated"
        serves = f", serves {counts[str(layer['id'])]} regions" if str(layer["id"]) in counts else ""
        mod = f", modified {when(layer['modified'])}" if layer["modified"] else ""
        lines.append(f"{layer['name']:<12} {size}{serves}{mod}")
    for s in i["snapshots"]:
        lines.append(f"snapshot     {s['id']} {s['label'] or '(no label)'} at layer {s['layer']}, {when(s['created_at'])}")
    sec = i["secondary"]
    if sec is None:
        lines.append("secondary    none")
    else:
        lines.append(f"secondary    {sec['location']} ({sec['mode']}"
                     + (f", a PIT every {sec['period']:g}s" if sec["period"] else "") + ")")
        lines.append(f"lag          {i['replication_lag_regions']} regions changed and not yet on the secondary")
    lines.append(f"unavailable  {i['unavailable_regions']} regions"
                 + (f": {i['unavailable']}" if i["unavailable_regions"] else ""))
    do = i["distributed_overlay"]
    if do is not None:
        lines.append(f"distributed overlay since {when(do['started_at'])}: new writes from layer {do['layer']}, "
                     f"remote reads from PIT {do['snapshot_id']}")
    return lines
