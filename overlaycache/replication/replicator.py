"""The replicator: ships a volume's changed regions to the secondary and publishes PIT snapshots.

Contract
--------
* Every region version goes to the store once, with a new ``seq``, inside a *pack*: one immutable
  object of many region versions (:func:`~overlaycache.remote.layout.encode_pack`, conditional PUT
  under a new pack number), never overwritten. Packs fill up to ``pack_size`` bytes; the
  background shipper waits up to ``pack_delay`` seconds for a pack to fill (the bound on the
  recovery point of async mode), sync mode ships each write's regions as one small pack. A region
  whose bytes are all zero is listed in its pack and recorded, its bytes not stored.
* The *replication map* holds the regions changed locally and not yet stored. It is written to
  ``replication.map`` and fsynced before the data it covers is committed (write-intent ordering, as
  Linux md's bitmap), so a crash can make us ship a region twice, never skip it. A bit is cleared
  on disk only once the region's version is recorded in ``remote.map`` and that file is synced.
* ``remote.map`` records, per region, the newest version on the store (seq, checksum). A region
  rewritten while it is shipped is shipped again; a slower, older shipment never replaces the
  record of a newer one (records only move to a higher seq).
* Seqs are reserved in blocks, durably, before use: after a crash no seq is handed out twice.
* A PIT snapshot is published only when nothing is pending or in flight while writers are held
  off, so its map is one consistent, crash-consistent image. Publishing stores the map pages of
  the leaves whose records changed since the last PIT and the nodes above them (content-addressed,
  shared with earlier PITs), then the root: ``O(changed)`` objects and bytes, whatever the
  volume's size. Pages are also kept in the volume's ``pit-pages/`` mirror, so the PIT of a
  distributed overlay can be read while the secondary is unreachable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from overlaycache._impl import core
from overlaycache.errors import (
    CorruptionError,
    FormatError,
    InvalidArgumentError,
    ObjectExistsError,
    RegionUnavailableError,
    SecondaryUnavailableError,
    StoreError,
)
from overlaycache.local.geometry import region_ranges
from overlaycache.local.layers import zero_checksum
from overlaycache.local.meta import SecondaryRecord
from overlaycache.store.base import ObjectStore
from overlaycache.local.regions import ReplicationHost
from overlaycache.remote.catalog import Catalog
from overlaycache.replication.maps import CHANGE_MAP, ChangeMap, ChangeSet, RemoteMap, map_salt, open_change_map
from overlaycache.replication.modes import Mode, mode_for
from overlaycache.remote.layout import (
    PackEntry,
    check_volume_format,
    encode_pack,
    encode_root,
    encode_volume_record,
    is_pack_key,
    is_root_key,
    pack_key,
    packs_prefix,
    parse_pack_key,
    page_key,
    parse_root_key,
    root_digest,
    root_key,
    roots_prefix,
    snapshot_id,
    verify_root_digest,
    volume_key,
)
from overlaycache.remote.tree import PageSource
from overlaycache.snapshots import Snapshot

_log = logging.getLogger(__name__)

SYNC_POLICIES = ("degrade", "fail")
_SEQ_BLOCK = 1 << 16
#: Default target size of a pack, and the bounds of ``pack_size``.
PACK_SIZE = 8 << 20
PACK_SIZE_MIN = 1 << 20
PACK_SIZE_MAX = 64 << 20
#: Default seconds the background shipper waits for a pack to fill.
PACK_DELAY = 1.0
#: The directory (in the volume's) mirroring the newest PIT tree's pages.
MIRROR = "pit-pages"
#: While this file is in the volume's directory (a distributed overlay's PIT root), no mirror page
#: is dropped: that PIT's map is read from the mirror.
PINNED_ROOT = "distributed-overlay.root"


@dataclass(frozen=True)
class Lag:
    """How far the secondary is behind.

    Attributes
    ----------
    regions : int
        Regions changed locally and not yet stored on the secondary.
    bytes : int
        Their size in bytes.
    oldest_age : float
        Seconds since the oldest of those changes (an upper bound); 0 when nothing is behind.
    """

    regions: int
    bytes: int
    oldest_age: float


class RecordsDamagedError(CorruptionError):
    """Records of ``remote.map`` failed their checks while a PIT was prepared; their regions are
    pending again (see :meth:`Replicator.publish_checked`)."""

    def __init__(self, message: str, regions: list[int]) -> None:
        super().__init__(message)
        self.regions = regions


class Replicator:
    """Ships a volume's changed regions to a store and publishes PIT snapshots.

    Created by :class:`Volume`; see the module docstring for the contract.
    """

    def __init__(self, vol: ReplicationHost, store: ObjectStore, mode: str, period: float | None, sync_policy: str,
                 max_lag_regions: int | None, workers: int, resync: bool, pack_size: int = PACK_SIZE,
                 pack_delay: float = PACK_DELAY, recover_seq: bool = False) -> None:
        self.policy: Mode = mode_for(mode, period)
        if sync_policy not in SYNC_POLICIES:
            raise InvalidArgumentError(f"sync_policy must be one of {SYNC_POLICIES}, got {sync_policy!r}")
        if max_lag_regions is not None and max_lag_regions < 1:
            raise InvalidArgumentError("max_lag_regions must be >= 1")
        check_pack_options(pack_size, pack_delay)
        self.pack_size = pack_size
        self.pack_delay = float(pack_delay)
        self.pack_regions = max(1, pack_size // vol.region_size)
        self.vol = vol
        self.store = store
        self.mode = self.policy.name
        self.period = period
        self.sync_policy = sync_policy
        self.max_lag_regions = max_lag_regions
        self.volume_id = vol.volume_id
        n, rs = vol.num_regions, vol.region_size
        self._zeros = (zero_checksum(rs), zero_checksum(vol.size - (n - 1) * rs), n - 1)
        self.remote = RemoteMap(os.path.join(vol.path, "remote.map"), rs, n, True, vol.volume_id)
        if recover_seq:
            try:
                self._recover_seq()
            except BaseException:
                self.remote.close()
                raise
        try:
            self.changes, self.changes_lost = open_change_map(os.path.join(vol.path, CHANGE_MAP), n,
                                                              map_salt(vol.volume_id))
        except BaseException:
            self.remote.close()
            raise
        self.set = ChangeSet(self.changes)
        self.pending = self.set.pending  # read-only here: changed through self.set
        self._committing: set[int] = set()
        self._next_seq = self.remote.reserved
        self._cv = threading.Condition(threading.Lock())
        self._read_uncommitted: set[int] = set()  # read for shipping while not committed locally
        self._dirty_since: float | None = time.monotonic() if self.set.count else None
        self._workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="oc-ship")
        self._stopping = False
        self.degraded = False
        self.last_root = b""
        self.mirror = os.path.join(vol.path, MIRROR)
        os.makedirs(self.mirror, mode=0o700, exist_ok=True)
        self.pages = PageSource(store, self.volume_id, self.mirror)
        self.shipped = 0
        self._changed_since_publish = True
        self._thread: threading.Thread | None = None
        self._registered = False
        try:
            try:
                self._register_volume()
            except SecondaryUnavailableError as exc:
                # The volume must open while its secondary is down: local and cached regions are
                # read, writes are taken. The record is written before the first region or PIT.
                _log.warning("%s: secondary unreachable (%s); the volume is registered there when it is back",
                             vol.path, exc)
            if resync:
                self.resync()
        except BaseException:
            self.close()
            raise

    # -- setup ------------------------------------------------------------------------------------
    def _recover_seq(self) -> None:
        """``remote.map`` was missing (made anew): its reserved seq must not go back below a seq
        the store has, which orders every version and PIT. The highest pack and PIT numbers on the
        store are listed (one LIST per 1,000 objects), and the regions written are compared again
        (:attr:`RemoteMap.recreated`)."""
        try:
            top = 0
            for key in self.store.list(packs_prefix(self.volume_id)):
                if is_pack_key(key):
                    top = max(top, parse_pack_key(key)[1])
            for key in self.store.list(roots_prefix(self.volume_id)):
                if is_root_key(key):
                    top = max(top, parse_root_key(key)[0])
        except SecondaryUnavailableError as exc:
            raise SecondaryUnavailableError(
                f"{self.vol.path}: remote.map is missing and the secondary cannot be reached to find the "
                f"highest sequence number it holds ({exc}); open the volume without it, or when it is back"
            ) from exc
        self.remote.reserve(max(self.remote.reserved, top + 1))
        self.remote.recreated = True
        _log.error("%s: remote.map was missing: made anew from seq %d; the regions written are compared with "
                   "the secondary", self.vol.path, self.remote.reserved)

    def _register_volume(self) -> None:
        """Record the volume's geometry on the store; refuse a store that has this volume id with
        another geometry."""
        key = volume_key(self.volume_id)
        record = encode_volume_record(self.volume_id, self.vol.size, self.vol.region_size)
        try:
            self.store.put(key, record, if_absent=True)
        except ObjectExistsError:
            found = Catalog(self.store).volume_info(self.volume_id)
            check_volume_format(found, f"{self.store.location}/{key}")
            if (found.get("size"), found.get("region_size")) != (self.vol.size, self.vol.region_size):
                raise FormatError(
                    f"{self.store.location}: volume {self.volume_id} is stored with size {found.get('size')} "
                    f"and region_size {found.get('region_size')}, not {self.vol.size}/{self.vol.region_size}",
                    key) from None
        self._registered = True

    def _ensure_registered(self) -> None:
        """Register the volume if that could not be done when it was opened."""
        if not self._registered:
            self._register_volume()

    def _zero(self, r: int) -> bytes:
        """The checksum of region ``r`` all zeros."""
        full, tail, last = self._zeros
        return tail if r == last else full

    def resync(self, fresh: bool = False) -> None:
        """Mark every region whose current checksum differs from the secondary's record.

        ``fresh``: the secondary holds nothing of the volume yet (its records were reset), so
        only the regions that may hold data are compared (:meth:`ReplicationHost.written_regions`):
        the time follows the volume's data, not its size.
        """
        remote_now = self.vol.remote_regions()  # not valid locally: nothing to compare or ship
        marked = 0
        if fresh:
            candidates: Iterable[int] = self.vol.written_regions()
            local: Callable[[int], bytes | None] = self.vol.local_checksum
        else:
            sums = self.vol.checksums()
            candidates = range(self.vol.num_regions)

            def local(r: int) -> bytes | None:
                return bytes(sums[16 * r : 16 * r + 16])

        with self._cv:
            for r in candidates:
                if r in remote_now:
                    continue
                mine = local(r)
                seq, csum = self.remote.get(r)
                remote_sum = self._zero(r) if seq == 0 else csum
                if mine is not None and mine != remote_sum:
                    self.set.add(r)
                    marked += 1
            if marked and self._dirty_since is None:
                self._dirty_since = time.monotonic()
            self._persist_map_locked()
        _log.info("%s: initial sync to %s: %d of %d regions differ", self.vol.path, self.store.location,
                  marked, self.vol.num_regions)

    def start(self) -> None:
        """Start the background shipper (async, and sync for when it degrades) or the period timer."""
        target = self._period_loop if self.policy.periodic else self._ship_loop
        self._thread = threading.Thread(target=target, name=f"oc-repl-{self.volume_id[:8]}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (it may be inside ``vol.snapshot()``: call without locks)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._pool.shutdown(wait=True)
        with self._cv:
            self._persist_map_locked()
        self.remote.close()
        self.changes.close()

    # -- the replication map ------------------------------------------------------------------------
    def note_written(self, first: int, last: int) -> None:
        """Regions ``first..last`` changed (called by the writer after the data is in place)."""
        with self._cv:
            self.set.add_range(first, last + 1)
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            self._changed_since_publish = True
            self._cv.notify_all()

    def requeue(self, regions: Iterable[int]) -> None:
        """Put regions back into the pending set (durably): a step that dropped them failed."""
        with self._cv:
            for r in regions:
                self.set.add(r)
            self._persist_map_locked()
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            self._cv.notify_all()

    def _persist_map_locked(self) -> None:
        self.set.persist()

    def before_commit(self) -> None:
        """Make the write intents durable before the data they cover is committed (the caller
        holds the volume's writer lock, and calls :meth:`after_commit` once the commit is done)."""
        with self._cv:
            self._persist_map_locked()
            self._committing = set(self.set.unconfirmed)

    def after_commit(self) -> None:
        """The local commit that followed :meth:`before_commit` is durable: the versions shipped
        before it began are durable locally too (written to the durable map lazily)."""
        with self._cv:
            self.set.confirm(self._committing)
            self._committing = set()

    def throttle(self, timeout: float = 30.0) -> None:
        """Back-pressure: wait while the lag exceeds ``max_lag_regions`` (not while degraded)."""
        if self.max_lag_regions is None or not self.policy.throttles:
            return
        deadline = time.monotonic() + timeout
        with self._cv:
            while (not self.degraded and not self._stopping
                   and self.set.lag() > self.max_lag_regions):
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning("%s: replication lag above %d regions for %.0fs; continuing",
                                 self.vol.path, self.max_lag_regions, timeout)
                    return
                self._cv.wait(min(left, 0.5))

    def lag(self) -> Lag:
        with self._cv:
            regions = self.set.lag()
            age = 0.0 if not regions or self._dirty_since is None else time.monotonic() - self._dirty_since
        return Lag(regions, regions * self.vol.region_size, age)

    # -- shipping ----------------------------------------------------------------------------------
    def _alloc_seq_locked(self) -> int:
        if self._next_seq >= self.remote.reserved:
            self.remote.reserve(self._next_seq + _SEQ_BLOCK)
        seq: int = self._next_seq
        self._next_seq += 1
        return seq

    def _claim(self, regions: list[int] | None, limit: int) -> list[tuple[int, int]]:
        """Take pending regions (all of ``regions`` that are pending, or up to ``limit``)."""
        claimed = []
        with self._cv:
            if regions is None:
                regions = []
                for a, b in self.pending.runs():
                    regions.extend(range(a, min(b, a + limit - len(regions))))
                    if len(regions) >= limit:
                        break
            for r in regions:
                if self.set.take(r):
                    claimed.append((r, self._alloc_seq_locked()))
            # Durable before anything of them is read or stored: a crash from now on finds them
            # in the map (a version shipped may be one that a crash takes back locally).
            self._persist_map_locked()
        return claimed

    def _read_versions(self, chunk: list[tuple[int, int]]
                       ) -> tuple[list[tuple[int, int, memoryview, bytes]], list[tuple[int, int, bytes]],
                                  list[tuple[int, RegionUnavailableError]]]:
        """Read the claimed regions (consecutive ones in one read): versions to store, all-zero
        versions, and unreadable regions."""
        stored: list[tuple[int, int, memoryview, bytes]] = []
        zeros: list[tuple[int, int, bytes]] = []
        unreadable: list[tuple[int, RegionUnavailableError]] = []
        rs = self.vol.region_size
        i = 0
        while i < len(chunk):
            j = i + 1  # a run of consecutive regions is read at once
            while j < len(chunk) and chunk[j][0] == chunk[j - 1][0] + 1:
                j += 1
            run = chunk[i:j]
            try:
                whole = memoryview(self.vol.read_run(run[0][0], len(run)))
                datas = [whole[k * rs : (k + 1) * rs] for k in range(len(run))]
            except RegionUnavailableError:
                datas = []  # one of them failed: read them one by one to know which
                for r, _seq in run:
                    try:
                        datas.append(memoryview(self.vol.read_region(r)))
                    except RegionUnavailableError as exc:
                        unreadable.append((r, exc))
                        datas.append(memoryview(b""))
            # Checked after the read: a version read while uncommitted is either still so, or was
            # committed since (durable), or was overwritten since (and is pending again).
            dirty = [r for r, _seq in run if self.vol.is_uncommitted(r)]
            if dirty:
                with self._cv:
                    self._read_uncommitted.update(dirty)
            bad = {r for r, _exc in unreadable}
            for (r, seq), data in zip(run, datas):
                if r in bad:
                    continue
                csum = bytes(core.checksum(data))
                if csum == self._zero(r):
                    zeros.append((r, seq, csum))
                else:
                    stored.append((r, seq, data, csum))
            i = j
        return stored, zeros, unreadable

    def _ship_pack(self, chunk: list[tuple[int, int]]) -> list[tuple[int, RegionUnavailableError]]:
        """Read ``chunk`` (claimed ``(region, seq)``), store its versions as one pack, record them.

        Returns the regions that could not be read (not recorded). Raises when the pack cannot be
        stored (nothing of the chunk is recorded then).
        """
        stored, zeros, unreadable = self._read_versions(chunk)
        entries: list[PackEntry] = []
        pack = 0
        # All-zero versions are listed in the pack (length 0), so that the maps can be rebuilt from
        # the packs alone; their bytes are not stored.
        versions: list[tuple[int, int, bytes | memoryview, bytes]] = [*stored]
        versions += [(r, seq, b"", csum) for r, seq, csum in zeros]
        if versions:
            with self._cv:
                pack = self._alloc_seq_locked()
            for _attempt in range(3):
                raw, entries = encode_pack(self.volume_id, self.vol.region_size, pack, time.time(), versions)
                try:
                    self.store.put(pack_key(self.volume_id, pack), raw, if_absent=True)
                    break
                except ObjectExistsError:
                    # Only after a lost seq reservation; take a fresh number rather than overwrite.
                    _log.warning("%s: pack %016x already stored; using a new number", self.vol.path, pack)
                    with self._cv:
                        pack = self._alloc_seq_locked()
            else:  # pragma: no cover - three collisions in a row
                raise StoreError(f"{self.store.location}: cannot find a free pack number")
            del raw
        with self._cv:
            for e in entries:
                if e.seq > self.remote.get(e.region)[0]:
                    # An all-zero version has length 0: served without a request, and its record
                    # names the pack that lists it (so that pack stays while a PIT needs it).
                    self.remote.set(e.region, e.seq, pack, e.offset, e.length, e.checksum, e.digest)
        return unreadable

    def _chunks(self, claimed: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """``claimed`` cut into packs of at most ``pack_regions`` regions (runs stay together)."""
        k = self.pack_regions
        return [claimed[i : i + k] for i in range(0, len(claimed), k)]

    def ship(self, regions: list[int] | None = None, skip_unreadable: set[int] | None = None,
             progress: Callable[[int, int], None] | None = None) -> int:
        """Ship pending regions (the given ones, or all), as packs stored in parallel; returns how
        many were shipped.

        With ``skip_unreadable`` (a set), regions that cannot be read locally are added to it and
        dropped from the pending set instead of failing the call. ``progress(done, total)`` is
        called after each pack (``total`` counts what was pending at the start, and grows if
        writes add more).

        Raises
        ------
        SecondaryUnavailableError
            The store cannot be reached; the regions stay pending.
        """
        self._ensure_registered()
        parallel = min(self._workers, 8)  # packs in flight: bounds memory to 8 packs (x2 while built)
        with self._cv:
            expected = self.set.count if regions is None else len(regions)
        total = 0
        error: BaseException | None = None
        running: dict[Future[list[tuple[int, RegionUnavailableError]]], list[tuple[int, int]]] = {}
        queued: list[list[tuple[int, int]]] = []
        exhausted = False
        while True:
            # Keep ``parallel`` packs in flight: a pack claimed as soon as one is stored (no
            # barrier between batches), none once something failed.
            while error is None and len(running) < parallel:
                if not queued and not exhausted:
                    claimed = self._claim(regions, self.pack_regions)
                    exhausted = not claimed or regions is not None  # given regions: claimed at once
                    queued = self._chunks(claimed)
                if not queued:
                    break
                chunk = queued.pop(0)
                running[self._pool.submit(self._ship_pack, chunk)] = chunk
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            failed: list[int] = []
            shipped = 0
            settled: list[list[tuple[int, int]]] = []  # chunks no longer in flight
            failures: list[RegionUnavailableError] = []  # local reads that failed
            steps: list[int] = []  # regions stored, per pack
            for fut in finished:
                chunk = running.pop(fut)
                settled.append(chunk)
                try:
                    unreadable = fut.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised once the others are done
                    failed.extend(r for r, _seq in chunk)
                    error = error or exc
                    continue
                for r, unread in unreadable:
                    failures.append(unread)
                    if skip_unreadable is None:
                        failed.append(r)
                        error = error or unread
                    else:
                        skip_unreadable.add(r)
                shipped += len(chunk) - len(unreadable)
                steps.append(len(chunk) - len(unreadable))
            if error is not None:  # what was claimed and not started goes back to pending
                failed.extend(r for chunk in queued for r, _seq in chunk)
                settled.extend(queued)
                queued = []
            with self._cv:
                bad = set(failed)
                for chunk in settled:
                    for r, _seq in chunk:
                        self.set.settle(r, r in bad, r in self._read_uncommitted)
                        self._read_uncommitted.discard(r)
                self.remote.sync()
                self._persist_map_locked()
                if not self.set.count and not self.set.inflight:
                    self._dirty_since = None
                self._cv.notify_all()
            for unread_exc in failures:
                self.vol.note_unreadable(unread_exc)
            self.shipped += shipped
            for n in steps:
                total += n
                if progress is not None:
                    progress(total, max(expected, total))
        if error is not None:
            raise error
        return total

    def wait_idle(self) -> None:
        """Wait until no shipment is in flight."""
        with self._cv:
            while self.set.inflight:
                self._cv.wait(0.5)

    def _ship_until_stored(self, regions: list[int]) -> None:
        """Ship ``regions`` and wait out shipments of them already in flight elsewhere (which may
        have read the region before this write), until none of them is pending or in flight."""
        while True:
            self.ship(regions)
            with self._cv:
                while any(r in self.set.inflight for r in regions):
                    self._cv.wait(0.5)
                if not any(self.pending.test(r) for r in regions):
                    return

    def ship_after_write(self, first: int, last: int) -> None:
        """Sync mode: ship the regions a write touched before it is acknowledged."""
        try:
            self._ship_until_stored(list(range(first, last + 1)))
            if self.degraded and not self.set.count:
                self.degraded = False
                _log.warning("%s: secondary %s reachable again; sync replication resumed",
                             self.vol.path, self.store.location)
        except SecondaryUnavailableError:
            if self.sync_policy == "fail":
                raise
            if not self.degraded:
                self.degraded = True
                _log.error("%s: secondary %s unreachable; sync replication degraded to async "
                           "(writes are durable locally, lag grows until it is back)",
                           self.vol.path, self.store.location)

    def _ship_loop(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self._stopping and not self._pack_due_locked():
                    self._cv.wait(self._pack_wait_locked())
                if self._stopping:
                    return
            try:
                self.vol.ship_pending()
                backoff = 0.5
                if self.degraded:
                    self.degraded = False
                    _log.warning("%s: secondary %s reachable again; lag drained", self.vol.path,
                                 self.store.location)
            except RegionUnavailableError as exc:
                # A pending region cannot be read locally: that is a detected failure.
                _log.warning("%s: regions %s cannot be read for shipping (%s); beginning the distributed "
                             "overlay", self.vol.path, list(exc.regions), exc.reason)
                try:
                    self.vol.begin_distributed_overlay()
                except StoreError as err:
                    _log.warning("%s: cannot begin the distributed overlay (%s); retrying in %.1fs",
                                 self.vol.path, err, backoff)
                    with self._cv:
                        self._cv.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
            except StoreError as exc:
                _log.warning("%s: shipping to %s failed (%s); retrying in %.1fs", self.vol.path,
                             self.store.location, exc, backoff)
                with self._cv:
                    self._cv.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:  # pragma: no cover - a bug; keep the volume alive and say so
                _log.exception("%s: replication thread error", self.vol.path)
                with self._cv:
                    self._cv.wait(backoff)

    def _pack_due_locked(self) -> bool:
        """Whether the background shipper should ship now: a full pack is pending, or the oldest
        pending change waited ``pack_delay``."""
        if not self.set.count or not self.policy.ships_in_background(self.degraded):
            return False
        if self.set.count >= self.pack_regions:
            return True
        return self._dirty_since is None or time.monotonic() - self._dirty_since >= self.pack_delay

    def _pack_wait_locked(self) -> float:
        if self.set.count and self._dirty_since is not None:
            return max(0.01, min(1.0, self.pack_delay - (time.monotonic() - self._dirty_since)))
        return 1.0

    def _period_loop(self) -> None:
        assert self.period is not None
        while True:
            with self._cv:
                deadline = time.monotonic() + self.period
                while not self._stopping and time.monotonic() < deadline:
                    self._cv.wait(deadline - time.monotonic())
                if self._stopping:
                    return
                if not self._changed_since_publish:
                    continue  # nothing written since the last PIT
            try:
                self.vol.snapshot()
            except StoreError as exc:
                _log.warning("%s: periodic snapshot failed (%s); next try in %.0fs", self.vol.path, exc, self.period)
            except Exception:  # pragma: no cover
                _log.exception("%s: periodic snapshot error", self.vol.path)

    # -- snapshots ---------------------------------------------------------------------------------
    def publish(self, label: str | None) -> Snapshot:
        """Publish a PIT of the current records; the caller has drained and holds off writers.

        The pages of the leaves changed since the last PIT (and of the nodes above them) are
        stored first, in parallel and content-addressed (a page already there is the same page),
        then the root. Only once the root is stored does the local tree move on; a failure
        leaves it as it was, and the next publish stores the same pages again.
        """
        self._ensure_registered()
        with self._cv:
            if self.set.count or self.set.inflight:
                raise StoreError("internal: publish with regions pending")  # pragma: no cover
            self.remote.sync()
            pages, top, leaves = self.remote.tree.prepare(self.remote.leaf_body)
            if self.remote.damaged:
                # Records that fail their checks: never a PIT built from them. Their regions go
                # back to pending; the caller ships them (rewriting the records) and publishes.
                damaged = sorted(self.remote.damaged)
                for r in damaged:
                    self.set.add(r)
                self._persist_map_locked()
                raise RecordsDamagedError(f"{self.remote.path}: records of regions {region_ranges(damaged)} "
                                          "failed their checks; shipping them again", damaged)
            seq = self._alloc_seq_locked()
            self._changed_since_publish = False
        try:
            futures = [self._pool.submit(self._put_page, addr, raw) for _l, _i, addr, raw in pages]
            for fut in futures:
                fut.result()
            snap = Snapshot(snapshot_id(seq), seq, time.time(), label)
            raw = encode_root(self.volume_id, self.vol.size, self.vol.region_size, seq, snap.created_at, label, top)
            key = root_key(self.volume_id, seq, root_digest(raw))
            try:
                self.store.put(key, raw, if_absent=True)
            except ObjectExistsError:
                # Its key names its digest: this very root, stored by a try whose answer was lost
                # (an overwrite with other bytes would fail this check, and every reader's).
                verify_root_digest(self.store.get(key), key, f"{self.store.location}/{key}")
        except BaseException:
            with self._cv:
                self.remote.tree.abandon()
                self._changed_since_publish = True
            raise
        with self._cv:
            replaced = self.remote.tree.commit(leaves)
        if not os.path.exists(os.path.join(self.vol.path, PINNED_ROOT)):
            for addr in replaced:
                self.pages.drop(addr)
        self.last_root = raw
        _log.info("%s: snapshot %s (%s) published to %s: %d map pages", self.vol.path, snap.id, label,
                  self.store.location, len(pages))
        return snap

    def publish_checked(self, label: str | None, ship: Callable[[], object]) -> Snapshot:
        """:meth:`publish`; if records of ``remote.map`` fail their checks, ``ship()`` the regions
        (pending again, which rewrites their records) and publish once more."""
        try:
            return self.publish(label)
        except RecordsDamagedError:
            ship()
            return self.publish(label)

    def _put_page(self, address: bytes, raw: bytes) -> None:
        try:
            self.store.put(page_key(self.volume_id, address), raw, if_absent=True)
        except ObjectExistsError:
            pass  # content-addressed: the same page, stored by an earlier attempt or PIT
        self.pages.keep(address, raw)

    def sweep_mirror(self) -> int:
        """Drop the mirror's pages that are not in the newest tree (after a distributed overlay
        ended, whose PIT pinned them); returns how many."""
        with self._cv:
            keep = {a.hex() for a in self.remote.tree.all_addresses()}
        dropped = 0
        for name in os.listdir(self.mirror):
            if name not in keep:
                try:
                    os.unlink(os.path.join(self.mirror, name))
                    dropped += 1
                except OSError:
                    pass
        return dropped


def check_pack_options(pack_size: int, pack_delay: float) -> None:
    """Refuse a pack size outside 1 to 64 MiB, or a negative or non-finite pack delay."""
    if type(pack_size) is not int or not PACK_SIZE_MIN <= pack_size <= PACK_SIZE_MAX:
        raise InvalidArgumentError(f"pack_size must be an int from {PACK_SIZE_MIN} to {PACK_SIZE_MAX} bytes, "
                                   f"got {pack_size!r}")
    if isinstance(pack_delay, bool) or not isinstance(pack_delay, (int, float)) or not 0 <= pack_delay <= 3600:
        raise InvalidArgumentError(f"pack_delay must be seconds from 0 to 3600, got {pack_delay!r}")


def store_location(store: ObjectStore) -> str:
    """Where ``store`` is, as the volume's metadata records it (no credentials)."""
    return str(getattr(store, "location", repr(store)))


def attach(host: ReplicationHost, store: ObjectStore, known: SecondaryRecord | None, mode: str | None,
           period: float | None, sync_policy: str, max_lag_regions: int | None,
           workers: int, pack_size: int = PACK_SIZE, pack_delay: float = PACK_DELAY
           ) -> tuple[Replicator, SecondaryRecord]:
    """A replicator of ``host`` to ``store``, its records checked, not started yet; and the record
    of the secondary to keep in the volume's metadata.

    Without ``mode`` (and ``period``) the volume resumes what ``known``, the record of the
    secondary it was last attached to, says. The secondary's records are compared with the
    volume's checksums (and what differs marked pending) when it is a new or another secondary, or
    when changes went untracked while detached. A volume that was not closed cleanly needs no
    comparison: the durable replication map holds every region that may differ (changed and not
    shipped, or shipped from a version a crash may have taken back, see :class:`ChangeSet`).
    """
    location = store_location(store)
    mode = mode or (known.mode if known is not None else None) or "async"
    if period is None and known is not None:
        period = known.period
    resync = known is None or known.location != location or known.resync
    recover_seq = (known is not None and known.location == location
                   and not os.path.exists(os.path.join(host.path, "remote.map")))
    if not resync and not os.path.exists(os.path.join(host.path, CHANGE_MAP)):
        _log.error("%s: %s is missing: every region is compared with the secondary", host.path, CHANGE_MAP)
        resync = True
    repl = Replicator(host, store, mode, period, sync_policy, max_lag_regions, workers, resync=False,
                      pack_size=pack_size, pack_delay=pack_delay, recover_seq=recover_seq)
    try:
        fresh = known is None or known.location != location or repl.remote.recreated
        if known is not None and known.location != location:
            repl.remote.reset()
        if resync or repl.remote.recreated or repl.changes_lost:
            repl.resync(fresh=fresh and not repl.remote.has_records())
    except BaseException:
        repl.close()
        raise
    return repl, SecondaryRecord(location, mode, period, clean=False)
