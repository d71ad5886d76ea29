"""The layer stack of a volume: its base and overlays, and the read stacks the kernel reads through.

Contract
--------
* The layers are the base (id 0) and the overlays, oldest first; writes go to the top overlay.
* A *read stack* (``core.Stack``) of a level reads each region from the newest layer up to that
  level that holds it. The *live* stack is the volume's own (the top level); images of local
  snapshots have stacks of their own levels. Stacks change only with the stack lock (``rw``)
  held for writing, so a read in progress never sees layers come or go (it retries on
  :class:`~overlaycache.errors.StaleStackError`).
* The stack owns the volume's metadata (``volume.json``, :mod:`overlaycache.local.meta`) and writes
  it whenever the layers or local snapshots change.
* A local snapshot freezes the top overlay and pushes an empty one (Fig. 2); pushing commits the
  top overlay first.
* Merging folds the oldest overlay into the base: the merge is recorded first (``merging``), each
  region is copied verified, the base's checksums stored, then the overlay dropped. Until then the
  overlay shadows the base regions being rewritten, so a crash at any point is finished on the
  next open. The snapshot whose image was the base alone is released (its image changes).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from overlaycache._fs import DIR_MODE, fsync_dir, lock_directory
from overlaycache._impl import core
from overlaycache.errors import InvalidArgumentError, MediaError, OverlayCacheError, Reason, RegionUnavailableError
from overlaycache.local.layers import BaseLayer, Layer, Overlay
from overlaycache.local.geometry import Geometry
from overlaycache.local.meta import VolumeMeta, write_meta
from overlaycache.snapshots import LocalSnapshot, find_snapshot

_log = logging.getLogger(__name__)

MAX_OVERLAYS = 250
VERIFY_POLICIES = ("always", "sampled", "scrub-only")
_SAMPLE = 16  # "sampled" verification: one region in this many
_SUMS_BATCH = 65536  # a merge stores the base's checksums after this many regions (the data synced first)


class StackedImage(Protocol):
    """An image of a local snapshot, reading through a stack of its level (see :mod:`overlaycache.images`)."""

    snapshot: LocalSnapshot

    def detach(self, reason: str) -> Any:
        """Close the image; returns its read stack, to release."""

    def replace_stack(self, stack: core.Stack) -> Any:
        """Read through ``stack`` from now on; returns the old one, to release."""


def _identity(stack: core.Stack) -> core.Stack:
    return stack


def _nothing() -> None:
    pass


class LayerStack:
    """The base and overlays of a volume, opened, with the live read stack and the metadata.

    Parameters
    ----------
    directory : str
        Where the layer files are.
    meta : VolumeMeta
        The volume's metadata (its layer list opens the overlays).
    writable : bool
        Open the files for writing.
    rw : core.RWLock
        The stack lock shared by every read stack of the volume.
    wlock : threading.RLock
        The volume's writer lock.
    merge_lock : threading.RLock
        One merge at a time.

    Attributes
    ----------
    route : callable
        ``route(stack) -> stack``: what the live stack goes through when it is built (the failover
        router routes it through the region cache during a distributed overlay).
    images : set
        The open images of local snapshots, restacked by merges and detached on close.
    """

    def __init__(self, directory: str, meta: VolumeMeta, writable: bool, rw: core.RWLock,
                 wlock: threading.RLock, merge_lock: threading.RLock) -> None:
        self.directory = directory
        self.meta = meta
        self.geo = geo = meta.geometry
        self.rw = rw
        self.wlock = wlock
        self.merge_lock = merge_lock
        self.writable = writable
        self.overlays: list[Overlay] = []
        self.live: core.Stack | None = None
        self.route: Callable[[core.Stack], core.Stack] = _identity
        #: Called around every commit of the top overlay made here (a push): the replication map's
        #: write intents must be durable before the data they cover (see Volume.flush).
        self.before_commit: Callable[[], None] = _nothing
        self.after_commit: Callable[[], None] = _nothing
        self.images: set[StackedImage] = set()
        self._closed = False
        #: Regions whose current version (in the live stack) was checked against its checksum.
        self.verified = core.Bitmap(geo.num_regions)
        self.base: BaseLayer = BaseLayer(directory, geo, writable, meta.id)
        try:
            for layer_id in meta.layers:
                self.overlays.append(Overlay(directory, layer_id, geo, writable, meta.id,
                                             top=layer_id == meta.layers[-1]))
        except BaseException:
            self.close()
            raise

    def hook_commits(self, before: Callable[[], None] = _nothing, after: Callable[[], None] = _nothing) -> None:
        """Set what runs around the commits made here (none given: nothing)."""
        self.before_commit, self.after_commit = before, after

    def persist(self) -> None:
        """Write the metadata (with the current layer list) durably."""
        if self.overlays:
            self.meta.layers = [ov.id for ov in self.overlays]
        write_meta(self.directory, self.meta)

    @property
    def top(self) -> Overlay:
        """The overlay that takes writes."""
        return self.overlays[-1]

    def apply_verify_policy(self, verify: str) -> None:
        """Which regions are verified on their first read: every one ("always"), one in 16
        ("sampled"), or none, leaving it to scrub ("scrub-only")."""
        if verify not in VERIFY_POLICIES:
            raise InvalidArgumentError(f"verify must be one of {VERIFY_POLICIES}, got {verify!r}")
        if verify == "always":
            return
        n = self.geo.num_regions
        self.verified.set_range(0, n)
        if verify == "sampled":
            for r in range(0, n, _SAMPLE):
                self.verified.clear(r)

    # -- read stacks -----------------------------------------------------------------------------
    def layers_up_to(self, layer_id: int) -> list[Layer]:
        """Layers newest first, from ``layer_id`` (0 = base) down to the base."""
        chosen = [ov for ov in self.overlays if ov.id <= layer_id]
        return [*reversed(chosen), self.base]

    def build(self, layer_id: int | None = None) -> core.Stack:
        """A read stack of the level ``layer_id`` (default: the top). The live level shares
        :attr:`verified`; another level (an image) verifies its regions afresh, in a bitmap of its own."""
        level = self.top.id if layer_id is None else layer_id
        verified = self.verified if level == self.top.id else core.Bitmap(self.geo.num_regions)
        entries = [layer.stack_entry(verified) for layer in self.layers_up_to(level)]
        return core.Stack(self.rw, self.geo.region_size, self.geo.size, entries)

    def build_live(self) -> core.Stack:
        """A new live stack (the top level, through :attr:`route`)."""
        return self.route(self.build())

    def install_live(self, stack: core.Stack) -> None:
        """Make ``stack`` the live stack (taking the stack lock) and release the old one."""
        self.rw.acquire_write()
        try:
            old, self.live = self.live, stack
        finally:
            self.rw.release_write()
        if old is not None:
            old.release()

    def layer_map(self, first: int, count: int) -> list[int]:
        """Which layer serves each region: an overlay id, or 0 for the base (batch ``resolve``)."""
        newest_first = list(reversed(self.overlays))
        ids = [ov.id for ov in newest_first] + [0]
        found = core.resolve([ov.present for ov in newest_first], first, count)
        return [ids[i] for i in found]

    def layer_counts(self) -> dict[int, int]:
        """How many regions each layer serves (overlay id, 0 for the base), resolved a million
        regions at a time: bounded memory whatever the volume's size."""
        newest_first = list(reversed(self.overlays))
        ids = [ov.id for ov in newest_first] + [0]
        maps = [ov.present for ov in newest_first]
        counts = dict.fromkeys(ids, 0)
        n, step = self.geo.num_regions, 1 << 20
        for first in range(0, n, step):
            found = core.resolve(maps, first, min(step, n - first))
            for i, layer_id in enumerate(ids):
                counts[layer_id] += found.count(i)
        return counts

    # -- checksums ---------------------------------------------------------------------------------
    def checksums(self) -> bytearray:
        """The checksum of every region's current version, from the layers' tables (no data read);
        the top overlay's uncommitted regions are hashed first."""
        if self.writable:
            self.top.hash_dirty()
        newest_first = list(reversed(self.overlays))
        found = core.resolve([ov.present for ov in newest_first], 0, self.geo.num_regions)
        layers: list[Layer] = [*newest_first, self.base]
        out = bytearray(16 * self.geo.num_regions)
        for r, idx in enumerate(found):
            out[16 * r : 16 * r + 16] = layers[idx].checksum_of(r)
        return out

    def _serving(self, r: int) -> tuple[Layer, int]:
        """The layer serving region ``r`` in the live stack, and the region's offset in its file."""
        live = self.live
        assert live is not None
        idx, off = live.locate(r)
        return self.layers_up_to(self.top.id)[idx], off

    def committed_checksum(self, r: int) -> bytes | None:
        """The checksum of region ``r``'s current version, or None when it is not committed yet."""
        layer, _off = self._serving(r)
        if isinstance(layer, Overlay) and layer.is_dirty(r):
            return None
        return layer.checksum_of(r)

    def verify(self, r: int) -> bool:
        """Read region ``r``'s current version and check it against its checksum (scrub); a good
        one is remembered as verified."""
        try:
            layer, off = self._serving(r)
            ok = bytes(layer.data.checksum(off, self.geo.region_length(r))) == layer.checksum_of(r)
        except (MediaError, RegionUnavailableError):
            ok = False
        if ok:
            self.verified.set(r)
        return ok

    # -- local snapshots and images ---------------------------------------------------------------
    def find_snapshot(self, key: Any) -> LocalSnapshot:
        """The local snapshot named by ``key`` (a snapshot, its id, or its unique label)."""
        return find_snapshot(self.meta.snapshots, key, f"{self.directory} (local snapshots)")

    def snapshot(self, label: str | None) -> LocalSnapshot:
        """Freeze the top overlay as a snapshot and push an empty writable overlay (Fig. 2); the
        caller holds the writer lock."""
        if label is not None:
            if not isinstance(label, str) or not label:
                raise InvalidArgumentError("label must be a non-empty string")
            if any(s.label == label for s in self.meta.snapshots):
                raise InvalidArgumentError(f"a snapshot labelled {label!r} exists")
        meta = self.meta
        snap = LocalSnapshot(str(meta.next_snapshot), label, time.time(), self.top.id)
        saved = (list(meta.snapshots), meta.next_snapshot)
        meta.next_snapshot += 1
        meta.snapshots.append(snap)
        try:
            self.push()
        except BaseException:
            meta.snapshots, meta.next_snapshot = saved
            raise
        return snap

    def delete_snapshot(self, key: Any) -> LocalSnapshot:
        """Forget a local snapshot (its open images are closed); the caller holds the writer lock.
        Its layer stays: newer levels read through it until a merge folds it into the base."""
        snap = self.find_snapshot(key)
        meta = self.meta
        meta.snapshots = [s for s in meta.snapshots if s.id != snap.id]
        try:
            self.persist()
        except BaseException:
            meta.snapshots = sorted([*meta.snapshots, snap], key=lambda s: int(s.id))
            raise
        for img in [i for i in self.images if i.snapshot.id == snap.id]:
            self.close_image(img)
        return snap

    def close_image(self, img: StackedImage) -> None:
        """Detach an image and release its stack."""
        with self.wlock:
            self.rw.acquire_write()
            try:
                stack = img.detach("closed")
            finally:
                self.rw.release_write()
            if stack is not None:
                stack.release()
            self.images.discard(img)

    # -- push and merge ----------------------------------------------------------------------------
    def push(self) -> None:
        """Freeze the top overlay (committed and checkpointed) and push a new empty one; the
        caller holds the writer lock. The metadata records it before any reader sees it."""
        if len(self.overlays) >= MAX_OVERLAYS:
            raise InvalidArgumentError(f"at most {MAX_OVERLAYS} overlays: merge_down() first")
        top = self.top
        self.before_commit()
        top.commit()
        self.after_commit()
        top.checkpoint()
        new_id = self.meta.next_layer
        Overlay.create(self.directory, new_id, self.geo, self.meta.id)
        fsync_dir(self.directory)
        self.meta.next_layer = new_id + 1
        overlay = Overlay(self.directory, new_id, self.geo, True, self.meta.id, top=True)
        self.rw.acquire_write()
        try:
            self.overlays.append(overlay)
            try:
                self.persist()
            except BaseException:
                self.overlays.pop()
                overlay.close()
                raise
            top.freeze()  # mapped at its own length from now on
            old, self.live = self.live, self.build_live()
            if old is not None:
                old.release()
        finally:
            self.rw.release_write()
        top.release_retired()

    def merge_oldest(self) -> int:
        """Fold the oldest overlay into the base; the caller holds the writer lock throughout.
        Returns the number of regions copied."""
        ov, regions = self.merge_begin()
        self.merge_copy(ov, regions)
        return self.merge_end(ov, regions)

    def merge_begin(self) -> tuple[Overlay, list[int]]:
        """Record the merge of the oldest overlay (released snapshots first); under the writer
        lock. Returns the overlay and the regions to copy."""
        ov = self.overlays[0]
        regions = [r for a, b in ov.present.runs() for r in range(a, b)]
        meta = self.meta
        dropped = [s for s in meta.snapshots if s.layer == 0]
        if dropped or meta.merging != ov.id:
            meta.snapshots = [s for s in meta.snapshots if s.layer != 0]
            meta.merging = ov.id
            self.persist()
            gone = {s.id for s in dropped}
            for img in [i for i in self.images if i.snapshot.id in gone]:
                self.close_image(img)
        return ov, regions

    def merge_copy(self, ov: Overlay, regions: list[int]) -> None:
        """Copy ``ov``'s regions into the base, each verified first, then sync the base and store
        its checksums. Needs no lock when ``ov`` is not the top overlay: nothing else writes either,
        and readers see ``ov``, which shadows those regions. A failure forgets the merge.

        Raises
        ------
        RegionUnavailableError
            A region of ``ov`` cannot be read or fails its checksum: nothing more is copied.
        """
        base, geo = self.base, self.geo
        try:
            sums: dict[int, bytes] = {}
            for r in regions:
                rlen = geo.region_length(r)
                try:
                    off = ov.offset_of(r)
                    csum = ov.checksum_of(r)
                    if ov.data.checksum(off, rlen) != csum:
                        raise RegionUnavailableError(
                            f"{ov.data_path}: region {r} does not match its checksum; merge aborted",
                            (r,), Reason.CHECKSUM)
                    ov.data.copy_to(off, base.data, r * geo.region_size, rlen)
                except MediaError as exc:
                    raise RegionUnavailableError(f"region {r}: {exc}; merge aborted", (r,), Reason.IO) from exc
                sums[r] = csum
                if len(sums) >= _SUMS_BATCH:
                    base.data.sync()
                    base.store_sums(sums)
                    sums = {}
            base.data.sync()
            base.store_sums(sums)
        except BaseException:
            with self.wlock:
                self.meta.merging = None
                self.persist()
            raise

    def merge_end(self, ov: Overlay, regions: list[int]) -> int:
        """Drop the merged overlay from the layers and restack the live stack and the images;
        under the writer lock. Returns the number of regions merged."""
        meta = self.meta
        self.rw.acquire_write()
        try:
            self.overlays.pop(0)
            meta.snapshots = [LocalSnapshot(s.id, s.label, s.created_at, 0) if s.layer == ov.id else s
                              for s in meta.snapshots]
            meta.merging = None
            self.persist()
            old = [self.live]
            self.live = self.build_live()
            for img in self.images:
                old.append(img.replace_stack(self.build(img.snapshot.layer)))
            for stack in old:
                if stack is not None:
                    stack.release()
        finally:
            self.rw.release_write()
        # Snapshot objects handed out earlier keep their old layer id; images look it up afresh.
        for img in self.images:
            img.snapshot = self.find_snapshot(img.snapshot.id)
        ov.close()
        Overlay.remove_files(self.directory, ov.id)
        fsync_dir(self.directory)
        _log.info("%s: merged overlay %d into the base (%d regions)", self.directory, ov.id, len(regions))
        return len(regions)

    def fold(self) -> None:
        """Merge every overlay into the base while writes go on (they go to the top overlay,
        which is folded in turn); stops if a distributed overlay begins (the base is not written
        then), and keeps the overlays if a region cannot be copied (logged)."""
        with self.wlock:
            try:
                if self.base.repair():
                    _log.warning("%s: base file was truncated; its length is back", self.directory)
            except MediaError as exc:
                _log.error("%s: cannot fold the overlays into the base: %s", self.directory, exc)
                return
            released = {s.id for s in self.meta.snapshots}
        while True:
            with self.merge_lock:
                with self.wlock:
                    if self.live is None:
                        return  # closed meanwhile
                    if self.meta.distributed_overlay is not None or not any(ov.present.any() for ov in self.overlays):
                        break  # done, or a distributed overlay began meanwhile: the base is not written
                    if len(self.overlays) == 1:
                        self.push()
                    ov, regions = self.merge_begin()
                try:
                    self.merge_copy(ov, regions)  # writes go on meanwhile (to the top overlay)
                except RegionUnavailableError as exc:
                    _log.error("%s: folding into the base stopped, the overlays are kept: %s", self.directory, exc)
                    return
                with self.wlock:
                    self.merge_end(ov, regions)
        released -= {s.id for s in self.meta.snapshots}
        if released:
            _log.warning("%s: local snapshots %s were released by folding the overlays into the base",
                         self.directory, sorted(released))

    # -- closing -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the live stack and close every layer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for img in list(self.images):
            stack = img.detach("volume closed")
            if stack is not None:
                stack.release()
        self.images.clear()
        if self.live is not None:
            self.live.release()
            self.live = None
        for layer in [*self.overlays, self.base]:
            try:
                layer.close()
            except OverlayCacheError:  # pragma: no cover - only after a failed open
                _log.exception("%s: closing %s", self.directory, layer.name)
        self.overlays = []


def create_volume_files(path: str, geo: Geometry) -> bool:
    """Create the files of a new, empty volume in ``path`` (a new directory, or an empty one);
    returns whether the directory was there before.

    A new directory is built beside ``path`` and renamed into place once complete, an existing
    one is emptied again: a create that fails or is interrupted (even by KeyboardInterrupt)
    leaves nothing behind and can be retried as it is.

    Raises
    ------
    InvalidArgumentError
        ``path`` is not empty, or the volume cannot be made there (a file too large for the file
        system, no permission, a read-only file system, a name too long).
    """
    existed = os.path.exists(path)
    if existed and (not os.path.isdir(path) or os.listdir(path)):
        raise InvalidArgumentError(f"{path}: exists and is not an empty directory")
    parent, name = os.path.split(os.path.abspath(path))
    if not existed:
        _remove_stale_builds(parent, name)
    build = made = path if existed else os.path.join(parent, f"{_BUILD_PREFIX.format(name)}{uuid.uuid4().hex[:8]}")
    creator = -1
    try:
        if not existed:
            os.makedirs(build, mode=DIR_MODE)
            creator = lock_directory(build, False, "being created")  # released once in place
        volume_id = uuid.uuid4().hex
        BaseLayer.create(build, geo, volume_id)
        Overlay.create(build, 1, geo, volume_id)
        fsync_dir(build)
        write_meta(build, VolumeMeta(id=volume_id, size=geo.size, region_size=geo.region_size,
                                     created_at=time.time(), layers=[1], next_layer=2, snapshots=[],
                                     next_snapshot=1))
        if not existed:
            os.rename(build, path)  # refused if someone made ``path`` meanwhile
            made = path
            fsync_dir(parent)
    except BaseException as exc:
        remove_volume_files(made, keep_dir=existed)
        if isinstance(exc, OSError) and exc.errno in _BAD_PLACE:
            raise InvalidArgumentError(f"{path}: cannot create a volume of {geo.size} bytes there: "
                                       f"{exc.strerror} ({exc.filename or path})") from exc
        raise
    finally:
        if creator >= 0:
            os.close(creator)
    return existed


#: A volume is built in ``.NAME.creating-XXXXXXXX`` beside ``NAME``, holding its lock while it is.
_BUILD_PREFIX = ".{}.creating-"
#: A build directory nobody holds is left by a create that was killed; younger ones may be starting.
_STALE_BUILD_AGE = 60.0


def _remove_stale_builds(parent: str, name: str) -> None:
    """Remove what creates of ``name`` killed half-way (SIGKILL, power loss) left beside it: build
    directories whose lock nobody holds, older than a minute."""
    prefix = _BUILD_PREFIX.format(name)
    try:
        entries = [e for e in os.listdir(parent) if e.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        build = os.path.join(parent, entry)
        try:
            if time.time() - os.lstat(build).st_mtime < _STALE_BUILD_AGE or not os.path.isdir(build):
                continue
            fd = lock_directory(build, False, "being created")
        except (OverlayCacheError, OSError):
            continue  # a create under way, or not ours to judge
        try:
            shutil.rmtree(build, ignore_errors=True)
            _log.warning("%s: removed %s, left by a create that was killed", os.path.join(parent, name), build)
        finally:
            os.close(fd)


_BAD_PLACE = (errno.EFBIG, errno.EACCES, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EINVAL,
              errno.ENAMETOOLONG)


def remove_volume_files(path: str, keep_dir: bool) -> None:
    """Undo a create: remove the volume's files, and its directory unless it was there before."""
    if keep_dir:
        for entry in os.listdir(path):
            target = os.path.join(path, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
    else:
        shutil.rmtree(path, ignore_errors=True)
