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

__all__ = ["ObjectStore", "list_sizes"]


@runtime_checkable
class ObjectStore(Protocol):
    """What overlaycache needs from an object store."""

    #: Where the store is, for messages (no credentials).
    location: str

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        """Store ``data`` (bytes-like) under ``key``; with ``if_absent``, fail if the key exists.

        Parameters
        ----------
        key : str
            The object's key, relative to the store's prefix.
        data : bytes-like
            The object's bytes.
        if_absent : bool
            A conditional write (S3's ``If-None-Match: *``): never replace an object.

        Raises
        ------
        ObjectExistsError
            ``if_absent`` and the key exists.
        StoreError
            The request failed (:class:`SecondaryUnavailableError`, :class:`StoreAccessError`).
        """

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` bytes from ``start`` (a ranged GET).

        Parameters
        ----------
        key : str
            The object's key.
        start : int
            The first byte to return.
        length : int, optional
            Bytes to return (fewer at the object's end); None: up to the end.

        Returns
        -------
        bytes

        Raises
        ------
        ObjectNotFoundError
            No object under ``key``.
        StoreError
            The request failed.
        """

    def head(self, key: str) -> int | None:
        """The object's size, or None when there is no such object.

        Parameters
        ----------
        key : str
            The object's key.

        Returns
        -------
        int or None

        Raises
        ------
        StoreError
            The request failed (a missing object is not an error).
        """

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in lexicographic order.

        Parameters
        ----------
        prefix : str
            A key prefix (not necessarily ending with ``/``); empty: every key of the store.

        Returns
        -------
        iterator of str
            Keys relative to the store's prefix.

        Raises
        ------
        StoreError
            The request failed.
        """

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """The next path components below ``prefix`` (which ends with ``/``), like S3's delimiter.

        Parameters
        ----------
        prefix : str
            A "directory" of keys, ending with ``/``.

        Returns
        -------
        list of str
            Names of the keys and "subdirectories" directly below it, sorted, without the prefix.

        Raises
        ------
        StoreError
            The request failed.
        """

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` (missing ones are fine), in batches.

        Only collapse and garbage collection call it, with credentials that may delete.

        Parameters
        ----------
        keys : iterable of str
            The objects' keys.

        Raises
        ------
        StoreError
            A request failed (some keys may be deleted already).
        """

    def close(self) -> None:
        """Release connections."""



def list_sizes(store: ObjectStore, prefix: str = "") -> Iterator[tuple[str, int | None]]:
    """Keys starting with ``prefix`` with their sizes, where the store's listing tells them (an
    optional ``list_sizes`` method, as S3's ListObjectsV2 does): None where it does not (a HEAD
    finds it).

    Raises
    ------
    StoreError
        The request failed.
    """
    fn = getattr(store, "list_sizes", None)
    if fn is not None:
        got: Iterator[tuple[str, int | None]] = fn(prefix)
        return got
    return ((key, None) for key in store.list(prefix))
