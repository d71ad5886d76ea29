"""Format v2 on its own: the codecs of packs, map pages and roots, and the map tree (``TreeState``
publishing over a ``RemoteMap``, ``PitMap`` reading) checked against plain dicts.

The tree is tested at depth 1 (a few leaves) and at depth 2: 1,100,000 regions, more than
``LEAF_SPAN * FANOUT``, so two level-1 nodes above 1075 leaves (the ``remote.map`` of that volume
is a sparse file of 53 MB).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from overlaycache._impl import core
from overlaycache.errors import CorruptionError, FormatError, ObjectExistsError, ObjectNotFoundError
from overlaycache.remote.layout import (
    FANOUT,
    LEAF_ENTRY,
    LEAF_SPAN,
    NODE_ENTRY,
    PACK_HEAD,
    PAGE_HEAD,
    ROOT_HEAD,
    decode_pack_index,
    decode_page,
    decode_root,
    decode_root_header,
    encode_pack,
    encode_page,
    encode_root,
    encode_volume_record,
    pack_index_size,
    page_address,
    page_key,
    root_key,
    tree_shape,
    verify_pack,
    volume_key,
)
from overlaycache.remote.tree import PageSource, PitMap, TreeState
from overlaycache.replication.maps import RemoteMap
from overlaycache.store import LocalStore

GOLDEN = Path(__file__).parent / "golden"
RS = 4096
VID = "vol-t"
DEEP = 1_100_000  # regions: depth 2
Record = tuple[int, int, int, int, bytes]
NEVER: Record = (0, 0, 0, 0, bytes(16))
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sum(data: bytes) -> bytes:
    return bytes(core.checksum(data))


class DictStore:
    """Objects in a dict. A conditional PUT of a key that exists is refused, as by a real store."""

    location = "mem://test"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts: list[tuple[str, int]] = []

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        if if_absent and key in self.objects:
            raise ObjectExistsError(f"{key} exists", self.location, None, key)
        self.objects[key] = bytes(data)
        self.puts.append((key, len(data)))

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            raw = self.objects[key]
        except KeyError:
            raise ObjectNotFoundError(f"no {key}", self.location, None, key) from None
        return raw[start:] if length is None else raw[start : start + length]


def _publish(remote: RemoteMap, store: DictStore, seq: int) -> tuple[bytes, list[tuple[int, int, bytes, bytes]]]:
    """A PIT of ``remote``'s records, published as the replicator does; returns its root and the
    pages written. A page already stored must be the same bytes (pages are immutable)."""
    remote.sync()
    pages, top, leaves = remote.tree.prepare(remote.leaf_body)
    _store_pages(store, pages)
    raw = encode_root(VID, remote.n * RS, RS, seq, float(seq), None, top)
    store.put(f"root/{seq}", raw, if_absent=True)
    remote.tree.commit(leaves)
    return raw, pages


def _store_pages(store: DictStore, pages: Iterable[tuple[int, int, bytes, bytes]]) -> None:
    for _level, _index, address, raw in pages:
        key = page_key(VID, address)
        if key in store.objects:
            assert store.objects[key] == raw, f"page {address.hex()} stored again with other bytes"
        else:
            store.put(key, raw, if_absent=True)


def _pit(store: DictStore, raw: bytes) -> PitMap:
    return PitMap(decode_root(raw), PageSource(store, VID))


def _check(store: DictStore, raw: bytes, model: dict[int, Record], probe: Iterable[int]) -> None:
    """The PIT of root ``raw`` holds exactly ``model``: the same stored regions, and the model's
    record (or none) for each region of ``probe``."""
    pit = _pit(store, raw)
    assert {r: (s, p, o, n, c) for r, s, p, o, n, c, _d in pit.stored()} == model
    for r in probe:
        assert pit.record(r) == model.get(r, NEVER), r


# -- packs ----------------------------------------------------------------------------------------

_volume_ids = st.text(st.characters(codec="utf-8"), max_size=10)
_versions = st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 2**63), st.binary(max_size=200)), max_size=5)


def _encode(vid: str, pack: int, versions: list[tuple[int, int, bytes]]) -> tuple[bytes, list[Any]]:
    return encode_pack(vid, RS, pack, 1700000000.25, [(r, s, d, _sum(d)) for r, s, d in versions])


@FAST
@given(vid=_volume_ids, rs=st.integers(1, 2**32 - 1), pack=st.integers(1, 2**64 - 1),
       created=st.floats(allow_nan=False), versions=_versions)
def test_a_pack_round_trips(vid: str, rs: int, pack: int, created: float,
                            versions: list[tuple[int, int, bytes]]) -> None:
    raw, entries = encode_pack(vid, rs, pack, created, [(r, s, d, _sum(d)) for r, s, d in versions])
    index = verify_pack(raw)
    assert decode_pack_index(raw) == index
    assert (index.volume_id, index.region_size, index.pack, index.created_at) == (vid, rs, pack, created)
    assert list(index.entries) == entries
    assert index.data_offset == pack_index_size(len(versions), vid)
    pos = index.data_offset
    for e, (r, s, d) in zip(index.entries, versions, strict=True):
        assert (e.region, e.seq, e.offset, e.length, e.checksum) == (r, s, pos, len(d), _sum(d))
        assert raw[e.offset : e.offset + e.length] == d
        pos += len(d)
    assert len(raw) == pos + 16


@FAST
@given(vid=_volume_ids, versions=_versions, data=st.data())
def test_a_short_prefix_of_a_pack_says_how_many_bytes_it_needs(vid: str, versions: list[tuple[int, int, bytes]],
                                                              data: st.DataObject) -> None:
    raw, _entries = _encode(vid, 7, versions)
    full = decode_pack_index(raw)
    assert not isinstance(full, int)
    k = data.draw(st.integers(0, full.data_offset - 1), label="prefix")
    need = decode_pack_index(raw[:k])
    assert isinstance(need, int) and k < need <= full.data_offset
    assert need == (PACK_HEAD.size if k < PACK_HEAD.size else full.data_offset)
    again = decode_pack_index(raw[:need])
    if isinstance(again, int):  # the header alone: now the whole index is known
        assert again == full.data_offset
        again = decode_pack_index(raw[:again])
    assert again == full


@FAST
@given(vid=_volume_ids, versions=_versions, data=st.data())
def test_any_flipped_byte_of_a_pack_is_detected(vid: str, versions: list[tuple[int, int, bytes]],
                                               data: st.DataObject) -> None:
    raw, _entries = _encode(vid, 7, versions)
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    bad = bytearray(raw)
    bad[pos] ^= data.draw(st.integers(1, 255), label="xor")
    # 12: magic and version; a version flipped to another still read (2) fails the index checksum
    older = 8 <= pos < 12 and PACK_HEAD.unpack_from(bad)[1] == 2
    with pytest.raises(FormatError if pos < 12 and not older else CorruptionError):
        verify_pack(bytes(bad))


def test_a_region_that_does_not_match_its_index_checksum_is_detected() -> None:
    raw, _entries = encode_pack(VID, RS, 7, 0.0, [(0, 1, b"a" * 10, _sum(b"a" * 10)), (1, 2, b"b", _sum(b"c"))])
    with pytest.raises(CorruptionError, match="region 1 version 0000000000000002"):
        verify_pack(raw)


# -- map pages ------------------------------------------------------------------------------------

_leaf_bodies = st.lists(st.tuples(st.integers(1, 2**63), st.integers(0, 2**63), st.integers(0, 2**40),
                                  st.integers(0, 2**32 - 1), st.binary(min_size=16, max_size=16)),
                        min_size=1, max_size=8)


def _leaf(records: list[tuple[int, int, int, int, bytes]]) -> tuple[bytes, int]:
    return b"".join(LEAF_ENTRY.pack(3 * k, *rec, bytes(16)) for k, rec in enumerate(records)), len(records)


@FAST
@given(records=_leaf_bodies, index=st.integers(0, 2**40), data=st.data())
def test_a_page_is_verified_by_its_address(records: list[tuple[int, int, int, int, bytes]], index: int,
                                          data: st.DataObject) -> None:
    """A page decodes to its entries; a flipped byte anywhere is detected, or (deflate's padding
    bits) decodes to exactly the same entries: never to other data."""
    body, count = _leaf(records)
    address, raw = encode_page(0, index, body, count)
    assert address == hashlib.blake2b(raw[: PAGE_HEAD.size] + body, digest_size=16).digest()
    assert address == page_address(raw[: PAGE_HEAD.size], body)
    assert decode_page(raw, address, 0, index) == (body, count)
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    bad = bytearray(raw)
    bad[pos] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        got = decode_page(bytes(bad), address, 0, index)
    except FormatError:
        assert pos < 12
    except CorruptionError:
        # the entries, or the version field flipped to another version still read (2): the
        # address no longer matches
        assert pos >= 12 or (8 <= pos < 12 and PAGE_HEAD.unpack_from(bad)[1] == 2)
    else:
        assert got == (body, count) and pos >= PAGE_HEAD.size


def test_a_page_is_refused_at_another_address_level_or_index() -> None:
    body, count = _leaf([(5, 7, 157, 4096, bytes(range(16)))])
    address, raw = encode_page(0, 3, body, count)
    with pytest.raises(CorruptionError, match="address"):
        decode_page(raw, bytes(16), 0, 3, "k")
    with pytest.raises(CorruptionError, match="expected level 0 page 4"):
        decode_page(raw, address, 0, 4)
    with pytest.raises(CorruptionError, match="expected level 1 page 3"):
        decode_page(raw, address, 1, 3)
    node = NODE_ENTRY.pack(0, address)
    naddr, nraw = encode_page(1, 0, node, 1)
    assert decode_page(nraw, naddr, 1, 0) == (node, 1)
    with pytest.raises(CorruptionError):
        decode_page(nraw, naddr, 0, 0)
    with pytest.raises(CorruptionError, match="truncated"):
        decode_page(raw[: PAGE_HEAD.size - 1], address, 0, 3)
    with pytest.raises(CorruptionError):
        decode_page(raw[:-3], address, 0, 3)


def test_a_page_source_refuses_a_damaged_or_missing_page(tmp_path: Path) -> None:
    store = DictStore()
    body, count = _leaf([(5, 7, 157, 4096, bytes(range(16)))])
    address, raw = encode_page(0, 0, body, count)
    store.put(page_key(VID, address), raw)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    pages = PageSource(store, VID, str(mirror))
    assert pages.get(address, 0, 0) == (body, count) and pages.gets == 1
    assert (mirror / address.hex()).read_bytes() == raw  # kept in the mirror
    assert pages.get(address, 0, 0) == (body, count) and pages.gets == 1  # from the mirror
    (mirror / address.hex()).write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # damaged mirror copy
    assert pages.get(address, 0, 0) == (body, count) and pages.gets == 2  # dropped and fetched
    store.objects[page_key(VID, address)] = raw[:PAGE_HEAD.size] + zlib.compress(body[:-1] + b"x", 1)
    (mirror / address.hex()).unlink()
    with pytest.raises(CorruptionError, match="address"):
        pages.get(address, 0, 0)
    with pytest.raises(CorruptionError, match="missing"):
        PageSource(store, VID).get(bytes(16), 0, 0)


def test_tree_shape() -> None:
    assert tree_shape(1) == (1, [1])
    assert tree_shape(LEAF_SPAN + 1) == (1, [2])
    assert tree_shape(LEAF_SPAN * FANOUT) == (1, [FANOUT])
    assert tree_shape(LEAF_SPAN * FANOUT + 1) == (2, [FANOUT + 1, 2])
    assert tree_shape(DEEP) == (2, [1075, 2])
    assert tree_shape(LEAF_SPAN * FANOUT * FANOUT + 1)[0] == 3


# -- roots ----------------------------------------------------------------------------------------

def _root(label: str | None = "lab", n: int = 3000) -> bytes:
    children = [(0, bytes(range(16))), (2, bytes(range(1, 17)))]
    return encode_root(VID, n * RS - 5, RS, 0x1234, 1700000000.5, label, children)


def test_a_root_round_trips() -> None:
    root = decode_root(_root())
    assert (root.volume_id, root.size, root.region_size, root.seq, root.created_at, root.label, root.depth) == (
        VID, 3000 * RS - 5, RS, 0x1234, 1700000000.5, "lab", 1)
    assert root.children == {0: bytes(range(16)), 2: bytes(range(1, 17))} and root.num_regions == 3000
    assert decode_root_header(_root()) == (0x1234, 1700000000.5, "lab", VID)
    assert decode_root(_root(None)).label is None
    assert decode_root(_root(n=DEEP)).depth == 2


def test_a_v1_manifest_is_refused_naming_format_1() -> None:
    raw = (GOLDEN / "v1.manifest").read_bytes()
    assert raw.startswith(b"OCMANIF1")
    for decode in (decode_root, decode_root_header):
        with pytest.raises(FormatError, match="format 1"):
            decode(raw, "k")
    with pytest.raises(FormatError, match="not a PIT root"):
        decode_root(b"OCPACK02" + _root()[8:])


def test_a_root_with_a_long_label_is_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put(volume_key(VID), encode_volume_record(VID, 3000 * RS, RS))
    label = "L" * 5000
    raw = encode_root(VID, 3000 * RS, RS, 5, 0.0, label, [])
    assert decode_root_header(raw) == (5, 0.0, label, VID)  # the root itself is valid
    store.put(root_key(VID, 5), raw)
    assert [s.label for s in store.snapshots(VID)] == [label]


@FAST
@given(label=st.one_of(st.none(), st.text(max_size=8)), data=st.data())
def test_a_truncated_or_flipped_root_is_detected(label: str | None, data: st.DataObject) -> None:
    raw = _root(label)
    head = ROOT_HEAD.size + len((label or "").encode()) + len(VID) + 16
    k = data.draw(st.integers(0, len(raw) - 1), label="truncated to")
    with pytest.raises(CorruptionError):
        decode_root(raw[:k])
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    bad = bytearray(raw)
    bad[pos] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(FormatError if pos < 12 else CorruptionError):
        decode_root(bytes(bad))
    if pos < 12:
        return
    if pos < head:  # the header checksum covers it: a listing sees the damage
        with pytest.raises(CorruptionError):
            decode_root_header(bytes(bad))
    else:  # the header is intact: a listing shows it
        assert decode_root_header(bytes(bad)) == (0x1234, 1700000000.5, label or None, VID)


# -- the map tree against a dict ------------------------------------------------------------------

class TreeMachine(RuleBasedStateMachine):
    """Records set and cleared in a ``RemoteMap``, PITs published through its ``TreeState``, crashes
    between prepare and commit, reopens; every PIT, read through a ``PitMap``, holds exactly the
    records the model had when it was published, for its whole life (pages are immutable and
    shared, never stored again with other bytes)."""

    num_regions = 3000
    #: Regions drawn more often: the ends of leaves and of the volume.
    edges = [0, 1, LEAF_SPAN - 1, LEAF_SPAN, 2 * LEAF_SPAN, 2999]

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="oc-tree-model-")
        self.path = os.path.join(self.dir, "remote.map")
        self.remote = RemoteMap(self.path, RS, self.num_regions, True)
        self.store = DictStore()
        self.model: dict[int, Record] = {}
        self.roots: list[tuple[bytes, dict[int, Record]]] = []
        self.seq = 0

    def _region(self, data: st.DataObject) -> int:
        return data.draw(st.one_of(st.integers(0, self.num_regions - 1), st.sampled_from(self.edges)), label="region")

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _set(self, r: int, zero: bool) -> None:
        seq = self._next()
        rec = (seq, 0, 0, 0, _sum(bytes(RS))) if zero else (seq, seq + 1000, 157 + RS * (r % 7), RS, _sum(b"%d" % seq))
        self.remote.set(r, *rec)
        self.model[r] = rec

    def _probe(self, model: dict[int, Record]) -> set[int]:
        if self.num_regions <= 4 * LEAF_SPAN:
            return set(range(self.num_regions))
        near = {x for r in model for x in (r - 1, r, r + 1) if 0 <= x < self.num_regions}
        return near | set(self.edges)

    @rule(data=st.data(), zero=st.booleans())
    def set_record(self, data: st.DataObject, zero: bool) -> None:
        self._set(self._region(data), zero)

    @rule(data=st.data())
    def clear_record(self, data: st.DataObject) -> None:
        """Back to "never replicated" (as a reset does for every region): its leaf may empty."""
        r = self._region(data)
        self.remote.set(r, *NEVER)
        self.model.pop(r, None)

    @rule(data=st.data(), during=st.booleans())
    def publish(self, data: st.DataObject, during: bool) -> None:
        """A PIT; with ``during``, a record changes between prepare and commit: it is not in this
        PIT (its leaf was read at prepare) and its leaf stays dirty for the next one."""
        self.remote.sync()
        pages, top, leaves = self.remote.tree.prepare(self.remote.leaf_body)
        published = dict(self.model)
        r = self._region(data) if during else None
        if r is not None:
            self._set(r, False)
        _store_pages(self.store, pages)
        raw = encode_root(VID, self.num_regions * RS, RS, self._next(), 0.0, None, top)
        self.remote.tree.commit(leaves)
        self.roots.append((raw, published))
        _check(self.store, raw, published, self._probe(published))
        pit = _pit(self.store, raw)
        if r is None:  # the newest tree is the one just published
            assert {a for _l, _i, a in pit.page_addresses()} == self.remote.tree.all_addresses()
            assert self.remote.tree.dirty_leaves() == []
        else:
            assert self.remote.tree.dirty_leaves() == [r // LEAF_SPAN]

    @rule(stored=st.integers(0, 10))
    def crash_between_prepare_and_commit(self, stored: int) -> None:
        """Some of the pages stored, no root: the files are reopened as after a crash."""
        self.remote.sync()
        dirty = self.remote.tree.dirty_leaves()
        pages, _top, leaves = self.remote.tree.prepare(self.remote.leaf_body)
        assert leaves == dirty
        _store_pages(self.store, pages[:stored])
        self.remote.close()
        self.remote = RemoteMap(self.path, RS, self.num_regions, True)
        assert self.remote.tree.dirty_leaves() == dirty

    @rule()
    def abandon(self) -> None:
        self.remote.sync()
        dirty = self.remote.tree.dirty_leaves()
        self.remote.tree.prepare(self.remote.leaf_body)
        self.remote.tree.abandon()
        assert self.remote.tree.dirty_leaves() == dirty

    @rule()
    def reopen(self) -> None:
        self.remote.sync()
        top = self.remote.tree.top()
        self.remote.close()
        self.remote = RemoteMap(self.path, RS, self.num_regions, True)
        assert self.remote.tree.top() == top

    @invariant()
    def every_pit_reads_as_published(self) -> None:
        for raw, published in self.roots:
            _check(self.store, raw, published, sorted(published)[:50] + self.edges)

    def teardown(self) -> None:
        try:
            self.remote.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class ShallowTreeMachine(TreeMachine):
    """Depth 1 (three leaves, the last one partial), with resets."""

    @rule()
    def reset(self) -> None:
        """A new secondary: no records, no pages; the old PITs (pages still stored) read as before."""
        self.remote.reset()
        self.model.clear()
        assert self.remote.tree.dirty_leaves() == [] and self.remote.tree.top() == []


class DeepTreeMachine(TreeMachine):
    """Depth 2: 1075 leaves (the last one partial) under two nodes. No reset: it would write 53 MB
    of zeros."""

    num_regions = DEEP
    edges = [0, LEAF_SPAN - 1, LEAF_SPAN * FANOUT - 1, LEAF_SPAN * FANOUT, LEAF_SPAN * (FANOUT + 1), DEEP - 1]


TestShallowTreeModel = ShallowTreeMachine.TestCase
TestShallowTreeModel.settings = settings(max_examples=50, stateful_step_count=15, deadline=None)
TestDeepTreeModel = DeepTreeMachine.TestCase
TestDeepTreeModel.settings = settings(max_examples=20, stateful_step_count=12, deadline=None)


# -- what a publish writes --------------------------------------------------------------------------

def _volume(tmp: Path, n: int, others: dict[int, int]) -> tuple[RemoteMap, DictStore, bytes]:
    """A volume of ``n`` regions with region 5 set and ``others[leaf]`` regions set in each other
    leaf, published once."""
    remote = RemoteMap(str(tmp / "remote.map"), RS, n, True)
    store = DictStore()
    remote.set(5, 1, 10, 157, RS, _sum(b"first"))
    seq = 2
    for leaf, count in others.items():
        for k in range(min(count, n - leaf * LEAF_SPAN)):
            remote.set(leaf * LEAF_SPAN + k, seq, 11, 157 + RS * k, RS, _sum(b"%d" % seq))
            seq += 1
    raw, _pages = _publish(remote, store, seq)
    return remote, store, raw


@pytest.mark.parametrize(("n", "leaves"), [(3000, [1, 2]), (DEEP, [1, 700, 1024, 1074])], ids=["depth-1", "depth-2"])
def test_a_one_region_change_writes_one_page_per_level(tmp_path: Path, n: int, leaves: list[int]) -> None:
    """After one region changed, a PIT writes ``depth`` pages (one per level, on the region's path)
    and the root; what it writes is the same whether the other leaves hold one region or 1000: only
    the pages on the path are read and written, and they hold the same number of entries."""
    depth = tree_shape(n)[0]
    written = []
    for count in (1, 1000):
        (tmp_path / str(count)).mkdir()
        remote, store, before = _volume(tmp_path / str(count), n, dict.fromkeys(leaves, count))
        remote.set(5, 99_999, 12, 157, RS, _sum(b"second"))
        after, pages = _publish(remote, store, 100_000)
        assert sorted((level, index) for level, index, _a, _r in pages) == [(lvl, 0) for lvl in range(depth)]
        sizes = [(level, PAGE_HEAD.unpack_from(raw)[4], len(zlib.decompress(raw[PAGE_HEAD.size :])))
                 for level, _i, _a, raw in sorted(pages)]
        written.append((sizes, len(zlib.decompress(after[ROOT_HEAD.size + len(VID) + 16 : -16])),
                        sum(len(raw) for _l, _i, _a, raw in pages) + len(after)))
        old, new = _pit(store, before), _pit(store, after)
        old_pages = {(level, index): a for level, index, a in old.page_addresses()}
        new_pages = {(level, index): a for level, index, a in new.page_addresses()}
        assert old_pages.keys() == new_pages.keys()
        changed = {key for key in old_pages if old_pages[key] != new_pages[key]}
        assert changed == {(lvl, 0) for lvl in range(depth)}  # every other page is shared
        assert new.record(5) == (99_999, 12, 157, RS, _sum(b"second")) and old.record(5)[0] == 1
        remote.close()
    (sizes1, root1, total1), (sizes1000, root1000, total1000) = written
    assert sizes1 == sizes1000 and root1 == root1000
    assert sizes1[0] == (0, 1, LEAF_ENTRY.size)  # the leaf of region 5 holds region 5 only
    # zlib's output size varies by a few bytes with the (random) addresses it compresses
    assert abs(total1 - total1000) <= 16 and total1000 <= 200 + 150 * depth


def test_a_crash_between_prepare_and_commit_keeps_the_leaves_dirty(tmp_path: Path) -> None:
    path = str(tmp_path / "remote.map")
    remote = RemoteMap(path, RS, DEEP, True)
    store = DictStore()
    for r, seq in ((3, 1), (LEAF_SPAN * FANOUT + 7, 2), (DEEP - 1, 3)):
        remote.set(r, seq, 10, 157, RS, _sum(b"%d" % seq))
    remote.sync()
    pages, top, leaves = remote.tree.prepare(remote.leaf_body)
    assert leaves == [0, FANOUT, DEEP // LEAF_SPAN] and len(pages) == 5  # 3 leaves, 2 nodes
    _store_pages(store, pages[:2])
    remote.close()  # the process dies here: no root, no commit

    remote = RemoteMap(path, RS, DEEP, True)
    assert remote.tree.dirty_leaves() == leaves and remote.tree.top() == []
    again, top_again, leaves_again = remote.tree.prepare(remote.leaf_body)
    assert [(lvl, i, a) for lvl, i, a, _r in again] == [(lvl, i, a) for lvl, i, a, _r in pages]
    assert (top_again, leaves_again) == (top, leaves)
    _store_pages(store, again)  # the two stored before are the same bytes
    raw = encode_root(VID, DEEP * RS, RS, 4, 0.0, None, top_again)
    remote.tree.commit(leaves_again)
    model = {3: (1, 10, 157, RS, _sum(b"1")), LEAF_SPAN * FANOUT + 7: (2, 10, 157, RS, _sum(b"2")),
             DEEP - 1: (3, 10, 157, RS, _sum(b"3"))}
    _check(store, raw, model, [0, 2, 3, 4, LEAF_SPAN * FANOUT + 7, DEEP - 2, DEEP - 1])
    remote.close()
    remote = RemoteMap(path, RS, DEEP, True)
    assert remote.tree.dirty_leaves() == [] and remote.tree.top() == top
    remote.close()


def test_a_tree_state_of_another_geometry_is_refused(tmp_path: Path) -> None:
    TreeState(str(tmp_path / "t"), RS, 3000).close()
    with pytest.raises(FormatError):
        TreeState(str(tmp_path / "t"), RS, 3001)
    with open(tmp_path / "t", "ab") as f:
        f.write(b"x")
    with pytest.raises(FormatError):
        TreeState(str(tmp_path / "t"), RS, 3000)
