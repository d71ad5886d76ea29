"""Replication to the secondary (sync, async, periodic), PIT snapshots, and reading from the store alone."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock
from typing import Any

import pytest

import overlaycache
from overlaycache import LocalStore, Volume
from overlaycache.errors import (
    CorruptionError,
    FormatError,
    InvalidArgumentError,
    SecondaryUnavailableError,
    SnapshotNotFoundError,
)
from overlaycache.store.metered import MeteredStore
from overlaycache.remote.layout import decode_pack_index, encode_volume_record, packs_prefix, volume_key
from overlaycache.remote.listing import find_root_key
from overlaycache.testing.patterns import random_writes

RS = 4096


class FlakyStore:
    """A real store that can be switched off: every request fails while ``down`` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.location = inner.location
        self.down = False
        self.puts = 0

    def _check(self) -> None:
        if self.down:
            raise SecondaryUnavailableError(f"{self.location}: unreachable (test)", self.location)

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        self._check()
        self.puts += 1
        self.inner.put(key, data, if_absent=if_absent)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr):
            def call(*args: Any, **kwargs: Any) -> Any:
                self._check()
                return attr(*args, **kwargs)
            return call
        return attr


def fill(vol: Volume, model: bytearray, rnd: random.Random, writes: int = 30) -> None:
    random_writes(vol, model, rnd, writes, 2 * RS)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_pits_read_back_from_the_store_alone(tmp_path: Path, any_store: Any, mode: str) -> None:
    rnd = random.Random(1)
    size = 9 * RS + 77
    model = bytearray(size)
    pits: list[tuple[Any, bytes]] = []
    with Volume.create(tmp_path / "v", size, region_size=RS, secondary=any_store, replication=mode) as vol:
        for i in range(4):
            fill(vol, model, rnd, 10)
            pits.append((vol.snapshot(f"pit-{i}"), bytes(model)))
        vid = vol.id
        assert [s.label for s in vol.snapshots()] == ["pit-0", "pit-1", "pit-2", "pit-3"]
        assert vol.replication_lag.regions == 0
    assert vid in any_store.volumes()
    for snap, want in pits:
        with any_store.image(vid, snap.id) as img:
            assert img.size == size and img.read(0, size) == want
        assert any_store.image(vid, snap.label).read(RS - 3, 10) == want[RS - 3 : RS + 7]
    seqs = [s.seq for s, _ in pits]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4


def test_sync_write_is_on_the_store_when_it_returns(tmp_path: Path, s3_store: Any) -> None:
    flaky = FlakyStore(s3_store)
    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=flaky, replication="sync") as vol:
        before = flaky.puts
        vol.write(RS + 5, b"acknowledged")
        assert flaky.puts == before + 1 and vol.replication_lag.regions == 0  # one small pack
        keys = list(s3_store.list(packs_prefix(vol.id)))
        raw = s3_store.get(keys[0])
        index = decode_pack_index(raw)
        assert len(keys) == 1 and not isinstance(index, int) and [e.region for e in index.entries] == [1]
        assert raw[index.entries[0].offset + 5 : index.entries[0].offset + 17] == b"acknowledged"


def test_sync_degrades_to_async_and_catches_up(tmp_path: Path, s3_store: Any, caplog: Any) -> None:
    flaky = FlakyStore(s3_store)
    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=flaky, replication="sync") as vol:
        flaky.down = True
        vol.write(0, b"while down")  # default policy: degrade, the write is durable locally
        assert vol._repl is not None and vol._repl.degraded
        assert vol.replication_lag.regions == 1
        assert any("degraded" in r.getMessage() for r in caplog.records)
        flaky.down = False
        deadline = time.monotonic() + 20
        while vol.replication_lag.regions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vol.replication_lag.regions == 0
        snap = vol.snapshot()
        assert s3_store.image(vol.id, snap).read(0, 10) == b"while down"


def test_sync_fail_policy_raises_but_keeps_the_data(tmp_path: Path, s3_store: Any) -> None:
    flaky = FlakyStore(s3_store)
    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=flaky, replication="sync",
                       sync_policy="fail") as vol:
        flaky.down = True
        with pytest.raises(SecondaryUnavailableError):
            vol.write(0, b"not replicated")
        assert vol.read(0, 14) == b"not replicated"
        flaky.down = False
        assert vol.replicate() == 1
        assert s3_store.image(vol.id, vol.snapshot()).read(0, 14) == b"not replicated"


def test_async_lag_and_replicate(tmp_path: Path, s3_store: Any) -> None:
    flaky = FlakyStore(s3_store)
    with Volume.create(tmp_path / "v", 8 * RS, region_size=RS, secondary=flaky, replication="async") as vol:
        flaky.down = True
        vol.write(0, b"x" * (3 * RS))
        lag = vol.replication_lag
        assert lag.regions == 3 and lag.bytes == 3 * RS
        time.sleep(0.05)
        assert vol.replication_lag.oldest_age >= 0.05
        with pytest.raises(SecondaryUnavailableError):
            vol.replicate()
        assert vol.replication_lag.regions == 3  # nothing lost
        flaky.down = False
        vol.replicate()
        assert vol.replication_lag == type(lag)(0, 0, 0.0)


def test_zero_regions_are_recorded_not_stored(tmp_path: Path, s3_store: Any) -> None:
    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=s3_store, replication="async") as vol:
        vol.write(0, b"y" * RS)
        vol.write(RS, bytes(RS))
        snap = vol.snapshot()
        [key] = list(s3_store.list(packs_prefix(vol.id)))
        index = decode_pack_index(s3_store.get(key))
        assert not isinstance(index, int)
        assert [(e.region, e.length) for e in index.entries] == [(0, RS), (1, 0)]  # zeros: listed, no bytes
        img = s3_store.image(vol.id, snap)
        assert img.read(0, 2 * RS) == b"y" * RS + bytes(RS) and img.gets == 1


def test_periodic_publishes_consistent_pits(tmp_path: Path, s3_store: Any) -> None:
    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=s3_store, replication="periodic",
                       period=0.2) as vol:
        vol.write(0, b"A" * (4 * RS))
        deadline = time.monotonic() + 10
        while not vol.snapshots() and time.monotonic() < deadline:
            time.sleep(0.05)
        snaps = vol.snapshots()
        assert snaps, "no periodic snapshot within 10 s"
        assert s3_store.image(vol.id, snaps[-1]).read(0, 4 * RS) == b"A" * (4 * RS)
        time.sleep(0.5)
        assert len(vol.snapshots()) == len(snaps)  # nothing written: no new PIT
        vol.write(RS, b"B")
        deadline = time.monotonic() + 10
        while len(vol.snapshots()) == len(snaps) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s3_store.image(vol.id, vol.snapshots()[-1]).read(RS, 2) == b"BA"


def test_region_rewritten_while_shipping_is_shipped_again(tmp_path: Path, s3_store: Any) -> None:
    """A writer hammers a few regions while replication runs; the final PIT is the final image."""
    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=s3_store, replication="async",
                       workers=4) as vol:
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                vol.write((i % 4) * RS, bytes([i % 251]) * RS)

        t = threading.Thread(target=writer)
        t.start()
        for _ in range(5):
            vol.replicate()
        stop.set()
        t.join()
        snap = vol.snapshot()
        assert s3_store.image(vol.id, snap).read(0, vol.size) == vol.read(0, vol.size)


def test_tampered_and_truncated_objects_are_corruption(tmp_path: Path, any_store: Any) -> None:
    with Volume.create(tmp_path / "v", 2 * RS, region_size=RS, secondary=any_store) as vol:
        vol.write(0, b"z" * RS)
        snap = vol.snapshot("t")
        vid = vol.id
    [key] = list(any_store.list(packs_prefix(vid)))
    pack = any_store.get(key)
    index = decode_pack_index(pack)
    assert not isinstance(index, int)
    at = index.entries[0].offset
    any_store.put(key, pack[:at] + b"Z" + pack[at + 1 :])
    with pytest.raises(CorruptionError):
        any_store.image(vid, snap).read(0, 1)
    any_store.put(key, pack[: at + 100])
    with pytest.raises(CorruptionError):
        any_store.image(vid, snap).read(0, 1)
    mkey = find_root_key(any_store, vid, snap.seq)
    raw = any_store.get(mkey)
    any_store.put(mkey, raw[:-5])
    with pytest.raises(CorruptionError):
        any_store.image(vid, "t")
    bad = bytearray(raw)
    bad[len(raw) // 2] ^= 1
    any_store.put(mkey, bytes(bad))
    with pytest.raises(CorruptionError):
        any_store.image(vid, snap)


def test_two_volumes_share_a_bucket(tmp_path: Path, s3_store: Any) -> None:
    a = Volume.create(tmp_path / "a", 2 * RS, region_size=RS, secondary=s3_store)
    b = Volume.create(tmp_path / "b", 2 * RS, region_size=RS, secondary=s3_store)
    with a, b:
        a.write(0, b"A")
        b.write(0, b"B")
        sa, sb = a.snapshot(), b.snapshot()
        assert sorted(s3_store.volumes()) == sorted([a.id, b.id])
        assert s3_store.image(a.id, sa).read(0, 1) == b"A" and s3_store.image(b.id, sb).read(0, 1) == b"B"


def test_geometry_mismatch_on_the_store_is_an_error(tmp_path: Path, s3_store: Any) -> None:
    with Volume.create(tmp_path / "v", 2 * RS, region_size=RS, secondary=s3_store) as vol:
        vid = vol.id
    s3_store.put(volume_key(vid), encode_volume_record(vid, 2 * RS, 2 * RS))
    with pytest.raises(FormatError):
        Volume.open(tmp_path / "v", secondary=s3_store)


def test_attach_to_a_volume_with_data_syncs_only_what_differs(tmp_path: Path, s3_store: Any) -> None:
    with Volume.create(tmp_path / "v", 6 * RS, region_size=RS) as vol:
        vol.write(0, b"data" * RS)  # 4 regions
    flaky = FlakyStore(s3_store)
    with Volume.open(tmp_path / "v", secondary=flaky, replication="async") as vol:
        snap = vol.snapshot()
        assert flaky.puts == 1 + 1 + 1 + 1  # volume record, one pack of four regions, a map page, the root
        want = vol.read(0, vol.size)
    with Volume.open(tmp_path / "v") as vol:  # detached: the regions written go into the replication map...
        vol.write(5 * RS, b"offline")
    from overlaycache.replication.replicator import Replicator

    def no_compare(self: Any) -> None:
        raise AssertionError("every region compared with the secondary")

    with mock.patch.object(Replicator, "resync", no_compare):
        vol = Volume.open(tmp_path / "v", secondary=s3_store)  # ...so they are shipped on attach
    with vol:
        assert vol.replication == "async" and vol.replication_lag.regions == 1
        snap2 = vol.snapshot()
        assert s3_store.image(vol.id, snap2).read(5 * RS, 7) == b"offline"
    assert s3_store.image(vol.id, snap).read(0, 6 * RS) == want


def test_snapshot_lookup_and_bad_arguments(tmp_path: Path, s3_store: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        Volume.create(tmp_path / "x", RS, replication="async")
    with pytest.raises(InvalidArgumentError):
        Volume.create(tmp_path / "y", RS, secondary=s3_store, replication="sometimes")
    with pytest.raises(InvalidArgumentError):
        Volume.create(tmp_path / "z", RS, secondary=s3_store, replication="periodic")
    with Volume.create(tmp_path / "v", 2 * RS, region_size=RS, secondary=s3_store) as vol:
        vol.snapshot("one")
        with pytest.raises(InvalidArgumentError):
            vol.snapshot("one")
        with pytest.raises(SnapshotNotFoundError):
            s3_store.image(vol.id, "two")
        with pytest.raises(SnapshotNotFoundError):
            s3_store.image("no-such-volume", "one")
    with Volume.create(tmp_path / "w", RS) as plain, pytest.raises(InvalidArgumentError):
        plain.snapshot()


CHILD = r"""
import os, sys, random
import overlaycache
from overlaycache import LocalStore, Volume
from overlaycache.store import S3Store
endpoint, bucket, path = sys.argv[1:4]
store = S3Store(bucket, prefix="appliance-1", endpoint_url=endpoint, aws_access_key_id="testing",
                aws_secret_access_key="testing-secret")
vol = Volume.open(path, secondary=store, replication="async", workers=4)
rnd = random.Random(int(sys.argv[4]))
i = 0
while True:
    i += 1
    r = rnd.randrange(vol.num_regions)
    vol.write(r * vol.region_size, bytes([i % 251]) * vol.region_size)
    if i % 7 == 0:
        vol.flush()
    if i % 50 == 0:
        vol.snapshot()
        print("snap", flush=True)
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_during_async_shipping(tmp_path: Path, s3_store: Any, moto_endpoint: str, seed: int) -> None:
    """kill -9 while shipping; reopen, replicate: the newest PIT equals the local image, older ones intact."""
    path = tmp_path / "v"
    with Volume.create(path, 16 * RS, region_size=RS, secondary=s3_store) as vol:
        vid = vol.id
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(overlaycache.__file__).parent.parent)  # the package under test
    child = subprocess.Popen([sys.executable, "-c", CHILD, moto_endpoint, s3_store.bucket, str(path), str(seed)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    assert child.stdout is not None
    for _ in range(2):  # let it publish a couple of PITs
        line = child.stdout.readline()
        assert line == b"snap\n", child.stderr.read().decode() if child.stderr else line
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    child.kill()
    child.communicate()
    before = {s.id: s3_store.image(vid, s).read(0, 16 * RS) for s in s3_store.snapshots(vid)}
    assert len(before) >= 2
    with Volume.open(path, secondary=s3_store) as vol:
        vol.replicate()
        snap = vol.snapshot()
        assert s3_store.image(vid, snap).read(0, vol.size) == vol.read(0, vol.size)
    for sid, data in before.items():
        assert s3_store.image(vid, sid).read(0, 16 * RS) == data


def test_initial_sync_reports_progress(tmp_path: Path, s3_store: Any) -> None:
    with Volume.create(tmp_path / "v", 600 * RS, region_size=RS) as vol:
        vol.write(0, b"x" * (300 * RS))
    # Periodic mode with a long period: nothing ships in the background, so this call does it all,
    # in two packs of at most 256 regions.
    with Volume.open(tmp_path / "v", secondary=s3_store, replication="periodic", period=3600,
                     pack_size=1 << 20) as vol:
        assert vol.replication_lag.regions == 300
        steps: list[tuple[int, int]] = []
        assert vol.replicate(lambda done, total: steps.append((done, total))) == 300
        assert len(steps) >= 2 and steps[-1] == (300, 300)
        assert [d for d, _ in steps] == sorted(d for d, _ in steps)


CHILD_UNFLUSHED = r"""
import sys, time
from overlaycache import LocalStore, Volume
from overlaycache.store import S3Store
endpoint, bucket, path = sys.argv[1:4]
store = S3Store(bucket, prefix="appliance-1", endpoint_url=endpoint, aws_access_key_id="testing",
                aws_secret_access_key="testing-secret")
vol = Volume.open(path, secondary=store, replication="periodic", period=3600)
vol.write(0, b"b" * vol.region_size)  # acknowledged, never flushed
vol.replicate()                      # shipped from the page cache
print("shipped", flush=True)
time.sleep(60)
"""


def test_shipped_but_unflushed_write_lost_in_a_crash(tmp_path: Path, s3_store: Any, moto_endpoint: str) -> None:
    """A write shipped before it was flushed, then lost locally by kill -9: the secondary must not
    stay ahead of the primary; after reopening, the next PIT equals the local image again."""
    path = tmp_path / "v"
    with Volume.create(path, 4 * RS, region_size=RS, secondary=s3_store, replication="periodic",
                       period=3600) as vol:
        vid = vol.id
        vol.write(0, b"a" * RS)
        vol.snapshot()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(overlaycache.__file__).parent.parent)
    child = subprocess.Popen([sys.executable, "-c", CHILD_UNFLUSHED, moto_endpoint, s3_store.bucket, str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line == b"shipped\n", child.stderr.read().decode() if child.stderr else line
    child.kill()
    child.communicate()
    with Volume.open(path, secondary=s3_store) as vol:
        local = vol.read(0, vol.size)
        assert local[:RS] in (b"a" * RS, b"b" * RS)  # the write was not flushed: either is allowed
        snap = vol.snapshot()
        assert s3_store.image(vid, snap).read(0, vol.size) == local


def _wait_for(cond: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_async_waits_for_a_pack_to_fill_or_its_delay(tmp_path: Path, s3_store: Any) -> None:
    """A partial pack waits for ``pack_delay``; a full one ships at once (1 MiB packs of 4 KiB
    regions: 256 regions)."""
    store = MeteredStore(s3_store)
    with Volume.create(tmp_path / "v", 600 * RS, region_size=RS, secondary=store, replication="async",
                       pack_size=1 << 20, pack_delay=3600) as vol:
        vol.write(0, b"p" * (10 * RS))
        time.sleep(0.5)
        assert vol.replication_lag.regions == 10 and store.stats()["PUT"].requests == 1  # the volume record
        vol.write(10 * RS, b"q" * (300 * RS))
        assert _wait_for(lambda: vol.replication_lag.regions == 0), "a full pack was not shipped"
        assert store.stats()["PUT"].requests == 1 + 2  # 310 regions: a full pack and the rest
    with Volume.create(tmp_path / "w", 8 * RS, region_size=RS, secondary=s3_store, replication="async",
                       pack_delay=0.05) as vol:
        vol.write(RS, b"r")
        assert _wait_for(lambda: vol.replication_lag.regions == 0), "a partial pack never shipped"


@pytest.mark.parametrize("kwargs", [{"pack_size": 1 << 19}, {"pack_size": (64 << 20) + 1}, {"pack_size": "8M"},
                                    {"pack_size": 8.0 * (1 << 20)}, {"pack_delay": -1}, {"pack_delay": float("nan")},
                                    {"pack_delay": True}, {"pack_delay": "1"}])
def test_pack_options_are_checked(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    store = LocalStore(tmp_path / "s")
    with pytest.raises(InvalidArgumentError):
        Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=store, **kwargs)
    assert not (tmp_path / "v").exists()


def test_secondary_stats_count_requests_by_kind(tmp_path: Path, s3_store: Any) -> None:
    with Volume.create(tmp_path / "v", 8 * RS, region_size=RS, secondary=s3_store, replication="periodic",
                       period=3600) as vol:
        assert vol.secondary_stats is not None and vol.secondary_stats.requests == 1  # the volume record
        vol.write(0, b"s" * (3 * RS))
        before = vol.secondary_stats
        vol.snapshot()
        spent = vol.secondary_stats - before
        assert spent["PUT"].requests == 3  # one pack, one map page, the root
        assert spent["PUT"].bytes > 3 * RS
        mid = vol.secondary_stats
        last = vol.snapshots()[-1]  # listing PITs is the volume's own request: counted
        before = vol.secondary_stats
        assert (before - mid)["GET"].requests == 2 and (before - mid)["LIST"].requests == 1  # record, root header
        with vol.secondary.image(vol.id, last) as img:  # the store as given: not counted
            img.read(0, RS)
        assert (vol.secondary_stats - before).requests == 0
    with Volume.create(tmp_path / "w", 8 * RS, region_size=RS) as vol:
        assert vol.secondary_stats is None


def test_a_sequential_read_of_a_pit_is_one_ranged_get_per_pack(tmp_path: Path) -> None:
    """Regions written in order ship in order into 8 MiB packs; reading the PIT in 1 MiB reads
    fetches each pack's bytes with one ranged GET (readahead), none twice, whatever the read size."""
    rs, size = 64 << 10, 24 << 20
    store = LocalStore(tmp_path / "s")
    with Volume.create(tmp_path / "v", size, region_size=rs, secondary=store, replication="periodic",
                       period=3600.0) as vol:
        data = random.Random(7).randbytes(size)
        vol.write(0, data)
        snap = vol.snapshot()
        vid = vol.id
    for step in (1 << 20, 100_000):
        with store.image(vid, snap) as img:
            got = b"".join(img.read(off, min(step, size - off)) for off in range(0, size, step))
            assert got == data
            assert img.gets == size // (8 << 20)  # three packs, one GET each
    with store.image(vid, snap, readahead=0) as img:  # no readahead: a GET per read (per pack run)
        for off in range(0, 4 << 20, 1 << 20):
            assert img.read(off, 1 << 20) == data[off : off + (1 << 20)]
        assert img.gets == 4


def test_first_attach_compares_only_regions_with_data(tmp_path: Path, s3_store: Any) -> None:
    """Attaching a secondary to a volume that has data compares only the regions that may hold
    some (in an overlay, or with a checksum in the base), not every region of the volume."""
    n = 4096
    with Volume.create(tmp_path / "v", n * RS, region_size=RS) as vol:
        for r in (3, 700, 701, 4000):
            vol.write(r * RS, bytes([r % 251 + 1]) * RS)
        vol.merge_down()  # into the base
        vol.write(1500 * RS, b"top" * 100)  # in the overlay
        vol.write(2000 * RS, bytes(RS))  # written, but all zeros: nothing to ship
    from overlaycache.failover import Router

    def no_full_table(self: Any) -> bytearray:
        raise AssertionError("every region's checksum read")

    with mock.patch.object(Router, "checksums", no_full_table):
        vol = Volume.open(tmp_path / "v", secondary=s3_store)
    with vol:
        assert vol.replication_lag.regions == 5
        snap = vol.snapshot()
        assert s3_store.image(vol.id, snap).read(0, n * RS) == vol.read(0, n * RS)
