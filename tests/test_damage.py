"""The damage matrix of a volume's files (local format 2): every file, every kind of damage.

A closed volume has a base holding some regions, a frozen overlay behind a local snapshot, a top
overlay whose last journal batches are not checkpointed, and two regions declared lost (in
``unavailable.map``: reading them must fail, whatever their local bytes). Each case damages one file, in one way:
a bit flipped, a range zeroed, the file truncated, swapped with the same file of another volume of
the same geometry, or deleted. Opening it (read-only, then for writing) must either fail with a
package error naming that file, or give a volume whose every region reads as it was or raises
``RegionUnavailableError`` naming it. Never other bytes. Positions and lengths are drawn by
hypothesis.

One family is marked as a known gap (``xfail``, strict): damage confined to the journal's last
batch (a bit flipped in it, its tail zeroed or cut). A batch whose write was torn by a crash looks
the same, so it is dropped as a torn tail, and the regions it named read their previous versions.
Telling the two apart needs a commit record written after the batch (a second fsync per flush).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycache import Volume
from overlaycache.errors import OverlayCacheError, RegionUnavailableError

RS = 4096
NREG = 24
SIZE = NREG * RS - 300


def _content(r: int, version: int) -> bytes:
    return (bytes([r, version]) * (RS // 2))[: min(RS, SIZE - r * RS)]


LOST = [22, 23]


def _build(path: Path, salt: int) -> dict[int, bytes | None]:
    """The volume described in the module docstring; returns what each region holds (None:
    declared lost, reads must fail)."""
    model: dict[int, bytes | None] = {r: bytes(min(RS, SIZE - r * RS)) for r in range(NREG)}
    with Volume.create(path, SIZE, region_size=RS) as vol:
        for r in range(0, 8):
            model[r] = _content(r, 1 + salt)
            vol.write(r * RS, model[r])
        vol.merge_down()  # regions 0-7 in the base
        for r in range(4, 14):
            model[r] = _content(r, 2 + salt)
            vol.write(r * RS, model[r])
        vol.local_snapshot("s")  # regions 4-13 in a frozen overlay
        for batch, regions in enumerate((range(10, 16), range(12, 20), range(18, 22))):
            for r in regions:
                model[r] = _content(r, 3 + batch + salt)
                vol.write(r * RS, model[r])
            vol.flush()  # three journal batches
        vol.mark_unavailable(LOST)  # declared lost: must never read again
        for r in LOST:
            model[r] = None
        vol._wlock.acquire()
        try:
            vol._teardown()  # not closed: the journal stays as it is (no checkpoint)
        finally:
            vol._wlock.release()
    return model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, bytes | None]]:
    root = tmp_path_factory.mktemp("damage")
    model = _build(root / "a", 0)
    _build(root / "b", 50)  # another volume of the same geometry
    for p in (root / "a" / "lock", root / "b" / "lock"):
        p.unlink(missing_ok=True)
    return root / "a", root / "b", model


FILES = ["volume.json", "unavailable.map", "base.data", "base.sums", "overlay-2.data", "overlay-2.map", "overlay-2.table",
         "overlay-2.journal", "overlay-3.data", "overlay-3.map", "overlay-3.table", "overlay-3.journal"]
KINDS = ["flip", "zero", "truncate", "swap", "delete"]


def _last_batch_start(journal: bytes) -> int:
    """Where the last of the journal's batches begins (see layers._BATCH, _RECORD)."""
    pos = last = 0
    while pos + 40 <= len(journal):
        count = int.from_bytes(journal[pos + 4 : pos + 8], "little")
        last = pos
        pos += 40 + 32 * count + 16
    return last


def _check(path: Path, name: str, model: dict[int, bytes | None]) -> str:
    """Open ``path`` read-only, then for writing; every outcome must be allowed. Returns what
    happened (for the statistics)."""
    outcome = "intact"
    for readonly in (True, False):
        try:
            vol = Volume.open(path, readonly=readonly)
        except OverlayCacheError as exc:
            assert name in str(exc) or (name == "volume.json" and "another volume" in str(exc)), exc
            return "refused"
        with vol:
            for r in range(NREG):
                want = model[r]
                try:
                    got = vol.read(r * RS, min(RS, SIZE - r * RS))
                except RegionUnavailableError as exc:
                    assert r in exc.regions
                    outcome = "unavailable"
                    continue
                assert want is not None, f"region {r}, declared lost, reads again after damage to {name}"
                assert got == want, f"region {r} of {name} reads other bytes"
    return outcome


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_file_never_reads_as_other_bytes(pristine: tuple[Path, Path, dict[int, bytes | None]], name: str, kind: str,
                                                 data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    src, other, model = pristine
    work = tmp_path_factory.mktemp("case") / "v"
    shutil.copytree(src, work)
    target = work / name
    raw = target.read_bytes()
    journal_tail = _last_batch_start(raw) if name == "overlay-3.journal" else len(raw)
    # Damage reaching into the journal's last batch is the known gap (see the module docstring):
    # positions are drawn before it (journal_tail is the file's end for every other file).
    if kind == "flip":
        if not journal_tail:
            return
        at = data.draw(st.integers(0, journal_tail - 1), label="byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        target.write_bytes(raw[:at] + bytes([raw[at] ^ (1 << bit)]) + raw[at + 1 :])
    elif kind == "zero":
        if not journal_tail:
            return
        at = data.draw(st.integers(0, journal_tail - 1), label="start")
        n = data.draw(st.integers(1, journal_tail - at), label="length")
        if raw[at : at + n] == bytes(n):
            return  # nothing changed
        target.write_bytes(raw[:at] + bytes(n) + raw[at + n :])
    elif kind == "truncate":
        if not raw or name == "overlay-3.journal":
            return  # a journal cut short: the known gap
        at = data.draw(st.integers(0, len(raw) - 1), label="length")
        os.truncate(target, at)
    elif kind == "swap":
        shutil.copy(other / name, target)
        if (other / name).read_bytes() == raw:
            return
    else:
        target.unlink()
    _check(work, name, model)


@pytest.mark.xfail(strict=True, reason="a damaged last journal batch cannot be told from a torn write (issue 10)")
@pytest.mark.parametrize("damage", ["flip", "zero-tail", "cut"])
def test_a_damaged_last_journal_batch_is_found(pristine: tuple[Path, Path, dict[int, bytes | None]], damage: str,
                                               tmp_path: Path) -> None:
    """The known gap of the matrix: damage confined to the journal's last committed batch makes its
    regions read their previous versions (it is dropped as a torn tail)."""
    src, _other, model = pristine
    work = tmp_path / "v"
    shutil.copytree(src, work)
    journal = work / "overlay-3.journal"
    raw = journal.read_bytes()
    last = _last_batch_start(raw)
    if damage == "flip":
        raw = raw[: last + 50] + bytes([raw[last + 50] ^ 1]) + raw[last + 51 :]
    elif damage == "zero-tail":
        raw = raw[: len(raw) - 20] + bytes(20)
    else:
        raw = raw[: len(raw) - 20]
    journal.write_bytes(raw)
    _check(work, "overlay-3.journal", model)


def test_volume_json_says_whether_regions_are_marked(tmp_path: Path) -> None:
    """The marker that makes a deleted ``unavailable.map`` an error follows the marks both ways."""
    from overlaycache import LocalStore

    store = LocalStore(tmp_path / "secondary")
    with Volume.create(tmp_path / "v", 4 * RS, region_size=RS, secondary=store) as vol:
        vol.write(0, b"x" * 4 * RS)
        snap = vol.snapshot()
        assert "unavailable" not in (tmp_path / "v" / "volume.json").read_text()
        vol.mark_unavailable([1])
        assert '"unavailable": true' in (tmp_path / "v" / "volume.json").read_text()
        vol.restore(snap)  # clears the marks
        assert vol.unavailable == frozenset()
        assert "unavailable" not in (tmp_path / "v" / "volume.json").read_text()
    (tmp_path / "v" / "unavailable.map").unlink()
    with Volume.open(tmp_path / "v") as vol:  # no region marked: nothing lost with the file
        assert vol.read(RS, 1) == b"x"


def test_an_unavailable_map_of_format_1_is_read_and_rewritten(tmp_path: Path) -> None:
    with Volume.create(tmp_path / "v", 70 * RS, region_size=RS) as vol:
        vol.write(0, b"y" * 70 * RS)
    bits = bytearray(16)
    bits[65 // 8] |= 1 << (65 % 8)
    (tmp_path / "v" / "unavailable.map").write_bytes(b"OCUNAV01" + bytes(bits))
    with Volume.open(tmp_path / "v") as vol:
        assert vol.unavailable == frozenset({65})
        with pytest.raises(RegionUnavailableError):
            vol.read(65 * RS, 1)
        vol.write(0, b"z")
        vol.flush()
    raw = (tmp_path / "v" / "unavailable.map").read_bytes()
    assert raw[:8] == b"OCUNAV02" and '"unavailable": true' in (tmp_path / "v" / "volume.json").read_text()
    (tmp_path / "v" / "unavailable.map").unlink()
    with pytest.raises(OverlayCacheError, match="unavailable.map: missing"):
        Volume.open(tmp_path / "v", readonly=True)
