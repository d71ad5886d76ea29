"""Model-based test of ``Volume``: random operations against a plain bytearray model.

A hypothesis state machine writes, reads, flushes, takes local snapshots, reads their images, merges
overlays down, closes and reopens the volume, and copies its files while it is open (what a crash
would leave). After every step the whole image must equal the model, every open image must equal
the model recorded for its snapshot, and a crash copy must equal the model as of the last durable
point (flush, snapshot, close).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from overlaycache import _core_py
from overlaycache.errors import InvalidArgumentError, SnapshotNotFoundError, VolumeClosedError
from overlaycache.images import VirtualImage
from overlaycache.testing.cores import use_core
from overlaycache.volume import Volume

RS = 4096
MAX_REGIONS = 10

SIZES = st.one_of(
    st.integers(1, MAX_REGIONS).map(lambda n: n * RS),  # whole regions
    st.integers(1, MAX_REGIONS * RS),  # usually a partial last region
    st.sampled_from([1, RS - 1, RS + 1, 3 * RS - 8]),
)


def payload(seed: int, length: int, kind: str) -> Any:
    """``length`` bytes derived from ``seed``, as the buffer type ``kind``."""
    rnd = random.Random(seed)
    raw = bytes([seed & 0xFF]) * length if seed % 3 == 0 else rnd.randbytes(length)
    if kind == "bytearray":
        return bytearray(raw)
    if kind == "memoryview":
        return memoryview(b"\xee" + raw + b"\xee")[1:-1]  # a slice of a larger buffer
    return raw


class _Layer:
    """Model of one overlay: the snapshot that froze it (if any) and the regions written to it."""

    def __init__(self) -> None:
        self.snapshot: str | None = None
        self.regions: set[int] = set()


class VolumeMachine(RuleBasedStateMachine):
    """Drives a small ``Volume`` and a bytearray model with the same operations."""

    core: ModuleType | None = None  # a core implementation to put behind the volume (None: default)

    def __init__(self) -> None:
        super().__init__()
        self._patches = pytest.MonkeyPatch()
        if self.core is not None:
            use_core(self._patches, self.core)
        self.tmp = tempfile.mkdtemp(prefix="oc-stateful-")
        self.path = os.path.join(self.tmp, "vol")
        self.vol: Volume | None = None
        self.size = 0
        self.model = bytearray()
        self.durable = b""  # the model at the last point a crash cannot undo
        self.snaps: dict[str, bytes] = {}  # surviving snapshot id -> its image
        self.labels: dict[str, str] = {}  # label -> snapshot id
        self.seen_ids: set[str] = set()
        self.images: dict[str, VirtualImage] = {}
        self.layers: list[_Layer] = []  # overlays, oldest first; the last one takes writes
        self.base_snapshot: str | None = None  # the snapshot whose image is the base alone
        self.crashes = 0
        self.label_counter = 0

    def teardown(self) -> None:
        try:
            if self.vol is not None:
                self.vol.close()
        finally:
            self._patches.undo()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def v(self) -> Volume:
        assert self.vol is not None
        return self.vol

    @property
    def num_regions(self) -> int:
        return (self.size + RS - 1) // RS

    def draw_range(self, data: st.DataObject, min_length: int) -> tuple[int, int]:
        """An offset and a length inside the volume, often on or near region boundaries."""
        r = data.draw(st.integers(0, self.num_regions - 1), label="region")
        intra = data.draw(st.one_of(st.just(0), st.sampled_from([1, 8, RS // 2, RS - 1]),
                                    st.integers(0, RS - 1)), label="intra")
        offset = min(r * RS + intra, self.size - 1)
        length = data.draw(st.one_of(st.sampled_from([RS, 2 * RS, 3 * RS]),
                                     st.integers(min_length, 3 * RS)), label="length")
        return offset, max(min_length, min(length, self.size - offset))

    def check_image(self, img: VirtualImage, expected: bytes) -> None:
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected

    def check_snapshots(self, vol: Volume) -> None:
        """The volume's snapshots are exactly the model's, with the recorded images."""
        listed = vol.local_snapshots()
        assert [s.id for s in listed] == list(self.snaps)
        assert {s.label: s.id for s in listed if s.label is not None} == self.labels
        for snap in listed:
            with vol.image(snap) as img:
                self.check_image(img, self.snaps[snap.id])

    def forget_images(self) -> None:
        """After a close, every image is closed and refuses reads."""
        for img in self.images.values():
            assert img.closed
            with pytest.raises(VolumeClosedError):
                img.read(0, 1)
        self.images.clear()

    # -- rules ------------------------------------------------------------------------------------
    @initialize(size=SIZES)
    def create(self, size: int) -> None:
        self.size = size
        self.vol = Volume.create(self.path, size, region_size=RS)
        if self.core is not None:
            assert type(self.v._layers.live).__module__ == self.core.__name__
        assert (self.v.size, self.v.region_size, self.v.num_regions) == (size, RS, self.num_regions)
        self.model = bytearray(size)
        self.durable = bytes(size)
        self.layers = [_Layer()]

    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1),
          kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
    def write(self, data: st.DataObject, seed: int, kind: str) -> None:
        offset, length = self.draw_range(data, 1)
        buf = payload(seed, length, kind)
        assert self.v.write(offset, buf) == length
        self.model[offset : offset + length] = bytes(buf)
        self.layers[-1].regions.update(range(offset // RS, (offset + length - 1) // RS + 1))

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        offset, length = self.draw_range(data, 0)
        assert self.v.read(offset, length) == self.model[offset : offset + length]

    @rule(data=st.data())
    def readinto(self, data: st.DataObject) -> None:
        offset, length = self.draw_range(data, 0)
        big = bytearray(b"\xaa" * (length + 16))
        view = memoryview(big)[8 : 8 + length]
        assert self.v.readinto(offset, view) == length
        assert big[8 : 8 + length] == self.model[offset : offset + length]
        assert big[:8] == big[8 + length :] == b"\xaa" * 8  # nothing written outside the buffer

    @rule(crash=st.booleans())
    def flush(self, crash: bool) -> None:
        self.v.flush()
        self.durable = bytes(self.model)
        if crash:
            self.crash_copy()

    @rule(labelled=st.booleans())
    def local_snapshot(self, labelled: bool) -> None:
        label = None
        if labelled:
            self.label_counter += 1
            label = f"label-{self.label_counter}"
        snap = self.v.local_snapshot(label)
        assert snap.id not in self.seen_ids  # ids are never reused
        assert snap.label == label
        self.seen_ids.add(snap.id)
        self.snaps[snap.id] = bytes(self.model)
        if label is not None:
            self.labels[label] = snap.id
        self.layers[-1].snapshot = snap.id
        self.layers.append(_Layer())
        self.durable = bytes(self.model)  # a snapshot commits the overlay it freezes

    @precondition(lambda self: bool(self.labels))
    @rule(data=st.data())
    def duplicate_label_is_refused(self, data: st.DataObject) -> None:
        label = data.draw(st.sampled_from(sorted(self.labels)), label="label")
        with pytest.raises(InvalidArgumentError):
            self.v.local_snapshot(label)
        assert [s.id for s in self.v.local_snapshots()] == list(self.snaps)

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data(), how=st.sampled_from(["id", "object", "label"]))
    def open_image(self, data: st.DataObject, how: str) -> None:
        sid = data.draw(st.sampled_from(list(self.snaps)), label="snapshot")
        if sid in self.images:
            return
        key: Any = sid
        if how == "object":
            key = next(s for s in self.v.local_snapshots() if s.id == sid)
        elif how == "label":
            key = next((lab for lab, i in self.labels.items() if i == sid), sid)
        img = self.v.image(key)
        assert img.snapshot.id == sid
        self.images[sid] = img
        self.check_image(img, self.snaps[sid])

    @precondition(lambda self: bool(self.images))
    @rule(data=st.data(), into=st.booleans())
    def read_image(self, data: st.DataObject, into: bool) -> None:
        sid = data.draw(st.sampled_from(list(self.images)), label="image")
        img, expected = self.images[sid], self.snaps[sid]
        offset, length = self.draw_range(data, 0)
        if into:
            buf = bytearray(length)
            assert img.readinto(offset, buf) == length
            assert buf == expected[offset : offset + length]
        else:
            assert img.read(offset, length) == expected[offset : offset + length]

    @precondition(lambda self: bool(self.images))
    @rule(data=st.data())
    def close_image(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(list(self.images)), label="image")
        img = self.images.pop(sid)
        img.close()
        img.close()  # idempotent
        assert img.closed
        with pytest.raises(VolumeClosedError):
            img.read(0, 1)

    @rule()
    def merge_down(self) -> None:
        if len(self.layers) == 1:  # the top overlay is frozen (without a snapshot) first
            self.layers.append(_Layer())
            self.durable = bytes(self.model)
        oldest = self.layers.pop(0)
        dropped, self.base_snapshot = self.base_snapshot, oldest.snapshot
        assert self.v.merge_down() == len(oldest.regions)
        if dropped is not None:  # its image was the base alone, which just changed
            del self.snaps[dropped]
            self.labels = {lab: i for lab, i in self.labels.items() if i != dropped}
            img = self.images.pop(dropped, None)
            if img is not None:
                assert img.closed
                with pytest.raises(VolumeClosedError):
                    img.read(0, 1)
            with pytest.raises(SnapshotNotFoundError):
                self.v.image(dropped)
        self.check_snapshots(self.v)

    @rule()
    def close_and_reopen(self) -> None:
        self.v.close()
        assert self.v.closed
        self.forget_images()
        with pytest.raises(VolumeClosedError):
            self.v.read(0, 1)
        self.vol = Volume.open(self.path)
        self.durable = bytes(self.model)
        self.check_snapshots(self.v)

    @rule()
    def crash_copy(self) -> None:
        """Copy the files of the open volume and open the copy: a crash at this moment."""
        self.crashes += 1
        copy = os.path.join(self.tmp, f"crash-{self.crashes}")
        shutil.copytree(self.path, copy)
        try:
            with Volume.open(copy) as crashed:
                assert crashed.read(0, self.size) == self.durable
                self.check_snapshots(crashed)
        finally:
            shutil.rmtree(copy)

    @rule()
    def checkpoint(self) -> None:
        """Flush and fold the top overlay's journal into its map and table (as a full journal does)."""
        self.v.flush()
        with self.v._wlock:
            self.v._layers.top.checkpoint()  # type: ignore[union-attr]
        self.durable = bytes(self.model)

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def slots_are_accounted_for(self) -> None:
        """Each region the top overlay holds has a slot of its own; free slots are held by none;
        every slot is below the slot count; the data file holds no more than the slots need."""
        if self.vol is None:
            return
        top = self.v._layers.top  # type: ignore[union-attr]
        held = [top.slot_of(r) for r in top.regions()]
        free = set(top._free)
        releasing = set(top._releasing)
        assert len(set(held)) == len(held)
        assert not (set(held) & free) and not (set(held) & releasing) and not (free & releasing)
        assert all(0 <= s < top.slots_end for s in [*held, *free, *releasing])
        assert len(held) + len(free) + len(releasing) == top.slots_end
        size = os.fstat(top._fd).st_size
        assert size <= (top.slots_end + 17) * self.v.region_size + 4096

    @invariant()
    def image_equals_model(self) -> None:
        if self.vol is not None:
            assert self.v.read(0, self.size) == self.model

    @invariant()
    def open_images_equal_their_snapshots(self) -> None:
        for sid, img in self.images.items():
            self.check_image(img, self.snaps[sid])


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class PurePythonMachine(VolumeMachine):
    """The same machine with the pure-Python core behind the volume."""

    core = _core_py


TestVolumeMachine = VolumeMachine.TestCase
TestVolumeMachine.settings = SETTINGS
TestPurePythonMachine = PurePythonMachine.TestCase
TestPurePythonMachine.settings = settings(SETTINGS, max_examples=25)
