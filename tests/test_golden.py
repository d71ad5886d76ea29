"""Golden files pin the on-disk format: a change to it must be a visible decision.

If a format change is intended, bump the format version, keep reading v1, and regenerate with
``python -m overlaycache.testing.golden tests/golden/v1``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from overlaycache import Volume
from overlaycache.testing import golden as make

GOLDEN = Path(__file__).parent / "golden"
RS = 4096


def test_v1_volume_reads_back(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN / "v1", tmp_path / "v")
    with Volume.open(tmp_path / "v") as vol:
        region1 = bytearray(b"B" * RS)
        region1[10:17] = b"OVERLAY"
        assert vol.read(0, vol.size) == b"A" * RS + bytes(region1) + b"C" * RS + b"tail" * 25
        with vol.image("golden") as img:
            assert img.read(0, img.size) == b"A" * RS + b"B" * RS + b"C" * RS + bytes(100)
        assert vol.layer_map() == [0, 3, 2, 3]


def test_v1_files_are_reproduced_byte_for_byte(tmp_path: Path) -> None:
    make.build_v1(str(tmp_path / "v"))
    make.normalise(str(tmp_path / "v"))
    golden = sorted(os.listdir(GOLDEN / "v1"))
    assert sorted(os.listdir(tmp_path / "v")) == golden
    for name in golden:
        assert (tmp_path / "v" / name).read_bytes() == (GOLDEN / "v1" / name).read_bytes(), name
