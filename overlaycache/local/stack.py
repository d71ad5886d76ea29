"""The layer stack of a volume: its base and overlays, and the read stacks the kernel reads through.

Contract
--------
* The layers are the base (id 0) and the overlays, oldest first; writes go to the top overlay.
* A *read stack* (``core.Stack``) of a level reads each region from the newest layer up to that
  level that holds it. The *live* stack is the volume's own (the top level); images of local
  snapshots have stacks of their own levels. Stacks change only with the stack lock (``rw``)
  held for writing, so a read in progress never sees layers come or go (it retries on
  :class:`~overlaycache.errors.StaleStackError`).
* Pushing an overlay commits the top one first; merging folds the oldest overlay into the base
  (verified copies, checksums stored, then the overlay dropped). Metadata that names the layers
  is the caller's: these methods take a ``persist`` callback at the point it must be written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from overlaycache._fs import fsync_dir
from overlaycache._impl import core
from overlaycache.errors import InvalidArgumentError, MediaError, OverlayCacheError, Reason, RegionUnavailableError
from overlaycache.local.geometry import Geometry
from overlaycache.local.layers import BaseLayer, Layer, Overlay

_log = logging.getLogger(__name__)

MAX_OVERLAYS = 250
VERIFY_POLICIES = ("always", "sampled", "scrub-only")
_SAMPLE = 16  # "sampled" verification: one region in this many


class LayerStack:
    """The base and overlays of a volume (or of a clone's image), opened, with the live read stack.

    Parameters
    ----------
    directory : str
        Where the layer files are.
    geo : Geometry
        The volume's geometry.
    layer_ids : list of int
        The overlays, oldest first.
    writable : bool
        Open the files for writing.
    rw : core.RWLock
        The stack lock shared by every read stack of the volume.
    """

    def __init__(self, directory: str, geo: Geometry, layer_ids: list[int], writable: bool, rw: core.RWLock) -> None:
        self.directory = directory
        self.geo = geo
        self.rw = rw
        self.writable = writable
        self.overlays: list[Overlay] = []
        self.live: core.Stack | None = None
        self._closed = False
        self.base: BaseLayer = BaseLayer(directory, geo, writable)
        try:
            for layer_id in layer_ids:
                self.overlays.append(Overlay(directory, layer_id, geo, writable))
        except BaseException:
            self.close()
            raise

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
        for layer in [self.base, *self.overlays]:
            layer.verified.set_range(0, n)
            if verify == "sampled":
                for r in range(0, n, _SAMPLE):
                    layer.verified.clear(r)

    # -- read stacks -----------------------------------------------------------------------------
    def layers_up_to(self, layer_id: int) -> list[Layer]:
        """Layers newest first, from ``layer_id`` (0 = base) down to the base."""
        chosen = [ov for ov in self.overlays if ov.id <= layer_id]
        return [*reversed(chosen), self.base]

    def build(self, layer_id: int | None = None) -> core.Stack:
        """A read stack of the level ``layer_id`` (default: the top)."""
        level = self.top.id if layer_id is None else layer_id
        entries = [layer.stack_entry() for layer in self.layers_up_to(level)]
        return core.Stack(self.rw, self.geo.region_size, self.geo.size, entries)

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

    # -- checksums ---------------------------------------------------------------------------------
    def checksums(self) -> bytearray:
        """The checksum of every region's current version, from the layers' tables (no data read);
        the top overlay's uncommitted regions are hashed first."""
        if self.writable:
            self.top.hash_dirty()
        newest_first = list(reversed(self.overlays))
        found = core.resolve([ov.present for ov in newest_first], 0, self.geo.num_regions)
        tables = [ov.sums for ov in newest_first] + [self.base.sums]
        out = bytearray(16 * self.geo.num_regions)
        for r, idx in enumerate(found):
            out[16 * r : 16 * r + 16] = tables[idx][16 * r : 16 * r + 16]
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
        if isinstance(layer, Overlay) and layer.dirty.test(r):
            return None
        return bytes(layer.sums[16 * r : 16 * r + 16])

    def verify(self, r: int) -> bool:
        """Read region ``r``'s current version and check it against its checksum (scrub); a good
        one is remembered as verified."""
        layer, off = self._serving(r)
        try:
            ok = bytes(layer.data.checksum(off, self.geo.region_length(r))) == bytes(layer.sums[16 * r : 16 * r + 16])
        except MediaError:
            ok = False
        if ok:
            layer.verified.set(r)
        return ok

    # -- push and merge ----------------------------------------------------------------------------
    def push(self, new_id: int, persist: Callable[[], None], build_live: Callable[[], core.Stack]) -> None:
        """Freeze the top overlay (committed and checkpointed) and push a new empty one, ``new_id``.

        ``persist()`` records the new layer list (it sees the new overlay in :attr:`overlays`);
        if it fails, the push is undone. ``build_live()`` makes the new live stack.
        """
        if len(self.overlays) >= MAX_OVERLAYS:
            raise InvalidArgumentError(f"at most {MAX_OVERLAYS} overlays: merge_down() first")
        top = self.top
        top.commit()
        top.checkpoint()
        Overlay.create(self.directory, new_id, self.geo)
        fsync_dir(self.directory)
        overlay = Overlay(self.directory, new_id, self.geo, True)
        self.rw.acquire_write()
        try:
            self.overlays.append(overlay)
            try:
                persist()
            except BaseException:
                self.overlays.pop()
                overlay.close()
                raise
            old, self.live = self.live, build_live()
            if old is not None:
                old.release()
        finally:
            self.rw.release_write()

    def oldest_regions(self) -> tuple[Overlay, list[int]]:
        """The oldest overlay and the regions it holds (what a merge copies)."""
        ov = self.overlays[0]
        return ov, [r for a, b in ov.present.runs() for r in range(a, b)]

    def copy_into_base(self, ov: Overlay, regions: list[int]) -> None:
        """Copy ``ov``'s regions into the base, each verified first, then sync the base and store
        its checksums. Needs no lock when ``ov`` is not the top overlay: nothing else writes either,
        and readers see ``ov``, which shadows those regions.

        Raises
        ------
        RegionUnavailableError
            A region of ``ov`` cannot be read or fails its checksum: nothing more is copied.
        """
        base, geo = self.base, self.geo
        for r in regions:
            off = ov.slot_offset(r, int(ov.which.test(r)))
            rlen = geo.region_length(r)
            try:
                if ov.data.checksum(off, rlen) != bytes(ov.sums[16 * r : 16 * r + 16]):
                    raise RegionUnavailableError(
                        f"{ov.data_path}: region {r} does not match its checksum; merge aborted",
                        (r,), Reason.CHECKSUM)
                ov.data.copy_to(off, base.data, r * geo.region_size, rlen)
            except MediaError as exc:
                raise RegionUnavailableError(f"region {r}: {exc}; merge aborted", (r,), Reason.IO) from exc
            base.sums[16 * r : 16 * r + 16] = ov.sums[16 * r : 16 * r + 16]
        base.data.sync()
        base.store_sums(regions)

    def drop_oldest(self, regions: list[int]) -> Overlay:
        """Drop the oldest overlay once its ``regions`` are in the base; the caller holds the stack
        lock for writing, rebuilds the stacks, then calls :meth:`remove` on what is returned."""
        for r in regions:
            self.base.verified.set(r)
        return self.overlays.pop(0)

    def remove(self, ov: Overlay) -> None:
        """Close a dropped overlay and delete its files (durably)."""
        ov.close()
        Overlay.remove_files(self.directory, ov.id)
        fsync_dir(self.directory)

    # -- closing -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the live stack and close every layer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.live is not None:
            self.live.release()
            self.live = None
        for layer in [*self.overlays, self.base]:
            try:
                layer.close()
            except OverlayCacheError:  # pragma: no cover - only after a failed open
                _log.exception("%s: closing %s", self.directory, layer.name)
        self.overlays = []
