"""Geometry of a volume (size, region size, region count) and the checks of the arguments that
address it: integers, byte ranges, region ranges and buffers.

Every public entry point checks its arguments here before anything reaches the core, so bad input
is an :class:`~overlaycache.errors.OverlayCacheError` (also the matching builtin), never a crash.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sized
from typing import Any

from overlaycache.errors import InvalidArgumentError, InvalidBufferError, OutOfRangeError

MIN_REGION_SIZE = 4 << 10
MAX_REGION_SIZE = 64 << 20
#: The largest volume: its files' offsets (an overlay holds two slots a region) fit in a C off_t.
MAX_SIZE = 1 << 60


class Geometry:
    """Size and region size of a volume, and the derived region count."""

    __slots__ = ("size", "region_size", "num_regions")

    def __init__(self, size: int, region_size: int) -> None:
        self.size = size
        self.region_size = region_size
        self.num_regions = (size + region_size - 1) // region_size

    def region_length(self, r: int) -> int:
        """Bytes in region ``r`` (the last one may be partial)."""
        return min(self.region_size, self.size - r * self.region_size)

    def check_range(self, offset: Any, length: Any, what: str = "volume") -> None:
        """Check that ``[offset, offset + length)`` is a byte range inside the ``what``."""
        check_int("offset", offset)
        check_int("length", length)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(f"bytes [{offset}, {offset + length}) out of the {what} [0, {self.size})")

    def region_span(self, first: Any, count: Any) -> int:
        """Check a range of regions; returns its length (``count`` None: up to the end)."""
        check_int("first", first)
        n: int = self.num_regions - first if count is None else check_int("count", count)
        if first < 0 or n < 0 or first + n > self.num_regions:
            raise OutOfRangeError(f"regions [{first}, {first + n}) out of [0, {self.num_regions})")
        return n

    def check_regions(self, name: str, value: Any) -> list[int] | range:
        """``value`` (an iterable of region numbers) as a list or range, every one checked: a
        range by its ends, a list of plain ints in one pass; else :class:`InvalidArgumentError`
        or :class:`OutOfRangeError` naming the first bad one."""
        if isinstance(value, range):
            if value and (min(value[0], value[-1]) < 0 or max(value[0], value[-1]) >= self.num_regions):
                bad = value[0] if not 0 <= value[0] < self.num_regions else value[-1]
                raise OutOfRangeError(f"region {bad} out of [0, {self.num_regions})")
            return value
        items = check_regions(name, value) if not isinstance(value, list) else value
        if all(type(r) is int for r in items) and (not items or (min(items) >= 0 and max(items) < self.num_regions)):
            return items
        return [self.check_region(check_int("region", r)) for r in items]

    def check_region(self, r: Any) -> int:
        """``r`` if it is a region number of the volume."""
        check_int("region", r)
        if not 0 <= r < self.num_regions:
            raise OutOfRangeError(f"region {r} out of [0, {self.num_regions})")
        return int(r)


def check_geometry(size: Any, region_size: Any) -> Geometry:
    """The geometry of a volume of ``size`` bytes cut into regions of ``region_size``, checked."""
    size = check_int("size", size)
    region_size = check_int("region_size", region_size)
    if size <= 0:
        raise InvalidArgumentError(f"size must be > 0, got {size}")
    if size > MAX_SIZE:
        raise InvalidArgumentError(f"size must be at most {MAX_SIZE} bytes (1 EiB), got {size}")
    if region_size & (region_size - 1) or not MIN_REGION_SIZE <= region_size <= MAX_REGION_SIZE:
        raise InvalidArgumentError(
            f"region_size must be a power of two in [{MIN_REGION_SIZE}, {MAX_REGION_SIZE}], got {region_size}"
        )
    return Geometry(size, region_size)


def region_ranges(regions: Iterable[int], limit: int = 32) -> str:
    """``0-3,7,9-10`` for a sorted list of regions (for messages); past ``limit`` ranges, the
    rest is counted (``... and 12,345 more regions in 9,876 ranges``), so that a message stays a
    line whatever the number of regions."""
    out: list[str] = []
    more = more_ranges = 0

    def close(start: int, prev: int) -> None:
        nonlocal more, more_ranges
        if len(out) < limit:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
        else:
            more += prev - start + 1
            more_ranges += 1

    start = prev = None
    for i, r in enumerate(regions):
        if prev is not None and r == prev + 1:
            prev = r
            continue
        if start is not None and prev is not None:
            close(start, prev)
        if len(out) == limit and isinstance(regions, Sized):  # the rest is only counted
            rest = len(regions) - i
            return ",".join(out) + f" ... and {more + rest:,} more regions"
        start = prev = r
    if start is not None and prev is not None:
        close(start, prev)
    text = ",".join(out) or "none"
    if more:
        text += f" ... and {more:,} more regions in {more_ranges:,} ranges"
    return text


def check_path(name: str, value: Any) -> str:
    """``value`` as a path string if it is a ``str`` or ``os.PathLike`` of one; else
    :class:`InvalidArgumentError`."""
    try:
        path = os.fspath(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}") from None
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidArgumentError(f"{name} must be a non-empty path string without NUL, got {value!r}")
    return path


def check_callback(name: str, value: Any) -> None:
    """``value`` must be None or callable; else :class:`InvalidArgumentError`."""
    if value is not None and not callable(value):
        raise InvalidArgumentError(f"{name} must be a callable or None, got {type(value).__name__}")


def check_regions(name: str, value: Any) -> list[int]:
    """``value`` as a list of ints if it is an iterable of ints; else :class:`InvalidArgumentError`."""
    if isinstance(value, (str, bytes)):
        raise InvalidArgumentError(f"{name} must be an iterable of region numbers, got {type(value).__name__}")
    try:
        items = list(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an iterable of region numbers, got {type(value).__name__}") from None
    return [check_int("region", r) for r in items]


def check_int(name: str, value: Any) -> int:
    """``value`` if it is an int (not a bool); else :class:`InvalidArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__}")
    return value


def byte_view(data: Any) -> memoryview:
    """A flat byte view of any C-contiguous buffer; else :class:`InvalidBufferError`."""
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise InvalidBufferError(f"expected a bytes-like object, got {type(data).__name__}") from exc
    if not view.c_contiguous:
        raise InvalidBufferError("buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def writable_range(buffer: Any, offset: Any, size: int, what: str) -> memoryview:
    """``buffer`` as a flat writable byte view, checked to fit at ``offset`` in a ``what`` of
    ``size`` bytes; else :class:`InvalidBufferError` or :class:`OutOfRangeError`."""
    view = byte_view(buffer)
    if view.readonly:
        raise InvalidBufferError("a writable buffer is required")
    check_int("offset", offset)
    if offset < 0 or offset + len(view) > size:
        raise OutOfRangeError(f"bytes [{offset}, {offset + len(view)}) out of the {what} [0, {size})")
    return view
