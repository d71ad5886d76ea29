"""Every comparison of overlaycache with its baseline in one run: ``compare.md`` and ``compare.png``.

Usage (from anywhere)::

    python bench/compare.py                  # default sizes, about 5 minutes on 2 cores
    python bench/compare.py --quick          # small sizes, about a minute (a smoke test)
    python bench/compare.py --out DIR        # where compare.md and compare.png go (default bench/results)
    python bench/compare.py --only 1,3       # some workloads only (1 reads, 2 NBD reads, 3 writes,
                                             # 4 S3 replication and PIT reads, 5 failover)
    python bench/compare.py --wait-idle 20   # first wait up to 20 min for other pytest/.ci/run jobs to end

Each comparison runs its baseline and overlaycache side by side in this one run: one untimed
warm-up round of every variant, then ``--reps`` timed rounds, the order of the variants reversed
every other round (A B, B A, ...), so that a burst of load from other jobs on the machine falls on
both sides alike. A row reports the median round of each side, and its ratio is computed from
those medians: baseline time / overlaycache time for the same work, which is overlaycache's
throughput / the baseline's. Above 1, overlaycache is faster. The range beside it is the lowest and
highest ratio of the rounds paired by index (the noise).

Before any timing, every path is checked once: the bytes it reads (or wrote and reads back) are
compared with the expected image, so that a broken path cannot look fast.

Workloads
---------
1. Virtual-image reads in process: a volume whose regions come from the base (half), an older
   overlay (a quarter) and the top overlay (a quarter), read with ``Volume.readinto`` into a
   page-aligned buffer; baseline: the same bytes in a plain file written with ``write()``, mapped
   and copied through a memoryview into the same kind of buffer (``bench/test_bench_read.py``).
2. The same reads over NBD, the same clients, each server in its own process on a Unix socket (and
   once on loopback TCP): ``qemu-nbd -r`` serving an equivalent qcow2 backing chain (a raw base with
   the base bytes, and two qcow2 overlays holding exactly the regions of the volume's two overlays)
   vs ``overlaycache serve-nbd --readonly`` serving the volume. Sequential: ``nbdcopy`` to ``null:``
   (one connection, 1 MiB requests, 64 or 1 in flight, no extent queries); random: a small Python
   NBD client (``_nbdclient.py``) with one 64 KiB request in flight.
3. Writes with a flush every N writes, steady state (every target written once before the timed
   rounds): 4 KiB random (4 KiB-aligned, flush every 64 writes) and 1 MiB sequential (flush every
   8 MiB). overlaycache ``Volume.write`` + ``Volume.flush`` in process against (a) raw ``pwrite`` +
   ``fdatasync`` on a plain file and (b) ``qemu-io -t writeback`` on the top qcow2 overlay of the
   chain of workload 2 (its start-up and exit, measured in the same run, subtracted); and (c) the
   same ``qemu-io`` client through NBD (Unix sockets) to ``qemu-nbd`` (qcow2 chain, writeback cache)
   vs ``overlaycache serve-nbd`` (the volume), ``flush`` being ``NBD_CMD_FLUSH`` on both.
4. S3 (moto's server in its own process on 127.0.0.1): ``Volume.replicate()`` of every region of a
   volume changed vs plain boto3 ``put_object`` of as many objects of the same sizes as the packs
   overlaycache wrote, from a pool of as many threads; then a PIT read through ``store.image`` (1 MiB
   ``readinto``, opening the image included) vs plain boto3 ranged GETs of the same byte ranges of
   the same packs. Requests by kind and their price per GiB are in a table of their own.
5. Failover: 10% of a replicated volume's regions marked unavailable, either every tenth region or
   one contiguous run (each round on a new volume, its regions packed in the order written);
   overlaycache serves them from the PIT at once (the distributed overlay), vs restoring the whole
   PIT first: plain boto3 ranged GETs of every region written into a new raw file and
   ``fdatasync``'d, or ``store.image`` copied into a new local volume and flushed. Measured until
   the volume serves I/O, and until every region has been read and compared with the expected
   bytes.

``--quick`` shrinks every size (32 MiB images, 3 rounds); the numbers are then only a smoke test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import importlib.metadata
import itertools
import json
import logging
import math
import mmap
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:  # run by path from anywhere: the helpers beside this file
    sys.path.insert(0, HERE)

from _nbdclient import NBDClient  # noqa: E402
from _support import MiB, pattern  # noqa: E402

REGION = 64 << 10
#: In-process reads are fast: a round reads the volume this many bytes' worth, to be well above timer noise.
READ_PASS_BYTES = 1 << 30
#: S3 list prices (Standard, us-east-1) in dollars per request: LIST is billed as PUT, HEAD as GET.
PRICES = {"PUT": 0.005 / 1000, "GET": 0.0004 / 1000, "HEAD": 0.0004 / 1000, "LIST": 0.005 / 1000, "DELETE": 0.0}
KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE")
WORKERS = 16  # threads and connections of both sides of the S3 comparisons
_OTHER_JOBS = ("bash .ci/run", "pytest")

log = logging.getLogger("compare")


@dataclass(frozen=True)
class Sizes:
    """Sizes of one run."""

    image: int  #: the read volume, the write targets and the failover volume
    s3: int  #: bytes replicated and read back per round in workload 4
    small_writes: int  #: 4 KiB writes per round
    seq_write: int  #: bytes written sequentially per round
    reps: int  #: timed rounds of each variant
    flush_small: int = 64  #: 4 KiB writes between flushes
    flush_seq: int = 8  #: 1 MiB writes between flushes
    lost_pct: int = 10  #: regions marked unavailable in workload 5, in percent


DEFAULT = Sizes(image=256 * MiB, s3=128 * MiB, small_writes=4096, seq_write=64 * MiB, reps=7)
QUICK = Sizes(image=32 * MiB, s3=16 * MiB, small_writes=512, seq_write=16 * MiB, reps=3)


# -- measurement ------------------------------------------------------------------------------------

@dataclass
class Variant:
    """One side of a comparison: ``run`` is one timed round, ``setup`` its untimed preparation.

    ``run`` may return a dict of milestones (seconds since it started, measured by itself); then
    each is kept under its name and the total is the largest.
    """

    name: str
    run: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)


def alternate(variants: list[Variant], reps: int, what: str) -> None:
    """One warm-up round of each variant, then ``reps`` timed rounds, the order reversed every other
    round; garbage collection is off inside a round."""
    for i in range(reps + 1):
        order = variants if i % 2 == 0 else variants[::-1]
        for v in order:
            if v.setup is not None:
                v.setup()
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                marks = v.run()
                elapsed = time.perf_counter() - t0
            finally:
                gc.enable()
            if i == 0:
                continue  # warm-up
            if isinstance(marks, dict):
                for k, t in marks.items():
                    v.add(k, t)
                if "total" not in marks:
                    v.add("total", max(marks.values()))
            else:
                v.add("total", elapsed)
        log.info("  %s: round %d/%d", what, i, reps)


@dataclass
class Row:
    """One line of the table: the same work done by a baseline and by overlaycache."""

    workload: str
    short: str  #: the label on the chart
    baseline: str
    ours: str
    base_times: list[float]
    ours_times: list[float]
    #: work per round (bytes or operations) for a rate; None: the row reports the time itself
    work: float | None
    unit: str

    def value(self, times: list[float]) -> float:
        med = statistics.median(times)
        if self.work is None:
            return med
        scale = MiB if self.unit == "MiB/s" else 1
        return self.work / med / scale

    @property
    def ratio(self) -> float:
        """Baseline time / overlaycache time (medians): above 1, overlaycache is faster."""
        return statistics.median(self.base_times) / statistics.median(self.ours_times)

    @property
    def ratio_range(self) -> tuple[float, float]:
        pairs = [b / o for b, o in zip(self.base_times, self.ours_times)]
        return min(pairs), max(pairs)


@dataclass
class Cost:
    """Requests of one side of an S3 workload (per round) and the bytes of data it concerns."""

    workload: str
    side: str
    requests: dict[str, int]
    data_bytes: int
    #: payload bytes sent (PUT) and received (GET) by the requests
    moved: int

    @property
    def dollars(self) -> float:
        return sum(PRICES[k] * n for k, n in self.requests.items())

    @property
    def per_gib(self) -> float:
        return self.dollars / (self.data_bytes / (1 << 30))


@dataclass
class Results:
    """Everything the report shows."""

    rows: list[Row] = field(default_factory=list)
    costs: list[Cost] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def row(self, workload: str, short: str, base: Variant, ours: Variant, baseline: str, ours_desc: str,
            work: float | None, unit: str, key: str = "total") -> None:
        self.rows.append(Row(workload, short, baseline, ours_desc, base.times[key], ours.times[key], work, unit))


# -- helpers ---------------------------------------------------------------------------------------

def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(cmd, check=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env() -> dict[str, str]:
    """The environment of the servers started: no OVERLAYCACHE_* defaults from the caller's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYCACHE_")}


def _stop(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _wait_nbd(url: str, proc: subprocess.Popen[Any], logfile: str, timeout: float = 20) -> None:
    """Wait until an NBD server answers a handshake (a probe that does one properly)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"NBD server exited ({proc.returncode}): {_tail(logfile)}")
        try:
            NBDClient.from_url(url).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


@contextmanager
def qemu_nbd(image: str, fmt: str, readonly: bool, logdir: str, tcp: bool = False) -> Iterator[str]:
    """``qemu-nbd`` serving ``image`` (persistent, writeback cache) on a Unix socket in ``logdir``, or
    on a free loopback TCP port; its URL."""
    tag = uuid.uuid4().hex[:6]
    logfile = os.path.join(logdir, f"qemu-nbd-{tag}.log")
    for attempt in range(3):
        cmd = ["qemu-nbd", "-t", "-e", "8", "-f", fmt, "--cache=writeback", *(["-r"] if readonly else [])]
        if tcp:
            port = _free_port()
            cmd += ["-b", "127.0.0.1", "-p", str(port)]
            url = f"nbd://127.0.0.1:{port}"
        else:
            path = os.path.join(logdir, f"qemu-nbd-{tag}.sock")
            cmd += ["-k", path]
            url = f"nbd+unix:///?socket={path}"
        with open(logfile, "ab") as logf:
            proc = subprocess.Popen([*cmd, image], stdout=logf, stderr=logf)
        try:
            _wait_nbd(url, proc, logfile)
        except (OSError, RuntimeError):
            _stop(proc)
            if attempt == 2 or not tcp:  # a TCP port taken meanwhile is worth another try
                raise
            continue
        try:
            yield url
        finally:
            _stop(proc)
        return


@contextmanager
def serve_nbd(volume: str, readonly: bool, logdir: str, tcp: bool = False) -> Iterator[str]:
    """``overlaycache serve-nbd`` in its own process, on a Unix socket in ``logdir`` or on a free
    loopback TCP port; its URL."""
    tag = uuid.uuid4().hex[:6]
    logfile = os.path.join(logdir, f"serve-nbd-{tag}.log")
    cmd = [sys.executable, "-m", "overlaycache", "serve-nbd", volume, *(["--readonly"] if readonly else [])]
    cmd += ["--port", "0"] if tcp else ["--socket", os.path.join(logdir, f"serve-nbd-{tag}.sock")]
    with open(logfile, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, env=_child_env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if " at nbd" not in line:
            raise RuntimeError(f"serve-nbd did not start: {line!r} {_tail(logfile)}")
        url = line.rsplit(" at ", 1)[1].strip()
        _wait_nbd(url, proc, logfile)
        yield url
    finally:
        _stop(proc)
        if proc.returncode not in (0, None):
            raise RuntimeError(f"serve-nbd exited with {proc.returncode}: {_tail(logfile)}")


@contextmanager
def moto_server(logdir: str) -> Iterator[str]:
    """moto's S3 server in its own process on a free loopback port; its endpoint URL."""
    from s3bench import _wait

    port = _free_port()
    logfile = os.path.join(logdir, "moto.log")
    with open(logfile, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=logf, stderr=logf)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url)
        yield url
    finally:
        _stop(proc)


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)


def _compare(what: str, got: Any, expected: Any) -> None:
    if got != expected:
        raise AssertionError(f"{what}: the bytes read differ from the expected image")


def other_jobs() -> list[str]:
    """Other test or CI jobs running on the machine (not this process, its parents or children)."""
    mine = {os.getpid()}
    pid = os.getppid()
    while pid > 1:  # our ancestors: a pytest that runs this file is not "another job"
        mine.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for pat in _OTHER_JOBS:
        out = subprocess.run(["pgrep", "-af", pat], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid_s, _, cmd = line.partition(" ")
            if int(pid_s) in mine or "pgrep" in cmd or os.path.basename(__file__) in cmd:
                continue
            found.append(f"{pid_s} {cmd[:100]}")
    return sorted(set(found))


def wait_idle(minutes: float) -> bool:
    """Poll every 30 s (up to ``minutes``) until no other job runs; True if it became idle."""
    deadline = time.monotonic() + minutes * 60
    while True:
        jobs = other_jobs()
        if not jobs:
            return True
        if time.monotonic() >= deadline:
            log.warning("still busy after %.0f min: %s", minutes, "; ".join(jobs))
            return False
        log.info("waiting for other jobs to end: %s", "; ".join(jobs))
        time.sleep(30)


def note_load(res: Results, when: str) -> None:
    """Record the load average and the other jobs running, at a workload boundary."""
    jobs = other_jobs()
    la = os.getloadavg()
    res.load.append(f"{when}: load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; other jobs: "
                    + ("; ".join(jobs) if jobs else "none"))


# -- workload 1: virtual-image reads ---------------------------------------------------------------

@dataclass
class ReadSetup:
    """The read volume of workloads 1-3 and the plain files beside it."""

    root: str
    volume: str
    plain: str  #: the expected image, written with write()
    base_raw: str  #: the base's bytes alone (the qcow2 chain's base)
    state_a: str  #: the image after the older overlay (used once to build the chain)
    expected: bytes
    size: int
    layers: dict[int, int]


def build_read_volume(root: str, size: int) -> ReadSetup:
    """Base filled, 25% of the regions rewritten in an older overlay, another 25% in the top one."""
    from overlaycache import Volume

    n = size // REGION
    base = pattern(b"base", size)
    image = bytearray(base)
    vpath = os.path.join(root, "volume")
    state_a = b""
    with Volume.create(vpath, size, region_size=REGION) as vol:
        vol.write(0, base)
        vol.merge_down()  # the base absorbs the data (an empty overlay is pushed first)
        order = list(range(n))
        random.Random(20240501).shuffle(order)
        for tag, regions in ((b"overlay-a", order[: n // 4]), (b"overlay-b", order[n // 4 : n // 2])):
            data = pattern(tag, len(regions) * REGION)
            for k, r in enumerate(sorted(regions)):
                piece = data[k * REGION : (k + 1) * REGION]
                vol.write(r * REGION, piece)
                image[r * REGION : (r + 1) * REGION] = piece
            if tag == b"overlay-a":
                vol.local_snapshot("bench-a")
                state_a = bytes(image)
        vol.flush()
        layers = vol.layer_counts()
    counts = sorted((c for c in layers.values() if c), reverse=True)
    if counts != [n - 2 * (n // 4), n // 4, n // 4] or layers.get(0) != n - 2 * (n // 4):
        raise AssertionError(f"unexpected layout of the read volume: {layers}")
    paths = {}
    files: list[tuple[str, bytes | bytearray]] = [("plain.img", image), ("base.raw", base), ("state-a.raw", state_a)]
    for name, content in files:
        paths[name] = os.path.join(root, name)
        with open(paths[name], "wb") as f:
            f.write(content)
    return ReadSetup(root, vpath, paths["plain.img"], paths["base.raw"], paths["state-a.raw"], bytes(image),
                     size, layers)


def _random_offsets(size: int, n: int, seed: int = 7) -> list[int]:
    """``size // n`` pseudo-random offsets aligned to ``n`` (a fixed sequence)."""
    rng = random.Random(seed)
    count = size // n
    return [rng.randrange(count) * n for _ in range(count)]


def workload_reads(res: Results, rs: ReadSetup, sz: Sizes) -> None:
    """Workload 1: ``Volume.readinto`` vs a raw mapped file, 1 MiB sequential and 64 KiB random."""
    from overlaycache import Volume

    size = rs.size
    seq_offsets = list(range(0, size, MiB))
    rnd_offsets = _random_offsets(size, REGION)
    passes = max(1, READ_PASS_BYTES // size)  # a round reads this many times the volume's size
    fd = os.open(rs.plain, os.O_RDONLY)
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    src = memoryview(mm)
    vol = Volume.open(rs.volume, readonly=True)
    try:
        for n, offsets, label in ((MiB, seq_offsets, "1 MiB sequential"), (REGION, rnd_offsets, "64 KiB random")):
            buf = _aligned(n)
            dst = memoryview(buf)
            readinto = vol.readinto

            def raw(offsets: list[int] = offsets, dst: memoryview = dst, n: int = n) -> None:
                for _ in range(passes if len(offsets) > 1 else 1):
                    for off in offsets:
                        dst[:] = src[off : off + n]

            def ours(offsets: list[int] = offsets, buf: mmap.mmap = buf) -> None:
                for _ in range(passes if len(offsets) > 1 else 1):
                    for off in offsets:
                        readinto(off, buf)

            # Checked once before timing: every read equals the expected image.
            for name, fn in (("raw mmap", raw), ("Volume.readinto", ours)):
                for off in offsets:
                    fn([off])
                    _compare(f"{label} reads, {name}, offset {off}", buf[:], rs.expected[off : off + n])
            res.checks.append(f"{label} reads in process: every read of both sides equals the expected image")
            b, o = Variant("raw mmap", raw), Variant("Volume.readinto", ours)
            alternate([b, o], sz.reps, f"read {label}")
            res.row(f"read {label} ({size // MiB} MiB volume: base + 2 overlays), in process",
                    f"read {'1M seq' if n == MiB else '64K rand'} (in-process)", b, o,
                    "raw file, mmap + memoryview copy", "Volume.readinto", passes * len(offsets) * n, "MiB/s")
            dst.release()
            buf.close()
    finally:
        vol.close()
        src.release()
        mm.close()
        os.close(fd)


# -- workload 2: reads over NBD --------------------------------------------------------------------

def build_qcow2_chain(rs: ReadSetup) -> str:
    """base.raw <- ov1.qcow2 (the older overlay's regions) <- ov2.qcow2 (the top one's); the top's path.

    Each overlay is created over the image it must show and then rebased (safe mode) onto the layer
    below: ``qemu-img rebase`` writes into the overlay exactly the clusters where the two differ,
    through QEMU's qcow2 driver. Clusters are 64 KiB, like the volume's regions.
    """
    ov1, ov2 = os.path.join(rs.root, "ov1.qcow2"), os.path.join(rs.root, "ov2.qcow2")
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", rs.state_a, "-F", "raw", ov1])
    _run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", rs.base_raw, "-F", "raw", ov1])
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", rs.plain, "-F", "raw", ov2])
    _run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", ov1, "-F", "qcow2", ov2])
    os.unlink(rs.state_a)
    out = _run(["qemu-img", "map", "--output=json", ov2], capture_output=True).stdout
    depth: dict[int, int] = {}
    for e in json.loads(out):
        depth[e["depth"]] = depth.get(e["depth"], 0) + e["length"] // REGION
    n = rs.size // REGION
    if depth != {0: n // 4, 1: n // 4, 2: n - 2 * (n // 4)}:
        raise AssertionError(f"unexpected layout of the qcow2 chain (regions by depth): {depth}")
    return ov2


def _nbdcopy(url: str, requests: int, dest: str = "null:", **kw: Any) -> subprocess.CompletedProcess[Any]:
    return _run(["nbdcopy", "--no-extents", "--connections=1", "--request-size=1048576", f"--requests={requests}",
                 url, dest], **kw)


def _copier(url: str, requests: int) -> Callable[[], Any]:
    """One round of the sequential NBD read: ``nbdcopy`` of the whole export to ``null:``."""
    return lambda: _nbdcopy(url, requests)


def workload_nbd_reads(res: Results, rs: ReadSetup, top: str, sz: Sizes, logdir: str) -> None:
    """Workload 2: the same reads through ``qemu-nbd`` (qcow2 chain) and ``serve-nbd`` (the volume)."""
    size = rs.size
    connect: dict[str, float] = {}  # a client's connect + one read + disconnect, per server and transport
    rnd_offsets = _random_offsets(size, REGION)
    base_desc, ours_desc = "qemu-nbd -r, qcow2 chain", "overlaycache serve-nbd, volume"
    with qemu_nbd(top, "qcow2", True, logdir) as qurl, serve_nbd(rs.volume, True, logdir) as ourl:
        for name, url in (("qemu-nbd", qurl), ("serve-nbd", ourl)):
            got = _nbdcopy(url, 64, "-", capture_output=True).stdout
            _compare(f"nbdcopy from {name}", got, rs.expected)
            del got
            with NBDClient.from_url(url) as c:
                buf = bytearray(REGION)
                for off in rnd_offsets:
                    c.readinto(off, buf)
                    _compare(f"NBD random read from {name} at {off}", buf, rs.expected[off : off + REGION])
        res.checks.append("NBD reads: nbdcopy's copy of the whole image and every random 64 KiB read, from both "
                          "servers, equal the expected image")
        connect["qemu-nbd, Unix socket"] = _connect_time(qurl)
        connect["serve-nbd, Unix socket"] = _connect_time(ourl)
        for requests in (64, 1):
            b, o = Variant("qemu-nbd", _copier(qurl, requests)), Variant("serve-nbd", _copier(ourl, requests))
            alternate([b, o], sz.reps, f"NBD sequential, {requests} in flight")
            res.row(f"NBD read 1 MiB sequential, nbdcopy (1 connection, {requests} request"
                    f"{'s' if requests > 1 else ''} in flight), Unix socket", f"NBD read 1M seq QD{requests}", b, o,
                    base_desc, ours_desc, size, "MiB/s")
        clients = {"qemu-nbd": NBDClient.from_url(qurl), "serve-nbd": NBDClient.from_url(ourl)}
        buf = bytearray(REGION)
        try:
            def reader(c: NBDClient) -> Callable[[], None]:
                def run() -> None:
                    readinto = c.readinto
                    for off in rnd_offsets:
                        readinto(off, buf)
                return run

            b, o = Variant("qemu-nbd", reader(clients["qemu-nbd"])), Variant("serve-nbd", reader(clients["serve-nbd"]))
            alternate([b, o], sz.reps, "NBD random")
            res.row("NBD read 64 KiB random, Python NBD client (1 request in flight), Unix socket",
                    "NBD read 64K rand QD1", b, o, base_desc, ours_desc, len(rnd_offsets) * REGION, "MiB/s")
        finally:
            for c in clients.values():
                c.close()
    # The same over loopback TCP, once: qemu-nbd 7.2 sets no TCP_NODELAY (see the notes).
    with qemu_nbd(top, "qcow2", True, logdir, tcp=True) as qurl, serve_nbd(rs.volume, True, logdir, tcp=True) as ourl:
        for name, url in (("qemu-nbd", qurl), ("serve-nbd", ourl)):
            _compare(f"nbdcopy from {name} over TCP", _nbdcopy(url, 64, "-", capture_output=True).stdout,
                     rs.expected)
            connect[f"{name}, TCP"] = _connect_time(url)
        b, o = Variant("qemu-nbd", _copier(qurl, 64)), Variant("serve-nbd", _copier(ourl, 64))
        alternate([b, o], sz.reps, "NBD sequential over TCP")
        res.row("NBD read 1 MiB sequential, nbdcopy (1 connection, 64 requests in flight), loopback TCP",
                "NBD read 1M seq QD64, TCP", b, o, base_desc, ours_desc, size, "MiB/s")
    res.checks.append("NBD reads over TCP: nbdcopy's copy of the whole image from both servers equals the "
                      "expected image")
    res.notes.append(
        "NBD rows use a Unix socket for both servers except the one marked TCP. The qemu-nbd measured here ("
        + _version(["qemu-nbd", "--version"]) + ") sets no TCP_NODELAY on its connections (seen with strace when "
        "this benchmark was written) and sends its handshake in several small writes, so over loopback TCP it "
        "waits on Nagle's algorithm and delayed ACKs; later QEMU releases push each reply out explicitly "
        "(\"nbd/server: push pending frames after sending reply\", qemu-devel, March 2023). A qemu-io that "
        "connects, reads 4 KiB and disconnects took (median of 5, this run): "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in connect.items()) + ".")


def _connect_time(url: str, n: int = 5) -> float:
    """Median time of a qemu-io process that connects to ``url``, reads 4 KiB and disconnects."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _run(["qemu-io", "-r", "-f", "raw", url, "-c", "read -q 0 4k"], capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- workload 3: writes ----------------------------------------------------------------------------

@dataclass
class WriteSpec:
    """One write pattern of workload 3."""

    label: str
    short: str
    offsets: list[int]
    n: int
    every: int  #: writes between flushes
    unit: str


def _qemu_io_cmds(spec: WriteSpec, byte: int) -> list[str]:
    cmds: list[str] = []
    for i, off in enumerate(spec.offsets):
        cmds += ["-c", f"write -q -P 0x{byte:02x} {off} {spec.n}"]
        if (i + 1) % spec.every == 0:
            cmds += ["-c", "flush"]
    return cmds


class QemuIo:
    """Rounds of ``qemu-io -t writeback`` on one target; start-up and exit measured apart."""

    def __init__(self, target: list[str]) -> None:
        self.target = target
        self.cmds: list[str] = []
        self.startup: list[float] = []

    def prepare(self, spec: WriteSpec, byte: int) -> None:
        t0 = time.perf_counter()
        _run(["qemu-io", "-t", "writeback", *self.target, "-c", "flush"], capture_output=True)
        self.startup.append(time.perf_counter() - t0)
        self.cmds = _qemu_io_cmds(spec, byte)

    def run(self) -> None:
        r = subprocess.run(["qemu-io", "-t", "writeback", *self.target, *self.cmds], capture_output=True, text=True)
        if r.returncode or r.stdout.strip() or r.stderr.strip():
            raise RuntimeError(f"qemu-io failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")

    def subtract_startup(self, v: Variant) -> float:
        s = statistics.median(self.startup)
        v.times["total"] = [max(t - s, 1e-9) for t in v.times["total"]]
        return s


def _check_qemu_io_pattern(target: list[str], spec: WriteSpec, byte: int, what: str) -> None:
    cmds: list[str] = []
    for off in sorted(set(spec.offsets)):
        cmds += ["-c", f"read -q -P 0x{byte:02x} {off} {spec.n}"]
    r = subprocess.run(["qemu-io", "-r", *target, *cmds], capture_output=True, text=True)
    if r.returncode or "fail" in r.stdout.lower():
        raise AssertionError(f"{what}: bytes read back differ from those written: {r.stdout[:300]}")


def workload_writes(res: Results, rs: ReadSetup, top: str, sz: Sizes, logdir: str) -> None:
    """Workload 3: writes with periodic flushes, in process, on the qcow2 file and through NBD."""
    from overlaycache import Volume

    size = rs.size
    rng = random.Random(11)
    specs = [
        WriteSpec(f"write 4 KiB random, flush every {sz.flush_small} writes", "write 4K rand", [
            rng.randrange(size // 4096) * 4096 for _ in range(sz.small_writes)], 4096, sz.flush_small, "writes/s"),
        WriteSpec(f"write 1 MiB sequential, flush every {sz.flush_seq} MiB", "write 1M seq",
                  list(range(0, sz.seq_write, MiB)), MiB, sz.flush_seq, "MiB/s"),
    ]
    raw_path = os.path.join(rs.root, "raw-write.img")
    with open(raw_path, "wb") as f:
        f.write(rs.expected)
        os.fsync(f.fileno())
    # Every round of every variant writes a byte value of its own; the last round's must be found.
    values = itertools.cycle(range(0x11, 0xFF))
    last: dict[str, int] = {}
    for spec in specs:
        work = float(len(spec.offsets)) if spec.unit == "writes/s" else float(len(spec.offsets) * spec.n)
        data: dict[str, bytes] = {}

        def fresh(name: str) -> int:
            last[name] = next(values)
            data[name] = bytes([last[name]]) * spec.n
            return last[name]

        def want(name: str) -> bytes:
            return bytes([last[name]]) * spec.n

        # (a) raw file and (b) overlaycache in process, (c) qemu-io on the qcow2 file
        fd = os.open(raw_path, os.O_RDWR)
        vol = Volume.open(rs.volume)
        qio = QemuIo(["-f", "qcow2", top])
        try:
            def raw() -> None:
                buf, every, pwrite, sync = data["raw"], spec.every, os.pwrite, os.fdatasync
                for i, off in enumerate(spec.offsets):
                    pwrite(fd, buf, off)
                    if (i + 1) % every == 0:
                        sync(fd)

            def ours() -> None:
                buf, every, write, flush = data["ours"], spec.every, vol.write, vol.flush
                for i, off in enumerate(spec.offsets):
                    write(off, buf)
                    if (i + 1) % every == 0:
                        flush()

            b = Variant("raw pwrite+fdatasync", raw, setup=lambda: fresh("raw"))
            q = Variant("qemu-io qcow2", qio.run, setup=lambda: qio.prepare(spec, fresh("qcow2")))
            o = Variant("Volume.write+flush", ours, setup=lambda: fresh("ours"))
            alternate([b, q, o], sz.reps, spec.label)
            for off in spec.offsets:
                _compare(f"{spec.label}: raw file at {off}", os.pread(fd, spec.n, off), want("raw"))
                _compare(f"{spec.label}: volume at {off}", vol.read(off, spec.n), want("ours"))
        finally:
            vol.close()
            os.close(fd)
        _check_qemu_io_pattern(["-f", "qcow2", top], spec, last["qcow2"], f"{spec.label}: qcow2")
        startup = qio.subtract_startup(q)
        res.checks.append(f"{spec.label}: the raw file, the volume and the qcow2 chain read back the bytes "
                          "of their last round")
        res.row(f"{spec.label}, in process", f"{spec.short} vs raw", b, o, "raw pwrite + fdatasync",
                "Volume.write + flush", work, spec.unit)
        res.row(f"{spec.label}: top qcow2 overlay via qemu-io (start-up {startup * 1e3:.0f} ms subtracted) "
                "vs in process", f"{spec.short} vs qcow2", q, o, "qemu-io -t writeback, qcow2 file",
                "Volume.write + flush", work, spec.unit)

        # (d) the same qemu-io client through NBD to each server
        with qemu_nbd(top, "qcow2", False, logdir) as qurl, serve_nbd(rs.volume, False, logdir) as ourl:
            qn, sn = QemuIo(["-f", "raw", qurl]), QemuIo(["-f", "raw", ourl])
            bq = Variant("qemu-nbd", qn.run, setup=lambda: qn.prepare(spec, fresh("qemu-nbd")))
            bo = Variant("serve-nbd", sn.run, setup=lambda: sn.prepare(spec, fresh("serve-nbd")))
            alternate([bq, bo], sz.reps, f"{spec.label} over NBD")
            for name, url in (("qemu-nbd", qurl), ("serve-nbd", ourl)):
                with NBDClient.from_url(url) as c:
                    buf = bytearray(spec.n)
                    for off in spec.offsets:
                        c.readinto(off, buf)
                        _compare(f"{spec.label} over NBD, {name} at {off}", buf, want(name))
            s_q, s_o = qn.subtract_startup(bq), sn.subtract_startup(bo)
        res.checks.append(f"{spec.label} over NBD: both servers read back the bytes of their last round")
        res.row(f"{spec.label} over NBD, qemu-io client (start-up {s_q * 1e3:.0f} / {s_o * 1e3:.0f} ms subtracted)",
                f"NBD {spec.short}", bq, bo, "qemu-nbd, qcow2 chain", "overlaycache serve-nbd, volume", work, spec.unit)


# -- workload 4: S3 replication and PIT reads ------------------------------------------------------

def _pit_runs(store: Any, volume_id: str, snapshot: Any, prefix: str,
              regions: set[int] | None = None) -> list[tuple[str, int, int, list[int]]]:
    """The byte ranges of a PIT's regions in its packs, adjacent ones merged as overlaycache's region
    source merges them, with the regions each holds in order: what a plain client that knew the
    layout would GET (``s3bench.pit_ranges`` plus the regions, to check the bytes)."""
    from overlaycache.remote.catalog import Catalog
    from overlaycache.remote.layout import pack_key
    from overlaycache.remote.source import MAX_RUN_BYTES

    pit = Catalog(store).pit_map(volume_id, snapshot)
    runs: list[list[Any]] = []
    for r, _seq, pack, off, length, _csum, _digest in sorted(pit.stored(), key=lambda e: (e[2], e[3])):
        if pack == 0 or (regions is not None and r not in regions):
            continue
        if runs and runs[-1][0] == pack and runs[-1][2] == off and off + length - runs[-1][1] <= MAX_RUN_BYTES:
            runs[-1][2] = off + length
            runs[-1][3].append(r)
        else:
            runs.append([pack, off, off + length, [r]])
    return [(f"{prefix}{pack_key(volume_id, p)}", a, e - a, rs) for p, a, e, rs in runs]


def _stats_dict(stats: Any) -> dict[str, int]:
    """Requests by kind, and under "bytes" the payload bytes they moved."""
    return {**{k: stats[k].requests for k in KINDS}, "bytes": sum(stats[k].bytes for k in KINDS)}


def _secondary_stats(vol: Any) -> Any:
    """``vol.secondary_stats``, which a volume with a secondary always has."""
    stats = vol.secondary_stats
    if stats is None:
        raise AssertionError(f"{vol.path}: no secondary attached")
    return stats


def _requests(moved: int, **kinds: int) -> dict[str, int]:
    return {**dict.fromkeys(KINDS, 0), **kinds, "bytes": moved}


def _cost(workload: str, side: str, counts: dict[str, int], data_bytes: int) -> Cost:
    return Cost(workload, side, {k: counts[k] for k in KINDS}, data_bytes, counts["bytes"])


def workload_s3(res: Results, url: str, root: str, sz: Sizes) -> None:
    """Workload 4: ``replicate()`` vs boto3 PUTs, and a PIT read vs boto3 ranged GETs, on moto."""
    from s3bench import CREDS, client as boto3_client, ranged_get

    from overlaycache import S3Store, Volume
    from overlaycache.store.metered import MeteredStore

    size = sz.s3
    bucket = f"cmp-{uuid.uuid4().hex[:8]}"
    store = S3Store(bucket, prefix="bench", endpoint_url=url, max_pool_connections=WORKERS, **CREDS)
    store.create_bucket()
    c = boto3_client(url, CREDS)
    datas = [pattern(b"s3-%d" % i, size) for i in range(2)]
    vol = Volume.create(os.path.join(root, "s3vol"), size, region_size=REGION, secondary=store,
                        replication="periodic", period=86400.0, workers=WORKERS)
    try:
        rounds = [0]
        current = [datas[0]]  # what the volume holds
        # A first replicate: the packs' count and sizes are what the baseline PUTs.
        vol.write(0, datas[0])
        before = _secondary_stats(vol)
        if vol.replicate() != size // REGION:
            raise AssertionError("the first replicate() did not ship every region")
        first = _secondary_stats(vol) - before
        k, total = first["PUT"].requests, first["PUT"].bytes
        sizes = [total // k + (1 if i < total % k else 0) for i in range(k)]
        source = datas[0] + datas[0][: max(0, total - size)]
        bodies = []
        pos = 0
        for s in sizes:
            bodies.append(source[pos : pos + s])
            pos += s
        ours_stats: list[dict[str, int]] = []

        def dirty() -> None:
            rounds[0] += 1
            current[0] = datas[rounds[0] % 2]
            vol.write(0, current[0])

        def replicate() -> None:
            s0 = _secondary_stats(vol)
            shipped = vol.replicate()
            ours_stats.append(_stats_dict(_secondary_stats(vol) - s0))
            if shipped != size // REGION:
                raise AssertionError(f"replicate() shipped {shipped} regions, not {size // REGION}")

        def puts() -> None:
            with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(lambda i: c.put_object(Bucket=bucket, Key=f"raw/{i}", Body=bodies[i]), range(k)))

        b, o = Variant("boto3 put_object", puts), Variant("Volume.replicate", replicate, setup=dirty)
        alternate([b, o], sz.reps, "S3 replicate")
        got = c.get_object(Bucket=bucket, Key="raw/0")["Body"].read()
        _compare("boto3 put_object read back", got, bodies[0])
        res.row(f"S3: replicate {size // MiB} MiB of changed 64 KiB regions ({k} packs)", "S3 replicate", b, o,
                f"boto3 put_object, {k} objects of the packs' sizes, {WORKERS} threads", "Volume.replicate()",
                size, "MiB/s")
        res.costs.append(_cost(f"replicate {size // MiB} MiB", "overlaycache", ours_stats[-1], size))
        res.costs.append(_cost(f"replicate {size // MiB} MiB", "boto3 baseline", _requests(total, PUT=k), size))

        # A PIT of what was last written, read back whole.
        snap = vol.snapshot()
        expected = current[0]
        runs = _pit_runs(store, vol.id, snap, "bench/")
        vid = vol.id
        buf = bytearray(MiB)
        img_stats: list[dict[str, int]] = []

        def read_image(check: bool = False) -> None:
            metered = MeteredStore(store)
            with metered.image(vid, snap) as img:
                for off in range(0, size, MiB):
                    img.readinto(off, buf)
                    if check:
                        _compare(f"store.image at {off}", buf, expected[off : off + MiB])
            img_stats.append(_stats_dict(metered.stats()))

        def gets(check: bool = False) -> None:
            with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                got = list(pool.map(lambda r: ranged_get(c, bucket, r[0], r[1], r[2]), runs))
            if sum(len(g) for g in got) != size:
                raise AssertionError("boto3 ranged GETs: wrong length")
            if check:
                for (_key, _a, _n, regions), g in zip(runs, got):
                    _compare("boto3 ranged GET", g, b"".join(expected[r * REGION : (r + 1) * REGION] for r in regions))

        read_image(check=True)
        gets(check=True)
        res.checks.append("S3: the PIT read through store.image and the boto3 ranged GETs return the bytes "
                          "last replicated; a put_object body reads back")
        b, o = Variant("boto3 ranged GETs", gets), Variant("store.image", read_image)
        alternate([b, o], sz.reps, "S3 PIT read")
        res.row(f"S3: read a {size // MiB} MiB PIT (1 MiB reads; opening the image included)", "S3 read PIT", b, o,
                f"boto3 ranged GETs of the same ranges, {WORKERS} threads", "store.image(...).readinto", size, "MiB/s")
        res.costs.append(_cost(f"read a {size // MiB} MiB PIT", "overlaycache", img_stats[-1], size))
        res.costs.append(_cost(f"read a {size // MiB} MiB PIT", "boto3 baseline",
                               _requests(sum(r[2] for r in runs), GET=len(runs)), size))
    finally:
        vol.close()
        store.close()


# -- workload 5: failover --------------------------------------------------------------------------

class _FailingVolume:
    """The overlaycache side of workload 5 for one set of lost regions: each round gets a new
    volume, written whole, replicated and with a PIT, whose regions lie in the packs in the order
    they were written, as after ordinary replication. (Reusing one volume would not do: the restore
    that ends a round rewrites the lost regions, and replication then packs them side by side, where
    the next round would fetch them with a few ranged GETs instead of one each.)"""

    def __init__(self, make: Callable[[], tuple[Any, Any]], drop: Callable[[Any], None], lost: list[int],
                 expected: memoryview, buf: mmap.mmap) -> None:
        self.make, self.drop, self.lost, self.exp, self.buf = make, drop, lost, expected, buf
        self.vol: Any = None
        self.stats: list[dict[str, int]] = []

    def setup(self) -> None:
        self.close()
        self.vol = self.make()[0]

    def close(self) -> None:
        if self.vol is not None:
            self.drop(self.vol)
            self.vol = None

    def run(self) -> dict[str, float]:
        v, buf, exp = self.vol, self.buf, self.exp
        s0 = _secondary_stats(v)
        with memoryview(buf) as bv:
            t0 = time.perf_counter()
            v.mark_unavailable(self.lost)
            t1 = time.perf_counter()
            for off in range(0, v.size, MiB):
                v.readinto(off, buf)
                if bv != exp[off : off + MiB]:
                    raise AssertionError(f"failover read at {off} differs")
            t2 = time.perf_counter()
        self.stats.append(_stats_dict(_secondary_stats(v) - s0))
        if v.location_map().count("R") != len(self.lost):
            raise AssertionError("the distributed overlay does not read the lost regions remotely")
        return {"serving": t1 - t0, "total": t2 - t0}


def workload_failover(res: Results, url: str, root: str, sz: Sizes) -> None:
    """Workload 5: the distributed overlay vs restoring the whole PIT before serving."""
    from s3bench import CREDS, client as boto3_client, ranged_get

    from overlaycache import S3Store, Volume
    from overlaycache.store.metered import MeteredStore

    size, pct = sz.image, sz.lost_pct
    n = size // REGION
    bucket = f"cmp-fo-{uuid.uuid4().hex[:8]}"
    store = S3Store(bucket, prefix="bench", endpoint_url=url, max_pool_connections=WORKERS, **CREDS)
    store.create_bucket()
    c = boto3_client(url, CREDS)
    expected = pattern(b"failover", size)
    exp = memoryview(expected)
    # Two ways to lose 10%: every tenth region (a failed member of a stripe: no two lost regions
    # adjacent, one ranged GET each), or one contiguous run (adjacent regions share a GET).
    spread = [r for r in range(n) if (r * pct) // 100 != ((r + 1) * pct) // 100]
    first = (n - len(spread)) // 2
    contiguous = list(range(first, first + len(spread)))
    restored = os.path.join(root, "restored")
    made = [0]

    def fresh_volume() -> tuple[Any, Any]:
        made[0] += 1
        v = Volume.create(os.path.join(root, f"fovol-{made[0]}"), size, region_size=REGION, secondary=store,
                          replication="periodic", period=86400.0, workers=WORKERS, cache_regions=n)
        v.write(0, expected)
        v.replicate()
        return v, v.snapshot()

    def drop(v: Any) -> None:
        """Close a volume of an earlier round and delete its files and its objects."""
        vid, path = v.id, v.path
        v.close()
        store.delete(list(store.list(f"volumes/{vid}/")))
        shutil.rmtree(path, ignore_errors=True)

    vol, snap = fresh_volume()  # the PIT the baselines restore, whole
    buf = _aligned(MiB)
    bv = memoryview(buf)
    sides = {name: _FailingVolume(fresh_volume, drop, lost, exp, buf)
             for name, lost in (("spread", spread), ("contiguous", contiguous))}
    try:
        vid = vol.id
        runs = _pit_runs(store, vid, snap, "bench/")
        base_b_stats: list[dict[str, int]] = []

        def clean() -> None:
            shutil.rmtree(restored, ignore_errors=True)
            try:
                os.unlink(restored + ".raw")
            except FileNotFoundError:
                pass

        def restore_raw() -> dict[str, float]:
            t0 = time.perf_counter()
            fd = os.open(restored + ".raw", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, size)

                def fetch(run: tuple[str, int, int, list[int]]) -> None:
                    data = memoryview(ranged_get(c, bucket, run[0], run[1], run[2]))
                    for i, r in enumerate(run[3]):
                        os.pwrite(fd, data[i * REGION : (i + 1) * REGION], r * REGION)

                with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                    list(pool.map(fetch, runs))
                os.fdatasync(fd)
                t1 = time.perf_counter()
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm, memoryview(mm) as src:
                    for off in range(0, size, MiB):
                        bv[:] = src[off : off + MiB]
                        if bv != exp[off : off + MiB]:
                            raise AssertionError(f"restored raw file at {off} differs")
                t2 = time.perf_counter()
            finally:
                os.close(fd)
            return {"serving": t1 - t0, "total": t2 - t0}

        def restore_volume() -> dict[str, float]:
            metered = MeteredStore(store)
            t0 = time.perf_counter()
            with Volume.create(restored, size, region_size=REGION) as new, metered.image(vid, snap) as img:
                for off in range(0, size, MiB):
                    img.readinto(off, buf)
                    new.write(off, buf)
                new.flush()
                t1 = time.perf_counter()
                for off in range(0, size, MiB):
                    new.readinto(off, buf)
                    if bv != exp[off : off + MiB]:
                        raise AssertionError(f"restored volume at {off} differs")
                t2 = time.perf_counter()
            base_b_stats.append(_stats_dict(metered.stats()))
            return {"serving": t1 - t0, "total": t2 - t0}

        # Checked once before timing; each side also compares every 1 MiB it reads with the expected
        # bytes in every round, and the distributed overlay must read exactly the lost regions remotely.
        for side in sides.values():
            side.setup()
            side.run()
        for restore in (restore_raw, restore_volume):
            clean()
            restore()
        res.checks.append(f"failover: every 1 MiB read, in every round, of the volume in its distributed overlay "
                          f"({len(spread)} regions R, spread or contiguous) and of both restored copies equals "
                          "the expected bytes")
        a = Variant("boto3 restore to raw", restore_raw, setup=clean)
        o = Variant("mark_unavailable, spread", sides["spread"].run, setup=sides["spread"].setup)
        vb = Variant("store.image to new volume", restore_volume, setup=clean)
        oc = Variant("mark_unavailable, contiguous", sides["contiguous"].run, setup=sides["contiguous"].setup)
        alternate([a, o, vb, oc], sz.reps, "failover")
        desc = f"{pct}% of a {size // MiB} MiB volume's regions lost"
        raw_desc = "restore the whole PIT first: boto3 ranged GETs into a new raw file + fdatasync"
        res.row(f"failover, {desc} (every tenth region): until the volume serves I/O", "failover: serving", a, o,
                raw_desc, "mark_unavailable (begins the distributed overlay)", None, "s", key="serving")
        res.row(f"failover, {desc} (every tenth region): until every region was read and checked",
                "failover spread: all read", a, o, raw_desc + ", then read every region (mmap)",
                "mark_unavailable, then read every region", None, "s")
        res.row(f"failover, {desc} (one contiguous run): until every region was read and checked",
                "failover contiguous: all read", a, oc, raw_desc + ", then read every region (mmap)",
                "mark_unavailable, then read every region", None, "s")
        res.row(f"failover, {desc} (every tenth region): until every region was read and checked, vs restore "
                "into a new overlaycache volume", "failover spread vs volume restore", vb, o,
                "store.image copied into a new Volume + flush, then read every region",
                "mark_unavailable, then read every region", None, "s")
        label = f"failover, {pct}% of {size // MiB} MiB"
        res.costs.append(_cost(label, "overlaycache, every tenth region lost", sides["spread"].stats[-1], size))
        res.costs.append(_cost(label, "overlaycache, one contiguous run lost", sides["contiguous"].stats[-1], size))
        res.costs.append(_cost(label, "boto3 restore to raw", _requests(sum(r[2] for r in runs), GET=len(runs)), size))
        res.costs.append(_cost(label, "store.image restore to volume", base_b_stats[-1], size))
    finally:
        for side in sides.values():
            if side.vol is not None and not side.vol.closed:
                side.vol.close()
        vol.close()
        store.close()
        bv.release()
        buf.close()
        clean()


# -- the report ------------------------------------------------------------------------------------

def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return out.splitlines()[0].strip() if out else "?"


def _pkg(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _filesystem(path: str) -> str:
    real = os.path.realpath(path)
    best = ("", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                best = (mnt, fstype, dev)
    return f"{best[1]} ({best[2]} on {best[0]})"


def machine(tmp: str) -> list[tuple[str, str]]:
    """The machine, the tools and the versions the numbers were measured with."""
    import overlaycache

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("RAM", f"{mem_kib / (1 << 20):.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("filesystem (work files)", _filesystem(tmp)),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("overlaycache", f"{overlaycache.__version__}, core {overlaycache.IMPLEMENTATION}, commit {commit}"),
        ("qemu-img", _version(["qemu-img", "--version"])),
        ("qemu-nbd", _version(["qemu-nbd", "--version"])),
        ("qemu-io", _version(["qemu-io", "--version"])),
        ("nbdcopy", _version(["nbdcopy", "--version"])),
        ("boto3 / moto", f"{_pkg('boto3')} / {_pkg('moto')}"),
    ]


def _fmt(x: float, unit: str) -> str:
    if unit == "s":
        return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _money(x: float) -> str:
    """Dollars with two significant digits, in fixed notation."""
    if x <= 0:
        return "0"
    return f"{x:.{max(2, 1 - math.floor(math.log10(x)))}f}"


def write_markdown(path: str, res: Results, mach: list[tuple[str, str]], args: argparse.Namespace, sz: Sizes,
                   started: datetime.datetime, seconds: float, png: str | None) -> None:
    """``compare.md``: the table, the S3 requests and cost, the machine, the method, checks and load."""
    lines = [
        "# overlaycache compared with its baselines",
        "",
        f"`python bench/compare.py{' --quick' if args.quick else ''}` on {started:%Y-%m-%d %H:%M} "
        f"({seconds / 60:.1f} min in all); {sz.reps} timed rounds of each side after one warm-up round, "
        "the two sides alternating (A B, B A, ...).",
        "",
        "**ratio** = baseline time / overlaycache time for the same work, from the median rounds "
        "(= overlaycache throughput / baseline throughput): **above 1, overlaycache is faster**. "
        "*range*: lowest and highest ratio of the rounds paired in order (noise).",
        "",
        "| # | workload | baseline | overlaycache | ratio | range | unit | baseline is | overlaycache is |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(res.rows, 1):
        lo, hi = r.ratio_range
        unit = "time (median)" if r.unit == "s" else r.unit
        lines.append(f"| {i} | {r.workload} | {_fmt(r.value(r.base_times), r.unit)} | "
                     f"{_fmt(r.value(r.ours_times), r.unit)} | **{r.ratio:.2f}** | {lo:.2f}-{hi:.2f} | {unit} | "
                     f"{r.baseline} | {r.ours} |")
    if png:
        lines += ["", f"![ratios]({os.path.basename(png)})"]
    if res.costs:
        lines += [
            "",
            "## S3 requests and their cost",
            "",
            "Requests of one round by kind (overlaycache: counted by its metered store, "
            "`vol.secondary_stats` or a `MeteredStore` under `store.image`; boto3: the calls made). "
            "Priced at S3 Standard list prices: PUT and LIST $0.005 per 1,000, GET and HEAD $0.0004 per 1,000, "
            "DELETE free; transfer not counted. Cost per GiB of the workload's data.",
            "",
            "| workload | side | PUT | GET | HEAD | LIST | DELETE | MiB moved | $ per GiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in res.costs:
            q = c.requests
            lines.append(f"| {c.workload} | {c.side} | {q['PUT']} | {q['GET']} | {q['HEAD']} | {q['LIST']} | "
                         f"{q['DELETE']} | {c.moved / MiB:.1f} | {_money(c.per_gib)} |")
    lines += ["", "## Machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in mach]
    lines += ["", "## How each workload was measured", ""]
    doc = (__doc__ or "").split("Workloads\n---------\n", 1)[-1].split("\n``--quick``", 1)[0]
    lines += [doc.replace("\n   ", " ").replace("``", "`").strip()]
    lines += ["", f"Sizes: {sz.image // MiB} MiB images (64 KiB regions, qcow2 clusters of 64 KiB), "
              f"{sz.small_writes} writes of 4 KiB and {sz.seq_write // MiB} MiB of sequential writes per round, "
              f"{sz.s3 // MiB} MiB replicated and read per S3 round, {WORKERS} S3 threads on each side. "
              "qemu-nbd and serve-nbd each run in their own process (serve-nbd as a subprocess, which is the "
              "fairer setup: the client does not share the server's interpreter), both on Unix sockets but for the row "
              "marked TCP (127.0.0.1)."]
    if _has_s3(res):
        res.notes.append("The S3 server is moto's, a Python process on the same cores as the client: its throughput "
                         "bounds both sides; the request counts are what a real store would bill.")
    if res.notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in res.notes]
    lines += ["", "## Correctness checks (all passed)", ""] + [f"* {c}" for c in res.checks]
    lines += ["", "## Load on the machine", ""] + [f"* {x}" for x in res.load]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _has_s3(res: Results) -> bool:
    """Whether the run had S3 workloads."""
    return bool(res.costs)


def write_png(path: str, res: Results, title: str) -> bool:
    """The ratios as a bar chart (log scale when they spread widely); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib, or the bench extra): no %s", path)
        return False
    rows = res.rows
    labels = [f"{i}. {r.short}" for i, r in enumerate(rows, 1)]
    ratios = [r.ratio for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    colors = ["#2e7d32" if x >= 1 else "#c62828" for x in ratios]
    # Bars grow from the 1.0 line: right when overlaycache is faster, left when it is slower.
    ax.barh(y, [r - 1 for r in ratios], left=1.0, color=colors)
    lo_all = min(min(ratios), *(r.ratio_range[0] for r in rows))
    hi_all = max(max(ratios), *(r.ratio_range[1] for r in rows))
    if hi_all / lo_all > 8:
        from matplotlib.ticker import FixedLocator, NullFormatter

        ax.set_xscale("log")
        ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
                 if lo_all / 2.5 <= t <= hi_all * 2.5]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    log_scale = ax.get_xscale() == "log"
    for yi, (r, row) in zip(y, zip(ratios, rows)):
        lo, hi = row.ratio_range
        ax.plot([lo, hi], [yi, yi], color="black", linewidth=1)
        if r >= 1:  # the label beyond the bar's end and its range line
            ax.text(max(r, hi) * 1.04 if log_scale else max(r, hi) + 0.03, yi, f"{r:.2f}", va="center", fontsize=8)
        else:
            ax.text(min(r, lo) / 1.04 if log_scale else min(r, lo) - 0.03, yi, f"{r:.2f}", va="center",
                    ha="right", fontsize=8)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.text(0.01, 1.005, "<- baseline faster", transform=ax.transAxes, fontsize=8, va="bottom")
    ax.text(0.99, 1.005, "overlaycache faster ->", transform=ax.transAxes, fontsize=8, va="bottom", ha="right")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("baseline time / overlaycache time (above 1: overlaycache faster); lines: per-round range")
    ax.set_title(title, fontsize=9, pad=16)
    lo_x, hi_x = ax.get_xlim()
    if log_scale:
        ax.set_xlim(min(lo_x, lo_all / 1.8), max(hi_x, hi_all * 1.8))
    else:
        ax.set_xlim(min(lo_x, lo_all - 0.15), max(hi_x, hi_all + 0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (about a minute)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory of compare.md and compare.png")
    parser.add_argument("--reps", type=int, help="timed rounds of each side (default 7, --quick 3)")
    parser.add_argument("--only", help="comma-separated workloads to run (1-5; default all)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the work files go (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work files")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="MIN",
                        help="first wait up to MIN minutes for other pytest / .ci/run jobs to end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("overlaycache").setLevel(logging.CRITICAL)  # failover logs the regions it loses, on purpose
    sz = QUICK if args.quick else DEFAULT
    if args.reps:
        sz = Sizes(**{**sz.__dict__, "reps": args.reps})
    only = {int(x) for x in args.only.split(",")} if args.only else {1, 2, 3, 4, 5}
    for tool in ("qemu-img", "qemu-nbd", "qemu-io", "nbdcopy"):
        if (only & {2, 3}) and shutil.which(tool) is None:
            parser.error(f"{tool} not found (Debian: apt-get install qemu-utils libnbd-bin)")
    os.makedirs(args.out, exist_ok=True)
    res = Results()
    if args.wait_idle > 0 and not wait_idle(args.wait_idle):
        res.notes.append("Other jobs were still running after waiting: measured under load.")
    started = datetime.datetime.now()
    t_start = time.monotonic()
    work = tempfile.mkdtemp(prefix="oc-compare-", dir=args.tmp)
    logdir = os.path.join(work, "logs")
    os.makedirs(logdir)
    try:
        note_load(res, "start")
        rs: ReadSetup | None = None
        top: str | None = None
        if only & {1, 2, 3}:
            log.info("building the read volume (%d MiB) and the same bytes in plain files", sz.image // MiB)
            rs = build_read_volume(work, sz.image)
            log.info("building the qcow2 chain")
            top = build_qcow2_chain(rs)
        if 1 in only:
            assert rs is not None
            log.info("1. virtual-image reads")
            workload_reads(res, rs, sz)
            note_load(res, "after 1 (reads)")
        if 2 in only:
            assert rs is not None and top is not None
            log.info("2. reads over NBD")
            workload_nbd_reads(res, rs, top, sz, logdir)
            note_load(res, "after 2 (NBD reads)")
        if 3 in only:
            assert rs is not None and top is not None
            log.info("3. writes")
            workload_writes(res, rs, top, sz, logdir)
            note_load(res, "after 3 (writes)")
        if only & {4, 5}:
            with moto_server(logdir) as url:
                if 4 in only:
                    log.info("4. S3 replication and PIT reads")
                    workload_s3(res, url, work, sz)
                    note_load(res, "after 4 (S3)")
                if 5 in only:
                    log.info("5. failover")
                    workload_failover(res, url, work, sz)
                    note_load(res, "after 5 (failover)")
    finally:
        if args.keep:
            log.info("work files kept in %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - t_start
    if any("other jobs: none" not in x for x in res.load):
        res.notes.append("Other test or CI jobs ran during part of this run (see the last section): those numbers "
                         "were measured under load; the alternation spreads it over both sides.")
    md = os.path.join(args.out, "compare.md")
    png = os.path.join(args.out, "compare.png")
    title = (f"overlaycache vs baselines, {started:%Y-%m-%d %H:%M}, {os.cpu_count()} cores"
             f"{', --quick' if args.quick else ''}")
    have_png = bool(res.rows) and write_png(png, res, title)
    write_markdown(md, res, machine(args.tmp), args, sz, started, seconds, png if have_png else None)
    log.info("wrote %s%s in %.0f s", md, f" and {png}" if have_png else "", seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
