"""The cost of the secondary's format as curves over size: objects per GiB replicated, and what a
PIT after a one-region change writes and how long it takes, whatever the volume holds.

``objects_per_GiB``
    A 1 GiB volume (64 KiB regions) written sequentially in 1 MiB writes and replicated at the
    default settings; the PUTs (counted by the volume's ``secondary_stats``) are reported.
``pit_after_1_change_<written>``
    A 1 TiB volume whose remote map says ``written`` bytes are on the secondary (256 MiB to 1 TiB;
    the records are made directly, no data is moved: the map tree is what is measured). After the
    first PIT, one region changes and a PIT is published: its objects, bytes and time are
    reported. The tree is that of the replicator (``TreeState.prepare``/``commit``, the root's
    encoding) against a local store.
``pit_after_1_change_volume_<size>``
    The same with 256 MiB written, over volume sizes from 1 GiB to 15 TiB.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from _support import MiB, pattern, record
from overlaycache import LocalStore, Volume
from overlaycache.remote.layout import LEAF_SPAN, RECORD, encode_root, page_key, root_digest, root_key
from overlaycache.replication.maps import RemoteMap
from overlaycache.store.metered import MeteredStore

RS = 64 << 10
GiB = 1 << 30
TiB = 1 << 40


def test_objects_per_gib(benchmark: Any, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with Volume.create(tmp_path / "v", GiB, region_size=RS, secondary=store, replication="periodic",
                       period=3600) as vol:
        chunk = pattern(b"seq", MiB)
        for off in range(0, GiB, MiB):
            vol.write(off, chunk)
        before = vol.secondary_stats
        assert before is not None

        def run() -> None:
            vol.replicate()

        record(benchmark, "objects_per_GiB", "info", "overlaycache")
        benchmark.pedantic(run, rounds=1, iterations=1)
        stats = vol.secondary_stats
        assert stats is not None
        puts = (stats - before)["PUT"].requests
        benchmark.extra_info["note"] = f"{puts} PUTs per GiB replicated sequentially (default 8 MiB packs)"
        benchmark.extra_info["puts_per_GiB"] = puts
        assert puts <= 256


def _fill(rmap: RemoteMap, regions: int) -> None:
    """Records for the first ``regions`` regions, as sequential replication in 8 MiB packs makes them."""
    per_pack = 128
    for leaf in range(0, regions, LEAF_SPAN):
        out = bytearray()
        for r in range(leaf, min(regions, leaf + LEAF_SPAN)):
            out += RECORD.pack(r + 1, r // per_pack + 1, 64 + (r % per_pack) * RS, RS, r.to_bytes(16, "little"),
                               bytes(16))
        rmap.data.write(64 + RECORD.size * leaf, bytes(out))
    for r in range(0, regions, LEAF_SPAN):
        rmap.tree.mark(r)
    rmap.sync()


def _publish(store: MeteredStore, rmap: RemoteMap, vid: str, seq: int, size: int = TiB) -> tuple[int, int, float]:
    """A PIT as the replicator publishes it: returns (objects, bytes, seconds)."""
    before = store.stats()
    t0 = time.perf_counter()
    rmap.sync()
    pages, top, leaves = rmap.tree.prepare(rmap.leaf_body)
    for _level, _index, addr, raw in pages:
        store.put(page_key(vid, addr), raw, if_absent=True)
    root = encode_root(vid, size, RS, seq, time.time(), None, top)
    store.put(root_key(vid, seq, root_digest(root)), root, if_absent=True)
    rmap.tree.commit(leaves)
    took = time.perf_counter() - t0
    delta = store.stats() - before
    return delta["PUT"].requests, delta["PUT"].bytes, took


def _one_change_pits(benchmark: Any, tmp_path: Path, pair: str, size: int, written: int) -> tuple[int, int]:
    """Fill, publish the first PIT, then time PITs after one change each; returns (objects, bytes)."""
    vid = f"scale-{size}-{written}"
    store = MeteredStore(LocalStore(tmp_path / "store"))
    rmap = RemoteMap(str(tmp_path / "remote.map"), RS, size // RS, True)
    try:
        _fill(rmap, written // RS)
        _publish(store, rmap, vid, 1 << 40, size)  # the first PIT: every page
        seq = [(1 << 40) + 1]

        def change() -> None:
            seq[0] += 2
            r = (seq[0] * 7919) % (written // RS)
            rmap.set(r, seq[0], 1 << 32, 64, RS, seq[0].to_bytes(16, "little"))

        results: list[tuple[int, int, float]] = []

        def run() -> None:
            results.append(_publish(store, rmap, vid, seq[0] + 1, size))

        record(benchmark, pair, "info", "overlaycache")
        benchmark.pedantic(run, setup=change, rounds=5, iterations=1)
        objects, nbytes, _t = results[-1]
        benchmark.extra_info["objects"] = objects
        benchmark.extra_info["bytes"] = nbytes
        benchmark.extra_info["note"] = (f"volume {size // GiB} GiB, {written // MiB} MiB written: a PIT after one "
                                        f"change writes {objects} objects, {nbytes} bytes")
        return objects, nbytes
    finally:
        rmap.close()
        os.unlink(tmp_path / "remote.map")


@pytest.mark.parametrize("written", [256 * MiB, 4 * GiB, 64 * GiB, TiB], ids=["256MiB", "4GiB", "64GiB", "1TiB"])
def test_pit_after_one_change(benchmark: Any, tmp_path: Path, written: int) -> None:
    objects, _nbytes = _one_change_pits(benchmark, tmp_path, f"pit_after_1_change_{written // MiB}MiB_written",
                                        TiB, written)
    assert objects == 3  # a leaf, a node, the root


@pytest.mark.parametrize("size", [GiB, 64 * GiB, TiB, 15 * TiB], ids=["1GiB", "64GiB", "1TiB", "15TiB"])
def test_pit_after_one_change_over_volume_size(benchmark: Any, tmp_path: Path, size: int) -> None:
    objects, _nbytes = _one_change_pits(benchmark, tmp_path, f"pit_after_1_change_volume_{size // GiB}GiB",
                                        size, 256 * MiB)
    assert objects <= 3
