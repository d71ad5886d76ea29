"""Golden files pin the on-disk format and the objects on the secondary: a change to either must be a
visible decision.

If a format change is intended, bump the format version, keep reading v1, and regenerate with
``python -m overlaycache.testing.golden tests/golden/v1`` (the volume) or
``python -m overlaycache.testing.golden --manifest tests/golden/v1.manifest`` (a manifest).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from overlaycache import Volume
from overlaycache._impl import core
from overlaycache.remote.layout import (
    decode_volume_record,
    encode_volume_record,
    manifest_key,
    manifests_prefix,
    region_key,
    snapshot_id,
    volume_key,
)
from overlaycache.remote.manifest import decode_manifest
from overlaycache.snapshots import Snapshot
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


# -- the objects on the secondary --------------------------------------------------------------

def test_v1_manifest_decodes() -> None:
    vid, size, rs, seq, created_at, label, regions = make.MANIFEST_V1
    m = decode_manifest((GOLDEN / "v1.manifest").read_bytes())
    assert (m.volume_id, m.size, m.region_size, m.num_regions) == (vid, size, rs, 3)
    assert m.snapshot == Snapshot("0000000000001234", seq, created_at, label)
    for r, (s, b) in enumerate(regions):
        assert m.entry(r) == (s, bytes(core.checksum(bytes([b]) * 16)))


def test_v1_manifest_is_reproduced() -> None:
    """Byte for byte up to the compressed records (zlib's output may differ between its builds)."""
    golden = (GOLDEN / "v1.manifest").read_bytes()
    raw = make.build_manifest_v1()
    head = golden.index(b"golden" + b"vol-1") + len(b"golden" + b"vol-1")
    assert raw[:head] == golden[:head]
    assert decode_manifest(raw) == decode_manifest(golden)


def test_v1_keys() -> None:
    assert volume_key("vol-1") == "volumes/vol-1/volume.json"
    assert region_key("vol-1", 5, 7) == "volumes/vol-1/regions/1b/000000000005/0000000000000007"
    assert manifests_prefix("vol-1") == "volumes/vol-1/snapshots/"
    assert manifest_key("vol-1", 0x1234) == "volumes/vol-1/snapshots/0000000000001234.manifest"
    assert snapshot_id(0x1234) == "0000000000001234"


def test_v1_volume_record() -> None:
    raw = b'{"format": 1, "id": "vol-1", "region_size": 4096, "size": 8292}'
    assert encode_volume_record("vol-1", 8292, 4096) == raw
    assert decode_volume_record(raw, volume_key("vol-1")) == {"format": 1, "id": "vol-1", "region_size": 4096,
                                                             "size": 8292}
