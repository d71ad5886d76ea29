"""The replicator: ships a volume's changed regions to the secondary and publishes PIT snapshots.

Contract
--------
* Every region version goes to the store once, under a new key with a new ``seq``
  (:func:`~overlaycache.remote.layout.region_key`, conditional PUT), never overwritten. A region
  whose bytes are all zero is recorded but not stored.
* The *replication map* holds the regions changed locally and not yet stored. It is written to
  ``replication.map`` and fsynced before the data it covers is committed (write-intent ordering, as
  Linux md's bitmap), so a crash can make us ship a region twice, never skip it. A bit is cleared
  on disk only once the region's version is recorded in ``remote.map`` and that file is synced.
* ``remote.map`` records, per region, the newest version on the store (seq, checksum). A region
  rewritten while it is shipped is shipped again; a slower, older shipment never replaces the
  record of a newer one (records only move to a higher seq).
* Seqs are reserved in blocks, durably, before use: after a crash no seq is handed out twice.
* A PIT snapshot is published only when nothing is pending or in flight while writers are held
  off, so its manifest is one consistent, crash-consistent image.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from overlaycache._impl import core
from overlaycache.errors import (
    FormatError,
    InvalidArgumentError,
    ObjectExistsError,
    RegionUnavailableError,
    SecondaryUnavailableError,
    StoreError,
)
from overlaycache.local.layers import zero_checksums
from overlaycache.local.meta import SecondaryRecord
from overlaycache.store.base import ObjectStore
from overlaycache.local.regions import ReplicationHost
from overlaycache.remote.catalog import Catalog
from overlaycache.replication.maps import ChangeMap, RemoteMap
from overlaycache.replication.modes import Mode, mode_for
from overlaycache.remote.layout import encode_volume_record, manifest_key, region_key, snapshot_id, volume_key
from overlaycache.remote.manifest import encode_manifest
from overlaycache.snapshots import Snapshot

_log = logging.getLogger(__name__)

SYNC_POLICIES = ("degrade", "fail")
_SEQ_BLOCK = 1 << 16
_BATCH = 256


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


class Replicator:
    """Ships a volume's changed regions to a store and publishes PIT snapshots.

    Created by :class:`Volume`; see the module docstring for the contract.
    """

    def __init__(self, vol: ReplicationHost, store: ObjectStore, mode: str, period: float | None, sync_policy: str,
                 max_lag_regions: int | None, workers: int, resync: bool) -> None:
        self.policy: Mode = mode_for(mode, period)
        if sync_policy not in SYNC_POLICIES:
            raise InvalidArgumentError(f"sync_policy must be one of {SYNC_POLICIES}, got {sync_policy!r}")
        if max_lag_regions is not None and max_lag_regions < 1:
            raise InvalidArgumentError("max_lag_regions must be >= 1")
        self.vol = vol
        self.store = store
        self.mode = self.policy.name
        self.period = period
        self.sync_policy = sync_policy
        self.max_lag_regions = max_lag_regions
        self.volume_id = vol.volume_id
        n, rs = vol.num_regions, vol.region_size
        self._zero = zero_checksums(vol.size, rs)
        self.remote = RemoteMap(os.path.join(vol.path, "remote.map"), rs, n, True)
        try:
            self.changes = ChangeMap(os.path.join(vol.path, "replication.map"), n, True)
        except BaseException:
            self.remote.close()
            raise
        self.pending = core.Bitmap(n)
        self.pending.load(self.changes.initial)
        self.inflight = core.Bitmap(n)
        self._next_seq = self.remote.reserved
        self._cv = threading.Condition(threading.Lock())
        self._map_dirty = False
        self._dirty_since: float | None = time.monotonic() if self.pending.any() else None
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="oc-ship")
        self._stopping = False
        self.degraded = False
        self.last_manifest = b""
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
    def _register_volume(self) -> None:
        """Record the volume's geometry on the store; refuse a store that has this volume id with
        another geometry."""
        key = volume_key(self.volume_id)
        record = encode_volume_record(self.volume_id, self.vol.size, self.vol.region_size)
        try:
            self.store.put(key, record, if_absent=True)
        except ObjectExistsError:
            found = Catalog(self.store).volume_info(self.volume_id)
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

    def resync(self) -> None:
        """Mark every region whose current checksum differs from the secondary's record."""
        sums = self.vol.checksums()
        remote_now = self.vol.remote_regions()  # not valid locally: nothing to compare or ship
        marked = 0
        with self._cv:
            for r in range(self.vol.num_regions):
                if r in remote_now:
                    continue
                seq, csum = self.remote.get(r)
                remote_sum = bytes(self._zero[16 * r : 16 * r + 16]) if seq == 0 else csum
                if sums[16 * r : 16 * r + 16] != remote_sum:
                    self.pending.set(r)
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
            if self.pending.count(first, last + 1) != last + 1 - first:
                self._map_dirty = True
                self.pending.set_range(first, last + 1)
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            self._changed_since_publish = True
            self._cv.notify_all()

    def requeue(self, regions: Iterable[int]) -> None:
        """Put regions back into the pending set (durably): a step that dropped them failed."""
        with self._cv:
            for r in regions:
                self.pending.set(r)
            self._persist_map_locked()
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            self._cv.notify_all()

    def _persist_map_locked(self) -> None:
        a = int.from_bytes(self.pending.to_bytes(), "little")
        b = int.from_bytes(self.inflight.to_bytes(), "little")
        self.changes.store((a | b).to_bytes(self.changes.nbytes, "little"))
        self._map_dirty = False

    def before_commit(self) -> None:
        """Make the write intents durable before the data they cover is committed."""
        with self._cv:
            if self._map_dirty:
                self._persist_map_locked()

    def throttle(self, timeout: float = 30.0) -> None:
        """Back-pressure: wait while the lag exceeds ``max_lag_regions`` (not while degraded)."""
        if self.max_lag_regions is None or not self.policy.throttles:
            return
        deadline = time.monotonic() + timeout
        with self._cv:
            while (not self.degraded and not self._stopping
                   and self.pending.count() + self.inflight.count() > self.max_lag_regions):
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning("%s: replication lag above %d regions for %.0fs; continuing",
                                 self.vol.path, self.max_lag_regions, timeout)
                    return
                self._cv.wait(min(left, 0.5))

    def lag(self) -> Lag:
        with self._cv:
            regions = self.pending.count() + self.inflight.count()
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
                if self.pending.test(r) and not self.inflight.test(r):
                    self.pending.clear(r)
                    self.inflight.set(r)
                    claimed.append((r, self._alloc_seq_locked()))
        return claimed

    def _ship_one(self, r: int, seq: int) -> int:
        data = self.vol.read_region(r)
        csum = bytes(core.checksum(data))
        if csum != bytes(self._zero[16 * r : 16 * r + 16]):
            for _attempt in range(3):
                try:
                    self.store.put(region_key(self.volume_id, r, seq), data, if_absent=True)
                    break
                except ObjectExistsError:
                    # Only after a lost seq reservation; take a fresh seq rather than overwrite.
                    _log.warning("%s: region %d seq %d already stored; using a new seq", self.vol.path, r, seq)
                    with self._cv:
                        seq = self._alloc_seq_locked()
            else:  # pragma: no cover - three collisions in a row
                raise StoreError(f"{self.store.location}: cannot find a free seq for region {r}")
        with self._cv:
            current, _ = self.remote.get(r)
            if seq > current:
                self.remote.set(r, seq, csum)
        return len(data)

    def ship(self, regions: list[int] | None = None, skip_unreadable: set[int] | None = None,
             progress: Callable[[int, int], None] | None = None) -> int:
        """Ship pending regions (the given ones, or all), in parallel; returns how many were shipped.

        With ``skip_unreadable`` (a set), regions that cannot be read locally are added to it and
        dropped from the pending set instead of failing the call. ``progress(done, total)`` is
        called after each batch (``total`` counts what was pending at the start, and grows if
        writes add more).

        Raises
        ------
        SecondaryUnavailableError
            The store cannot be reached; the regions stay pending.
        """
        self._ensure_registered()
        total = 0
        with self._cv:
            expected = self.pending.count() if regions is None else len(regions)
        while True:
            claimed = self._claim(regions, _BATCH)
            if not claimed:
                break
            futures = [(r, self._pool.submit(self._ship_one, r, seq)) for r, seq in claimed]
            failed: list[int] = []
            skipped = 0
            error: BaseException | None = None
            for r, fut in futures:
                try:
                    fut.result()
                except RegionUnavailableError as exc:
                    if skip_unreadable is None:
                        failed.append(r)
                        error = error or exc
                    else:
                        skip_unreadable.add(r)
                        skipped += 1
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    failed.append(r)
                    error = error or exc
            with self._cv:
                for r, _seq in claimed:
                    self.inflight.clear(r)
                for r in failed:
                    self.pending.set(r)
                self.remote.sync()
                self._persist_map_locked()
                if not self.pending.any() and not self.inflight.any():
                    self._dirty_since = None
                self._cv.notify_all()
            total += len(claimed) - len(failed) - skipped
            self.shipped += len(claimed) - len(failed) - skipped
            if progress is not None:
                progress(total, max(expected, total))
            if error is not None:
                raise error
            if regions is not None:
                break
        return total

    def wait_idle(self) -> None:
        """Wait until no shipment is in flight."""
        with self._cv:
            while self.inflight.any():
                self._cv.wait(0.5)

    def _ship_until_stored(self, regions: list[int]) -> None:
        """Ship ``regions`` and wait out shipments of them already in flight elsewhere (which may
        have read the region before this write), until none of them is pending or in flight."""
        while True:
            self.ship(regions)
            with self._cv:
                while any(self.inflight.test(r) for r in regions):
                    self._cv.wait(0.5)
                if not any(self.pending.test(r) for r in regions):
                    return

    def ship_after_write(self, first: int, last: int) -> None:
        """Sync mode: ship the regions a write touched before it is acknowledged."""
        try:
            self._ship_until_stored(list(range(first, last + 1)))
            if self.degraded and not self.pending.any():
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
                while not self._stopping and (not self.pending.any()
                                              or not self.policy.ships_in_background(self.degraded)):
                    self._cv.wait(1.0)
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
        """Publish a manifest of the current records; the caller has drained and holds off writers."""
        self._ensure_registered()
        with self._cv:
            if self.pending.any() or self.inflight.any():
                raise StoreError("internal: publish with regions pending")  # pragma: no cover
            seq = self._alloc_seq_locked()
            self.remote.sync()
            records = self.remote.records()
            self._changed_since_publish = False
        snap = Snapshot(snapshot_id(seq), seq, time.time(), label)
        raw = encode_manifest(self.volume_id, snap, self.vol.size, self.vol.region_size, records)
        self.store.put(manifest_key(self.volume_id, seq), raw, if_absent=True)
        self.last_manifest = raw
        _log.info("%s: snapshot %s (%s) published to %s", self.vol.path, snap.id, label, self.store.location)
        return snap


def attach(host: ReplicationHost, store: ObjectStore, known: SecondaryRecord | None, mode: str | None,
           period: float | None, sync_policy: str, max_lag_regions: int | None,
           workers: int) -> tuple[Replicator, SecondaryRecord]:
    """A replicator of ``host`` to ``store``, its records checked, not started yet; and the record
    of the secondary to keep in the volume's metadata.

    Without ``mode`` (and ``period``) the volume resumes what ``known``, the record of the
    secondary it was last attached to, says. The secondary's records are compared with the
    volume's checksums (and what differs marked pending) when it is a new or another secondary,
    when changes went untracked while detached, or when the volume was not closed cleanly (a
    region may have been shipped from a write that was never flushed and is now lost locally).
    """
    location = str(getattr(store, "location", repr(store)))
    mode = mode or (known.mode if known is not None else None) or "async"
    if period is None and known is not None:
        period = known.period
    resync = known is None or known.location != location or known.resync or not known.clean
    repl = Replicator(host, store, mode, period, sync_policy, max_lag_regions, workers, resync=False)
    try:
        if known is not None and known.location != location:
            repl.remote.reset()
        if resync:
            repl.resync()
    except BaseException:
        repl.close()
        raise
    return repl, SecondaryRecord(location, mode, period, clean=False)
