"""The ``overlaycache`` command line.

Errors from the package become one line on stderr and exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, TextIO

from overlaycache.errors import InvalidArgumentError, OverlayCacheError
from overlaycache.volume import Volume

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``"64K"``, ``"1g"``, ``"4096"`` into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64K, 10G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


class _Narrator:
    """Prints the demo's table: a step, then one value per region."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def row(self, step: str, values: Sequence[str]) -> None:
        print(f"  {step:<47}" + " ".join(f"{v:>2}" for v in values), file=self.stream)

    def say(self, text: str) -> None:
        print(f"  {text}", file=self.stream)


def _chars(vol: Any, n: int) -> list[str]:
    """First byte of each region, shown as a character (the demo's regions are uniform)."""
    return [chr(vol.read(r * vol.region_size, 1)[0]) for r in range(n)]


def demo(directory: str | None = None, out: TextIO | None = None) -> None:
    """Walk through the seed's Fig. 2 on a real volume and print it as a table."""
    stream = out if out is not None else sys.stdout
    rs = 4096
    tmp = None
    if directory is None:
        tmp = directory = tempfile.mkdtemp(prefix="overlaycache-demo-")
    path = os.path.join(directory, "volume")

    show = _Narrator(stream).row

    try:
        with Volume.create(path, 8 * rs, region_size=rs) as vol:
            print(f"overlaycache demo: an overlay snapshot (Fig. 2), 8 regions of {rs} bytes in {path}", file=stream)
            show("region", [str(r) for r in range(8)])
            for r, ch in enumerate("abcdefgh"):
                vol.write(r * rs, ch.encode() * rs)
            vol.merge_down()
            show("write a..h, merge them into the base", _chars(vol, 8))
            snap = vol.local_snapshot("T1")
            show(f"local snapshot {snap.label}: freeze, push an overlay", _chars(vol, 8))
            for r, ch in ((0, "x"), (3, "z"), (0, "1")):
                vol.write(r * rs, ch.encode() * rs)
                show(f"write {ch}->{r} (goes to the overlay)", _chars(vol, 8))
            vol.flush()
            show("layer serving each region (O overlay, B base)", ["B" if i == 0 else "O" for i in vol.layer_map()])
            with vol.image(snap) as img:
                show(f"image of snapshot {snap.label} (base unchanged)",
                     [chr(img.read(r * rs, 1)[0]) for r in range(8)])
            vol.merge_down()
            vol.merge_down()
            show("merge_down twice: overlays folded into base", _chars(vol, 8))
            show("layer serving each region after merge", ["B" if i == 0 else "O" for i in vol.layer_map()])
        with Volume.open(path) as vol:
            show("reopened: the virtual image", _chars(vol, 8))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _start_moto() -> tuple[Any, str]:
    """Start moto's S3 server in this process on a free loopback port."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise InvalidArgumentError(
            "the demo's built-in S3 server needs moto: pip install '.[demo]' (or give --endpoint)") from exc
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def demo_replication(endpoint: str | None = None, bucket: str = "overlaycache-demo",
                     directory: str | None = None, out: TextIO | None = None, key_id: str | None = None,
                     secret: str | None = None) -> None:
    """Replicate a volume over real HTTP to an S3 server and read its PITs back from the store alone."""
    from overlaycache.remote.layout import packs_prefix
    from overlaycache.remote.listing import read_pack_index
    from overlaycache.store import S3Store

    stream = out if out is not None else sys.stdout
    rs = 4096
    server = None
    tmp = None
    if endpoint is None:
        server, endpoint = _start_moto()
        key_id, secret = "demo", "demo-secret"
    # Otherwise the given keys, or the standard credential chain (environment, profile, ...).
    if directory is None:
        tmp = directory = tempfile.mkdtemp(prefix="overlaycache-demo-")
    path = os.path.join(directory, "replicated")

    show = _Narrator(stream).row

    try:
        store = S3Store(bucket, prefix="demo", endpoint_url=endpoint, aws_access_key_id=key_id,
                          aws_secret_access_key=secret)
        store.create_bucket()
        where = "moto's S3 server, in this process" if server is not None else "the given endpoint"
        print(f"\nReplication to {endpoint} ({where}), bucket {bucket}, async mode", file=stream)
        with Volume.create(path, 8 * rs, region_size=rs, secondary=store, replication="async") as vol:
            show("region", [str(r) for r in range(8)])
            for r, ch in enumerate("abcdefgh"):
                vol.write(r * rs, ch.encode() * rs)
            lag = vol.replication_lag
            show(f"write a..h (lag: {lag.regions} regions, {lag.bytes} bytes)", _chars(vol, 8))
            t1 = vol.snapshot("T1")
            show(f"PIT snapshot T1 published (seq {t1.seq})", _chars(vol, 8))
            for r, ch in ((0, "1"), (3, "z"), (6, "4")):
                vol.write(r * rs, ch.encode() * rs)
            show("write 1->0, z->3, 4->6", _chars(vol, 8))
            t2 = vol.snapshot("T2")
            show(f"PIT snapshot T2 published (seq {t2.seq})", _chars(vol, 8))
            vid = vol.id
        # A fresh client that knows only the bucket: the store alone is enough to find and read PITs.
        reader = S3Store(bucket, prefix="demo", endpoint_url=endpoint, aws_access_key_id=key_id,
                          aws_secret_access_key=secret)
        print(f"  read back with a new client from the store alone: volumes {reader.volumes()}", file=stream)
        packs = list(reader.list(packs_prefix(vid)))
        versions = 0
        for key in packs:
            versions += len(read_pack_index(reader, key).entries)
        for snap in reader.snapshots(vid):
            with reader.image(vid, snap) as img:
                show(f"image of {snap.label} (seq {snap.seq})", [chr(img.read(r * rs, 1)[0]) for r in range(8)])
        print(f"  {versions} region versions stored in {len(packs)} packs: each version once, many per object",
              file=stream)
        reader.close()
        store.close()
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def demo_failover(endpoint: str, key_id: str | None, secret: str | None, bucket: str = "overlaycache-demo",
                  directory: str | None = None, out: TextIO | None = None) -> None:
    """The seed's story: replication, failed regions, the distributed overlay, recovery images, restore."""
    from overlaycache.store import S3Store

    stream = out if out is not None else sys.stdout
    rs = 4096
    tmp = None
    if directory is None:
        tmp = directory = tempfile.mkdtemp(prefix="overlaycache-demo-")
    path = os.path.join(directory, "failover")

    show = _Narrator(stream).row

    say = _Narrator(stream).say

    try:
        store = S3Store(bucket, prefix="demo-failover", endpoint_url=endpoint, aws_access_key_id=key_id,
                        aws_secret_access_key=secret)
        store.create_bucket()
        print("\nDistributed overlay snapshot (Figs. 3C-3F) and recovery (Fig. 3B)", file=stream)
        with Volume.create(path, 8 * rs, region_size=rs, secondary=store, replication="periodic",
                           period=3600) as vol:
            show("region", [str(r) for r in range(8)])
            for r, ch in [*enumerate("abcdefgh"), (0, "x"), (3, "z"), (0, "1")]:
                vol.write(r * rs, ch.encode() * rs)
            vol.replicate()
            show("T4: written and replicated (lag 0)", _chars(vol, 8))
            vol.write(6 * rs, b"4" * rs)
            show(f"write 4->6, not replicated yet (lag {vol.replication_lag.regions})", _chars(vol, 8))
            vol.mark_unavailable([2, 3, 5])
            do = vol.distributed_overlay or {}
            say(f"T5: regions 2, 3, 5 fail: forced replication of region 6, PIT {do.get('snapshot_id')},")
            say("    a fresh overlay takes every new write (the base is no longer written)")
            show("location map", vol.location_map())
            show("virtual image (2, 3, 5 from the secondary)", _chars(vol, 8))
            vol.write(0, b"u" * rs)
            vol.write(3 * rs, b"7" * rs)
            show("write u->0, 7->3", _chars(vol, 8))
            show("location map (Fig. 3D)", vol.location_map())
            t6 = vol.snapshot("T6")
            show(f"T6: PIT published (seq {t6.seq})", _chars(vol, 8))
            t5 = do.get("snapshot_id", "")
            with vol.image(t5) as a, vol.image("T6") as b:
                show("recovery image of T5, beside the volume", _chars(a, 8))
                show("recovery image of T6, at the same time", _chars(b, 8))
                say(f"    T5 image: {a.local_reads} region reads served locally (identical checksums), "
                    "the rest from the secondary")
                with a.clone(os.path.join(directory, "clone-T5")) as clone:
                    clone.write(1 * rs, b"Q" * rs)
                    show("clone of T5: write Q->1 in the clone only", _chars(clone, 8))
                show("the volume is unchanged", _chars(vol, 8))
            say(f"diff T5..T6: regions {vol.diff(t5, t6)}")
            hyd = vol.hydrate()
            show(f"hydrate: {hyd.installed} remote regions copied back", vol.location_map())
            rewritten = vol.restore(t5)
            show(f"restore T5: rewrote regions {','.join(map(str, rewritten))}", _chars(vol, 8))
            show("location map: distributed overlay ended", vol.location_map())
            show("layer map: all folded into the base (0)", [str(x) for x in vol.layer_map()])
        store.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overlaycache", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="walk through the overlay snapshot of Fig. 2 on a real volume")
    d.add_argument("--dir", help="keep the demo volume in this directory (default: a temporary one)")
    d.add_argument("--endpoint", help="replicate to this S3 endpoint instead of a built-in moto server")
    d.add_argument("--bucket", default="overlaycache-demo", help="bucket for the replication part")
    c = sub.add_parser("create", help="create an empty volume")
    c.add_argument("path")
    c.add_argument("size", type=parse_size)
    c.add_argument("--region-size", type=parse_size, default=65536)
    i = sub.add_parser("info", help="show a volume's geometry, layers and snapshots")
    i.add_argument("path")
    s = sub.add_parser("snapshot", help="take a local snapshot")
    s.add_argument("path")
    s.add_argument("--label")
    m = sub.add_parser("merge-down", help="fold the oldest overlay into the base")
    m.add_argument("path")
    v = sub.add_parser("convert", help="convert a closed volume of local format 1 to format 2, in place")
    v.add_argument("path")
    store_help = ("the secondary: s3://BUCKET/PREFIX?endpoint_url=... (credentials from boto3's standard chain: "
                  "environment, profile, ...), file:///DIR or a directory")
    k = sub.add_parser("check", help="check a volume's packs, PITs and map pages on its secondary")
    k.add_argument("store", help=store_help)
    k.add_argument("volume_id")
    k.add_argument("--repair", action="store_true", help="rebuild damaged PITs from the packs")
    k.add_argument("--read-data", action="store_true", help="read and verify every pack's bytes too")
    k.add_argument("--json", action="store_true", help="print the report as JSON")
    o = sub.add_parser("collapse", help="drop the PITs a retention policy does not keep, and collect the garbage")
    o.add_argument("store", help=store_help)
    o.add_argument("volume_id")
    o.add_argument("--policy", required=True, help='tiers EVERY@WITHIN, e.g. "all@3h,15m@1d,1h@7d,1d@90d" '
                   "(durations in s, m, h, d, w)")
    o.add_argument("--keep-last", type=int, default=0, help="always keep the N newest PITs")
    o.add_argument("--pin", action="append", default=[], metavar="LABEL", help="always keep PITs with this label")
    o.add_argument("--now", type=float, help="measure ages from this time (seconds since the epoch)")
    o.add_argument("--page-grace", type=float, default=3600.0, metavar="SECONDS",
                   help="delete a map page only once it has been unreferenced this long (default: an hour)")
    o.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    o.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _collapse(args: argparse.Namespace) -> None:
    from overlaycache.retention import RetentionPolicy
    from overlaycache.store import open_store

    policy = RetentionPolicy.parse(args.policy, keep_last=args.keep_last, pinned=args.pin)
    store = open_store(args.store)
    try:
        report = store.collapse(args.volume_id, policy, now=args.now, dry_run=args.dry_run,  # type: ignore[attr-defined]
                                page_grace=args.page_grace)
    finally:
        store.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
        return
    verb = "would remove" if report.dry_run else "removed"
    for snap in report.kept:
        print(f"keep   {snap.id}  {_when(snap.created_at)}  {snap.label or '':<20} {', '.join(report.reasons[snap.id])}")
    for snap in report.removed:
        print(f"remove {snap.id}  {_when(snap.created_at)}  {snap.label or ''}")
    print(f"{len(report.kept)} PITs kept, {len(report.removed)} {verb}; {report.objects_deleted} objects "
          f"({report.bytes_freed} bytes) {'would be ' if report.dry_run else ''}deleted, "
          f"{report.pages_condemned} map pages condemned (deleted by the next run if still unreferenced); "
          f"{report.duration:.2f}s")


def _check(args: argparse.Namespace) -> int:
    from overlaycache.store import open_store

    store = open_store(args.store)
    try:
        report = store.check(args.volume_id, repair=args.repair, read_data=args.read_data)  # type: ignore[attr-defined]
    finally:
        store.close()
    if args.json:
        print(json.dumps({"ok": report.ok, "packs": report.packs, "region_versions": report.region_versions,
                          "snapshots": report.snapshots, "pages": report.pages, "problems": report.problems,
                          "repaired": report.repaired}, indent=2, sort_keys=True))
    else:
        print(report)
    return 0 if report.ok else 2


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``overlaycache`` console script."""
    args = _build_parser().parse_args(argv)
    quiet = logging.CRITICAL if args.command == "demo" else logging.WARNING  # the demo narrates itself
    logging.basicConfig(level=logging.INFO if args.verbose else quiet, format="%(message)s")
    try:
        if args.command == "demo":
            demo(args.dir)
            server = None
            endpoint, key_id, secret = args.endpoint, None, None
            if endpoint is None:
                server, endpoint = _start_moto()
                key_id, secret = "demo", "demo-secret"
            try:
                demo_replication(endpoint, args.bucket, args.dir, key_id=key_id, secret=secret)
                demo_failover(endpoint, key_id, secret, args.bucket, args.dir)
            finally:
                if server is not None:
                    server.stop()
        elif args.command == "create":
            with Volume.create(args.path, args.size, region_size=args.region_size) as vol:
                print(f"created {vol.path}: {vol.size} bytes, {vol.num_regions} regions of {vol.region_size}")
        elif args.command == "info":
            with Volume.open(args.path, readonly=True) as vol:
                counts = vol.layer_counts()
                print(f"volume {vol.id}\n  path         {vol.path}\n  size         {vol.size}")
                print(f"  region_size  {vol.region_size}\n  regions      {vol.num_regions}")
                for layer_id in sorted(counts):
                    name = "base" if layer_id == 0 else f"overlay-{layer_id}"
                    if counts[layer_id]:
                        print(f"  {name:<12} serves {counts[layer_id]} regions")
                for snap in vol.local_snapshots():
                    print(f"  snapshot {snap.id} label={snap.label} layer={snap.layer}")
        elif args.command == "snapshot":
            with Volume.open(args.path) as vol:
                snap = vol.local_snapshot(args.label)
                print(f"snapshot {snap.id} ({snap.label})")
        elif args.command == "merge-down":
            with Volume.open(args.path) as vol:
                print(f"merged {vol.merge_down()} regions into the base")
        elif args.command == "convert":
            from overlaycache.local.convert import convert_volume

            rep = convert_volume(args.path)
            print(f"converted {rep.path} to local format 2: {rep.overlays} overlays, {rep.regions} region versions"
                  + (f"; regions {rep.unavailable} failed their checksums and are unavailable" if rep.unavailable
                     else "") + (" (an interrupted conversion finished)" if rep.resumed else ""))
        elif args.command == "collapse":
            _collapse(args)
        elif args.command == "check":
            return _check(args)
    except OverlayCacheError as exc:
        print(f"overlaycache: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"overlaycache: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
