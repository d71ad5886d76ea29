"""``import overlaycache`` needs only the runtime dependencies: the test harnesses and the test
tools they use stay out of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import overlaycache

PROBE = """
import json, sys
import overlaycache
print(json.dumps(sorted(m for m in sys.modules
                        if m.split(".")[0] in ("pytest", "_pytest", "hypothesis", "moto")
                        or m.startswith("overlaycache.testing"))))
"""


def test_import_overlaycache_leaves_test_tools_alone(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(overlaycache.__file__).parent.parent)  # the package under test
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert json.loads(out.stdout) == []
