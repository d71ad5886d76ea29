"""Overlays of local format 2: slots allocated on demand and reused, checkpoints that survive a
crash between any two of their steps, and files whose size follows the data, not the volume."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from overlaycache import Volume
from overlaycache.errors import FormatError
from overlaycache.local import layers as layers_mod
from overlaycache.testing.ondisk import overlay_slot

RS = 4096


def _data_size(path: Path, layer: int) -> int:
    return os.stat(path / f"overlay-{layer}.data").st_size


def _allocated(path: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in path.iterdir() if p.is_file())


def test_files_follow_the_data_not_the_volume(tmp_path: Path) -> None:
    """An empty volume of 1 TiB takes a few KiB on disk and no file near its size; an overlay's data
    file grows with the regions written, and rewriting them reuses freed slots."""
    big = tmp_path / "big"
    with Volume.create(big, 1 << 40, region_size=65536):
        pass
    assert _allocated(big) < 1 << 20
    assert _data_size(big, 1) <= 4096
    path = tmp_path / "v"
    with Volume.create(path, 4096 * RS, region_size=RS) as vol:
        for r in range(0, 4096, 40):  # 103 regions
            vol.write(r * RS, bytes([r % 251 + 1]) * RS)
        vol.flush()
        for round_ in range(6):  # rewritten again and again: the old versions' slots are reused
            for r in range(0, 4096, 40):
                vol.write(r * RS, bytes([(r + round_) % 251 + 1]) * RS)
            vol.flush()
        top = vol._layers.top
        assert top.slots_end <= 2 * 103
        assert _data_size(path, 1) <= (2 * 103 + 17) * RS + 4096
    # Closed (checkpointed), the file keeps the slots in use and a page more.
    assert _data_size(path, 1) <= top.slots_end * RS + 4096
    with Volume.open(path) as vol:
        for r in range(0, 4096, 40):
            assert vol.read(r * RS, RS) == bytes([(r + 5) % 251 + 1]) * RS


def _crash_points(monkeypatch: pytest.MonkeyPatch, grab: Callable[[str], None]) -> None:
    """Call ``grab(step)`` at each step of a checkpoint: after the table is replaced, after the map's
    pages are written (not yet synced), and before the journal is emptied."""
    real_atomic = layers_mod.write_chunks_atomic
    real_pwrite = os.pwrite
    real_truncate = os.truncate

    def atomic(path: str, chunks: Any) -> None:
        real_atomic(path, chunks)
        if path.endswith(".table"):
            grab("table")

    def pwrite(fd: int, data: Any, offset: int) -> int:
        n = real_pwrite(fd, data, offset)
        grab("map page")
        return n

    def truncate(path: Any, length: int) -> None:
        if str(path).endswith(".journal") and length == 0:
            grab("journal")
        real_truncate(path, length)

    monkeypatch.setattr(layers_mod, "write_chunks_atomic", atomic)
    monkeypatch.setattr(layers_mod.os, "pwrite", pwrite)
    monkeypatch.setattr(layers_mod.os, "truncate", truncate)


def test_a_checkpoint_interrupted_anywhere_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash at each step of a checkpoint (copies of the files taken there) reopens with every
    committed version, and the slots freed by the checkpointed batches are neither lost nor given
    out twice: writing more after the reopen and reading everything back proves it. The regions
    span several pages of the map, and only the first page's are written after the reopen, so the
    records the reopen replayed must reach the map at the next checkpoint on their own."""
    path = tmp_path / "v"
    n = 512  # 4 pages of map records
    model = bytearray(n * RS)
    with Volume.create(path, n * RS, region_size=RS) as vol:
        for version in range(1, 4):  # three versions of half the regions: slots freed and reused
            for r in range(0, n, 2):
                data = bytes([version]) * RS
                vol.write(r * RS, data)
                model[r * RS : (r + 1) * RS] = data
            vol.flush()
        vol.write(1 * RS, b"\x09" * RS)
        model[RS : 2 * RS] = b"\x09" * RS
        vol.flush()
        copies: list[tuple[str, Path]] = []

        def grab(step: str) -> None:
            dest = tmp_path / f"crash-{len(copies)}"
            shutil.copytree(path, dest)
            copies.append((step, dest))

        _crash_points(monkeypatch, grab)
        with vol._wlock:
            vol._layers.top.checkpoint()
        monkeypatch.undo()
    steps = [step for step, _ in copies]
    assert steps[0] == "table" and steps[-1] == "journal" and "map page" in steps
    for step, copy in copies:
        os.unlink(copy / "lock")
        with Volume.open(copy) as crashed:
            assert crashed.read(0, n * RS) == bytes(model), step
            for r in range(128):  # new versions: freed slots are given out, each once
                crashed.write(r * RS, bytes([100 + r]) * RS)
            crashed.flush()
            top = crashed._layers.top
            held = [top.slot_of(r) for r in top.regions()]
            assert len(set(held)) == len(held), step
        model_after = bytearray(model)
        for r in range(128):
            model_after[r * RS : (r + 1) * RS] = bytes([100 + r]) * RS
        with Volume.open(copy) as again:
            assert again.read(0, n * RS) == bytes(model_after), step


def test_map_damage_is_found_with_the_region(tmp_path: Path) -> None:
    """A map record changed on disk (a bit flipped, a record copied from another region) fails its
    check when its region is first read: an error naming the region, never another version."""
    from overlaycache.errors import RegionUnavailableError

    path = tmp_path / "v"
    with Volume.create(path, 8 * RS, region_size=RS) as vol:
        vol.merge_down()
        for r in range(8):
            vol.write(r * RS, bytes([r + 1]) * RS)
    top = 2
    mpath = path / f"overlay-{top}.map"
    raw = bytearray(mpath.read_bytes())
    rec = layers_mod.MAP_OFFSET + 32 * 3
    raw[rec + 9] ^= 0x10  # region 3's checksum
    raw[rec + 32 : rec + 64] = raw[rec - 32 : rec]  # region 4's record replaced by region 2's
    mpath.write_bytes(bytes(raw))
    assert overlay_slot(path, top, 4) == overlay_slot(path, top, 2)
    with Volume.open(path, readonly=True) as vol:
        for r in (3, 4):
            with pytest.raises(RegionUnavailableError) as err:
                vol.read(r * RS, 1)
            assert err.value.regions == (r,)
        for r in (0, 1, 2, 5, 6, 7):
            assert vol.read(r * RS, RS) == bytes([r + 1]) * RS


def test_files_of_another_volume_are_refused(tmp_path: Path) -> None:
    """An overlay's map or table copied from another volume (same geometry) is refused by name."""
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        with Volume.create(p, 8 * RS, region_size=RS) as vol:
            vol.write(0, b"x" * RS)
    for name in ("overlay-1.map", "overlay-1.table", "base.sums"):
        saved = (a / name).read_bytes()
        shutil.copy(b / name, a / name)
        with pytest.raises(FormatError, match="another volume") as err:
            Volume.open(a)
        assert err.value.path == str(a / name)
        (a / name).write_bytes(saved)
    with Volume.open(a) as vol:
        assert vol.read(0, RS) == b"x" * RS


def test_a_huge_write_commits_on_the_way_and_frozen_overlays_shrink_their_mapping(tmp_path: Path) -> None:
    """One write of more regions than may stay uncommitted commits part-way (the slots of replaced
    versions stay bounded, the top's mapping is never passed); a frozen overlay is mapped at the
    length of its slots, not with the top's room to grow."""
    from overlaycache.local.layers import MAX_UNCOMMITTED
    from overlaycache.volume import AUTO_COMMIT_REGIONS

    n = AUTO_COMMIT_REGIONS + 8192
    path = tmp_path / "v"
    with Volume.create(path, n * RS, region_size=RS) as vol:
        for version in (1, 2):
            data = bytes([version]) * (n * RS)
            assert vol.write(0, data) == len(data)
        top = vol._layers.top
        assert top.slots_end <= n + MAX_UNCOMMITTED
        assert vol.read(0, RS) == b"\x02" * RS and vol.read((n - 1) * RS, RS) == b"\x02" * RS
        frozen = vol._layers.top
        big = frozen.data.length
        vol.local_snapshot("s")
        assert frozen.data.length == frozen.slots_end * RS < big
        assert frozen._retired == []  # the large mapping was closed once unpinned
        with vol.image("s") as img:
            assert img.read((n - 1) * RS, RS) == b"\x02" * RS
    with Volume.open(path) as vol:
        assert vol.read(0, n * RS) == b"\x02" * (n * RS)
