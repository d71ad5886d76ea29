"""The object-store protocol shared by every secondary store.

Keys are ``/``-separated strings relative to the store's own prefix. Objects are immutable: a
conditional ``put(..., if_absent=True)`` raises :class:`ObjectExistsError` when the key exists, and
nothing but garbage collection deletes.

This module knows nothing of what the keys mean: the volumes, snapshots and images kept in a store
are read by :mod:`overlaycache.remote.catalog`.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

__all__ = ["ObjectStore"]


@runtime_checkable
class ObjectStore(Protocol):
    """What overlaycache needs from an object store."""

    #: Where the store is, for messages (no credentials).
    location: str

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        """Store ``data`` (bytes-like) under ``key``; with ``if_absent``, fail if the key exists."""

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` bytes from ``start`` (a ranged GET)."""

    def head(self, key: str) -> int | None:
        """The object's size, or None when there is no such object."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in lexicographic order."""

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """The next path components below ``prefix`` (which ends with ``/``), like S3's delimiter."""

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` (missing ones are fine), in batches."""

    def close(self) -> None:
        """Release connections."""

