"""Crash tests: a child process writes to a volume and is killed with SIGKILL at a random moment.

The child's operations come from :func:`op_stream`, so the parent can replay them. Every byte a
write puts at volume offset ``x`` is byte ``x % 8`` of ``struct.pack("<II", region, seq)``: the
contents of a region therefore name the writes that made it, and each state a region passes through
is distinct. The child reports its progress on stdout (a file, so it never blocks):

``W n``      write ``n`` is about to be issued
``F n``      ``flush()`` returned after write ``n``
``s k n``    local snapshot number ``k`` is about to be taken after write ``n``
``S id n``   it returned the snapshot ``id`` (the snapshot also commits the overlay)
``m n``/``M n``  ``merge_down()`` is about to start / returned

After the kill the parent reopens the volume and checks that every region is whole (equal to one
state of the replay), that nothing acknowledged was lost and nothing not yet issued appeared, that
the volume as a whole is at one commit point, and that every surviving snapshot shows exactly the
image it was taken of. Each test kills the same volume several times, so recovery from a recovered
volume is exercised too.
"""

from __future__ import annotations

import bisect
import inspect
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from overlaycache.testing.kill import run_and_kill
from overlaycache.volume import Volume

RS = 4096
NREG = 12
SIZE = NREG * RS - 1000  # the last region is partial
DELAYS = [0.05, 0.2, 0.5, 1.0]  # seconds between the child's READY and SIGKILL


def op_stream(seed: int, size: int, region_size: int, snapshots: bool) -> Iterator[tuple[str, int, int]]:
    """The child's operations, reproducible from ``seed``: ``(op, offset, length)``.

    ``op`` is ``"w"`` (write ``length`` bytes at ``offset``: a whole region, a piece of one, or a
    range across two), ``"f"`` (flush), ``"s"`` (local snapshot) or ``"m"`` (merge_down); the last
    two only when ``snapshots`` is true. A commit point follows every 1 to 12 writes.
    """
    import random  # op_stream and write_data also run in the child, on their own

    rnd = random.Random(seed)
    nreg = (size + region_size - 1) // region_size
    until_commit = rnd.randint(1, 12)
    while True:
        r = rnd.randrange(nreg)
        rlen = min(region_size, size - r * region_size)
        kind = rnd.random()
        if kind < 0.6:
            yield ("w", r * region_size, rlen)
        elif kind < 0.85:
            a = rnd.randrange(rlen)
            yield ("w", r * region_size + a, rnd.randint(1, rlen - a))
        else:
            offset = r * region_size + rnd.randrange(rlen)
            yield ("w", offset, min(rnd.randint(1, 2 * region_size), size - offset))
        until_commit -= 1
        if until_commit == 0:
            until_commit = rnd.randint(1, 12)
            c = rnd.random() if snapshots else 1.0
            yield ("s", 0, 0) if c < 0.35 else ("m", 0, 0) if c < 0.7 else ("f", 0, 0)


def write_data(offset: int, length: int, seq: int, region_size: int) -> bytes:
    """The bytes write ``seq`` puts at ``[offset, offset + length)``."""
    import struct

    out = bytearray()
    pos, end = offset, offset + length
    while pos < end:
        r = pos // region_size
        intra = pos - r * region_size
        take = min(region_size - intra, end - pos)
        block = struct.pack("<II", r, seq) * (region_size // 8)
        out += block[intra : intra + take]
        pos += take
    return bytes(out)


CHILD = (
    "from __future__ import annotations\n"
    + inspect.getsource(op_stream)
    + inspect.getsource(write_data)
    + '''
import sys
from overlaycache import Volume

path, seed, start, snapshots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
vol = Volume.open(path)


def say(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()


say("READY")
seq, snap_no = start, 0
for op, offset, length in op_stream(seed, vol.size, vol.region_size, snapshots):
    if op == "w":
        seq += 1
        data = write_data(offset, length, seq, vol.region_size)
        say(f"W {seq}")
        vol.write(offset, data)
    elif op == "f":
        vol.flush()
        say(f"F {seq}")
    elif op == "s":
        snap_no += 1
        say(f"s {snap_no} {seq}")
        snap = vol.local_snapshot()
        say(f"S {snap.id} {seq}")
    else:
        say(f"m {seq}")
        vol.merge_down()
        say(f"M {seq}")
'''
)


# -- the parent's side ---------------------------------------------------------------------------
@dataclass
class ChildLog:
    """What the child reported before it died (complete lines only)."""

    last_write: int  # the last write that may have been issued
    durable: int  # every write up to this one was acknowledged as durable
    events: list[tuple[str, str, int]] = field(default_factory=list)  # ("S", id, seq) / ("M", "", seq)
    inflight: tuple[str, int] | None = None  # ("s", seq) or ("m", seq) cut short by the kill


def parse_log(text: str, start: int) -> ChildLog:
    """Read the child's report; a last line without its newline was cut by the kill."""
    lines = text.split("\n")[:-1]
    assert lines and lines[0] == "READY", text[:200]
    log = ChildLog(start, start)
    for line in lines[1:]:
        tag, *rest = line.split()
        if tag == "W":
            log.last_write = int(rest[0])
        elif tag == "F":
            log.durable = int(rest[0])
        elif tag in ("s", "m"):
            log.inflight = (tag, int(rest[-1]))
        elif tag == "S":
            log.events.append(("S", rest[0], int(rest[1])))
            log.durable = int(rest[1])
            log.inflight = None
        elif tag == "M":
            log.events.append(("M", "", int(rest[0])))
            log.inflight = None
        else:  # pragma: no cover - a garbled report
            raise AssertionError(f"unexpected line {line!r}")
    return log


def region_length(r: int) -> int:
    """Bytes in region ``r``."""
    return min(RS, SIZE - r * RS)


class Replay:
    """Every state each region passes through in the child's run, from the state it started in.

    The initial state of a round is labelled ``start``; the writes of the round are ``start + 1``,
    ``start + 2``, ... up to ``last``.
    """

    def __init__(self, seed: int, start: int, last: int, snapshots: bool, initial: list[bytes]) -> None:
        self.start = start
        self.contents: list[dict[int, bytes]] = [{start: c} for c in initial]
        # A piece of a write may leave a region unchanged (it rewrote equal bytes), so one content
        # can be the state after several writes.
        self.index: list[dict[bytes, list[int]]] = [{c: [start]} for c in initial]
        self.touched: list[list[int]] = [[start] for _ in initial]
        self.commits = [start]  # positions (write counts) of the commit points
        cur = [bytearray(c) for c in initial]
        seq = start
        for op, offset, length in op_stream(seed, SIZE, RS, snapshots):
            if op != "w":
                self.commits.append(seq)
                continue
            if seq == last:
                break
            seq += 1
            data = write_data(offset, length, seq, RS)
            pos, end = offset, offset + length
            while pos < end:
                r = pos // RS
                take = min((r + 1) * RS, end) - pos
                cur[r][pos - r * RS : pos - r * RS + take] = data[pos - offset : pos - offset + take]
                state = bytes(cur[r])
                self.contents[r][seq] = state
                self.index[r].setdefault(state, []).append(seq)
                self.touched[r].append(seq)
                pos += take

    def version_at(self, r: int, seq: int) -> int:
        """The write that region ``r`` holds after write ``seq`` (``start`` when none yet)."""
        t = self.touched[r]
        return t[bisect.bisect_right(t, seq) - 1]

    def image_at(self, seq: int) -> bytes:
        """The whole image after write ``seq``."""
        return b"".join(self.contents[r][self.version_at(r, seq)] for r in range(NREG))


def run_child(path: Path, out: Path, seed: int, start: int, snapshots: bool, delay: float) -> str:
    """Run the child on ``path`` until ``delay`` seconds after it is ready, then SIGKILL it."""
    return run_and_kill(CHILD, [str(path), str(seed), str(start), str(int(snapshots))], out, delay, 30.0)


def check_volume(vol: Volume, rep: Replay, log: ChildLog) -> None:
    """The reopened volume: whole regions, within bounds, all at one commit point."""
    got = [vol.read(r * RS, region_length(r)) for r in range(NREG)]
    for r, data in enumerate(got):
        seqs = rep.index[r].get(data)
        assert seqs is not None, f"region {r} is torn or holds data never written: {data[:16].hex()}"
        low = rep.version_at(r, log.durable)
        # The replay stops at the last write the child may have issued: nothing later can match.
        assert max(seqs) >= low, f"region {r}: write {low} was flushed but the region holds {seqs}"
    points = [k for k in rep.commits if log.durable <= k <= log.last_write]
    assert any(all(got[r] == rep.contents[r][rep.version_at(r, k)] for r in range(NREG)) for k in points), (
        f"regions hold versions {[rep.index[r][got[r]] for r in range(NREG)]}: "
        f"not the state of any commit point in {points}"
    )


def fresh_volume(tmp_path: Path) -> Path:
    """An all-zero volume, closed."""
    path = tmp_path / "vol"
    Volume.create(path, SIZE, region_size=RS).close()
    return path


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_during_writes_and_flushes(tmp_path: Path, seed: int) -> None:
    """Killed at any moment, the volume reopens at a commit point with every flushed write."""
    path = fresh_volume(tmp_path)
    delays = random.Random(seed).sample(DELAYS, len(DELAYS))
    initial = [bytes(region_length(r)) for r in range(NREG)]
    start = 0
    for rnd, delay in enumerate(delays):
        child_seed = seed * 1000 + rnd
        log = parse_log(run_child(path, tmp_path / f"child-{rnd}.out", child_seed, start, False, delay), start)
        rep = Replay(child_seed, start, log.last_write, False, initial)
        with Volume.open(path) as vol:
            check_volume(vol, rep, log)
            assert vol.local_snapshots() == []
            initial = [vol.read(r * RS, region_length(r)) for r in range(NREG)]
        start = log.last_write
    assert start > 0, "the children wrote nothing before they were killed"


def test_sigkill_right_after_open(tmp_path: Path) -> None:
    """A child killed right away leaves a volume that opens, with every region whole."""
    path = fresh_volume(tmp_path)
    log = parse_log(run_child(path, tmp_path / "child.out", 99, 0, False, 0.0), 0)
    rep = Replay(99, 0, log.last_write, False, [bytes(region_length(r)) for r in range(NREG)])
    with Volume.open(path) as vol:
        check_volume(vol, rep, log)


@pytest.mark.parametrize("seed", [11, 12])
def test_sigkill_during_snapshots_and_merges(tmp_path: Path, seed: int) -> None:
    """Killed inside local_snapshot()/merge_down() loops, the volume reopens (finishing a merge) and
    every snapshot that must survive does, showing exactly the image it was taken of."""
    path = fresh_volume(tmp_path)
    delays = random.Random(seed).sample(DELAYS, len(DELAYS))
    initial = [bytes(region_length(r)) for r in range(NREG)]
    images: dict[str, bytes] = {}  # surviving snapshot id -> its image
    layers: list[str | None] = [None]  # the snapshot of each overlay, oldest first
    base: str | None = None  # the snapshot whose image is the base alone
    start = 0
    done: set[str] = set()  # kinds of events the children completed
    for rnd, delay in enumerate(delays):
        child_seed = seed * 1000 + rnd
        log = parse_log(run_child(path, tmp_path / f"child-{rnd}.out", child_seed, start, True, delay), start)
        rep = Replay(child_seed, start, log.last_write, True, initial)
        done.update(tag for tag, _, _ in log.events)
        # What the reported events did to the layer stack and the snapshots.
        for tag, sid, seq in log.events:
            if tag == "S":
                assert sid not in images
                images[sid] = rep.image_at(seq)
                layers[-1] = sid
                layers.append(None)
            else:
                if len(layers) == 1:
                    layers.append(None)
                if base is not None:
                    del images[base]
                base = layers.pop(0)
        may_drop = base if log.inflight is not None and log.inflight[0] == "m" else None
        with Volume.open(path) as vol:
            check_volume(vol, rep, log)
            found = {s.id: s for s in vol.local_snapshots()}
            missing = set(images) - set(found) - {may_drop}
            assert not missing, f"snapshots {missing} were lost"
            extra = set(found) - set(images)
            if extra:
                assert log.inflight is not None and log.inflight[0] == "s" and len(extra) == 1, extra
                images[extra.pop()] = rep.image_at(log.inflight[1])
            for sid in list(images):
                if sid not in found:
                    del images[sid]  # dropped by the merge cut short (finished on open)
                    continue
                with vol.image(sid) as img:
                    assert img.read(0, SIZE) == images[sid], f"image of snapshot {sid}"
            # Start the next round from the stack as it is now (ids of the overlays, oldest first).
            by_layer = {s.layer: s.id for s in found.values()}
            base = by_layer.get(0)
            layers = [by_layer.get(ov.id) for ov in vol._layers.overlays]
            assert layers[-1] is None
            initial = [vol.read(r * RS, region_length(r)) for r in range(NREG)]
        start = log.last_write
    assert done == {"S", "M"}, "the children took no snapshot or merged nothing before they were killed"
