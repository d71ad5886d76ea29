"""README snippets run as written (those that need nothing but this machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(section: str, lang: str) -> str:
    text = README.read_text()
    start = text.index(f"## {section}")
    m = re.search(rf"```{lang}\n(.*?)```", text[start:], re.S)
    assert m, f"no {lang} block in README section {section!r}"
    return m.group(1)


def test_the_command_line_walkthrough_runs_as_written(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", _block("Command line", "bash")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "DEGRADED: 16 unavailable regions" in out and "16 from the remote PIT (R)" in out
    assert "hydrated 16 regions" in out and '"distributed_overlay": null' in out
    exported = next(tmp_path.glob("tmp*/T1.raw"))
    raw = exported.read_bytes()
    assert raw[:4096] == b"boot" * 1024 and raw.count(0) == len(raw) - 4096
