"""The region source: the one way remote bytes enter the process.

A :class:`RegionSource` serves the regions of one PIT snapshot, as its map names them
(:class:`~overlaycache.remote.tree.PitMap`), from a store. Images of PIT snapshots and the
volume's distributed overlay read the secondary through it and through nothing else.

Contract
--------
* A region is a ranged GET of its bytes in its pack; regions adjacent in one pack that are fetched
  together (a read, a prefetch) are one ranged GET, split after it arrives.
* Every byte returned is verified: a region version from the store that does not match the
  map's checksum (tampered or truncated object) is a :class:`CorruptionError`, never data. The
  region cache verifies its own entries and drops a damaged one, which is then fetched again.
* A region whose version is all zeros (never stored: seq 0, pack 0, or the checksum of zeros) is
  served without a request.
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
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import TYPE_CHECKING

from overlaycache._impl import core
from overlaycache.errors import CorruptionError, ObjectNotFoundError, SecondaryUnavailableError, VolumeClosedError
from overlaycache.remote.cache import RegionCache
from overlaycache.remote.layout import (
    NO_DIGEST,
    pack_generations_prefix,
    pack_key,
    parse_pack_key_generation,
    version_digest,
)

if TYPE_CHECKING:
    from overlaycache.remote.tree import PitMap

if TYPE_CHECKING:
    # Only for annotations: importing the store package at run time would load its backends, which
    # import the catalog, which imports the images that import this module.
    from overlaycache.store.base import ObjectStore

__all__ = ["RegionSource"]

#: A run fetched with one ranged GET is at most this many bytes (a longer one is split, and its
#: parts fetched in parallel).
MAX_RUN_BYTES = 8 << 20
#: Without a region cache, regions a prefetch brought in are kept (at most this many per worker)
#: until a fetch takes them.
LANDED_PER_WORKER = 64


class RegionSource:
    """The regions of one PIT snapshot, fetched from a store, verified, and cached.

    Parameters
    ----------
    store : ObjectStore or None
        Where the region objects are; None when no secondary is attached (only zero regions and
        regions in ``region_cache`` can then be served).
    manifest : PitMap
        The snapshot's map: per region, the version's seq, pack, place and checksum.
    workers : int
        Threads fetching in parallel.
    region_cache : RegionCache, optional
        A cache of region versions, shared across sources and restarts.
    keep_landed : int, optional
        Without a region cache: regions a prefetch brought in that are kept until a fetch takes
        them (default :data:`LANDED_PER_WORKER` per worker).

    Attributes
    ----------
    store : ObjectStore or None
        The store read.
    manifest : PitMap
        The snapshot served.
    region_cache : RegionCache or None
        The cache fetched through.
    gets : int
        GET requests made to the store so far (one per run of adjacent regions).
    """

    def __init__(self, store: ObjectStore | None, manifest: PitMap, *, workers: int = 16,
                 region_cache: RegionCache | None = None, keep_landed: int | None = None) -> None:
        self.store = store
        self.manifest = manifest
        self.region_cache = region_cache
        self.gets = 0
        self._workers = max(1, workers)
        self._zero_sums: dict[int, bytes] = {}
        self._lock = threading.RLock()  # a fetch already done runs its callback in the submitter
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[int, Future[dict[int, bytes | memoryview | BaseException]]] = {}
        self._landed: OrderedDict[int, bytes | memoryview] = OrderedDict()  # prefetched, no region cache to keep them
        self._keep_landed = LANDED_PER_WORKER * self._workers if keep_landed is None else keep_landed
        self._closed = False
        #: Packs read from a repacked generation: the key, and where it holds each (region, seq).
        self._moved: dict[int, tuple[str, dict[tuple[int, int], tuple[int, int]]]] = {}

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
        """The checksum of region ``r`` in this snapshot, from the map.

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

    def _zero_version(self, r: int, seq: int, pack: int, csum: bytes) -> bool:
        # seq 0: never replicated; pack 0 or the checksum of zeros: an all-zero version (listed in
        # its pack with length 0, or recorded without one)
        return seq == 0 or pack == 0 or csum == self._zero_sum(self._region_len(r))

    def is_zero(self, r: int) -> bool:
        """Whether region ``r``'s version is all zeros (served without a request)."""
        seq, pack, _off, _len, csum = self.manifest.record(r)
        return self._zero_version(r, seq, pack, csum)

    def cached(self, r: int) -> bool:
        """Whether region ``r`` can be served without the store (all zeros, or in the region cache)."""
        seq, pack, _off, _len, csum = self.manifest.record(r)
        if self._zero_version(r, seq, pack, csum):
            return True
        return self.region_cache is not None and (r, seq) in self.region_cache

    # -- fetching --------------------------------------------------------------------------------
    def _local(self, r: int, rec: tuple[int, int, int, int, bytes], keep: bool) -> bytes | memoryview | None:
        """Region ``r``'s bytes if they need no request (all zeros, or in the cache)."""
        seq, pack, _off, _len, csum = rec
        if self._landed:
            with self._lock:
                landed = self._landed.pop(r, None)
            if landed is not None:
                return landed
        cache = self.region_cache if keep else None
        rlen = self._region_len(r)
        if self._zero_version(r, seq, pack, csum):
            # Never replicated, or all zeros: such versions are recorded but not stored.
            if cache is not None:
                cache.note_zero(r, seq)
            return bytes(rlen)
        if cache is not None:
            return cache.get(r, seq, csum, rlen)
        return None

    def _fetch_run(self, run: list[tuple[int, tuple[int, int, int, int, bytes]]], keep: bool
                   ) -> dict[int, bytes | memoryview | BaseException]:
        """Fetch regions adjacent in one pack with one ranged GET; verify and cache each. A region's
        bytes are a view into the run's buffer (no copy): the buffer lives while any of its views
        is kept. A pack a collapse repacked (the original gone, a generation of it there) is read
        where its generation holds each version."""
        if self.store is None:
            err = SecondaryUnavailableError(f"regions {run[0][0]}..{run[-1][0]}: no secondary attached to "
                                            "fetch them from")
            return {r: err for r, _rec in run}
        pack = run[0][1][1]
        try:
            got = self._read_run(pack, run)
        except Exception as exc:  # noqa: BLE001 - reported per region
            return {r: exc for r, _rec in run}
        out: dict[int, bytes | memoryview | BaseException] = {}
        cache = self.region_cache if keep else None
        for r, (seq, _pack, _off, _length, csum) in run:
            data = got[r]
            # The digest when the map has one (it was computed from the same bytes as the checksum,
            # and unlike it resists a collision made on purpose); else the checksum.
            digest = self.manifest.digest(r)
            if len(data) != self._region_len(r) or (
                    version_digest(data) != digest if digest != NO_DIGEST else bytes(core.checksum(data)) != csum):
                out[r] = CorruptionError(
                    f"{getattr(self.store, 'location', self.store)}: region {r} version {seq:016x} in pack "
                    f"{pack:016x} does not match the map's checksum and digest (tampered or truncated object)")
                continue
            if cache is not None:
                cache.put(r, seq, csum, data)
            out[r] = data
        return out

    def _get(self, key: str, start: int, length: int) -> bytes:
        assert self.store is not None
        try:
            return self.store.get(key, start, length)
        finally:
            with self._lock:
                self.gets += 1

    def _read_run(self, pack: int, run: list[tuple[int, tuple[int, int, int, int, bytes]]]
                  ) -> dict[int, bytes | memoryview]:
        """The bytes of each region of ``run`` (unverified), from the pack or its newest generation."""
        vid = self.manifest.volume_id
        for attempt in range(3):
            moved = self._moved.get(pack)
            try:
                if moved is None:
                    start = run[0][1][2]
                    raw = self._get(pack_key(vid, pack), start, run[-1][1][2] + run[-1][1][3] - start)
                    if len(run) == 1:
                        return {run[0][0]: raw}
                    view = memoryview(raw)
                    return {r: view[off - start : off - start + length] for r, (_s, _p, off, length, _c) in run}
                return self._read_moved(pack, moved, run)
            except ObjectNotFoundError:
                if attempt == 2 or not self._resolve(pack):
                    raise
        raise AssertionError("unreachable")

    def _resolve(self, pack: int) -> bool:
        """Look up where pack ``pack`` is now: the original, or its newest repacked generation
        (:func:`~overlaycache.remote.layout.pack_key`). False: neither is there."""
        from overlaycache.remote.listing import read_pack_index  # noqa: PLC0415 - see the imports above

        assert self.store is not None
        vid = self.manifest.volume_id
        gens = []
        original = False
        for key in self.store.list(pack_generations_prefix(vid, pack)):
            try:
                kvid, kpack, gen = parse_pack_key_generation(key)
            except ValueError:
                continue
            if kvid == vid and kpack == pack:
                original |= gen == 0
                if gen:
                    gens.append((gen, key))
        if original:
            with self._lock:
                self._moved.pop(pack, None)
            return True
        if not gens:
            return False
        key = max(gens)[1]
        try:
            index = read_pack_index(self.store, key)
        except ObjectNotFoundError:
            return True  # repacked once more meanwhile: look again
        if index.volume_id != vid or index.pack != pack:
            raise CorruptionError(f"{self.store.location}/{key}: pack {index.pack:016x} of volume "
                                  f"{index.volume_id!r}, not of this key")
        with self._lock:
            self._moved[pack] = (key, {(e.region, e.seq): (e.offset, e.length) for e in index.entries})
        return True

    def _read_moved(self, pack: int, moved: tuple[str, dict[tuple[int, int], tuple[int, int]]],
                    run: list[tuple[int, tuple[int, int, int, int, bytes]]]) -> dict[int, bytes | memoryview]:
        """``run``'s bytes from a repacked generation: one GET per stretch adjacent there."""
        key, where = moved
        places = []
        for r, (seq, _p, _off, length, _c) in run:
            place = where.get((r, seq))
            if place is None or place[1] != length:
                assert self.store is not None
                raise CorruptionError(f"{self.store.location}/{key}: region {r} version {seq:016x} of pack "
                                      f"{pack:016x} is not in its repacked generation (dropped by a collapse?)")
            places.append((r, place[0], length))
        out: dict[int, bytes | memoryview] = {}
        i = 0
        while i < len(places):
            j = i + 1
            while j < len(places) and places[j][1] == places[j - 1][1] + places[j - 1][2]:
                j += 1
            start = places[i][1]
            view = memoryview(self._get(key, start, places[j - 1][1] + places[j - 1][2] - start))
            for r, off, length in places[i:j]:
                out[r] = view[off - start : off - start + length]
            i = j
        return out

    def _runs(self, wanted: list[tuple[int, tuple[int, int, int, int, bytes]]]
              ) -> list[list[tuple[int, tuple[int, int, int, int, bytes]]]]:
        """``wanted`` grouped into runs of regions whose bytes are adjacent in one pack."""
        runs: list[list[tuple[int, tuple[int, int, int, int, bytes]]]] = []
        for item in sorted(wanted, key=lambda it: (it[1][1], it[1][2])):
            _r, (_s, pack, off, _l, _c) = item
            if runs:
                last = runs[-1]
                _lr, (_ls, lpack, loff, llen, _lc) = last[-1]
                first_off = last[0][1][2]
                if lpack == pack and loff + llen == off and off + item[1][3] - first_off <= MAX_RUN_BYTES:
                    last.append(item)
                    continue
            runs.append([item])
        # In the order of their first region: a sequential reader needs the first run first.
        runs.sort(key=lambda run: min(r for r, _rec in run))
        return runs

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
            The stored bytes do not match the map's checksum.
        SecondaryUnavailableError
            No store is attached, or it cannot be reached.
        StoreError
            The store failed otherwise.
        """
        rec = self.manifest.record(r)
        hit = self._local(r, rec, keep)
        if hit is not None:
            return hit if isinstance(hit, bytes) else bytes(hit)
        got = self._fetch_run([(r, rec)], keep)[r]
        if isinstance(got, BaseException):
            raise got
        return got if isinstance(got, bytes) else bytes(got)

    def _submit_runs(self, wanted: list[tuple[int, tuple[int, int, int, int, bytes]]]) -> None:
        """Start fetching ``wanted`` (not under way) in the pool, one task per run; under ``_lock``.

        A run has one future, shared by its regions: its result maps each region to its bytes or
        its error, so a reader waits once per run, not once per region.
        """
        if self._closed:
            raise self._closed_error()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="overlaycache-fetch")
        for run in self._runs(wanted):
            fut: Future[dict[int, bytes | memoryview | BaseException]] = Future()
            regions = [r for r, _rec in run]
            for r in regions:
                self._inflight[r] = fut
            fut.add_done_callback(functools.partial(self._done, regions))
            self._pool.submit(self._run_task, run, fut)

    def _run_task(self, run: list[tuple[int, tuple[int, int, int, int, bytes]]],
                  fut: Future[dict[int, bytes | memoryview | BaseException]]) -> None:
        try:
            got = self._fetch_run(run, True)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiters
            got = {r: exc for r, _rec in run}
        if self.region_cache is None:  # keep what came until a fetch takes it
            with self._lock:
                for r, value in got.items():
                    if not isinstance(value, BaseException):
                        self._landed[r] = value
                while len(self._landed) > self._keep_landed:
                    self._landed.popitem(last=False)
        try:
            fut.set_result(got)
        except InvalidStateError:
            pass  # the source was closed meanwhile

    def _done(self, regions: list[int], fut: Future[dict[int, bytes | memoryview | BaseException]]) -> None:
        with self._lock:
            for r in regions:
                if self._inflight.get(r) is fut:
                    del self._inflight[r]

    def fetch_many(self, regions: Sequence[int]) -> tuple[dict[int, bytes | memoryview], dict[int, BaseException]]:
        """Fetch ``regions`` through the region cache, adjacent ones in one ranged GET, runs in
        parallel.

        Parameters
        ----------
        regions : sequence of int
            The regions.

        Returns
        -------
        got : dict of int to bytes or memoryview
            The bytes of each region fetched (a view into the buffer of the GET that brought it,
            read-only; copy what is kept long).
        errors : dict of int to BaseException
            Per region that could not be fetched, the error (as :meth:`fetch` raises it).

        Raises
        ------
        VolumeClosedError
            The source is closed.
        """
        if self._closed:
            raise self._closed_error()
        got: dict[int, bytes | memoryview] = {}
        errors: dict[int, BaseException] = {}
        wanted = []
        under_way = []  # regions a prefetch was fetching at the first look
        for r in regions:
            rec = self.manifest.record(r)
            if r in self._inflight:
                under_way.append((r, rec))
            else:
                hit = self._local(r, rec, True)  # landed, all zeros, or in the region cache
                if hit is None:
                    wanted.append((r, rec))
                else:
                    got[r] = hit
        if under_way:
            # A prefetch that finished since the first look left its bytes landed or cached; looked
            # up outside the lock (the cache may take the stack's lock to drop a damaged slot).
            with self._lock:
                finished = [(r, rec) for r, rec in under_way if r not in self._inflight]
            for r, rec in finished:
                hit = self._local(r, rec, True)
                if hit is not None:
                    got[r] = hit
            wanted += [(r, rec) for r, rec in under_way if r not in got]
        if not wanted:
            return got, errors
        was_under_way = {r for r, _rec in under_way}
        with self._lock:
            ahead = {r for r, _rec in wanted if r in self._inflight}  # prefetches under way
            # Under way at the first look, done since: landed or cached, taken below (``fetch``),
            # never fetched again.
            late = {r for r, _rec in wanted if r not in ahead and r in was_under_way}
            new = [(r, rec) for r, rec in wanted if r not in ahead and r not in late]
            runs = self._runs(new)
            inline = runs[0] if len(runs) == 1 and not ahead and not late else None
            if inline is None and new:
                self._submit_runs(new)
            futures = {r: self._inflight[r] for r, _rec in wanted if r in self._inflight}
        if inline is not None:  # one run, nothing under way: fetch it in this thread
            for r, value in self._fetch_run(inline, True).items():
                if isinstance(value, BaseException):
                    errors[r] = value
                else:
                    got[r] = value
            return got, errors
        results: dict[int, dict[int, bytes | memoryview | BaseException] | BaseException] = {}
        for r, _rec in wanted:
            fut = futures.get(r)
            try:
                if fut is None:  # finished between the two looks: read it again
                    got[r] = self.fetch(r)
                    continue
                result = results.get(id(fut))
                if result is None:
                    try:
                        result = fut.result()
                    except BaseException as exc:  # noqa: BLE001 - the source was closed
                        result = exc
                    results[id(fut)] = result
                value = result if isinstance(result, BaseException) else result[r]
                if isinstance(value, BaseException):
                    raise value
                got[r] = value
                if self._landed:
                    with self._lock:
                        self._landed.pop(r, None)
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
        """Start fetching ``regions`` into the region cache in the background, adjacent ones in
        one ranged GET.

        Parameters
        ----------
        regions : iterable of int
            The regions, in the order to start them.
        limit : int, optional
            Regions kept in flight at most (default: 64 per worker). Without a region cache, what a
            prefetch brings is kept in memory (at most ``keep_landed`` regions) until a fetch
            takes it.

        Returns
        -------
        int
            How many of the first of ``regions`` were started or are under way already.
        """
        limit = 64 * self._workers if limit is None else limit
        seen = 0
        with self._lock:
            if self._closed:
                return 0
            room = limit - len(self._inflight)
            wanted = []
            for r in regions:
                if room <= 0:
                    break
                seen += 1
                if r in self._inflight or r in self._landed:
                    continue
                rec = self.manifest.record(r)
                seq, pack, _off, _len, csum = rec
                if self._zero_version(r, seq, pack, csum) or (
                        self.region_cache is not None and (r, seq) in self.region_cache):
                    continue
                wanted.append((r, rec))
                room -= 1
            if wanted:
                self._submit_runs(wanted)
        return seen

    def close(self) -> None:
        """Cancel the fetches not started and wait for those running (idempotent)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            waiting = list(self._inflight.values())
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for fut in waiting:  # runs cancelled before they started: their waiters must not hang
            if not fut.done():
                try:
                    fut.set_exception(self._closed_error())
                except InvalidStateError:
                    pass
        with self._lock:
            self._landed.clear()
