"""overlaycache: keep a block volume available when parts of it fail.

A volume is a local base file plus a stack of overlay files, read as one virtual image; see
``Volume``. The compiled core is chosen in :mod:`overlaycache._impl`.
"""

from overlaycache._impl import core as _core_impl
from overlaycache.errors import (
    CorruptionError,
    FormatError,
    InvalidArgumentError,
    InvalidBufferError,
    MediaError,
    OutOfRangeError,
    OverlayCacheError,
    RegionUnavailableError,
    SecondaryUnavailableError,
    SnapshotNotFoundError,
    VolumeClosedError,
    VolumeLockedError,
)
from overlaycache.images import VirtualImage
from overlaycache.snapshots import LocalSnapshot
from overlaycache.volume import Volume

__version__ = "0.1.0"
IMPLEMENTATION: str = _core_impl.IMPLEMENTATION

__all__ = [
    "IMPLEMENTATION",
    "CorruptionError",
    "FormatError",
    "InvalidArgumentError",
    "InvalidBufferError",
    "LocalSnapshot",
    "MediaError",
    "OutOfRangeError",
    "OverlayCacheError",
    "RegionUnavailableError",
    "SecondaryUnavailableError",
    "SnapshotNotFoundError",
    "VirtualImage",
    "Volume",
    "VolumeClosedError",
    "VolumeLockedError",
    "__version__",
]
