"""Crash harness: run a child Python program and SIGKILL it at a chosen moment after it is ready.

Used by the crash suites (``tests/test_crash.py``, ``tests/test_crash_replication.py``). The child
writes ``READY`` as its first line of standard output once it has opened what it works on, then
reports its progress line by line (flushed); the parent kills it ``delay`` seconds after ``READY``
and reads the report back. A last line without its newline was cut by the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ROOT", "complete_lines", "run_and_kill"]

#: The directory holding the ``overlaycache`` package, put on the child's ``PYTHONPATH``.
ROOT = str(Path(__file__).resolve().parent.parent.parent)


def run_and_kill(program: str, args: list[str], out: Path, delay: float, ready_timeout: float = 60.0) -> str:
    """Run ``program`` (Python source) with ``args``; SIGKILL it ``delay`` seconds after it printed
    ``READY``; return its standard output (its standard error is kept beside ``out``, as ``.err``).

    Raises
    ------
    AssertionError
        The child died before it was ready, was not ready in time, or was not killed by the signal.
    """
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    err = out.with_suffix(".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-P", "-c", program, *args], stdout=stdout, stderr=stderr,
                                env=env)
        try:
            deadline = time.monotonic() + ready_timeout
            while not out.read_text().startswith("READY\n"):
                assert proc.poll() is None, f"child died early: {err.read_text()}"
                assert time.monotonic() < deadline, f"child not ready after {ready_timeout:.0f} s"
                time.sleep(0.005)
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err.read_text()
    return out.read_text()


def complete_lines(report: str) -> list[str]:
    """The report's lines after ``READY`` that were written whole (not cut by the kill)."""
    lines = report.splitlines()
    return lines[1:] if report.endswith("\n") else lines[1:-1]
