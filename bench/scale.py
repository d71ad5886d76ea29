"""Costs of a volume as a curve over its size: create, open, memory, failover, crash reopen, files.

Run ``python bench/scale.py [--sizes 1G,64G,1T,15T] [--json OUT]``. Each step runs in a fresh child
process (so resident memory is the step's own), on volumes of 64 KiB regions in a scratch directory
under ``--dir`` (default: the system's temp dir), with a :class:`~overlaycache.LocalStore` as the
secondary where one is needed. It prints a markdown table; ``--json`` also writes the numbers.

Steps, per size:

* ``create``: ``Volume.create`` + ``close`` without a secondary, and again with one (async mode);
* ``open``: ``Volume.open`` of the volume without a secondary; the resident memory it adds (VmRSS
  after open minus before), the bits per region its per-region bitmaps take when every page of
  them is touched (without and with a secondary), and what each further local snapshot adds;
* ``failover``: open with the secondary, then mark 1% of the regions unavailable (every 100th),
  which begins the distributed overlay;
* ``crash reopen``: a child opens the volume with its secondary (async), writes 16 regions, flushes
  and is killed with SIGKILL; the time of the next ``Volume.open``;
* ``files``: apparent and allocated bytes of the volume's files after these steps.

Nothing here asserts on time; ``bench/test_bench_scale.py`` runs the small sizes in the benchmark
suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGION = 64 << 10
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_CHILD = r"""
import json, os, sys, time
from overlaycache import LocalStore, Volume

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

def bitmap_bits(vol):
    # bits per region held by the volume's per-region bitmaps (allocated, touched or not)
    maps = [vol._layers.verified, vol._unavail.bits]
    for ov in vol._layers.overlays:
        maps.append(ov.present)
    if vol._repl is not None:
        maps.append(vol._repl.set.pending)
    return sum(64 * m.nwords for m in maps) / vol.num_regions

op, path, size, store_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = {}
if op == "create":
    t = time.perf_counter()
    Volume.create(path, size, region_size=65536).close()
    out["create_s"] = time.perf_counter() - t
elif op == "create_secondary":
    store = LocalStore(store_dir)
    t = time.perf_counter()
    Volume.create(path, size, region_size=65536, secondary=store, replication="async").close()
    out["create_secondary_s"] = time.perf_counter() - t
elif op == "open":
    before = rss()
    t = time.perf_counter()
    vol = Volume.open(path)
    out["open_s"] = time.perf_counter() - t
    out["rss_open"] = rss() - before
    out["bits_open"] = bitmap_bits(vol)
    vol.write(0, b"x" * 65536)
    vol.write(size - 65536, b"y" * 65536)
    vol.flush()
    snaps = []
    for k in range(2):
        b = rss()
        vol.local_snapshot()
        vol.write(65536 * (k + 1), b"z" * 65536)
        vol.flush()
        snaps.append(rss() - b)
    out["rss_per_snapshot"] = max(snaps)
    assert vol.read(0, 1) == b"x" and vol.read(size - 1, 1) == b"y"
    vol.close()
    t = time.perf_counter()
    vol = Volume.open(path)
    out["open_3_layers_s"] = time.perf_counter() - t
    vol.close()
elif op == "open_secondary":
    store = LocalStore(store_dir)
    t = time.perf_counter()
    vol = Volume.open(path, secondary=store)
    out["open_secondary_s"] = time.perf_counter() - t
    out["bits_open_secondary"] = bitmap_bits(vol)
    vol.close()
elif op == "failover":
    store = LocalStore(store_dir)
    vol = Volume.open(path, secondary=store)
    vol.replicate()
    n = vol.num_regions
    bad = range(50, n, 100)
    t = time.perf_counter()
    vol.mark_unavailable(bad)  # with a secondary, this begins the distributed overlay
    vol.begin_distributed_overlay()
    out["failover_s"] = time.perf_counter() - t
    assert vol.distributed_overlay is not None
    out["failover_regions"] = len(bad)
    vol.close()
elif op == "crash_child":
    store = LocalStore(store_dir)
    vol = Volume.open(path, secondary=store, replication="async")
    for k in range(16):
        vol.write(65536 * (1000 + 7 * k), b"c" * 65536)
    vol.flush()
    print("READY", flush=True)
    time.sleep(600)
elif op == "reopen":
    store = LocalStore(store_dir)
    t = time.perf_counter()
    vol = Volume.open(path, secondary=store)
    out["reopen_after_kill_s"] = time.perf_counter() - t
    assert vol.read(65536 * 1000, 1) == b"c"
    vol.close()
print(json.dumps(out))
"""


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("IB").rstrip("B")
    if text[-1:] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def human(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]} {unit}iB"
    return f"{n} B"


def _child(op: str, path: str, size: int, store: str, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, op, path, str(size), store], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {f"{op}_error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {f"{op}_error": last[:200]}
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _crash(path: str, size: int, store: str, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with subprocess.Popen([sys.executable, "-c", _CHILD, "crash_child", path, str(size), store], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if line.strip() != "READY":
            return {"reopen_error": proc.stderr.read().strip().splitlines()[-1:]}
    return _child("reopen", path, size, store, timeout)


def _files(path: str) -> dict[str, Any]:
    apparent = allocated = largest = 0
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            st = os.stat(p)
            apparent += st.st_size
            allocated += st.st_blocks * 512
            largest = max(largest, st.st_size)
    return {"files_apparent": apparent, "files_allocated": allocated, "largest_file": largest}


def measure(size: int, scratch: str, timeout: float) -> dict[str, Any]:
    """Every step for one volume size; errors are recorded as ``<step>_error``."""
    work = tempfile.mkdtemp(prefix="scale-", dir=scratch)
    try:
        row: dict[str, Any] = {"size": size, "regions": size // REGION}
        vol, store = os.path.join(work, "vol"), os.path.join(work, "store")
        row.update(_child("create_secondary", os.path.join(work, "vol2"), size,
                          os.path.join(work, "store2"), timeout))
        shutil.rmtree(os.path.join(work, "vol2"), ignore_errors=True)
        row.update(_child("create", vol, size, store, timeout))
        if "create_error" in row:
            return row
        row.update(_child("open", vol, size, store, timeout))
        row.update(_child("open_secondary", vol, size, store, timeout))
        row.update(_child("failover", vol, size, store, timeout))
        row.update(_crash(vol, size, store, timeout))
        row.update(_files(vol))
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fmt_s(v: Any) -> str:
    return f"{v:.3f} s" if isinstance(v, float) else "-"


def _fmt_b(v: Any) -> str:
    if not isinstance(v, int):
        return "-"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if v >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v} B"


COLUMNS = [
    ("size", "volume", lambda r: human(r["size"])),
    ("create_s", "create", lambda r: _fmt_s(r.get("create_s"))),
    ("create_secondary_s", "create + secondary", lambda r: _fmt_s(r.get("create_secondary_s"))),
    ("open_s", "open", lambda r: _fmt_s(r.get("open_s"))),
    ("open_secondary_s", "open + secondary", lambda r: _fmt_s(r.get("open_secondary_s"))),
    ("rss_open", "memory after open", lambda r: _fmt_b(r.get("rss_open"))),
    ("rss_open_bits", "bits/region", lambda r: f"{8 * r['rss_open'] / r['regions']:.2f}" if "rss_open" in r else "-"),
    ("bits_open", "bitmaps (bits/region)", lambda r: f"{r['bits_open']:.1f}" if "bits_open" in r else "-"),
    ("bits_open_secondary", "with secondary", lambda r: f"{r['bits_open_secondary']:.1f}"
     if "bits_open_secondary" in r else "-"),
    ("rss_per_snapshot", "memory per snapshot", lambda r: _fmt_b(r.get("rss_per_snapshot"))),
    ("failover_s", "begin_distributed_overlay (1%)", lambda r: _fmt_s(r.get("failover_s"))),
    ("reopen_after_kill_s", "reopen after kill -9", lambda r: _fmt_s(r.get("reopen_after_kill_s"))),
    ("files_allocated", "files (allocated)", lambda r: _fmt_b(r.get("files_allocated"))),
    ("largest_file", "largest file (apparent)", lambda r: _fmt_b(r.get("largest_file"))),
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(c[2](r) for c in COLUMNS) + " |")
    errors = [f"- {human(r['size'])}: {k}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    return "\n".join(lines + ([""] + errors if errors else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1G,64G,1T,15T")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per step")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for text in args.sizes.split(","):
        row = measure(parse_size(text), args.dir, args.timeout)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
