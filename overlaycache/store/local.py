"""A directory as an object store, with the same keys as on S3.

Writes go to a temporary file that is fsynced and then linked (conditional put: ``link`` fails when
the name exists, atomically) or renamed into place, and the directory is fsynced.
"""

from __future__ import annotations

import builtins

import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from overlaycache.errors import InvalidArgumentError, ObjectExistsError, ObjectNotFoundError, StoreError
from overlaycache.remote.catalog import CatalogMixin


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise InvalidArgumentError(f"invalid object key {key!r}")


class LocalStore(CatalogMixin):
    """An object store in a local directory (for tests, air-gapped appliances and NFS mounts).

    The catalog's reads (``volumes()``, ``volume_info()``, ``snapshots()``, ``image()``) come from
    :class:`~overlaycache.remote.catalog.CatalogMixin`.

    Parameters
    ----------
    root : str or PathLike
        The directory; created if missing.
    prefix : str
        A key prefix inside it, like :class:`S3Store`'s.
    """

    def __init__(self, root: str | os.PathLike[str], prefix: str = "") -> None:
        self.root = os.path.abspath(os.fspath(root))
        if not isinstance(prefix, str):
            raise InvalidArgumentError(f"prefix must be a string, got {type(prefix).__name__}")
        self.prefix = prefix.strip("/")
        if self.prefix:
            try:
                _check_key(self.prefix)  # no "..": every key stays under the root
            except InvalidArgumentError:
                raise InvalidArgumentError(f"invalid prefix {prefix!r}: empty, '.' or '..' components") from None
        self.location = f"file://{self.root}" + (f"/{self.prefix}" if self.prefix else "")
        os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r}, prefix={self.prefix!r})"

    def _path(self, key: str) -> str:
        _check_key(key)
        full = f"{self.prefix}/{key}" if self.prefix else key
        return os.path.join(self.root, *full.split("/"))

    def _error(self, cls: type[StoreError], msg: str, key: str | None = None) -> StoreError:
        return cls(f"{self.location}: {msg}", endpoint=self.location, bucket=self.root, key=key)

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        """Store ``data`` under ``key``: a temporary file, fsynced, then linked (``if_absent``) or
        renamed into place, and the directory fsynced.

        Parameters
        ----------
        key : str
            The object's key (no empty, ``.`` or ``..`` components).
        data : bytes-like
            The object's bytes.
        if_absent : bool
            Fail rather than replace an existing object (``link`` refuses an existing name).

        Raises
        ------
        ObjectExistsError
            ``if_absent`` and the key exists.
        InvalidArgumentError
            ``key`` is not a valid key.
        OSError
            The file system refused (full, read-only, no permission).
        """
        path = self._path(key)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(data))
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError as exc:
                    raise self._error(ObjectExistsError, f"object {key} exists", key) from exc
            else:
                os.replace(tmp, path)
                tmp = ""
        finally:
            if tmp:
                os.unlink(tmp)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` bytes from ``start``.

        Parameters
        ----------
        key : str
            The object's key.
        start : int
            The first byte to return.
        length : int, optional
            Bytes to return (fewer at the end of the object); None: up to the end.

        Returns
        -------
        bytes

        Raises
        ------
        ObjectNotFoundError
            No object under ``key``.
        InvalidArgumentError
            ``key`` is not a valid key.
        """
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if start:
                    f.seek(start)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError as exc:
            raise self._error(ObjectNotFoundError, f"no object {key}", key) from exc

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
        InvalidArgumentError
            ``key`` is not a valid key.
        """
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, sorted (temporary files of writes under way left out).

        Parameters
        ----------
        prefix : str
            A key prefix; empty: every key of the store.

        Returns
        -------
        iterator of str
        """
        base = f"{self.prefix}/" if self.prefix else ""
        top = os.path.join(self.root, *base.split("/")) if base else self.root
        keys = []
        for dirpath, _dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, top)
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int | None]]:
        """Keys starting with ``prefix``, sorted, each with its size (None for an object deleted
        since it was listed).

        Parameters
        ----------
        prefix : str
            As for :meth:`list`.
        """
        return ((key, self.head(key)) for key in self.list(prefix))

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """The names of the files and directories directly below ``prefix``, sorted.

        Parameters
        ----------
        prefix : str
            A "directory" of keys, ending with ``/`` (empty: the store's top).

        Returns
        -------
        list of str
            Empty when there is no such directory.
        """
        try:
            names = os.listdir(self._path(prefix.rstrip("/"))) if prefix.strip("/") else os.listdir(
                os.path.join(self.root, *self.prefix.split("/")) if self.prefix else self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(".tmp-"))

    def delete(self, keys: Iterable[str]) -> None:
        """Delete the files of ``keys``; missing ones are fine.

        Parameters
        ----------
        keys : iterable of str
            The objects' keys.

        Raises
        ------
        InvalidArgumentError
            A key is not a valid key.
        """
        for key in keys:
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""
