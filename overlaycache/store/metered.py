"""Cost accounting: a store wrapper that counts requests and bytes by kind.

Object stores bill per request (PUT and LIST cost about ten times a GET) and per byte moved. A
:class:`MeteredStore` forwards every call to the store it wraps and counts it, so the cost of
replication, PIT publishing and remote reads is measured, not guessed. A volume meters its
secondary this way (``vol.secondary_stats``); the benchmarks report the same figures.

LIST is counted as S3 bills it: one request per page of up to 1,000 keys.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from overlaycache.remote.catalog import CatalogMixin
from overlaycache.store.base import list_sizes

__all__ = ["KINDS", "MeteredStore", "RequestCount", "StoreStats"]

#: The kinds of request counted.
KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE")
_LIST_PAGE = 1000


@dataclass(frozen=True)
class RequestCount:
    """Requests of one kind and the payload bytes they moved (sent for PUT, received for GET)."""

    requests: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class StoreStats:
    """Requests and bytes by kind, as counted by a :class:`MeteredStore`.

    Attributes
    ----------
    by_kind : dict of str to RequestCount
        One entry per kind in :data:`KINDS`.
    """

    by_kind: dict[str, RequestCount] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> RequestCount:
        return self.by_kind.get(kind, RequestCount())

    @property
    def requests(self) -> int:
        """All requests."""
        return sum(c.requests for c in self.by_kind.values())

    def __sub__(self, other: StoreStats) -> StoreStats:
        """What was counted between two readings."""
        return StoreStats({k: RequestCount(self[k].requests - other[k].requests, self[k].bytes - other[k].bytes)
                           for k in KINDS})

    def __str__(self) -> str:
        return ", ".join(f"{k} {self[k].requests} ({self[k].bytes} B)" for k in KINDS if self[k].requests)


class MeteredStore(CatalogMixin):
    """A store that counts what goes through it; everything else is the wrapped store's.

    Parameters
    ----------
    inner : ObjectStore
        The store to wrap.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.location: str = inner.location
        self._lock = threading.Lock()
        self._counts = {k: [0, 0] for k in KINDS}

    def __repr__(self) -> str:
        return f"MeteredStore({self.inner!r})"

    def _count(self, kind: str, nbytes: int, requests: int = 1) -> None:
        with self._lock:
            c = self._counts[kind]
            c[0] += requests
            c[1] += nbytes

    def stats(self) -> StoreStats:
        """The counts so far."""
        with self._lock:
            return StoreStats({k: RequestCount(c[0], c[1]) for k, c in self._counts.items()})

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        self._count("PUT", memoryview(data).nbytes)
        self.inner.put(key, data, if_absent=if_absent)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            data: bytes = self.inner.get(key, start, length)
        except BaseException:
            self._count("GET", 0)
            raise
        self._count("GET", len(data))
        return data

    def head(self, key: str) -> int | None:
        self._count("HEAD", 0)
        size: int | None = self.inner.head(key)
        return size

    def list(self, prefix: str = "") -> Iterator[str]:
        n = 0
        try:
            for key in self.inner.list(prefix):
                n += 1
                yield key
        finally:
            self._count("LIST", 0, 1 + n // _LIST_PAGE)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int | None]]:
        n = 0
        try:
            for item in list_sizes(self.inner, prefix):
                n += 1
                yield item
        finally:
            self._count("LIST", 0, 1 + n // _LIST_PAGE)

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        out: builtins.list[str] = self.inner.list_dirs(prefix)
        self._count("LIST", 0, 1 + len(out) // _LIST_PAGE)
        return out

    def delete(self, keys: Iterable[str]) -> None:
        keys = builtins.list(keys)
        self._count("DELETE", 0, -(-len(keys) // _LIST_PAGE) if keys else 0)
        self.inner.delete(keys)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
