"""The command line: the demo tells the story right, and errors are one line with a non-zero exit."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from overlaycache.cli import main
from overlaycache.cli.demo import demo, demo_replication


def rows(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("  ") and len(line) > 50:
            out[line[:49].strip()] = " ".join(line[49:].split())
    return out


def test_demo_fig2(tmp_path: Path) -> None:
    buf = io.StringIO()
    demo(str(tmp_path), buf)
    got = rows(buf.getvalue())
    assert got["write 1->0 (goes to the overlay)"] == "1 b c z e f g h"
    assert got["image of snapshot T1 (base unchanged)"] == "a b c d e f g h"
    assert got["layer serving each region (O overlay, B base)"] == "O B B O B B B B"
    assert got["reopened: the virtual image"] == "1 b c z e f g h"


def test_demo_replication_reads_back_from_the_store(tmp_path: Path, moto_endpoint: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    buf = io.StringIO()
    demo_replication(moto_endpoint, "demo-bucket", str(tmp_path), buf)
    got = rows(buf.getvalue())
    t1 = next(v for k, v in got.items() if k.startswith("image of T1"))
    t2 = next(v for k, v in got.items() if k.startswith("image of T2"))
    assert t1 == "a b c d e f g h" and t2 == "1 b c z e f 4 h"
    assert "11 region versions stored in 2 packs" in buf.getvalue()


def test_cli_commands_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = str(tmp_path / "v")
    assert main(["create", vol, "64K", "--region-size", "4K"]) == 0
    assert main(["snapshot", vol, "--label", "first"]) == 0
    assert main(["info", vol]) == 0
    out = capsys.readouterr().out
    assert "16 regions of 4096" in out and "snapshot     1 first at layer 1" in out
    assert main(["merge-down", vol]) == 0
    assert main(["info", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("overlaycache: error:") and err.count("\n") == 1
    assert main(["create", str(tmp_path / "w"), "0"]) == 1
    assert "size must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["create", vol, "lots"])
    assert info.value.code == 2


def test_demo_failover_tells_the_story(tmp_path: Path, moto_endpoint: str) -> None:
    from overlaycache.cli.demo import demo_failover

    buf = io.StringIO()
    demo_failover(moto_endpoint, "testing", "testing-secret", "demo-failover", str(tmp_path), buf)
    got = rows(buf.getvalue())
    assert got["location map (Fig. 3D)"] == "PO PB R PO PB R PB PB"
    assert got["write u->0, 7->3"] == "u b c 7 e f 4 h"
    assert got["recovery image of T5, beside the volume"] == "1 b c z e f 4 h"
    assert got["recovery image of T6, at the same time"] == "u b c 7 e f 4 h"
    assert got["clone of T5: write Q->1 in the clone only"] == "1 Q c z e f 4 h"
    assert got["the volume is unchanged"] == "u b c 7 e f 4 h"
    assert got["hydrate: 2 remote regions copied back"] == "PO PB PO PO PB PO PB PB"
    assert got["restore T5: rewrote regions 0,3"] == "1 b c z e f 4 h"  # 2 and 5 were hydrated
    assert got["location map: distributed overlay ended"] == "PB PB PB PB PB PB PB PB"
    assert got["layer map: all folded into the base (0)"] == "0 0 0 0 0 0 0 0"


def test_collapse_and_check_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from overlaycache import LocalStore, Volume

    store_dir = tmp_path / "store"
    with Volume.create(tmp_path / "v", 8 * 4096, region_size=4096, secondary=LocalStore(store_dir),
                       replication="periodic", period=3600.0) as vol:
        for i in range(5):
            vol.write(i * 4096, bytes([i + 1]) * 4096)
            vol.write(7 * 4096, bytes([i + 1]) * 4096)  # region 7's version dies with each dropped PIT
            vol.snapshot(f"s{i}")
        vid = vol.id
    capsys.readouterr()
    assert main(["collapse", str(store_dir), vid, "--policy", "1d@7d", "--keep-last", "2", "--pin", "s0",
                 "--now", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("keep ") == 3 and out.count("remove ") == 2 and "would be deleted" in out
    assert "0 packs would be repacked" in out  # half dead: not more than the default 0.5
    assert len(LocalStore(store_dir).snapshots(vid)) == 5
    assert main(["collapse", f"file://{store_dir}", vid, "--policy", "", "--keep-last", "2", "--pin", "s0",
                 "--now", "0", "--max-unused", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packs_repacked"] == 2 and report["bytes_moved"] == 2 * 4096  # s1's and s2's, region 7 dropped
    assert [k["label"] for k in report["kept"]] == ["s0", "s3", "s4"] and len(report["removed"]) == 2
    assert report["kept"][0]["reasons"] == ["pinned 's0'"] and report["objects_deleted"] >= 2
    assert [s.label for s in LocalStore(store_dir).snapshots(vid)] == ["s0", "s3", "s4"]
    assert main(["check", str(store_dir), vid]) == 0
    assert "no problems" in capsys.readouterr().out
    for argv in (["collapse", str(store_dir), vid, "--policy", "1x@1d"],
                 ["collapse", str(store_dir), vid, "--policy", "1h@1d", "--max-unused", "2"],
                 ["collapse", str(store_dir), "f" * 32, "--policy", "1h@1d"],
                 ["check", str(store_dir), "f" * 32]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("overlaycache: error: ") and err.count("\n") == 1


def test_convert_a_format_1_volume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`overlaycache convert` converts a volume of local format 1; a second run is a one-line error."""
    import shutil

    shutil.copytree(Path(__file__).parent / "golden" / "v1", tmp_path / "v")
    assert main(["info", str(tmp_path / "v")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overlaycache convert" in err
    assert main(["convert", str(tmp_path / "v")]) == 0
    assert "converted" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "v")]) == 1
    assert "already of local format 2" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "v")]) == 0
