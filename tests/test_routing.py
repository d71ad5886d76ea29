"""The routed read path of a distributed overlay: R regions served by the read kernel from the
region cache, misses fetched in parallel, readahead on sequential reads, and slots that change
(evictions, damage, clearing) under readers."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from overlaycache import Volume
from overlaycache.errors import RegionUnavailableError
from overlaycache.testing.stores import CountingStore, SwitchableStore

RS = 4096
N = 64


def degraded(tmp_path: Path, store: Any, remote: list[int], cache_regions: int = 4096,
             size: int = N * RS) -> tuple[Volume, bytes]:
    """A replicated volume of random bytes with ``remote`` regions unavailable (R)."""
    data = random.Random(7).randbytes(size)
    vol = Volume.create(tmp_path / "vol", size, region_size=RS, secondary=store, replication="periodic",
                        period=3600, cache_regions=cache_regions, workers=4)
    vol.write(0, data)
    vol.replicate()
    vol.mark_unavailable(remote)
    return vol, data


def test_sequential_reads_fetch_each_remote_region_once(tmp_path: Path, s3_store: Any) -> None:
    store = CountingStore(s3_store)
    remote = list(range(3, N, 5))
    vol, data = degraded(tmp_path, store, remote)
    with vol:
        assert vol._layers.live.routed
        for off in range(0, N * RS, 4 * RS):
            assert vol.read(off, 4 * RS) == data[off : off + 4 * RS]
        assert vol._router.remote is not None
        vol._router.remote.close()  # waits for readahead still under way
        assert sorted(store.region_gets) == sorted(set(store.region_gets))
        assert len(store.region_gets) == len(remote)
    store.region_gets.clear()
    with Volume.open(tmp_path / "vol", secondary=store) as vol:
        assert vol.read(0, N * RS) == data  # all from the cache file, verified on first read
        assert store.region_gets == []


def test_reads_stay_exact_while_a_tiny_cache_evicts(tmp_path: Path, s3_store: Any) -> None:
    """Four readers on a two-slot cache: every read evicts slots other readers are using."""
    remote = list(range(0, N, 2))
    vol, data = degraded(tmp_path, s3_store, remote, cache_regions=2)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(60):
                off = rnd.randrange(0, N * RS - 1)
                n = rnd.randrange(1, min(6 * RS, N * RS - off) + 1)
                got = vol.read(off, n)
                if got != data[off : off + n]:
                    raise AssertionError(f"bytes [{off}, {off + n}) differ")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with vol:
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert vol._router.cache is not None and len(vol._router.cache) <= 2


def test_cache_damaged_under_a_live_volume(tmp_path: Path, s3_store: Any) -> None:
    """A cache slot damaged after it was verified is served as it is only until the volume is
    reopened; then it is found, dropped and fetched again."""
    store = CountingStore(s3_store)
    vol, data = degraded(tmp_path, store, [5])
    with vol:
        assert vol.read(5 * RS, RS) == data[5 * RS : 6 * RS]
        assert len(store.region_gets) == 1
    path = tmp_path / "vol" / "cache" / "cache.data"
    raw = bytearray(path.read_bytes())
    at = raw.index(data[5 * RS : 5 * RS + 64])
    raw[at + 100] ^= 0x55
    path.write_bytes(bytes(raw))
    with Volume.open(tmp_path / "vol", secondary=store) as vol:
        assert vol.read(5 * RS + 50, 100) == data[5 * RS + 50 : 5 * RS + 150]
        assert len(store.region_gets) == 2
        assert vol._router.cache is not None and vol._router.cache.dropped == 1


def test_truncated_cache_file_is_refetched_not_fatal(tmp_path: Path, s3_store: Any) -> None:
    store = CountingStore(s3_store)
    vol, data = degraded(tmp_path, store, [1, 2])
    with vol:
        assert vol.read(0, 4 * RS) == data[: 4 * RS]
        os.truncate(tmp_path / "vol" / "cache" / "cache.data", 0)  # under the live mmap: SIGBUS
        vol._router.cache.verified.clear_range(0, 2)  # type: ignore[union-attr]
        assert vol.read(0, 4 * RS) == data[: 4 * RS]
        assert len(store.region_gets) == 4


def test_clear_cache_refetches(tmp_path: Path, s3_store: Any) -> None:
    store = CountingStore(s3_store)
    vol, data = degraded(tmp_path, store, [1, 3])
    with vol:
        assert vol.read(0, 4 * RS) == data[: 4 * RS]
        assert vol.clear_cache() == 2
        assert vol.clear_cache() == 0
        assert vol.read(0, 4 * RS) == data[: 4 * RS]
        assert len(store.region_gets) == 4


def test_unwritten_remote_regions_read_as_zeros_without_requests(tmp_path: Path, s3_store: Any) -> None:
    store = CountingStore(s3_store)
    vol = Volume.create(tmp_path / "vol", N * RS, region_size=RS, secondary=store, replication="periodic",
                        period=3600)
    with vol:
        vol.write(0, b"a" * RS)
        vol.write(3 * RS, bytes(RS))  # written, all zeros: recorded, not stored
        vol.replicate()
        vol.mark_unavailable([0, 1, 3])
        for _ in range(2):
            assert vol.read(0, 4 * RS) == b"a" * RS + bytes(3 * RS)
        assert len(store.region_gets) == 1


def test_partial_write_to_remote_region_fetches_outside_the_lock(tmp_path: Path, s3_store: Any) -> None:
    store = CountingStore(s3_store)
    vol, data = degraded(tmp_path, store, [2, 3])
    with vol:
        vol.write(2 * RS + 10, b"xy")
        vol.write(3 * RS - 1, b"!" * 3)  # the end of region 2, the start of region 3
        want = bytearray(data[: 4 * RS])
        want[2 * RS + 10 : 2 * RS + 12] = b"xy"
        want[3 * RS - 1 : 3 * RS + 2] = b"!" * 3
        assert vol.read(0, 4 * RS) == want
        assert vol.location_map(0, 4) == ["PB", "PB", "PO", "PO"]
        assert len(store.region_gets) == 2


def test_read_only_open_names_remote_regions(tmp_path: Path, s3_store: Any) -> None:
    vol, data = degraded(tmp_path, s3_store, [2])
    vol.close()
    with Volume.open(tmp_path / "vol", readonly=True) as ro:
        assert ro.read(0, 2 * RS) == data[: 2 * RS]
        with pytest.raises(RegionUnavailableError) as info:
            ro.read(RS, 3 * RS)
        assert info.value.regions == (2,)


@pytest.mark.parametrize("mode", ["periodic", "async"])
def test_overlay_region_lost_before_shipping(tmp_path: Path, s3_store: Any, mode: str) -> None:
    """A region written during the distributed overlay whose overlay file fails before it is
    shipped: recorded as lost, no longer pending (the shipper does not spin on it), reads of it
    fail, and PITs go on without it."""
    vol = Volume.create(tmp_path / "vol", N * RS, region_size=RS, secondary=s3_store, replication=mode,
                        period=3600 if mode == "periodic" else None)
    with vol:
        vol.write(0, b"a" * (4 * RS))
        vol.replicate()
        vol.mark_unavailable([3])
        top = vol._layers.overlays[-1]
        if mode == "async":
            vol._repl.stop()  # type: ignore[union-attr]  # keep region 1 pending until the file fails
        vol.write(RS, b"b" * RS)
        vol.flush()
        os.truncate(top.data_path, 0)
        snap = vol.snapshot()
        assert vol.distributed_overlay is not None and vol.distributed_overlay["lost"] == [1]
        assert vol.replication_lag.regions == 0
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(0, 2 * RS)
        assert info.value.regions == (1,)
        assert vol.read(2 * RS, 2 * RS) == b"a" * (2 * RS)  # PB and R still served
        with vol.remote_image(snap) as img:
            assert img.read(RS, RS) == b"a" * RS  # the last replicated version


def test_hydration_makes_the_volume_independent_of_the_secondary(tmp_path: Path, s3_store: Any) -> None:
    store = SwitchableStore(s3_store)
    remote = list(range(0, N, 3))
    vol, data = degraded(tmp_path, store, remote)
    with vol:
        vol.write(6 * RS, b"w" * RS)  # written during the overlay: PO, not hydrated
        want = bytearray(data)
        want[6 * RS : 7 * RS] = b"w" * RS
        assert vol.read(0, 2 * RS) == want[: 2 * RS]  # region 0 fetched and cached first
        puts = len(store.region_puts)
        seen: list[tuple[int, int]] = []
        hyd = vol.hydrate(lambda done, total: seen.append((done, total)))
        assert hyd.finished and hyd.error is None
        assert (hyd.total, hyd.installed) == (len(remote) - 1, len(remote) - 1)
        assert seen[-1] == (hyd.total, hyd.total) and seen == sorted(seen)
        assert len(store.region_gets) == len(remote) - 1  # each fetched once (0 by the read, 6 never)
        assert "R" not in vol.location_map()
        vol.snapshot()
        assert len(store.region_puts) - puts == 1  # only region 6: hydrated regions are not shipped
        assert vol.hydrate().total == 0
        store.down = True
        assert vol.read(0, N * RS) == want
    store.down = False
    with Volume.open(tmp_path / "vol", secondary=store) as vol:
        store.down = True
        assert vol.read(0, N * RS) == want
        store.down = False
        assert vol.restore(vol.snapshots()[-1]) == []
        assert vol.layer_map() == [0] * N and vol.distributed_overlay is None
        assert vol.read(0, N * RS) == want


def test_background_hydration_beside_foreground_io(tmp_path: Path, s3_store: Any) -> None:
    remote = list(range(1, N, 2))
    vol, data = degraded(tmp_path, s3_store, remote)
    with vol:
        hyd = vol.hydrate(background=True, idle=0.001)
        assert vol.hydrate(background=True) is hyd or hyd.finished
        want = bytearray(data)
        rnd = random.Random(3)
        while not hyd.finished:
            r = rnd.randrange(N)
            if rnd.random() < 0.3:
                vol.write(r * RS, bytes([r]) * RS)
                want[r * RS : (r + 1) * RS] = bytes([r]) * RS
            assert vol.read(r * RS, RS) == want[r * RS : (r + 1) * RS]
        assert hyd.wait(60) and hyd.error is None and hyd.done == hyd.total
        assert "R" not in vol.location_map()
        assert vol.read(0, N * RS) == want


def test_hydration_rate_cancel_and_secondary_down(tmp_path: Path, s3_store: Any) -> None:
    from overlaycache.errors import InvalidArgumentError

    store = SwitchableStore(s3_store)
    vol, data = degraded(tmp_path, store, list(range(N)))
    with vol:
        with pytest.raises(InvalidArgumentError):
            vol.hydrate(rate=0)
        hyd = vol.hydrate(background=True, rate=RS)  # one region a second: cancelled long before the end
        hyd.cancel()
        assert hyd.wait(30) and hyd.done < N and hyd.error is None
        store.down = True
        with pytest.raises(RegionUnavailableError) as info:
            vol.hydrate()
        assert info.value.reason == "secondary unavailable" and len(info.value.regions) > 0
        store.down = False
        assert vol.hydrate().error is None
        assert vol.location_map() == ["PO"] * N
        assert vol.read(0, N * RS) == data


def test_cache_fills_free_slots_before_evicting(tmp_path: Path) -> None:
    """A dropped entry's slot is reused before any other entry is evicted; when full, CLOCK evicts
    one entry per fill and every entry left reads back verified, also after reopening."""
    from overlaycache._impl import core
    from overlaycache.remote.cache import RegionCache

    def body(r: int, seq: int) -> bytes:
        return bytes([r, seq]) * (RS // 2)

    cache = RegionCache(str(tmp_path), RS, 4)
    for r in range(3):
        cache.put(r, 1, bytes(core.checksum(body(r, 1))), body(r, 1))
    cache.drop(0, 1)
    cache.put(5, 1, bytes(core.checksum(body(5, 1))), body(5, 1))
    cache.put(6, 1, bytes(core.checksum(body(6, 1))), body(6, 1))
    assert {k for k in [(1, 1), (2, 1), (5, 1), (6, 1)] if k in cache} == {(1, 1), (2, 1), (5, 1), (6, 1)}
    cache.put(7, 1, bytes(core.checksum(body(7, 1))), body(7, 1))  # full: exactly one evicted
    assert len(cache) == 4 and (7, 1) in cache
    kept = [(r, s) for r, s in [(1, 1), (2, 1), (5, 1), (6, 1), (7, 1)] if (r, s) in cache]
    cache.close()
    again = RegionCache(str(tmp_path), RS, 4)
    for r, s in kept:
        assert again.get(r, s, bytes(core.checksum(body(r, s))), RS) == body(r, s)
    again.close()


def test_mostly_remote_reads_come_from_the_pit(tmp_path: Path, s3_store: Any) -> None:
    """With remote_fraction, a read whose regions are mostly R takes its PB regions from the PIT
    too (the device is mostly failing), PO regions locally; other reads are routed as usual. With
    the secondary down, the PB regions of such a read fall back to the local copy."""
    from overlaycache.errors import InvalidArgumentError

    store = SwitchableStore(s3_store)
    data = random.Random(5).randbytes(N * RS)
    with Volume.create(tmp_path / "vol", N * RS, region_size=RS, secondary=store, replication="periodic",
                       period=3600, readahead=0, remote_fraction=0.5) as vol:
        vol.write(0, data)
        vol.replicate()
        vol.mark_unavailable([0, 1, 2, 8])  # regions 0..3: three of four remote
        vol.write(3 * RS, b"3" * RS)  # PO
        want = bytearray(data)
        want[3 * RS : 4 * RS] = b"3" * RS
        assert vol.location_map(0, 5) == ["R", "R", "R", "PO", "PB"]
        assert vol.read(0, 5 * RS) == want[: 5 * RS]  # 3 of 5 remote: PB region 4 from the PIT too
        assert sorted(store.region_gets) == [0, 1, 2, 4]
        store.region_gets.clear()
        assert vol.read(6 * RS, 4 * RS) == want[6 * RS : 10 * RS]  # 1 of 4 remote: routed as usual
        assert store.region_gets == [8]
        store.down = True
        vol.clear_cache()
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(0, 6 * RS)
        assert info.value.regions == (0, 1, 2)
        assert vol.read(4 * RS, RS) == want[4 * RS : 5 * RS]
    with pytest.raises(InvalidArgumentError):
        Volume.open(tmp_path / "vol", remote_fraction=1.5)
