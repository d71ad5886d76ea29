"""Repacking: a pack partly dead is copied, its live versions only, into a new generation of the
same pack number; retained PITs read the same bytes before, during and after, a reader that had the
original open follows it, a kill at any point leaves every retained PIT whole, and what a run
leaves is within ``max_unused``."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycache import LocalStore, Volume
from overlaycache.errors import InvalidArgumentError
from overlaycache.remote.layout import (
    pack_key,
    packs_prefix,
    parse_pack_key_generation,
    verify_pack,
)
from overlaycache.remote.listing import find_root_key, read_root
from overlaycache.remote.tree import PageSource, PitMap
from overlaycache.retention import RetentionPolicy
from overlaycache.testing.kill import complete_lines, run_and_kill

RS = 4096
NREG = 32


def _volume(path: Path, store: Any) -> Volume:
    return Volume.create(path, NREG * RS, region_size=RS, secondary=store, replication="periodic", period=3600.0,
                         pack_size=1 << 20)


def _history(vol: Volume, rnd: random.Random, pits: int, per_pit: int) -> dict[str, bytes]:
    """A first PIT of every region, then ``pits`` PITs of ``per_pit`` random regions rewritten."""
    images = {}
    vol.write(0, rnd.randbytes(NREG * RS))
    images[vol.snapshot().id] = vol.read(0, vol.size)
    for _ in range(pits):
        for _ in range(per_pit):
            vol.write(rnd.randrange(NREG) * RS, rnd.randbytes(RS) if rnd.random() < 0.8 else bytes(RS))
        images[vol.snapshot().id] = vol.read(0, vol.size)
    return images


def _packs(store: Any, vid: str) -> dict[int, list[tuple[int, str]]]:
    """Every pack number and its objects ``(generation, key)``."""
    out: dict[int, list[tuple[int, str]]] = {}
    for key in store.list(packs_prefix(vid)):
        _v, pack, gen = parse_pack_key_generation(key)
        out.setdefault(pack, []).append((gen, key))
    return out


def _dead_shares(store: Any, vid: str) -> dict[str, float]:
    """Per pack object below the newest PIT's cutoff: the share of its region bytes no PIT on the
    store references (the reference: every PIT's map read region by region)."""
    snaps = store.snapshots(vid)
    live: set[tuple[int, int, int]] = set()
    for s in snaps:
        root = read_root(store, vid, find_root_key(store, vid, s.seq))
        live |= {(pack, r, seq) for r, seq, pack, _off, _len, _sum, _dg in PitMap(root, PageSource(store, vid)).stored()}
    out = {}
    for pack, objs in _packs(store, vid).items():
        if pack >= snaps[-1].seq:
            continue
        for _gen, key in objs:
            index = verify_pack(store.get(key), key)
            data = sum(e.length for e in index.entries)
            dead = sum(e.length for e in index.entries if (pack, e.region, e.seq) not in live)
            out[key] = dead / data if data else 0.0
    return out


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), pits=st.integers(1, 12), per_pit=st.integers(1, 12), keep_last=st.integers(1, 5),
       max_unused=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]))
def test_repack_leaves_at_most_max_unused(tmp_path_factory: Any, seed: int, pits: int, per_pit: int,
                                          keep_last: int, max_unused: float) -> None:
    """After a run, every pack below the cutoff is one object at most ``max_unused`` dead; the
    retained PITs read as they were taken; the dry run foretold it; a second run repacks nothing;
    the primary's next PIT (which reuses maps naming the repacked packs) reads as the volume."""
    tmp = tmp_path_factory.mktemp("repack")
    store = LocalStore(tmp / "s")
    with _volume(tmp / "v", store) as vol:
        images = _history(vol, random.Random(seed), pits, per_pit)
        vid = vol.id
        policy = RetentionPolicy([], keep_last=keep_last)
        preview = store.collapse(vid, policy, now=0.0, max_unused=max_unused, dry_run=True)
        first = store.collapse(vid, policy, now=0.0, max_unused=max_unused, page_grace=0)
        assert (first.packs_repacked, first.bytes_moved, first.objects_deleted, first.bytes_freed) == (
            preview.packs_repacked, preview.bytes_moved, preview.objects_deleted, preview.bytes_freed)
        shares = _dead_shares(store, vid)
        assert all(share <= max_unused for share in shares.values()), shares
        assert all(len(objs) == 1 for objs in _packs(store, vid).values())
        for s in store.snapshots(vid):
            assert store.image(vid, s).read(0, vol.size) == images[s.id]
        if max_unused == 0.0 and first.removed:
            assert first.packs_repacked > 0 or all(share == 0 for share in shares.values())
        second = store.collapse(vid, policy, now=0.0, max_unused=max_unused, page_grace=0)
        assert second.packs_repacked == 0 and second.bytes_moved == 0
        assert store.check(vid, read_data=True).problems == []
        vol.write(3 * RS, b"next" * 64)
        snap = vol.snapshot()
        assert store.image(vid, snap).read(0, vol.size) == vol.read(0, vol.size)


def test_a_repacked_pack_keeps_only_live_versions_and_readers_follow_it(tmp_path: Path) -> None:
    """Region 0..31 in one pack, then all but three rewritten: once the first PIT is dropped, its
    pack is 29/32 dead; it is repacked into generation 1 holding the three, and an image opened
    on the original before the collapse reads them from the generation after it."""
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        rnd = random.Random(1)
        vol.write(0, rnd.randbytes(NREG * RS))
        first = vol.snapshot()
        vol.write(3 * RS, rnd.randbytes((NREG - 3) * RS))
        second = vol.snapshot()
        want = vol.read(0, vol.size)
        vid = vol.id
    original = [key for pack, objs in _packs(store, vid).items() for gen, key in objs if pack <= first.seq]
    assert len(original) == 1
    image = store.image(vid, second)  # its map names the first pack for regions 0..2
    report = store.collapse(vid, RetentionPolicy([], keep_last=1), now=0.0, max_unused=0.5)
    assert [s.id for s in report.removed] == [first.id]
    assert report.packs_repacked == 1 and report.bytes_moved == 3 * RS
    _v, pack, _g = parse_pack_key_generation(original[0])
    assert store.head(original[0]) is None
    index = verify_pack(store.get(pack_key(vid, pack, 1)))
    assert sorted(e.region for e in index.entries) == [0, 1, 2]
    assert image.read(0, vol.size) == want
    assert store.image(vid, second).read(0, vol.size) == want
    # Repacked again (a later generation, the one the image knew gone): it looks again.
    data = bytearray(store.get(pack_key(vid, pack, 1)))
    store.put(pack_key(vid, pack, 2), bytes(data), if_absent=True)
    store.delete([pack_key(vid, pack, 1)])
    for r in range(3):
        image.source.fetch(r, keep=False)  # (one a read-ahead brought in is served from memory)
        assert bytes(image.source.fetch(r, keep=False)) == want[r * RS : (r + 1) * RS]
    image.close()
    assert store.check(vid, read_data=True).problems == []


def test_check_names_a_generation_missing_a_version(tmp_path: Path) -> None:
    """A generation that lacks a version a PIT needs (the original gone) is a problem naming it."""
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        vol.write(0, random.Random(2).randbytes(NREG * RS))
        first = vol.snapshot()
        vol.write(3 * RS, bytes([7]) * ((NREG - 3) * RS))
        second = vol.snapshot()
        vid = vol.id
    store.collapse(vid, RetentionPolicy([], keep_last=1), now=0.0, max_unused=0.0)
    (pack, objs), = [(p, o) for p, o in _packs(store, vid).items() if p <= first.seq]
    gen, key = objs[0]
    assert gen == 1
    # Replace generation 1 by one without region 0's version.
    from overlaycache.remote.layout import encode_pack

    whole = store.get(key)
    index = verify_pack(whole)
    versions = [(e.region, e.seq, whole[e.offset : e.offset + e.length], e.checksum) for e in index.entries
                if e.region != 0]
    raw, _entries = encode_pack(vid, RS, pack, index.created_at, versions)
    store.delete([key])
    store.put(key, bytes(raw))
    problems = store.check(vid).problems
    assert any("region 0 version" in p and "is not in" in p for p in problems), problems
    with pytest.raises(Exception, match="not in its repacked generation"):
        store.image(vid, second).read(0, RS)


def test_bad_max_unused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        vol.snapshot()
        vid = vol.id
    for bad in (-0.1, 1.5, "half", True, float("nan")):
        with pytest.raises(InvalidArgumentError, match="max_unused"):
            store.collapse(vid, RetentionPolicy([], keep_last=1), max_unused=bad)


CHILD = r"""
import sys, time
from overlaycache import LocalStore
from overlaycache.retention import RetentionPolicy

class Slow(LocalStore):
    def put(self, key, data, **kw):
        time.sleep(0.003)
        super().put(key, data, **kw)
    def delete(self, keys):
        time.sleep(0.003)
        super().delete(keys)

store = Slow(sys.argv[1])
print("READY", flush=True)
store.collapse(sys.argv[2], RetentionPolicy([], keep_last=int(sys.argv[3])), now=0.0, page_grace=0, max_unused=0.0)
print("DONE", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_sigkill_during_repack(tmp_path: Path, seed: int) -> None:
    """Killed at a random point of a run that repacks, every retained PIT reads whole; a rerun
    leaves each pack one object within the threshold."""
    rnd = random.Random(seed)
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:  # a pack per PIT: many to repack
        images = _history(vol, rnd, 10, 6)
        vid, size = vol.id, vol.size
    keep = 2
    kept = [s.id for s in store.snapshots(vid)][-keep:]
    log = run_and_kill(CHILD, [str(tmp_path / "s"), vid, str(keep)], tmp_path / "child.out",
                       rnd.choice([0.01, 0.03, 0.06, 0.1]))
    for sid in kept:
        assert store.image(vid, sid).read(0, size) == images[sid]
    report = store.collapse(vid, RetentionPolicy([], keep_last=keep), now=0.0, page_grace=0, max_unused=0.0)
    assert [s.id for s in report.kept] == kept
    assert "DONE" in complete_lines(log) or report.objects_deleted > 0
    assert all(len(objs) == 1 for objs in _packs(store, vid).values())
    assert all(share == 0 for share in _dead_shares(store, vid).values())
    for sid in kept:
        assert store.image(vid, sid).read(0, size) == images[sid]
    assert store.check(vid, read_data=True).problems == []


def test_collapses_racing_each_other_while_repacking(tmp_path: Path) -> None:
    """Two collapses with different policies at once: what both keep reads as it was taken."""
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        images = _history(vol, random.Random(9), 12, 5)
        vid, size = vol.id, vol.size
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(keep: int) -> None:
        try:
            barrier.wait()
            store.collapse(vid, RetentionPolicy([], keep_last=keep), now=0.0, page_grace=0, max_unused=0.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in (3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    left = store.snapshots(vid)
    assert [s.id for s in left] == sorted(images)[-3:]
    for s in left:
        assert store.image(vid, s).read(0, size) == images[s.id]
    store.collapse(vid, RetentionPolicy([], keep_last=3), now=0.0, page_grace=0, max_unused=0.0)
    assert all(len(objs) == 1 for objs in _packs(store, vid).values())
    assert store.check(vid, read_data=True).problems == []


def test_repack_on_s3(tmp_path: Path, s3_store: Any) -> None:
    """On an S3 server: the sizes come from the listing (no HEAD per pack), and a reader that had
    the original open follows it to the generation after a 404."""
    from overlaycache.store.metered import MeteredStore, RequestCount

    with _volume(tmp_path / "v", s3_store) as vol:
        images = _history(vol, random.Random(4), 6, 8)
        vid, size = vol.id, vol.size
    newest = s3_store.snapshots(vid)[-1]
    image = s3_store.image(vid, newest)
    metered = MeteredStore(s3_store)
    first = metered.collapse(vid, RetentionPolicy([], keep_last=1), now=0.0, max_unused=0.0)  # type: ignore[attr-defined]
    assert first.packs_repacked > 0
    heads = metered.stats().by_kind.get("HEAD", RequestCount()).requests
    # HEADs: the volume record, and each object deleted (counted before the delete), no more.
    assert heads <= 1 + first.objects_deleted
    assert image.read(0, size) == images[newest.id]
    assert s3_store.image(vid, newest).read(0, size) == images[newest.id]
    assert all(share == 0 for share in _dead_shares(s3_store, vid).values())
    image.close()


def test_repair_rebuilds_a_pit_from_repacked_packs(tmp_path: Path) -> None:
    """A PIT whose root is damaged after its packs were repacked is rebuilt from the generations
    (their offsets, not the original's) and reads as it was taken."""
    store = LocalStore(tmp_path / "s")
    with _volume(tmp_path / "v", store) as vol:
        images = _history(vol, random.Random(6), 8, 10)
        vid, size = vol.id, vol.size
    report = store.collapse(vid, RetentionPolicy([], keep_last=2), now=0.0, max_unused=0.0)
    assert report.packs_repacked > 0
    kept = store.snapshots(vid)
    key = find_root_key(store, vid, kept[0].seq)
    raw = bytearray(store.get(key))
    raw[-40] ^= 0xFF  # in the compressed entries
    store.delete([key])
    store.put(key, bytes(raw))
    assert kept[0].id in store.check(vid).damaged_snapshots
    fixed = store.check(vid, repair=True)
    assert fixed.repaired == [kept[0].id]
    for s in store.snapshots(vid):
        assert store.image(vid, s).read(0, size) == images[s.id]
    assert store.check(vid, read_data=True).ok
