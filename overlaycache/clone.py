"""Writable clones: a local overlay over a read-only image of a snapshot, for recovery tests.

A clone lets an application or fsck try a recovery candidate (a PIT snapshot on the secondary, or
a local snapshot) without touching the primary volume or the secondary.

Contract
--------
* A clone is a directory holding one overlay (``overlay-1.*``, the same shadow-paged, journaled and
  checksummed format as a volume's overlays, see :mod:`overlaycache.local.layers`), a descriptor
  ``clone.json`` and a ``lock`` file. The descriptor is written last, so a directory without it is
  an interrupted creation, never a clone.
* A region written in the clone is read from its overlay; every other region from the image under
  it. A partial write to a region not in the clone yet first reads the region from the image.
* Nothing is ever written to the primary volume or to the secondary.
* After :meth:`Clone.flush` returns, a crash loses no write made before it, and each region reopens
  whole, at its last flushed version.
* A clone is opened again over an image of the same snapshot: :meth:`Volume.open_clone` finds that
  snapshot from the descriptor; :meth:`Clone.open` takes an image (a recovery image, or a store's
  remote image, of the same PIT). Another volume, snapshot or geometry raises
  :class:`CloneMismatchError`.
* When the image goes away (its volume closed, its snapshot merged away, or it was closed), reads
  and writes raise :class:`VolumeClosedError`; :meth:`Clone.flush` and :meth:`Clone.close` still
  keep what was written.
* One process at a time has a clone open (``flock`` on ``lock``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from overlaycache._impl import core
from overlaycache._fs import DIR_MODE, lock_directory, read_json_checked, write_json_atomic
from overlaycache.local.geometry import byte_view
from overlaycache.errors import (
    CloneMismatchError,
    FormatError,
    InvalidArgumentError,
    InvalidBufferError,
    MediaError,
    Reason,
    RegionUnavailableError,
    SnapshotNotFoundError,
    VolumeClosedError,
)
from overlaycache._fs import fsync_dir
from overlaycache.local.geometry import Geometry
from overlaycache.local.layers import MAX_UNCOMMITTED, Overlay
from overlaycache.snapshots import LocalSnapshot, Snapshot

__all__ = ["Clone", "CloneHost", "CloneInfo", "CloneSource", "open_clone"]

DESCRIPTOR_NAME = "clone.json"
DESCRIPTOR_KIND = "overlaycache-clone"
DESCRIPTOR_VERSION = 1
_LAYER_ID = 1
_SOURCES = ("pit", "local")


class CloneSource(Protocol):
    """What a clone needs from the image under it (:class:`RecoveryImage`, :class:`RemoteImage`,
    :class:`VirtualImage`)."""

    @property
    def volume_id(self) -> str | None: ...

    @property
    def snapshot(self) -> Snapshot | LocalSnapshot: ...

    @property
    def size(self) -> int: ...

    @property
    def region_size(self) -> int: ...

    def readinto(self, offset: int, buffer: Any) -> int: ...


@dataclass(frozen=True)
class CloneInfo:
    """What a clone's descriptor records: the snapshot it was made of, and the geometry.

    Attributes
    ----------
    volume_id : str
        The volume whose snapshot the clone shows.
    source : {"pit", "local"}
        A PIT snapshot on the secondary, or a local snapshot of the volume.
    snapshot_id : str
        The snapshot's id.
    seq : int or None
        The PIT's cutoff ``seq`` (None for a local snapshot).
    label : str or None
        The snapshot's label when the clone was made.
    snapshot_created_at : float
        When the snapshot was taken: with the id, it tells a snapshot from a later one that reuses
        the id (a volume re-attached to an emptied store).
    size, region_size : int
        Geometry.
    created_at : float
        When the clone was made.
    """

    volume_id: str
    source: str
    snapshot_id: str
    seq: int | None
    label: str | None
    snapshot_created_at: float
    size: int
    region_size: int
    created_at: float

    def to_json(self) -> dict[str, Any]:
        """The descriptor's fields, as written to ``clone.json`` (without its checksum)."""
        return {
            "kind": DESCRIPTOR_KIND,
            "version": DESCRIPTOR_VERSION,
            "volume_id": self.volume_id,
            "source": self.source,
            "snapshot": {"id": self.snapshot_id, "seq": self.seq, "label": self.label,
                         "created_at": self.snapshot_created_at},
            "size": self.size,
            "region_size": self.region_size,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CloneInfo:
        """Parse :meth:`to_json`'s output; raises KeyError, TypeError or ValueError when invalid."""
        snap = obj["snapshot"]
        seq = snap["seq"]
        label = snap["label"]
        info = cls(str(obj["volume_id"]), str(obj["source"]), str(snap["id"]),
                   None if seq is None else int(seq), None if label is None else str(label),
                   float(snap["created_at"]), int(obj["size"]), int(obj["region_size"]),
                   float(obj["created_at"]))
        if info.source not in _SOURCES or (info.source == "pit") != (info.seq is not None):
            raise ValueError(f"bad source {info.source!r} with seq {info.seq!r}")
        if info.size <= 0 or info.region_size <= 0 or info.region_size & (info.region_size - 1):
            raise ValueError(f"bad geometry {info.size}/{info.region_size}")
        return info

    @classmethod
    def of_image(cls, image: CloneSource) -> CloneInfo:
        """What a clone of ``image`` records."""
        snap = image.snapshot
        if isinstance(snap, Snapshot):
            source, seq = "pit", snap.seq
        elif isinstance(snap, LocalSnapshot):
            source, seq = "local", None
        else:
            raise InvalidArgumentError(f"cannot clone {type(image).__name__}: not an image of a snapshot")
        if not image.volume_id:
            raise InvalidArgumentError(f"cannot clone {image!r}: its volume is not known")
        return cls(image.volume_id, source, snap.id, seq, snap.label, snap.created_at, image.size,
                   image.region_size, time.time())

    def mismatch(self, other: CloneInfo) -> tuple[str, object, object] | None:
        """The first field (name, ours, theirs) in which ``other`` shows another image, or None."""
        if self.volume_id != other.volume_id:
            return "volume_id", self.volume_id, other.volume_id
        if self.source != other.source:
            return "source", self.source, other.source
        ours = (self.snapshot_id, self.seq, self.snapshot_created_at)
        theirs = (other.snapshot_id, other.seq, other.snapshot_created_at)
        if ours != theirs:
            return "snapshot", ours, theirs
        if self.size != other.size:
            return "size", self.size, other.size
        if self.region_size != other.region_size:
            return "region_size", self.region_size, other.region_size
        return None


def _write_descriptor(directory: str, info: CloneInfo) -> None:
    write_json_atomic(directory, DESCRIPTOR_NAME, info.to_json())


def read_descriptor(path: str | os.PathLike[str]) -> CloneInfo:
    """The descriptor of the clone in directory ``path``.

    Raises
    ------
    FormatError
        ``path`` is not a clone (or an interrupted creation), or its descriptor is corrupted or of a
        newer format.
    """
    path = os.fspath(path)
    hint = " (an interrupted creation: remove the directory)" if os.path.isdir(path) and os.listdir(path) else ""
    obj = read_json_checked(path, DESCRIPTOR_NAME, DESCRIPTOR_KIND, DESCRIPTOR_VERSION, "clone", hint)
    name = os.path.join(path, DESCRIPTOR_NAME)
    try:
        return CloneInfo.from_json(obj)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{name}: invalid contents ({exc})", name) from exc


def _lock(path: str) -> int:
    return lock_directory(path, False, "clone is open elsewhere")


class Clone:
    """A writable local overlay over a read-only image of a snapshot.

    Make one with ``image.clone(path)`` (:meth:`RecoveryImage.clone`, :meth:`VirtualImage.clone`) or
    :meth:`create`; open it again with :meth:`Volume.open_clone` or :meth:`open`. A clone is a
    context manager that closes on exit.

    Attributes
    ----------
    path : str
        The clone's directory.
    info : CloneInfo
        Its descriptor: volume, snapshot and geometry.
    image : CloneSource
        The image under it.
    """

    def __init__(self, path: str, info: CloneInfo, image: CloneSource, lock_fd: int, owns_image: bool) -> None:
        self.path = path
        self.info = info
        self.image = image
        self._owns_image = owns_image
        self._geo = Geometry(info.size, info.region_size)
        self._lock = threading.RLock()
        self._lock_fd = lock_fd
        self._verified = core.Bitmap(self._geo.num_regions)  # regions of the overlay checked since open
        self._overlay: Overlay | None = Overlay(path, _LAYER_ID, self._geo, True, _overlay_key(info), top=True)

    # -- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], image: CloneSource) -> Clone:
        """Make a clone of ``image`` in the directory ``path`` and open it.

        The clone reads through ``image`` and does not close it: keep the image open while the
        clone is used.

        Parameters
        ----------
        path : str or PathLike
            A directory that does not exist yet, or is empty.
        image : CloneSource
            A recovery image (:meth:`Volume.image` of a PIT), a local snapshot's image, or a
            store's remote image.

        Raises
        ------
        InvalidArgumentError
            ``path`` exists and is not an empty directory (reopen a clone with
            :meth:`Volume.open_clone` or :meth:`open`), or ``image`` is not an image of a snapshot.
        VolumeClosedError
            The image is closed.
        """
        path = os.fspath(path)
        info = CloneInfo.of_image(image)
        _check_image_open(image, path)
        made = not os.path.exists(path)
        if made:
            os.makedirs(path, mode=DIR_MODE)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        elif not os.path.isdir(path) or os.listdir(path):
            raise InvalidArgumentError(
                f"{path}: exists and is not an empty directory (to reopen a clone, use "
                "Volume.open_clone or Clone.open)")
        lock_fd = _lock(path)
        try:
            Overlay.create(path, _LAYER_ID, Geometry(info.size, info.region_size), _overlay_key(info))
            fsync_dir(path)
            _write_descriptor(path, info)
            return cls(path, info, image, lock_fd, False)
        except BaseException:
            os.close(lock_fd)
            # Leave the directory as it was found, so that creating the clone can be retried.
            for name in os.listdir(path):
                os.unlink(os.path.join(path, name))
            if made:
                os.rmdir(path)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], image: CloneSource, owns_image: bool = False) -> Clone:
        """Open the clone in ``path`` over ``image``, which must show the snapshot it was made of.

        Parameters
        ----------
        path : str or PathLike
            The clone's directory.
        image : CloneSource
            An image of the clone's snapshot: a recovery image, a store's remote image of the same
            PIT, or the image of the same local snapshot.
        owns_image : bool
            Close ``image`` when the clone closes.

        Raises
        ------
        FormatError
            ``path`` is not a clone, or its files are corrupted or of a newer format.
        CloneMismatchError
            ``image`` shows another volume, snapshot or geometry.
        VolumeLockedError
            The clone is open elsewhere.
        """
        path = os.fspath(path)
        info = read_descriptor(path)
        found = CloneInfo.of_image(image)
        diff = info.mismatch(found)
        if diff is not None:
            field, expected, got = diff
            raise CloneMismatchError(
                f"{path}: a clone of volume {info.volume_id} {info.source} snapshot {info.snapshot_id} "
                f"({info.size} bytes, regions of {info.region_size}); the image given differs in "
                f"{field}: {got!r} instead of {expected!r}", path, field, expected, got)
        _check_image_open(image, path)
        lock_fd = _lock(path)
        try:
            return cls(path, info, image, lock_fd, owns_image)
        except BaseException:
            os.close(lock_fd)
            raise

    @staticmethod
    def describe(path: str | os.PathLike[str]) -> CloneInfo:
        """The descriptor of the clone in ``path`` (see :func:`read_descriptor`): which volume,
        snapshot and geometry it was made of, read without opening the clone.

        Parameters
        ----------
        path : str or PathLike
            The clone's directory.

        Returns
        -------
        CloneInfo

        Raises
        ------
        FormatError
            ``path`` is not a clone, or its descriptor is damaged or of a newer format.
        """
        return read_descriptor(path)

    @property
    def closed(self) -> bool:
        """Whether the clone is closed."""
        return self._overlay is None

    def close(self) -> None:
        """Make every write durable, release the files and the lock (idempotent); also closes the
        image when the clone owns it (:meth:`Volume.open_clone`)."""
        with self._lock:
            ov = self._overlay
            if ov is None:
                return
            self._overlay = None
            try:
                ov.commit()
                ov.checkpoint()
            finally:
                ov.close()
                os.close(self._lock_fd)
                self._lock_fd = -1
                if self._owns_image:
                    close = getattr(self.image, "close", None)
                    if close is not None:
                        close()

    def __enter__(self) -> Clone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"Clone({self.path!r}, volume={self.info.volume_id!r}, {self.info.source} snapshot "
                f"{self.info.snapshot_id!r}, size={self.size}, {state})")

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Bytes in the clone (those of the image)."""
        return self._geo.size

    @property
    def region_size(self) -> int:
        """Bytes per region."""
        return self._geo.region_size

    @property
    def num_regions(self) -> int:
        """Number of regions (the last may be partial)."""
        return self._geo.num_regions

    @property
    def snapshot(self) -> Snapshot | LocalSnapshot:
        """The snapshot under the clone."""
        return self.image.snapshot

    @property
    def written(self) -> frozenset[int]:
        """Regions written in the clone (flushed or not), read from its overlay."""
        with self._lock:
            ov = self._live()
            return frozenset(r for a, b in ov.present.runs() for r in range(a, b))

    # -- helpers ----------------------------------------------------------------------------------
    def _live(self) -> Overlay:
        ov = self._overlay
        if ov is None:
            raise VolumeClosedError(f"{self.path}: clone is closed")
        return ov

    def _usable(self) -> Overlay:
        """The overlay, checking that the clone and the image under it are both open."""
        ov = self._live()
        _check_image_open(self.image, self.path)
        return ov

    def _read_own(self, ov: Overlay, r: int, intra: int, out: memoryview) -> None:
        """Read ``out`` at ``intra`` in region ``r`` from the overlay, verifying the region's
        checksum on its first read since open."""
        try:
            off = ov.offset_of(r)
            if not self._verified.test(r):
                rlen = self._geo.region_length(r)
                if bytes(ov.data.checksum(off, rlen)) != ov.checksum_of(r):
                    raise RegionUnavailableError(
                        f"{ov.data_path}: region {r} of the clone does not match its checksum", (r,), Reason.CHECKSUM)
                self._verified.set(r)
            ov.data.readinto(off + intra, out)
        except MediaError as exc:
            raise RegionUnavailableError(
                f"{ov.data_path}: region {r} of the clone cannot be read: {exc}", (r,), Reason.IO) from exc

    def _read_locked(self, ov: Overlay, offset: int, view: memoryview) -> None:
        n = len(view)
        if n == 0:
            return
        rs = self._geo.region_size
        first, last = offset // rs, (offset + n - 1) // rs
        r = first
        while r <= last:
            mine = ov.present.test(r)
            end = r + 1
            while end <= last and ov.present.test(end) == mine:
                end += 1
            if mine:
                for q in range(r, end):
                    a = max(offset, q * rs)
                    b = min(offset + n, (q + 1) * rs)
                    self._read_own(ov, q, a - q * rs, view[a - offset : b - offset])
            else:
                # Regions the clone does not hold, in one call: the image fetches them together.
                a = max(offset, r * rs)
                b = min(offset + n, end * rs)
                self.image.readinto(a, view[a - offset : b - offset])
            r = end

    # -- data path --------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``: written regions from the clone, the rest from the image.

        Parameters
        ----------
        offset : int
            The first byte.
        length : int
            Bytes to read; the range must be inside the clone.

        Returns
        -------
        bytes

        Raises
        ------
        OutOfRangeError
            The range is not inside the clone.
        VolumeClosedError
            The clone, or the image under it, is closed.
        RegionUnavailableError
            A region of the clone cannot be read or does not match its checksum.
        """
        self._geo.check_range(offset, length, "clone")
        buf = bytearray(length)
        with self._lock:
            self._read_locked(self._usable(), offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Read ``len(buffer)`` bytes at ``offset`` into a writable buffer; returns the count.

        Parameters
        ----------
        offset : int
            The first byte.
        buffer : writable bytes-like
            Filled entirely; ``offset + len(buffer)`` must be inside the clone.

        Returns
        -------
        int
            ``len(buffer)``.

        Raises
        ------
        InvalidBufferError
            ``buffer`` is not a writable bytes-like object.
        OutOfRangeError, VolumeClosedError, RegionUnavailableError
            As :meth:`read`.
        """
        view = byte_view(buffer)
        if view.readonly:
            raise InvalidBufferError("a writable buffer is required")
        self._geo.check_range(offset, len(view), "clone")
        with self._lock:
            self._read_locked(self._usable(), offset, view)
        return len(view)

    def write(self, offset: int, data: Any) -> int:
        """Write ``data`` (any bytes-like object) at ``offset`` in the clone; returns the count.

        The write is durable once :meth:`flush` returns. The parts of regions not written yet are
        read from the image first; if that fails, nothing is written.

        Parameters
        ----------
        offset : int
            The first byte.
        data : bytes-like
            What to write; ``offset + len(data)`` must be inside the clone.

        Returns
        -------
        int
            ``len(data)`` in bytes.

        Raises
        ------
        InvalidBufferError
            ``data`` is not a bytes-like object.
        OutOfRangeError
            The range is not inside the clone.
        VolumeClosedError
            The clone, or the image under it, is closed.
        """
        view = byte_view(data)
        self._geo.check_range(offset, len(view), "clone")
        n = len(view)
        with self._lock:
            ov = self._usable()
            if n == 0:
                return 0
            rs = self._geo.region_size
            pieces: list[tuple[int, int, memoryview]] = []
            pos, end = offset, offset + n
            while pos < end:
                r = pos // rs
                intra = pos - r * rs
                take = min(rs - intra, end - pos)
                pieces.append((r, intra, view[pos - offset : pos - offset + take]))
                pos += take
            # Only the first and last pieces can be partial: read what they need before writing
            # anything, so that an image that cannot be read leaves the clone unchanged.
            filled: dict[int, bytearray] = {}
            for r, intra, piece in {pieces[0][0]: pieces[0], pieces[-1][0]: pieces[-1]}.values():
                rlen = self._geo.region_length(r)
                if not ov.needs_current(r, intra, len(piece)):
                    continue
                region = bytearray(rlen)
                if ov.present.test(r):
                    self._read_own(ov, r, 0, memoryview(region))
                else:
                    self.image.readinto(r * rs, region)
                filled[r] = region
            for r, intra, piece in pieces:
                if ov.regions_dirty >= MAX_UNCOMMITTED // 2:
                    ov.commit()  # bounds the slots held by replaced versions
                fill = filled.get(r)
                ov.write_region(r, intra, piece, None if fill is None else memoryview(fill))
                self._verified.set(r)
        return n

    def flush(self) -> None:
        """Make every write so far durable (data first, then the journal that points at it).

        Works while the image is closed, so that what was written can be kept.

        Raises
        ------
        VolumeClosedError
            The clone is closed.
        """
        with self._lock:
            self._live().commit()

    def diff(self) -> list[int]:
        """Regions whose contents in the clone differ from the image's, in increasing order.

        Compares checksums: the PIT's from its map, others by reading the image's region.

        Raises
        ------
        VolumeClosedError
            The clone, or the image under it, is closed.
        """
        with self._lock:
            ov = self._usable()
            ov.hash_dirty()
            theirs = getattr(self.image, "region_checksum", None)
            out = []
            for a, b in ov.present.runs():
                for r in range(a, b):
                    if theirs is not None:
                        csum = bytes(theirs(r))
                    else:
                        data = bytearray(self._geo.region_length(r))
                        self.image.readinto(r * self._geo.region_size, data)
                        csum = bytes(core.checksum(data))
                    if csum != ov.checksum_of(r):
                        out.append(r)
            return out


def _overlay_key(info: CloneInfo) -> str:
    """The identity a clone's overlay files are bound to: its volume and snapshot."""
    return f"clone of {info.volume_id} at {info.snapshot_id}"


def _check_image_open(image: CloneSource, path: str) -> None:
    if getattr(image, "closed", False):
        raise VolumeClosedError(
            f"{path}: the image under this clone is closed (its volume closed or its snapshot went "
            "away); reopen the clone with Volume.open_clone")


class CloneHost(Protocol):
    """What :func:`open_clone` needs of a volume: its id, its local snapshots, and images."""

    @property
    def id(self) -> str: ...

    def local_snapshots(self) -> list[LocalSnapshot]: ...

    def image(self, snapshot: LocalSnapshot | Snapshot | str) -> Any: ...


def open_clone(volume: CloneHost, path: str | os.PathLike[str]) -> Clone:
    """Open the clone in ``path`` over a new image of its snapshot, from ``volume`` (which owns the
    image: closing the clone closes it). See :meth:`Volume.open_clone`."""
    path = os.fspath(path)
    info = read_descriptor(path)
    if info.volume_id != volume.id:
        raise CloneMismatchError(
            f"{path}: a clone of volume {info.volume_id}, not of {volume.id}", path, "volume_id",
            info.volume_id, volume.id)
    image: Any
    if info.source == "pit":
        assert info.seq is not None
        image = volume.image(Snapshot(info.snapshot_id, info.seq, info.snapshot_created_at, info.label))
    else:
        snap = next((s for s in volume.local_snapshots() if s.id == info.snapshot_id), None)
        if snap is None:
            raise SnapshotNotFoundError(
                f"{path}: a clone of local snapshot {info.snapshot_id} of volume {volume.id}, which no "
                "longer exists (merged away?)", info.snapshot_id)
        image = volume.image(snap)
    try:
        return Clone.open(path, image, owns_image=True)
    except BaseException:
        image.close()
        raise
