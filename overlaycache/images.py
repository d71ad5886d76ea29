"""Read-only virtual images of a volume's snapshots.

An image reads each region from the newest of its layers that holds it, exactly like the volume
itself, through its own read stack; the volume swaps that stack when its layers change (merge) and
closes the image if its snapshot goes away.
"""

from __future__ import annotations

from typing import Any

from overlaycache.errors import StaleStackError, VolumeClosedError
from overlaycache.snapshots import LocalSnapshot


class VirtualImage:
    """A read-only virtual image of a local snapshot. Use :meth:`Volume.image` to get one.

    Attributes
    ----------
    snapshot : LocalSnapshot
        The snapshot it shows.
    size : int
        Bytes in the image.
    """

    def __init__(self, snapshot: LocalSnapshot, size: int, stack: Any, on_close: Any) -> None:
        self.snapshot = snapshot
        self.size = size
        self._stack: Any = stack
        self._on_close = on_close
        self._closed_reason: str | None = None

    def _current(self) -> Any:
        if self._closed_reason is not None:
            raise VolumeClosedError(f"image of snapshot {self.snapshot.id} is closed: {self._closed_reason}")
        return self._stack

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``.

        Raises
        ------
        OutOfRangeError
            The range is not inside the image.
        RegionUnavailableError
            A region cannot be read or does not match its checksum.
        """
        while True:
            try:
                return bytes(self._current().read(offset, length))
            except StaleStackError:
                continue

    def readinto(self, offset: int, buffer: Any) -> int:
        """Read ``len(buffer)`` bytes at ``offset`` into a writable buffer; returns the count."""
        while True:
            try:
                return int(self._current().readinto(offset, buffer))
            except StaleStackError:
                continue

    @property
    def closed(self) -> bool:
        """Whether the image is closed."""
        return self._closed_reason is not None

    def close(self) -> None:
        """Release the image (idempotent)."""
        if self._closed_reason is None:
            self._on_close(self)

    def _invalidate(self, reason: str) -> Any:
        """Called by the volume with its write lock held; returns the stack to release."""
        self._closed_reason = reason
        stack, self._stack = self._stack, None
        return stack

    def __enter__(self) -> VirtualImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VirtualImage(snapshot={self.snapshot.id!r}, size={self.size})"
