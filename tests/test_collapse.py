"""Collapse and garbage collection: retained PITs stay byte-identical, what no PIT needs is deleted
(pages one run later), crash-safe, resumable, and safe beside live replication."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycache import LocalStore, Volume
from overlaycache.errors import InvalidArgumentError
from overlaycache.remote.layout import packs_prefix, pages_prefix, parse_pack_key
from overlaycache.remote.listing import find_root_key, read_root
from overlaycache.remote.tree import PageSource, reachable
from overlaycache.retention import RetentionPolicy
from overlaycache.testing.kill import complete_lines, run_and_kill

RS = 4096
NREG = 24


def _volume(path: Path, store: Any) -> Volume:
    return Volume.create(path, NREG * RS, region_size=RS, secondary=store, replication="periodic", period=3600.0,
                         pack_size=1 << 20)


def _history(vol: Volume, ops: list[tuple[int, int, bool]]) -> dict[str, bytes]:
    """Apply writes (region, tag: 0 writes zeros), a PIT after those flagged; returns each PIT's image."""
    images = {}
    for r, tag, pit in ops:
        vol.write(r * RS, bytes([tag]) * RS)
        if pit:
            snap = vol.snapshot(f"p{len(vol.snapshots())}")
            images[snap.id] = vol.read(0, vol.size)
    return images


def _garbage(store: Any, vid: str) -> tuple[set[str], set[str]]:
    """Pages no root reaches, and packs below the newest PIT's cutoff no root reaches."""
    snaps = store.snapshots(vid)
    roots = [read_root(store, vid, find_root_key(store, vid, s.seq)) for s in snaps]
    live_pages, live_packs = reachable(roots, PageSource(store, vid))
    pages = {k for k in store.list(pages_prefix(vid)) if bytes.fromhex(k.rsplit("/", 1)[1]) not in live_pages}
    newest = snaps[-1].seq if snaps else 0
    packs = {k for k in store.list(packs_prefix(vid))
             if parse_pack_key(k)[1] < newest and parse_pack_key(k)[1] not in live_packs}
    return pages, packs


ops_strategy = st.lists(st.tuples(st.integers(0, NREG - 1), st.integers(0, 3), st.booleans()), min_size=1,
                        max_size=25)


tiers_strategy = st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(["0.001s", "0.005s", "0.02s", "0.1s"])),
                                    st.sampled_from(["0.002s", "0.01s", "0.05s", "1s"])), max_size=3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops_strategy, tiers=tiers_strategy, keep_last=st.integers(0, 4), pin=st.integers(0, 6),
       later=st.sampled_from([0.0, 0.005, 0.03, 2.0]))
def test_collapse_keeps_what_the_policy_says_and_collects_the_rest(tmp_path_factory: Any, ops: list[Any],
                                                                  tiers: list[Any], keep_last: int, pin: int,
                                                                  later: float) -> None:
    """Random writes (zeros too) and PITs (milliseconds apart), a random policy and ``now``: the
    kept set is the policy's (and the newest), every kept PIT reads as it was taken, dead packs go
    at once and dead pages one run later, a third run is a no-op, and the primary goes on."""
    tmp = tmp_path_factory.mktemp("collapse")
    store = LocalStore(tmp / "s")
    with _volume(tmp / "v", store) as vol:
        images = _history(vol, ops + [(0, 9, True)])
        vid = vol.id
        snaps = store.snapshots(vid)
        now = snaps[-1].created_at + later
        policy = RetentionPolicy(tiers, keep_last=keep_last, pinned={f"p{pin}"})
        want = {s.id for s in policy.select(snaps, now)} | {snaps[-1].id}
        preview = store.collapse(vid, policy, now=now, dry_run=True)
        assert {s.id for s in preview.kept} == want and [s.id for s in store.snapshots(vid)] == [s.id for s in snaps]
        first = store.collapse(vid, policy, now=now, page_grace=0)
        assert {s.id for s in first.kept} == want == {s.id for s in store.snapshots(vid)}
        assert first.objects_deleted == preview.objects_deleted and first.bytes_freed == preview.bytes_freed
        for sid in want:
            assert store.image(vid, sid).read(0, vol.size) == images[sid]
        pages, packs = _garbage(store, vid)
        assert packs == set()  # dead packs go at once
        assert len(pages) == first.pages_condemned  # dead pages wait for the next run
        second = store.collapse(vid, policy, now=now, page_grace=0)
        assert second.removed == [] and second.objects_deleted == len(pages)
        assert _garbage(store, vid) == (set(), set())
        assert store.collapse(vid, policy, now=now, page_grace=0).objects_deleted == 0  # a no-op now
        assert store.check(vid, read_data=True).problems == []
        vol.write(0, b"after" * 100)  # the primary goes on: its next PIT reuses the pages kept
        snap = vol.snapshot()
        assert store.image(vid, snap).read(0, vol.size) == vol.read(0, vol.size)
        assert store.check(vid).problems == []


def test_pages_wait_out_their_grace(tmp_path: Path) -> None:
    """A condemned page is deleted only once it has been condemned for ``page_grace`` seconds."""
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        _history(vol, [(r, r + 1, True) for r in range(8)])
        vid = vol.id
    policy = RetentionPolicy([], keep_last=1)
    first = store.collapse(vid, policy, now=0.0, page_grace=0.3)
    assert first.pages_condemned > 0
    again = store.collapse(vid, policy, now=0.0, page_grace=0.3)  # too soon
    assert again.objects_deleted == 0 and again.pages_condemned == first.pages_condemned
    time.sleep(0.35)
    late = store.collapse(vid, policy, now=0.0, page_grace=0.3)
    assert late.objects_deleted == first.pages_condemned and _garbage(store, vid) == (set(), set())


def test_bad_arguments(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    with pytest.raises(InvalidArgumentError):
        store.collapse("v" * 32, "all@1h")


CHILD = r"""
import sys, time
from overlaycache import LocalStore
from overlaycache.retention import RetentionPolicy

class Slow(LocalStore):
    def delete(self, keys):
        time.sleep(0.004)
        super().delete(keys)

store = Slow(sys.argv[1])
print("READY", flush=True)
report = store.collapse(sys.argv[2], RetentionPolicy([], keep_last=int(sys.argv[3])), now=0.0, page_grace=0)
print("DONE", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_during_collapse(tmp_path: Path, seed: int) -> None:
    """Killed at a random point, collapse leaves every retained PIT readable; a rerun finishes."""
    rnd = random.Random(seed)
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        ops = [(rnd.randrange(NREG), rnd.randrange(1, 4), rnd.random() < 0.3) for _ in range(120)]
        images = _history(vol, ops + [(1, 7, True)])
        vid, size = vol.id, vol.size
    for keep_last in (6, 3):
        kept_ids = [s.id for s in store.snapshots(vid)][-keep_last:]
        log = run_and_kill(CHILD, [str(tmp_path / "s"), vid, str(keep_last)], tmp_path / f"child-{keep_last}.out",
                           rnd.choice([0.02, 0.05, 0.1, 0.2]))
        done = "DONE" in complete_lines(log)
        for sid in kept_ids:  # retained PITs are whole at any point
            assert store.image(vid, sid).read(0, size) == images[sid]
        report = store.collapse(vid, RetentionPolicy([], keep_last=keep_last), now=0.0, page_grace=0)  # the rerun
        assert [s.id for s in report.kept] == kept_ids
        assert done or report.objects_deleted >= 0
        store.collapse(vid, RetentionPolicy([], keep_last=keep_last), now=0.0, page_grace=0)
        assert _garbage(store, vid) == (set(), set())
        assert store.check(vid, read_data=True).problems == []


def test_collapse_racing_live_replication(tmp_path: Path) -> None:
    """Collapses run over and over while the primary writes and publishes PITs: every PIT left reads
    as it was taken, and the newest is the volume."""
    store = LocalStore(tmp_path / "s")
    images: dict[str, bytes] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    reports: list[Any] = []

    def collapser() -> None:
        try:
            while not stop.is_set():
                reports.append(store.collapse(vid, RetentionPolicy([], keep_last=2), now=0.0, page_grace=1.0))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with _volume(tmp_path / "v", store) as vol:
        vid = vol.id
        images.update(_history(vol, [(0, 1, True)]))
        t = threading.Thread(target=collapser)
        t.start()
        rnd = random.Random(5)
        try:
            deadline = time.monotonic() + 4.0
            i = 0
            while time.monotonic() < deadline or i < 60:
                i += 1
                vol.write(rnd.randrange(NREG) * RS, bytes([i % 250 + 1]) * RS)
                if i % 3 == 0:
                    snap = vol.snapshot()
                    images[snap.id] = vol.read(0, vol.size)
        finally:
            stop.set()
            t.join()
        assert errors == []
        # Pages and packs were collected while PITs were published, not only roots.
        assert sum(r.objects_deleted - len(r.removed) for r in reports) > 0
        left = store.snapshots(vid)
        assert left and left[-1].id == max(images)
        for s in left:
            assert store.image(vid, s).read(0, vol.size) == images[s.id]
        snap = vol.snapshot()
        assert store.image(vid, snap).read(0, vol.size) == vol.read(0, vol.size)
        assert store.check(vid).problems == []


def test_a_distributed_overlays_pit_is_leased_and_kept(tmp_path: Path) -> None:
    """The PIT a distributed overlay reads from is pinned by a lease: a collapse keeps it, the volume
    goes on reading its lost regions from it; an expired lease pins nothing and is deleted."""
    from overlaycache.remote.layout import leases_prefix
    from overlaycache.remote.leases import take_lease

    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        images = _history(vol, [(r, r + 1, r % 5 == 4) for r in range(NREG)])
        vol.mark_unavailable([1, 2, 3])
        do = vol.distributed_overlay
        assert do is not None
        images.update(_history(vol, [(0, 50, True), (5, 51, True), (6, 52, True)]))
        vid = vol.id
        take_lease(store, vid, next(iter(images)), "old-host", ttl=60, now=0.0)  # long expired
        report = store.collapse(vid, RetentionPolicy([], keep_last=1))
        kept = {s.id: report.reasons[s.id] for s in report.kept}
        assert set(kept) == {do["snapshot_id"], max(images)}
        assert any(r.startswith("lease ") for r in kept[do["snapshot_id"]])
        assert not any("old-host" in k for k in store.list(leases_prefix(vid)))  # expired: deleted
        vol.clear_cache()
        want = images[max(images)]
        assert vol.read(0, vol.size) == want  # regions 1-3 from the leased PIT
        store.collapse(vid, RetentionPolicy([], keep_last=1))
        assert store.check(vid).problems == []


def test_a_recovery_image_leases_its_pit(tmp_path: Path) -> None:
    """A recovery image (and so a clone over one) pins its PIT for a day: a collapse keeps it."""
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        images = _history(vol, [(r, r + 1, True) for r in range(6)])
        first = min(images)
        with vol.image(first) as img:
            report = store.collapse(vol.id, RetentionPolicy([], keep_last=1))
            assert {s.id for s in report.kept} == {first, max(images)}
            assert any(r.startswith("lease ") for r in report.reasons[first])
            assert img.read(0, vol.size) == images[first]


def test_an_image_opened_elsewhere_can_lease_its_pit(tmp_path: Path) -> None:
    """``store.image(..., lease=...)``: a reader on another machine pins the PIT it reads; a bad
    holder name is refused before anything is stored."""
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        images = _history(vol, [(r, r + 1, True) for r in range(5)])
        vid = vol.id
    first = min(images)
    with store.image(vid, first, lease=600, holder="restore-host") as img:
        report = store.collapse(vid, RetentionPolicy([], keep_last=1))
        assert {s.id for s in report.kept} == {first, max(images)}
        assert any("restore-host" in r for r in report.reasons[first])
        assert img.read(0, NREG * RS) == images[first]
    for bad in ({"lease": 600, "holder": "bad/holder"}, {"lease": "soon"}, {"lease": -5}):
        with pytest.raises(InvalidArgumentError):
            store.image(vid, first, **bad)  # type: ignore[arg-type]
    with store.image(vid, first, lease="2h") as img:  # a duration, as the policies' are
        assert img.read(0, 1) == images[first][:1]


def test_a_long_reader_keeps_its_pit_by_renewing_its_lease(tmp_path: Path) -> None:
    """A lease is renewed while its image is open: a reader that takes longer than the lease is
    still pinned (a collapse keeps the PIT), and once it closes the renewals stop."""
    from overlaycache.remote.leases import active_leases

    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        images = _history(vol, [(r, r + 1, True) for r in range(5)])
        vid = vol.id
    first = min(images)
    img = store.image(vid, first, lease=2.0, holder="slow-reader")
    assert img.lease is not None and img.lease.every == 1.0
    time.sleep(3.5)  # longer than the first lease: only the renewals pin the PIT now
    assert img.lease.renewals >= 2
    report = store.collapse(vid, RetentionPolicy([], keep_last=1))
    assert first in {s.id for s in report.kept} and any("slow-reader" in r for r in report.reasons[first])
    assert img.read(0, NREG * RS) == images[first]
    img.close()
    renewals = img.lease.renewals
    time.sleep(1.5)
    assert img.lease.renewals == renewals  # stopped
    time.sleep(1.0)  # the last lease runs out
    assert first not in active_leases(store, vid, time.time())
    report = store.collapse(vid, RetentionPolicy([], keep_last=1))
    assert first not in {s.id for s in report.kept}


def test_a_recovery_image_renews_its_lease_until_closed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        images = _history(vol, [(r, r + 1, True) for r in range(3)])
        img = vol.image(min(images))
        keeper = img.remote.lease
        assert keeper is not None and keeper.ttl == 86400.0 and keeper.expires > time.time() + 86000
        img.close()
        assert not keeper._thread.is_alive()


def test_collapse_reports_its_progress(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        _history(vol, [(r, r + 1, True) for r in range(6)])
        vid = vol.id
    calls: list[tuple[int, int]] = []
    report = store.collapse(vid, RetentionPolicy([], keep_last=1), progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (1, 1)  # the kept PIT's map walked
    done, total = calls[-1]
    assert done == total >= len(report.removed) and all(d <= t for d, t in calls)


def test_only_the_newest_collapse_records_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run writes a record; records beyond the newest ``KEEP_RECORDS`` are deleted (the
    newest holds the condemned pages, which a later run needs)."""
    from overlaycache.remote import collapse
    from overlaycache.remote.layout import gc_prefix

    monkeypatch.setattr(collapse, "KEEP_RECORDS", 3)
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        _history(vol, [(r, r + 1, True) for r in range(6)])
        vid = vol.id
    seen = []
    for keep in (6, 5, 4, 3, 2):
        store.collapse(vid, RetentionPolicy([], keep_last=keep), now=0.0, page_grace=0)
        seen.append(sorted(store.list(gc_prefix(vid))))
    assert [len(s) for s in seen] == [1, 2, 3, 3, 3]
    assert seen[-1][:2] == seen[-2][1:]  # the oldest went, the newest came
    store.collapse(vid, RetentionPolicy([], keep_last=2), now=0.0, page_grace=0)
    assert _garbage(store, vid) == (set(), set())  # the pages the newest record condemned went
    assert len(list(store.list(gc_prefix(vid)))) == 3
