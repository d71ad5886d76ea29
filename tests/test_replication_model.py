"""Model-based test of replication: any sequence of writes, snapshots and reopens; afterwards every
PIT, read back in a fresh process from the store alone, equals the model at its cutoff."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import overlaycache
from overlaycache import Volume
from overlaycache.store import LocalStore

RS = 4096

READER = r"""
import json, sys
from overlaycache.store import LocalStore
store = LocalStore(sys.argv[1], prefix="p")
[vid] = store.volumes()
out = {}
for snap in store.snapshots(vid):
    with store.image(vid, snap.id) as img:
        out[snap.id] = img.read(0, img.size).hex()
print(json.dumps(out))
"""


class ReplicationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="oc-repl-model-")
        self.store = LocalStore(os.path.join(self.dir, "store"), prefix="p")
        self.vol: Volume | None = None
        self.model = bytearray()
        self.pits: dict[str, bytes] = {}

    @initialize(regions=st.integers(1, 6), tail=st.integers(0, RS - 1),
                mode=st.sampled_from(["async", "sync"]))
    def create(self, regions: int, tail: int, mode: str) -> None:
        size = regions * RS + tail
        self.mode = mode
        self.model = bytearray(size)
        self.vol = Volume.create(os.path.join(self.dir, "v"), size, region_size=RS, secondary=self.store,
                                 replication=mode, workers=3)

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        assert self.vol is not None
        size = len(self.model)
        off = data.draw(st.integers(0, size - 1))
        n = data.draw(st.integers(1, min(2 * RS, size - off)))
        payload = data.draw(st.one_of(st.binary(min_size=n, max_size=n), st.just(bytes(n))))
        self.vol.write(off, payload)
        self.model[off : off + n] = payload

    @rule(label=st.one_of(st.none(), st.text("abc", min_size=1, max_size=3)))
    def snapshot(self, label: str | None) -> None:
        assert self.vol is not None
        if label is not None and any(s.label == label for s in self.vol.snapshots()):
            label = None
        snap = self.vol.snapshot(label)
        self.pits[snap.id] = bytes(self.model)

    @rule()
    def replicate(self) -> None:
        assert self.vol is not None
        self.vol.replicate()
        assert self.vol.replication_lag.regions == 0

    @rule()
    def reopen(self) -> None:
        assert self.vol is not None
        self.vol.close()
        self.vol = Volume.open(os.path.join(self.dir, "v"), secondary=self.store)
        assert self.vol.replication == self.mode

    @precondition(lambda self: self.pits)
    @rule(data=st.data())
    def read_a_pit(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.pits)))
        with self.store.image(self.vol.id if self.vol else "", sid) as img:
            assert img.read(0, img.size) == self.pits[sid]

    @invariant()
    def volume_matches_model(self) -> None:
        if self.vol is not None:
            assert self.vol.read(0, self.vol.size) == self.model

    def teardown(self) -> None:
        try:
            if self.vol is not None:
                self.vol.close()
                env = dict(os.environ)
                env["PYTHONPATH"] = str(Path(overlaycache.__file__).parent.parent)
                out = subprocess.run([sys.executable, "-c", READER, os.path.join(self.dir, "store")],
                                     capture_output=True, env=env, cwd=self.dir, timeout=120)
                assert out.returncode == 0, out.stderr.decode()
                got = {k: bytes.fromhex(v) for k, v in json.loads(out.stdout).items()}
                assert got == self.pits
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestReplicationModel = ReplicationMachine.TestCase
TestReplicationModel.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)
