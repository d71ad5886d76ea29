"""Replication and remote reads against a real S3 server, side by side with plain boto3.

The server is moto's, run as its own process on a free loopback port (and SeaweedFS too when
``OC_BENCH_SEAWEEDFS`` names its endpoint, e.g. ``http://127.0.0.1:8333`` from ``localstack/start.sh``).
Both sides use the same connection-pool size and number of threads:

``replicate_32MiB``, ``replicate_256MiB``
    ours: ``vol.replicate()`` of 512 (4,096) changed 64 KiB regions: four (32) 8 MiB packs;
    baseline: a thread pool of ``put_object`` calls of objects of the same size to fresh keys.
``remote_read_32MiB``, ``remote_read_256MiB``
    ours: reading a whole PIT through ``store.image(...)`` in 1 MiB reads (cold: the map's pages
    too; checksums verified; sequential readahead); baseline: a thread pool of ranged
    ``get_object`` calls of the same byte ranges of the same packs, all at once. The GETs our
    read made, per GiB, are reported too.
``snapshot_16_regions``
    ours: ``vol.snapshot()`` with 16 regions changed (one pack, the changed map pages, the root);
    baseline: the same number of PUTs of objects of the same sizes, one after the other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from _support import MiB, interleaved, pattern, record
from s3bench import WORKERS, client as _client, endpoint, pit_ranges, ranged_get  # noqa: F401  (endpoint: a fixture)
from overlaycache import Volume
from overlaycache.replication.replicator import PACK_SIZE
from overlaycache.store import S3Store

RS = 64 << 10
SIZE = 32 * MiB
LARGE = 256 * MiB
ROUNDS = 2  # per pass


def _bucket(endpoint: tuple[str, str, dict[str, str]]) -> tuple[S3Store, dict[str, Any]]:
    """A store on a fresh bucket, and the state every fixture starts from."""
    name, url, creds = endpoint
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    store = S3Store(bucket, prefix="bench", endpoint_url=url, max_pool_connections=WORKERS, **creds)
    store.create_bucket()
    return store, {"name": name, "store": store, "client": _client(url, creds), "bucket": bucket, "round": 0}


def _shipping_volume(endpoint: tuple[str, str, dict[str, str]], path: Any, size: int) -> dict[str, Any]:
    store, state = _bucket(endpoint)
    vol = Volume.create(path, size, region_size=RS, secondary=store, replication="async", workers=WORKERS)
    vol._repl.stop()  # type: ignore[union-attr]  # ship only when the benchmark says so
    state.update(vol=vol, size=size)
    return state


@pytest.fixture(scope="module")
def setup(endpoint: tuple[str, str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = _shipping_volume(endpoint, tmp_path_factory.mktemp("repl") / "v", SIZE)
    yield state
    state["vol"].close()
    state["store"].close()


@pytest.fixture(scope="module")
def setup_large(endpoint: tuple[str, str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[dict[str, Any]]:
    state = _shipping_volume(endpoint, tmp_path_factory.mktemp("repl-large") / "v", LARGE)
    yield state
    state["vol"].close()
    state["store"].close()


def _dirty_all(state: dict[str, Any]) -> None:
    state["round"] += 1
    size = state.get("size", SIZE)
    for off in range(0, size, SIZE):
        state["vol"].write(off, pattern(b"round-%d-%d" % (state["round"], off), SIZE))


def _replicate(benchmark: Any, state: dict[str, Any], variant: str) -> None:
    size = state.get("size", SIZE)
    pair = f"replicate_{size // MiB}MiB_{state['name']}"
    n = size // RS
    if variant == "overlaycache":
        record(benchmark, pair, "ours", variant, nbytes=size, target=0.9)

        def run() -> None:
            assert state["vol"].replicate() == n

        benchmark.pedantic(run, setup=lambda: _dirty_all(state), rounds=ROUNDS, iterations=1)
    else:
        record(benchmark, pair, "baseline", variant, nbytes=size)
        k = size // PACK_SIZE
        body = [pattern(b"base-%d" % i, PACK_SIZE) for i in range(min(k, 8))]
        client, bucket = state["client"], state["bucket"]

        def run() -> None:
            tag = uuid.uuid4().hex[:8]
            with ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"raw/{tag}/{i}", Body=body[i % 8]),
                              range(k)))

        benchmark.pedantic(run, rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize(("pass_", "variant"), interleaved(["overlaycache", "boto3_parallel_put"]))
def test_replicate(benchmark: Any, setup: dict[str, Any], pass_: int, variant: str) -> None:
    _replicate(benchmark, setup, variant)


@pytest.mark.parametrize(("pass_", "variant"), interleaved(["overlaycache", "boto3_parallel_put"]))
def test_replicate_large(benchmark: Any, setup_large: dict[str, Any], pass_: int, variant: str) -> None:
    _replicate(benchmark, setup_large, variant)


@pytest.fixture(scope="module")
def large(endpoint: tuple[str, str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Any]]:
    """A PIT of a 256 MiB volume written sequentially: what a restore or an export reads."""
    store, state = _bucket(endpoint)
    with Volume.create(tmp_path_factory.mktemp("large") / "v", LARGE, region_size=RS, secondary=store,
                       replication="periodic", period=3600.0, workers=WORKERS) as vol:
        for off in range(0, LARGE, 32 * MiB):
            vol.write(off, pattern(b"large-%d" % off, 32 * MiB))
        snap = vol.snapshot()
        state.update(snap=snap, expected=vol.read(0, LARGE), vid=vol.id, size=LARGE,
                     ranges=pit_ranges(store, vol.id, snap, prefix="bench/"))
    yield state
    store.close()


def _remote_read(benchmark: Any, state: dict[str, Any], variant: str) -> None:
    """A cold sequential read of a PIT in 1 MiB reads, or the same byte ranges with plain boto3."""
    size = state["size"]
    pair = f"remote_read_{size // MiB}MiB_{state['name']}"
    if variant == "overlaycache":
        holder: dict[str, Any] = {}
        store, vid, snap, expected = state["store"], state["vid"], state["snap"], state["expected"]

        def prepare() -> None:
            holder["img"] = store.image(vid, snap)

        def run() -> None:
            img = holder["img"]
            for off in range(0, size, MiB):
                assert img.read(off, MiB) == expected[off : off + MiB]
            holder["gets"] = img.gets
            img.close()

        prepare()
        run()
        record(benchmark, pair, "ours", variant, nbytes=size, target=0.9,
               note=f"{holder['gets'] * (1 << 30) // size} GETs per GiB read sequentially (1 MiB reads)")
        benchmark.pedantic(run, setup=prepare, rounds=ROUNDS, iterations=1)
    else:
        record(benchmark, pair, "baseline", variant, nbytes=size)
        client, bucket, ranges = state["client"], state["bucket"], state["ranges"]

        def run() -> None:
            with ThreadPoolExecutor(WORKERS) as pool:
                got = list(pool.map(lambda k: ranged_get(client, bucket, *k), ranges))
            assert sum(len(g) for g in got) == size

        benchmark.pedantic(run, rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize(("pass_", "variant"), interleaved(["overlaycache", "boto3_parallel_get"]))
def test_remote_read(benchmark: Any, setup: dict[str, Any], pass_: int, variant: str) -> None:
    vol, store = setup["vol"], setup["store"]
    if "snap" not in setup:
        _dirty_all(setup)
        setup["snap"] = vol.snapshot()
        setup["expected"] = vol.read(0, SIZE)
        setup["ranges"] = pit_ranges(store, vol.id, setup["snap"], prefix="bench/")
        setup.update(vid=vol.id, size=SIZE)
    _remote_read(benchmark, setup, variant)


@pytest.mark.parametrize(("pass_", "variant"), interleaved(["overlaycache", "boto3_parallel_get"]))
def test_remote_read_large(benchmark: Any, large: dict[str, Any], pass_: int, variant: str) -> None:
    _remote_read(benchmark, large, variant)


@pytest.mark.parametrize(("pass_", "variant"), interleaved(["overlaycache", "boto3_puts_and_manifest"]))
def test_snapshot_latency(benchmark: Any, setup: dict[str, Any], pass_: int, variant: str) -> None:
    pair = f"snapshot_16_regions_{setup['name']}"
    vol = setup["vol"]
    if variant == "overlaycache":
        record(benchmark, pair, "ours", variant, items=1)

        def prepare() -> None:
            setup["round"] += 1
            for i in range(16):
                vol.write(i * 8 * RS, pattern(b"snap-%d-%d" % (setup["round"], i), RS))

        benchmark.pedantic(vol.snapshot, setup=prepare, rounds=ROUNDS * 2, iterations=1)
    else:
        record(benchmark, pair, "baseline", variant, items=1)
        client, bucket = setup["client"], setup["bucket"]
        # One pack of 16 regions, one map page (the volume's 512 regions are one leaf), the root.
        bodies = [pattern(b"pack", 16 * RS), pattern(b"page", 512 * 48), pattern(b"root", 200)]

        def run() -> None:
            tag = uuid.uuid4().hex[:8]
            for i, body in enumerate(bodies):
                client.put_object(Bucket=bucket, Key=f"snap/{tag}/{i}", Body=body)

        benchmark.pedantic(run, rounds=ROUNDS * 2, iterations=1)
