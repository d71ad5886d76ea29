"""Golden files pin the on-disk format and the objects on the secondary: a change to either must be a
visible decision.

If a format change is intended, bump the format version and regenerate with
``python -m overlaycache.testing.golden tests/golden/local-v2`` (the local volume) or
``python -m overlaycache.testing.golden --v2 tests/golden`` (the v2 pack, roots and map pages).
``tests/golden/v1.manifest`` is a PIT manifest of the removed format v1, kept to show that a v1
store is refused, and ``tests/golden/v1`` a volume of local format 1, kept to show that it is
refused by name; neither is rebuilt.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from overlaycache import Volume
from overlaycache._impl import core
from overlaycache.errors import CorruptionError, FormatError
from overlaycache.remote.layout import (
    NO_DIGEST,
    PAGE_HEAD,
    ROOT_HEAD,
    Root,
    check_volume_format,
    decode_page,
    decode_root,
    decode_root_header,
    decode_volume_record,
    encode_volume_record,
    pack_key,
    page_key,
    root_key,
    snapshot_id,
    verify_pack,
    version_digest,
    volume_key,
)
from overlaycache.remote.tree import PageSource, PitMap
from overlaycache.replication.maps import RemoteMap
from overlaycache.store import LocalStore
from overlaycache.testing import golden as make

GOLDEN = Path(__file__).parent / "golden"
#: The v2 objects as written before digests (pack and page version 2), kept to show they still read.
LEGACY = GOLDEN / "v2-digestless"
RS = 4096


def test_local_volume_reads_back(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN / "local-v2", tmp_path / "v")
    for readonly in (True, False):  # the journal is replayed, then checkpointed by the writable open's close
        with Volume.open(tmp_path / "v", readonly=readonly) as vol:
            region1 = bytearray(b"B" * RS)
            region1[10:17] = b"OVERLAY"
            assert vol.read(0, vol.size) == b"A" * RS + bytes(region1) + b"C" * RS + b"tail" * 25
            with vol.image("golden") as img:
                assert img.read(0, img.size) == b"A" * RS + b"B" * RS + b"C" * RS + bytes(100)
            assert vol.layer_map() == [0, 3, 2, 3]


def test_local_files_are_reproduced_byte_for_byte(tmp_path: Path) -> None:
    make.build_local(str(tmp_path / "v"))
    make.normalise(str(tmp_path / "v"))
    golden = sorted(os.listdir(GOLDEN / "local-v2"))
    assert sorted(os.listdir(tmp_path / "v")) == golden
    for name in golden:
        assert (tmp_path / "v" / name).read_bytes() == (GOLDEN / "local-v2" / name).read_bytes(), name


def test_local_format_1_is_refused_by_name_and_converted(tmp_path: Path) -> None:
    """A volume of local format 1 is never misread: opening it is a FormatError that says how to
    convert it; converted, it reads as it did, snapshots included, and takes writes."""
    from overlaycache.local.convert import convert_volume

    shutil.copytree(GOLDEN / "v1", tmp_path / "v")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "v").iterdir()}
    for readonly in (True, False):
        with pytest.raises(FormatError, match="local format 1.*overlaycache convert") as err:
            Volume.open(tmp_path / "v", readonly=readonly)
        assert err.value.path == str(tmp_path / "v" / "volume.json")
    assert {p.name: p.read_bytes() for p in (tmp_path / "v").iterdir() if p.name != "lock"} == saved
    report = convert_volume(tmp_path / "v")
    assert (report.overlays, report.regions, report.unavailable) == (2, 3, [])
    with pytest.raises(FormatError, match="already"):
        convert_volume(tmp_path / "v")
    region1 = bytearray(b"B" * RS)
    region1[10:17] = b"OVERLAY"
    with Volume.open(tmp_path / "v") as vol:
        assert vol.read(0, vol.size) == b"A" * RS + bytes(region1) + b"C" * RS + b"tail" * 25
        with vol.image("golden") as img:
            assert img.read(0, img.size) == b"A" * RS + b"B" * RS + b"C" * RS + bytes(100)
        assert vol.layer_map() == [0, 3, 2, 3]
        vol.write(0, b"new")
    with Volume.open(tmp_path / "v") as vol:
        assert vol.read(0, 4) == b"newA"
        assert vol.merge_down() >= 1


def test_conversion_of_a_damaged_version_and_a_resumed_one(tmp_path: Path) -> None:
    """A format-1 version that fails its checksum is not converted: its region is unavailable. A
    conversion interrupted once its files were complete is finished by the next run."""
    from unittest import mock

    from overlaycache.errors import RegionUnavailableError
    from overlaycache.local import convert as convert_mod

    shutil.copytree(GOLDEN / "v1", tmp_path / "v")
    n = 4
    with open(tmp_path / "v" / "overlay-2.data", "r+b") as f:  # region 2 ('C'), slot 0 of overlay 2
        f.seek(2 * RS + 5)
        f.write(b"!")
    real = convert_mod.write_json_atomic
    with mock.patch.object(convert_mod, "write_json_atomic", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            convert_mod.convert_volume(tmp_path / "v")
    assert convert_mod.write_json_atomic is real
    with pytest.raises(FormatError, match="local format 1"):
        Volume.open(tmp_path / "v")
    report = convert_mod.convert_volume(tmp_path / "v")
    assert report.resumed
    with Volume.open(tmp_path / "v") as vol:
        assert vol.unavailable == frozenset({2})
        with pytest.raises(RegionUnavailableError):
            vol.read(2 * RS, 1)
        assert vol.read(0, RS) == b"A" * RS and vol.num_regions == n


# -- the objects on the secondary (format v2) ---------------------------------------------------

def _sum(data: bytes) -> bytes:
    return bytes(core.checksum(data))


def test_v2_keys() -> None:
    assert volume_key("vol-1") == "volumes/vol-1/volume.json"
    assert pack_key("vol-1", 7) == "volumes/vol-1/packs/b2/0000000000000007.pack"
    assert page_key("vol-1", bytes(range(16))) == "volumes/vol-1/pages/00/000102030405060708090a0b0c0d0e0f"
    assert root_key("vol-1", 0x1234) == "volumes/vol-1/snapshots/0000000000001234.root"
    assert snapshot_id(0x1234) == "0000000000001234"


def test_v2_volume_record() -> None:
    raw = (b'{"checksum": "40371c607dc79f6651496460cc1e062c", "format": 2, "id": "vol-1", "region_size": 4096, '
           b'"size": 8292}')
    got = encode_volume_record("vol-1", 8292, 4096)
    assert got == raw, got
    info = decode_volume_record(raw, volume_key("vol-1"))
    assert info == {"format": 2, "id": "vol-1", "region_size": 4096, "size": 8292}
    check_volume_format(info, "here")  # accepted: no exception
    # A record written before the checksum was added reads as it is.
    old = b'{"format": 2, "id": "vol-1", "region_size": 4096, "size": 8292}'
    assert decode_volume_record(old, volume_key("vol-1")) == info
    with pytest.raises(CorruptionError, match="checksum"):
        decode_volume_record(raw.replace(b"8292", b"8293"), volume_key("vol-1"))
    with pytest.raises(CorruptionError, match="not of this key"):
        decode_volume_record(old, volume_key("vol-2"))


@pytest.mark.parametrize("raw", [b'{"format": 1, "id": "vol-1", "region_size": 4096, "size": 8292}',
                                 b'{"id": "vol-1", "region_size": 4096, "size": 8292}'],
                         ids=["format-1", "no-format"])
def test_a_v1_volume_record_is_refused(raw: bytes) -> None:
    info = decode_volume_record(raw, volume_key("vol-1"))
    assert info["format"] == 1  # a record without "format" was written by v1
    with pytest.raises(FormatError, match="format 1"):
        check_volume_format(info, "here")


@pytest.mark.parametrize(("where", "start"), [(GOLDEN, 189), (LEGACY, 157)], ids=["digests", "digestless"])
def test_v2_pack_decodes(where: Path, start: int) -> None:
    """The pack of version 3 (entries with digests) and the one of version 2 (without), still read."""
    raw = (where / "v2.pack").read_bytes()
    vid, rs, pack, created_at, versions = make.PACK_V2
    index = verify_pack(raw)
    assert (index.volume_id, index.region_size, index.pack, index.created_at) == (vid, rs, pack, created_at)
    assert index.data_offset == start and len(raw) == start + 4096 + 100 + 16
    assert [(e.region, e.seq, e.offset, e.length) for e in index.entries] == [
        (1, 5, start, 4096), (2, 6, start + 4096, 100)]
    for e, (_r, _s, data) in zip(index.entries, versions, strict=True):
        assert raw[e.offset : e.offset + e.length] == data and e.checksum == _sum(data)
        assert e.digest == (version_digest(data) if where == GOLDEN else NO_DIGEST)
    assert raw[:8] == b"OCPACK02" and raw[-16:] == _sum(raw[:-16])
    assert struct.unpack_from("<I", raw, 8)[0] == (3 if where == GOLDEN else 2)


def test_v2_pack_is_reproduced_byte_for_byte() -> None:
    """A pack is not compressed: every byte is pinned."""
    assert make.build_pack_v2() == (GOLDEN / "v2.pack").read_bytes()


ROOTS = [("v2.root", make.ROOT_V2, 1, 1), ("v2-deep.root", make.DEEP_ROOT_V2, 2, 5)]


def _golden_pages(where: Path = GOLDEN) -> dict[bytes, bytes]:
    return {bytes.fromhex(p.name): p.read_bytes() for p in (where / "v2-pages").iterdir()}


@pytest.mark.parametrize("where", [GOLDEN, LEGACY], ids=["digests", "digestless"])
@pytest.mark.parametrize(("name", "spec", "depth", "npages"), ROOTS, ids=[r[0] for r in ROOTS])
def test_v2_root_and_pages_decode(tmp_path: Path, name: str, spec: make.RootSpec, depth: int,
                                  npages: int, where: Path) -> None:
    """The pages of version 3 (leaves with digests) and of version 2 (without), still read."""
    vid, size, rs, seq, created_at, label, records = spec
    raw = (where / name).read_bytes()
    root = decode_root(raw)
    assert (root.volume_id, root.size, root.region_size, root.seq, root.created_at, root.label, root.depth) == (
        vid, size, rs, seq, created_at, label, depth)
    assert decode_root_header(raw) == (seq, created_at, label, vid)
    store = LocalStore(tmp_path / "s")
    for address, page in _golden_pages(where).items():
        store.put(page_key(vid, address), page)
    pages = PageSource(store, vid)
    pit = PitMap(root, pages)
    expected = {r: (s, p, o, n, _sum(d)) for r, s, p, o, n, d in records}
    assert {r: (s, p, o, n, c) for r, s, p, o, n, c, _d in pit.stored()} == expected
    digests = {r: version_digest(d) if n and where == GOLDEN else NO_DIGEST for r, _s, _p, _o, n, d in records}
    assert {r: d for r, _s, _p, _o, _n, _c, d in pit.stored()} == digests
    for r in sorted(expected) + [1, root.num_regions - 2]:
        assert pit.record(r) == expected.get(r, (0, 0, 0, 0, bytes(16))), r
    assert len(list(pit.page_addresses())) == npages and pages.gets == npages


def test_v2_pages_are_the_pages_of_the_two_roots() -> None:
    """Every golden page is named by its address and belongs to one of the roots; nothing else."""
    built: dict[bytes, bytes] = {}
    for _name, spec, _d, _n in ROOTS:
        built.update(make.build_root_v2(spec)[1])
    golden = _golden_pages()
    assert sorted(golden) == sorted(built)
    for address, raw in golden.items():
        level, index = PAGE_HEAD.unpack_from(raw)[2:4]
        decode_page(raw, address, level, index)  # verified against its address


@pytest.mark.parametrize(("name", "spec", "depth", "npages"), ROOTS, ids=[r[0] for r in ROOTS])
def test_v2_root_and_pages_are_reproduced(name: str, spec: make.RootSpec, depth: int, npages: int) -> None:
    """Byte for byte up to the compressed parts (zlib's output may differ between its builds): the
    root's header, label, volume id and header checksum; each page's header and address; and what
    the compressed parts decompress to."""
    golden = (GOLDEN / name).read_bytes()
    raw, pages = make.build_root_v2(spec)
    vid, label = spec[0], spec[5]
    head = ROOT_HEAD.size + len((label or "").encode()) + len(vid.encode()) + 16
    assert raw[:head] == golden[:head]
    assert zlib.decompress(raw[head:-16]) == zlib.decompress(golden[head:-16])
    assert decode_root(raw) == decode_root(golden)
    assert len(pages) == npages
    for address, page in pages.items():
        pinned = (GOLDEN / "v2-pages" / address.hex()).read_bytes()
        assert page[: PAGE_HEAD.size] == pinned[: PAGE_HEAD.size]
        assert zlib.decompress(page[PAGE_HEAD.size :]) == zlib.decompress(pinned[PAGE_HEAD.size :])


@pytest.mark.parametrize(("name", "spec", "depth", "npages"), ROOTS, ids=[r[0] for r in ROOTS])
def test_the_tree_state_publishes_the_golden_pages(tmp_path: Path, name: str, spec: make.RootSpec, depth: int,
                                                   npages: int) -> None:
    """The replicator's tree (``TreeState`` over a ``RemoteMap``) encodes the same records to the
    same pages as the format's definition in the golden builder."""
    vid, size, rs, seq, created_at, label, records = spec
    remote = RemoteMap(str(tmp_path / "remote.map"), rs, (size + rs - 1) // rs, True)
    try:
        for r, s, p, o, n, d in records:
            remote.set(r, s, p, o, n, _sum(d), version_digest(d) if n else NO_DIGEST)
        remote.sync()
        pages, top, leaves = remote.tree.prepare(remote.leaf_body)
        golden_root = decode_root((GOLDEN / name).read_bytes())
        assert dict(top) == golden_root.children
        assert {addr for _l, _i, addr, _raw in pages} == set(make.build_root_v2(spec)[1])
        assert len(pages) == npages
    finally:
        remote.close()


# -- a store of format v1 is refused, never misread ---------------------------------------------

def test_the_v1_manifest_fixture_is_a_v1_manifest() -> None:
    """The fixture the refusal tests use is what :data:`MANIFEST_V1` says (v1 header, read here with
    the v1 layout: magic, version, region_size, regions, size, seq, created_at, label and id lengths)."""
    vid, size, rs, seq, created_at, label, regions = make.MANIFEST_V1
    raw = (GOLDEN / "v1.manifest").read_bytes()
    head = struct.Struct("<8sIIQQQdII")
    fields = head.unpack_from(raw)
    assert fields == (b"OCMANIF1", 1, rs, len(regions), size, seq, created_at, len(label), len(vid))
    assert raw[head.size : head.size + len(label) + len(vid)] == (label + vid).encode()
    assert raw[-16:] == _sum(raw[:-16])


def test_decode_root_names_a_v1_manifest() -> None:
    raw = (GOLDEN / "v1.manifest").read_bytes()
    for decode in (decode_root, decode_root_header):
        with pytest.raises(FormatError, match="format 1") as info:
            decode(raw, "here")
        assert info.value.path == "here"


def _v1_store(tmp_path: Path, record: bool, suffix: str) -> LocalStore:
    vid, size, rs, seq, _created_at, _label, _regions = make.MANIFEST_V1
    store = LocalStore(tmp_path / "s", prefix="p")
    if record:
        store.put(volume_key(vid), b'{"format": 1, "id": "vol-1", "region_size": 4096, "size": 8292}')
    store.put(f"volumes/{vid}/snapshots/{snapshot_id(seq)}{suffix}", (GOLDEN / "v1.manifest").read_bytes())
    return store


@pytest.mark.parametrize(("record", "suffix"), [(True, ".manifest"), (False, ".manifest"), (False, ".root")],
                         ids=["v1-record", "manifest-only", "manifest-as-root"])
def test_a_v1_store_is_refused_naming_format_1(tmp_path: Path, record: bool, suffix: str) -> None:
    """A v1 volume (its record, or only its manifests) gets a FormatError naming format 1 from the
    listing and from opening an image, never a misread. ``manifest-as-root``: a v1 manifest under a
    v2 root's key is still named as one."""
    store = _v1_store(tmp_path, record, suffix)
    vid, seq = make.MANIFEST_V1[0], make.MANIFEST_V1[3]
    assert store.volumes() == [vid]
    with pytest.raises(FormatError, match="format 1"):
        store.snapshots(vid)
    with pytest.raises(FormatError, match="format 1"):
        store.image(vid, snapshot_id(seq))


def test_a_v2_root_is_not_a_v1_manifest() -> None:
    """The refusal above is by content: the golden v2 root decodes, to the v2 Root type."""
    assert isinstance(decode_root((GOLDEN / "v2.root").read_bytes()), Root)
