"""Store wrappers for tests: a real store seen through a wrapper that counts region requests, or
that can be taken offline.

Each wrapper forwards every call to the store it wraps, so it can stand wherever that store does;
``image()`` is re-bound so that a remote image reads through the wrapper (and is counted) too.
Region versions live in packs (many per object); :class:`PackRegions` tells which regions a pack
PUT stored and which a ranged GET of a pack fetched, so tests still count regions.
"""

from __future__ import annotations

import threading
from typing import Any

from overlaycache.remote.layout import PackIndex, decode_pack_index, is_pack_key
from overlaycache.remote.listing import read_pack_index

__all__ = ["CountingStore", "PackRegions", "SwitchableStore"]


class PackRegions:
    """The regions in packs of a store, from the packs' own indexes (cached per pack)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._index: dict[str, PackIndex] = {}
        self._lock = threading.Lock()

    def learn(self, key: str, data: Any) -> list[int]:
        """Note the index of a pack being PUT; returns the regions whose bytes it stores (not those
        it lists as all zeros)."""
        index = decode_pack_index(bytes(data), key)
        assert not isinstance(index, int), f"{key}: not a whole pack"
        with self._lock:
            self._index[key] = index
        return [e.region for e in index.entries if e.length]

    def index(self, key: str) -> PackIndex:
        with self._lock:
            hit = self._index.get(key)
        if hit is None:
            hit = read_pack_index(self.inner, key)
            with self._lock:
                self._index[key] = hit
        return hit

    def regions(self, key: str, start: int = 0, length: int | None = None) -> list[int]:
        """The regions whose bytes lie in ``length`` bytes from ``start`` of pack ``key``."""
        index = self.index(key)
        end = None if length is None else start + length
        return [e.region for e in index.entries
                if e.length and e.offset >= start and (end is None or e.offset + e.length <= end)]


class CountingStore:
    """A real store that counts region versions PUT and GET (inside packs), and pack requests.

    Attributes
    ----------
    region_puts, region_gets : list of int
        The regions stored by each pack PUT, and fetched by each ranged pack GET, in order.
    pack_puts, pack_gets : list of str
        The pack keys PUT and GET (one entry per request).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.location = inner.location
        self.packs = PackRegions(inner)
        self.region_puts: list[int] = []
        self.region_gets: list[int] = []
        self.pack_puts: list[str] = []
        self.pack_gets: list[str] = []

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        if is_pack_key(key):
            self.pack_puts.append(key)
            self.region_puts.extend(self.packs.learn(key, data))
        self.inner.put(key, data, if_absent=if_absent)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        data = bytes(self.inner.get(key, start, length))
        if is_pack_key(key):
            self.pack_gets.append(key)
            self.region_gets.extend(self.packs.regions(key, start, length))
        return data

    def image(self, volume_id: str, snapshot: Any, cache_regions: int = 256) -> Any:
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
