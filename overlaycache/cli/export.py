"""``overlaycache export PATH OUT``: write the volume, a local snapshot or a PIT to a disk image."""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import ExitStack
from typing import Any

from overlaycache.cli._common import Progress, add_json, add_store_options, emit, human, open_store_from
from overlaycache.cli._images import raw_from, run_qemu_img
from overlaycache.errors import InvalidArgumentError


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write the volume, a local snapshot or a PIT to a raw or qcow2 image",
                       description="Write the volume as it is (or --snapshot: a local snapshot, or with --store "
                                   "a PIT) to OUT, sparse. qcow2 (and other formats) go through qemu-img "
                                   "(package qemu-utils). The volume may be open elsewhere for a snapshot.")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--snapshot", help="a local snapshot or PIT (id or label); default: the volume now")
    p.add_argument("--format", "-O", default="raw", help="raw (default), qcow2, or any format qemu-img writes")
    add_store_options(p)
    add_json(p)
    p.set_defaults(run=run)


def _source(stack: ExitStack, args: argparse.Namespace) -> Any:
    from overlaycache.local.meta import read_meta
    from overlaycache.volume import Volume

    store = open_store_from(args, required=False)
    if store is not None:
        stack.callback(store.close)
    if args.snapshot is not None and store is not None:
        meta = read_meta(args.path)
        if not any(args.snapshot in (s.id, s.label) for s in meta.snapshots):
            snaps = store.snapshots(meta.id)  # type: ignore[attr-defined]
            match = [s for s in snaps if args.snapshot in (s.id, s.label)]
            if match:  # a PIT, read from the store alone: the volume may be busy or gone
                return stack.enter_context(store.image(meta.id, match[0]))  # type: ignore[attr-defined]
    vol = stack.enter_context(Volume.open(args.path, readonly=True))
    if args.snapshot is None:
        return vol
    if store is None and not any(args.snapshot in (s.id, s.label) for s in vol.local_snapshots()):
        raise InvalidArgumentError(f"{args.path}: no local snapshot {args.snapshot!r} (for a PIT, give --store)")
    return stack.enter_context(vol.image(args.snapshot))


def run(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        src = _source(stack, args)
        size = src.size
        with Progress(args, "export", "B") as bar:
            if args.format == "raw":
                written = raw_from(src, args.out, bar)
            else:
                fd, tmp = tempfile.mkstemp(prefix=".overlaycache-export-", suffix=".raw",
                                           dir=os.path.dirname(os.path.abspath(args.out)) or ".")
                os.close(fd)
                try:
                    written = raw_from(src, tmp, bar)
                    run_qemu_img(["convert", "-f", "raw", "-O", args.format, tmp, args.out])
                finally:
                    os.unlink(tmp)
    emit(args, {"out": args.out, "format": args.format, "size": size, "data_bytes": written},
         f"exported {human(size)} ({human(written)} of data) to {args.out} ({args.format})")
    return 0
