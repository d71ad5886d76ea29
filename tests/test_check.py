"""``store.check()``: a volume's packs, PIT roots and map pages checked against each other, and
damaged PITs rebuilt from the packs alone (the packs list every version, all-zero ones included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycache import LocalStore, Volume
from overlaycache.errors import FormatError
from overlaycache.remote.listing import find_root_key
from overlaycache.remote.layout import (
    decode_pack_index,
    packs_prefix,
    pages_prefix,
    roots_prefix,
    volume_key,
)

RS = 4096


def _volume(tmp_path: Path, store: Any, nreg: int = 40) -> Volume:
    return Volume.create(tmp_path / "v", nreg * RS, region_size=RS, secondary=store, replication="periodic",
                         period=3600.0, pack_size=1 << 20)


def _flip(store: Any, key: str, at: int) -> None:
    raw = bytearray(store.get(key))
    raw[at] ^= 0x40
    store.put(key, bytes(raw))


def test_a_healthy_volume_has_no_problems(tmp_path: Path, any_store: Any) -> None:
    with _volume(tmp_path, any_store) as vol:
        vol.write(0, b"a" * (10 * RS))
        vol.snapshot("one")
        vol.write(5 * RS, b"b" * RS)
        vol.write(6 * RS, bytes(RS))
        vol.snapshot("two")
        vid = vol.id
    report = any_store.check(vid, read_data=True)
    assert report.ok and report.problems == []
    assert (report.packs, report.region_versions, report.snapshots) == (2, 12, 2)
    assert str(report).endswith("no problems")


def test_damaged_packs_are_found(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path, store) as vol:
        vol.write(0, b"a" * (4 * RS))
        vol.snapshot()
        vid = vol.id
    [key] = list(store.list(packs_prefix(vid)))
    index = decode_pack_index(store.get(key))
    assert not isinstance(index, int)
    _flip(store, key, index.entries[2].offset + 7)  # a region's bytes
    assert store.check(vid).ok  # the index alone is intact
    report = store.check(vid, read_data=True)
    assert not report.ok and report.damaged_packs == [key]
    assert report.damaged_snapshots == [next(iter(s.id for s in store.snapshots(vid)))]
    _flip(store, key, 60)  # inside the index
    report = store.check(vid)
    assert report.damaged_packs == [key] and "index checksum" in report.problems[0]


def test_damaged_roots_and_missing_pages_are_rebuilt_from_the_packs(tmp_path: Path, any_store: Any) -> None:
    with _volume(tmp_path, any_store, nreg=3000) as vol:  # three leaves
        for r in range(0, 3000, 7):
            vol.write(r * RS, bytes([r % 250 + 1]) * RS)
        one = vol.snapshot("one")
        vol.write(7 * RS, bytes(RS))  # a non-zero region becomes zeros
        vol.write(2999 * RS, b"z" * RS)
        two = vol.snapshot("two")
        vid, size = vol.id, vol.size
    want = {s.id: any_store.image(vid, s).read(0, size) for s in (one, two)}
    _flip(any_store, find_root_key(any_store, vid, one.seq), -5)  # the body: its header (and label) still verify
    pages = sorted(any_store.list(pages_prefix(vid)))
    any_store.delete(pages[:2])
    report = any_store.check(vid)
    assert not report.ok and report.repaired == []
    assert set(report.damaged_snapshots) <= {one.id, two.id} and one.id in report.damaged_snapshots
    report = any_store.check(vid, repair=True)
    assert report.ok and sorted(report.repaired) == sorted(report.damaged_snapshots)
    assert any_store.check(vid).problems == []
    # The damaged root's label and time are not trusted (its bytes fail the digest in its key).
    assert [(s.id, s.label) for s in any_store.snapshots(vid)] == [(one.id, f"rebuilt-{one.id}"), (two.id, "two")]
    for sid, data in want.items():
        assert any_store.image(vid, sid).read(0, size) == data


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(st.tuples(st.just("w"), st.integers(0, 23), st.integers(0, 3)),
                              st.tuples(st.just("s"), st.just(0), st.just(0))), min_size=1, max_size=30))
def test_every_pit_rebuilt_from_the_packs_alone_is_the_pit(tmp_path_factory: Any, ops: list[Any]) -> None:
    """Model: whatever was written (zeros too) and snapshotted, with every root damaged and every
    page gone, a repair rebuilds each PIT to exactly the image it was taken of."""
    tmp = tmp_path_factory.mktemp("rebuild")
    store = LocalStore(tmp / "s")
    images = {}
    with _volume(tmp, store, nreg=24) as vol:
        for op, r, tag in ops:
            if op == "w":
                vol.write(r * RS, bytes([tag]) * RS)  # tag 0: a region of zeros
            else:
                snap = vol.snapshot()
                images[snap.id] = vol.read(0, vol.size)
        vid, size = vol.id, vol.size
    store.delete(list(store.list(pages_prefix(vid))))
    for key in store.list(roots_prefix(vid)):
        _flip(store, key, 40)
    report = store.check(vid, repair=True)
    assert sorted(report.repaired) == sorted(images)
    for sid, data in images.items():
        assert store.image(vid, sid).read(0, size) == data


def test_a_v1_store_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    vid = "a" * 32
    store.put(volume_key(vid), json.dumps({"format": 1, "id": vid, "size": RS, "region_size": RS}).encode())
    with pytest.raises(FormatError, match="format 1"):
        store.check(vid)


def test_a_pit_deleted_outside_collapse_is_named(tmp_path: Path) -> None:
    """A root deleted by something other than collapse (a bucket rule, a hand, credentials that
    should not delete) is found: the newest collapse record kept it, or a lease holds it."""
    from overlaycache import RetentionPolicy
    from overlaycache.remote.leases import take_lease

    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path, store) as vol:
        for i in range(4):
            vol.write(i * RS, bytes([i + 1]) * RS)
            vol.snapshot(f"p{i}")
        vid = vol.id
    snaps = store.snapshots(vid)
    report = store.collapse(vid, RetentionPolicy(keep_last=3))
    assert [s.id for s in report.removed] == [snaps[0].id]
    assert store.check(vid).problems == []  # what collapse removed is not missing
    store.delete([find_root_key(store, vid, snaps[1].seq)])
    problems = store.check(vid).problems
    assert len(problems) == 1 and f"PIT {snaps[1].id}: kept by the collapse of" in problems[0]
    assert "deleted by something other than collapse" in problems[0]
    take_lease(store, vid, snaps[2].id, "reader-1", ttl=600)
    store.delete([find_root_key(store, vid, snaps[2].seq)])
    problems = store.check(vid).problems
    assert any(f"PIT {snaps[2].id}: leased by reader-1, but its root is gone" in p for p in problems), problems
