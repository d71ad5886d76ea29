"""Every code block of README.md runs as written, or is marked as illustrative on purpose.

A fenced block is one of:

* ```` ```python ```` or ```` ```bash ````: run, each in a fresh temporary directory (its current
  directory, and ``TMPDIR``), with a timeout; a non-zero exit fails the test. A block that uses
  ``OVERLAYCACHE_ENDPOINT_URL`` gets it pointed at the session's moto server (reset first), as a
  reader points it at their own S3 server.
* ```` ```text ````: output or pictures, never run.
* a ``python`` or ``bash`` block right after a line ``<!-- not run: REASON -->``: shown, not run
  (a server that runs until stopped, a VM).
* the opening block: the install-and-run commands (``pytest`` there runs this very file), checked
  to be exactly those two lines instead.

Some blocks get extra checks on what they printed or left behind (:data:`CHECKS`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

OPENING = [
    "pip install '.[demo]' && overlaycache demo       # build, install, walk through overlay snapshots and replication",
    "pip install '.[test]' && pytest                  # install the test dependencies and run the whole test suite",
]
RUNNABLE = {"python", "bash"}
ILLUSTRATIVE = {"text"}
TIMEOUT = 120.0
#: Environment variables of the test's own process that would change what a snippet does.
_SCRUB = re.compile(r"^(OVERLAYCACHE_(?!PURE_PYTHON$|REQUIRE_EXTENSIONS$)|AWS_)")

_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_NOT_RUN = re.compile(r"<!--\s*not run(?::\s*(?P<reason>.*?))?\s*-->")


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    lang: str
    code: str
    line: int
    section: str
    not_run: str | None  # the reason given by a "not run" marker, or None

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{slug}-L{self.line}"


def _blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()]
        line = before.count("\n") + 1
        headings = re.findall(r"^## (.+)$", before, re.M)
        previous = before.rstrip("\n").rsplit("\n", 1)[-1]
        marker = _NOT_RUN.search(previous)
        indent = len(m.group("indent"))
        body = "".join(ln[indent:] if ln[:indent].isspace() else ln for ln in m.group("body").splitlines(True))
        out.append(Block(m.group("lang").strip(), textwrap.dedent(body), line, headings[-1] if headings else "",
                         None if marker is None else (marker.group("reason") or "")))
    return out


BLOCKS = _blocks()
TO_RUN = [b for b in BLOCKS[1:] if b.lang in RUNNABLE and b.not_run is None]


def test_the_readme_opens_with_the_install_and_test_commands() -> None:
    first = BLOCKS[0]
    assert first.line == 3 and first.lang == "bash", first
    assert first.code.splitlines() == OPENING


def test_every_block_is_run_or_marked_illustrative() -> None:
    unknown = [f"line {b.line}: ```{b.lang}" for b in BLOCKS if b.lang not in RUNNABLE | ILLUSTRATIVE]
    assert not unknown, f"fence each block as python or bash (run) or text (not run): {unknown}"
    misplaced = [b.line for b in BLOCKS if b.not_run is not None and b.lang not in RUNNABLE]
    assert not misplaced, f"'not run' marks a python or bash block; text blocks never run: lines {misplaced}"
    unexplained = [b.line for b in BLOCKS if b.not_run == ""]
    assert not unexplained, f"say why a block is not run (<!-- not run: REASON -->): lines {unexplained}"
    skipped = [b for b in BLOCKS[1:] if b.not_run is not None]
    assert len(skipped) <= 2, f"keep the blocks that are not run few: {[(b.line, b.not_run) for b in skipped]}"
    sections = {b.section for b in TO_RUN}
    assert {"Using it", "Command line", "Exporting over NBD", "Retention: collapsing old PITs"} <= sections, sections


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.lang == "python"], ids=lambda b: b.id)
def test_python_blocks_need_no_particular_directory(block: Block) -> None:
    absolute = re.findall(r"""["'](/[^"']*)["']""", block.code)
    assert not absolute, f"README line {block.line}: absolute paths {absolute}: make them relative (run anywhere)"


def _environment(tmp_path: Path, block: Block, request: pytest.FixtureRequest) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
    env["TMPDIR"] = str(tmp_path)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # never wait for an instance role
    if "OVERLAYCACHE_ENDPOINT_URL" in block.code:
        endpoint: str = request.getfixturevalue("moto_endpoint")
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
        env["OVERLAYCACHE_ENDPOINT_URL"] = endpoint
    return env


def _check_command_line(block: Block, proc: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    out = proc.stdout
    assert "DEGRADED: 16 unavailable regions" in out and "16 from the remote PIT (R)" in out
    assert "hydrated 16 regions" in out and '"distributed_overlay": null' in out
    exported = next(tmp_path.glob("tmp*/T1.raw"))
    raw = exported.read_bytes()
    assert raw[:4096] == b"boot" * 1024 and raw.count(0) == len(raw) - 4096
    # The status output the README shows after the walkthrough is what status printed.
    shown = next(b for b in BLOCKS
                 if b.lang == "text" and b.section == block.section and "overlaycache status" in b.code)
    for line in shown.code.splitlines():
        if line.startswith("$") or "..." in line or not line.strip():
            continue
        assert line in out.splitlines(), f"README line {shown.line}: {line!r} is not what status printed:\n{out}"


def _check_nbd(block: Block, proc: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    qcow2 = tmp_path / "T1.qcow2"
    assert qcow2.read_bytes()[:4] == b"QFI\xfb", "qemu-img convert did not write a qcow2 image"


#: Extra checks per README section, after its block ran.
CHECKS: dict[str, Callable[[Block, subprocess.CompletedProcess[str], Path], None]] = {
    "Command line": _check_command_line,
    "Exporting over NBD": _check_nbd,
}


@pytest.mark.parametrize("block", TO_RUN, ids=lambda b: b.id)
def test_the_block_runs_as_written(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    for tool in sorted(set(re.findall(r"\b(qemu-(?:img|io))\b", block.code))):
        if shutil.which(tool) is None:  # CI installs it, as for tests/test_nbd.py: fail, not skip
            pytest.fail(f"README line {block.line} needs {tool}: apt-get install qemu-utils")
    env = _environment(tmp_path, block, request)
    if block.lang == "python":
        (tmp_path / "snippet.py").write_text(block.code, encoding="utf-8")
        argv = [sys.executable, "snippet.py"]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    try:
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"README line {block.line} ({block.section}) ran over {TIMEOUT:.0f} s: {exc}")
    if proc.returncode != 0:
        pytest.fail(f"README line {block.line} ({block.section}) exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}", pytrace=False)
    check = CHECKS.get(block.section)
    if check is not None:
        check(block, proc, tmp_path)
