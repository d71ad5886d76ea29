"""The region source on its own: a store holding packs, a PIT's map read through its pages, and
optionally a region cache; no volume."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from overlaycache import LocalStore
from overlaycache._impl import core
from overlaycache.errors import CorruptionError, SecondaryUnavailableError, VolumeClosedError
from overlaycache.remote import source
from overlaycache.remote.cache import RegionCache
from overlaycache.remote.layout import (
    NO_DIGEST,
    RECORD,
    decode_root,
    encode_pack,
    encode_page,
    encode_root,
    is_pack_key,
    pack_key,
    page_key,
    version_digest,
)
from overlaycache.remote.source import RegionSource
from overlaycache.remote.tree import PageSource, PitMap, leaf_entries

RS = 4096
VID = "v" * 32


class Counting:
    """A store that records its GETs of packs: (key, start, length)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.location = inner.location
        self.got: list[tuple[str, int, int | None]] = []
        self.gate: threading.Event | None = None  # set: GETs of packs wait for it

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if is_pack_key(key):
            if self.gate is not None:
                assert self.gate.wait(10), "test gate never opened"
            self.got.append((key, start, length))
        return bytes(self.inner.get(key, start, length))


def _sum(data: bytes) -> bytes:
    return bytes(core.checksum(data))


def _pack(store: Any, pack: int, versions: Sequence[tuple[int, bytes]]) -> dict[int, tuple[Any, ...]]:
    """Store ``versions`` (region, bytes) in pack ``pack``, each as seq ``pack + region + 1``;
    returns their records."""
    raw, entries = encode_pack(VID, RS, pack, 0.0, [(r, pack + r + 1, data, _sum(data)) for r, data in versions])
    store.put(pack_key(VID, pack), raw, if_absent=True)
    return {e.region: (e.seq, pack, e.offset, e.length, e.checksum, e.digest) for e in entries}


def _pit(store: Any, records: dict[int, tuple[Any, ...]], size: int) -> PitMap:
    """Publish a PIT (cutoff 99) of ``records`` (regions missing: never replicated) and read it back
    through its pages."""
    n = -(-size // RS)
    dense = bytearray(RECORD.size * n)
    for r, rec in records.items():
        RECORD.pack_into(dense, r * RECORD.size, *rec, *([NO_DIGEST] if len(rec) == 5 else []))
    body, count = leaf_entries(dense)
    address, page = encode_page(0, 0, body, count)
    store.put(page_key(VID, address), page, if_absent=True)
    root = decode_root(encode_root(VID, size, RS, 99, 0.0, None, [(0, address)]))
    return PitMap(root, PageSource(store, VID))


def _regions(n: int) -> list[tuple[int, bytes]]:
    return [(r, bytes([65 + r]) * RS) for r in range(n)]


def test_a_version_matching_its_checksum_but_not_its_digest_is_refused(tmp_path: Path) -> None:
    """Bytes that keep the map's mmh3 checksum (as bytes crafted to collide would) but not its
    BLAKE3 digest are refused: the digest, not the checksum, is what tampering must beat."""
    store = LocalStore(tmp_path / "s")
    real, forged = b"a" * RS, b"f" * RS
    records = _pack(store, 7, [(0, forged)])  # the pack holds the forged bytes ...
    seq, pack, off, length, _csum, _digest = records[0]
    records[0] = (seq, pack, off, length, _sum(forged), version_digest(real))  # ... the map the real digest
    src = RegionSource(store, _pit(store, records, RS))
    with pytest.raises(CorruptionError, match="checksum and digest"):
        src.fetch(0)
    records[0] = (seq, pack, off, length, _sum(forged), NO_DIGEST)  # a version from before digests
    assert RegionSource(store, _pit(store, records, RS)).fetch(0) == forged  # the checksum alone
    records[0] = (seq, pack, off, length, _sum(forged), version_digest(forged))
    assert RegionSource(store, _pit(store, records, RS)).fetch(0) == forged


def test_fetch_verifies_and_counts(tmp_path: Path) -> None:
    store = Counting(LocalStore(tmp_path / "s"))
    size = 3 * RS + 100
    records = _pack(store.inner, 7, [(0, b"a" * RS), (3, b"t" * 100)])
    records[2] = (3, 0, 0, 0, _sum(bytes(RS)))  # an all-zero version: recorded, not stored
    m = _pit(store.inner, records, size)  # region 1: never replicated
    src = RegionSource(store, m, workers=2)
    assert src.fetch(0) == b"a" * RS and src.fetch(3) == b"t" * 100
    assert src.fetch(1) == bytes(RS) and src.fetch(2) == bytes(RS)  # zeros: no request
    assert src.gets == 2 and len(store.got) == 2
    assert [src.is_zero(r) for r in range(4)] == [False, True, True, False]
    assert [src.version(r) for r in range(4)] == [8, 0, 3, 11]
    assert src.region_checksum(1) == _sum(bytes(RS)) and src.region_checksum(3) == _sum(b"t" * 100)
    got, errors = src.fetch_many([0, 1, 2, 3])
    assert errors == {} and got == {0: b"a" * RS, 1: bytes(RS), 2: bytes(RS), 3: b"t" * 100}
    assert src.gets == 3  # regions 0 and 3 are adjacent in the pack: one GET
    raw = bytearray(store.inner.get(pack_key(VID, 7)))
    raw[records[0][2] + 5] ^= 1  # tamper with region 0's bytes
    store.inner.put(pack_key(VID, 7), raw)
    with pytest.raises(CorruptionError):
        src.fetch(0)
    got, errors = src.fetch_many([0, 3])
    assert got == {3: b"t" * 100} and set(errors) == {0} and isinstance(errors[0], CorruptionError)
    src.close()
    with pytest.raises(VolumeClosedError):
        src.fetch_many([0])
    with pytest.raises(VolumeClosedError):
        src.fetch_many([0, 3])


def test_a_truncated_pack_is_corruption(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    records = _pack(store, 7, _regions(2))
    src = RegionSource(store, _pit(store, records, 2 * RS))
    raw = store.get(pack_key(VID, 7))
    store.put(pack_key(VID, 7), raw[: records[1][2] + 10])  # region 1's bytes cut short
    assert src.fetch(0) == b"A" * RS
    with pytest.raises(CorruptionError, match="region 1"):
        src.fetch(1)
    src.close()


def test_the_region_cache_is_read_through_unless_keep_is_false(tmp_path: Path) -> None:
    store = Counting(LocalStore(tmp_path / "s"))
    m = _pit(store.inner, _pack(store.inner, 7, [(0, b"a" * RS), (1, b"b" * RS)]), 2 * RS)
    cache = RegionCache(str(tmp_path / "c"), RS, 4)
    src = RegionSource(store, m, region_cache=cache)
    assert not src.cached(0)
    assert src.fetch(0, keep=False) == b"a" * RS and not src.cached(0)  # the cache is left alone
    assert src.fetch(0) == b"a" * RS and src.cached(0) and src.gets == 2
    assert src.fetch(0) == b"a" * RS and src.gets == 2  # from the cache
    assert src.prefetch([0, 1]) == 2
    got, errors = src.fetch_many([0, 1])
    assert errors == {} and got == {0: b"a" * RS, 1: b"b" * RS} and src.cached(1)
    assert src.gets == 3  # region 1 once, by the prefetch
    src.close()
    cache.close()


def test_no_store_serves_zeros_and_cached_regions_only(tmp_path: Path) -> None:
    inner = LocalStore(tmp_path / "s")
    m = _pit(inner, _pack(inner, 7, [(0, b"a" * RS), (2, b"c" * RS)]), 3 * RS)
    cache = RegionCache(str(tmp_path / "c"), RS, 4)
    RegionSource(inner, m, region_cache=cache).fetch(0)
    src = RegionSource(None, m, region_cache=cache)
    assert src.fetch(0) == b"a" * RS and src.fetch(1) == bytes(RS) and src.gets == 0
    with pytest.raises(SecondaryUnavailableError):
        src.fetch(0, keep=False)
    with pytest.raises(SecondaryUnavailableError):
        src.fetch(2)
    got, errors = src.fetch_many([0, 1, 2])
    assert got == {0: b"a" * RS, 1: bytes(RS)} and isinstance(errors[2], SecondaryUnavailableError)
    src.close()
    cache.close()


# -- ranged GETs: adjacent regions of one pack are one request ----------------------------------

def test_adjacent_regions_of_one_pack_are_one_ranged_get(tmp_path: Path) -> None:
    store = Counting(LocalStore(tmp_path / "s"))
    records = _pack(store.inner, 7, _regions(6))
    m = _pit(store.inner, records, 6 * RS)
    src = RegionSource(store, m)
    got, errors = src.fetch_many([3, 1, 2, 0])
    assert errors == {} and got == {r: bytes([65 + r]) * RS for r in range(4)}
    assert src.gets == 1 and store.got == [(pack_key(VID, 7), records[0][2], 4 * RS)]
    src.close()


def test_adjacency_is_in_the_pack_not_in_region_numbers(tmp_path: Path) -> None:
    store = Counting(LocalStore(tmp_path / "s"))
    records = _pack(store.inner, 7, [(3, b"d" * RS), (1, b"b" * RS)])  # stored in this order
    records.update(_pack(store.inner, 9, [(4, b"e" * RS), (5, b"f" * RS)]))
    m = _pit(store.inner, records, 6 * RS)
    src = RegionSource(store, m)
    got, errors = src.fetch_many([1, 3])
    assert errors == {} and got == {1: b"b" * RS, 3: b"d" * RS}
    assert src.gets == 1 and store.got == [(pack_key(VID, 7), records[3][2], 2 * RS)]
    got, errors = src.fetch_many([3, 4])  # adjacent region numbers, different packs
    assert errors == {} and got == {3: b"d" * RS, 4: b"e" * RS} and src.gets == 3
    assert sorted(store.got[1:]) == sorted([(pack_key(VID, 7), records[3][2], RS),
                                            (pack_key(VID, 9), records[4][2], RS)])
    src.close()


def test_regions_apart_in_a_pack_are_separate_gets(tmp_path: Path) -> None:
    store = Counting(LocalStore(tmp_path / "s"))
    records = _pack(store.inner, 7, _regions(5))
    src = RegionSource(store, _pit(store.inner, records, 5 * RS))
    got, errors = src.fetch_many([0, 2, 3])
    assert errors == {} and sorted(got) == [0, 2, 3] and got[2] == b"C" * RS
    assert src.gets == 2
    assert sorted(store.got) == [(pack_key(VID, 7), records[0][2], RS), (pack_key(VID, 7), records[2][2], 2 * RS)]
    src.close()


def test_a_run_is_capped_by_max_run_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "MAX_RUN_BYTES", 3 * RS)
    store = Counting(LocalStore(tmp_path / "s"))
    records = _pack(store.inner, 7, _regions(8))
    src = RegionSource(store, _pit(store.inner, records, 8 * RS))
    got, errors = src.fetch_many(range(8))
    assert errors == {} and got == {r: bytes([65 + r]) * RS for r in range(8)}
    assert src.gets == 3
    assert sorted(store.got) == [(pack_key(VID, 7), records[r][2], n * RS) for r, n in ((0, 3), (3, 3), (6, 2))]
    src.close()


def test_prefetched_runs_are_waited_for_not_fetched_again(tmp_path: Path) -> None:
    """Prefetch starts one GET per run; a fetch_many of those regions while they are under way waits
    for them (no region cache: the bytes come from the prefetch's futures) and makes no GET."""
    store = Counting(LocalStore(tmp_path / "s"))
    records = _pack(store.inner, 7, _regions(4))
    records.update(_pack(store.inner, 9, [(4, b"x" * RS)]))
    src = RegionSource(store, _pit(store.inner, records, 5 * RS), workers=4)
    store.gate = threading.Event()
    assert src.prefetch([0, 1, 2, 4]) == 4  # runs: 0-2 in pack 7, 4 in pack 9
    out: list[tuple[dict[int, bytes], dict[int, BaseException]]] = []
    reader = threading.Thread(target=lambda: out.append(src.fetch_many([4, 2, 0, 1])))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not out  # waiting for the prefetches
    store.gate.set()
    reader.join(10)
    assert not reader.is_alive()
    [(got, errors)] = out
    assert errors == {} and got == {0: b"A" * RS, 1: b"B" * RS, 2: b"C" * RS, 4: b"x" * RS}
    assert src.gets == 2 and len(store.got) == 2
    src.close()


def test_close_releases_a_reader_waiting_for_a_prefetch_not_started(tmp_path: Path) -> None:
    """One worker, two prefetched runs: the second is queued behind the first. A reader waiting for
    the second must get its bytes or an error once the source is closed, not hang."""
    store = Counting(LocalStore(tmp_path / "s"))
    records = _pack(store.inner, 7, _regions(1))
    records.update(_pack(store.inner, 9, [(1, b"x" * RS)]))
    src = RegionSource(store, _pit(store.inner, records, 2 * RS), workers=1)
    store.gate = threading.Event()
    assert src.prefetch([0, 1]) == 2
    out: list[Any] = []

    def read() -> None:
        try:
            out.append(src.fetch_many([1]))
        except Exception as exc:  # noqa: BLE001 - checked below
            out.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    closer = threading.Thread(target=src.close, daemon=True)
    try:
        reader.start()
        reader.join(0.2)
        closer.start()  # waits for the running GET of region 0, cancels the queued one of region 1
        closer.join(0.2)
        store.gate.set()
        closer.join(10)
        reader.join(1)
        assert not closer.is_alive() and not reader.is_alive(), "fetch_many still waiting after close()"
        [result] = out
        if not isinstance(result, VolumeClosedError):
            got, errors = result
            assert got == {1: b"x" * RS} or set(errors) == {1}
    finally:
        store.gate.set()
        for fut in list(src._inflight.values()):  # release a reader left hanging on failure
            if not fut.done():
                fut.set_exception(VolumeClosedError("released by the test"))
        reader.join(1)


class _LookTrigger:
    """``src._lock`` with a hook: the ``nth`` acquisition by the reading thread first lets the
    prefetch finish (opens the store's gate, waits until its regions left ``_inflight``)."""

    def __init__(self, src: RegionSource, store: Counting, regions: list[int], nth: int) -> None:
        self.inner, self.src, self.store, self.regions, self.nth = src._lock, src, store, regions, nth
        self.reader = threading.get_ident()
        self.count = 0

    def __enter__(self) -> Any:
        if threading.get_ident() == self.reader:
            self.count += 1
            if self.count == self.nth:
                assert self.store.gate is not None
                self.store.gate.set()
                for _ in range(1000):
                    if not any(r in self.src._inflight for r in self.regions):
                        break
                    threading.Event().wait(0.01)
        return self.inner.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)


def test_a_prefetch_finishing_between_a_readers_two_looks_is_not_fetched_again(tmp_path: Path) -> None:
    """A read finds a prefetch's regions under way, then (before it decides what to fetch) the
    prefetch finishes: the read takes the landed bytes; it does not fetch them a second time."""
    store = Counting(LocalStore(tmp_path / "s"))
    records = _pack(store.inner, 7, _regions(4))
    src = RegionSource(store, _pit(store.inner, records, 4 * RS), workers=2)
    store.gate = threading.Event()
    assert src.prefetch(range(4)) == 4  # one run, its GET waiting at the gate
    src._lock = _LookTrigger(src, store, [0, 1, 2, 3], nth=2)  # type: ignore[assignment]
    got, errors = src.fetch_many([0, 1, 2, 3])
    assert errors == {} and {r: bytes(v) for r, v in got.items()} == dict(_regions(4))
    assert len(store.got) == 1  # the prefetch's GET, and no other
    src.close()
