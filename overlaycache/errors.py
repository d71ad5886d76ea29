"""Exceptions of overlaycache.

Every exception the package raises on purpose derives from :class:`OverlayCacheError`, and also from
the builtin that fits, so ``except ValueError`` or ``except OSError`` keep working. Fields that say
*what* failed (regions, path, snapshot id) are kept on the exception.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = [
    "Reason",
    "OverlayCacheError",
    "InvalidArgumentError",
    "InvalidBufferError",
    "OutOfRangeError",
    "CloneMismatchError",
    "FormatError",
    "VolumeLockedError",
    "VolumeClosedError",
    "SnapshotNotFoundError",
    "RegionUnavailableError",
    "MediaError",
    "CorruptionError",
    "SecondaryUnavailableError",
    "StaleStackError",
    "StoreError",
    "ObjectNotFoundError",
    "ObjectExistsError",
    "StoreAccessError",
]


class Reason(enum.StrEnum):
    """Why regions cannot be read (:attr:`RegionUnavailableError.reason`).

    A ``StrEnum``: each member equals its string value (``Reason.IO == "io"``).
    """

    #: An I/O error, or a file truncated under its mapping (SIGBUS caught by the core).
    IO = "io"
    #: The bytes do not match their checksum.
    CHECKSUM = "checksum"
    #: Declared lost by the operator (:meth:`Volume.mark_unavailable`).
    DECLARED = "declared"
    #: Not valid locally and no copy to read them from (no distributed overlay, or read-only).
    UNAVAILABLE = "unavailable"
    #: Not valid locally, not cached, and the secondary cannot serve them now.
    SECONDARY_UNAVAILABLE = "secondary unavailable"
    #: Internal, from the read kernel: a remote region that is not cached; the caller fetches it.
    REMOTE = "remote"


class OverlayCacheError(Exception):
    """Base class of every error raised by overlaycache."""


class InvalidArgumentError(OverlayCacheError, ValueError):
    """An argument has a wrong value (size, region size, label, ...)."""


class InvalidBufferError(OverlayCacheError, TypeError):
    """Data is not a bytes-like object, or a buffer is read-only where it must be written."""


class OutOfRangeError(InvalidArgumentError):
    """An offset, length or region lies outside the volume."""


class CloneMismatchError(InvalidArgumentError):
    """A clone directory holds a clone of another volume, snapshot or geometry than the one given.

    Parameters
    ----------
    message : str
        What differs, for people.
    path, field, expected, found
        Kept as the attributes of the same names.

    Attributes
    ----------
    path : str
        The clone's directory.
    field : str
        What differs: ``"volume_id"``, ``"source"``, ``"snapshot"``, ``"size"`` or ``"region_size"``.
    expected : object
        What the clone's descriptor records.
    found : object
        What the volume or image given has.
    """

    def __init__(self, message: str, path: str, field: str, expected: object, found: object) -> None:
        super().__init__(message)
        self.path = path
        self.field = field
        self.expected = expected
        self.found = found


class FormatError(OverlayCacheError):
    """A file is not an overlaycache file, is truncated or corrupted, or has a newer format.

    Parameters
    ----------
    message : str
        What is wrong, naming the file.
    path : str, optional
        Kept as :attr:`path`.

    Attributes
    ----------
    path : str or None
        The file at fault.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class VolumeLockedError(OverlayCacheError, BlockingIOError):
    """Another process has the volume open for writing."""


class VolumeClosedError(OverlayCacheError, ValueError):
    """An operation on a closed volume or image."""


class SnapshotNotFoundError(OverlayCacheError, KeyError):
    """No snapshot with this id or label.

    Parameters
    ----------
    message : str
        Where it was looked for, and what.
    snapshot : object, optional
        Kept as :attr:`snapshot`.

    Attributes
    ----------
    snapshot : object
        What was looked up.
    """

    def __init__(self, message: str, snapshot: object = None) -> None:
        super().__init__(message)
        self.snapshot = snapshot

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RegionUnavailableError(OverlayCacheError, OSError):
    """Regions that cannot be read locally: I/O error, truncated file, or checksum mismatch.

    Parameters
    ----------
    message : str
        What failed, naming the regions or the file.
    regions : iterable of int
        The regions concerned (kept sorted as :attr:`regions`).
    reason : Reason or str
        Why, as a :class:`Reason` or its value (default ``Reason.IO``).

    Raises
    ------
    ValueError
        ``reason`` is not a :class:`Reason` value.

    Attributes
    ----------
    regions : tuple of int
        The regions that failed, in increasing order (may be empty when not known).
    reason : Reason
        Why (a :class:`Reason`; equal to its string value).
    """

    def __init__(self, message: str, regions: Iterable[int] = (), reason: Reason | str = Reason.IO) -> None:
        super().__init__(message)
        self.regions = tuple(sorted(regions))
        self.reason = Reason(reason)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MediaError(RegionUnavailableError):
    """Bytes of a file cannot be accessed (SIGBUS on a truncated file, EIO from a failed device).

    Its :attr:`reason` is ``Reason.IO`` and its :attr:`regions` are empty: where a read knows which
    regions the bytes belong to, it raises a :class:`RegionUnavailableError` naming them instead.

    Parameters
    ----------
    message : str
        What failed.
    path : str, optional
        Kept as :attr:`path`.
    offset : int, optional
        Kept as :attr:`offset`.

    Attributes
    ----------
    path : str or None
        The file.
    offset : int or None
        The byte offset where access failed.
    """

    def __init__(self, message: str, path: str | None = None, offset: int | None = None) -> None:
        super().__init__(message, (), Reason.IO)
        self.path = path
        self.offset = offset


class CorruptionError(OverlayCacheError):
    """Data or metadata does not match its checksum."""


class StoreError(OverlayCacheError):
    """A request to the secondary object store failed.

    Its subclasses say how; they are built alike, by the stores
    (:func:`~overlaycache.store.translate_boto_error` for S3).

    Parameters
    ----------
    message : str
        What failed, naming the store (never a credential).
    endpoint, bucket, key : str, optional
        Kept as the attributes of the same names.

    Attributes
    ----------
    endpoint : str or None
        Where the store is (never with credentials).
    bucket : str or None
        The bucket (or directory) of the store.
    key : str or None
        The object concerned, when there is one.
    """

    def __init__(self, message: str, endpoint: str | None = None, bucket: str | None = None,
                 key: str | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.bucket = bucket
        self.key = key

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SecondaryUnavailableError(StoreError, ConnectionError):
    """The secondary object store cannot be reached (refused, timed out, server error)."""


class ObjectNotFoundError(StoreError, KeyError):
    """No object under this key."""


class ObjectExistsError(StoreError, FileExistsError):
    """A conditional write found an object already under this key (objects are immutable)."""


class StoreAccessError(StoreError, PermissionError):
    """The store refused the request: wrong credentials, no permission, or no such bucket."""


class StaleStackError(OverlayCacheError):
    """Internal: the layers under a read changed while it waited; the caller retries."""
