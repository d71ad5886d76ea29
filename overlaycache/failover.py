"""The distributed overlay snapshot (seed Figs. 3B-3H): location codes and the read router.

When regions of the primary cannot be read (I/O error, SIGBUS on a truncated or failed file, a
checksum mismatch, or the operator declaring them lost), the volume:

1. ships every unsynced region that is still readable (unsynced regions that cannot be read are
   *lost*: their newest copy is the last replicated version; they are logged and reported),
2. publishes a PIT snapshot on the secondary (its map: no data is copied),
3. pushes a fresh overlay: every later write goes there; the layers below are never written again
   until the distributed overlay ends (``merge_down`` is refused meanwhile).

Each region is then read from one of three places, its *location code*:

``PO``
    the primary overlay: written since the distributed overlay began;
``PB``
    the primary base (the local layers below the distributed overlay), still valid;
``R``
    the remote PIT snapshot: not valid locally.

The unavailable regions are kept by :class:`overlaycache.local.unavailable.UnavailableMap`.
:class:`Router` serves reads of a volume that has unavailable regions: through the read kernel
with the region cache once the distributed overlay is active (cache misses and prefetches are
fetched from the PIT), and region by region from their locations otherwise. Remote bytes enter
only through the PIT's region source. A read that finds the layout changed under it (the
distributed overlay began, a region moved to R) raises :class:`StaleStackError`, and the volume
runs it again from the start. The router is also the volume as its collaborators see it: the
:class:`~overlaycache.local.regions.ReplicationHost` of the replicator, the
:class:`~overlaycache.local.regions.LocalRegions` of recovery images and the
:class:`~overlaycache.hydration.HydrationTarget` of hydration.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from overlaycache._fs import write_file_atomic
from overlaycache._impl import core
from overlaycache.errors import (
    InvalidArgumentError,
    Reason,
    RegionUnavailableError,
    StaleStackError,
    StoreError,
    VolumeClosedError,
)
from overlaycache.images import RemoteImage
from overlaycache.local.geometry import Geometry, byte_view, region_ranges, writable_range
from overlaycache.local.layers import Overlay
from overlaycache.local.meta import DistributedOverlayState
from overlaycache.local.stack import LayerStack
from overlaycache.local.unavailable import UnavailableMap
from overlaycache.replication import Replicator
from overlaycache.snapshots import Snapshot
from overlaycache.remote.cache import RegionCache
from overlaycache.remote.layout import decode_root, verify_root_digest
from overlaycache.remote.listing import find_root_key
from overlaycache.remote.leases import LEASE_TTL, LeaseKeeper, holder_name, take_lease
from overlaycache.remote.tree import PageSource, PitMap
from overlaycache.replication.replicator import MIRROR, PINNED_ROOT

if TYPE_CHECKING:
    from overlaycache.store.base import ObjectStore

_log = logging.getLogger(__name__)

PO, PB, R = "PO", "PB", "R"
#: Byte codes used internally (as returned by :func:`location_codes`).
CODE_PO, CODE_R, CODE_PB = 0, 1, 2
CODE_NAMES = {CODE_PO: PO, CODE_R: R, CODE_PB: PB}
#: How long the PIT of a recovery image (or of a clone over one) is pinned on the secondary.
IMAGE_LEASE_TTL = 86400.0
#: The PIT's root, kept in the volume's directory while a distributed overlay is active (its map
#: pages stay in the replicator's mirror meanwhile).
DO_ROOT = PINNED_ROOT
READAHEAD_BYTES = 64 << 20


def location_codes(po_maps: list[core.Bitmap], unavailable: core.Bitmap, first: int, count: int) -> bytearray:
    """One code per region: ``CODE_PO``, ``CODE_R`` or ``CODE_PB`` (the batch ``resolve`` kernel).

    ``po_maps`` are the present-bitmaps of the overlays written since the distributed overlay
    began (newest first); ``unavailable`` the bitmap of regions not valid locally.
    """
    found = core.resolve([*po_maps, unavailable], first, count)
    k = len(po_maps)
    # resolve gives k for "unavailable" and k + 1 for "neither": map to R and PB; < k is PO.
    table = bytes([CODE_PO] * k + [CODE_R, CODE_PB]) + bytes(256 - k - 2)
    return bytearray(found.translate(table))


class Router:
    """Reads of a volume with unavailable regions, each region from its location (PO, PB or R).

    Owns the region cache (``cache/`` in the volume's directory), the PIT's region source
    (a :class:`RemoteImage` over the distributed overlay's PIT), readahead and the
    ``remote_fraction`` policy. See the module docstring.

    Attributes
    ----------
    io_count : int
        Foreground reads and writes during a distributed overlay (hydration yields to them).
    cache : RegionCache or None
        The region cache, once the distributed overlay has been served.
    """

    def __init__(self, layers: LayerStack, unavail: UnavailableMap, *, readonly: bool, flush: Callable[[], None],
                 cache_regions: int, workers: int, readahead: int, remote_fraction: float | None) -> None:
        geo = layers.geo
        # Sequential reads prefetch the R regions of the next ``readahead`` bytes; at most half the
        # cache unless it holds the whole volume, so that prefetched regions are not evicted before use.
        if type(readahead) is not int or readahead < 0:
            raise InvalidArgumentError(f"readahead must be a number of bytes >= 0, got {readahead!r}")
        window = readahead // geo.region_size
        if cache_regions < geo.num_regions:
            window = min(window, cache_regions // 2)
        if remote_fraction is not None and (isinstance(remote_fraction, bool)
                                            or not isinstance(remote_fraction, (int, float))
                                            or not 0 < remote_fraction <= 1):
            raise InvalidArgumentError(f"remote_fraction must be in (0, 1] or None, got {remote_fraction!r}")
        self.path = layers.directory
        self.volume_id = layers.meta.id
        self.size, self.region_size, self.num_regions = geo.size, geo.region_size, geo.num_regions
        self.readonly = readonly
        self.repl: Replicator | None = None  # the replicator, once the secondary is attached
        self._flush = flush
        self._wlock = layers.wlock
        self._layers = layers
        self._scratch = bytearray(layers.geo.region_size)  # partial writes, under the stack lock
        self._unavail = unavail
        self._geo: Geometry = geo
        self._cache_regions = cache_regions
        self._workers = workers
        self._readahead_window = window
        self._remote_fraction = remote_fraction
        self._ra_next = 0  # first region not yet scanned for readahead
        self._last_end = -1  # where the last routed read ended
        self.io_count = 0
        self.cache: RegionCache | None = None
        self.remote: RemoteImage | None = None  # the PIT, once served
        self._lease_until = 0.0  # our lease on the distributed overlay's PIT, while one is active

    def _state(self) -> DistributedOverlayState | None:
        return self._layers.meta.distributed_overlay

    def _store(self) -> ObjectStore | None:
        return self.repl.store if self.repl is not None else None

    # -- locations ---------------------------------------------------------------------------------
    def po_maps(self) -> list[core.Bitmap]:
        """The present-bitmaps of the overlays written since the distributed overlay began."""
        do = self._state()
        if do is None:
            return []
        return [ov.present for ov in reversed(self._layers.overlays) if ov.id >= do.layer]

    def codes(self, first: int, count: int) -> bytearray:
        """The location code of each region of ``[first, first + count)``."""
        return location_codes(self.po_maps(), self._unavail.bits, first, count)

    def location(self, r: int) -> int:
        """The location code of region ``r``."""
        return self.codes(r, 1)[0]

    def is_remote(self, r: int) -> bool:
        """Whether region ``r`` is not valid locally (R): read from the PIT, never locally."""
        return bool(self._unavail.bits.test(r)) and self.location(r) == CODE_R

    def remote_regions(self) -> set[int]:
        """The regions read from the remote PIT (R) now."""
        with self._wlock:
            if self._state() is None:
                return set()
            out: set[int] = set()
            for a, b in self._unavail.bits.runs():  # only unavailable regions can be R
                out.update(a + i for i, c in enumerate(self.codes(a, b - a)) if c == CODE_R)
            return out

    # -- local copies (the volume as LocalRegions / ReplicationHost / HydrationTarget) -------------
    @property
    def closed(self) -> bool:
        """Whether the volume is closed."""
        return self._layers.live is None

    def checksums(self) -> bytearray:
        """The checksum of every region's current version, from the layers' tables (no data read)."""
        with self._wlock:
            self._live()
            return self._layers.checksums()

    def _live(self) -> core.Stack:
        stack = self._layers.live
        if stack is None:
            raise VolumeClosedError(f"{self.path}: volume is closed")
        return stack

    def written_regions(self) -> Iterable[int]:
        """The regions that may hold data: held by an overlay, or with a checksum in the base."""
        with self._wlock:
            layers = self._layers
            ranges = [run for ov in layers.overlays for run in ov.present.runs()]
            ranges += layers.base.written_runs()
        last = -1
        for a, b in sorted(ranges):
            for r in range(max(a, last + 1), b):
                yield r
            last = max(last, b - 1)

    def is_uncommitted(self, r: int) -> bool:
        """Whether region ``r``'s current local version was written since the last commit (a
        racy read of a bit, which the caller allows for)."""
        overlays = self._layers.overlays
        return bool(overlays) and overlays[-1].is_dirty(r)

    def local_checksum(self, r: int) -> bytes | None:
        """The checksum of region ``r``'s current local version, or None when it is not known valid
        (R, or not yet committed). The caller holds the writer lock."""
        if self.is_remote(r):
            return None
        self._live()
        return self._layers.committed_checksum(r)

    def read_region(self, r: int) -> bytes:
        """The current local bytes of region ``r`` (for shipping): never the remote copy.

        Raises
        ------
        RegionUnavailableError
            The region is not valid locally (its newest local version is lost); the caller
            reports a failed read with :meth:`note_unreadable`.
        """
        return self.read_run(r, 1)

    def read_run(self, first: int, count: int) -> bytes:
        """The current local bytes of regions ``first..first+count-1`` in one read (for shipping a
        pack), never the remote copy; raises as :meth:`read_region` does, for the first region that
        fails (read them one by one to know them all)."""
        for r in range(first, first + count):
            if self.is_remote(r):
                raise RegionUnavailableError(f"region {r} is not valid locally", (r,), Reason.UNAVAILABLE)
        rs = self._geo.region_size
        end = min(self._geo.size, (first + count) * rs)
        while True:
            try:
                return bytes(self._live().read(first * rs, end - first * rs))
            except StaleStackError:
                continue

    def note_unreadable(self, exc: RegionUnavailableError) -> None:
        """A read for shipping failed: mark the regions unavailable. Called by the thread that
        asked for the shipping (which may hold the writer lock), never by the threads that read:
        they must not wait for that lock while their caller waits for them."""
        if exc.reason in (Reason.IO, Reason.CHECKSUM):
            with self._wlock:
                self._unavail.mark(exc.regions, exc.reason)

    def read_if_identical(self, r: int, csum: bytes, offset: int, out: memoryview) -> bool:
        """Read ``out`` at ``offset`` (inside region ``r``) locally if the region's current version
        has checksum ``csum``; returns False, reading nothing, otherwise (recovery images)."""
        with self._wlock:
            if self.local_checksum(r) != csum:
                return False
            try:
                while True:
                    try:
                        self._live().readinto(offset, out)
                        return True
                    except StaleStackError:
                        continue
            except RegionUnavailableError as exc:
                self._unavail.mark(exc.regions, exc.reason)
                return False

    def differing(self, theirs: Callable[[int], bytes]) -> list[int]:
        """The regions whose current version (written since the last commit or not) has another
        checksum than ``theirs(r)``; from the tables, no data read (uncommitted regions hashed)."""
        with self._wlock:
            self._live()
            top = self._layers.top
            top.hash_dirty()
            out = []
            for r in range(self._geo.num_regions):
                mine = top.checksum_of(r) if top.is_dirty(r) else self.local_checksum(r)
                if theirs(r) != mine:
                    out.append(r)
            return out

    # -- writes ------------------------------------------------------------------------------------------
    def write_region(self, top: Overlay, r: int, intra: int, piece: memoryview,
                     fetched: dict[int, bytes] | None = None) -> None:
        """Write ``piece`` at ``intra`` in region ``r`` of the top overlay; the caller holds the
        writer lock and the stack lock. A partial write takes the rest of the region from the
        layers below, or from the PIT when the region is not valid locally (``fetched`` has the
        PIT's bytes of such regions, see :meth:`remote_edges`)."""
        bits = self._unavail.bits
        rlen = self._geo.region_length(r)
        if intra or len(piece) != rlen:  # partial: the rest of the region is needed unless patched in place
            # Not valid locally (even a version in the top overlay): the rest comes from the PIT.
            remote = bits.test(r) and self.location(r) == CODE_R
            if remote or not top.is_dirty(r):
                region = memoryview(self._scratch)[:rlen]
                if remote:
                    got = (fetched or {}).get(r)
                    if got is not None:
                        region[:] = got
                    else:
                        self.read_region_remote(r, region)
                else:
                    self._live().readinto_locked(r * self._geo.region_size, region)
                top.write_region(r, intra, piece, region)
            else:
                top.write_region(r, intra, piece)
        else:
            top.write_region(r, intra, piece)
        self._layers.verified.set(r)  # written from memory: nothing to check on its next read
        if bits.test(r) and self._state() is None:
            # The top overlay now holds a whole, fresh version: the region is readable again.
            self._unavail.discard(r)

    def hydrate_batch(self, regions: list[int]) -> int:
        """Install the PIT's version of those of ``regions`` still R in the top overlay (hydration);
        returns how many were installed."""
        with self._wlock:
            self._live()
            want = [r for r in regions if self._state() is not None and self.is_remote(r)]
        if not want:
            return 0
        got = self.fetch(want, "cannot be fetched for hydration")
        installed = 0
        with self._wlock:
            if self._state() is None:
                return 0
            self._live()
            top = self._layers.top
            self._layers.rw.acquire_write()
            try:
                for r in want:
                    if self.is_remote(r):  # not written meanwhile
                        self.write_region(top, r, 0, memoryview(got[r]))
                        installed += 1
            finally:
                self._layers.rw.release_write()
        return installed

    # -- begin and end -------------------------------------------------------------------------------
    def begin(self, repl: Replicator, flush: Callable[[], None]) -> Snapshot:
        """Begin the distributed overlay snapshot (Fig. 3F); idempotent while one is active. The
        caller holds the writer lock; ``flush`` makes the volume's writes durable.

        1. Ship every unsynced region that is still readable; unsynced regions that cannot be read
           are lost (their newest copy is the last replicated one): logged and kept in the state's
           ``lost``.
        2. Publish a PIT snapshot on the secondary (its root kept locally too, its map pages pinned).
        3. Push a fresh overlay: all later writes go to it; the layers below are not written again.

        If any step fails, nothing has begun and the unreadable regions stay pending.
        Returns the PIT snapshot that serves the regions not valid locally (R).
        """
        meta = self._layers.meta
        do = meta.distributed_overlay
        if do is not None:
            return Snapshot(do.snapshot_id, do.snapshot, do.started_at, None)
        flush()
        lost: set[int] = set()
        try:
            repl.ship(skip_unreadable=lost)
            repl.wait_idle()
            repl.ship(skip_unreadable=lost)

            def drain() -> None:
                repl.ship(skip_unreadable=lost)
                repl.wait_idle()
                repl.ship(skip_unreadable=lost)

            snap = repl.publish_checked(f"distributed-overlay-{int(time.time())}", drain)
            self.save_root(repl.last_root)
            # Pin the PIT: a collapse elsewhere must keep it while this overlay reads from it.
            self._lease_until = take_lease(repl.store, self.volume_id, snap.id, holder_name(self.volume_id))
            layer = meta.next_layer
            meta.distributed_overlay = DistributedOverlayState(layer, snap.seq, snap.id, snap.created_at, sorted(lost))
            try:
                self._layers.push()
            except BaseException:
                meta.distributed_overlay = None
                raise
        except BaseException:
            # Not begun: the unreadable regions stay pending, to be found (and reported) again.
            repl.requeue(lost)
            raise
        self.start()
        path = self.path
        if lost:
            _log.error("%s: distributed overlay began; unsynced regions %s could not be read and fall back "
                       "to their last replicated version", path, region_ranges(sorted(lost)))
        _log.warning("%s: distributed overlay began at layer %d over PIT %s; unavailable regions %s are "
                     "read from %s", path, layer, snap.id, self._unavail.summary(),
                     repl.store.location)
        return snap

    def detected(self, exc: RegionUnavailableError) -> bool:
        """A local read failed: mark the regions, and begin the distributed overlay if there is a
        secondary. Returns whether the read can be retried (served from the secondary now)."""
        if not exc.regions or self.readonly or exc.reason not in (Reason.IO, Reason.CHECKSUM):
            return False
        with self._wlock:
            new = self._unavail.mark(exc.regions, exc.reason)
        if self.repl is None:
            return False
        if self._state() is not None:
            # Retry only if a region moved to R; a failed PO region has no other copy of its data.
            return any(self.is_remote(r) for r in new)
        self.begin_for_read(exc.regions)
        return True

    def begin_for_read(self, regions: Iterable[int]) -> None:
        """Begin the distributed overlay so that ``regions`` can be read; a secondary that cannot
        be reached makes them unavailable for now (a later read tries again)."""
        try:
            with self._wlock:
                self.begin(self._replicator(), self._flush)
        except StoreError as exc:
            regs = sorted(regions)
            raise RegionUnavailableError(
                f"{self.path}: regions {region_ranges(regs)} are not valid locally and the distributed "
                f"overlay cannot begin: {exc}", regs, Reason.SECONDARY_UNAVAILABLE) from exc

    def end(self) -> None:
        """End the distributed overlay (after a restore): local reads only; under the writer lock."""
        meta = self._layers.meta
        if meta.distributed_overlay is not None:
            meta.distributed_overlay = None
            self._layers.persist()
            self.stop()

    def _replicator(self) -> Replicator:
        if self.repl is None:
            raise InvalidArgumentError(f"{self.path}: no secondary attached (open with secondary=...)")
        return self.repl

    def begin_distributed_overlay(self) -> Snapshot:
        """Begin the distributed overlay (see :meth:`begin`), taking the writer lock."""
        repl = self._replicator()
        if self.readonly:
            raise InvalidArgumentError(f"{self.path}: volume is open read-only")
        with self._wlock:
            return self.begin(repl, self._flush)

    def snapshot(self, label: str | None = None) -> Snapshot:
        """Publish a consistent PIT: drain what is unsynced while writes go on, then hold writers
        off for the remainder, so that the manifest is one image of the volume."""
        repl = self._replicator()
        self.ship_pending()
        with self._wlock:
            self._flush()
            self.ship_pending()
            repl.wait_idle()
            self.ship_pending()
            snap = repl.publish_checked(label, self._drain)
        self.renew_lease()
        return snap

    def _drain(self) -> None:
        """Ship everything pending, in flight ones included (the caller holds writers off)."""
        repl = self._replicator()
        self.ship_pending()
        repl.wait_idle()
        self.ship_pending()

    def lease_for_image(self, snapshot_id: str) -> LeaseKeeper | None:
        """Pin the PIT of a recovery image (or of a clone over one) with leases of
        :data:`IMAGE_LEASE_TTL`, renewed while the image is open, so that a collapse keeps it;
        returns the keeper (the image closes it). A store that cannot be reached is logged: the
        image still works while the PIT is there, and the keeper tries again."""
        if self.repl is None:
            return None
        try:
            return LeaseKeeper(self.repl.store, self.volume_id, snapshot_id, holder_name(self.volume_id),
                               IMAGE_LEASE_TTL)
        except StoreError as exc:
            _log.warning("%s: cannot take a lease on PIT %s (%s): a collapse may remove it", self.path,
                         snapshot_id, exc)
            return LeaseKeeper(self.repl.store, self.volume_id, snapshot_id, holder_name(self.volume_id),
                               IMAGE_LEASE_TTL, every=60.0, take_now=False)

    def renew_lease(self) -> None:
        """Renew the lease on the distributed overlay's PIT once half of it has run out (or it was
        never taken in this process); a store that cannot be reached is logged, tried again later."""
        do, repl = self._state(), self.repl
        if do is None or repl is None or self._lease_until - time.time() > LEASE_TTL / 2:
            return
        try:
            self._lease_until = take_lease(repl.store, self.volume_id, do.snapshot_id, holder_name(self.volume_id))
        except StoreError as exc:
            _log.warning("%s: cannot renew the lease on PIT %s (%s); a collapse may remove it once the "
                         "lease expires", self.path, do.snapshot_id, exc)

    def ship_pending(self) -> int:
        """Ship every pending region; during a distributed overlay, a pending region that cannot be
        read is lost instead of failing the shipment: its newest version is gone (the secondary has
        its last replicated one). It is recorded in the state's ``lost``, logged, and no longer
        pending; reads of it fail until it is written again."""
        repl = self._replicator()
        if self._state() is None:
            return repl.ship()
        lost: set[int] = set()
        n = repl.ship(skip_unreadable=lost)
        if lost:
            with self._wlock:
                self._unavail.mark(lost, Reason.IO)
                do = self._state()
                if do is not None:
                    do.lost = sorted(set(do.lost) | lost)
                    self._layers.persist()
            _log.error("%s: regions %s written during the distributed overlay cannot be read; their newest "
                       "versions are lost (the secondary has their last replicated ones)", self.path,
                       region_ranges(sorted(lost)))
        return n

    # -- routing -------------------------------------------------------------------------------------
    def route(self, stack: core.Stack) -> core.Stack:
        """Route ``stack`` (the volume's live one) through the region cache during a distributed
        overlay: the read kernel then serves cached R regions itself."""
        do, cache = self._state(), self.cache
        if do is not None and cache is not None and cache.slot_table is not None:
            npo = sum(1 for ov in self._layers.overlays if ov.id >= do.layer)
            try:
                stack.route(npo, self._unavail.bits, cache.data, cache.slot_table, cache.verified, cache.sums)
            except BaseException:
                stack.release()
                raise
        return stack

    def _rebuild_live(self, routed: bool) -> None:
        stack = self._layers.build()
        self._layers.install_live(self.route(stack) if routed else stack)

    def save_root(self, raw: bytes) -> None:
        """Keep the PIT's root locally (and so its pages in the mirror): the remote image must open
        even while the secondary is unreachable."""
        write_file_atomic(os.path.join(self._layers.directory, DO_ROOT), raw)

    def start(self) -> None:
        """Serve the distributed overlay's R regions through the read kernel and the region cache;
        the caller holds the writer lock. The PIT's root is kept locally and its pages in the
        mirror, so cached regions are served even while the secondary is unreachable or not
        attached."""
        do = self._state()
        assert do is not None
        path = os.path.join(self._layers.directory, DO_ROOT)
        store = self._store()
        try:
            with open(path, "rb") as f:
                root = decode_root(f.read(), path)
        except FileNotFoundError:
            if store is None:
                raise InvalidArgumentError(f"{self.path}: no secondary attached (open with secondary=...)")
            key = find_root_key(store, self.volume_id, do.snapshot)
            raw = store.get(key)
            verify_root_digest(raw, key, f"{store.location}/{key}")
            root = decode_root(raw, f"{store.location}/{key}")
            write_file_atomic(path, raw)
        manifest = PitMap(root, PageSource(store, self.volume_id, os.path.join(self._layers.directory, MIRROR)))
        if self.cache is None:
            self.cache = RegionCache(os.path.join(self._layers.directory, "cache"), self._geo.region_size,
                                     min(self._cache_regions, self._geo.num_regions), lock=self._layers.rw)
        if self.remote is not None:
            self.remote.close()
        live = self._layers.live
        if live is not None and live.routed:
            self._rebuild_live(routed=False)  # no reader may use a slot table no longer kept
        self.remote = RemoteImage(store, manifest, cache_regions=64, region_cache=self.cache, workers=self._workers,
                                  readahead=0)  # the router reads ahead itself
        self.cache.bind(manifest)
        self._rebuild_live(routed=True)
        self.renew_lease()
        if self.repl is not None:  # renewed while the overlay lasts (the image's close stops it)
            self.remote.lease = LeaseKeeper(self.repl.store, self.volume_id, do.snapshot_id,
                                            holder_name(self.volume_id), LEASE_TTL, every=LEASE_TTL / 4,
                                            take_now=False)
        self._ra_next = 0

    def stop(self) -> None:
        """The distributed overlay ended: local reads only; the caller holds the writer lock."""
        self._rebuild_live(routed=False)
        if self.cache is not None:
            self.cache.unbind()
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        try:
            os.unlink(os.path.join(self._layers.directory, DO_ROOT))
        except FileNotFoundError:
            pass
        if self.repl is not None:
            self.repl.sweep_mirror()  # the PIT's pages are no longer pinned

    def pit(self) -> RemoteImage:
        """The distributed overlay's PIT, opened (routing started) if it is not yet."""
        img = self.remote
        if img is None:
            if self._state() is None:
                raise RegionUnavailableError("no distributed overlay: nothing to read remotely", (),
                                             Reason.UNAVAILABLE)
            if self.readonly:
                raise RegionUnavailableError(
                    f"{self.path}: open the volume read-write with its secondary to read remote regions",
                    (), Reason.UNAVAILABLE)
            with self._wlock:
                if self.remote is None:
                    self.start()
                img = self.remote
            assert img is not None
        return img

    def clear_cache(self) -> int:
        """Drop every region kept in the region cache; returns how many were dropped."""
        cache = self.cache
        if cache is None:
            return 0
        n = len(cache)
        cache.clear()
        return n

    def close(self) -> None:
        """Close the PIT's image and the region cache."""
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    # -- remote bytes --------------------------------------------------------------------------------
    def fetch(self, regions: list[int], what: str) -> dict[int, bytes | memoryview]:
        """The PIT's bytes of ``regions`` (through the cache, in parallel).

        Raises
        ------
        RegionUnavailableError
            Some cannot be fetched (``what`` says what that means): names them all.
        """
        got, errors = self.pit().fetch_many(regions)
        if errors:
            raise self._fetch_failure(errors, what)
        return got

    def _fetch_failure(self, errors: dict[int, BaseException], what: str) -> BaseException:
        """The exception for regions that could not be fetched: a store failure becomes a
        :class:`RegionUnavailableError` naming them all; anything else is raised as it is."""
        failed = sorted(errors)
        first = errors[failed[0]]
        if not isinstance(first, StoreError):
            return first
        exc = RegionUnavailableError(f"{self.path}: regions {region_ranges(failed)} {what}: {first}", failed,
                                     Reason.SECONDARY_UNAVAILABLE)
        exc.__cause__ = first
        return exc

    def read_region_remote(self, r: int, out: memoryview) -> None:
        """Fetch region ``r`` of the PIT into ``out`` holding the stack's lock for writing: straight
        from the secondary, as the cache's slots change only under that lock."""
        if self._state() is None:
            raise RegionUnavailableError(
                f"{self.path}: region {r} is unavailable locally and there is no distributed overlay "
                "(attach a secondary)", (r,), Reason.UNAVAILABLE)
        try:
            out[:] = self.pit().source.fetch(r, keep=False)
        except StoreError as exc:
            raise RegionUnavailableError(
                f"{self.path}: region {r} is not valid locally and the secondary cannot serve it: {exc}",
                (r,), Reason.SECONDARY_UNAVAILABLE) from exc

    def remote_edges(self, offset: int, length: int) -> dict[int, bytes]:
        """The PIT's bytes of the R regions that a write of ``length`` bytes at ``offset`` covers
        only in part, fetched before the write takes its locks (through the cache)."""
        self.io_count += 1
        rs = self._geo.region_size
        want = []
        for r in sorted({offset // rs, (offset + length - 1) // rs}):
            a, rlen = r * rs, self._geo.region_length(r)
            if a >= offset and a + rlen <= offset + length:
                continue  # written whole
            with self._wlock:
                if self._state() is not None and self.location(r) == CODE_R:
                    want.append(r)
        if not want:
            return {}
        got = self.fetch(want, "are not valid locally, not cached, and the secondary cannot serve them")
        return {r: bytes(data) for r, data in got.items()}  # at most two regions

    # -- reads -----------------------------------------------------------------------------------------
    def read_routed(self, stack: core.Stack, offset: int, buffer: Any) -> int:
        """A read through the routed read kernel: cached R regions from the cache, misses fetched
        from the PIT, readahead on sequential reads."""
        if self._remote_fraction is not None and self._read_mostly_remote(stack, offset, buffer):
            return len(byte_view(buffer))
        nbytes, misses = stack.readinto_routed(offset, buffer)
        self.io_count += 1
        if misses:
            self._serve_misses(offset, buffer, nbytes, misses)
        if self._readahead_window:
            self._readahead(offset, nbytes)
        return int(nbytes)

    def _serve_misses(self, offset: int, buffer: Any, n: int, misses: list[int]) -> None:
        """Fetch the R regions the read kernel could not serve from the cache and copy them into
        ``buffer`` (holding ``n`` bytes read at ``offset``)."""
        img = self.pit()
        regions = []
        for m in misses:
            if m < 0:  # the cached copy failed its checksum or could not be read
                m = -m - 1
                if self.cache is not None:
                    self.cache.drop(m, img.version(m))
            regions.append(m)
        got = self.fetch(regions, "are not valid locally, not cached, and the secondary cannot serve them")
        view = memoryview(buffer).cast("B")
        rs = self._geo.region_size
        for r, data in got.items():
            a, b = max(offset, r * rs), min(offset + n, r * rs + len(data))
            view[a - offset : b - offset] = memoryview(data)[a - r * rs : b - r * rs]

    def _read_mostly_remote(self, stack: core.Stack, offset: int, buffer: Any) -> bool:
        """Serve a read whose share of R regions reaches ``remote_fraction`` from the PIT alone
        (PO regions excepted: the PIT does not have them); returns False, reading nothing, for
        any other read. PB regions are the same version in the PIT (not written since it)."""
        view = writable_range(buffer, offset, self._geo.size, "volume")
        n = len(view)
        if n == 0:
            return False
        rs = self._geo.region_size
        first, last = offset // rs, (offset + n - 1) // rs
        codes = self.codes(first, last - first + 1)
        assert self._remote_fraction is not None
        if codes.count(CODE_R) < self._remote_fraction * len(codes):
            return False
        self.io_count += 1
        got, errors = self.pit().fetch_many([first + i for i, c in enumerate(codes) if c != CODE_PO])
        for i, c in enumerate(codes):
            r = first + i
            a, b = max(offset, r * rs), min(offset + n, (r + 1) * rs)
            data = got.get(r)
            if data is not None:
                view[a - offset : b - offset] = memoryview(data)[a - r * rs : b - r * rs]
            elif c != CODE_R:  # PO, or PB the secondary could not give: local
                try:
                    stack.readinto(a, view[a - offset : b - offset])
                except (StaleStackError, RegionUnavailableError):
                    return False  # the normal path retries and deals with it
        failed = {r: exc for r, exc in errors.items() if codes[r - first] == CODE_R}
        if failed:
            raise self._fetch_failure(failed, "are not valid locally, not cached, and the secondary "
                                              "cannot serve them")
        return True

    def _readahead(self, offset: int, n: int) -> None:
        """On sequential reads, start fetching the uncached R regions of the next window."""
        rs = self._geo.region_size
        if offset != self._last_end:
            self._ra_next = 0
            if offset != 0:  # not a sequential read
                self._last_end = offset + n
                return
        self._last_end = offset + n
        start = max(self._ra_next, (offset + n + rs - 1) // rs)
        stop = min(self._geo.num_regions, (offset + n) // rs + self._readahead_window)
        if start >= stop or (stop - start < self._readahead_window // 4 and stop < self._geo.num_regions):
            return  # scan in batches (a scan costs more than this check), but always up to the end
        cache, img = self.cache, self.remote
        if cache is None or img is None or cache.slot_table is None:
            return
        table = memoryview(cache.slot_table).cast("q")
        codes = self.codes(start, stop - start)
        want = [start + i for i, c in enumerate(codes) if c == CODE_R and table[start + i] == 0]
        started = img.prefetch(want)
        self._ra_next = want[started] if started < len(want) else stop

    def read_by_location(self, stack: core.Stack, offset: int, buffer: Any) -> int:
        """A read while the stack is not routed (no distributed overlay yet, or read-only): runs of
        local regions through ``stack``, runs of R regions from the PIT.

        Raises
        ------
        StaleStackError
            The distributed overlay began for this read: run it again.
        RegionUnavailableError
            Regions that can be read from nowhere, all named (local read failures are raised as
            they are, for the volume to detect).
        """
        view = writable_range(buffer, offset, self._geo.size, "volume")
        n = len(view)
        if n == 0:
            return 0
        rs = self._geo.region_size
        first, last = offset // rs, (offset + n - 1) // rs
        codes = self.codes(first, last - first + 1)
        if CODE_R in codes and self._state() is None:
            regs = [first + k for k, c in enumerate(codes) if c == CODE_R]
            if self.repl is not None and not self.readonly:
                # It could not begin before (secondary unreachable): try again.
                self.begin_for_read(regs)
                raise StaleStackError("the distributed overlay began")
            reason = self._unavail.reason(regs[0])
            raise RegionUnavailableError(
                f"{self.path}: regions {region_ranges(regs)} are unavailable locally ({reason}) "
                "and there is no distributed overlay (attach a secondary)", regs, reason)
        errors: dict[int, BaseException] = {}  # remote regions that could not be served
        i = 0
        while i < len(codes):
            remote = codes[i] == CODE_R
            j = i + 1
            while j < len(codes) and (codes[j] == CODE_R) == remote:
                j += 1
            a = max(offset, (first + i) * rs)
            b = min(offset + n, (first + j) * rs)
            if remote:
                regs = list(range(first + i, first + j))
                if self.readonly:
                    raise RegionUnavailableError(
                        f"{self.path}: regions {region_ranges(regs)} are served by the secondary: open the "
                        "volume read-write with its secondary to read them", regs, Reason.UNAVAILABLE)
                got, missed = self.pit().fetch_many(regs)
                for r, data in got.items():
                    ra, rb = max(a, r * rs), min(b, r * rs + len(data))
                    view[ra - offset : rb - offset] = memoryview(data)[ra - r * rs : rb - r * rs]
                errors.update(missed)  # go on: name every region this read cannot serve
            else:
                stack.readinto(a, view[a - offset : b - offset])
            i = j
        if errors:
            raise self._fetch_failure(errors, "are not valid locally, not cached, and the secondary cannot serve them")
        return n
