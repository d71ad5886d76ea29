"""A volume: a local base file plus a stack of overlays, read as one virtual image.

Contract
--------
* A read of a region returns exactly the bytes of the newest layer holding it, never a mix of
  versions: reads hold the volume's read lock, writes its write lock.
* Writes go to the top overlay. A region whose current version is durable is never overwritten in
  place (see :mod:`overlaycache.local.layers`), so after :meth:`Volume.flush` returns, a crash at any
  later moment reopens with every flushed byte and each region whole.
* Metadata (``volume.json``) is replaced atomically: temp file, fsync, rename, fsync of the directory.
* One writer process at a time (``flock`` on ``lock``); read-only opens share the lock.
* Local data that cannot be read raises :class:`RegionUnavailableError` naming the regions; the
  process never dies of it (SIGBUS on a truncated file is caught by the core).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from overlaycache._fs import lock_directory
from overlaycache._impl import core
from overlaycache.clone import Clone, open_clone
from overlaycache.errors import (
    InvalidArgumentError,
    InvalidBufferError,
    OverlayCacheError,
    Reason,
    RegionUnavailableError,
    StaleStackError,
    VolumeClosedError,
)
from overlaycache.failover import CODE_NAMES, READAHEAD_BYTES, Router
from overlaycache.hydration import Hydration
from overlaycache.images import RecoveryImage, VirtualImage
from overlaycache.jobs import IDLE, Job
from overlaycache.local.geometry import byte_view, check_callback, check_geometry, check_path
from overlaycache.local.meta import (
    DistributedOverlayState,
    SecondaryRecord,
    VolumeMeta,
    read_meta,
    remove_meta_temp,
    write_meta,
)
from overlaycache.local.layers import MAX_UNCOMMITTED
from overlaycache.local.stack import LayerStack, create_volume_files, remove_volume_files
from overlaycache.local.unavailable import UnavailableMap
from overlaycache.remote.catalog import Catalog
from overlaycache.replication import Lag, Replicator, attach
from overlaycache.replication.maps import CHANGE_MAP, ChangeMap, DetachedChanges, RemoteMap, map_salt
from overlaycache.replication.replicator import PACK_DELAY, PACK_SIZE, check_pack_options, store_location
from overlaycache.store.metered import MeteredStore, StoreStats
from overlaycache.snapshots import LocalSnapshot, Snapshot, find_snapshot
from overlaycache.store.base import ObjectStore

_log = logging.getLogger(__name__)

#: Once this many regions are written since the last commit, a write commits them (as flush does)
#: before it goes on: it bounds the slots held by replaced versions (see layers.MAX_UNCOMMITTED).
AUTO_COMMIT_REGIONS = MAX_UNCOMMITTED // 2


class Volume:
    """A block volume made of a base file and a stack of overlays.

    Use :meth:`create` or :meth:`open`; a volume is also a context manager that closes on exit.
    Once it is closed, the methods that read or change it raise :class:`VolumeClosedError`
    (:meth:`close` itself may be called again); methods that change it raise
    :class:`InvalidArgumentError` on a volume opened read-only.

    Attributes
    ----------
    path : str
        The volume's directory.
    id : str
        Unique id of the volume (its key in a secondary store).
    size, region_size, num_regions : int
        Geometry.
    readonly : bool
        Opened without write access.
    """

    def __init__(self, path: str, meta: VolumeMeta, readonly: bool, lock_fd: int,
                 secondary: ObjectStore | None = None, replication: str | None = None, period: float | None = None,
                 sync_policy: str = "degrade", max_lag_regions: int | None = None, workers: int = 16,
                 verify: str = "always", cache_regions: int = 4096, readahead: int = READAHEAD_BYTES,
                 remote_fraction: float | None = None, pack_size: int = PACK_SIZE,
                 pack_delay: float = PACK_DELAY) -> None:
        self.path = path
        self.readonly = readonly
        self._lock_fd = lock_fd
        self._meta = meta
        self.id: str = meta.id
        self._geo = meta.geometry
        self.verify = verify
        self._wlock = threading.RLock()
        self._merge_lock = threading.RLock()  # one merge at a time; close waits for it
        self._rw = core.RWLock()
        self._layers: LayerStack | None = None
        self._router: Router | None = None
        self._repl: Replicator | None = None
        self._detached: DetachedChanges | None = None  # write intents while opened without the secondary
        self._metered: MeteredStore | None = None
        self._hydration: Hydration | None = None
        try:
            self._unavail = UnavailableMap(path, self._geo.num_regions, meta.id, meta.unavailable,
                                           None if readonly else self._unavailable_changed)
            self._layers = layers = LayerStack(path, meta, not readonly, self._rw, self._wlock, self._merge_lock)
            self._router = Router(layers, self._unavail, readonly=readonly, flush=self.flush,
                                  cache_regions=cache_regions, workers=workers, readahead=readahead,
                                  remote_fraction=remote_fraction)
            layers.route = self._router.route
            layers.apply_verify_policy(verify)
            layers.live = layers.build()
            # A damaged journal: the versions it may have committed cannot be trusted unless a newer
            # overlay holds the region (whatever layer serves it now may hold an older version):
            # read from the secondary, or an error naming them.
            for i, ov in enumerate(layers.overlays):
                newer = layers.overlays[i + 1 :]
                lost = [r for r in ov.untrusted if not any(o.present.test(r) for o in newer)]
                if readonly:
                    for r in lost:
                        self._unavail.add(r)
                else:
                    self._unavail.mark(lost, Reason.CHECKSUM)
            if not readonly and layers.top.truncated_at is not None:
                # The top overlay's file was truncated: its lost versions are unavailable (read from
                # the secondary, or an error naming them); then new versions can be written again.
                self._unavail.mark(layers.top.lost_regions(), Reason.IO)
                layers.top.restore_length()
            if meta.merging is not None and not readonly:
                _log.info("%s: finishing an interrupted merge of overlay %s", path, meta.merging)
                with self._wlock:
                    layers.merge_oldest()
            if not readonly:
                self._attach(secondary, replication, period, sync_policy, max_lag_regions, workers, pack_size,
                             pack_delay)
                if self._do is not None:
                    with self._wlock:
                        self._router.start()
        except BaseException:
            self._detach_replicator()
            self._lock_fd = -1  # Volume.open closes it
            self._teardown()
            raise

    def _detach_replicator(self) -> bool:
        """Stop and close the replicator, if there is one; returns whether there was."""
        repl = self._repl
        if repl is None:
            return False
        repl.close()  # first: its shipper may still be using the router's reference
        self._repl = None
        if self._layers is not None:
            self._layers.hook_commits()
        if self._router is not None:
            self._router.repl = None
        return True

    def _attach(self, store: ObjectStore | None, mode: str | None, period: float | None, sync_policy: str,
                max_lag_regions: int | None, workers: int, pack_size: int, pack_delay: float) -> None:
        """Start replication to ``store``, or note that changes go untracked while detached."""
        known = self._meta.secondary
        if store is None:
            if mode is not None:
                raise InvalidArgumentError("replication needs a secondary store")
            if known is not None and not known.resync:
                # Opened without its secondary: the regions written go on into the replication
                # map, so that attaching it again ships them (nothing else to compare). Without a
                # map (missing, or its header damaged) the next attach compares every region.
                cpath = os.path.join(self.path, CHANGE_MAP)
                detached = None
                if os.path.exists(cpath):
                    detached = DetachedChanges(cpath, self._geo.num_regions, map_salt(self.id))
                else:
                    _log.error("%s: %s is missing: every region is compared with the secondary when it "
                               "is attached again", self.path, CHANGE_MAP)
                if detached is None or detached.lost:
                    if detached is not None:
                        detached.close()
                    known.resync = True
                    self._store_meta()
                    return
                self._detached = detached
                assert self._layers is not None
                self._layers.hook_commits(self._detached.before_commit)
            return
        metered = MeteredStore(store)
        self._repl, self._meta.secondary = attach(self._route, metered, known, mode, period,
                                                  sync_policy, max_lag_regions, workers, pack_size, pack_delay)
        self._metered = metered
        self._route.repl = self._repl
        assert self._layers is not None
        self._layers.hook_commits(self._repl.before_commit, self._repl.after_commit)
        self._store_meta()
        self._repl.start()

    # -- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, region_size: int = 65536, secondary: ObjectStore | None = None,
               replication: str | None = None, period: float | None = None, sync_policy: str = "degrade",
               max_lag_regions: int | None = None, workers: int = 16, verify: str = "always",
               cache_regions: int = 4096, readahead: int = READAHEAD_BYTES,
               remote_fraction: float | None = None, pack_size: int = PACK_SIZE,
               pack_delay: float = PACK_DELAY) -> Volume:
        """Create a volume of ``size`` zero bytes in the directory ``path`` and open it.

        A create that fails (or is interrupted) leaves nothing behind: a new directory is built
        beside ``path`` and renamed into place when complete; an empty one is emptied again.

        Parameters
        ----------
        path : str or PathLike
            A directory that does not exist yet, or is empty.
        size : int
            Bytes in the volume, > 0.
        region_size : int
            Unit of tracking and copying: a power of two from 4 KiB to 64 MiB.
        secondary : ObjectStore, optional
            Where replicated regions and PIT snapshots go (:class:`S3Store`, :class:`LocalStore`).
        replication : {"sync", "async", "periodic"}, optional
            How changes reach the secondary (default "async" when a secondary is given):
            ``sync`` acknowledges a write once it is stored there; ``async`` ships in the
            background from a durable replication map; ``periodic`` publishes a consistent PIT
            every ``period`` seconds.
        period : float, optional
            Seconds between PITs in periodic mode.
        sync_policy : {"degrade", "fail"}
            Sync mode with the secondary unreachable: "degrade" (default) keeps accepting writes,
            durable locally, and replicates them when it is back (a logged alert, visible lag);
            "fail" raises :class:`SecondaryUnavailableError` from the write (the data is still
            written locally and replicated later).
        max_lag_regions : int, optional
            Async back-pressure: writes wait while more regions than this are behind.
        workers : int
            Parallel transfers to the secondary.
        pack_size : int
            Target size of a pack, the object many region versions are stored in on the secondary:
            1 to 64 MiB (default 8 MiB).
        pack_delay : float
            Seconds the background shipper waits for a pack to fill before it ships a partial one
            (default 1 s): the bound it adds to the recovery point of async mode.
        cache_regions : int
            Capacity of the local cache of regions read from the secondary (``cache/`` in the
            volume's directory; kept across restarts).
        readahead : int
            During a distributed overlay, sequential reads prefetch the uncached remote regions of
            the next ``readahead`` bytes (default 64 MiB, at most half the cache unless it holds the
            whole volume); 0 turns it off.
        remote_fraction : float, optional
            During a distributed overlay, a read with at least this fraction of its regions remote
            (R) reads its still-valid local (PB) regions from the PIT too, where they are identical,
            instead of from a device that is mostly failing (seed [0088]); regions written since
            the overlay began (PO) are always local. None (default) turns it off.
        verify : {"always", "sampled", "scrub-only"}
            Checksum verification of local reads: "always" (default) verifies every region the
            first time it is read after open (then remembers it, as ZFS's ARC does); "sampled"
            does so for one region in 16; "scrub-only" leaves it to :meth:`scrub`.

        Returns
        -------
        Volume
            Open for writing; a context manager.

        Raises
        ------
        InvalidArgumentError
            Bad size, region size, secondary or replication options, ``path`` is not empty, or its
            file system cannot hold a file that large.
        StoreAccessError
            The secondary refuses the volume's record (no such bucket, no permission). An
            unreachable secondary is not an error: the volume is created, and registered there
            when it is back.
        """
        geo = check_geometry(size, region_size)
        path = check_path("path", path)
        _check_store(secondary)
        check_pack_options(pack_size, pack_delay)
        if replication is not None and secondary is None:
            raise InvalidArgumentError("replication needs a secondary store")
        existed = create_volume_files(path, geo)
        try:
            if secondary is not None:
                # An empty volume is in step with a secondary that has nothing of it yet: recorded
                # as such, attaching compares nothing (which would cost time in the volume's size).
                meta = read_meta(path)
                meta.secondary = SecondaryRecord(store_location(secondary), replication or "async", period,
                                                 clean=True)
                ChangeMap(os.path.join(path, CHANGE_MAP), geo.num_regions, True, map_salt(meta.id)).close()
                RemoteMap(os.path.join(path, "remote.map"), geo.region_size, geo.num_regions, True, meta.id).close()
                write_meta(path, meta)
            return cls.open(path, secondary=secondary, replication=replication, period=period,
                            sync_policy=sync_policy, max_lag_regions=max_lag_regions, workers=workers,
                            verify=verify, cache_regions=cache_regions, readahead=readahead,
                            remote_fraction=remote_fraction, pack_size=pack_size, pack_delay=pack_delay)
        except BaseException:
            remove_volume_files(path, keep_dir=existed)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], readonly: bool = False, secondary: ObjectStore | None = None,
             replication: str | None = None, period: float | None = None, sync_policy: str = "degrade",
             max_lag_regions: int | None = None, workers: int = 16, verify: str = "always",
             cache_regions: int = 4096, readahead: int = READAHEAD_BYTES,
             remote_fraction: float | None = None, pack_size: int = PACK_SIZE,
             pack_delay: float = PACK_DELAY) -> Volume:
        """Open an existing volume; the replication arguments are those of :meth:`create`.

        Without ``replication``, a volume opened with its secondary resumes the mode it had. A
        volume opened without its secondary keeps noting the regions written in its replication
        map, and ships them when it is attached again; without that map (missing, or its header
        damaged), every region is compared with the secondary's records then, and those that
        differ are shipped.

        A volume whose data files were damaged or truncated still opens: the regions whose bytes
        cannot be trusted become unavailable (served from the secondary when there is one). An
        interrupted merge is finished.

        Parameters
        ----------
        path : str or PathLike
            The volume's directory.
        readonly : bool
            Open without write access; read-only opens may share the volume, and no secondary is
            attached (the arguments about replication are not used).
        secondary : ObjectStore, optional
            The volume's secondary; without it, nothing is replicated until it is given again.
        replication, period, sync_policy, max_lag_regions, workers, pack_size, pack_delay
            As for :meth:`create`; ``replication`` None resumes the recorded mode.
        verify, cache_regions, readahead, remote_fraction
            As for :meth:`create`.

        Returns
        -------
        Volume
            A context manager that closes the volume on exit.

        Raises
        ------
        FormatError
            ``path`` is not a volume, or its files are truncated, corrupted or of a newer format.
        VolumeLockedError
            Another process (or another open in this one) has it open for writing.
        InvalidArgumentError
            Bad replication options, or ``replication`` without a secondary.
        StoreAccessError
            The secondary refuses the volume's record (no such bucket, no permission). An
            unreachable secondary is not an error (see :meth:`create`).
        FormatError
            Also: the secondary holds this volume's id with another geometry or format.
        """
        path = check_path("path", path)
        _check_store(secondary)
        check_pack_options(pack_size, pack_delay)
        read_meta(path)  # a clear error for what is not a volume, before creating a lock file in it
        lock_fd = lock_directory(path, readonly, "volume is open for writing elsewhere")
        try:
            meta = read_meta(path)  # under the lock
            if not readonly:
                cls._remove_orphans(path, meta)
            return cls(path, meta, readonly, lock_fd, secondary, replication, period, sync_policy,
                       max_lag_regions, workers, verify, cache_regions, readahead, remote_fraction, pack_size,
                       pack_delay)
        except BaseException:
            os.close(lock_fd)
            raise

    @staticmethod
    def _remove_orphans(path: str, meta: VolumeMeta) -> None:
        """Delete overlay files a crash left behind that no layer list names."""
        keep = {f"overlay-{i}" for i in meta.layers}
        for name in os.listdir(path):
            stem = name.rsplit(".", 1)[0]
            if stem.startswith("overlay-") and stem not in keep:
                _log.info("%s: removing orphan %s", path, name)
                os.unlink(os.path.join(path, name))
        remove_meta_temp(path)

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether the volume is closed."""
        return self._layers is None or self._layers.live is None

    def close(self) -> None:
        """Flush, release every image and file, and drop the lock (idempotent)."""
        if self.closed:
            return
        hyd = self._hydration
        if hyd is not None:
            hyd.cancel()
            hyd.wait()
        with self._merge_lock:  # a fold copying into the base finishes its overlay first
            self._close()

    def _close(self) -> None:
        if self.closed:
            return
        if self._repl is not None:
            self._repl.stop()  # before taking the lock: a periodic snapshot may be waiting for it
        with self._wlock:
            committed = False
            try:
                if not self.readonly:
                    if self._repl is not None:
                        self._repl.before_commit()
                    elif self._detached is not None:
                        self._detached.before_commit()
                    top = self._live_layers().top
                    top.commit()
                    if self._repl is not None:
                        self._repl.after_commit()
                    top.checkpoint()
                    if self._unavail.dirty:
                        self._unavail.store()
                    committed = True
            finally:
                try:
                    if self._detach_replicator() and committed:
                        # Everything shipped was flushed: no check needed on open.
                        assert self._meta.secondary is not None
                        self._meta.secondary.clean = True
                        self._store_meta()
                finally:
                    self._teardown()

    def _teardown(self) -> None:
        if self._detached is not None:
            self._detached.close()
            self._detached = None
        if self._layers is not None:
            self._layers.close()
        if self._router is not None:
            self._router.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Bytes in the volume."""
        return self._geo.size

    @property
    def region_size(self) -> int:
        """Bytes per region."""
        return self._geo.region_size

    @property
    def num_regions(self) -> int:
        """Number of regions (the last may be partial)."""
        return self._geo.num_regions

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("read-only" if self.readonly else "open")
        return f"Volume({self.path!r}, size={self.size}, region_size={self.region_size}, {state})"

    # -- helpers ----------------------------------------------------------------------------------
    def _live_layers(self) -> LayerStack:
        """The layers, checking that the volume is open."""
        layers = self._layers
        if layers is None or layers.live is None:
            raise VolumeClosedError(f"{self.path}: volume is closed")
        return layers

    def _live(self) -> core.Stack:
        """The live read stack, checking that the volume is open."""
        stack = self._live_layers().live
        assert stack is not None
        return stack

    @property
    def _route(self) -> Router:
        router = self._router
        assert router is not None
        return router

    def layer_counts(self) -> dict[int, int]:
        """How many regions each layer serves: overlay id (0: the base) -> count, in bounded
        memory whatever the volume's size (``layer_map`` of the whole volume lists every region)."""
        return self._live_layers().layer_counts()

    def layer_map(self, first: int = 0, count: int | None = None) -> list[int]:
        """Which layer serves each region of ``[first, first + count)``: an overlay id, or 0 for the base.

        Computed with the core's batch ``resolve`` over the overlay bitmaps.

        Parameters
        ----------
        first : int
            The first region.
        count : int, optional
            How many (default: up to the end of the volume).

        Returns
        -------
        list of int

        Raises
        ------
        OutOfRangeError
            The regions are not all in the volume.
        """
        n = self._geo.region_span(first, count)
        with self._wlock:
            return self._live_layers().layer_map(first, n)

    def _check_writable(self) -> LayerStack:
        """The layers, checking that the volume is open for writing."""
        layers = self._layers
        if layers is None or layers.live is None:
            raise VolumeClosedError(f"{self.path}: volume is closed")
        if self.readonly:
            raise InvalidArgumentError(f"{self.path}: volume is open read-only")
        return layers

    def _unavailable_changed(self, marked: bool) -> None:
        """``unavailable.map`` goes from no region marked to some, or back: say so in the metadata."""
        self._meta.unavailable = marked
        self._store_meta()

    def _store_meta(self) -> None:
        if self._layers is not None:
            self._layers.persist()
        else:
            write_meta(self.path, self._meta)

    # -- data path ---------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of the virtual image.

        A region that fails locally (I/O error, truncated file, checksum mismatch) is marked
        unavailable; with a secondary, the distributed overlay begins and the read is served from
        its PIT.

        Parameters
        ----------
        offset : int
            The first byte.
        length : int
            Bytes to read; the range must be inside the volume.

        Returns
        -------
        bytes

        Raises
        ------
        OutOfRangeError
            The range is not inside the volume.
        RegionUnavailableError
            A region cannot be read locally and there is no secondary to read it from, or the
            secondary cannot serve it now (``reason`` says which).
        VolumeClosedError
            The volume is closed.
        """
        self._geo.check_range(offset, length)
        layers = self._layers
        while True:
            stack = None if layers is None else layers.live
            if stack is None:
                raise VolumeClosedError(f"{self.path}: volume is closed")
            if stack.routed or self._unavail.any():  # some regions come from elsewhere
                buf = bytearray(length)
                self.readinto(offset, buf)
                return bytes(buf)
            try:
                return bytes(stack.read(offset, length))
            except StaleStackError:
                continue
            except RegionUnavailableError as exc:
                if not self._route.detected(exc):
                    raise

    def readinto(self, offset: int, buffer: Any) -> int:
        """Read ``len(buffer)`` bytes at ``offset`` into a writable buffer, without a copy.

        Parameters
        ----------
        offset : int
            The first byte.
        buffer : writable bytes-like
            Filled entirely (a ``bytearray``, a ``memoryview``, a NumPy array, an ``mmap``);
            ``offset + len(buffer)`` must be inside the volume.

        Returns
        -------
        int
            ``len(buffer)`` in bytes.

        Raises
        ------
        InvalidBufferError
            ``buffer`` is not a writable, C-contiguous bytes-like object.
        OutOfRangeError, RegionUnavailableError, VolumeClosedError
            As :meth:`read`.
        """
        if type(offset) is not int or not 0 <= offset <= self._geo.size:
            self._geo.check_range(offset, 0)  # raises: not an int, or out of the volume
        layers = self._layers  # the hot path: no helper calls before the kernel
        while True:
            stack = None if layers is None else layers.live
            if stack is None:
                raise VolumeClosedError(f"{self.path}: volume is closed")
            try:
                if stack.routed:  # a distributed overlay: PO, PB and cached R through the kernel
                    return self._route.read_routed(stack, offset, buffer)
                if self._unavail.any():  # regions not valid locally, not routed (yet)
                    return self._route.read_by_location(stack, offset, buffer)
                n: int = stack.readinto(offset, buffer)
                return n
            except StaleStackError:
                continue  # the layers or the routing changed: read again
            except RegionUnavailableError as exc:
                if not self._route.detected(exc):
                    raise
            except (TypeError, ValueError) as exc:  # the kernel refused the buffer
                if isinstance(exc, OverlayCacheError):
                    raise
                raise InvalidBufferError(f"a writable, C-contiguous buffer is required: {exc}") from exc

    def write(self, offset: int, data: Any) -> int:
        """Write ``data`` (any bytes-like object) at ``offset``; returns the count.

        The write goes to the top overlay; it is durable once :meth:`flush` returns. In sync mode
        it returns once flushed and stored on the secondary; in async mode it may wait while more
        than ``max_lag_regions`` regions are behind.

        Parameters
        ----------
        offset : int
            The first byte.
        data : bytes-like
            What to write; ``offset + len(data)`` must be inside the volume.

        Returns
        -------
        int
            ``len(data)`` in bytes.

        Raises
        ------
        OutOfRangeError
            The range is not inside the volume.
        InvalidBufferError
            ``data`` is not a bytes-like object.
        RegionUnavailableError
            A partial write needs the rest of a region that cannot be read.
        SecondaryUnavailableError
            Sync mode with ``sync_policy="fail"`` and the secondary unreachable: the data is
            written locally and shipped later.
        VolumeClosedError
            The volume is closed.
        InvalidArgumentError
            The volume is open read-only.
        """
        view = byte_view(data)
        self._geo.check_range(offset, len(view))
        layers = self._check_writable()
        if not len(view):
            return 0
        rs = self._geo.region_size
        repl = self._repl
        if repl is not None:
            repl.throttle()
        route = self._router
        assert route is not None
        remote: dict[int, bytes] = {}
        if self._unavail.any():
            remote = route.remote_edges(offset, len(view))
        with self._wlock:
            if layers.live is None:
                raise VolumeClosedError(f"{self.path}: volume is closed")
            top = layers.overlays[-1]
            self._rw.acquire_write()
            pos, end = offset, offset + len(view)
            noted = offset  # regions up to here are in the replication map already
            try:
                while pos < end:
                    if top.regions_dirty >= AUTO_COMMIT_REGIONS:
                        self._rw.release_write()
                        try:
                            self._note_written(noted, pos)
                            noted = pos
                            self.flush()
                        finally:
                            self._rw.acquire_write()
                    r = pos // rs
                    intra = pos - r * rs
                    take = min(rs - intra, end - pos)
                    route.write_region(top, r, intra, view[pos - offset : pos - offset + take], remote)
                    pos += take
            finally:
                self._rw.release_write()
                self._note_written(noted, pos)  # the regions written, even if a later one failed
        if repl is not None and repl.policy.ships_on_write:
            self.flush()
            repl.ship_after_write(offset // rs, (offset + len(view) - 1) // rs)
        return len(view)

    def _note_written(self, start: int, stop: int) -> None:
        """Record bytes ``[start, stop)`` as written in the replication map (or the detached one)."""
        if stop <= start:
            return
        rs = self._geo.region_size
        tracker = self._repl if self._repl is not None else self._detached
        if tracker is not None:
            tracker.note_written(start // rs, (stop - 1) // rs)

    def flush(self) -> None:
        """Make every write so far durable (data first, then the journal that points at it).

        With a secondary, the replication map is made durable first, so that a crash can make a
        region be shipped twice but never skipped.

        Raises
        ------
        VolumeClosedError
            The volume is closed.
        """
        if self.readonly:
            self._live()
            return
        with self._wlock:
            self._live()
            if self._repl is not None:
                self._repl.before_commit()
            elif self._detached is not None:
                self._detached.before_commit()
            self._live_layers().top.commit()
            if self._repl is not None:
                self._repl.after_commit()
            if self._unavail.dirty:
                self._unavail.store()

    # -- local snapshots ---------------------------------------------------------------------------
    def local_snapshots(self) -> list[LocalSnapshot]:
        """The local snapshots, oldest first."""
        self._live()
        return list(self._meta.snapshots)

    def _find_snapshot(self, snapshot: Any) -> LocalSnapshot:
        return self._live_layers().find_snapshot(snapshot)

    def local_snapshot(self, label: str | None = None) -> LocalSnapshot:
        """Freeze the top overlay as a snapshot and push an empty writable overlay (Fig. 2).

        Parameters
        ----------
        label : str, optional
            A unique name for the snapshot.

        Returns
        -------
        LocalSnapshot

        Raises
        ------
        InvalidArgumentError
            The label is not a non-empty string or is taken, or the volume is read-only.
        """
        self._check_writable()
        with self._wlock:
            layers = self._live_layers()
            snap = layers.snapshot(label)
        _log.info("%s: local snapshot %s (%s) at layer %d", self.path, snap.id, label, snap.layer)
        return snap

    def delete_local_snapshot(self, snapshot: LocalSnapshot | str) -> LocalSnapshot:
        """Forget a local snapshot (by object, id or label); returns it. Its open images are
        closed. The overlay it froze stays in the stack (newer levels read through it) until
        :meth:`merge_down` folds it into the base.

        Parameters
        ----------
        snapshot : LocalSnapshot or str
            The snapshot, its id, or its unique label.

        Returns
        -------
        LocalSnapshot
            The snapshot forgotten.

        Raises
        ------
        SnapshotNotFoundError
            No such local snapshot.
        """
        self._check_writable()
        with self._wlock:
            snap = self._live_layers().delete_snapshot(snapshot)
        _log.info("%s: local snapshot %s (%s) deleted", self.path, snap.id, snap.label)
        return snap

    def image(self, snapshot: LocalSnapshot | Snapshot | str) -> Any:
        """A read-only virtual image of a snapshot: local (a :class:`VirtualImage`) or a PIT on the
        secondary (a :class:`RecoveryImage`, reading still-valid identical regions locally).

        ``snapshot`` is a snapshot object, its id or its unique label; local snapshots are looked up
        first. Several images can be open at once; none changes the volume. A recovery image pins
        its PIT with a lease of a day, so that a collapse keeps it.

        Parameters
        ----------
        snapshot : LocalSnapshot, Snapshot or str
            The snapshot, its id, or its unique label.

        Returns
        -------
        VirtualImage or RecoveryImage
            A context manager; it closes when the volume closes too.

        Raises
        ------
        SnapshotNotFoundError
            No such local snapshot, nor PIT.
        InvalidArgumentError
            ``snapshot`` is not a snapshot, id or label, or its label names several.
        """
        if isinstance(snapshot, Snapshot) or (
            isinstance(snapshot, str) and self._repl is not None
            and not any(snapshot in (s.id, s.label) for s in self.local_snapshots())
        ):
            # It asks the PIT for exactly the regions not identical locally: no readahead.
            image = RecoveryImage(self._route, self.remote_image(snapshot, readahead=0))
            image.remote.lease = self._route.lease_for_image(image.snapshot.id)  # renewed while open
            return image
        snap = self._find_snapshot(snapshot)
        with self._wlock:
            layers = self._live_layers()
            img = VirtualImage(snap, self._geo.size, layers.build(snap.layer), layers.close_image, volume_id=self.id)
            layers.images.add(img)
        return img

    def open_clone(self, path: str | os.PathLike[str]) -> Clone:
        """Open the clone in ``path`` (made by ``image.clone(path)``) over a new image of its snapshot.

        The clone owns that image and closes it when it closes. The clone never writes to the
        volume or to the secondary.

        Parameters
        ----------
        path : str or PathLike
            The clone's directory.

        Returns
        -------
        Clone
            Open; a context manager.

        Raises
        ------
        FormatError
            ``path`` is not a clone, or its files are corrupted or of a newer format.
        CloneMismatchError
            The clone is of another volume, or the snapshot found under its id is another one.
        SnapshotNotFoundError
            Its snapshot no longer exists (collapsed on the secondary, or merged away locally).
        VolumeLockedError
            The clone is open elsewhere.
        """
        self._live()
        return open_clone(self, check_path("path", path))

    def merge_down(self) -> int:
        """Fold the oldest overlay into the base; returns the number of regions copied.

        The snapshot whose image was the base alone (if any) is released, as its image changes;
        every other snapshot keeps its image. Crash-safe: until the overlay is dropped from the
        layer list it still shadows the base regions being rewritten, and an interrupted merge is
        finished on the next open.

        Raises
        ------
        InvalidArgumentError
            A distributed overlay is active (the base is not written then), or the volume is
            read-only.
        VolumeClosedError
            The volume is closed.
        """
        self._check_writable()
        with self._merge_lock, self._wlock:
            self._live()
            if self._do is not None:
                raise InvalidArgumentError(
                    f"{self.path}: the base is not written while a distributed overlay is active "
                    "(restore or end it first)")
            layers = self._live_layers()
            if len(layers.overlays) == 1:
                layers.push()
            return layers.merge_oldest()

    # -- the secondary ------------------------------------------------------------------------------
    def _replicator(self) -> Replicator:
        self._live()
        if self._repl is None:
            raise InvalidArgumentError(f"{self.path}: no secondary attached (open with secondary=...)")
        return self._repl

    @property
    def secondary_stats(self) -> StoreStats | None:
        """Requests made to the secondary and bytes moved since the volume was opened, by kind
        (PUT, GET, HEAD, LIST, DELETE): what its object-store bill counts. None without one."""
        return self._metered.stats() if self._repl is not None and self._metered is not None else None

    @property
    def secondary(self) -> ObjectStore | None:
        """The attached store (as given), or None."""
        return self._metered.inner if self._repl is not None and self._metered is not None else None

    @property
    def replication(self) -> str | None:
        """The replication mode, or None without a secondary."""
        return self._repl.mode if self._repl is not None else None

    @property
    def replication_lag(self) -> Lag:
        """Regions and bytes not yet on the secondary, and the age of the oldest such change.

        Raises ``InvalidArgumentError`` without a secondary.
        """
        return self._replicator().lag()

    def replicate(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Ship every unsynced region now; returns how many this call shipped.

        ``progress(done, total)`` is called after each batch: use it to follow the initial full
        sync after a secondary is attached to a volume with data.

        Parameters
        ----------
        progress : callable, optional
            ``progress(done, total)``, in regions.

        Returns
        -------
        int
            Regions shipped by this call (those the background shipper took are not counted).

        Raises
        ------
        SecondaryUnavailableError
            The store cannot be reached; nothing is lost, the regions stay pending.
        InvalidArgumentError
            No secondary is attached.
        """
        check_callback("progress", progress)
        repl = self._replicator()
        shipped = repl.ship(progress=progress)
        repl.wait_idle()
        return shipped + repl.ship(progress=progress)

    def snapshot(self, label: str | None = None) -> Snapshot:
        """Publish a PIT snapshot on the secondary and return it.

        Drains what is unsynced while writes go on, then holds writers off for the remainder, so
        the PIT is one consistent image of the volume. It stores the map pages that changed since
        the last PIT and a root: a few objects, whatever the volume's size.

        Parameters
        ----------
        label : str, optional
            A name for it, unique among the volume's PITs.

        Returns
        -------
        Snapshot

        Raises
        ------
        InvalidArgumentError
            No secondary is attached, or the label is empty or taken.
        SecondaryUnavailableError
            The store cannot be reached: no PIT is published, nothing is lost.
        StoreError
            The store refused a request.
        """
        self._replicator()
        if label is not None:
            if not isinstance(label, str) or not label:
                raise InvalidArgumentError("label must be a non-empty string")
            if any(s.label == label for s in self.snapshots()):
                raise InvalidArgumentError(f"a snapshot labelled {label!r} exists on the secondary")
        return self._route.snapshot(label)

    def snapshots(self) -> list[Snapshot]:
        """The PIT snapshots of this volume on the secondary, oldest first.

        Raises ``InvalidArgumentError`` without a secondary, :class:`StoreError` when the store
        fails.
        """
        return Catalog(self._replicator().store).snapshots(self.id)

    def remote_image(self, snapshot: Snapshot | str, readahead: int | None = None) -> Any:
        """A read-only image of a PIT snapshot, read from the secondary alone (see
        :meth:`Catalog.image`); :meth:`image` also reads identical regions locally.

        Parameters
        ----------
        snapshot : Snapshot or str
            The PIT, its id, or its unique label.
        readahead : int, optional
            Regions a sequential read keeps in flight ahead of it (default: 64 MiB worth).

        Returns
        -------
        RemoteImage
            A context manager.

        Raises
        ------
        InvalidArgumentError
            No secondary is attached.
        SnapshotNotFoundError
            No such PIT.
        CorruptionError, FormatError, StoreError
            The PIT cannot be read from the store.
        """
        catalog = Catalog(self._replicator().store)
        where = f"{catalog.store.location} volume {self.id}"
        return catalog.image(self.id, find_snapshot(catalog.snapshots(self.id), snapshot, where),
                             readahead=readahead)

    # -- unavailable regions and the distributed overlay ---------------------------------------------
    @property
    def _do(self) -> DistributedOverlayState | None:
        return self._meta.distributed_overlay

    @property
    def unavailable(self) -> frozenset[int]:
        """Regions whose local data is not valid (failed reads, checksum mismatches, declared lost)."""
        return self._unavail.regions()

    @property
    def distributed_overlay(self) -> dict[str, Any] | None:
        """The active distributed overlay: its first layer, PIT snapshot id and lost regions; or None."""
        do = self._do
        return do.to_json() if do is not None else None

    def location_map(self, first: int = 0, count: int | None = None) -> list[str]:
        """Where each region of ``[first, first + count)`` is read from: "PO", "PB" or "R".

        PO: written since the distributed overlay began; PB: the local layers below it, still
        valid; R: the remote PIT snapshot. Computed with the core's batch ``resolve`` kernel.
        Without a distributed overlay every region is PB, unavailable ones R.

        Parameters
        ----------
        first : int
            The first region.
        count : int, optional
            How many (default: up to the end of the volume).

        Returns
        -------
        list of str

        Raises
        ------
        OutOfRangeError
            The regions are not all in the volume.
        VolumeClosedError
            The volume is closed.
        """
        n = self._geo.region_span(first, count)
        with self._wlock:
            self._live()
            codes = self._route.codes(first, n)
        names = CODE_NAMES
        return [names[c] for c in codes]

    def _mark(self, regions: Iterable[int], reason: Reason) -> list[int]:
        """Record ``regions`` as unavailable (durably); returns the newly marked ones."""
        with self._wlock:
            return self._unavail.mark(regions, reason)

    def mark_unavailable(self, regions: Iterable[int]) -> None:
        """Declare regions unreadable (lost device or link); with a secondary, this begins the
        distributed overlay (Fig. 3F) if it is not active yet.

        The marks are durable (``unavailable.map``). Without a secondary, reads of those regions
        raise :class:`RegionUnavailableError` until they are written again.

        Parameters
        ----------
        regions : iterable of int
            Region numbers (a ``range`` is checked by its ends, not materialized).

        Raises
        ------
        OutOfRangeError
            A region number is not in the volume.
        InvalidArgumentError
            ``regions`` is not an iterable of ints, or the volume is read-only.
        StoreError
            Beginning the distributed overlay failed; the marks stay.
        """
        self._check_writable()
        regs = self._geo.check_regions("regions", regions)
        self._mark(regs, Reason.DECLARED)
        if self._repl is not None and regs:
            self.begin_distributed_overlay()

    def begin_distributed_overlay(self) -> Snapshot:
        """Begin the distributed overlay snapshot (Fig. 3F); idempotent while one is active.

        1. Ship every unsynced region that is still readable; unsynced regions that cannot be read
           are lost (their newest copy is the last replicated one): logged and kept in
           ``distributed_overlay["lost"]``.
        2. Publish a PIT snapshot on the secondary.
        3. Push a fresh overlay: all later writes go to it; the layers below are not written again.

        Returns the PIT snapshot that serves the regions not valid locally (R).

        Raises
        ------
        InvalidArgumentError
            No secondary is attached, or the volume is read-only.
        StoreError
            The store failed; nothing has begun, and the unreadable regions stay pending.
        """
        self._replicator()
        self._check_writable()
        return self._route.begin_distributed_overlay()

    def hydrate(self, progress: Callable[[int, int], None] | None = None, *, background: bool = False,
                rate: float | None = None, idle: float = IDLE) -> Hydration:
        """Copy the remote (R) regions of the distributed overlay to local storage.

        Each R region is fetched from the PIT (through the region cache) and installed whole in the
        top overlay: the volume then reads everything locally, and the restore that ends the
        distributed overlay folds those regions into the base. They are not shipped again (the
        secondary has them). Foreground I/O goes first: a batch waits until ``idle`` seconds pass
        without reads or writes; ``rate`` caps the bytes installed per second.
        ``progress(done, total)`` is called after each batch.

        Returns the :class:`Hydration` handle: finished, or running in a background thread if
        ``background`` (one at a time: the running one is returned). A region the secondary cannot
        serve stops the run (``Hydration.error``; raised too when not in the background).

        Every R region is installed whole, all-zero ones included (each takes a slot in the top
        overlay until a restore folds the overlays). Without a distributed overlay there is
        nothing to do.

        Parameters
        ----------
        progress : callable, optional
            ``progress(done, total)``, in regions.
        background : bool
            Run in a background thread and return at once (``Hydration.wait()``).
        rate : float, optional
            Bytes installed per second at most.
        idle : float
            Seconds without foreground reads or writes that each batch waits for (0: do not wait).

        Returns
        -------
        Hydration

        Raises
        ------
        InvalidArgumentError
            ``rate`` <= 0 or ``idle`` < 0, or the volume is read-only.
        CorruptionError, SecondaryUnavailableError, StoreError
            Not in the background: a region could not be fetched (those before it are installed).
        """
        check_callback("progress", progress)
        self._check_writable()
        with self._wlock:
            running = self._hydration
            if running is not None and not running.finished:
                return running
            regions = sorted(self._route.remote_regions())
            hyd = self._hydration = Hydration(self._route, regions, progress, rate, idle)
        if background:
            hyd.start()
        else:
            hyd.run()
            if hyd.error is not None:
                raise hyd.error
        return hyd

    def clear_cache(self) -> int:
        """Drop every region kept in the remote region cache; returns how many were dropped."""
        self._live()
        return self._route.clear_cache()

    def scrub(self, progress: Callable[[int, int], None] | None = None) -> list[int]:
        """Verify every local region against its checksum; returns the bad ones, now unavailable.

        Regions already unavailable are skipped. It runs as a :class:`~overlaycache.jobs.Job`;
        ``progress(done, total)`` is called after each batch of regions. With a secondary, bad
        regions begin the distributed overlay. It reads the whole volume.

        Parameters
        ----------
        progress : callable, optional
            ``progress(done, total)``, in regions.

        Returns
        -------
        list of int
            The regions that failed their checksum or could not be read.

        Raises
        ------
        VolumeClosedError
            The volume is closed.
        """
        check_callback("progress", progress)
        with self._wlock:
            if not self.readonly:
                self._live_layers().top.hash_dirty()
        n = self._geo.num_regions
        bad: list[int] = []

        def check(batch: list[int]) -> int:
            for r in batch:
                if not self._unavail.bits.test(r):
                    with self._wlock:  # per region: writes go on between them
                        if not self._live_layers().verify(r):
                            bad.append(r)
            return len(batch)

        Job("scrub", self.path, range(n), check, batch=max(1, min(n // 100, 4096)),
            unit_bytes=self._geo.region_size, progress=progress).run_or_raise()
        if bad and not self.readonly:
            self._mark(bad, Reason.CHECKSUM)
            if self._repl is not None:
                self.begin_distributed_overlay()
        return bad


    # -- recovery ------------------------------------------------------------------------------------
    def diff(self, a: Any, b: Any = None) -> list[int]:
        """Regions whose contents differ between two PIT snapshots (or images), or between one and
        the volume as it is now (``b=None``); from PIT maps and checksums, no data read.

        It compares every region's checksum: a pass over the whole volume (about 3 s per million
        regions on this project's machine); against the volume, writes wait meanwhile.

        Parameters
        ----------
        a : Snapshot, str or image
            A PIT (object, id or label), or an image with ``region_checksum`` (a recovery or remote
            image).
        b : Snapshot, str or image, optional
            Another; None compares ``a`` with the volume as it is now.

        Returns
        -------
        list of int
            The differing regions, in increasing order.

        Raises
        ------
        InvalidArgumentError
            Neither is given, or no secondary is attached to read a PIT from.
        SnapshotNotFoundError
            No such PIT.
        """

        def sums(x: Any) -> Callable[[int], bytes]:
            img = x if hasattr(x, "region_checksum") else self.remote_image(x)
            return img.region_checksum  # type: ignore[no-any-return]

        if a is None or b is None:
            if a is None and b is None:
                raise InvalidArgumentError("diff needs a snapshot or an image")
            return self._route.differing(sums(b if a is None else a))
        sa, sb = sums(a), sums(b)
        return [r for r in range(self._geo.num_regions) if sa(r) != sb(r)]

    def restore(self, image: Any, progress: Callable[[int, int], None] | None = None,
                fold: bool = True) -> list[int]:
        """Make the volume equal to ``image`` (a PIT snapshot or recovery image), writing only the
        regions that differ, and end the distributed overlay; returns the regions rewritten.

        Reads keep working throughout. Writes wait while the regions are compared (:meth:`diff`,
        a pass over every region's checksum), then go on while the differing regions are
        rewritten; a write that lands then is kept only if it comes after the restored region
        (the restore writes through the normal path). It runs as a
        :class:`~overlaycache.jobs.Job`; ``progress(done, total)`` is called after each region.

        With ``fold`` the overlays are then merged into the base (:meth:`merge_down` until one
        empty overlay is left), so that the base is whole again; as with ``merge_down``, local
        snapshots whose images were the layers merged away are released. A base file that was
        truncated gets its length back first; one that was deleted or replaced keeps the overlays
        (logged), as does any region that fails its checksum while merging.

        Parameters
        ----------
        image : Snapshot, str or RecoveryImage
            A PIT (object, id or label), or a recovery image of one (:meth:`image`). Local
            snapshots are not restored this way (their image has no PIT map to compare with).
        progress : callable, optional
            ``progress(done, total)``, in regions rewritten.
        fold : bool
            Merge the overlays into the base afterwards (default True).

        Returns
        -------
        list of int
            The regions rewritten.

        Raises
        ------
        InvalidArgumentError
            No secondary is attached, ``image`` names a local snapshot, or the volume is read-only.
        SnapshotNotFoundError
            No such PIT.
        CorruptionError, SecondaryUnavailableError, StoreError
            A region could not be read from the secondary: the regions before it are rewritten,
            the distributed overlay goes on.
        """
        check_callback("progress", progress)
        self._check_writable()
        img = image if isinstance(image, RecoveryImage) else self.image(image)
        if not isinstance(img, RecoveryImage):  # a local snapshot: its image is not a PIT
            img.close()
            raise InvalidArgumentError(f"{self.path}: restore takes a PIT snapshot on the secondary; {image!r} is a "
                                       "local snapshot (read it with image(), clone it, or export it)")
        todo = self.diff(img)
        rs = self._geo.region_size

        def rewrite(batch: list[int]) -> int:
            for r in batch:
                self.write(r * rs, img.remote.read(r * rs, self._geo.region_length(r)))
            return len(batch)

        Job("restore", self.path, todo, rewrite, batch=1, unit_bytes=rs, progress=progress).run_or_raise()
        with self._wlock:
            self.flush()
            self._unavail.clear()
            self._unavail.store()
            self._route.end()
        _log.warning("%s: restored to PIT %s (%d regions rewritten); distributed overlay ended",
                     self.path, img.snapshot.id, len(todo))
        if fold:
            self._live_layers().fold()
        return todo


def _check_store(store: Any) -> None:
    if store is not None and not isinstance(store, ObjectStore):
        raise InvalidArgumentError(
            f"secondary must be an object store (S3Store, LocalStore, open_store(url)), got {type(store).__name__}")
