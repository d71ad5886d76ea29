"""Run the benchmark suites and print each result as a ratio to its baseline from the same run.

Usage (from the repository root)::

    python bench/report.py                      # run bench/ and print the tables
    python bench/report.py --json out.json      # also keep pytest-benchmark's JSON
    python bench/report.py --from-json out.json # only print the tables of an earlier run
    python bench/report.py -k read              # pass a selection to pytest

``pyproject.toml`` sets ``testpaths = ["tests"]`` and ``--benchmark-disable``, so the suites are run
as ``pytest bench --benchmark-enable``. Ratios are ours / baseline throughput, where the baseline is
the fastest raw variant of the same pair (see ``bench/_support.py:record``), computed on the median
round and on the fastest round of each side; the other engineers' jobs on the machine make absolute
numbers noisy, the ratios within one run much less so. Targets are DESIGN.md section 7; a miss is
printed, never turned into a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suites(json_path: str, extra: list[str], quiet: bool) -> int:
    """Run ``pytest bench`` with benchmarks enabled, writing pytest-benchmark's JSON."""
    cmd = [
        sys.executable, "-m", "pytest", "bench",
        "--benchmark-enable", f"--benchmark-json={json_path}",
        "-p", "no:cacheprovider", "-q", *extra,
    ]
    if quiet:
        cmd.append("--benchmark-quiet")
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if quiet else None, text=True)
    if quiet and proc.returncode:
        sys.stderr.write(proc.stdout or "")
    return proc.returncode


def _work(info: dict[str, Any]) -> tuple[float, str]:
    if "bytes" in info:
        return float(info["bytes"]), "bytes"
    if "items" in info:
        return float(info["items"]), "items"
    return 1.0, "rounds"


def _rate(work: float, unit: str, seconds: float) -> str:
    if seconds <= 0:
        return "-"
    r = work / seconds
    if unit == "bytes":
        return f"{r / 1e9:7.2f} GB/s"
    if unit == "items":
        return f"{r / 1e6:7.0f} M/s"
    return f"{r:7.1f} /s"


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:8.3f} s "
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.1f} us"


def _verdict(by_median: bool, by_min: bool) -> str:
    if by_median and by_min:
        return "ok"
    if not by_median and not by_min:
        return "MISS"
    return "ok/MISS" if by_median else "MISS/ok"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def merge_passes(benchmarks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Benchmarks by pair, the passes of each variant merged into one entry (all rounds pooled)."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for b in benchmarks:
        info = b.get("extra_info") or {}
        if "pair" in info:
            by_key[(info["pair"], info["variant"])].append(b)
    pairs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (pair, _), runs in by_key.items():
        rounds = [t for b in runs for t in b["stats"].get("data") or [b["stats"]["median"]]]
        stats = {
            "min": min(rounds),
            "median": statistics.median(rounds),
            "rounds": len(rounds),
            "passes": len(runs),
            # spread of the per-pass medians, a hint of how noisy the machine was
            "pass_medians": [b["stats"]["median"] for b in runs],
        }
        pairs[pair].append({"extra_info": runs[0]["extra_info"], "stats": stats})
    return pairs


def summarize(data: dict[str, Any]) -> str:
    """The report: ratio table, cold-read cost, resolve rates, flush cost, tracking memory."""
    pairs = merge_passes(data.get("benchmarks", []))
    lines: list[str] = []
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}).get("brand_raw", "?")
    lines.append(f"machine: {cpu}, {mi.get('cpu', {}).get('count', '?')} cpus, "
                 f"python {mi.get('python_version', '?')}; run {data.get('datetime', '?')}")
    lines.append("")

    rows: list[list[str]] = []
    for pair in sorted(pairs):
        entries = pairs[pair]
        if all(e["extra_info"]["role"] == "info" for e in entries):
            continue

        def tp(e: dict[str, Any], stat: str) -> float:
            work, _ = _work(e["extra_info"])
            return work / float(e["stats"][stat])

        bases = [e for e in entries if e["extra_info"]["role"] == "baseline"]
        best = {s: max((tp(e, s) for e in bases), default=None) for s in ("median", "min")}
        best_name = max(bases, key=lambda e: tp(e, "median"))["extra_info"]["variant"] if bases else "-"
        order = {"ours": 0, "diagnostic": 1, "baseline": 2}
        for e in sorted(entries, key=lambda e: (order.get(e["extra_info"]["role"], 3), e["stats"]["median"])):
            info = e["extra_info"]
            work, unit = _work(info)
            med = e["stats"]["median"]
            r_med = tp(e, "median") / best["median"] if best["median"] else None
            r_min = tp(e, "min") / best["min"] if best["min"] else None
            target, verdict = "", ""
            if info["role"] == "ours":
                if "target" in info and r_med is not None and r_min is not None:
                    target = f">= {info['target']:.2f}x"
                    verdict = _verdict(r_med >= info["target"], r_min >= info["target"])
                elif "target_rate" in info:
                    target = f">= {info['target_rate'] / 1e6:.0f} M/s"
                    verdict = _verdict(work / med >= info["target_rate"],
                                       work / e["stats"]["min"] >= info["target_rate"])
            st = e["stats"]
            spread = max(st["pass_medians"]) / min(st["pass_medians"]) - 1 if st["pass_medians"] else 0.0
            rows.append([
                pair, info["variant"], info["role"], f"{st['passes']}x{st['rounds'] // st['passes']}",
                _fmt_time(med), f"{spread * 100:4.0f}%", _rate(work, unit, med), _rate(work, unit, st["min"]),
                best_name if info["role"] != "baseline" else "",
                f"{r_med:6.3f}" if r_med is not None else "-",
                f"{r_min:6.3f}" if r_min is not None else "-",
                target, verdict,
            ])
    lines += [
        "Ratios: ours / fastest baseline throughput (same run). rounds = passes x rounds per pass, pooled;",
        "ratio(med) compares the median rounds, ratio(min) the fastest; the last column judges both",
        "(med/min). noise: spread of the medians of one variant's passes (other jobs on the machine).",
    ]
    lines.append(_table(rows, ["pair", "variant", "role", "rounds", "median/round", "noise", "thruput(med)",
                               "thruput(min)", "baseline", "ratio(med)", "ratio(min)", "target", "med/min"]))

    def entry(pair: str, variant: str) -> dict[str, Any] | None:
        return next((e for e in pairs.get(pair, []) if e["extra_info"]["variant"] == variant), None)

    cold, warm = entry("read_cold_seq_1MiB", "overlaycache"), entry("read_seq_1MiB", "overlaycache")
    if cold and warm:
        size = cold["extra_info"]["bytes"]
        extra = cold["stats"]["median"] - warm["stats"]["median"] * size / warm["extra_info"]["bytes"]
        lines.append("")
        lines.append("Cold read (first read after open; verifies each region's checksum; page cache warm):")
        lines.append(f"  {size / 2**20:.0f} MiB in {cold['stats']['median'] * 1e3:.1f} ms "
                     f"({size / cold['stats']['median'] / 1e9:.2f} GB/s) vs warm "
                     f"{warm['stats']['median'] * 1e3 * size / warm['extra_info']['bytes']:.1f} ms; "
                     f"verification adds {extra * 1e3:.1f} ms "
                     f"({extra / size * 2**30 * 1e3:.0f} ms per GiB, "
                     f"{(size / extra / 1e9) if extra > 0 else float('inf'):.2f} GB/s of hashing)")

    flush = [e for e in pairs.get("flush_16MiB", [])]
    if flush:
        lines.append("")
        lines.append("Flush of 16 MiB of dirty regions: " + ", ".join(
            f"{e['extra_info']['variant']} {e['stats']['median'] * 1e3:.2f} ms "
            f"(min {e['stats']['min'] * 1e3:.2f})" for e in flush))

    mem = entry("tracking_memory", "sizes")
    if mem and "memory" in mem["extra_info"]:
        m = mem["extra_info"]["memory"]
        lines.append("")
        lines.append(f"Tracking memory ({m['num_regions']} regions, {m['overlays']} overlays + base): "
                     f"{m['bits_per_region']:.2f} bits/region in all (design: <= "
                     f"{m['design_bits_base_and_first_overlay']} for the base and first overlay, "
                     f"+{m['design_bits_per_further_overlay']} per further one)")
        mrows = []
        for layer in m["layers"]:
            mrows.append([layer["layer"], str(layer.get("regions_held", "-")),
                          ",".join(layer["bitmaps"]), f"{layer['bits_per_region']:.2f}"])
        lines.append(_table(mrows, ["layer", "regions held", "bitmaps", "bits/region"]))
        lines.append(f"  1 TiB volume, 64 KiB regions ({m['tib_64KiB_regions']} regions): "
                     f"{m['tib_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="keep pytest-benchmark's JSON here")
    parser.add_argument("--from-json", help="do not run; report an existing JSON file")
    parser.add_argument("-k", help="pytest -k selection")
    parser.add_argument("--quiet", action="store_true", help="hide pytest's output unless it fails")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for pytest (after --)")
    args = parser.parse_args(argv)
    rc = 0
    if args.from_json:
        path = args.from_json
    else:
        extra = list(args.pytest_args) + (["-k", args.k] if args.k else [])
        if args.json:
            path = os.path.abspath(args.json)
        else:
            fd, path = tempfile.mkstemp(prefix="overlaycache-bench-", suffix=".json")
            os.close(fd)
        rc = run_suites(path, extra, args.quiet)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"no benchmark results in {path}: {exc}", file=sys.stderr)
        return rc or 1
    finally:
        if not args.from_json and not args.json:
            os.unlink(path)
    print()
    print(summarize(data))
    return rc


if __name__ == "__main__":
    sys.exit(main())
