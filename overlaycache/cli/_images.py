"""Moving bytes between a volume (or an image of one) and a disk image file, for import and export.

Raw files are read and written here, sparse both ways (all-zero chunks are skipped, holes are
found with ``SEEK_DATA``); other formats (qcow2, ...) go through ``qemu-img convert`` from the
Debian package qemu-utils, which does all the format work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from overlaycache._fs import data_extents
from overlaycache.errors import InvalidArgumentError, OverlayCacheError

CHUNK = 8 << 20
#: All-zero blocks of this size are skipped (left as holes, or not written to the volume).
BLOCK = 64 << 10


def _blocks(data: bytes, base: int, block: int = BLOCK) -> list[tuple[int, memoryview]]:
    """The blocks of ``data`` (at ``base``, a multiple of ``block``) that are not all zeros,
    adjacent ones joined."""
    mv = memoryview(data)
    out: list[tuple[int, memoryview]] = []
    start = -1
    for pos in range(0, len(data), block):
        nonzero = data.count(0, pos, pos + block) != min(block, len(data) - pos)
        if nonzero and start < 0:
            start = pos
        elif not nonzero and start >= 0:
            out.append((base + start, mv[start:pos]))
            start = -1
    if start >= 0:
        out.append((base + start, mv[start:]))
    return out


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise InvalidArgumentError("this needs qemu-img (Debian/Ubuntu: apt-get install qemu-utils)")
    return path


def image_info(image: str) -> tuple[str, int]:
    """The format and virtual size of a disk image, as ``qemu-img info`` says (raw without it)."""
    if not os.path.isfile(image):
        raise InvalidArgumentError(f"{image}: no such image file")
    if shutil.which("qemu-img") is None:
        return "raw", os.path.getsize(image)
    out = run_qemu_img(["info", "--output=json", image])
    info = json.loads(out)
    return str(info["format"]), int(info["virtual-size"])


def run_qemu_img(argv: list[str]) -> str:
    proc = subprocess.run([qemu_img(), *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise OverlayCacheError(f"qemu-img {argv[0]}: {msg}")
    return proc.stdout


def raw_into(path: str, vol: Any, progress: Callable[[int, int], None]) -> int:
    """Write the raw file ``path`` into ``vol`` (its all-zero chunks skipped); returns bytes written."""
    size = min(os.path.getsize(path), vol.size)
    written = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        ranges = data_extents(fd, 0, size)
        total = sum(b - a for a, b in ranges)
        done = 0
        for a, b in ranges:
            a -= a % vol.region_size  # whole regions: a data range may begin inside one
            for off in range(a, b, CHUNK):
                n = min(CHUNK, b - off)
                for at, block in _blocks(os.pread(fd, n, off), off, vol.region_size):
                    vol.write(at, block)
                    written += len(block)
                done += n
                progress(done, total)
    finally:
        os.close(fd)
    return written


def raw_from(source: Any, path: str, progress: Callable[[int, int], None]) -> int:
    """Write ``source`` (``size`` and ``read``) to the raw file ``path``, sparse; returns the bytes
    of data written."""
    size = source.size
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, size, CHUNK):
            data = source.read(off, min(CHUNK, size - off))
            for at, block in _blocks(data, off):
                os.pwrite(fd, block, at)
                written += len(block)
            progress(off + len(data), size)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written
