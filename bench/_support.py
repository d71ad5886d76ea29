"""Helpers shared by the benchmark suites and their fixtures (see ``conftest.py`` and ``report.py``).

Conventions
-----------
Each benchmark records in ``benchmark.extra_info`` (see :func:`record`):

``pair``
    The comparison it belongs to, e.g. ``read_seq_1MiB``; also the pytest-benchmark group.
``role``
    ``ours`` (compared against the fastest ``baseline`` of the same pair), ``baseline``,
    ``diagnostic`` (a variant that explains where time goes; reported, not judged) or ``info``.
``variant``
    Short name of the implementation measured.
``bytes`` / ``items``
    Work done per round; throughput is work divided by the time of one round.
``target`` / ``target_rate``
    The ratio (ours / baseline) or absolute rate (items per second) that DESIGN.md section 7 asks for.

The variants of a pair run interleaved (:func:`interleaved`): every variant a few rounds, then every
variant again, so that a burst of load from other jobs on the machine falls on all of them alike;
report.py merges the passes of a variant before comparing.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

MiB = 1 << 20

#: Geometry of the read benchmarks (DESIGN.md section 7): 256 MiB, 64 KiB regions, two overlays.
READ_SIZE = int(os.environ.get("OC_BENCH_READ_MIB", "256")) * MiB
READ_REGION = 64 << 10

#: Passes over the variants of each pair (see the module docstring).
PASSES = max(1, int(os.environ.get("OC_BENCH_PASSES", "3")))


def interleaved(variants: list[str]) -> list[Any]:
    """Parameters ``(pass_, variant)`` for ``pytest.mark.parametrize``, passes outermost."""
    return [pytest.param(p, v, id=f"{v}-pass{p}") for p in range(PASSES) for v in variants]


def pattern(tag: bytes, n: int) -> bytes:
    """``n`` deterministic pseudo-random bytes (SHAKE-128 of ``tag``), about 300 MB/s."""
    return hashlib.shake_128(tag).digest(n)


def record(
    benchmark: Any,
    pair: str,
    role: str,
    variant: str,
    *,
    nbytes: int | None = None,
    items: int | None = None,
    target: float | None = None,
    target_rate: float | None = None,
    note: str | None = None,
    **extra: Any,
) -> None:
    """Label ``benchmark`` for report.py; call before ``benchmark.pedantic``."""
    if role not in ("ours", "baseline", "diagnostic", "info"):
        raise ValueError(f"unknown role {role!r}")
    benchmark.group = pair
    info: dict[str, Any] = {"pair": pair, "role": role, "variant": variant}
    if nbytes is not None:
        info["bytes"] = nbytes
    if items is not None:
        info["items"] = items
    if target is not None:
        info["target"] = target
    if target_rate is not None:
        info["target_rate"] = target_rate
    if note:
        info["note"] = note
    info.update(extra)
    benchmark.extra_info.update(info)


def fill_through_map(path: str, data: bytes | bytearray) -> None:
    """Create ``path`` sparse and fill it through a shared mapping, as overlaycache fills its files.

    Pages created by stores into a mapping are 4 KiB page-cache folios, where ``write()`` (and
    readahead from disk) make large folios; that changes the cost of page faults (and a little the
    cost of reads), so diagnostics compare against both kinds of file.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(data))
        with mmap.mmap(fd, len(data)) as mm:
            with memoryview(mm) as view:
                view[:] = data
            mm.flush()
    finally:
        os.close(fd)


@dataclass
class ReadImage:
    """A volume laid out for the read benchmarks, and the same bytes in plain files."""

    volume_path: str
    #: written with write(): large page-cache folios (the fastest raw baseline)
    plain_path: str
    #: filled through a mapping: 4 KiB folios, like the volume's own files (diagnostic)
    plain_small_path: str
    size: int
    region_size: int
    expected: bytes
    #: regions served by each layer, newest first (top overlay, older overlay, base)
    layer_regions: list[int] = field(default_factory=list)


def read_all(readinto: Callable[[int, Any], Any], buf: mmap.mmap, size: int, expected: bytes | None) -> None:
    """Read ``size`` bytes in ``len(buf)`` pieces, checking each against ``expected`` if given."""
    n = len(buf)
    for off in range(0, size, n):
        readinto(off, buf)
        if expected is not None and buf[:] != expected[off : off + n]:
            raise AssertionError(f"bytes at {off} differ from the expected image")


@dataclass
class PlainMap:
    """A plain baseline file, open and mapped read-only."""

    fd: int
    mm: mmap.mmap
    view: memoryview
