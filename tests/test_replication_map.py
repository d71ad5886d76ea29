"""``replication.map`` (format 2): damage makes regions ship again, never skip a PIT.

The map is a volume's durable write intents: the regions changed locally and not yet on the
secondary. Losing an intent means a PIT that silently lacks a write, so every page carries a check
bound to the volume: a page that fails it makes every region it covers pending (shipped again,
harmless), a damaged header or a missing map makes the next attach compare the volume with its
secondary. Each case here writes regions while the secondary is away (the intents go into the
map), damages the map, attaches the secondary and takes a PIT: the PIT must read as the volume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from overlaycache import Volume
from overlaycache.errors import FormatError
from overlaycache.replication import maps
from overlaycache.replication.maps import CHANGE_MAP, ChangeMap, map_salt
from overlaycache.store import LocalStore

RS = 4096
PAGE_REGIONS = 64 * maps._CMAP_WORDS  # regions covered by one page of the map
NREG = 3 * PAGE_REGIONS + 100  # four pages
WRITTEN = [5, PAGE_REGIONS + 7, PAGE_REGIONS + 8, 2 * PAGE_REGIONS + 1, NREG - 1]


def _volume(tmp_path: Path, name: str = "v") -> tuple[Path, LocalStore]:
    """A volume attached once (its map made), then written while detached: ``WRITTEN`` pending."""
    store = LocalStore(tmp_path / "secondary")
    path = tmp_path / name
    with Volume.create(path, NREG * RS, region_size=RS, secondary=store) as vol:
        vol.write(0, b"shipped before")
        vol.snapshot()
    with Volume.open(path) as vol:  # no secondary: the intents go into the map
        for r in WRITTEN:
            vol.write(r * RS, f"region {r} {name}".encode())
    return path, store


def _page(k: int) -> tuple[int, int]:
    """Offset and length of page ``k`` of the map."""
    return maps._CMAP_PAGE * k, maps._CMAP_PAGE


def _attach_and_check(path: Path, store: LocalStore) -> int:
    """Attach, take a PIT, compare it with the volume; returns the lag found on attach."""
    with Volume.open(path, secondary=store, replication="async") as vol:
        lag = vol.replication_lag.regions
        snap = vol.snapshot()
        with store.image(vol.id, snap) as img:
            for r in [0, *WRITTEN]:
                assert img.read(r * RS, RS) == vol.read(r * RS, RS), f"region {r} differs in the PIT"
    return lag


def test_an_intact_map_ships_exactly_the_regions_written(tmp_path: Path) -> None:
    path, store = _volume(tmp_path)
    from overlaycache.replication.replicator import Replicator

    with mock.patch.object(Replicator, "resync", side_effect=AssertionError("compared every region")):
        assert _attach_and_check(path, store) == len(WRITTEN)


@pytest.mark.parametrize("damage", ["flip", "zero", "swap"])
def test_a_damaged_page_makes_its_regions_pending(tmp_path: Path, damage: str) -> None:
    path, store = _volume(tmp_path)
    cmap = path / CHANGE_MAP
    at, n = _page(2)  # the page of regions PAGE_REGIONS + 7 and + 8
    raw = bytearray(cmap.read_bytes())
    if damage == "flip":
        raw[at] ^= 1 << 7  # clears region PAGE_REGIONS + 7's bit: without the check, it would not ship
    elif damage == "zero":
        raw[at : at + n] = bytes(n)
    else:  # the same page of another volume with the same regions written
        other, _ = _volume(tmp_path / "other")
        raw[at : at + n] = (other / CHANGE_MAP).read_bytes()[at : at + n]
    cmap.write_bytes(bytes(raw))
    lag = _attach_and_check(path, store)
    assert lag == len(WRITTEN) - 2 + PAGE_REGIONS  # the damaged page's regions all ship again


def test_a_page_of_another_volume_is_damage_even_with_the_same_bits(tmp_path: Path) -> None:
    a = ChangeMap(str(tmp_path / "a.map"), NREG, True, map_salt("a"))
    b = ChangeMap(str(tmp_path / "b.map"), NREG, True, map_salt("b"))
    words = (1 << 3).to_bytes(8, "little") * 4
    a.store_page(1, words)
    b.store_page(1, words)
    for m in (a, b):
        m.sync()
        m.close()
    page_a = (tmp_path / "a.map").read_bytes()[4096:8192]
    with open(tmp_path / "b.map", "r+b") as f:  # only page 1: the others stay holes
        f.seek(4096)
        f.write(page_a)
    reopened = ChangeMap(str(tmp_path / "b.map"), NREG, False, map_salt("b"))
    assert reopened.damaged_pages == 1
    reopened.close()


@pytest.mark.parametrize("damage", ["header", "truncate", "delete"])
def test_a_lost_map_makes_the_attach_compare_every_region(tmp_path: Path, damage: str) -> None:
    path, store = _volume(tmp_path)
    cmap = path / CHANGE_MAP
    if damage == "header":
        raw = bytearray(cmap.read_bytes())
        raw[20] ^= 0x10
        cmap.write_bytes(bytes(raw))
    elif damage == "truncate":
        os.truncate(cmap, maps._CMAP_PAGE * 2)
    else:
        cmap.unlink()
    assert _attach_and_check(path, store) == len(WRITTEN)  # found by comparing, not from the map
    if damage != "delete":
        assert [p for p in os.listdir(path) if p.startswith(CHANGE_MAP + ".damaged-")], "evidence kept"


def test_a_map_lost_while_detached_is_compared_on_the_next_attach(tmp_path: Path) -> None:
    path, store = _volume(tmp_path)
    (path / CHANGE_MAP).unlink()
    with Volume.open(path) as vol:  # detached again: nothing to record the intents in
        vol.write(9 * RS, b"while detached, no map")
    with Volume.open(path, secondary=store, replication="async") as vol:
        snap = vol.snapshot()
        with store.image(vol.id, snap) as img:
            for r in [0, 9, *WRITTEN]:
                assert img.read(r * RS, RS) == vol.read(r * RS, RS), f"region {r} differs in the PIT"


def test_a_map_of_format_1_is_read_and_rewritten(tmp_path: Path) -> None:
    path, store = _volume(tmp_path)
    cmap = path / CHANGE_MAP
    bits = bytearray(8 * ((NREG + 63) // 64))
    for r in WRITTEN:
        bits[r // 8] |= 1 << (r % 8)
    cmap.write_bytes(maps._CMAP_MAGIC_V1 + bytes(bits))
    assert _attach_and_check(path, store) == len(WRITTEN)
    assert cmap.read_bytes()[:8] == maps._CMAP_MAGIC


def test_an_empty_map_is_sparse_and_a_dense_one_is_checked_too(tmp_path: Path, monkeypatch: Any) -> None:
    big = 1 << 26  # regions: a 2 MiB bitmap
    m = ChangeMap(str(tmp_path / "sparse.map"), big, True, map_salt("x"))
    assert m.dense is False and os.stat(tmp_path / "sparse.map").st_blocks * 512 <= 64 * 1024
    m.close()
    monkeypatch.setattr(maps, "_reports_holes", lambda fd, length: False)
    d = ChangeMap(str(tmp_path / "dense.map"), NREG, True, map_salt("x"))
    assert d.dense is True and d.damaged_pages == 0 and not any(d.initial)
    d.store_page(3, (1 << 5).to_bytes(8, "little"))
    d.sync()
    d.close()
    again = ChangeMap(str(tmp_path / "dense.map"), NREG, True, map_salt("x"))
    assert again.damaged_pages == 0 and again.initial[2 * 8 * maps._CMAP_WORDS] == 1 << 5
    again.close()
    raw = bytearray((tmp_path / "dense.map").read_bytes())
    raw[4 * 4096 : 5 * 4096] = bytes(4096)  # a zeroed page of a dense map is damage, not a hole
    (tmp_path / "dense.map").write_bytes(bytes(raw))
    third = ChangeMap(str(tmp_path / "dense.map"), NREG, False, map_salt("x"))
    assert third.damaged_pages == 1
    third.close()


# -- remote.map: the records a PIT is built from ----------------------------------------------------

def _remote_volume(tmp_path: Path) -> tuple[Path, LocalStore, str]:
    """Regions 0-3 shipped and in a PIT; then region 2 written again (its leaf is dirty)."""
    store = LocalStore(tmp_path / "secondary")
    path = tmp_path / "r"
    with Volume.create(path, 8 * RS, region_size=RS, secondary=store) as vol:
        for r in range(4):
            vol.write(r * RS, f"first {r}".encode())
        vol.snapshot()
        vol.write(2 * RS, b"second 2")
        vid = vol.id
    return path, store, vid


def _record_at(r: int) -> int:
    return maps._RMAP_HEADER + maps.RECORD.size * r


@pytest.mark.parametrize("damage", ["flip", "other-region"])
def test_a_damaged_remote_record_is_shipped_again_not_published(tmp_path: Path, damage: str) -> None:
    path, store, vid = _remote_volume(tmp_path)
    rmap = path / "remote.map"
    raw = bytearray(rmap.read_bytes())
    if damage == "flip":
        raw[_record_at(1) + 17] ^= 0x04  # the offset in the pack: another region's bytes
    else:  # region 3's record over region 1's: its bytes and checksum, consistent but not region 1's
        raw[_record_at(1) : _record_at(2)] = raw[_record_at(3) : _record_at(4)]
    rmap.write_bytes(bytes(raw))
    with Volume.open(path, secondary=store) as vol:
        snap = vol.snapshot()
        with store.image(vid, snap) as img:
            for r in range(4):
                assert img.read(r * RS, RS) == vol.read(r * RS, RS), f"region {r} differs in the PIT"


def test_a_damaged_remote_map_header_is_an_error_naming_it(tmp_path: Path) -> None:
    path, store, _vid = _remote_volume(tmp_path)
    raw = bytearray((path / "remote.map").read_bytes())
    raw[24] ^= 1  # the reserved seq: it must never go back
    (path / "remote.map").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="remote.map: damaged header"):
        Volume.open(path, secondary=store)


def _older_format(raw: bytes, version: int, spoil: int | None = None) -> bytes:
    """``remote.map`` of format 4 written as format 3 (48-byte records, no digests) or 2 (no checks
    either); with ``spoil``, that region's record of format 3 fails its check."""
    import zlib

    from overlaycache import _core_py as core

    magic, _version, rs, n, reserved = maps._RMAP_HEAD.unpack_from(raw)
    salt = raw[maps._RMAP_HEAD.size : maps._RMAP_HEAD.size + 16]
    body = maps._RMAP_HEAD.pack(magic, version, rs, n, reserved) + salt
    out = bytearray(body + (bytes(core.checksum(body)) if version == 3 else bytes(16)))
    out += bytes(maps._RMAP_HEADER - len(out))
    for r in range(n):
        rec = raw[_record_at(r) : _record_at(r) + maps.RECORD.size]
        if not any(rec):
            out += bytes(48)
            continue
        seq, pack, off, length, csum, _digest = maps.RECORD.unpack(rec)
        old = bytearray(maps.RECORD_V2.pack(seq, pack, off, length, csum))
        if version == 3:
            crc = zlib.crc32(old[32:], zlib.crc32(old[:28], zlib.crc32(r.to_bytes(8, "little"), zlib.crc32(salt))))
            old[28:32] = (crc ^ (r == spoil)).to_bytes(4, "little")
        out += old
    return bytes(out)


@pytest.mark.parametrize("version", [2, 3])
def test_a_remote_map_of_an_older_format_is_converted(tmp_path: Path, version: int) -> None:
    """Formats 2 and 3 (48-byte records, no digests) become format 4 when opened for writing: the
    versions on the store keep their records (no digest: the checksum alone checks them), and a
    record of format 3 that failed its check still gets its region shipped again."""
    path, store, vid = _remote_volume(tmp_path)
    rmap = path / "remote.map"
    before = rmap.read_bytes()
    rmap.write_bytes(_older_format(before, version, spoil=1 if version == 3 else None))
    with Volume.open(path, secondary=store) as vol:
        snap = vol.snapshot()
        assert vol.replication_lag.regions == 0
        with store.image(vid, snap) as img:
            for r in range(4):
                assert img.read(r * RS, RS) == vol.read(r * RS, RS)
    after = rmap.read_bytes()
    assert maps._RMAP_HEAD.unpack_from(after)[1] == 4 and len(after) == len(before)
    for r in range(4):
        seq, _p, _o, _l, _c, digest = maps.RECORD.unpack_from(after, _record_at(r))
        was = maps.RECORD.unpack_from(before, _record_at(r))
        if r == 2 or (version == 3 and r == 1):  # written since (pending), or its record spoiled
            assert seq > was[0] and digest != bytes(16)  # shipped again, with a digest now
        else:
            assert seq == was[0] and digest == bytes(16)  # carried over, without its digest


def test_a_missing_remote_map_is_made_anew_above_every_seq_on_the_store(tmp_path: Path) -> None:
    """The reserved seq orders every version and PIT: a new map must start above the store's."""
    path, store, vid = _remote_volume(tmp_path)
    with Volume.open(path, secondary=store) as vol:
        first = vol.snapshot()
        want = [vol.read(r * RS, RS) for r in range(8)]
    (path / "remote.map").unlink()
    with Volume.open(path, secondary=store) as vol:
        vol.write(5 * RS, b"after")
        want[5] = vol.read(5 * RS, RS)
        second = vol.snapshot()
        assert second.seq > first.seq
        with store.image(vid, second) as img:
            assert [img.read(r * RS, RS) for r in range(8)] == want
    with store.image(vid, first) as img:  # the older PIT is as it was
        assert img.read(5 * RS, RS) == bytes(RS)
