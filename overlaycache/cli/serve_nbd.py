"""``overlaycache serve-nbd PATH``: export the volume, a local snapshot or a PIT over NBD."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import ExitStack
from typing import Any

from overlaycache.cli._common import add_store_options, opened


def register(sub: Any) -> None:
    p = sub.add_parser("serve-nbd", help="export the volume (or a snapshot, read-only) as an NBD block device",
                       description="Serve the live volume read-write, or --snapshot (a local snapshot, or with "
                                   "--store a PIT) read-only, over the NBD protocol on 127.0.0.1 (or a Unix "
                                   "socket), for qemu-img, qemu-io, nbdcopy, nbdinfo, a VM or nbd-client. "
                                   "SIGINT/SIGTERM stop it after a flush. Example: qemu-img info nbd://127.0.0.1:10809")
    p.add_argument("path")
    p.add_argument("--snapshot", help="export this snapshot read-only (id or label)")
    p.add_argument("--readonly", action="store_true", help="refuse writes")
    p.add_argument("--port", type=int, default=10809, help="TCP port on 127.0.0.1 (default 10809; 0: any free)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (loopback unless --allow-remote)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --bind address")
    p.add_argument("--socket", metavar="PATH", help="listen on this Unix socket instead of TCP")
    p.add_argument("--name", default="", help="the export's name (default: empty, which clients select by default)")
    p.add_argument("--max-clients", type=int, default=64, help="connections served at once (default 64)")
    add_store_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from overlaycache.nbd import NBDServer

    readonly = args.readonly or args.snapshot is not None
    with ExitStack() as stack:
        vol = stack.enter_context(opened(args, readonly=readonly and args.store is None, store="optional"))
        target = vol if args.snapshot is None else stack.enter_context(vol.image(args.snapshot))
        what = f"{args.path} snapshot {args.snapshot}" if args.snapshot else args.path
        server = NBDServer(target, host=args.bind, port=args.port, socket_path=args.socket, readonly=readonly,
                           allow_remote=args.allow_remote, name=args.name, description=what,
                           max_clients=args.max_clients)
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.start()
            print(f"serving {what} ({'read-only' if readonly else 'read-write'}, {target.size} bytes) at {server.url}",
                  flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            server.stop()
            for s, h in old.items():
                signal.signal(s, h)
        print("stopped (flushed)", file=sys.stderr)
    return 0
