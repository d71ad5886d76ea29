"""The local volume: the Fig. 2 worked example, layers, snapshots, merge, and bad input."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest

import overlaycache
from overlaycache import (
    FormatError,
    InvalidArgumentError,
    InvalidBufferError,
    OutOfRangeError,
    SnapshotNotFoundError,
    Volume,
    VolumeClosedError,
    VolumeLockedError,
)
from overlaycache.testing.patterns import region_chars

RS = 4096


def image_chars(vol: Volume | overlaycache.VirtualImage, n: int = 8) -> str:
    """One character per region: the regions of the worked examples are one repeated byte."""
    return region_chars(vol, RS, n)


@pytest.fixture
def fig2(tmp_path: Path) -> Volume:
    vol = Volume.create(tmp_path / "vol", 8 * RS, region_size=RS)
    for r, ch in enumerate("abcdefgh"):
        vol.write(r * RS, ch.encode() * RS)
    return vol


def test_fig2_overlay_snapshot(fig2: Volume) -> None:
    """DESIGN §4, Fig. 2: writes x->0, z->3, 1->0 go to an overlay; the base is unchanged."""
    base = fig2.local_snapshot("base")
    fig2.write(0, b"x" * RS)
    fig2.write(3 * RS, b"z" * RS)
    fig2.write(0, b"1" * RS)
    assert image_chars(fig2) == "1 b c z e f g h"
    with fig2.image(base) as img:
        assert image_chars(img) == "a b c d e f g h"
    top = fig2._live_layers().top
    assert top.present.runs() == [(0, 1), (3, 4)]
    assert [s.label for s in fig2.local_snapshots()] == ["base"]
    fig2.close()
    with Volume.open(fig2.path) as again:
        assert image_chars(again) == "1 b c z e f g h"
        assert image_chars(again.image("base")) == "a b c d e f g h"


def test_geometry_and_partial_last_region(tmp_path: Path) -> None:
    with Volume.create(tmp_path / "v", 3 * RS + 10, region_size=RS) as vol:
        assert (vol.size, vol.region_size, vol.num_regions) == (3 * RS + 10, RS, 4)
        vol.write(3 * RS, b"0123456789")
        vol.write(RS - 3, b"spanning")
        assert vol.read(3 * RS, 10) == b"0123456789"
        assert vol.read(RS - 3, 8) == b"spanning"
        assert vol.read(0, 5) == bytes(5)
        buf = bytearray(12)
        assert vol.readinto(RS - 5, buf) == 12
        assert bytes(buf) == b"\0\0spanning\0\0"
        with pytest.raises(OutOfRangeError):
            vol.write(3 * RS + 5, b"0123456789")


def test_writes_of_any_shape_match_a_bytearray(tmp_path: Path) -> None:
    import random

    rnd = random.Random(7)
    size = 5 * RS + 123
    model = bytearray(size)
    with Volume.create(tmp_path / "v", size, region_size=RS) as vol:
        for i in range(200):
            off = rnd.randrange(size)
            n = rnd.randrange(1, min(3 * RS, size - off) + 1)
            data = rnd.randbytes(n)
            vol.write(off, data)
            model[off : off + n] = data
            if i % 37 == 0:
                vol.local_snapshot()
            if i % 53 == 0:
                vol.flush()
        assert vol.read(0, size) == model
        assert vol.merge_down() > 0
        assert vol.read(0, size) == model


def test_merge_down_keeps_later_snapshots(fig2: Volume) -> None:
    s1 = fig2.local_snapshot("s1")  # abcdefgh
    fig2.write(RS, b"B" * RS)
    s2 = fig2.local_snapshot("s2")  # aBcdefgh
    fig2.write(2 * RS, b"C" * RS)
    img1, img2 = fig2.image(s1), fig2.image(s2)
    assert fig2.merge_down() == 8  # overlay 1 (the initial writes) into the base
    assert image_chars(img1) == "a b c d e f g h"
    assert image_chars(img2) == "a B c d e f g h"
    assert [s.layer for s in fig2.local_snapshots()] == [0, s2.layer]
    assert fig2.merge_down() == 1  # s1's image was the base alone: it goes
    assert img1.closed and not img2.closed
    with pytest.raises(VolumeClosedError):
        img1.read(0, 1)
    assert [s.label for s in fig2.local_snapshots()] == ["s2"]
    assert image_chars(img2) == "a B c d e f g h"
    assert image_chars(fig2) == "a B C d e f g h"
    names = sorted(os.listdir(fig2.path))
    assert "overlay-1.data" not in names and "overlay-2.data" not in names


def test_snapshot_lookup(fig2: Volume) -> None:
    s = fig2.local_snapshot("nightly")
    assert fig2.image(s.id).snapshot == s
    assert fig2.image("nightly").snapshot == s
    with pytest.raises(SnapshotNotFoundError) as info:
        fig2.image("nope")
    assert isinstance(info.value, KeyError) and "nope" in str(info.value)
    with pytest.raises(InvalidArgumentError):
        fig2.local_snapshot("nightly")
    with pytest.raises(InvalidArgumentError):
        fig2.local_snapshot("")
    with pytest.raises(InvalidArgumentError):
        fig2.image(12)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "region_size"),
    [(0, RS), (-1, RS), (RS, 3000), (RS, 2048), (RS, 128 << 20), (1.5, RS), (RS, True), ("10", RS)],
)
def test_bad_geometry(tmp_path: Path, size: object, region_size: object) -> None:
    with pytest.raises(InvalidArgumentError):
        Volume.create(tmp_path / "v", size, region_size=region_size)  # type: ignore[arg-type]
    assert not (tmp_path / "v" / "volume.json").exists()


def test_bad_io_arguments_leave_data_intact(fig2: Volume) -> None:
    before = fig2.read(0, fig2.size)
    for off, n in [(-1, 1), (0, -1), (fig2.size, 1), (fig2.size - 1, 2), (1 << 70, 1)]:
        with pytest.raises(OutOfRangeError):
            fig2.read(off, n)
    with pytest.raises(OutOfRangeError):
        fig2.write(fig2.size - 1, b"ab")
    with pytest.raises(OutOfRangeError):
        fig2.write(-1, b"a")
    with pytest.raises(OutOfRangeError):
        fig2.readinto(fig2.size - 1, bytearray(2))
    with pytest.raises(InvalidBufferError):
        fig2.write(0, "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidBufferError):
        fig2.write(0, 42)  # type: ignore[arg-type]
    with pytest.raises(InvalidBufferError):
        fig2.readinto(0, b"read-only")
    with pytest.raises(InvalidArgumentError):
        fig2.read("0", 1)  # type: ignore[arg-type]
    assert fig2.read(0, fig2.size) == before
    assert fig2.write(5, b"") == 0 and fig2.read(5, 0) == b""


def test_not_a_volume(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        Volume.open(tmp_path)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FormatError):
        Volume.open(tmp_path / "file")
    with pytest.raises(FormatError):
        Volume.open(tmp_path / "missing")
    with pytest.raises(InvalidArgumentError):
        Volume.create(tmp_path, RS)  # not empty


def test_one_writer(fig2: Volume) -> None:
    with pytest.raises(VolumeLockedError):
        Volume.open(fig2.path)
    with pytest.raises(VolumeLockedError):
        Volume.open(fig2.path, readonly=True)
    fig2.close()
    with Volume.open(fig2.path, readonly=True) as r1, Volume.open(fig2.path, readonly=True) as r2:
        assert image_chars(r1) == image_chars(r2) == "a b c d e f g h"
        with pytest.raises(InvalidArgumentError):
            r1.write(0, b"x")
        with pytest.raises(VolumeLockedError):
            Volume.open(fig2.path)


def test_closed_volume(fig2: Volume) -> None:
    fig2.close()
    fig2.close()
    with pytest.raises(VolumeClosedError):
        fig2.read(0, 1)
    with pytest.raises(VolumeClosedError):
        fig2.write(0, b"x")
    with pytest.raises(VolumeClosedError):
        fig2.flush()


def test_readers_and_writer_in_threads_see_whole_regions(tmp_path: Path) -> None:
    """Concurrent readers never see a mix of two versions of a region."""
    n = 16
    with Volume.create(tmp_path / "v", n * RS, region_size=RS) as vol:
        stop = threading.Event()
        bad: list[str] = []

        def writer() -> None:
            v = 0
            while not stop.is_set():
                v = (v + 1) % 250
                vol.write((v % n) * RS, bytes([v]) * RS)
                if v % 50 == 0:
                    vol.flush()

        def reader() -> None:
            buf = bytearray(RS)
            for i in range(3000):
                vol.readinto((i % n) * RS, buf)
                if buf.count(buf[0]) != RS:
                    bad.append(f"torn region {i % n}")
                    return

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        stop.set()
        threads[0].join()
        assert bad == []


def test_a_create_killed_half_way_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    """A create builds beside its path, holding the build's lock. What a killed create left (no lock
    held, older than a minute) is removed by the next create of that name; a build under way (its
    lock held) and a young one are left alone."""
    import fcntl
    import time

    from overlaycache.testing.kill import run_and_kill

    child = r"""
import sys, time
from overlaycache.local import stack
def slow(*a, **k):  # killed while it builds
    print("READY", flush=True)
    time.sleep(60)
stack.Overlay.create = slow
from overlaycache import Volume
Volume.create(sys.argv[1], 1 << 20, region_size=4096)
"""
    run_and_kill(child, [str(tmp_path / "vol")], tmp_path / "child.out", 0.05)
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".vol.creating-")]
    busy = tmp_path / ".vol.creating-busy"
    busy.mkdir()
    fd = os.open(busy / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    old = time.time() - 120
    for p in (left, busy):
        os.utime(p, (old, old))
    young = tmp_path / ".vol.creating-young"
    young.mkdir()
    try:
        Volume.create(tmp_path / "vol", 1 << 20, region_size=4096).close()
        names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".vol."))
        assert names == [".vol.creating-busy", ".vol.creating-young"]
    finally:
        os.close(fd)


def test_messages_about_many_regions_stay_short() -> None:
    """Region lists in messages are ranges, cut after a few dozen with the rest counted; a
    volume's unavailable regions are summarised from the first part of its bitmap."""
    from overlaycache.local.geometry import region_ranges

    assert region_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert region_ranges([]) == "none"
    text = region_ranges(range(0, 10_000_000, 100))  # a sequence: the rest is counted, not walked
    assert len(text) < 400 and text.endswith("... and 99,968 more regions")
    text = region_ranges(iter(range(0, 10_000, 100)))  # an iterator: walked, its ranges counted
    assert text.endswith("... and 68 more regions in 68 ranges")
    assert region_ranges([*range(0, 40, 2), *range(100, 200)], limit=20) == (
        ",".join(str(r) for r in range(0, 40, 2)) + " ... and 100 more regions")
    from overlaycache.errors import Reason
    from overlaycache.local.unavailable import UnavailableMap

    with tempfile.TemporaryDirectory() as d:
        um = UnavailableMap(d, 10_000_000, "v")
        assert um.mark(range(5, 10_000_000, 10), Reason.DECLARED)[:2] == [5, 15]
        assert um.mark([5, 6, 7], Reason.IO) == [6, 7]  # 5 was marked already
        summary = um.summary()
        assert summary.startswith("5-7,15,25,") and summary.endswith("(1,000,002 regions in all)")


def test_layer_counts_match_the_layer_map(tmp_path: Path) -> None:
    """layer_counts() says how many regions each layer serves, as the full layer_map would."""
    with Volume.create(tmp_path / "v", 40 * RS, region_size=RS) as vol:
        for r in (1, 2, 30):
            vol.write(r * RS, b"x")
        vol.local_snapshot()
        for r in (2, 3):
            vol.write(r * RS, b"y")
        full = vol.layer_map()
        assert vol.layer_counts() == {layer: full.count(layer) for layer in (0, 1, 2)}
