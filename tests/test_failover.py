"""The distributed overlay snapshot: the worked examples of DESIGN.md §4 (Figs. 3C-3E), detection,
routing of reads per region (PO, PB, R), and persistence."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from overlaycache import Volume
from overlaycache.errors import InvalidArgumentError, OutOfRangeError, RegionUnavailableError
from overlaycache.testing.patterns import region_chars
from overlaycache.testing.stores import CountingStore, SwitchableStore

RS = 4096


def chars(vol: Any, n: int = 8) -> str:
    return region_chars(vol, RS, n)


def put(vol: Volume, region: int, ch: str) -> None:
    vol.write(region * RS, ch.encode() * RS)


def fig3_primary(tmp_path: Path, store: Any, replicate_region_6: bool) -> Volume:
    """Regions a..h, then the Fig. 2 writes and 4->6; synchronized at T4 (region 6 optional)."""
    # No readahead: these tests count the GETs of each read (readahead: tests/test_routing.py).
    vol = Volume.create(tmp_path / "vol", 8 * RS, region_size=RS, secondary=store, replication="periodic",
                        period=3600, readahead=0)
    for r, ch in enumerate("abcdefgh"):
        put(vol, r, ch)
    put(vol, 0, "x")
    put(vol, 3, "z")
    put(vol, 0, "1")
    vol.replicate()  # T1..T4: everything so far is on the secondary
    put(vol, 6, "4")
    if replicate_region_6:
        vol.replicate()
    assert chars(vol) == "1 b c z e f 4 h"
    return vol


@pytest.mark.parametrize("region_6_synced", [True, False], ids=["fig3C", "fig3E"])
def test_fig3_distributed_overlay(tmp_path: Path, s3_store: Any, region_6_synced: bool) -> None:
    """Fig. 3C/3D: regions 2, 3, 5 fail at T5; a PIT is made; u->0 and 7->3 go to a fresh overlay.
    Fig. 3E: region 6 was not replicated yet: the forced replication ships it first."""
    store = CountingStore(s3_store)
    vol = fig3_primary(tmp_path, store, region_6_synced)
    with vol:
        puts_before = len(store.region_puts)
        vol.mark_unavailable([2, 3, 5])  # T5: begins the distributed overlay
        do = vol.distributed_overlay
        assert do is not None and do["lost"] == []
        shipped = store.region_puts[puts_before:]
        if region_6_synced:
            assert shipped == []
        else:
            assert shipped == [6]
        assert vol.unavailable == frozenset({2, 3, 5})
        put(vol, 0, "u")
        put(vol, 3, "7")
        assert vol.location_map() == ["PO", "PB", "R", "PO", "PB", "R", "PB", "PB"]
        gets_before = len(store.region_gets)
        assert chars(vol) == "u b c 7 e f 4 h"
        fetched = set(store.region_gets[gets_before:])
        assert fetched == {2, 5}  # only the R regions come from the secondary
        with store.image(vol.id, do["snapshot_id"]) as pit:
            assert chars(pit) == "1 b c z e f 4 h"
        assert vol.begin_distributed_overlay().id == do["snapshot_id"]  # idempotent
        assert vol.location_map(2, 2) == ["R", "PO"]


def test_distributed_overlay_survives_reopen(tmp_path: Path, s3_store: Any) -> None:
    vol = fig3_primary(tmp_path, s3_store, True)
    with vol:
        vol.mark_unavailable([2, 3, 5])
        put(vol, 0, "u")
        put(vol, 3, "7")
    with Volume.open(tmp_path / "vol", secondary=s3_store) as again:
        assert again.distributed_overlay is not None
        assert again.location_map() == ["PO", "PB", "R", "PO", "PB", "R", "PB", "PB"]
        assert chars(again) == "u b c 7 e f 4 h"
        with pytest.raises(InvalidArgumentError):
            again.merge_down()  # the base is not written during the distributed overlay


def test_partial_write_to_a_remote_region_fetches_it_first(tmp_path: Path, s3_store: Any) -> None:
    vol = fig3_primary(tmp_path, s3_store, True)
    with vol:
        vol.mark_unavailable([5])
        vol.write(5 * RS + 10, b"XY")
        want = b"f" * 10 + b"XY" + b"f" * (RS - 12)
        assert vol.read(5 * RS, RS) == want
        assert vol.location_map(5, 1) == ["PO"]
        snap = vol.snapshot()  # replication continues from the overlay
        assert s3_store.image(vol.id, snap).read(5 * RS, RS) == want


def test_corruption_found_by_a_read_begins_the_distributed_overlay(tmp_path: Path, s3_store: Any) -> None:
    vol = fig3_primary(tmp_path, s3_store, True)
    assert vol.merge_down() == 8  # everything into the base file
    vol.close()
    with open(tmp_path / "vol" / "base.data", "r+b") as f:  # region 2 ('c') lives in the base
        f.seek(2 * RS + 100)
        f.write(b"!")
    with Volume.open(tmp_path / "vol", secondary=s3_store) as vol:
        assert chars(vol) == "1 b c z e f 4 h"  # region 2 served from the secondary
        assert vol.unavailable == frozenset({2}) and vol.distributed_overlay is not None
        assert vol.location_map() == ["PB", "PB", "R", "PB", "PB", "PB", "PB", "PB"]


def test_truncated_base_at_open_is_served_from_the_secondary(tmp_path: Path, s3_store: Any) -> None:
    """A volume whose base.data was cut while it was closed still opens; the regions past the cut
    are read from the secondary through the distributed overlay."""
    import os

    vol = fig3_primary(tmp_path, s3_store, True)
    with vol:
        assert vol.merge_down() == 8  # everything into the base file
        vol.replicate()
    os.truncate(tmp_path / "vol" / "base.data", 4 * RS)  # regions 4..7 vanish
    with Volume.open(tmp_path / "vol", secondary=s3_store) as vol:
        assert chars(vol) == "1 b c z e f 4 h"
        assert vol.unavailable == frozenset({4, 5, 6, 7}) and vol.distributed_overlay is not None
        assert vol.location_map() == ["PB"] * 4 + ["R"] * 4


def test_truncated_base_under_a_live_volume(tmp_path: Path, s3_store: Any) -> None:
    vol = fig3_primary(tmp_path, s3_store, True)
    with vol:
        vol.merge_down()  # everything into the base file
        vol.replicate()
        import os

        os.truncate(tmp_path / "vol" / "base.data", 4 * RS)  # regions 4..7 vanish
        assert vol.read(0, 4 * RS) == b"1" * RS + b"b" * RS + b"c" * RS + b"z" * RS  # still local
        assert vol.unavailable == frozenset()
        progress: list[tuple[int, int]] = []
        assert vol.scrub(lambda done, total: progress.append((done, total))) == [4, 5, 6, 7]
        assert progress[-1] == (8, 8)
        assert vol.unavailable == frozenset(range(4, 8)) and vol.distributed_overlay is not None
        assert vol.location_map() == ["PB"] * 4 + ["R"] * 4
        assert chars(vol) == "1 b c z e f 4 h"
        assert vol.scrub() == []  # unavailable regions are not scrubbed again


def test_unsynced_unreadable_regions_are_reported_lost(tmp_path: Path, s3_store: Any, caplog: Any) -> None:
    vol = fig3_primary(tmp_path, s3_store, False)  # region 6 ('4') not replicated
    with vol:
        vol.mark_unavailable([6])
        do = vol.distributed_overlay
        assert do is not None and do["lost"] == [6]
        assert any("could not be read" in r.getMessage() for r in caplog.records)
        assert chars(vol) == "1 b c z e f g h"  # the last replicated version of region 6


def test_without_a_secondary_unavailable_regions_raise(tmp_path: Path) -> None:
    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS) as vol:
        put(vol, 1, "q")
        vol.mark_unavailable([1])
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(0, 4 * RS)
        assert info.value.regions == (1,)
        assert vol.read(0, RS) == bytes(RS)  # other regions keep working
        with pytest.raises(RegionUnavailableError):
            vol.write(RS + 1, b"partial")
        put(vol, 1, "w")  # a whole new version makes it readable again
        assert vol.read(RS, 2) == b"ww" and vol.unavailable == frozenset()
        with pytest.raises(OutOfRangeError):
            vol.mark_unavailable([4])
        assert vol.location_map() == ["PB"] * 4


def test_fig3b_restore_reads_only_the_bad_regions_remotely(tmp_path: Path, s3_store: Any) -> None:
    """Fig. 3B: writes after T1 (F->2, y->3, G->5) are found corrupt; restoring T1 reads 2, 3, 5
    from the secondary and the rest from the primary: 1 b c z e f g h."""
    store = CountingStore(s3_store)
    with Volume.create(tmp_path / "vol", 8 * RS, region_size=RS, secondary=store, replication="async") as vol:
        for r, ch in enumerate("abcdefgh"):
            put(vol, r, ch)
        put(vol, 0, "x")
        put(vol, 3, "z")
        put(vol, 0, "1")
        t1 = vol.snapshot("T1")
        put(vol, 2, "F")
        put(vol, 3, "y")
        put(vol, 5, "G")
        vol.flush()
        assert chars(vol) == "1 b F y e G g h"
        assert vol.diff(t1) == [2, 3, 5]
        gets = len(store.region_gets)
        with vol.image("T1") as img:  # a recovery image beside the live volume
            assert chars(img) == "1 b c z e f g h"
            assert img.local_reads == 5
        assert len(store.region_gets) - gets == 3
        gets = len(store.region_gets)
        assert vol.restore(t1) == [2, 3, 5]
        assert len(store.region_gets) - gets == 3
        assert chars(vol) == "1 b c z e f g h"
        assert vol.diff(t1) == []


def test_two_recovery_images_side_by_side_then_restore(tmp_path: Path, s3_store: Any) -> None:
    vol = fig3_primary(tmp_path, s3_store, True)
    with vol:
        t4 = vol.snapshot("T4")  # 1 b c z e f 4 h
        vol.mark_unavailable([2, 3, 5])
        put(vol, 0, "u")
        put(vol, 3, "7")
        t6 = vol.snapshot("T6")  # u b c 7 e f 4 h
        put(vol, 1, "!")
        with vol.image(t4) as a, vol.image("T6") as b:
            assert chars(a) == "1 b c z e f 4 h" and chars(b) == "u b c 7 e f 4 h"
        assert vol.diff(t4, t6) == [0, 3]
        assert vol.restore("T4") == [0, 1, 2, 3, 5]  # unavailable regions are always rewritten
        assert vol.distributed_overlay is None and vol.unavailable == frozenset()
        assert chars(vol) == "1 b c z e f 4 h"
        assert vol.location_map() == ["PB"] * 8
        assert vol.layer_map() == [0] * 8  # folded into the base
        put(vol, 6, "5")
        assert vol.merge_down() == 1  # the base may be written again
        assert chars(vol) == "1 b c z e f 5 h"
    with Volume.open(tmp_path / "vol", secondary=s3_store) as again:
        assert chars(again) == "1 b c z e f 5 h" and again.distributed_overlay is None


def test_restore_after_the_base_file_was_truncated(tmp_path: Path, s3_store: Any) -> None:
    """The base loses its tail under a live volume: reads fail over to the secondary; restoring
    gives the file its length back and folds everything into it, so the volume then reads whole
    with no secondary at all."""
    vol = fig3_primary(tmp_path, s3_store, True)
    with vol:
        vol.merge_down()
        vol.merge_down()
        t = vol.snapshot("T")
        os.truncate(tmp_path / "vol" / "base.data", 5 * RS + 100)
        assert chars(vol) == "1 b c z e f 4 h"  # regions 5..7 detected, served remotely
        assert vol.location_map() == ["PB"] * 5 + ["R"] * 3
        put(vol, 7, "!")
        assert vol.restore(t) == [5, 6, 7]
        assert vol.layer_map() == [0] * 8
        assert os.path.getsize(tmp_path / "vol" / "base.data") == 8 * RS
    with Volume.open(tmp_path / "vol") as again:
        assert chars(again) == "1 b c z e f 4 h"
        assert again.scrub() == []


def test_remote_cache_is_reused_across_restarts_and_verified(tmp_path: Path, s3_store: Any) -> None:
    store = SwitchableStore(s3_store)
    vol = fig3_primary(tmp_path, store, True)
    with vol:
        vol.mark_unavailable([2, 3, 5])
        assert chars(vol) == "1 b c z e f 4 h"
        assert len(store.region_gets) == 3
    with Volume.open(tmp_path / "vol", secondary=store, readahead=0) as vol:
        assert chars(vol) == "1 b c z e f 4 h"
        assert len(store.region_gets) == 3  # served from the cache file, no new GET
    # Damage the cached copy of one region: it is dropped and fetched again, never returned.
    data = tmp_path / "vol" / "cache" / "cache.data"
    raw = bytearray(data.read_bytes())
    raw[raw.index(b"c" * 64) + 10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with Volume.open(tmp_path / "vol", secondary=store, readahead=0) as vol:
        assert chars(vol) == "1 b c z e f 4 h"
        assert len(store.region_gets) == 4
        assert vol._router.cache is not None and vol._router.cache.dropped == 1


def test_secondary_down_cached_regions_still_served(tmp_path: Path, s3_store: Any) -> None:
    store = SwitchableStore(s3_store)
    vol = fig3_primary(tmp_path, store, True)
    with vol:
        vol.mark_unavailable([2, 3, 5])
        assert vol.read(2 * RS, RS) == b"c" * RS  # region 2 now cached
    store.down = True
    with Volume.open(tmp_path / "vol", secondary=store) as vol:
        assert vol.read(2 * RS, RS) == b"c" * RS  # cached
        assert vol.read(0, 2 * RS) == b"1" * RS + b"b" * RS  # local
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(RS, 5 * RS)  # regions 1..5: 3 and 5 are neither local nor cached
        assert info.value.regions == (3, 5) and info.value.reason == "secondary unavailable"
        store.down = False
        assert chars(vol) == "1 b c z e f 4 h"


def test_writes_go_on_while_restore_folds(tmp_path: Path, s3_store: Any) -> None:
    """The fold copies an overlay into the base without the volume's lock: a write from another
    thread completes meanwhile (it would wait forever behind the lock, failing the join)."""
    import threading

    vol = fig3_primary(tmp_path, s3_store, True)
    with vol:
        t = vol.snapshot("T")
        vol.mark_unavailable([2])
        put(vol, 0, "u")
        copy = vol._live_layers().merge_copy
        seen: list[bytes] = []

        def copy_with_a_write(ov: Any, regions: list[int]) -> None:
            if not seen:
                writer = threading.Thread(target=lambda: (put(vol, 7, "!"), seen.append(vol.read(7 * RS, 1))))
                writer.start()
                writer.join(30)
                assert not writer.is_alive() and seen == [b"!"]
            copy(ov, regions)

        vol._live_layers().merge_copy = copy_with_a_write  # type: ignore[method-assign]
        assert vol.restore(t) == [0, 2]
        assert chars(vol) == "1 b c z e f 4 !"
        assert vol.layer_map() == [0] * 8  # the write was folded too
    with Volume.open(tmp_path / "vol") as again:
        assert chars(again) == "1 b c z e f 4 !"


def test_restore_from_a_local_snapshot_is_refused_clearly(tmp_path: Path) -> None:
    """restore() takes a PIT: a local snapshot's label is a one-line error saying so, nothing changes."""
    from overlaycache import LocalStore

    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=LocalStore(tmp_path / "s")) as vol:
        put(vol, 0, "a")
        vol.local_snapshot("local-one")
        put(vol, 0, "b")
        with pytest.raises(InvalidArgumentError, match="local snapshot") as info:
            vol.restore("local-one")
        assert "\n" not in str(info.value) and "VirtualImage" not in str(info.value)
        assert chars(vol, 1) == "b"
