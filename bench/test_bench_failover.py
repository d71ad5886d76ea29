"""Reads of a volume in a distributed overlay, with 1%, 10% and 50% of its regions remote (R).

``remote_NN_32MiB``
    ours: read the whole volume in 1 MiB ``readinto`` calls, R regions fetched from the secondary
    (cold: the cache is emptied before each round); baseline: a thread pool of plain boto3 GETs of
    the same remote objects, plus a raw mmap copy of the local bytes, one after the other.
``cached_remote_50_32MiB``
    ours: the same read with every R region in the local cache; baseline: a raw mmap read of the
    same bytes from a page-cached file (DESIGN.md section 7: cache hits >= 0.75x raw mmap).
"""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from _support import MiB, interleaved, pattern, record
from s3bench import WORKERS, client, endpoint, pit_ranges, ranged_get  # noqa: F401  (endpoint: a fixture)
from overlaycache import Volume
from overlaycache.store import S3Store

RS = 64 << 10
SIZE = 32 * MiB
N = SIZE // RS
ROUNDS = 2  # per pass
STEP = MiB


@pytest.fixture(scope="module", params=[1, 10, 50])
def degraded(request: pytest.FixtureRequest, endpoint: tuple[str, str, dict[str, str]],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A replicated volume with ``param`` percent of its regions unavailable (spread evenly)."""
    name, url, creds = endpoint
    pct = int(request.param)
    bucket = f"bench-do-{uuid.uuid4().hex[:8]}"
    store = S3Store(bucket, prefix="bench", endpoint_url=url, max_pool_connections=WORKERS, **creds)
    store.create_bucket()
    root = tmp_path_factory.mktemp(f"do{pct}")
    image = pattern(b"failover", SIZE)
    vol = Volume.create(root / "v", SIZE, region_size=RS, secondary=store, replication="periodic",
                        period=3600, workers=WORKERS, cache_regions=N)
    vol.write(0, image)
    vol.replicate()
    remote = [r for r in range(N) if (r * pct) // 100 != ((r + 1) * pct) // 100]
    vol.mark_unavailable(remote)
    assert vol.location_map().count("R") == len(remote)
    plain = root / "plain"
    plain.write_bytes(image)
    fd = os.open(plain, os.O_RDONLY)
    mm = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)
    snap = vol.distributed_overlay["snapshot"]  # type: ignore[index]
    keys = pit_ranges(store, vol.id, vol.distributed_overlay["snapshot_id"], set(remote),  # type: ignore[index]
                      prefix="bench/")
    state = {"name": name, "pct": pct, "vol": vol, "image": image, "remote": remote, "mm": mm,
             "keys": keys, "client": client(url, creds), "bucket": bucket, "snap": snap}
    yield state
    mm.close()
    os.close(fd)
    vol.close()
    store.close()


def _read_all(vol: Volume, buf: mmap.mmap, expected: bytes | None) -> None:
    for off in range(0, SIZE, STEP):
        vol.readinto(off, buf)
        if expected is not None and buf[:] != expected[off : off + STEP]:
            raise AssertionError(f"bytes at {off} differ")


@pytest.mark.parametrize(("pass_", "variant"), interleaved(["overlaycache", "boto3_get+mmap"]))
def test_remote_reads(benchmark: Any, degraded: dict[str, Any], pass_: int, variant: str) -> None:
    pair = f"remote_{degraded['pct']:02d}_32MiB_{degraded['name']}"
    vol, buf = degraded["vol"], mmap.mmap(-1, STEP)
    if variant == "overlaycache":
        record(benchmark, pair, "ours", variant, nbytes=SIZE, target=0.9)
        benchmark.pedantic(_read_all, args=(vol, buf, degraded["image"]), setup=lambda: [vol.clear_cache()] and None,
                           rounds=ROUNDS, iterations=1)
    else:
        record(benchmark, pair, "baseline", variant, nbytes=SIZE)
        c, bucket, mm = degraded["client"], degraded["bucket"], degraded["mm"]
        remote = set(degraded["remote"])
        local = [r for r in range(N) if r not in remote]
        view, out = memoryview(mm), memoryview(buf)

        def run() -> None:
            with ThreadPoolExecutor(WORKERS) as pool:
                got = list(pool.map(lambda k: ranged_get(c, bucket, *k), degraded["keys"]))
            assert sum(len(g) for g in got) == len(remote) * RS
            for r in local:
                out[: RS] = view[r * RS : (r + 1) * RS]

        benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
        view.release()
        out.release()
    buf.close()


@pytest.mark.parametrize(("pass_", "variant"), interleaved(["overlaycache", "mmap_memoryview"]))
def test_cached_remote_reads(benchmark: Any, degraded: dict[str, Any], pass_: int, variant: str) -> None:
    if degraded["pct"] != 50:
        pytest.skip("measured at 50% remote only")
    pair = f"cached_remote_50_32MiB_{degraded['name']}"
    vol, buf = degraded["vol"], mmap.mmap(-1, STEP)
    if variant == "overlaycache":
        record(benchmark, pair, "ours", variant, nbytes=SIZE, target=0.75)
        _read_all(vol, buf, degraded["image"])  # fill the cache
        benchmark.pedantic(_read_all, args=(vol, buf, None), rounds=ROUNDS * 3, iterations=1)
    else:
        record(benchmark, pair, "baseline", variant, nbytes=SIZE)
        view, out = memoryview(degraded["mm"]), memoryview(buf)

        def run() -> None:
            for off in range(0, SIZE, STEP):
                out[:] = view[off : off + STEP]

        benchmark.pedantic(run, rounds=ROUNDS * 3, iterations=1)
        view.release()
        out.release()
    buf.close()
