"""Integration: the store contract and end-to-end replication against LocalStack and SeaweedFS,
with the servers killed, restarted and hung under a running replication."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from overlaycache import Volume
from overlaycache.errors import SecondaryUnavailableError, StoreAccessError
from overlaycache.testing import servers
from overlaycache.testing.patterns import random_writes
from overlaycache.testing.store_contract import StoreContract

HERE = Path(__file__).parent
RS = 16 << 10


class TestRealStores(StoreContract):
    @pytest.fixture
    def store(self, real_store: Any) -> Any:
        return real_store


def _fill(vol: Volume, model: bytearray, rnd: random.Random, writes: int) -> None:
    random_writes(vol, model, rnd, writes, 3 * RS)


@pytest.mark.parametrize("mode", ["sync", "async", "periodic"])
def test_replication_end_to_end(tmp_path: Path, server: str, real_store: Any, mode: str) -> None:
    rnd = random.Random(mode)
    size = 40 * RS + 123
    model = bytearray(size)
    pits = []
    kwargs: dict[str, Any] = {"period": 0.3} if mode == "periodic" else {}
    with Volume.create(tmp_path / "v", size, region_size=RS, secondary=real_store, replication=mode,
                       **kwargs) as vol:
        for i in range(3):
            _fill(vol, model, rnd, 20)
            pits.append((vol.snapshot(f"it-{i}"), bytes(model)))
        if mode == "periodic":
            _fill(vol, model, rnd, 5)
            # A periodic PIT may land between those writes (a consistent earlier image); wait
            # for one that began after the last write.
            written = time.time()
            deadline = time.monotonic() + 20
            while vol.snapshots()[-1].created_at <= written and time.monotonic() < deadline:
                time.sleep(0.1)
            last = vol.snapshots()[-1]
            assert last.created_at > written, "no periodic PIT"
            pits.append((last, bytes(model)))
        vid = vol.id
    reader = servers.make_store(server, bucket=real_store.bucket)  # a fresh client: the store alone
    assert vid in reader.volumes()
    for snap, want in pits:
        with reader.image(vid, snap.id) as img:
            assert img.read(0, size) == want


def test_wrong_credentials_are_one_line(server: str, real_store: Any) -> None:
    from overlaycache.store import S3Store

    bad = S3Store(real_store.bucket, endpoint_url=real_store.endpoint, aws_access_key_id="nobody",
                  aws_secret_access_key="wrong-secret-value", max_attempts=1)
    if server == "localstack":
        bad.put("x", b"accepted")  # LocalStack does not check credentials
        return
    with pytest.raises(StoreAccessError) as info:
        bad.put("x", b"y")
    msg = str(info.value)
    assert real_store.endpoint in msg and real_store.bucket in msg and "wrong-secret-value" not in msg


def _pid(name: str) -> int:
    pid = servers.pid(name)
    assert pid is not None, f"{name} is not running"
    return pid


def _restart_seaweedfs() -> None:
    subprocess.run(["bash", str(HERE / "start.sh"), "seaweedfs"], check=True,
                   env={**os.environ, "OC_KEEP_DATA": "1"})


def test_seaweedfs_killed_mid_replication_then_restarted(tmp_path: Path, real_servers: Any) -> None:
    """kill -9 the server while async shipping runs; after a restart nothing is lost."""
    store = servers.make_store("seaweedfs", max_attempts=2, read_timeout=5, connect_timeout=2)
    rnd = random.Random(7)
    size = 256 * RS
    model = bytearray(size)
    with Volume.create(tmp_path / "v", size, region_size=RS, secondary=store, replication="async",
                       workers=8) as vol:
        _fill(vol, model, rnd, 30)
        first = vol.snapshot("before")
        before = bytes(model)
        _fill(vol, model, rnd, 200)  # shipping in the background now
        servers.kill(_pid("seaweedfs"), "seaweedfs")
        _fill(vol, model, rnd, 20)  # writes go on while the secondary is down
        assert vol.replication_lag.regions > 0
        with pytest.raises(SecondaryUnavailableError):
            vol.replicate()
        assert vol.read(0, size) == model  # the primary keeps working
        _restart_seaweedfs()
        vol.replicate()
        second = vol.snapshot("after")
        vid = vol.id
    assert store.image(vid, second).read(0, size) == model
    assert store.image(vid, first).read(0, size) == before


def test_localstack_hung_then_resumed(tmp_path: Path, real_servers: Any) -> None:
    """SIGSTOP the server: requests time out (no hang), writes go on; SIGCONT: replication drains."""
    store = servers.make_store("localstack", max_attempts=1, read_timeout=1, connect_timeout=1)
    pid = _pid("localstack")
    with Volume.create(tmp_path / "v", 32 * RS, region_size=RS, secondary=store, replication="async") as vol:
        vol.write(0, b"a" * RS)
        vol.replicate()
        os.kill(pid, signal.SIGSTOP)
        try:
            vol.write(RS, b"b" * RS)
            start = time.monotonic()
            with pytest.raises(SecondaryUnavailableError):
                vol.replicate()
            assert time.monotonic() - start < 30
            assert vol.read(RS, 1) == b"b"
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while vol.replication_lag.regions and time.monotonic() < deadline:
            time.sleep(0.2)
        vol.replicate()
        snap = vol.snapshot()
        assert store.image(vol.id, snap).read(0, 2 * RS) == b"a" * RS + b"b" * RS


def test_distributed_overlay_end_to_end(tmp_path: Path, server: str, real_store: Any) -> None:
    """The seed's story on a real server: regions fail, the distributed overlay begins, reads are
    routed (R through the region cache), writes land in the overlay, the rest is hydrated, a
    recovery image is compared, and the restore folds everything into the base."""
    rnd = random.Random(11)
    n = 24
    model = bytearray(rnd.randbytes(n * RS))
    with Volume.create(tmp_path / "v", n * RS, region_size=RS, secondary=real_store, replication="async") as vol:
        vol.write(0, model)
        t1 = vol.snapshot("T1")
        vol.mark_unavailable(range(3, n, 4))
        assert vol.location_map().count("R") == len(range(3, n, 4))
        assert vol.read(0, n * RS) == model
        _fill(vol, model, rnd, 20)
        assert vol.read(0, n * RS) == model
        vol.hydrate()
        assert "R" not in vol.location_map()
        t2 = vol.snapshot("T2")
        with vol.image(t1) as img:
            assert img.read(0, n * RS) != model
        assert real_store.image(vol.id, t2).read(0, n * RS) == model
        assert vol.restore(t2) == []
        assert vol.layer_map() == [0] * n and vol.distributed_overlay is None
    with Volume.open(tmp_path / "v") as again:
        assert again.read(0, n * RS) == model
