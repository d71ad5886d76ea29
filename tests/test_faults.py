"""Faults and bad input: files damaged or truncated under a volume, torn journals, locks.

Every failure must be the exact exception class of :mod:`overlaycache.errors`, naming what failed
(``.regions``, ``.path``), the process must survive it, and the data written before must stay intact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

import overlaycache
from overlaycache.local import stack as stack_mod
from overlaycache.local import meta as meta_mod
from overlaycache._core_py import checksum as py_checksum
from overlaycache._fs import json_checksum
from overlaycache.errors import (
    FormatError,
    InvalidArgumentError,
    RegionUnavailableError,
    SnapshotNotFoundError,
    VolumeClosedError,
    VolumeLockedError,
)
from overlaycache.local.layers import SUMS_OFFSET
from overlaycache.testing.cores import IMPLEMENTATIONS, use_core
from overlaycache.testing.ondisk import journal_batch, overlay_slot
from overlaycache.volume import Volume

RS = 4096
NREG = 8
SIZE = NREG * RS - 512  # the last region is partial
ROOT = str(Path(overlaycache.__file__).resolve().parent.parent)


# -- helpers -----------------------------------------------------------------------------------------
IMPL_NAMES = [m.IMPLEMENTATION for m in IMPLEMENTATIONS]


@pytest.fixture(params=IMPLEMENTATIONS, ids=IMPL_NAMES)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Run the test with each core implementation behind the volume (compiled, pure Python)."""
    mod: ModuleType = request.param
    use_core(monkeypatch, mod)
    return mod


def region_length(r: int) -> int:
    """Bytes in region ``r`` of a ``SIZE``-byte volume."""
    return min(RS, SIZE - r * RS)


def content(r: int, tag: int) -> bytes:
    """Full contents of region ``r`` for version ``tag``: distinct for every (region, tag)."""
    return (struct.pack("<II", r, tag) * (RS // 8))[: region_length(r)]


def fill(vol: Volume, tag: int, regions: range = range(NREG)) -> None:
    """Write version ``tag`` of every region in ``regions``."""
    for r in regions:
        vol.write(r * RS, content(r, tag))


def assert_regions(vol: Volume, expected: dict[int, int]) -> None:
    """Each region ``r`` in ``expected`` holds version ``expected[r]`` (0 means zeros)."""
    for r, tag in expected.items():
        want = content(r, tag) if tag else bytes(region_length(r))
        assert vol.read(r * RS, region_length(r)) == want, f"region {r}"


@pytest.fixture
def vol_path(tmp_path: Path) -> Iterator[Path]:
    """A closed volume whose regions hold version 1, partly in the base and partly in an overlay.

    Regions 0-3 were merged into the base (as version 1); regions 4-7 are in overlay 2's
    checkpointed map, in slots 0-3 (written in that order).
    """
    path = tmp_path / "vol"
    with Volume.create(path, SIZE, region_size=RS) as vol:
        fill(vol, 1, range(4))
        vol.merge_down()
        fill(vol, 1, range(4, NREG))
        assert [ov.id for ov in vol._layers.overlays] == [2]
    assert [overlay_slot(path, 2, r) for r in range(NREG)] == [-1] * 4 + [0, 1, 2, 3]
    yield path


ALL_V1 = {r: 1 for r in range(NREG)}


def run_python(code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout of overlaycache."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-P", "-c", code, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, check=False)


def crash_copy(path: Path, dest: Path) -> Path:
    """Copy the files of an open volume: what a crash at this moment would leave on disk."""
    shutil.copytree(path, dest)
    return dest


# -- files truncated under an open volume -------------------------------------------------------------
def test_truncated_base_under_open_volume(impl: ModuleType, vol_path: Path) -> None:
    """Regions past the new end of base.data raise RegionUnavailableError naming them."""
    with Volume.open(vol_path) as vol:
        assert type(vol._layers.live).__module__ == impl.__name__
        vol.merge_down()  # now every region is in the base
        assert len(vol._layers.overlays) == 1 and not vol._layers.overlays[0].present.any()
        assert_regions(vol, {0: 1, 1: 1, 2: 1, 3: 1, 4: 1})  # 0-4 verified, 5-7 never read
        os.truncate(vol_path / "base.data", 3 * RS)
        for r in (3, 4, 5, 6, 7):  # 3, 4: guarded copy faults; 5-7: guarded checksum faults
            with pytest.raises(RegionUnavailableError) as info:
                vol.read(r * RS + 10, 20)
            assert type(info.value) is RegionUnavailableError
            assert info.value.regions == (r,)
            assert info.value.reason == "io"
            assert isinstance(info.value, OSError)
        with pytest.raises(RegionUnavailableError) as info:  # a read across the boundary
            vol.read(2 * RS, 2 * RS)
        assert info.value.regions == (3,)
        buf = bytearray(RS)
        with pytest.raises(RegionUnavailableError) as info:
            vol.readinto(6 * RS, buf)
        assert info.value.regions == (6,)
        # A partial write needs the rest of the region: refused, nothing half-written.
        with pytest.raises(RegionUnavailableError) as info:
            vol.write(5 * RS + 100, b"partial")
        assert info.value.regions == (5,)
        assert not vol._layers.overlays[-1].present.test(5)
        # Whole-region writes go to the overlay and make the region readable again.
        vol.write(5 * RS, content(5, 2))
        assert_regions(vol, {0: 1, 1: 1, 2: 1, 5: 2})
        with pytest.raises(RegionUnavailableError):
            vol.read(4 * RS, 1)
        vol.flush()


CHILD_TRUNCATE = textwrap.dedent(
    """
    import faulthandler, os, sys
    mode = sys.argv[2]
    if mode == "before":
        faulthandler.enable()
    from overlaycache import Volume, RegionUnavailableError
    if mode == "after":
        faulthandler.enable()  # displaces the core's SIGBUS handler until the next open
    rs, path = 4096, sys.argv[1]
    vol = Volume.create(path, 8 * rs, region_size=rs)
    for r in range(8):
        vol.write(r * rs, bytes([65 + r]) * rs)
    vol.merge_down()
    vol.read(0, 6 * rs)
    os.truncate(os.path.join(path, "base.data"), 4 * rs)
    for r in (4, 7):  # 4 was verified (copy faults), 7 was not (checksum faults)
        try:
            vol.read(r * rs, rs)
        except RegionUnavailableError as exc:
            print("unavailable", r, exc.regions, exc.reason)
    assert vol.read(3 * rs, rs) == b"D" * rs
    vol.close()
    print("survived")
    """
)


@pytest.mark.parametrize("faulthandler", ["off", "before", "after"])
@pytest.mark.parametrize("pure", [False, True], ids=["default-core", "pure-python"])
def test_truncated_base_in_subprocess(tmp_path: Path, faulthandler: str, pure: bool) -> None:
    """The same fault in a fresh process: it raises, and the process lives on (no SIGBUS death)."""
    env = {"OVERLAYCACHE_PURE_PYTHON": "1" if pure else "0"}
    proc = run_python(CHILD_TRUNCATE, str(tmp_path / "vol"), faulthandler, env=env)
    assert proc.returncode != -signal.SIGBUS, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "unavailable 4 (4,) io",
        "unavailable 7 (7,) io",
        "survived",
    ]


def test_truncated_overlay_under_open_volume(impl: ModuleType, vol_path: Path) -> None:
    """Regions whose overlay slot was cut off raise RegionUnavailableError; the rest is intact."""
    with Volume.open(vol_path) as vol:
        assert_regions(vol, {4: 1, 5: 1})  # verified; 6 and 7 are not
        os.truncate(vol_path / "overlay-2.data", 1 * RS)  # slots 1-3, of regions 5-7, are gone
        for r in (5, 6, 7):
            with pytest.raises(RegionUnavailableError) as info:
                vol.read(r * RS, 1)
            assert type(info.value) is RegionUnavailableError
            assert (info.value.regions, info.value.reason) == ((r,), "io")
        assert_regions(vol, {0: 1, 1: 1, 2: 1, 3: 1, 4: 1})
    # Opened again, the volume knows those regions are lost (a damaged volume still opens).
    with Volume.open(vol_path) as vol:
        assert vol.unavailable == frozenset({5, 6, 7})
        assert_regions(vol, {0: 1, 1: 1, 2: 1, 3: 1, 4: 1})


@pytest.mark.parametrize("layer", ["base", "overlay"])
@pytest.mark.parametrize("when", ["closed", "open"])
def test_flipped_bytes_fail_the_first_read(impl: ModuleType, vol_path: Path, layer: str,
                                           when: str) -> None:
    """A region changed behind the volume's back fails its checksum on its first read since open."""
    r = 2 if layer == "base" else 6  # region 6 is in slot 2 of overlay-2 (written once)
    target = vol_path / ("base.data" if layer == "base" else "overlay-2.data")
    at = (r if layer == "base" else overlay_slot(vol_path, 2, r)) * RS + 1000

    def flip() -> None:
        with open(target, "r+b") as f:
            f.seek(at)
            old = f.read(1)
            f.seek(at)
            f.write(bytes([old[0] ^ 0x40]))

    if when == "closed":
        flip()
    with Volume.open(vol_path) as vol:
        assert_regions(vol, {0: 1, 7: 1})
        if when == "open":
            flip()
        for _ in range(2):  # a failed region is not marked verified
            with pytest.raises(RegionUnavailableError) as info:
                vol.read(r * RS + 5, 1)
            assert type(info.value) is RegionUnavailableError
            assert (info.value.regions, info.value.reason) == ((r,), "checksum")
        assert_regions(vol, {q: 1 for q in range(NREG) if q != r})
        vol.write(r * RS, content(r, 3))  # a whole-region write replaces the bad version
        assert_regions(vol, {r: 3})
    with Volume.open(vol_path) as vol:
        assert_regions(vol, {**ALL_V1, r: 3})


def test_corrupt_base_checksum_entry(impl: ModuleType, vol_path: Path) -> None:
    """A damaged entry of base.sums makes only its region unavailable, with reason "checksum"."""
    with open(vol_path / "base.sums", "r+b") as f:
        f.seek(SUMS_OFFSET + 16 * 1 + 3)
        f.write(b"\x00\x01")
    with Volume.open(vol_path) as vol:
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(RS, RS)
        assert (info.value.regions, info.value.reason) == ((1,), "checksum")
        assert_regions(vol, {q: 1 for q in range(NREG) if q != 1})


def test_merge_refuses_a_corrupt_overlay_region(impl: ModuleType, vol_path: Path) -> None:
    """merge_down stops at a region that fails its checksum; the volume stays consistent."""
    with open(vol_path / "overlay-2.data", "r+b") as f:
        f.seek(overlay_slot(vol_path, 2, 6) * RS)
        f.write(b"rot")
    with Volume.open(vol_path) as vol:
        snap = vol.local_snapshot("s")
        with pytest.raises(RegionUnavailableError) as info:
            vol.merge_down()
        assert (info.value.regions, info.value.reason) == ((6,), "checksum")
        assert [ov.id for ov in vol._layers.overlays] == [2, 3]
        assert vol._meta.merging is None
        good = {q: 1 for q in range(NREG) if q != 6}
        assert_regions(vol, good)
        with vol.image(snap) as img:
            assert img.read(4 * RS, RS) == content(4, 1)
    with Volume.open(vol_path) as vol:  # no merge is resumed, nothing was lost
        assert vol._meta.merging is None
        assert [ov.id for ov in vol._layers.overlays] == [2, 3]
        assert_regions(vol, good)
        with vol.image("s") as img:
            assert img.read(5 * RS, RS) == content(5, 1)


# -- damaged files found on open --------------------------------------------------------------------
def _truncate_to(name: str, length: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        os.truncate(path / name, length)
    return damage


def _flip(name: str, offset: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with open(path / name, "r+b") as f:
            f.seek(offset)
            old = f.read(1)
            f.seek(offset)
            f.write(bytes([old[0] ^ 0x01]))
    return damage


def _replace(name: str, data: bytes) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        (path / name).write_bytes(data)
    return damage


def _remove(name: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        os.unlink(path / name)
    return damage


def _edit_meta(path: Path) -> None:
    """Change the size recorded in volume.json without fixing its checksum."""
    meta = json.loads((path / "volume.json").read_bytes())
    meta["size"] += 1
    (path / "volume.json").write_text(json.dumps(meta))


def _bad_journal_record(path: Path) -> None:
    """A well-formed, checksummed journal batch that names a region past the end of the volume."""
    (path / "overlay-2.journal").write_bytes(journal_batch(path, 2, 7, 8, [(NREG + 3, 0, bytes(16))]))


def _foreign_journal(path: Path) -> None:
    """A well-formed batch of another overlay (as if copied from another volume or layer)."""
    (path / "overlay-2.journal").write_bytes(journal_batch(path, 3, 7, 8, [(4, 0, bytes(16))]))


def _table_bit_cleared(path: Path) -> None:
    """Region 5's present bit cleared in the table (which would expose the base's older version)."""
    raw = bytearray((path / "overlay-2.table").read_bytes())
    words = 8 * ((NREG + 63) // 64)
    at = len(raw) - 16 - words  # the bitmap, just before the checksum
    assert raw[at] & (1 << 5)
    raw[at] &= ~(1 << 5) & 0xFF
    (path / "overlay-2.table").write_bytes(bytes(raw))


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "meta-truncated": (_truncate_to("volume.json", 40), "volume.json"),
    "meta-empty": (_truncate_to("volume.json", 0), "volume.json"),
    "meta-garbage": (_replace("volume.json", b"\x00\xffnot json"), "volume.json"),
    "meta-not-a-dict": (_replace("volume.json", b"[1, 2]"), "volume.json"),
    "meta-edited": (_edit_meta, "volume.json"),
    "meta-missing": (_remove("volume.json"), "volume.json"),
    "table-header-flipped": (_flip("overlay-2.table", 20), "overlay-2.table"),
    "table-magic": (_flip("overlay-2.table", 0), "overlay-2.table"),
    "table-header-truncated": (_truncate_to("overlay-2.table", 40), "overlay-2.table"),
    "table-body-truncated": (_truncate_to("overlay-2.table", 100), "overlay-2.table"),
    "table-bit-cleared": (_table_bit_cleared, "overlay-2.table"),
    "table-missing": (_remove("overlay-2.table"), "overlay-2.table"),
    "map-header-flipped": (_flip("overlay-2.map", 20), "overlay-2.map"),
    "map-truncated": (_truncate_to("overlay-2.map", 4096 + 32 * NREG - 1), "overlay-2.map"),
    "map-missing": (_remove("overlay-2.map"), "overlay-2.map"),
    "sums-header-flipped": (_flip("base.sums", 13), "base.sums"),
    "sums-truncated": (_truncate_to("base.sums", SUMS_OFFSET + 16 * NREG - 1), "base.sums"),
    "journal-region-out-of-range": (_bad_journal_record, "overlay-2.journal"),
    "journal-of-another-overlay": (_foreign_journal, "overlay-2.journal"),
}


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_damaged_file_is_a_format_error(vol_path: Path, damage: str, readonly: bool) -> None:
    """A damaged file fails the open with FormatError naming it; repaired, the data is all there."""
    apply, name = DAMAGES[damage]
    saved = {p.name: p.read_bytes() for p in vol_path.iterdir() if p.name != "lock"}
    apply(vol_path)
    for _ in range(2):  # a failed open leaves nothing behind: the second fails the same way
        with pytest.raises(FormatError) as err:
            Volume.open(vol_path, readonly=readonly)
        assert type(err.value) is FormatError
        assert err.value.path == str(vol_path / name)
        assert name in str(err.value)
    for file, data in saved.items():
        (vol_path / file).write_bytes(data)
    with Volume.open(vol_path) as vol:  # the lock was released by the failed opens
        assert_regions(vol, ALL_V1)


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_truncated_data_files_still_open(vol_path: Path, readonly: bool) -> None:
    """A volume whose data files were truncated opens (only metadata can be fatal): regions whose
    bytes are gone raise RegionUnavailableError naming them, every other one reads as it was."""
    os.truncate(vol_path / "base.data", 2 * RS + 100)  # regions 2, 3 (in the base) are cut
    os.truncate(vol_path / "overlay-2.data", 2 * RS)  # slots 2, 3, of regions 6, 7, are gone
    for _ in range(2):  # and again: nothing was lost by opening
        with Volume.open(vol_path, readonly=readonly) as vol:
            assert_regions(vol, {0: 1, 1: 1, 4: 1, 5: 1})
            for r in (2, 3, 6, 7):
                with pytest.raises(RegionUnavailableError) as info:
                    vol.read(r * RS, region_length(r))
                assert info.value.regions == (r,)
            if not readonly:
                assert {6, 7} <= vol.unavailable  # the top overlay's lost versions, known at open
    if readonly:
        return
    with Volume.open(vol_path) as vol:  # whole new versions make the regions readable again
        fill(vol, 2, range(2, 4))
        fill(vol, 2, range(6, 8))
        vol.flush()
        assert vol.unavailable == frozenset()
    with Volume.open(vol_path) as vol:
        assert_regions(vol, {0: 1, 1: 1, 2: 2, 3: 2, 4: 1, 5: 1, 6: 2, 7: 2})


def test_newer_format_version_is_refused(vol_path: Path) -> None:
    """A volume.json of a newer format, with a valid checksum, fails on the version check."""
    meta_file = vol_path / "volume.json"
    saved = meta_file.read_bytes()
    meta = json.loads(saved)
    meta["version"] = meta_mod.META_VERSION + 1
    meta["checksum"] = json_checksum(meta)
    meta_file.write_text(json.dumps(meta, indent=1, sort_keys=True))
    # Sanity: the file is otherwise valid, so the version is the only thing at fault.
    assert json.loads(meta_file.read_bytes())["checksum"] == json_checksum(meta)
    with pytest.raises(FormatError) as err:
        Volume.open(vol_path)
    assert type(err.value) is FormatError
    assert err.value.path == str(meta_file)
    assert "newer" in str(err.value)
    meta_file.write_bytes(saved)
    with Volume.open(vol_path) as vol:
        assert_regions(vol, ALL_V1)


def test_not_a_volume_directory(tmp_path: Path) -> None:
    """Opening a file or an empty directory is a FormatError, not a crash."""
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FormatError):
        Volume.open(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError) as err:
        Volume.open(tmp_path / "empty")
    assert err.value.path == str(tmp_path / "empty" / "volume.json")


# -- the journal ------------------------------------------------------------------------------------
BATCH_HEADER = 40
BATCH_BYTES = BATCH_HEADER + 32 * 2 + 16  # one committed batch of two regions


@pytest.fixture
def journalled(vol_path: Path, tmp_path: Path) -> Iterator[Path]:
    """A crash image whose overlay journal holds two committed batches of two regions each.

    Batch 0 wrote version 2 to regions 4 and 5; batch 1 wrote version 3 to regions 5 and 6.
    """
    with Volume.open(vol_path) as vol:
        fill(vol, 2, range(4, 6))
        vol.flush()
        fill(vol, 3, range(5, 7))
        vol.flush()
        image = crash_copy(vol_path, tmp_path / "crashed")
    journal = image / "overlay-2.journal"
    assert journal.stat().st_size == 2 * BATCH_BYTES
    yield image


AFTER_BATCH_0 = {**ALL_V1, 4: 2, 5: 2}
AFTER_BATCH_1 = {**ALL_V1, 4: 2, 5: 3, 6: 3}

TAILS: dict[str, tuple[Callable[[bytes], bytes], dict[int, int]]] = {
    "torn-second-batch": (lambda j: j[: BATCH_BYTES + 50], AFTER_BATCH_0),
    "second-batch-without-checksum": (lambda j: j[:-16], AFTER_BATCH_0),
    "second-batch-bad-checksum": (lambda j: j[:-1] + bytes([j[-1] ^ 1]), AFTER_BATCH_0),
    "garbage-appended": (lambda j: j + os.urandom(100), AFTER_BATCH_1),
    "header-appended": (lambda j: j + struct.pack("<4sIQQ16s", b"OCJ2", 7, 2, 9, j[24:40]) + bytes(40), AFTER_BATCH_1),
    "few-bytes-appended": (lambda j: j + b"OC", AFTER_BATCH_1),
}


@pytest.mark.parametrize("tail", list(TAILS), ids=list(TAILS))
def test_torn_journal_tail_is_ignored(impl: ModuleType, journalled: Path, tail: str,
                                      tmp_path: Path) -> None:
    """An uncommitted journal tail is ignored on open; every committed batch is intact."""
    cut, expected = TAILS[tail]
    journal = journalled / "overlay-2.journal"
    raw = journal.read_bytes()
    damaged = cut(raw)
    journal.write_bytes(damaged)
    valid = BATCH_BYTES if expected is AFTER_BATCH_0 else 2 * BATCH_BYTES
    with Volume.open(journalled, readonly=True) as vol:
        assert_regions(vol, expected)
    assert journal.read_bytes() == damaged  # a read-only open changes nothing
    with Volume.open(journalled) as vol:
        assert_regions(vol, expected)
        assert journal.stat().st_size == valid  # the tail was cut off ...
        vol.write(7 * RS, content(7, 5))
        vol.flush()  # ... so this batch follows the committed ones and is found again
        again = crash_copy(journalled, tmp_path / "again")
    with Volume.open(again) as vol:
        assert_regions(vol, {**expected, 7: 5})


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x40]) + raw[at + 1 :]


# A damaged committed batch followed by a valid one: corruption, not a torn tail. No byte of the
# damaged batch can be trusted (a damaged region number would name another region), so every region
# may have a lost version in overlay 2, except 5 and 6, which batch 1 names again: the others are
# unavailable, those served by the base included (their newest version may be the lost one).
EVERY_BUT_5_6 = {0, 1, 2, 3, 4, 7}
CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], set[int]]] = {
    "first-batch-record": (lambda j: _flip(j, BATCH_HEADER + 20), EVERY_BUT_5_6),
    "first-batch-region": (lambda j: _flip(j, BATCH_HEADER), EVERY_BUT_5_6),
    "first-batch-count": (lambda j: _flip(j, 4), EVERY_BUT_5_6),
    "first-batch-checksum": (lambda j: _flip(j, BATCH_BYTES - 1), EVERY_BUT_5_6),
    "garbage-between": (lambda j: j[:BATCH_BYTES] + b"\xffgarbage" + j[BATCH_BYTES:], EVERY_BUT_5_6),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_damaged_committed_batch_is_corruption_not_a_torn_tail(journalled: Path, case: str, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Later batches are kept, the regions the damaged one may have committed are unavailable (never
    an older version read silently), the journal is neither cut nor rewritten, a copy of it is kept,
    and the damage is logged as an error."""
    damage, lost = CORRUPTIONS[case]
    journal = journalled / "overlay-2.journal"
    damaged = damage(journal.read_bytes())
    journal.write_bytes(damaged)
    good = {r: v for r, v in AFTER_BATCH_1.items() if r not in lost}
    with Volume.open(journalled, readonly=True) as vol:
        assert_regions(vol, good)
        for r in lost:
            with pytest.raises(RegionUnavailableError):
                vol.read(r * RS, region_length(r))
    assert sorted(p.name for p in journalled.iterdir() if ".damaged-" in p.name) == []  # read-only: no copy
    with Volume.open(journalled) as vol:
        assert vol.unavailable == frozenset(lost)
        assert_regions(vol, good)
        assert journal.read_bytes() == damaged  # the evidence is kept
        copies = [p for p in journalled.iterdir() if ".damaged-" in p.name]
        assert len(copies) == 1 and copies[0].read_bytes() == damaged
        assert any(rec.levelname == "ERROR" and "damaged" in rec.getMessage() for rec in caplog.records)
        for r in lost:  # whole new versions make them readable again, and are found after a crash
            vol.write(r * RS, content(r, 5))
        vol.flush()
        assert vol.unavailable == frozenset()
        again = crash_copy(journalled, tmp_path / "again")
    with Volume.open(again) as vol:
        assert vol.unavailable == frozenset()
        assert_regions(vol, {**good, **{r: 5 for r in lost}})


# -- locks --------------------------------------------------------------------------------------------
def test_second_open_in_process_is_locked(vol_path: Path) -> None:
    """One writer at a time: a second open (for writing or reading) fails; the first is unharmed."""
    with Volume.open(vol_path) as vol:
        for readonly in (False, True):
            with pytest.raises(VolumeLockedError) as err:
                Volume.open(vol_path, readonly=readonly)
            assert type(err.value) is VolumeLockedError
            assert isinstance(err.value, BlockingIOError)
        vol.write(0, content(0, 9))
        vol.flush()
        assert_regions(vol, {**ALL_V1, 0: 9})
    with Volume.open(vol_path, readonly=True) as r1, Volume.open(vol_path, readonly=True) as r2:
        assert_regions(r1, {**ALL_V1, 0: 9})
        assert_regions(r2, {**ALL_V1, 0: 9})
        with pytest.raises(VolumeLockedError):
            Volume.open(vol_path)
    with Volume.open(vol_path) as vol:
        assert_regions(vol, {**ALL_V1, 0: 9})


CHILD_OPEN = textwrap.dedent(
    """
    import sys
    from overlaycache import Volume, VolumeLockedError
    for readonly in (False, True):
        try:
            vol = Volume.open(sys.argv[1], readonly=readonly)
        except VolumeLockedError:
            print("locked")
        else:
            print("opened", vol.read(0, 8).hex())
            vol.close()
    """
)


def test_second_open_from_another_process_is_locked(vol_path: Path) -> None:
    """A writer in this process locks out other processes until it closes."""
    vol = Volume.open(vol_path)
    try:
        proc = run_python(CHILD_OPEN, str(vol_path))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == ["locked", "locked"]
        assert_regions(vol, ALL_V1)
    finally:
        vol.close()
    proc = run_python(CHILD_OPEN, str(vol_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["opened " + content(0, 1)[:8].hex()] * 2


# -- operations refused ----------------------------------------------------------------------------
def test_failed_local_snapshot_leaves_no_snapshot(vol_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """local_snapshot() refused at the overlay limit must not leave a snapshot behind.

    Such a snapshot would name the writable top overlay, so its image would change with every write.
    """
    monkeypatch.setattr(stack_mod, "MAX_OVERLAYS", 3)
    with Volume.open(vol_path) as vol:
        vol.local_snapshot("a")
        vol.local_snapshot("b")
        before = vol.local_snapshots()
        with pytest.raises(InvalidArgumentError):
            vol.local_snapshot("c")
        assert vol.local_snapshots() == before
        with pytest.raises(SnapshotNotFoundError):
            vol.image("c")
        vol.merge_down()  # stores the metadata
        after_merge = vol.local_snapshots()
        assert [s.label for s in after_merge] == ["a", "b"]
        vol.local_snapshot("c")  # the label is still free
    with Volume.open(vol_path) as vol:
        assert [s.label for s in vol.local_snapshots()] == ["a", "b", "c"]


def test_closed_images_and_volume_refuse_reads(vol_path: Path) -> None:
    """Reading through a closed image or volume is VolumeClosedError, never a crash."""
    vol = Volume.open(vol_path)
    snap = vol.local_snapshot()
    img = vol.image(snap)
    img.close()
    with pytest.raises(VolumeClosedError):
        img.read(0, 1)
    img2 = vol.image(snap)
    vol.close()
    for call in (lambda: img2.read(0, 1), lambda: vol.read(0, 1), lambda: vol.write(0, b"x"),
                 lambda: vol.readinto(0, bytearray(1)), vol.flush, vol.local_snapshot):
        with pytest.raises(VolumeClosedError):
            call()
    with Volume.open(vol_path) as again:
        assert_regions(again, ALL_V1)


@pytest.mark.parametrize("policy", ["always", "sampled", "scrub-only"])
def test_verification_policy(tmp_path: Path, policy: str) -> None:
    """always: every first read is checked; sampled: one region in 16; scrub-only: only scrub()."""
    path = tmp_path / "v"
    with Volume.create(path, 32 * RS, region_size=RS) as vol:
        vol.write(0, b"v" * (32 * RS))
        vol.merge_down()
    with open(path / "base.data", "r+b") as f:
        for r in (0, 1):  # region 0 is in the sample, region 1 is not
            f.seek(r * RS + 7)
            f.write(b"!")
    with Volume.open(path, verify=policy) as vol:
        caught = []
        for r in (0, 1):
            try:
                vol.read(r * RS, 8)
            except RegionUnavailableError as exc:
                caught.extend(exc.regions)
        assert caught == {"always": [0, 1], "sampled": [0], "scrub-only": []}[policy]
        assert vol.scrub() == sorted({0, 1} - set(caught))
        assert vol.unavailable == frozenset({0, 1})
    with pytest.raises(InvalidArgumentError):
        Volume.open(path, verify="sometimes")
