"""Collapse at scale: 1,000 PITs of a 10,000-region volume, 5 minutes apart (about 3.5 days), ten
random regions changed between two PITs, collapsed by the seed-like policy
``all@3h,15m@1d,1h@7d,1d@90d`` an hour after the last PIT. Reported: PITs kept and removed, objects
deleted and bytes freed, requests by kind (a store that counts them), and the time of the run; then
the second run, which deletes the map pages the first condemned (run with no grace period, as if the
default hour had passed); and a third with ``max_unused=0.1``, which repacks the packs more than a
tenth dead (the default, 0.5, finds none here: a PIT changes 10 of 10,000 regions, so a dropped
PIT's versions are mostly still those of a kept one).

The PITs' times come from a clock the benchmark sets (the replicator's ``time`` is replaced while
they are published); the store is a local directory, so the time is that of overlaycache's own work.
"""

from __future__ import annotations

import random
import time
import types
from pathlib import Path
from typing import Any

import pytest

from _support import record
from overlaycache import LocalStore, Volume
from overlaycache.replication import replicator
from overlaycache.retention import RetentionPolicy
from overlaycache.store.metered import MeteredStore

RS = 4096
REGIONS = 10_000
PITS = 1_000
STEP = 300.0
T0 = 1_800_000_000.0  # a Wednesday, 08:00 UTC


def test_collapse_1000_pits(benchmark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": T0}
    fake = types.SimpleNamespace(time=lambda: clock["now"], monotonic=time.monotonic, sleep=time.sleep)
    monkeypatch.setattr(replicator, "time", fake)
    store = LocalStore(tmp_path / "store")
    rnd = random.Random(1)
    with Volume.create(tmp_path / "v", REGIONS * RS, region_size=RS, secondary=store, replication="periodic",
                       period=1e9) as vol:
        vol.write(0, rnd.randbytes(REGIONS * RS))
        for i in range(PITS):
            for _ in range(10):
                vol.write(rnd.randrange(REGIONS) * RS, rnd.randbytes(RS))
            clock["now"] = T0 + STEP * i
            vol.snapshot()
        vid = vol.id
    monkeypatch.undo()
    policy = RetentionPolicy.parse("all@3h,15m@1d,1h@7d,1d@90d")
    now = T0 + STEP * (PITS - 1) + 3600
    metered = MeteredStore(store)
    reports: list[Any] = []

    def run() -> None:
        reports.append(metered.collapse(vid, policy, now=now))

    record(benchmark, "collapse_1000_PITs", "info", "overlaycache")
    benchmark.pedantic(run, rounds=1, iterations=1)
    first = reports[0]
    stats = metered.stats()
    t = time.perf_counter()
    second = metered.collapse(vid, policy, now=now, page_grace=0)  # as if an hour had passed
    second_time = time.perf_counter() - t
    before = metered.stats()
    t = time.perf_counter()
    third = metered.collapse(vid, policy, now=now, page_grace=0, max_unused=0.1)  # reclaim more: repack
    third_time = time.perf_counter() - t
    after = metered.stats()
    third_requests = {k: after.by_kind[k].requests - (before.by_kind[k].requests if k in before.by_kind else 0)
                      for k in after.by_kind}
    assert len(first.kept) + len(first.removed) == PITS and second.removed == [] and third.removed == []
    benchmark.extra_info["kept"] = len(first.kept)
    benchmark.extra_info["note"] = (
        f"{PITS} PITs of {REGIONS} regions: {len(first.kept)} kept, {len(first.removed)} removed; "
        f"{first.objects_deleted} objects ({first.bytes_freed} B) deleted, {first.pages_condemned} pages "
        f"condemned; {first.packs_repacked} packs repacked ({first.bytes_moved} B moved); read {first.bytes_read} B, "
        f"wrote {first.bytes_written} B; requests {stats}; "
        f"{first.duration:.2f}s; second run: {second.objects_deleted} objects deleted in {second_time:.2f}s; "
        f"third run with max_unused 0.1: {third.packs_repacked} packs repacked, {third.bytes_moved} B moved, "
        f"{third.bytes_freed} B freed, requests {third_requests}, {third_time:.2f}s")
    for snap in store.snapshots(vid)[-3:]:
        store.image(vid, snap).read(0, RS)
    assert store.check(vid).problems == []
