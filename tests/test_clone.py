"""Clones: a writable local overlay over a recovery image (issue 5), against LocalStore and moto.

A clone reads the PIT it was made of, keeps its writes to itself (the primary, other images and
the secondary never change), survives flush + reopen and SIGKILL after flush, and refuses bad
input and the wrong volume or snapshot with the package's own errors.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import overlaycache
from overlaycache import Clone, CloneMismatchError, LocalStore, Volume
from overlaycache.errors import (
    FormatError,
    InvalidArgumentError,
    InvalidBufferError,
    OutOfRangeError,
    RegionUnavailableError,
    SecondaryUnavailableError,
    SnapshotNotFoundError,
    VolumeClosedError,
    VolumeLockedError,
)
from overlaycache.remote.layout import is_pack_key
from overlaycache.testing.ondisk import overlay_slot
from overlaycache.testing.patterns import random_writes, region_chars

RS = 4096
NREG = 8
SIZE = NREG * RS - 1000  # the last region is partial
ROOT = str(Path(overlaycache.__file__).resolve().parent.parent)


def put(target: Any, region: int, ch: str) -> None:
    target.write(region * RS, ch.encode() * RS)


def chars(img: Any) -> str:
    return region_chars(img, RS, NREG)


def object_count(store: Any) -> int:
    """Objects on the store but leases (an image pins its PIT: that is all it writes)."""
    return len([k for k in store.list("") if "/leases/" not in k])


def lettered(tmp_path: Path, store: Any, name: str = "vol") -> Volume:
    """A replicated volume of 8 full regions a..h with PIT T1 of it, then 1->0 and z->3 (PIT T2)."""
    vol = Volume.create(tmp_path / name, NREG * RS, region_size=RS, secondary=store, replication="async")
    for r, ch in enumerate("abcdefgh"):
        put(vol, r, ch)
    vol.snapshot("T1")
    put(vol, 0, "1")
    put(vol, 3, "z")
    vol.snapshot("T2")
    return vol


def random_pit(tmp_path: Path, store: Any, seed: int) -> tuple[Volume, bytes]:
    """A volume with a partial last region, random contents published as PIT "P", then changed."""
    rnd = random.Random(seed)
    vol = Volume.create(tmp_path / "vol", SIZE, region_size=RS, secondary=store, replication="async")
    model = bytearray(SIZE)
    random_writes(vol, model, rnd, 40, 2 * RS)
    vol.snapshot("P")
    random_writes(vol, bytearray(SIZE), rnd, 10, 2 * RS)  # the volume moves on
    return vol, bytes(model)


# -- reads and writes ---------------------------------------------------------------------------------
def test_clone_reads_the_pit(tmp_path: Path, any_store: Any) -> None:
    vol, pit = random_pit(tmp_path, any_store, 1)
    with vol, vol.image("P") as img, img.clone(tmp_path / "clone") as clone:
        assert (clone.size, clone.region_size, clone.num_regions) == (SIZE, RS, NREG)
        assert clone.snapshot.label == "P" and clone.written == frozenset()
        assert clone.read(0, SIZE) == pit
        rnd = random.Random(2)
        for _ in range(20):
            off = rnd.randrange(SIZE)
            n = rnd.randrange(0, SIZE - off + 1)
            buf = bytearray(n + 2)
            assert clone.readinto(off, memoryview(buf)[1 : n + 1]) == n
            assert buf[1 : n + 1] == pit[off : off + n] and buf[0] == buf[-1] == 0
        assert clone.diff() == []


def test_writes_stay_in_the_clone(tmp_path: Path, any_store: Any) -> None:
    vol = lettered(tmp_path, any_store)
    with vol:
        vol.replicate()
        objects = object_count(any_store)
        primary = vol.read(0, vol.size)
        with vol.image("T1") as img, vol.image("T1") as other:
            clone = img.clone(tmp_path / "clone")
            put(clone, 2, "Q")
            assert chars(clone) == "a b Q d e f g h"
            clone.write(5 * RS, b"R" * 100)
            clone.flush()
            assert clone.read(5 * RS, 101) == b"R" * 100 + b"f"
            assert clone.written == frozenset({2, 5}) and clone.diff() == [2, 5]
            put(clone, 2, "c")  # back to the PIT's bytes: written, but no longer different
            assert clone.written == frozenset({2, 5}) and clone.diff() == [5]
            clone.close()
            assert chars(img) == "a b c d e f g h" and chars(other) == "a b c d e f g h"
        assert vol.read(0, vol.size) == primary and chars(vol) == "1 b c z e f g h"
        assert vol.replication_lag.regions == 0
        assert object_count(any_store) == objects
        assert vol.diff("T2") == []


def test_partial_writes(tmp_path: Path, any_store: Any) -> None:
    vol, pit = random_pit(tmp_path, any_store, 3)
    model = bytearray(pit)
    with vol, vol.image("P") as img, img.clone(tmp_path / "clone") as clone:

        def write(off: int, data: Any) -> None:
            raw = bytes(memoryview(data).cast("B"))
            assert clone.write(off, data) == len(raw)
            model[off : off + len(raw)] = raw
            assert clone.read(0, SIZE) == model

        write(RS + 10, b"x" * 5)  # inside a region not in the clone: the rest comes from the image
        write(RS + 20, b"y" * 5)  # the same region, not flushed yet: patched in place
        clone.flush()
        write(RS + 30, b"z" * 5)  # flushed: shadow-written to its other slot
        write(3 * RS - 7, b"w" * (RS + 14))  # across three regions, partial at both ends
        write(SIZE - 3, b"end")  # the partial last region
        write(6 * RS, bytearray(b"v" * (SIZE - 6 * RS)))  # whole last region, another buffer type
        write(0, memoryview(b"m" * 8).cast("Q"))  # any buffer format
        assert clone.written == frozenset({0, 1, 2, 3, 4, 6, 7})
        assert clone.write(100, b"") == 0
        clone.flush()
    with Volume.open(tmp_path / "vol", secondary=any_store) as vol, vol.open_clone(tmp_path / "clone") as again:
        assert again.read(0, SIZE) == model


def test_flush_and_reopen_keeps_writes(tmp_path: Path, any_store: Any) -> None:
    vol, pit = random_pit(tmp_path, any_store, 4)
    model = bytearray(pit)
    with vol:
        img = vol.image("P")
        clone = img.clone(tmp_path / "clone")
        random_writes(clone, model, random.Random(5), 30, 2 * RS)
        clone.flush()
        clone.close()
        img.close()
        with vol.open_clone(tmp_path / "clone") as again:
            assert again.read(0, SIZE) == model
            written = again.written
            random_writes(again, model, random.Random(6), 10, RS)
        owned: Any = again.image
        assert owned.closed  # the image it opened belongs to the clone, and is closed with it
        vid, sid = vol.id, next(s.id for s in vol.snapshots() if s.label == "P")
    with Volume.open(tmp_path / "vol", secondary=any_store) as vol, vol.open_clone(tmp_path / "clone") as again:
        assert again.read(0, SIZE) == model and written <= again.written
    # The store alone is enough: a remote image of the same PIT, no volume.
    with any_store.image(vid, sid) as remote, Clone.open(tmp_path / "clone", remote) as again:
        assert again.read(0, SIZE) == model
        info = Clone.describe(tmp_path / "clone")
        assert (info.volume_id, info.source, info.snapshot_id, info.label) == (vid, "pit", sid, "P")


def test_two_clones_of_two_pits_side_by_side(tmp_path: Path, s3_store: Any) -> None:
    with lettered(tmp_path, s3_store) as vol:
        with vol.image("T1") as t1, vol.image("T2") as t2:
            a, b = t1.clone(tmp_path / "a"), t2.clone(tmp_path / "b")
            put(a, 7, "A")
            put(b, 7, "B")
            put(b, 0, "!")
            assert chars(a) == "a b c d e f g A" and chars(b) == "! b c z e f g B"
            a.close()
            b.close()
        put(vol, 1, "v")
        with vol.open_clone(tmp_path / "a") as a, vol.open_clone(tmp_path / "b") as b:
            assert chars(a) == "a b c d e f g A" and chars(b) == "! b c z e f g B"
            assert a.snapshot.label == "T1" and b.snapshot.label == "T2"
        assert chars(vol) == "1 v c z e f g h"


def test_clone_of_a_pit_with_failed_regions_and_after_restore(tmp_path: Path, s3_store: Any) -> None:
    """Regions failed on the primary come from the secondary; a restore does not change the clone."""
    with lettered(tmp_path, s3_store) as vol:
        vol.replicate()
        with vol.image("T2") as img, img.clone(tmp_path / "clone") as clone:
            put(clone, 4, "C")
            vol.mark_unavailable([2, 3, 5])
            put(vol, 2, "u")
            assert chars(clone) == "1 b c z C f g h"
            clone.write(5 * RS + 1, b"P")  # partial: the rest of region 5 from the secondary
            want = b"".join(ch.encode() * RS for ch in "1bczCfgh")
            want = want[: 5 * RS + 1] + b"P" + want[5 * RS + 2 :]
            assert clone.read(0, clone.size) == want
            vol.restore("T1")
            assert chars(vol) == "a b c d e f g h"
            assert clone.read(0, clone.size) == want


def test_clone_of_a_local_snapshot(tmp_path: Path) -> None:
    with Volume.create(tmp_path / "vol", NREG * RS, region_size=RS) as vol:
        for r, ch in enumerate("abcdefgh"):
            put(vol, r, ch)
        s1 = vol.local_snapshot("S1")
        put(vol, 0, "1")
        s2 = vol.local_snapshot("S2")
        put(vol, 1, "2")
        with vol.image(s1) as img1, vol.image(s2) as img2:
            c1, c2 = img1.clone(tmp_path / "c1"), img2.clone(tmp_path / "c2")
            put(c1, 7, "X")
            put(c2, 6, "Y")
            assert c1.diff() == [7] and c2.diff() == [6]
            c1.close()
            c2.close()
        assert Clone.describe(tmp_path / "c2").source == "local"
        with vol.open_clone(tmp_path / "c1") as c1, vol.open_clone(tmp_path / "c2") as c2:
            assert chars(c1) == "a b c d e f g X" and chars(c2) == "1 b c d e f Y h"
            vol.merge_down()  # S1's overlay folds into the base: both images are kept
            assert chars(c1) == "a b c d e f g X" and chars(c2) == "1 b c d e f Y h"
            vol.merge_down()  # S1's image was the base alone: dropped, its image closed
            with pytest.raises(VolumeClosedError):
                c1.read(0, 1)
            assert chars(c2) == "1 b c d e f Y h"
        with pytest.raises(SnapshotNotFoundError):
            vol.open_clone(tmp_path / "c1")
        with vol.open_clone(tmp_path / "c2") as c2:
            assert c2.written == frozenset({6})
        assert chars(vol) == "1 2 c d e f g h"


# -- closing ---------------------------------------------------------------------------------------------
def test_closing_the_volume_makes_its_clones_raise(tmp_path: Path, any_store: Any) -> None:
    vol = lettered(tmp_path, any_store)
    img = vol.image("T1")
    clone = img.clone(tmp_path / "clone")
    put(clone, 1, "K")
    vol.close()
    assert img.closed
    with pytest.raises(VolumeClosedError):
        img.read(0, 1)
    for call in (lambda: clone.read(0, 1), lambda: clone.readinto(0, bytearray(1)),
                 lambda: clone.write(0, b"x"), clone.diff):
        with pytest.raises(VolumeClosedError):
            call()
    assert clone.written == frozenset({1})
    clone.flush()  # still keeps what was written
    clone.close()
    clone.close()
    for call in (lambda: clone.read(0, 1), lambda: clone.write(0, b"x"), clone.flush, lambda: clone.written):
        with pytest.raises(VolumeClosedError):
            call()
    with Volume.open(tmp_path / "vol", secondary=any_store) as vol, vol.open_clone(tmp_path / "clone") as again:
        assert chars(again) == "a K c d e f g h"


def test_closing_the_image_makes_the_clone_raise(tmp_path: Path, any_store: Any) -> None:
    with lettered(tmp_path, any_store) as vol:
        img = vol.image("T1")
        with img.clone(tmp_path / "clone") as clone:
            img.close()
            with pytest.raises(VolumeClosedError, match="reopen the clone"):
                clone.read(0, 1)
        with pytest.raises(VolumeClosedError):
            img.clone(tmp_path / "other")


# -- bad input and refusals ----------------------------------------------------------------------------
def test_bad_input(tmp_path: Path, any_store: Any) -> None:
    with lettered(tmp_path, any_store) as vol, vol.image("T1") as img, img.clone(tmp_path / "clone") as clone:
        size = clone.size
        for off, n in ((-1, 1), (size, 1), (size - 1, 2), (0, -1)):
            with pytest.raises(OutOfRangeError):
                clone.read(off, n)
        with pytest.raises(OutOfRangeError):
            clone.readinto(size - 1, bytearray(2))
        with pytest.raises(OutOfRangeError):
            clone.write(size - 1, b"ab")
        with pytest.raises(OutOfRangeError):
            clone.write(-1, b"a")
        for bad in ("0", 1.0, True, None):
            with pytest.raises(InvalidArgumentError):
                clone.read(bad, 1)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentError):
                clone.write(bad, b"a")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            clone.read(0, "1")  # type: ignore[arg-type]
        for data in ("text", 5, None, [1, 2]):
            with pytest.raises(InvalidBufferError):
                clone.write(0, data)
        with pytest.raises(InvalidBufferError):
            clone.write(0, memoryview(bytearray(8))[::2])
        for buf in (b"readonly", memoryview(b"readonly"), "str", 3):
            with pytest.raises(InvalidBufferError):
                clone.readinto(0, buf)
        assert clone.read(size, 0) == b"" and clone.written == frozenset()


def test_refusals(tmp_path: Path, any_store: Any) -> None:
    with lettered(tmp_path, any_store) as vol:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "file").write_bytes(b"x")
        (tmp_path / "afile").write_bytes(b"x")
        (tmp_path / "empty").mkdir()
        with vol.image("T1") as t1, vol.image("T2") as t2:
            for path in ("busy", "afile"):
                with pytest.raises(InvalidArgumentError, match="not an empty directory"):
                    t1.clone(tmp_path / path)
            t1.clone(tmp_path / "empty").close()  # an empty directory is fine
            with t1.clone(tmp_path / "clone") as clone:
                with pytest.raises(InvalidArgumentError, match="Volume.open_clone"):
                    t1.clone(tmp_path / "clone")  # an existing clone is not reopened by clone()
                with pytest.raises(VolumeLockedError):
                    vol.open_clone(tmp_path / "clone")  # one open at a time
                put(clone, 0, "q")
            with pytest.raises(CloneMismatchError) as info:
                Clone.open(tmp_path / "clone", t2)
            assert info.value.field == "snapshot" and isinstance(info.value, ValueError)
        for path in ("busy", "afile", "missing"):
            with pytest.raises(FormatError):
                vol.open_clone(tmp_path / path)
        with lettered(tmp_path, any_store, "other") as other:
            with pytest.raises(CloneMismatchError) as info:
                other.open_clone(tmp_path / "clone")
            assert info.value.field == "volume_id" and info.value.expected == vol.id
            assert info.value.found == other.id
        with vol.open_clone(tmp_path / "clone") as clone:
            assert chars(clone) == "q b c d e f g h"


def test_a_failed_creation_leaves_nothing(tmp_path: Path, any_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from overlaycache import clone as clone_module

    def no_space(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    with lettered(tmp_path, any_store) as vol, vol.image("T1") as img:
        (tmp_path / "empty").mkdir()
        with monkeypatch.context() as m:
            m.setattr(clone_module, "_write_descriptor", no_space)
            for name in ("new", "empty"):
                with pytest.raises(OSError, match="No space"):
                    img.clone(tmp_path / name)
        assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "empty") == []
        with img.clone(tmp_path / "new") as clone:  # and it can be retried
            assert chars(clone) == "a b c d e f g h"


def test_damaged_descriptor_and_overlay(tmp_path: Path, any_store: Any) -> None:
    from overlaycache.clone import CloneInfo, _write_descriptor

    with lettered(tmp_path, any_store) as vol:
        with vol.image("T1") as img, img.clone(tmp_path / "clone") as clone:
            put(clone, 2, "D")
        desc = tmp_path / "clone" / "clone.json"
        good = desc.read_bytes()
        desc.write_bytes(good.replace(b'"size"', b'"sizE"'))
        with pytest.raises(FormatError, match="checksum"):
            vol.open_clone(tmp_path / "clone")
        desc.write_bytes(good[: len(good) // 2])
        with pytest.raises(FormatError, match="corrupted"):
            vol.open_clone(tmp_path / "clone")
        obj = json.loads(good)
        obj["version"] = 99
        desc.write_bytes(json.dumps(obj).encode())
        with pytest.raises(FormatError, match="newer"):
            vol.open_clone(tmp_path / "clone")
        info = CloneInfo.from_json(json.loads(good))
        _write_descriptor(str(tmp_path / "clone"), CloneInfo(**{**info.__dict__, "size": info.size - RS}))
        with pytest.raises(CloneMismatchError) as err:
            vol.open_clone(tmp_path / "clone")
        assert err.value.field == "size"
        desc.write_bytes(good)
        os.unlink(desc)
        with pytest.raises(FormatError, match="interrupted creation"):
            vol.open_clone(tmp_path / "clone")
        desc.write_bytes(good)
        # Damage the clone's copy of region 2: found by the checksum on its first read, never returned.
        with open(tmp_path / "clone" / "overlay-1.data", "r+b") as f:
            f.seek(overlay_slot(tmp_path / "clone", 1, 2) * RS + 7)
            f.write(b"!")
        with vol.open_clone(tmp_path / "clone") as clone:
            assert clone.read(0, 2 * RS) == b"a" * RS + b"b" * RS
            with pytest.raises(RegionUnavailableError) as bad:
                clone.read(2 * RS, 10)
            assert bad.value.regions == (2,) and bad.value.reason == "checksum"
            put(clone, 2, "E")  # a whole new version replaces it
            assert clone.read(2 * RS, 2) == b"EE"


class DownStore:
    """A store whose region GETs can be made to fail, as if the secondary were unreachable."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.location = inner.location
        self.down = False

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if self.down and is_pack_key(key):
            raise SecondaryUnavailableError(f"{self.location}: unreachable (test)", self.location)
        return bytes(self.inner.get(key, start, length))

    def image(self, volume_id: str, snapshot: Any, cache_regions: int = 64) -> Any:
        from overlaycache.remote.catalog import Catalog

        return Catalog(self).image(volume_id, snapshot, cache_regions)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_write_that_cannot_read_the_image_changes_nothing(tmp_path: Path) -> None:
    store = DownStore(LocalStore(tmp_path / "secondary", prefix="p"))
    with lettered(tmp_path, store) as vol, vol.image("T1") as img, img.clone(tmp_path / "clone") as clone:
        store.down = True
        # Region 1 is identical on the primary (read locally); region 0 changed there, so the
        # PIT's version is on the secondary only.
        with pytest.raises(SecondaryUnavailableError):
            clone.write(RS - 2, b"abcd")
        assert clone.written == frozenset()
        clone.write(RS, b"ok")
        put(clone, 0, "w")  # a whole region needs nothing from the image
        store.down = False
        assert clone.read(0, RS + 3) == b"w" * RS + b"okb"


# -- crash safety ----------------------------------------------------------------------------------------
def clone_ops(seed: int, size: int, region_size: int) -> Any:
    """The child's writes, reproducible: ``(offset, length, flush_after)``; whole regions, pieces of
    one, and pieces across two."""
    import random

    rnd = random.Random(seed)
    nreg = (size + region_size - 1) // region_size
    while True:
        r = rnd.randrange(nreg)
        rlen = min(region_size, size - r * region_size)
        if rnd.random() < 0.5:
            off, n = r * region_size, rlen
        else:
            a = rnd.randrange(rlen)
            off, n = r * region_size + a, rnd.randint(1, min(rlen - a + region_size, size - r * region_size - a))
        yield off, n, rnd.random() < 0.15


def clone_data(offset: int, length: int, seq: int) -> bytes:
    """The bytes write ``seq`` puts at ``[offset, offset + length)``: each 8 bytes name the write."""
    import struct

    block = struct.pack("<II", seq, offset) * ((length + 7) // 8)
    return block[:length]


CHILD = (
    "from __future__ import annotations\n"
    + "from typing import Any\n"
    + inspect.getsource(clone_ops)
    + inspect.getsource(clone_data)
    + '''
import sys
from overlaycache import LocalStore, Volume

vol_path, store_path, clone_path = sys.argv[1:4]
seed, seq = int(sys.argv[4]), int(sys.argv[5])
vol = Volume.open(vol_path, secondary=LocalStore(store_path, prefix="p"))
clone = vol.open_clone(clone_path)


def say(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()


say("READY")
for off, n, flush in clone_ops(seed, clone.size, clone.region_size):
    seq += 1
    say(f"W {seq}")
    clone.write(off, clone_data(off, n, seq))
    if flush:
        clone.flush()
        say(f"F {seq}")
'''
)


def region_states(seed: int, initial: bytes, start: int, last: int) -> list[list[bytes]]:
    """Per region, its contents before the round (index 0) and after each of its writes up to ``last``."""
    cur = bytearray(initial)
    states = [[bytes(cur[r * RS : (r + 1) * RS])] for r in range(NREG)]
    for seq, (off, n, _flush) in enumerate(clone_ops(seed, SIZE, RS), start + 1):
        if seq > last:
            break
        cur[off : off + n] = clone_data(off, n, seq)
        for r in range(NREG):
            states[r].append(bytes(cur[r * RS : (r + 1) * RS]))
    return states


def kill_after_flushes(tmp_path: Path, store_path: Path, seed: int, start: int, delay: float) -> tuple[int, int]:
    """Run the child until it has flushed twice, ``delay`` more seconds, then SIGKILL it; returns
    the last write it may have issued and the last one it flushed."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out, err = tmp_path / f"child-{seed}.out", tmp_path / f"child-{seed}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-c", CHILD, str(tmp_path / "vol"), str(store_path), str(tmp_path / "clone"),
             str(seed), str(start)], stdout=stdout, stderr=stderr, env=env)
        try:
            deadline = time.monotonic() + 30
            while out.read_text().count("\nF ") < 2:
                assert proc.poll() is None, f"child died: {err.read_text()}"
                assert time.monotonic() < deadline, "child flushed nothing after 30 s"
                time.sleep(0.002)
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err.read_text()
    lines = out.read_text().split("\n")[:-1]  # a last line without its newline was cut by the kill
    issued = max(int(line[2:]) for line in lines if line.startswith("W "))
    durable = max(int(line[2:]) for line in lines if line.startswith("F "))
    return issued, durable


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_after_flush_keeps_flushed_writes(tmp_path: Path, seed: int) -> None:
    """Killed at any moment after flush(), the clone reopens with every flushed write and each
    region whole; the same clone is killed several times, so a recovered clone recovers too."""
    store_path = tmp_path / "secondary"
    vol, pit = random_pit(tmp_path, LocalStore(store_path, prefix="p"), seed)
    with vol:
        primary = vol.read(0, SIZE)
        with vol.image("P") as img:
            img.clone(tmp_path / "clone").close()
    initial, start = pit, 0
    for rnd, delay in enumerate(random.Random(seed).sample([0.0, 0.02, 0.1, 0.4], 4)):
        child_seed = 100 * seed + rnd
        issued, durable = kill_after_flushes(tmp_path, store_path, child_seed, start, delay)
        states = region_states(child_seed, initial, start, issued)
        with Volume.open(tmp_path / "vol", secondary=LocalStore(store_path, prefix="p")) as vol:
            with vol.open_clone(tmp_path / "clone") as clone:
                got = clone.read(0, SIZE)
            for r in range(NREG):
                assert got[r * RS : (r + 1) * RS] in states[r][durable - start :], (
                    f"round {rnd}, region {r}: torn, or a flushed write was lost")
            assert vol.read(0, SIZE) == primary  # the clone never wrote to the volume
            with vol.image("P") as img:
                assert img.read(0, SIZE) == pit
        initial, start = got, issued
