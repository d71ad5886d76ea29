"""``overlaycache demo``: the seed's story on real volumes, narrated as tables."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, TextIO

from overlaycache.errors import InvalidArgumentError
from overlaycache.volume import Volume

#: The seed, as the demo cites its figures.
SEED = '"Remote Data Access for Local Operations" (patent application)'


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
            print(f"overlaycache demo: the figures of {SEED}, on real volumes\n\n"
                  f"An overlay snapshot (Fig. 2): 8 regions of {rs} bytes in {path}", file=stream)
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
                     secret: str | None = None, builtin: bool = False) -> None:
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
        builtin = builtin or server is not None
        where = "the demo's own built-in S3 server: moto, in this process" if builtin else "the given endpoint"
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
        print("\nDistributed overlay snapshot (Figs. 3C-3F) and recovery (Fig. 3B), same server", file=stream)
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


def register(sub: Any) -> None:
    d = sub.add_parser("demo", help="walk through the overlay snapshot, replication and failover on real volumes",
                       description="The seed's story (the patent application \"Remote Data Access for Local "
                                   "Operations\", Figs. 2 and 3) on real volumes in a temporary directory: an "
                                   "overlay snapshot, replication to S3, the distributed overlay and recovery.")
    d.add_argument("--dir", help="keep the demo volumes in this directory (default: a temporary one)")
    d.add_argument("--endpoint", help="replicate to this S3 endpoint instead of the demo's own built-in "
                   "moto server (credentials from the environment)")
    d.add_argument("--bucket", default="overlaycache-demo", help="bucket for the replication part")
    d.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    demo(args.dir)
    server = None
    endpoint, key_id, secret = args.endpoint, None, None
    if endpoint is None:
        server, endpoint = _start_moto()
        key_id, secret = "demo", "demo-secret"
    try:
        demo_replication(endpoint, args.bucket, args.dir, key_id=key_id, secret=secret, builtin=server is not None)
        demo_failover(endpoint, key_id, secret, args.bucket, args.dir)
    finally:
        if server is not None:
            server.stop()
    return 0
