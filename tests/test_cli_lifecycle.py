"""The command line over a volume's whole life: every subcommand, its JSON, its errors.

Each command runs through ``main`` as a user would type it; the volume's bytes are checked through
the Python API (and the exported files byte for byte), so a command that reports success without
doing its work fails here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from overlaycache import LocalStore, Volume
from overlaycache.cli import main
from overlaycache.cli._common import parse_size

RS = 4096


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("text", "want"), [("4096", 4096), ("64K", 65536), ("64k", 65536), ("10G", 10 << 30),
                                            ("1.5TiB", 3 << 39), ("1.5T", 3 << 39), ("512MB", 512 << 20),
                                            ("0.5K", 512), (" 7 ", 7)])
def test_human_sizes(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["lots", "1.3", "0.1K", "-4K", "4X", ""])
def test_bad_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_a_volume_from_create_to_restore(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store_dir = tmp_path / "secondary"
    monkeypatch.setenv("OVERLAYCACHE_STORE", f"file://{store_dir}")  # the default of --store
    vol = str(tmp_path / "v")
    made = run_json(capsys, "create", vol, "1M", "--region-size", "4K", "--replication", "async")
    assert made["regions"] == 256 and made["replication"] == "async" and made["secondary"] == f"file://{store_dir}"
    with Volume.open(vol) as v:
        v.write(0, b"a" * 2 * RS)
        v.write(5 * RS, b"b" * RS)
    rep = run_json(capsys, "replicate", vol, "--pit", "--label", "p1")
    assert rep["shipped"] == 3 and rep["lag"] == 0 and rep["pit"]["label"] == "p1"
    local = run_json(capsys, "snapshot", vol, "--label", "l1")
    assert local["kind"] == "local" and local["label"] == "l1"
    with Volume.open(vol) as v:
        v.write(0, b"c" * RS)
    pit2 = run_json(capsys, "snapshot", vol, "--pit", "--label", "p2")
    assert pit2["kind"] == "pit"
    listing = run_json(capsys, "snapshots", vol)
    assert [s["label"] for s in listing["local"]] == ["l1"] and [s["label"] for s in listing["pits"]] == ["p1", "p2"]
    assert run_json(capsys, "diff", vol, "p1", "p2")["regions"] == [0]

    # Failover: regions 0 and 1 lost; reads of them come from the PIT.
    fo = run_json(capsys, "failover", vol, "--lost", "0-1")
    assert fo["unavailable"] == [0, 1] and fo["distributed_overlay"]["snapshot_id"]
    st = run_json(capsys, "status", vol)
    assert not st["healthy"] and st["locations"] == {"PO": 0, "PB": 254, "R": 2}
    with Volume.open(vol, secondary=LocalStore(store_dir)) as v:
        assert v.read(0, RS) == b"c" * RS and v.read(RS, RS) == b"a" * RS
    assert run_json(capsys, "hydrate", vol)["installed"] == 2
    assert run_json(capsys, "status", vol)["locations"]["R"] == 0
    restored = run_json(capsys, "restore", vol, "p1")
    assert restored["rewritten"] == [0] and restored["released_local_snapshots"] == ["1"]
    st = run_json(capsys, "status", vol)
    assert st["healthy"] and st["distributed_overlay"] is None
    with Volume.open(vol) as v:
        assert v.read(0, 2 * RS) == b"a" * 2 * RS and v.read(5 * RS, RS) == b"b" * RS

    # Export a PIT (from the store alone) and the volume; import one back; clone a PIT.
    out = tmp_path / "p2.raw"
    assert run_json(capsys, "export", vol, str(out), "--snapshot", "p2")["size"] == 256 * RS
    raw = out.read_bytes()
    assert raw[:RS] == b"c" * RS and raw[RS : 2 * RS] == b"a" * RS and raw[5 * RS : 6 * RS] == b"b" * RS
    assert raw.count(0) == len(raw) - 3 * RS
    assert os.stat(out).st_blocks * 512 < len(raw)  # zeros left as holes
    imported = run_json(capsys, "import", str(out), str(tmp_path / "imp"), "--region-size", "4K")
    assert imported["data_bytes"] == 3 * RS
    with Volume.open(tmp_path / "imp", readonly=True) as v:
        assert v.read(0, v.size) == raw and set(v.layer_map()) == {0}  # the image is the base
    cl = run_json(capsys, "clone", vol, "p2", str(tmp_path / "cl"))
    assert cl["clone"] == str(tmp_path / "cl")
    with Volume.open(vol, secondary=LocalStore(store_dir)) as v, v.open_clone(tmp_path / "cl") as c:
        assert c.read(0, RS) == b"c" * RS
    info = run_json(capsys, "info", vol)
    assert info["secondary"]["mode"] == "async" and info["replication_lag_regions"] == 1  # restored region 0
    assert run_json(capsys, "replicate", vol)["shipped"] == 1
    info = run_json(capsys, "info", vol)
    assert info["replication_lag_regions"] == 0
    assert info["unavailable_regions"] == 0 and info["in_use_by"] is None


def test_merge_down_and_snapshot_delete_name_what_they_release(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    vol = str(tmp_path / "v")
    assert main(["create", vol, "64K", "--region-size", "4K"]) == 0
    with Volume.open(vol) as v:
        v.write(0, b"x" * RS)
    run_json(capsys, "snapshot", vol, "--label", "a")  # its image is overlay 1 over the base
    run_json(capsys, "snapshot", vol, "--label", "b")
    first = run_json(capsys, "merge-down", vol)
    assert first["regions"] == 1 and first["released_local_snapshots"] == []
    second = run_json(capsys, "merge-down", vol)  # now "a"'s image was the base alone: released
    assert second["released_local_snapshots"] == ["1"]
    assert main(["merge-down", vol]) == 0
    assert "released local snapshots: 2 (b)" in capsys.readouterr().out
    run_json(capsys, "snapshot", vol, "--label", "c")
    gone = run_json(capsys, "snapshot", "delete", vol, "c")
    assert gone["label"] == "c"
    assert run_json(capsys, "snapshots", vol)["local"] == []
    assert main(["snapshot", "delete", vol, "c"]) == 1
    assert "no snapshot 'c'" in capsys.readouterr().err


_HOLDER = textwrap.dedent("""
    import sys, time
    from overlaycache import Volume
    vol = Volume.open(sys.argv[1])
    vol.write(0, b"held")
    vol.flush()
    print("ready", flush=True)
    sys.stdin.read()
    vol.close()
""")


def test_read_only_commands_work_while_another_process_writes(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    vol = str(tmp_path / "v")
    assert main(["create", vol, "64K", "--region-size", "4K"]) == 0
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-P", "-c", _HOLDER, vol], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        info = run_json(capsys, "info", vol)
        assert f"PID {holder.pid}" in info["in_use_by"] and info["regions"] == 16
        assert main(["info", vol]) == 0
        assert f"(PID {holder.pid})" in capsys.readouterr().out
        assert run_json(capsys, "status", vol)["in_use_by"]
        assert run_json(capsys, "snapshots", vol)["local"] == []
        assert main(["snapshot", vol]) == 1  # needs the volume for writing: one line naming the holder
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"PID {holder.pid}" in err and "open for writing elsewhere" in err
    finally:
        holder.communicate("", timeout=30)
    assert main(["snapshot", vol]) == 0


@pytest.mark.parametrize("argv", [
    ["replicate", "{vol}", "--store", "s3://bucket/prefix", "--endpoint-url", "127.0.0.1:8333"],
    ["replicate", "{vol}"],  # no store at all
    ["replicate", "{vol}", "--store", "s3://bucket/p", "--profile", "no-such-profile-here"],
    ["replicate", "{vol}", "--store", "ftp://x/y"],
    ["diff", "{vol}", "p1", "--store", "file:///nonexistent-dir-of-overlaycache/x"],
    ["export", "{vol}", "{tmp}/out.raw", "--snapshot", "nope"],
    ["import", "{tmp}/no-such-image", "{tmp}/imp"],
    ["failover", "{vol}", "--store", "file://{tmp}/s", "--lost", "a-b"],
    ["snapshot", "{vol}", "{vol}"],
])
def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                             argv: list[str]) -> None:
    monkeypatch.delenv("OVERLAYCACHE_STORE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    vol = str(tmp_path / "v")
    assert main(["create", vol, "64K", "--region-size", "4K"]) == 0
    capsys.readouterr()
    assert main([a.format(vol=vol, tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("overlaycache: error: ") and err.count("\n") == 1, err
    if "127.0.0.1:8333" in argv:
        assert "did you mean http://127.0.0.1:8333" in err


def test_ctrl_c_is_a_clean_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from overlaycache.cli import scrub

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(scrub, "run", interrupted)
    assert main(["scrub", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "overlaycache: interrupted\n"


def test_scrub_reports_damage_with_its_own_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = str(tmp_path / "v")
    assert main(["create", vol, "64K", "--region-size", "4K"]) == 0
    with Volume.open(vol) as v:
        v.write(0, b"z" * 4 * RS)
        v.merge_down()
    assert run_json(capsys, "scrub", vol)["bad"] == []
    with open(tmp_path / "v" / "base.data", "r+b") as f:
        f.seek(2 * RS + 7)
        f.write(b"!")
    assert main(["scrub", vol, "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["bad"] == [2]


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("overlaycache ")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("create", "info", "status", "snapshot", "snapshots", "replicate", "scrub", "failover", "hydrate",
                    "diff", "restore", "clone", "merge-down", "import", "export", "serve-nbd", "check", "collapse",
                    "convert", "demo"):
        assert command in text
    assert "exit status" in text and "OVERLAYCACHE_STORE" in text


def test_qcow2_import_and_export_through_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """qemu-img (Debian's qemu-utils, installed by .ci/run) does the qcow2 work both ways."""
    raw = bytearray(1 << 20)
    raw[0:5] = b"qcow2"
    raw[700_000:700_004] = b"tail"
    (tmp_path / "src.raw").write_bytes(bytes(raw))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "src.raw"),
                    str(tmp_path / "src.qcow2")], check=True)
    imported = run_json(capsys, "import", str(tmp_path / "src.qcow2"), str(tmp_path / "v"))
    assert imported["format"] == "qcow2" and imported["size"] == 1 << 20
    with Volume.open(tmp_path / "v", readonly=True) as v:
        assert v.read(0, v.size) == bytes(raw)
    assert run_json(capsys, "export", str(tmp_path / "v"), str(tmp_path / "out.qcow2"), "-O", "qcow2")["size"] == 1 << 20
    cmp = subprocess.run(["qemu-img", "compare", str(tmp_path / "src.raw"), str(tmp_path / "out.qcow2")],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_serve_nbd_until_sigterm(tmp_path: Path) -> None:
    """`serve-nbd` exports the volume to a real client and stops cleanly, flushed, on SIGTERM."""
    import signal

    vol = str(tmp_path / "v")
    assert main(["create", vol, "1M", "--region-size", "64K"]) == 0
    with subprocess.Popen([sys.executable, "-P", "-m", "overlaycache", "serve-nbd", vol, "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None and server.stderr is not None
            line = server.stdout.readline()
            assert "read-write, 1048576 bytes" in line, line
            url = line.rsplit(" at ", 1)[1].strip()
            w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 65536 4096", url], capture_output=True,
                               text=True, timeout=60)
            assert w.returncode == 0 and "wrote 4096" in w.stdout, w.stdout + w.stderr
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 0
            assert "stopped (flushed)" in server.stderr.read()
        finally:
            if server.poll() is None:
                server.kill()
    with Volume.open(vol, readonly=True) as v:
        assert v.read(65536, 4096) == b"\x5a" * 4096 and v.read(0, 4096) == bytes(4096)
