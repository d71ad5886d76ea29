"""overlaycache: keep a block volume available when parts of it fail.

A volume is a local base file plus a stack of overlay files, read as one virtual image; see
``Volume``. The compiled core is chosen in :mod:`overlaycache._impl`.
"""

from overlaycache._impl import core as _core_impl
from overlaycache.clone import Clone
from overlaycache.errors import (
    CloneMismatchError,
    CorruptionError,
    FormatError,
    InvalidArgumentError,
    InvalidBufferError,
    MediaError,
    ObjectExistsError,
    ObjectNotFoundError,
    OutOfRangeError,
    OverlayCacheError,
    RegionUnavailableError,
    SecondaryUnavailableError,
    SnapshotNotFoundError,
    StoreAccessError,
    StoreError,
    VolumeClosedError,
    VolumeLockedError,
)
from overlaycache.hydration import Hydration
from overlaycache.images import RecoveryImage, RemoteImage, VirtualImage
from overlaycache.replication import Lag
from overlaycache.retention import RetentionPolicy
from overlaycache.snapshots import LocalSnapshot, Snapshot
from overlaycache.store import LocalStore, ObjectStore, S3Store, open_store
from overlaycache.volume import Volume

__version__ = "0.1.0"
IMPLEMENTATION: str = _core_impl.IMPLEMENTATION

__all__ = [
    "IMPLEMENTATION",
    "Clone",
    "CloneMismatchError",
    "CorruptionError",
    "FormatError",
    "Hydration",
    "InvalidArgumentError",
    "InvalidBufferError",
    "Lag",
    "LocalSnapshot",
    "LocalStore",
    "MediaError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "ObjectStore",
    "OutOfRangeError",
    "OverlayCacheError",
    "RecoveryImage",
    "RegionUnavailableError",
    "RemoteImage",
    "RetentionPolicy",
    "S3Store",
    "SecondaryUnavailableError",
    "Snapshot",
    "SnapshotNotFoundError",
    "StoreAccessError",
    "StoreError",
    "VirtualImage",
    "Volume",
    "VolumeClosedError",
    "VolumeLockedError",
    "__version__",
    "open_store",
]
