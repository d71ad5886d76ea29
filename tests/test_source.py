"""The region source on its own: a store, a manifest, and optionally a region cache; no volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from overlaycache import LocalStore
from overlaycache._impl import core
from overlaycache.errors import CorruptionError, SecondaryUnavailableError, VolumeClosedError
from overlaycache.remote.cache import RegionCache
from overlaycache.remote.layout import RECORD, region_key, snapshot_id
from overlaycache.remote.manifest import Manifest, decode_manifest, encode_manifest
from overlaycache.remote.source import RegionSource
from overlaycache.snapshots import Snapshot

RS = 4096
VID = "v" * 32


class Counting:
    """A store that counts its GETs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.location = inner.location
        self.got: list[str] = []

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        self.got.append(key)
        return bytes(self.inner.get(key, start, length))


def _pit(store: Any, regions: list[bytes | None], size: int) -> Manifest:
    """Store ``regions`` (None: never replicated) as seqs 1, 2, ... and return their manifest."""
    records = b""
    for r, data in enumerate(regions):
        if data is None:
            records += RECORD.pack(0, bytes(16))
            continue
        seq = r + 1
        if any(data):
            store.put(region_key(VID, r, seq), data, if_absent=True)
        records += RECORD.pack(seq, bytes(core.checksum(data)))
    snap = Snapshot(snapshot_id(99), 99, 0.0, None)
    return decode_manifest(encode_manifest(VID, snap, size, RS, records))


def test_fetch_verifies_and_counts(tmp_path: Path) -> None:
    store = Counting(LocalStore(tmp_path / "s"))
    size = 3 * RS + 100
    m = _pit(store.inner, [b"a" * RS, None, bytes(RS), b"t" * 100], size)
    src = RegionSource(store, m, workers=2)
    assert src.fetch(0) == b"a" * RS and src.fetch(3) == b"t" * 100
    assert src.fetch(1) == bytes(RS) and src.fetch(2) == bytes(RS)  # zeros: no request
    assert src.gets == 2 and len(store.got) == 2
    assert [src.is_zero(r) for r in range(4)] == [False, True, True, False]
    assert [src.version(r) for r in range(4)] == [1, 0, 3, 4]
    assert src.region_checksum(1) == bytes(core.checksum(bytes(RS)))
    got, errors = src.fetch_many([0, 1, 2, 3])
    assert errors == {} and got[3] == b"t" * 100 and src.gets == 4
    store.inner.put(region_key(VID, 0, 1), b"b" * RS)  # tampered
    with pytest.raises(CorruptionError):
        src.fetch(0)
    got, errors = src.fetch_many([0, 3])
    assert set(got) == {3} and isinstance(errors[0], CorruptionError)
    src.close()
    with pytest.raises(VolumeClosedError):
        src.fetch_many([0])
    with pytest.raises(VolumeClosedError):
        src.fetch_many([0, 3])


def test_the_region_cache_is_read_through_unless_keep_is_false(tmp_path: Path) -> None:
    store = Counting(LocalStore(tmp_path / "s"))
    m = _pit(store.inner, [b"a" * RS, b"b" * RS], 2 * RS)
    cache = RegionCache(str(tmp_path / "c"), RS, 4)
    src = RegionSource(store, m, region_cache=cache)
    assert not src.cached(0)
    assert src.fetch(0, keep=False) == b"a" * RS and not src.cached(0)  # the cache is left alone
    assert src.fetch(0) == b"a" * RS and src.cached(0) and src.gets == 2
    assert src.fetch(0) == b"a" * RS and src.gets == 2  # from the cache
    assert src.prefetch([0, 1]) == 2
    got, errors = src.fetch_many([0, 1])
    assert errors == {} and got == {0: b"a" * RS, 1: b"b" * RS} and src.cached(1)
    src.close()
    cache.close()


def test_no_store_serves_zeros_and_cached_regions_only(tmp_path: Path) -> None:
    inner = LocalStore(tmp_path / "s")
    m = _pit(inner, [b"a" * RS, None], 2 * RS)
    cache = RegionCache(str(tmp_path / "c"), RS, 4)
    RegionSource(inner, m, region_cache=cache).fetch(0)
    src = RegionSource(None, m, region_cache=cache)
    assert src.fetch(0) == b"a" * RS and src.fetch(1) == bytes(RS) and src.gets == 0
    with pytest.raises(SecondaryUnavailableError):
        src.fetch(0, keep=False)
    src.close()
    cache.close()
