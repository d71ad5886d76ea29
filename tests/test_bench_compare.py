"""Smoke test of ``bench/compare.py --quick``: every comparison runs, checks its bytes and is reported.

Nothing here judges a number: the run must finish, and ``compare.md`` must hold one row per
comparison with a positive ratio (and ``compare.png`` beside it when matplotlib is installed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare.py"
TOOLS = ("qemu-img", "qemu-nbd", "qemu-io", "nbdcopy")
#: One row per comparison, in the order compare.py writes them.
ROWS = 18

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCRIPT.exists(), reason="bench/ is not in this tree"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs qemu-utils and libnbd-bin (" + ", ".join(TOOLS) + ")"),
    pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="needs moto[server]"),
]


def test_compare_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYCACHE_")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--reps", "1", "--out", str(out),
                           "--tmp", str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    md = (out / "compare.md").read_text()
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \| ", line)]
    assert len(rows) == ROWS, md
    for line in rows:
        ratio = re.search(r"\*\*([0-9.]+)\*\*", line)
        assert ratio is not None and float(ratio.group(1)) > 0, line
    for heading in ("## S3 requests and their cost", "## Machine", "## Correctness checks (all passed)"):
        assert heading in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "compare.png").stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("oc-compare-")], "work files left behind"
