"""Run the benchmarks of two revisions side by side and print new / old throughput per benchmark.

Usage (from anywhere inside the repository)::

    python bench/compare_revisions.py OLD NEW                  # the read path, 3 passes of each
    python bench/compare_revisions.py OLD NEW -k test_bench_failover --rounds 2
    python bench/compare_revisions.py OLD NEW --json cmp.json  # also keep every pass's results
    python bench/compare_revisions.py --from-json cmp.json     # only print the tables of an earlier run

Each revision is checked out with ``git worktree add --detach`` in a temporary directory, its
Cython core is built in place, and its own ``bench/`` is run there (``pytest bench
--benchmark-enable``) with that worktree as the working directory and first on ``PYTHONPATH``, so
the package measured is the worktree's and not an editable install; a probe plugin records which
``overlaycache`` and which compiled core each run imported, and a run that imported anything else
is an error. ``OVERLAYCACHE_REQUIRE_EXTENSIONS=1`` keeps a missing build from falling back to the
pure-Python core.

The two trees run alternately (old, new, old, new, ...; ``--rounds`` passes of each), so that load
from other jobs on the machine falls on both alike. For every benchmark (a ``pair`` and
``variant`` of ``bench/_support.py:record``) present in both trees the table gives the median time
of a round in each tree (the median over passes of each pass's median, a pass's median pooling the
interleaved passes that ``bench/`` itself runs), the new / old throughput (above 1: the new tree is
faster), the noise of each tree (spread of its per-pass medians) and each tree's ratio to the
fastest raw baseline of the same pair, computed as ``bench/report.py`` does (median rounds, all
passes pooled). Baseline variants run the same code in both trees, so their new / old ratio shows
how far the machine alone moves a result. The worktrees are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, ModuleType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

#: Default selection: bench/test_bench_read.py (warm sequential and random reads, cold reads) and the
#: batch region lookup of the read path; a few minutes per pass pair on a 2-core machine.
DEFAULT_K = "test_bench_read or test_resolve_16M"

#: Plugin loaded into every pytest run (``-p``): records what was imported into the benchmark JSON.
_PROBE_NAME = "_oc_compare_probe"
_PROBE_SOURCE = '''\
"""Written by bench/compare_revisions.py: records which overlaycache a benchmark run imported."""
import sys


def pytest_benchmark_update_json(config, benchmarks, output_json):
    pkg = sys.modules.get("overlaycache")
    impl = sys.modules.get("overlaycache._impl")
    core = getattr(impl, "core", None)
    output_json["compare_revisions"] = {
        "overlaycache": getattr(pkg, "__file__", None),
        "core_module": getattr(core, "__name__", None),
        "core_file": getattr(core, "__file__", None),
    }
'''


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout.strip()


def _load_report(path: str) -> ModuleType:
    """A ``bench/report.py``, loaded by path (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("_oc_bench_report", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("merge_passes", "_work", "_fmt_time", "_table"):
        if not hasattr(module, name):
            raise ImportError(f"{path} has no {name}()")
    return module


@contextmanager
def _worktrees(repo: str, revs: dict[str, str], parent: str | None) -> Iterator[tuple[str, dict[str, str]]]:
    """Detached worktrees of ``revs`` (label -> commit) in a temporary directory, removed on exit."""
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="oc-compare-", dir=parent)
    made: list[str] = []
    try:
        paths: dict[str, str] = {}
        for label, sha in revs.items():
            path = os.path.join(tmp, label)
            _git(repo, "worktree", "add", "--detach", path, sha)
            made.append(path)
            paths[label] = path
        yield tmp, paths
    finally:
        for path in made:
            try:
                _git(repo, "worktree", "remove", "--force", path)
            except subprocess.CalledProcessError as exc:
                print(f"could not remove worktree {path}: {exc.stderr.strip()}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _git(repo, "worktree", "prune")
        except subprocess.CalledProcessError:
            pass


def _env(worktree: str, probe_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([worktree, probe_dir])
    env["OVERLAYCACHE_REQUIRE_EXTENSIONS"] = "1"
    env.pop("OVERLAYCACHE_PURE_PYTHON", None)
    return env


def build(worktree: str) -> None:
    """Build the Cython core in place in ``worktree``; its output is shown only on failure."""
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=worktree,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout)
        raise RuntimeError(f"building the core in {worktree} failed")


def _check_imports(where: dict[str, Any] | None, worktree: str) -> None:
    """Raise unless the package and its compiled core came from ``worktree``."""
    root = os.path.realpath(worktree) + os.sep
    if not where:
        raise RuntimeError(f"run in {worktree} did not record what it imported")
    for key in ("overlaycache", "core_file"):
        if not where.get(key) or not os.path.realpath(where[key]).startswith(root):
            raise RuntimeError(f"run in {worktree} imported {key} from {where.get(key)}")
    if where.get("core_module") != "overlaycache._core":
        raise RuntimeError(f"run in {worktree} used core {where.get('core_module')}, not the compiled one")


def run_pass(worktree: str, probe_dir: str, json_path: str, selection: str, quiet: bool) -> dict[str, Any]:
    """One ``pytest bench`` run of ``worktree``; returns its benchmark JSON (imports checked)."""
    cmd = [sys.executable, "-m", "pytest", "bench", "--benchmark-enable", f"--benchmark-json={json_path}",
           "-p", "no:cacheprovider", "-p", _PROBE_NAME, "-q", "-k", selection]
    if quiet:
        cmd.append("--benchmark-quiet")
    print(f"+ (cd {worktree} && PYTHONPATH={worktree} {' '.join(cmd)})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=worktree, env=_env(worktree, probe_dir),
                          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                          text=True)
    if proc.returncode:
        if quiet:
            sys.stderr.write(proc.stdout or "")
        raise RuntimeError(f"pytest in {worktree} exited with {proc.returncode}")
    with open(json_path) as f:
        data: dict[str, Any] = json.load(f)
    _check_imports(data.get("compare_revisions"), worktree)
    if not data.get("benchmarks"):
        raise RuntimeError(f"no benchmarks selected by -k {selection!r}")
    return data


def _slim(data: dict[str, Any]) -> dict[str, Any]:
    """The parts of a pytest-benchmark JSON that the tables need."""
    return {
        "machine_info": data.get("machine_info", {}),
        "datetime": data.get("datetime"),
        "compare_revisions": data.get("compare_revisions"),
        "benchmarks": [{"name": b["name"], "extra_info": b.get("extra_info", {}),
                        "stats": {k: b["stats"][k] for k in ("min", "median", "data") if k in b["stats"]}}
                       for b in data.get("benchmarks", [])],
    }


def _by_variant(report: ModuleType, benchmarks: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(pair, variant) -> merged entry, as report.merge_passes merges a run's interleaved passes."""
    return {(pair, e["extra_info"]["variant"]): e
            for pair, entries in report.merge_passes(benchmarks).items() for e in entries}


def _baseline_ratios(report: ModuleType, benchmarks: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Throughput / fastest baseline throughput of the same pair, on median rounds (as report.py)."""
    out: dict[tuple[str, str], float] = {}
    for pair, entries in report.merge_passes(benchmarks).items():
        def tp(e: dict[str, Any]) -> float:
            return float(report._work(e["extra_info"])[0]) / float(e["stats"]["median"])

        bases = [tp(e) for e in entries if e["extra_info"]["role"] == "baseline"]
        if bases:
            for e in entries:
                out[(pair, e["extra_info"]["variant"])] = tp(e) / max(bases)
    return out


def summarize(report: ModuleType, result: dict[str, Any]) -> str:
    """The comparison table of ``result`` (as written by ``--json``)."""
    trees = result["trees"]
    old, new = trees["old"], trees["new"]
    per_pass: dict[str, list[dict[tuple[str, str], dict[str, Any]]]] = {
        label: [_by_variant(report, p["benchmarks"]) for p in trees[label]["passes"]] for label in ("old", "new")}
    pooled = {label: [b for p in trees[label]["passes"] for b in p["benchmarks"]] for label in ("old", "new")}
    vs_base = {label: _baseline_ratios(report, pooled[label]) for label in ("old", "new")}
    keys = sorted(set.intersection(*(set(k for p in per_pass[label] for k in p) for label in ("old", "new"))))

    def medians(label: str, key: tuple[str, str]) -> list[float]:
        return [float(p[key]["stats"]["median"]) for p in per_pass[label] if key in p]

    order = {"ours": 0, "diagnostic": 1, "baseline": 2, "info": 3}
    rows: list[list[str]] = []
    for key in sorted(keys, key=lambda k: (k[0], order.get(per_pass["new"][0].get(k, {}).get(
            "extra_info", {}).get("role", "info"), 4), k[1])):
        info_old = next(p[key]["extra_info"] for p in per_pass["old"] if key in p)
        info_new = next(p[key]["extra_info"] for p in per_pass["new"] if key in p)
        m_old, m_new = medians("old", key), medians("new", key)
        t_old, t_new = statistics.median(m_old), statistics.median(m_new)
        w_old, w_new = report._work(info_old)[0], report._work(info_new)[0]
        speed = (w_new / t_new) / (w_old / t_old)
        rows.append([
            key[0], key[1], info_new.get("role", "?"), report._fmt_time(t_old), report._fmt_time(t_new),
            f"{speed:6.3f}",
            f"{(max(m_old) / min(m_old) - 1) * 100:4.1f}%", f"{(max(m_new) / min(m_new) - 1) * 100:4.1f}%",
            f"{vs_base['old'][key]:6.3f}" if key in vs_base["old"] else "-",
            f"{vs_base['new'][key]:6.3f}" if key in vs_base["new"] else "-",
        ])
    mi = old["passes"][0].get("machine_info", {}) if old["passes"] else {}
    lines = [
        f"old {old['rev']} ({old['sha'][:10]}) vs new {new['rev']} ({new['sha'][:10]}); -k {result['selection']!r}; "
        f"{len(old['passes'])} passes of each, alternating (old first)",
        f"machine: {mi.get('cpu', {}).get('brand_raw', '?')}, {mi.get('cpu', {}).get('count', '?')} cpus, "
        f"python {mi.get('python_version', '?')}; load before/after: {result.get('load', '?')}",
        "",
        "median: median over passes of each pass's median round; new/old: throughput ratio (>1: new faster);",
        "noise: spread (max/min - 1) of one tree's per-pass medians; vs base: throughput / fastest baseline",
        "of the same pair (report.py's ratio(med), passes pooled). Baselines run the same code in both trees.",
        report._table(rows, ["pair", "variant", "role", "old median", "new median", "new/old", "noise old",
                             "noise new", "old vs base", "new vs base"]),
    ]
    missing = sorted(set(k for p in per_pass["old"] + per_pass["new"] for k in p) - set(keys))
    if missing:
        lines.append("only in one tree: " + ", ".join(f"{p}/{v}" for p, v in missing))
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def compare(old: str, new: str, selection: str, rounds: int, quiet: bool, workdir: str | None,
            repo: str) -> tuple[dict[str, Any], ModuleType]:
    """Check out, build and benchmark ``old`` and ``new`` alternately; returns the results and report.py."""
    revs = {"old": _git(repo, "rev-parse", "--verify", f"{old}^{{commit}}"),
            "new": _git(repo, "rev-parse", "--verify", f"{new}^{{commit}}")}
    result: dict[str, Any] = {"selection": selection, "trees": {}}
    with _worktrees(repo, revs, workdir) as (tmp, paths):
        probe_dir = os.path.join(tmp, "probe")
        os.mkdir(probe_dir)
        with open(os.path.join(probe_dir, _PROBE_NAME + ".py"), "w") as f:
            f.write(_PROBE_SOURCE)
        for label, path in paths.items():
            print(f"building {label} ({revs[label][:10]}) in {path}", file=sys.stderr, flush=True)
            build(path)
        report = _load_report(os.path.join(paths["new"], "bench", "report.py"))
        result["trees"] = {label: {"rev": rev, "sha": revs[label], "passes": []}
                           for label, rev in (("old", old), ("new", new))}
        loads = [_load()]
        for i in range(rounds):
            for label in ("old", "new"):
                start = time.monotonic()
                data = run_pass(paths[label], probe_dir, os.path.join(tmp, f"{label}-{i}.json"), selection, quiet)
                result["trees"][label]["passes"].append(_slim(data))
                print(f"pass {i + 1}/{rounds} {label}: {time.monotonic() - start:.0f} s, load {_load()}",
                      file=sys.stderr, flush=True)
                loads.append(_load())
        result["load"] = f"{loads[0]} / {loads[-1]}"
        result["loads"] = loads
    return result, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", nargs="?", help="the revision before the change (any git revision)")
    parser.add_argument("new", nargs="?", help="the revision after the change")
    parser.add_argument("-k", default=DEFAULT_K, help=f"pytest -k selection (default: {DEFAULT_K!r})")
    parser.add_argument("--rounds", type=int, default=3, help="passes of each tree, alternating (default 3)")
    parser.add_argument("--json", help="keep the results of every pass here")
    parser.add_argument("--from-json", help="do not run; print the tables of an earlier --json file")
    parser.add_argument("--workdir", help="where to make the temporary worktrees (default: the system temp dir)")
    parser.add_argument("--verbose", action="store_true", help="show pytest's output (hidden unless it fails)")
    args = parser.parse_args(argv)
    repo = _git(HERE, "rev-parse", "--show-toplevel")
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        source = _git(repo, "show", f"{result['trees']['new']['sha']}:bench/report.py")
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            path = os.path.join(tmp, "report.py")
            with open(path, "w") as f:
                f.write(source + "\n")
            print(summarize(_load_report(path), result))
        return 0
    if not args.old or not args.new:
        parser.error("OLD and NEW are required unless --from-json is given")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result, report = compare(args.old, args.new, args.k, args.rounds, not args.verbose, args.workdir, repo)
    except KeyboardInterrupt:
        print("interrupted; worktrees removed", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None)
        print(f"error: {exc}{': ' + detail.strip() if detail else ''}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print()
    print(summarize(report, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
