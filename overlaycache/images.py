"""Read-only virtual images: of a volume's local snapshots, and of PIT snapshots on the secondary.

A local image reads each region from the newest of its layers that holds it, exactly like the volume
itself, through its own read stack; the volume swaps that stack when its layers change (merge) and
closes the image if its snapshot goes away. A remote image reads regions from the secondary alone,
through a :class:`~overlaycache.remote.source.RegionSource`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from overlaycache.clone import Clone
from overlaycache.errors import OutOfRangeError, StaleStackError, VolumeClosedError
from overlaycache.local.geometry import writable_range
from overlaycache.local.regions import LocalRegions
from overlaycache.remote.cache import RegionCache
from overlaycache.remote.source import MAX_RUN_BYTES, RegionSource
from overlaycache.snapshots import LocalSnapshot

#: What a sequential read of a remote image keeps in flight ahead of it, by default (as the
#: distributed overlay's readahead).
READAHEAD = 64 << 20

if TYPE_CHECKING:
    # Only for annotations: the store package's backends import the catalog, which imports this.
    from overlaycache.remote.leases import LeaseKeeper
    from overlaycache.remote.tree import PitMap
    from overlaycache.store.base import ObjectStore


class VirtualImage:
    """A read-only virtual image of a local snapshot. Use :meth:`Volume.image` to get one.

    Attributes
    ----------
    snapshot : LocalSnapshot
        The snapshot it shows.
    size, region_size : int
        Geometry of the volume.
    volume_id : str or None
        The volume's id.
    """

    def __init__(self, snapshot: LocalSnapshot, size: int, stack: Any, on_close: Any,
                 volume_id: str | None = None) -> None:
        self.snapshot = snapshot
        self.size = size
        self.region_size: int = stack.region_size
        self.volume_id = volume_id
        self._stack: Any = stack
        self._on_close = on_close
        self._closed_reason: str | None = None

    def _current(self) -> Any:
        if self._closed_reason is not None:
            raise VolumeClosedError(f"image of snapshot {self.snapshot.id} is closed: {self._closed_reason}")
        return self._stack

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``.

        Parameters
        ----------
        offset : int
            The first byte.
        length : int
            Bytes to read; the range must be inside the image.

        Returns
        -------
        bytes

        Raises
        ------
        OutOfRangeError
            The range is not inside the image.
        VolumeClosedError
            The image is closed (by :meth:`close`, its volume closing, or its snapshot going away).
        RegionUnavailableError
            A region cannot be read or does not match its checksum.
        """
        while True:
            try:
                return bytes(self._current().read(offset, length))
            except StaleStackError:
                continue

    def readinto(self, offset: int, buffer: Any) -> int:
        """Read ``len(buffer)`` bytes at ``offset`` into a writable buffer; returns the count.

        Parameters
        ----------
        offset : int
            The first byte.
        buffer : writable bytes-like
            Filled entirely; ``offset + len(buffer)`` must be inside the image.

        Returns
        -------
        int
            ``len(buffer)`` in bytes.

        Raises
        ------
        InvalidBufferError
            ``buffer`` is not a writable, C-contiguous bytes-like object.
        OutOfRangeError, VolumeClosedError, RegionUnavailableError
            As :meth:`read`.
        """
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

    def clone(self, path: str | os.PathLike[str]) -> Clone:
        """A writable local overlay over this image, in a new or empty directory ``path``; see :class:`Clone`.

        The clone reads through this image: it raises :class:`VolumeClosedError` once the image is
        closed (also when the volume closes or a merge drops the snapshot). Reopen it with
        :meth:`Volume.open_clone`.

        Parameters
        ----------
        path : str or PathLike
            A directory that does not exist yet, or is empty.

        Returns
        -------
        Clone
            Open; a context manager.

        Raises
        ------
        InvalidArgumentError
            ``path`` exists and is not an empty directory.
        VolumeClosedError
            The image is closed.
        """
        return Clone.create(path, self)

    def detach(self, reason: str) -> Any:
        """Close the image for ``reason``; returns its read stack, for the caller to release.

        Called by the volume, with its stack lock held for writing.

        Parameters
        ----------
        reason : str
            Why, for the :class:`VolumeClosedError` that later reads raise.

        Returns
        -------
        object
            The core read stack the image held.
        """
        self._closed_reason = reason
        stack, self._stack = self._stack, None
        return stack

    def replace_stack(self, stack: Any) -> Any:
        """Read through ``stack`` from now on (the volume's layers changed); returns the old one,
        for the caller to release. Called by the volume, with its stack lock held for writing.

        Parameters
        ----------
        stack : object
            A core read stack of the same snapshot's layers.

        Returns
        -------
        object
            The read stack it replaces.
        """
        old, self._stack = self._stack, stack
        return old

    def __enter__(self) -> VirtualImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VirtualImage(snapshot={self.snapshot.id!r}, size={self.size})"


def _read_via_readinto(readinto: Any, offset: int, length: int) -> bytes:
    if length < 0:
        raise OutOfRangeError(f"length must be >= 0, got {length}")
    buf = bytearray(length)
    readinto(offset, buf)
    return bytes(buf)


class RemoteImage:
    """A read-only, lazy virtual image of a PIT snapshot, read from the secondary alone.

    Regions come from its :class:`~overlaycache.remote.source.RegionSource` (:attr:`source`):
    fetched on demand by a pool of ``workers`` threads (regions adjacent in one pack with one
    ranged GET; a region already being fetched is waited for, not fetched twice), verified against
    the map's checksums, and kept in ``region_cache`` if given. The image keeps the last
    ``cache_regions`` regions it read in memory; a sequential read keeps ``readahead`` regions in
    flight ahead of it. Regions never written read as zeros without a request.

    Parameters
    ----------
    store : ObjectStore or None
        Where the region objects are (None: no secondary attached).
    manifest : PitMap
        The snapshot's map.
    cache_regions : int
        Regions kept in memory.
    workers : int
        Threads fetching in parallel.
    region_cache : RegionCache, optional
        A cache of region versions shared across images and restarts.
    readahead : int, optional
        Regions a sequential read keeps in flight ahead of it (default: 64 MiB worth; 0: none, for
        a reader that asks for exactly the regions it needs).

    Attributes
    ----------
    snapshot : Snapshot
        The snapshot shown.
    size, region_size : int
        Geometry of the volume.
    volume_id : str
        The volume's id.
    source : RegionSource
        Where the image's bytes come from.
    """

    def __init__(self, store: ObjectStore | None, manifest: PitMap, cache_regions: int = 256, workers: int = 16,
                 region_cache: RegionCache | None = None, readahead: int | None = None) -> None:
        default = max(1, READAHEAD // manifest.region_size)
        self._ahead = max(0, default if readahead is None else readahead)
        self.source = RegionSource(store, manifest, workers=workers, region_cache=region_cache,
                                   keep_landed=max(2 * self._ahead, 64 * workers))
        self.snapshot = manifest.snapshot
        self.volume_id = manifest.volume_id
        #: The lease that pins the PIT while the image is open, renewed in the background (see
        #: :class:`~overlaycache.remote.leases.LeaseKeeper`), or None.
        self.lease: LeaseKeeper | None = None
        self.size = manifest.size
        self.region_size = manifest.region_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_regions = cache_regions
        self._run = max(1, min(self._ahead, MAX_RUN_BYTES // manifest.region_size))
        self._next = 0  # the region after the last read: a read starting there is sequential
        self._ra_next = 0  # the first region not yet asked for by the readahead
        self._lock = threading.Lock()

    @property
    def gets(self) -> int:
        """GET requests made to the secondary so far."""
        return self.source.gets

    @property
    def region_cache(self) -> RegionCache | None:
        """The region cache the image reads through, if any."""
        return self.source.region_cache

    def region_checksum(self, r: int) -> bytes:
        """The checksum of region ``r`` in this snapshot, from its map (no data read).

        Parameters
        ----------
        r : int
            The region.

        Returns
        -------
        bytes
            16 bytes, mmh3 x64-128 of the region's bytes (of zeros for a region never replicated).
        """
        return self.source.region_checksum(r)

    def version(self, r: int) -> int:
        """The seq of region ``r``'s version in this snapshot (0: never replicated).

        Parameters
        ----------
        r : int
            The region.

        Returns
        -------
        int
        """
        return self.source.version(r)

    def is_zero(self, r: int) -> bool:
        """Whether region ``r``'s version is all zeros (served without a request).

        Parameters
        ----------
        r : int
            The region.

        Returns
        -------
        bool
        """
        return self.source.is_zero(r)

    def fetch_many(self, regions: Sequence[int]) -> tuple[dict[int, bytes | memoryview], dict[int, BaseException]]:
        """Fetch ``regions`` in parallel; returns their bytes (or read-only views of them) and, per
        region that failed, the error.

        See :meth:`RegionSource.fetch_many`.

        Parameters
        ----------
        regions : sequence of int
            The regions.

        Returns
        -------
        got : dict of int to bytes or memoryview
            The bytes of each region fetched (views are read-only: copy what is kept long).
        errors : dict of int to BaseException
            Per region that could not be fetched, why (:class:`CorruptionError`,
            :class:`SecondaryUnavailableError`, ...).

        Raises
        ------
        VolumeClosedError
            The image is closed.
        """
        return self.source.fetch_many(regions)

    def prefetch(self, regions: Iterable[int], limit: int | None = None) -> int:
        """Start fetching ``regions`` into the region cache in the background, keeping at most
        ``limit`` fetches in flight; returns how many were started.

        Parameters
        ----------
        regions : iterable of int
            The regions, in the order to start them.
        limit : int, optional
            Regions in flight at most (default: 64 per worker).

        Returns
        -------
        int
            How many of the first of ``regions`` were started or are under way already (0 once
            the image is closed).
        """
        return self.source.prefetch(regions, limit)

    def cached(self, r: int) -> bool:
        """Whether region ``r`` can be served without the secondary.

        Parameters
        ----------
        r : int
            The region.

        Returns
        -------
        bool
            True for a region kept in memory, in the region cache, or all zeros.
        """
        with self._lock:
            if r in self._cache:
                return True
        return self.source.cached(r)

    def regions(self, first: int, count: int) -> list[bytes | memoryview]:
        """The bytes of regions ``[first, first + count)`` (or read-only views of them), fetched in
        parallel where needed. Regions read sequentially are not kept in the in-memory cache: the
        readahead serves them, and a sequential reader does not come back.

        Parameters
        ----------
        first : int
            The first region.
        count : int
            How many.

        Returns
        -------
        list of bytes or memoryview
            One per region, in order (shorter than ``region_size`` for a partial last region).

        Raises
        ------
        VolumeClosedError
            The image is closed.
        CorruptionError, SecondaryUnavailableError, StoreError
            The first error met fetching a region (see :meth:`fetch_many`).
        """
        if self.source.closed:
            raise VolumeClosedError(f"image of snapshot {self.snapshot.id} is closed")
        out: dict[int, bytes | memoryview] = {}
        missing = []
        with self._lock:
            sequential = first == self._next
            self._next = first + count
            for r in range(first, first + count):
                hit = self._cache.get(r)
                if hit is not None:
                    self._cache.move_to_end(r)
                    out[r] = hit
                else:
                    missing.append(r)
            window = None
            if sequential and self._ahead:
                # A sequential reader: keep up to ``_ahead`` regions in flight ahead of it (runs of
                # one pack in one ranged GET each, in parallel), topped up a whole run at a time;
                # these regions' fetches go first.
                end = first + count
                if self._ra_next < end or self._ra_next - end <= self._ahead - self._run:
                    start = max(first, self._ra_next)
                    stop = max(end, (end + self._ahead) // self._run * self._run)  # whole runs
                    stop = min(stop, -(-self.size // self.region_size))
                    if start < stop:
                        window = (start, stop)
            else:
                self._ra_next = 0
        if window is not None:
            started = self.source.prefetch(range(*window), limit=2 * self._ahead + count)
            with self._lock:
                self._ra_next = window[0] + started
        fetched, errors = self.source.fetch_many(missing)
        if errors:
            raise next(iter(errors.values()))
        out.update(fetched)
        if sequential and self._ahead:
            last = first + count - 1
            if last in fetched:  # the next sequential read may start inside it
                with self._lock:
                    self._cache[last] = bytes(fetched[last])
                    if len(self._cache) > self._cache_regions:
                        self._cache.popitem(last=False)
            return [out[r] for r in range(first, first + count)]
        with self._lock:
            for r in missing:
                self._cache[r] = bytes(fetched[r])
                if len(self._cache) > self._cache_regions:
                    self._cache.popitem(last=False)
        return [out[r] for r in range(first, first + count)]

    def readinto(self, offset: int, buffer: Any) -> int:
        """Read ``len(buffer)`` bytes at ``offset`` into a writable buffer; returns the count.

        Parameters
        ----------
        offset : int
            The first byte.
        buffer : writable bytes-like
            Filled entirely; ``offset + len(buffer)`` must be inside the image.

        Returns
        -------
        int
            ``len(buffer)``.

        Raises
        ------
        OutOfRangeError
            The range is not inside the image.
        VolumeClosedError
            The image is closed.
        CorruptionError
            A region's bytes on the store do not match the PIT map's checksum.
        SecondaryUnavailableError
            The store cannot be reached (or none is attached) for a region not cached.
        StoreError
            The store failed otherwise.
        InvalidBufferError
            ``buffer`` is not a writable bytes-like object.
        """
        view = writable_range(buffer, offset, self.size, "image")
        n = len(view)
        if n == 0:
            return 0
        rs = self.region_size
        first, last = offset // rs, (offset + n - 1) // rs
        pos = 0
        for r, data in zip(range(first, last + 1), self.regions(first, last - first + 1)):
            start = max(offset, r * rs) - r * rs
            take = min(len(data) - start, n - pos)
            view[pos : pos + take] = data[start : start + take]
            pos += take
        return n

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``, fetching the regions not cached from the store.

        Parameters
        ----------
        offset : int
            The first byte.
        length : int
            Bytes to read; the range must be inside the image.

        Returns
        -------
        bytes

        Raises
        ------
        OutOfRangeError
            The range is not inside the image.
        VolumeClosedError
            The image is closed.
        CorruptionError
            A region's bytes on the store do not match the PIT map's checksum.
        SecondaryUnavailableError
            The store cannot be reached (or none is attached) for a region not cached.
        StoreError
            The store failed otherwise.
        """
        if length <= 0 or offset < 0 or offset + length > self.size or self.source.closed:
            return _read_via_readinto(self.readinto, offset, length)  # its errors
        rs = self.region_size
        first, last = offset // rs, (offset + length - 1) // rs
        parts = []
        for r, data in zip(range(first, last + 1), self.regions(first, last - first + 1)):
            a = max(offset, r * rs) - r * rs
            b = min(offset + length, r * rs + len(data)) - r * rs
            parts.append(memoryview(data)[a:b])
        return b"".join(parts)

    def close(self) -> None:
        """Stop the fetches under way, drop the in-memory cache and stop renewing the image's
        lease, if it has one (idempotent)."""
        if self.lease is not None:
            self.lease.close()
        self.source.close()
        with self._lock:
            self._cache.clear()

    def __enter__(self) -> RemoteImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteImage(volume={self.volume_id!r}, snapshot={self.snapshot.id!r}, size={self.size})"


class RecoveryImage:
    """A read-only virtual image of a PIT snapshot, opened beside a live volume (Fig. 3B).

    Each region is read from the volume where its current local version is valid and identical to
    the snapshot's (same checksum: no bytes compared), and from the secondary otherwise. Several
    recovery images can be open at once; none changes the volume.

    Attributes
    ----------
    snapshot : Snapshot
        The PIT shown.
    size, region_size : int
        Geometry of the volume.
    volume_id : str
        The volume's id.
    """

    def __init__(self, local: LocalRegions, remote: RemoteImage) -> None:
        self._local = local
        self.remote = remote
        self._closed = False
        self.volume_id = remote.volume_id
        self.snapshot = remote.snapshot
        self.size = remote.size
        self.region_size = remote.region_size
        self.local_reads = 0  # regions served by the volume, for tests and reports

    def region_checksum(self, r: int) -> bytes:
        """The checksum of region ``r`` in this snapshot, from its map (no data read).

        Parameters
        ----------
        r : int
            The region.

        Returns
        -------
        bytes
            16 bytes, mmh3 x64-128.
        """
        return self.remote.region_checksum(r)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Read ``len(buffer)`` bytes at ``offset`` into a writable buffer; returns the count.

        Regions whose current local version is valid and has the PIT's checksum are read from the
        volume; the others from the secondary, contiguous ones together.

        Parameters
        ----------
        offset : int
            The first byte.
        buffer : writable bytes-like
            Filled entirely; ``offset + len(buffer)`` must be inside the image.

        Returns
        -------
        int
            ``len(buffer)``.

        Raises
        ------
        VolumeClosedError
            The image, or its volume, is closed.
        OutOfRangeError
            The range is not inside the image.
        InvalidBufferError
            ``buffer`` is not a writable bytes-like object.
        CorruptionError, SecondaryUnavailableError, StoreError
            A region had to come from the secondary and could not (see :meth:`RemoteImage.read`).
        """
        if self.closed:
            raise VolumeClosedError(f"image of snapshot {self.snapshot.id} is closed (or its volume)")
        view = writable_range(buffer, offset, self.size, "image")
        n = len(view)
        if n == 0:
            return 0
        rs = self.region_size
        first, last = offset // rs, (offset + n - 1) // rs
        remote: list[int] = []
        for r in range(first, last + 1):
            a = max(offset, r * rs)
            b = min(offset + n, (r + 1) * rs)
            if not self._local.read_if_identical(r, self.region_checksum(r), a, view[a - offset : b - offset]):
                remote.append(r)
            else:
                self.local_reads += 1
        # The regions not valid or not identical locally, fetched together (in parallel).
        i = 0
        while i < len(remote):
            j = i
            while j + 1 < len(remote) and remote[j + 1] == remote[j] + 1:
                j += 1
            a = max(offset, remote[i] * rs)
            b = min(offset + n, (remote[j] + 1) * rs)
            self.remote.readinto(a, view[a - offset : b - offset])
            i = j + 1
        return n

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (see :meth:`readinto`).

        Parameters
        ----------
        offset : int
            The first byte.
        length : int
            Bytes to read; the range must be inside the image.

        Returns
        -------
        bytes

        Raises
        ------
        VolumeClosedError, OutOfRangeError, CorruptionError, SecondaryUnavailableError, StoreError
            As :meth:`readinto`.
        """
        return _read_via_readinto(self.readinto, offset, length)

    @property
    def closed(self) -> bool:
        """Whether the image, or the volume beside which it was opened, is closed."""
        return self._closed or self._local.closed

    def clone(self, path: str | os.PathLike[str]) -> Clone:
        """A writable local overlay over this image, in a new or empty directory ``path``; see :class:`Clone`.

        The clone reads through this image: it raises :class:`VolumeClosedError` once the image or
        its volume is closed. Reopen it with :meth:`Volume.open_clone`.

        Parameters
        ----------
        path : str or PathLike
            A directory that does not exist yet, or is empty.

        Returns
        -------
        Clone
            Open; a context manager.

        Raises
        ------
        InvalidArgumentError
            ``path`` exists and is not an empty directory.
        VolumeClosedError
            The image, or its volume, is closed.
        """
        return Clone.create(path, self)

    def close(self) -> None:
        """Release the image (idempotent)."""
        self._closed = True
        self.remote.close()

    def __enter__(self) -> RecoveryImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RecoveryImage(snapshot={self.snapshot.id!r}, size={self.size})"
