"""Model-based test of the distributed overlay (DESIGN.md §3-5, Figs. 3B-3F).

A hypothesis state machine drives a Volume replicated (async) to a LocalStore while regions fail,
the distributed overlay begins, writes keep landing (also partial writes to regions read from the
remote PIT), PITs are read back as recovery images, diffed and restored, and the volume is closed
and reopened. A plain model (the volume's bytes, the bytes of every PIT, the unavailable regions and
the regions written since the distributed overlay began) predicts every read, every location code,
every diff and every restore. Clones of PITs are written and read beside all this: each has its own
bytes in the model, and nothing done to the volume changes them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from overlaycache import Clone, Volume
from overlaycache.errors import VolumeClosedError
from overlaycache.store import LocalStore

RS = 4096


class FailoverMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="oc-failover-model-")
        self.store = LocalStore(os.path.join(self.dir, "store"), prefix="p")
        self.path = os.path.join(self.dir, "v")
        self.vol: Volume | None = None
        self.model = bytearray()
        self.nregions = 0
        self.pits: dict[str, bytes] = {}  # PIT snapshot id -> the volume's bytes at that PIT
        self.unavail: set[int] = set()  # regions declared unavailable
        self.do_active = False  # a distributed overlay is active
        self.do_written: set[int] = set()  # regions written since it began (PO)
        self.do_base = b""  # the model when it began (== its PIT snapshot)
        self.do_snapshot_id: str | None = None
        self.unsynced: set[int] = set()  # regions written since the last complete replication
        self.clones: dict[str, tuple[Clone, bytearray]] = {}  # directory -> open clone, its bytes
        self.made = 0

    # -- helpers ------------------------------------------------------------------------------------
    def _span(self, r: int) -> slice:
        return slice(r * RS, min((r + 1) * RS, len(self.model)))

    def _regions_of(self, off: int, n: int) -> set[int]:
        return set(range(off // RS, (off + n - 1) // RS + 1))

    def _live(self) -> Volume:
        assert self.vol is not None
        return self.vol

    def _expected_locations(self) -> list[str]:
        out = []
        for r in range(self.nregions):
            if self.do_active and r in self.do_written:
                out.append("PO")
            elif r in self.unavail:
                out.append("R")
            else:
                out.append("PB")
        return out

    def _expected_diff(self, sid: str) -> list[int]:
        pit = self.pits[sid]
        out = []
        for r in range(self.nregions):
            span = self._span(r)
            remote_only = r in self.unavail and not (self.do_active and r in self.do_written)
            if remote_only or pit[span] != self.model[span]:
                out.append(r)
        return out

    def _began(self, vol: Volume, unavailable_now: set[int], replicated_first: bool) -> None:
        """The distributed overlay has just begun: check it and bring the model up to date."""
        do = vol.distributed_overlay
        assert do is not None
        lost = set(do["lost"])
        # Only unsynced regions that cannot be read are lost.
        assert lost <= unavailable_now, (lost, unavailable_now)
        assert lost <= self.unsynced, (lost, self.unsynced)
        if replicated_first:
            assert lost == set()
        sid = do["snapshot_id"]
        with vol.secondary.image(vol.id, sid) as pit:
            content = pit.read(0, pit.size)
        if lost:
            event("unsynced unavailable regions lost")
        for r in lost:  # their newest copy is the last replicated one
            span = self._span(r)
            self.model[span] = content[span]
        assert content == bytes(self.model)
        self.do_active = True
        self.do_written = set()
        self.do_base = bytes(self.model)
        self.do_snapshot_id = sid
        self.pits[sid] = bytes(self.model)
        self.unsynced = set()

    # -- setup ----------------------------------------------------------------------------------------
    @initialize(nregions=st.integers(2, 8), tail=st.one_of(st.just(RS), st.integers(1, RS - 1)))
    def create(self, nregions: int, tail: int) -> None:
        size = (nregions - 1) * RS + tail
        self.nregions = nregions
        self.model = bytearray(size)
        self.vol = Volume.create(self.path, size, region_size=RS, secondary=self.store, replication="async",
                                 workers=3)
        assert self.vol.num_regions == nregions

    # -- data path ------------------------------------------------------------------------------------
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        vol = self._live()
        size = len(self.model)
        off = data.draw(st.integers(0, size - 1), label="offset")
        n = data.draw(st.integers(1, min(2 * RS, size - off)), label="length")
        payload = data.draw(st.one_of(st.binary(min_size=n, max_size=n), st.just(bytes(n))), label="payload")
        # Must work in every location, including partial writes to R regions (the rest of the
        # region comes from the remote PIT).
        if self.do_active:
            for r in self._regions_of(off, n):
                span = self._span(r)
                whole = off <= span.start and off + n >= span.stop
                if r in self.unavail and r not in self.do_written:
                    event("write to an R region: " + ("whole" if whole else "partial"))
        assert vol.write(off, payload) == n
        self.model[off : off + n] = payload
        touched = self._regions_of(off, n)
        self.unsynced |= touched
        if self.do_active:
            self.do_written |= touched

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        vol = self._live()
        size = len(self.model)
        off = data.draw(st.integers(0, size), label="offset")
        n = data.draw(st.integers(0, min(2 * RS + 1, size - off)), label="length")
        assert vol.read(off, n) == bytes(self.model[off : off + n])

    @rule(data=st.data())
    def readinto(self, data: st.DataObject) -> None:
        vol = self._live()
        size = len(self.model)
        off = data.draw(st.integers(0, size - 1), label="offset")
        n = data.draw(st.integers(1, min(3 * RS, size - off)), label="length")
        pad = data.draw(st.integers(0, 7), label="pad")
        buf = bytearray(b"\xee" * (n + 2 * pad))
        assert vol.readinto(off, memoryview(buf)[pad : pad + n]) == n
        assert buf[pad : pad + n] == self.model[off : off + n]
        assert buf[:pad] == b"\xee" * pad and buf[pad + n :] == b"\xee" * pad

    # -- replication ----------------------------------------------------------------------------------
    @rule()
    def replicate(self) -> None:
        vol = self._live()
        vol.replicate()
        assert vol.replication_lag.regions == 0
        self.unsynced = set()

    @rule(label=st.one_of(st.none(), st.text("abc", min_size=1, max_size=3)))
    def snapshot(self, label: str | None) -> None:
        vol = self._live()
        if label is not None and any(s.label == label for s in vol.snapshots()):
            label = None
        snap = vol.snapshot(label)
        assert snap.label == label
        self.pits[snap.id] = bytes(self.model)
        self.unsynced = set()
        with vol.secondary.image(vol.id, snap.id) as pit:
            assert pit.read(0, pit.size) == self.model

    # -- failures and the distributed overlay ----------------------------------------------------------
    @rule(data=st.data())
    def fail_regions(self, data: st.DataObject) -> None:
        vol = self._live()
        regions = data.draw(st.sets(st.integers(0, self.nregions - 1), min_size=1), label="regions")
        if not self.do_active:
            replicate_first = data.draw(st.sampled_from([True, True, True, False]), label="replicate_first")
            if replicate_first:
                vol.replicate()
                self.unsynced = set()
            else:
                # Rewrite some of the failing regions just before they fail, so that some are
                # still unsynced (lost) when the distributed overlay begins: a race with the
                # background shipper, whose outcome the model takes from the PIT.
                rewrite = data.draw(st.sets(st.sampled_from(sorted(regions))), label="rewrite")
                for r in sorted(rewrite):
                    span = self._span(r)
                    payload = data.draw(st.binary(min_size=span.stop - span.start,
                                                  max_size=span.stop - span.start), label="payload")
                    vol.write(span.start, payload)
                    self.model[span] = payload
                    self.unsynced.add(r)
            vol.mark_unavailable(sorted(regions))
            self.unavail |= regions
            self._began(vol, regions, replicate_first)
        else:
            before = vol.distributed_overlay
            vol.mark_unavailable(sorted(regions))
            assert vol.distributed_overlay == before  # the same distributed overlay goes on
            for r in regions - self.do_written:
                # PB -> R: now read from the PIT, which holds the model as of when the overlay
                # began for this region (it has not been written since).
                span = self._span(r)
                self.model[span] = self.do_base[span]
            self.unavail |= regions
        assert vol.unavailable == frozenset(self.unavail)

    @rule()
    def begin_distributed_overlay(self) -> None:
        vol = self._live()
        snap = vol.begin_distributed_overlay()
        if self.do_active:
            assert snap.id == self.do_snapshot_id  # idempotent
        else:
            self._began(vol, set(), False)
            assert snap.id == self.do_snapshot_id

    @rule()
    def location_map(self) -> None:
        vol = self._live()
        expected = self._expected_locations()
        assert vol.location_map() == expected
        if self.nregions > 1:
            assert vol.location_map(1, self.nregions - 1) == expected[1:]

    # -- recovery -------------------------------------------------------------------------------------
    @precondition(lambda self: self.pits)
    @rule(data=st.data())
    def image_and_diff(self, data: st.DataObject) -> None:
        vol = self._live()
        sid = data.draw(st.sampled_from(sorted(self.pits)), label="pit")
        want = self.pits[sid]
        with vol.image(sid) as img:
            assert img.size == len(want)
            assert img.read(0, img.size) == want
            off = data.draw(st.integers(0, img.size - 1), label="offset")
            n = data.draw(st.integers(1, img.size - off), label="length")
            buf = bytearray(n)
            assert img.readinto(off, buf) == n
            assert buf == want[off : off + n]
        assert vol.diff(sid) == self._expected_diff(sid)
        other = data.draw(st.sampled_from(sorted(self.pits)), label="other pit")
        assert vol.diff(sid, other) == [
            r for r in range(self.nregions) if want[self._span(r)] != self.pits[other][self._span(r)]]

    @precondition(lambda self: self.pits)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        vol = self._live()
        sid = data.draw(st.sampled_from(sorted(self.pits)), label="pit")
        expected = self._expected_diff(sid)
        event(f"restore with a distributed overlay: {self.do_active}")
        rewritten = vol.restore(sid)
        assert rewritten == expected
        self.model = bytearray(self.pits[sid])
        self.unsynced |= set(rewritten)
        self.unavail = set()
        self.do_active = False
        self.do_written = set()
        self.do_base = b""
        self.do_snapshot_id = None
        assert vol.distributed_overlay is None
        assert vol.unavailable == frozenset()
        assert vol.location_map() == ["PB"] * self.nregions
        assert vol.layer_map() == [0] * self.nregions  # folded into the base
        assert vol.diff(sid) == []

    @precondition(lambda self: self.do_active)
    @rule()
    def hydrate(self) -> None:
        vol = self._live()
        remote = {r for r, code in enumerate(self._expected_locations()) if code == "R"}
        hyd = vol.hydrate()
        event(f"hydrated {'some' if remote else 'no'} regions")
        assert (hyd.total, hyd.installed, hyd.error) == (len(remote), len(remote), None)
        self.do_written |= remote  # local now, not shipped: the secondary has these versions

    # -- clones of PITs ---------------------------------------------------------------------------------
    @precondition(lambda self: self.pits and len(self.clones) < 2)
    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        vol = self._live()
        sid = data.draw(st.sampled_from(sorted(self.pits)), label="pit")
        self.made += 1
        path = os.path.join(self.dir, f"clone-{self.made}")
        event(f"clone of a PIT with a distributed overlay: {self.do_active}")
        img = vol.image(sid)
        img.clone(path).close()
        img.close()
        self.clones[path] = (vol.open_clone(path), bytearray(self.pits[sid]))

    @precondition(lambda self: self.clones)
    @rule(data=st.data())
    def clone_write(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.clones)), label="clone")
        clone, model = self.clones[path]
        off = data.draw(st.integers(0, len(model) - 1), label="offset")
        n = data.draw(st.integers(1, min(2 * RS, len(model) - off)), label="length")
        payload = data.draw(st.binary(min_size=n, max_size=n), label="payload")
        if any(r not in clone.written for r in (off // RS, (off + n - 1) // RS)) and (off % RS or n % RS):
            event("clone write: partial, to a region not in the clone")
        assert clone.write(off, payload) == n
        model[off : off + n] = payload
        if data.draw(st.booleans(), label="flush"):
            clone.flush()

    @precondition(lambda self: self.clones)
    @rule(data=st.data())
    def clone_read(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.clones)), label="clone")
        clone, model = self.clones[path]
        off = data.draw(st.integers(0, len(model)), label="offset")
        n = data.draw(st.integers(0, min(2 * RS + 1, len(model) - off)), label="length")
        assert clone.read(off, n) == model[off : off + n]
        changed = [r for r in sorted(clone.written)
                   if bytes(model[self._span(r)]) != clone.image.read(r * RS, len(model[self._span(r)]))]
        assert clone.diff() == changed

    @precondition(lambda self: self.clones)
    @rule(data=st.data())
    def clone_reopen(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.clones)), label="clone")
        clone, model = self.clones.pop(path)
        clone.close()
        if data.draw(st.booleans(), label="keep"):
            self.clones[path] = (self._live().open_clone(path), model)

    @rule()
    def reopen(self) -> None:
        vol = self._live()
        do_before = vol.distributed_overlay
        event(f"reopen with a distributed overlay: {do_before is not None}")
        locations = vol.location_map()
        vol.close()
        self.vol = None
        event(f"reopen with {len(self.clones)} clones open")
        for clone, _model in self.clones.values():
            try:
                clone.read(0, 1)
                raise AssertionError("a clone read through the image of a closed volume")
            except VolumeClosedError:
                pass
            clone.close()
        self.vol = vol = Volume.open(self.path, secondary=self.store)
        self.clones = {path: (vol.open_clone(path), model) for path, (_clone, model) in self.clones.items()}
        assert vol.replication == "async"
        assert vol.distributed_overlay == do_before
        assert vol.unavailable == frozenset(self.unavail)
        assert vol.location_map() == locations

    # -- invariants -----------------------------------------------------------------------------------
    @invariant()
    def volume_matches_model(self) -> None:
        if self.vol is None:
            return
        vol = self.vol
        assert vol.read(0, vol.size) == self.model
        assert vol.unavailable == frozenset(self.unavail)
        do: dict[str, Any] | None = vol.distributed_overlay
        assert (do is not None) == self.do_active
        if do is not None:
            assert do["snapshot_id"] == self.do_snapshot_id

    @invariant()
    def clones_match_model(self) -> None:
        if self.vol is None:
            return
        for clone, model in self.clones.values():
            assert clone.read(0, clone.size) == model

    def teardown(self) -> None:
        try:
            for clone, _model in self.clones.values():
                clone.close()
            if self.vol is not None:
                self.vol.close()
        finally:
            self.vol = None
            shutil.rmtree(self.dir, ignore_errors=True)


TestFailoverModel = FailoverMachine.TestCase
TestFailoverModel.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
