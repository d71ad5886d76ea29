"""Crash tests of replication: a child process writes to a volume replicating to a store, takes
PIT snapshots, and is killed with SIGKILL at a random moment (while packing, shipping a pack,
storing map pages or a root). The parent reopens the volume with the same store and checks:

* every PIT whose ``snapshot()`` returned in the child reads, from the store alone, exactly as the
  volume read when it returned;
* every PIT the store lists (also one whose root landed just before the kill) reads whole: no
  missing page or pack, no checksum mismatch;
* a PIT taken after the reopen is exactly the reopened volume (what was shipped but never flushed
  locally is not left on the secondary as the newest version).

The same volume is killed several times, so recovery from a recovered volume is exercised too.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from overlaycache import LocalStore, Volume
from overlaycache.testing.kill import complete_lines, run_and_kill

RS = 4096
NREG = 96
SIZE = NREG * RS

CHILD = r"""
import hashlib, random, struct, sys
from overlaycache import LocalStore, Volume
from overlaycache.testing.kill import complete_lines, run_and_kill
path, store_dir, mode, seed, start = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
RS, NREG = 4096, 96
kw = {"period": 0.05} if mode == "periodic" else {"pack_delay": 0.01}
vol = Volume.open(path, secondary=LocalStore(store_dir), replication=mode, pack_size=1 << 20, **kw)
rnd = random.Random(seed)
print("READY", flush=True)
i = start
while True:
    i += 1
    r = rnd.randrange(NREG)
    n = rnd.choice([1, 1, 2, 5])
    n = min(n, NREG - r)
    vol.write(r * RS, struct.pack("<II", i, r) * (n * RS // 8))
    if i % 4 == 0:
        vol.flush()
        print(f"F {i}", flush=True)
    if i % 15 == 0:
        snap = vol.snapshot()
        print(f"S {snap.id} {hashlib.sha256(vol.read(0, NREG * RS)).hexdigest()}", flush=True)
"""


def run_child(path: Path, store_dir: Path, out: Path, mode: str, seed: int, start: int, delay: float) -> str:
    return run_and_kill(CHILD, [str(path), str(store_dir), mode, str(seed), str(start)], out, delay)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("mode", "seed"), [("async", 1), ("async", 2), ("periodic", 3), ("sync", 4)])
def test_sigkill_while_replicating(tmp_path: Path, mode: str, seed: int) -> None:
    path, store_dir = tmp_path / "vol", tmp_path / "store"
    store = LocalStore(store_dir)
    Volume.create(path, SIZE, region_size=RS, secondary=store, replication=mode,
                  **({"period": 3600.0} if mode == "periodic" else {})).close()
    rnd = random.Random(seed)
    start = 0
    reported: dict[str, str] = {}
    for round_ in range(4):
        log = run_child(path, store_dir, tmp_path / f"child-{round_}.out", mode, seed * 100 + round_, start,
                        rnd.choice([0.1, 0.3, 0.6, 1.0]))
        for line in complete_lines(log):
            parts = line.split()
            if parts[0] == "S":
                reported[parts[1]] = parts[2]
            elif parts[0] == "F":
                start = max(start, int(parts[1]))
        start += 1000  # the next child's writes are told apart from this one's
        with Volume.open(path, secondary=store) as vol:
            vid = vol.id
            listed = {s.id for s in store.snapshots(vid)}
            assert set(reported) <= listed, "a PIT whose snapshot() returned is gone"
            for sid in listed:
                with store.image(vid, sid) as img:
                    data = img.read(0, SIZE)  # every page and pack present and verified
                if sid in reported:
                    assert _sha(data) == reported[sid], f"PIT {sid} does not read as it was taken"
            snap = vol.snapshot()
            with store.image(vid, snap) as img:
                assert img.read(0, SIZE) == vol.read(0, SIZE), "the PIT after reopening is not the volume"
    assert reported, "the children published no PIT before they were killed"


SNAPSHOT_CHILD = r"""
import sys, time
from overlaycache import LocalStore, Volume
path, store_dir = sys.argv[1], sys.argv[2]
RS = 4096
# A shipper that waits an hour for a pack to fill: nothing is shipped before the kill.
vol = Volume.open(path, secondary=LocalStore(store_dir), replication="async", pack_delay=3600.0)
for r in range(0, 96, 3):
    vol.write(r * RS, bytes([r + 1]) * RS)
vol.local_snapshot("s")  # commits the writes: their write intents must be durable first
print("READY", flush=True)
time.sleep(600)
"""


def test_writes_committed_by_a_local_snapshot_are_shipped_after_a_crash(tmp_path: Path) -> None:
    """Writes never flushed but committed by a local snapshot, then SIGKILL: the reopened volume
    still knows they are not on the secondary (no comparison of every region on reopen)."""
    path, store_dir = tmp_path / "vol", tmp_path / "store"
    store = LocalStore(store_dir)
    Volume.create(path, SIZE, region_size=RS, secondary=store, replication="async").close()
    run_and_kill(SNAPSHOT_CHILD, [str(path), str(store_dir)], tmp_path / "child.out", 0.0)
    with Volume.open(path, secondary=store) as vol:
        want = b"".join((bytes([r + 1]) if r % 3 == 0 else b"\0") * RS for r in range(NREG))
        assert vol.read(0, SIZE) == want
        assert vol.replication_lag.regions == NREG // 3
        snap = vol.snapshot()
        with store.image(vol.id, snap) as img:
            assert img.read(0, SIZE) == want
