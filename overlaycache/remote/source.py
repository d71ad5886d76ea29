"""The region source: the one way remote bytes enter the process.

A :class:`RegionSource` serves the regions of one PIT snapshot, as its manifest names them, from a
store. Images of PIT snapshots and the volume's distributed overlay read the secondary through it
and through nothing else.

Contract
--------
* Every byte returned is verified: a region version from the store that does not match the
  manifest's checksum (tampered or truncated object) is a :class:`CorruptionError`, never data. The
  region cache verifies its own entries and drops a damaged one, which is then fetched again.
* A region whose version is all zeros (never stored: seq 0, or the checksum of zeros) is served
  without a request.
* With a region cache, a fetch is served from it when it has the version, and a version fetched
  from the store is put there; ``fetch(r, keep=False)`` bypasses the cache, for a caller that holds
  the lock the cache takes while its slots change.
* Fetches of several regions run in a persistent pool of ``workers`` threads, started on first
  use; a region already being fetched (a prefetch) is waited for, not fetched twice.
* :meth:`RegionSource.close` cancels the fetches not started, waits for those running, and makes
  :meth:`~RegionSource.fetch_many` and :meth:`~RegionSource.prefetch` raise
  :class:`VolumeClosedError`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from overlaycache._impl import core
from overlaycache.errors import CorruptionError, SecondaryUnavailableError, VolumeClosedError
from overlaycache.remote.cache import RegionCache
from overlaycache.remote.layout import region_key
from overlaycache.remote.manifest import Manifest

if TYPE_CHECKING:
    # Only for annotations: importing the store package at run time would load its backends, which
    # import the catalog, which imports the images that import this module.
    from overlaycache.store.base import ObjectStore

__all__ = ["RegionSource"]


class RegionSource:
    """The regions of one PIT snapshot, fetched from a store, verified, and cached.

    Parameters
    ----------
    store : ObjectStore or None
        Where the region objects are; None when no secondary is attached (only zero regions and
        regions in ``region_cache`` can then be served).
    manifest : Manifest
        The snapshot's manifest: per region, the version's seq and checksum.
    workers : int
        Threads fetching in parallel.
    region_cache : RegionCache, optional
        A cache of region versions, shared across sources and restarts.

    Attributes
    ----------
    store : ObjectStore or None
        The store read.
    manifest : Manifest
        The snapshot served.
    region_cache : RegionCache or None
        The cache fetched through.
    gets : int
        Objects fetched from the store so far.
    """

    def __init__(self, store: ObjectStore | None, manifest: Manifest, *, workers: int = 16,
                 region_cache: RegionCache | None = None) -> None:
        self.store = store
        self.manifest = manifest
        self.region_cache = region_cache
        self.gets = 0
        self._workers = max(1, workers)
        self._zero_sums: dict[int, bytes] = {}
        self._lock = threading.RLock()  # a fetch already done runs its callback in the submitter
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[int, Future[bytes]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return (f"RegionSource({getattr(self.store, 'location', self.store)!r}, "
                f"volume={self.manifest.volume_id!r}, snapshot={self.manifest.snapshot.id!r})")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _region_len(self, r: int) -> int:
        rs = self.manifest.region_size
        return min(rs, self.manifest.size - r * rs)

    def _zero_sum(self, rlen: int) -> bytes:
        zero = self._zero_sums.get(rlen)
        if zero is None:
            zero = self._zero_sums[rlen] = bytes(core.checksum(bytes(rlen)))
        return zero

    def _closed_error(self) -> VolumeClosedError:
        return VolumeClosedError(f"image of snapshot {self.manifest.snapshot.id} is closed")

    # -- the manifest ----------------------------------------------------------------------------
    def version(self, r: int) -> int:
        """The seq of region ``r``'s version in this snapshot (0: never replicated)."""
        return self.manifest.entry(r)[0]

    def region_checksum(self, r: int) -> bytes:
        """The checksum of region ``r`` in this snapshot, from the manifest.

        Parameters
        ----------
        r : int
            The region.

        Returns
        -------
        bytes
            16 bytes, mmh3 x64-128 of the region's bytes (of zeros for a region never replicated).
        """
        seq, csum = self.manifest.entry(r)
        if seq == 0:  # never replicated: all zeros, recorded without a checksum
            return self._zero_sum(self._region_len(r))
        return csum

    def is_zero(self, r: int) -> bool:
        """Whether region ``r``'s version is all zeros (served without a request)."""
        seq, csum = self.manifest.entry(r)
        return seq == 0 or csum == self._zero_sum(self._region_len(r))

    def cached(self, r: int) -> bool:
        """Whether region ``r`` can be served without the store (all zeros, or in the region cache)."""
        seq, csum = self.manifest.entry(r)
        if seq == 0 or csum == self._zero_sums.get(self._region_len(r)):
            return True
        return self.region_cache is not None and (r, seq) in self.region_cache

    # -- fetching --------------------------------------------------------------------------------
    def fetch(self, r: int, keep: bool = True) -> bytes:
        """Region ``r``'s bytes, verified.

        Parameters
        ----------
        r : int
            The region.
        keep : bool
            Read through the region cache: served from it when there, put there when fetched.
            False: straight from the store, leaving the cache alone (for a caller that holds the
            lock the cache takes while its slots change).

        Returns
        -------
        bytes
            The region's bytes (shorter than ``region_size`` for a partial last region).

        Raises
        ------
        CorruptionError
            The stored object does not match the manifest's checksum.
        SecondaryUnavailableError
            No store is attached, or it cannot be reached.
        StoreError
            The store failed otherwise.
        """
        seq, csum = self.manifest.entry(r)
        rlen = self._region_len(r)
        cache = self.region_cache if keep else None
        if seq == 0 or csum == self._zero_sum(rlen):
            # Never replicated, or all zeros: such versions are recorded but not stored.
            if cache is not None:
                cache.note_zero(r, seq)
            return bytes(rlen)
        if cache is not None:
            hit = cache.get(r, seq, csum, rlen)
            if hit is not None:
                return hit
        if self.store is None:
            raise SecondaryUnavailableError(f"region {r}: no secondary attached to fetch it from")
        data = self.store.get(region_key(self.manifest.volume_id, r, seq))
        with self._lock:
            self.gets += 1
        if len(data) != rlen or bytes(core.checksum(data)) != csum:
            raise CorruptionError(
                f"{getattr(self.store, 'location', self.store)}: region {r} version {seq:016x} "
                "does not match the manifest's checksum (tampered or truncated object)")
        if cache is not None:
            cache.put(r, seq, csum, data)
        return data

    def _submit(self, r: int) -> Future[bytes]:
        """The fetch of region ``r`` in the pool (an existing one if it is under way); under ``_lock``."""
        fut = self._inflight.get(r)
        if fut is None:
            if self._closed:
                raise self._closed_error()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="overlaycache-fetch")
            fut = self._inflight[r] = self._pool.submit(self.fetch, r)
            fut.add_done_callback(functools.partial(self._done, r))
        return fut

    def _done(self, r: int, fut: Future[bytes]) -> None:
        with self._lock:
            if self._inflight.get(r) is fut:
                del self._inflight[r]

    def fetch_many(self, regions: Sequence[int]) -> tuple[dict[int, bytes], dict[int, BaseException]]:
        """Fetch ``regions`` in parallel, through the region cache.

        Parameters
        ----------
        regions : sequence of int
            The regions.

        Returns
        -------
        got : dict of int to bytes
            The bytes of each region fetched.
        errors : dict of int to BaseException
            Per region that could not be fetched, the error (as :meth:`fetch` raises it).

        Raises
        ------
        VolumeClosedError
            The source is closed.
        """
        if self._closed:
            raise self._closed_error()
        got: dict[int, bytes] = {}
        errors: dict[int, BaseException] = {}
        if len(regions) == 1 and regions[0] not in self._inflight:
            try:
                got[regions[0]] = self.fetch(regions[0])
            except Exception as exc:  # noqa: BLE001 - reported per region to the caller
                errors[regions[0]] = exc
            return got, errors
        with self._lock:
            ahead = {r for r in regions if r in self._inflight}  # prefetches under way
            futures = [(r, self._submit(r)) for r in regions]
        for r, fut in futures:
            try:
                got[r] = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported per region to the caller
                if r in ahead:  # a prefetch started earlier failed: this read tries once itself
                    try:
                        got[r] = self.fetch(r)
                        continue
                    except Exception as again:  # noqa: BLE001
                        exc = again
                errors[r] = exc
        return got, errors

    def prefetch(self, regions: Iterable[int], limit: int | None = None) -> int:
        """Start fetching ``regions`` into the region cache in the background.

        Parameters
        ----------
        regions : iterable of int
            The regions, in the order to start them.
        limit : int, optional
            Fetches kept in flight at most (default: twice the workers).

        Returns
        -------
        int
            How many fetches were started (the first ones of ``regions`` not under way already).
        """
        limit = 2 * self._workers if limit is None else limit
        started = 0
        with self._lock:
            for r in regions:
                if self._closed or len(self._inflight) >= limit:
                    break
                if r not in self._inflight:
                    self._submit(r)
                    started += 1
        return started

    def close(self) -> None:
        """Cancel the fetches not started and wait for those running (idempotent)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
