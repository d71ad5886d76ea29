"""``overlaycache import IMAGE PATH``: a new volume holding a disk image (raw, qcow2, ...)."""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from overlaycache.cli._common import ENV_REGION_SIZE, Progress, add_json, emit, human, parse_size
from overlaycache.cli._images import image_info, raw_into, run_qemu_img


def register(sub: Any) -> None:
    p = sub.add_parser("import", help="create a volume from a disk image (raw, qcow2, anything qemu-img reads)",
                       description="Create the volume PATH with the contents of IMAGE in its base. Raw images are "
                                   "read directly (holes and zero chunks skipped); other formats are converted "
                                   "by qemu-img (package qemu-utils) first.")
    p.add_argument("image")
    p.add_argument("path")
    p.add_argument("--region-size", type=parse_size, default=os.environ.get(ENV_REGION_SIZE, "64K"),
                   help="bytes per region (default 64K)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from overlaycache.volume import Volume

    fmt, size = image_info(args.image)
    tmp = None
    source = args.image
    try:
        if fmt != "raw":
            fd, tmp = tempfile.mkstemp(prefix=".overlaycache-import-", suffix=".raw",
                                       dir=os.path.dirname(os.path.abspath(args.path)) or ".")
            os.close(fd)
            run_qemu_img(["convert", "-f", fmt, "-O", "raw", args.image, tmp])
            source = tmp
        with Volume.create(args.path, size, region_size=args.region_size) as vol, Progress(args, "import", "B") as bar:
            written = raw_into(source, vol, bar)
            vol.flush()
            vol.merge_down()  # the image is the base
            vid = vol.id
    finally:
        if tmp is not None:
            os.unlink(tmp)
    emit(args, {"path": args.path, "id": vid, "format": fmt, "size": size, "data_bytes": written},
         f"imported {args.image} ({fmt}, {human(size)}) into {args.path}: {human(written)} of data")
    return 0
