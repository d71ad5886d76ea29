"""Store wrappers for tests: a real store seen through a wrapper that counts region requests, or
that can be taken offline.

Each wrapper forwards every call to the store it wraps, so it can stand wherever that store does;
``image()`` is re-bound so that a remote image reads through the wrapper (and is counted) too.
"""

from __future__ import annotations

from typing import Any

from overlaycache.remote.layout import is_region_key

__all__ = ["CountingStore", "SwitchableStore"]


class CountingStore:
    """A real store that counts PUTs and GETs of region objects."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.location = inner.location
        self.region_puts: list[str] = []
        self.region_gets: list[str] = []

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        if is_region_key(key):
            self.region_puts.append(key)
        self.inner.put(key, data, if_absent=if_absent)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if is_region_key(key):
            self.region_gets.append(key)
        return bytes(self.inner.get(key, start, length))

    def image(self, volume_id: str, snapshot: Any, cache_regions: int = 64) -> Any:
        from overlaycache.remote.catalog import Catalog

        return Catalog(self).image(volume_id, snapshot, cache_regions)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class SwitchableStore(CountingStore):
    """A counting store that can be taken offline."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.down = False

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if self.down:
            from overlaycache.errors import SecondaryUnavailableError

            raise SecondaryUnavailableError(f"{self.location}: unreachable (test)", self.location)
        return super().get(key, start, length)
