"""The map tree of PIT snapshots: reading a PIT's map page by page, and publishing a new one.

A PIT's map names, per region, the newest stored version with ``seq <= cutoff``: its seq, the pack
holding it, where in the pack, and its checksum. It is a tree of immutable, content-addressed pages
under a small root (format in :mod:`overlaycache.remote.layout`). Two PITs share every page that
did not change between them, so publishing after ``k`` changed regions writes ``O(k)`` pages.

* :class:`PageSource` fetches pages by address, from a local mirror directory first (kept by the
  replicator, so a PIT's map can be read while the secondary is unreachable) and then from the
  store; every page is verified against its address.
* :class:`PitMap` is one PIT's map, read lazily: only the pages on the path to a region are loaded,
  and a bounded number of decoded leaves is kept.
* :class:`TreeState` is the replicator's local state of the newest tree (``remote.tree``): every
  page's address and which leaves changed since the last publish, so that :meth:`TreeState.publish`
  re-encodes only those.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from overlaycache._fs import write_file_atomic
from overlaycache.errors import CorruptionError, FormatError, ObjectNotFoundError, SecondaryUnavailableError
from overlaycache.remote.layout import (
    FANOUT,
    LEAF_ENTRY,
    LEAF_SPAN,
    NODE_ENTRY,
    RECORD,
    Root,
    decode_page,
    encode_page,
    page_key,
    snapshot_id,
    tree_shape,
)
from overlaycache.snapshots import Snapshot

if TYPE_CHECKING:
    from overlaycache.store.base import ObjectStore

__all__ = ["PageSource", "PitMap", "TreeState", "build_tree", "leaf_records", "leaf_versions", "reachable",
           "reachable_leaves"]

_NO_PAGE = bytes(16)
_EMPTY_LEAF = bytes(RECORD.size * LEAF_SPAN)


def leaf_records(body: bytes, count: int) -> bytes:
    """A leaf's entries as :data:`LEAF_SPAN` dense records (zeros where a region has none)."""
    out = bytearray(_EMPTY_LEAF)
    for k in range(count):
        pos, seq, pack, off, length, csum, digest = LEAF_ENTRY.unpack_from(body, k * LEAF_ENTRY.size)
        if pos >= LEAF_SPAN:
            raise CorruptionError(f"leaf entry for position {pos} beyond the leaf's span")
        RECORD.pack_into(out, pos * RECORD.size, seq, pack, off, length, csum, digest)
    return bytes(out)


def leaf_entries(records: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    """The inverse of :func:`leaf_records`: the entries of the regions with ``seq > 0``."""
    out = bytearray()
    count = 0
    for pos, (seq, pack, off, length, csum, digest) in enumerate(RECORD.iter_unpack(records)):
        if seq:
            out += LEAF_ENTRY.pack(pos, seq, pack, off, length, csum, digest)
            count += 1
    return bytes(out), count


def _node_entries(addresses: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    out = bytearray()
    count = 0
    for pos in range(len(addresses) // 16):
        addr = bytes(addresses[16 * pos : 16 * pos + 16])
        if addr != _NO_PAGE:
            out += NODE_ENTRY.pack(pos, addr)
            count += 1
    return bytes(out), count


class PageSource:
    """Map pages by address: from a local mirror directory when it has them, else from the store.

    Parameters
    ----------
    store : ObjectStore or None
        The secondary (None: the mirror only).
    volume_id : str
        Whose pages.
    mirror : str, optional
        A directory of page files named by their address in hex (see :meth:`keep`).
    """

    def __init__(self, store: ObjectStore | None, volume_id: str, mirror: str | None = None) -> None:
        self.store = store
        self.volume_id = volume_id
        self.mirror = mirror
        #: Pages fetched from the store.
        self.gets = 0

    def _where(self, key: str) -> str:
        return key if self.store is None else f"{self.store.location}/{key}"

    def get(self, address: bytes, level: int, index: int) -> tuple[bytes, int]:
        """The verified entries of the page at ``address`` (expected at ``level``, ``index``).

        Raises
        ------
        CorruptionError
            The page does not match its address (a damaged mirror copy is dropped and fetched).
        SecondaryUnavailableError
            Not in the mirror and the store cannot be reached (or none is attached).
        """
        key = page_key(self.volume_id, address)
        if self.mirror is not None:
            path = os.path.join(self.mirror, address.hex())
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                return decode_page(raw, address, level, index, path)
            except FileNotFoundError:
                pass
            except (CorruptionError, FormatError, OSError):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self.store is None:
            raise SecondaryUnavailableError(f"map page {address.hex()}: not kept locally and no secondary attached")
        try:
            raw = self.store.get(key)
        except ObjectNotFoundError as exc:
            raise CorruptionError(f"{self._where(key)}: map page missing from the store") from exc
        self.gets += 1
        out = decode_page(raw, address, level, index, self._where(key))
        if self.mirror is not None:
            self.keep(address, raw)
        return out

    def keep(self, address: bytes, raw: bytes) -> None:
        """Put a page into the mirror (not synced: the mirror is verified, not trusted)."""
        if self.mirror is None:
            return
        path = os.path.join(self.mirror, address.hex())
        tmp = f"{path}.tmp-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(raw)
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def drop(self, address: bytes) -> None:
        """Remove a page from the mirror."""
        if self.mirror is not None:
            try:
                os.unlink(os.path.join(self.mirror, address.hex()))
            except FileNotFoundError:
                pass


class PitMap:
    """One PIT snapshot's map, read lazily through a :class:`PageSource`.

    It has the interface the region source reads: :attr:`volume_id`, :attr:`size`,
    :attr:`region_size`, :attr:`snapshot`, :attr:`num_regions`, :meth:`entry` and :meth:`record`.

    Parameters
    ----------
    root : Root
        The decoded root.
    pages : PageSource
        Where its pages come from.
    cache_leaves : int
        Decoded leaves kept in memory (each is ``LEAF_SPAN * 64`` bytes).
    """

    def __init__(self, root: Root, pages: PageSource, cache_leaves: int = 256) -> None:
        self.root = root
        self.pages = pages
        self.volume_id = root.volume_id
        self.size = root.size
        self.region_size = root.region_size
        self.snapshot = Snapshot(snapshot_id(root.seq), root.seq, root.created_at, root.label)
        self.num_regions = root.num_regions
        self.depth, self._counts = tree_shape(self.num_regions)
        self._cache_leaves = max(1, cache_leaves)
        self._leaves: OrderedDict[int, bytes] = OrderedDict()
        self._nodes: dict[tuple[int, int], dict[int, bytes]] = {}
        self._last: tuple[int, bytes] = (-1, b"")
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PitMap(volume={self.volume_id!r}, snapshot={self.snapshot.id!r})"

    def _address(self, level: int, index: int) -> bytes | None:
        """The address of page ``index`` at ``level`` (None: no such page, all of it empty)."""
        top = self.depth - 1
        if level == top:
            return self.root.children.get(index)
        parent = index // FANOUT
        node = self._node(level + 1, parent)
        return None if node is None else node.get(index - parent * FANOUT)

    def _node(self, level: int, index: int) -> dict[int, bytes] | None:
        key = (level, index)
        node = self._nodes.get(key)
        if node is None:
            addr = self._address(level, index)
            if addr is None:
                return None
            body, count = self.pages.get(addr, level, index)
            node = {}
            for k in range(count):
                pos, child = NODE_ENTRY.unpack_from(body, k * NODE_ENTRY.size)
                node[int(pos)] = bytes(child)
            self._nodes[key] = node
        return node

    def leaf(self, index: int) -> bytes:
        """Leaf ``index`` as :data:`LEAF_SPAN` dense records."""
        last = self._last  # one read of an immutable pair: no lock for the common repeat
        if last[0] == index:
            return last[1]
        with self._lock:
            hit = self._leaves.get(index)
            if hit is not None:
                self._leaves.move_to_end(index)
                self._last = (index, hit)
                return hit
            addr = self._address(0, index)
            if addr is None:
                recs = _EMPTY_LEAF
            else:
                body, count = self.pages.get(addr, 0, index)
                recs = leaf_records(body, count)
            self._leaves[index] = recs
            if len(self._leaves) > self._cache_leaves:
                self._leaves.popitem(last=False)
            self._last = (index, recs)
            return recs

    def record(self, r: int) -> tuple[int, int, int, int, bytes]:
        """``(seq, pack, offset, length, checksum)`` of region ``r`` (seq 0: never replicated;
        length 0 or pack 0: an all-zero version, no bytes stored)."""
        i, pos = divmod(r, LEAF_SPAN)
        seq, pack, off, length, csum, _digest = RECORD.unpack_from(self.leaf(i), pos * RECORD.size)
        return int(seq), int(pack), int(off), int(length), bytes(csum)

    def digest(self, r: int) -> bytes:
        """Region ``r``'s version's :func:`~overlaycache.remote.layout.version_digest`
        (:data:`~overlaycache.remote.layout.NO_DIGEST`: none recorded: a version shipped before
        digests, or all zeros)."""
        i, pos = divmod(r, LEAF_SPAN)
        return bytes(RECORD.unpack_from(self.leaf(i), pos * RECORD.size)[5])

    def entry(self, region: int) -> tuple[int, bytes]:
        """``(seq, checksum)`` of ``region`` in this snapshot (seq 0: never replicated)."""
        rec = self.record(region)
        return rec[0], rec[4]

    def page_addresses(self) -> Iterator[tuple[int, int, bytes]]:
        """Every page of the tree: ``(level, index, address)``, top level first."""
        for level in range(self.depth - 1, -1, -1):
            for index in range(self._counts[level]):
                addr = self._address(level, index)
                if addr is not None:
                    yield level, index, addr

    def stored(self) -> Iterator[tuple[int, int, int, int, int, bytes, bytes]]:
        """Every region with a version: ``(region, seq, pack, offset, length, checksum, digest)``."""
        for index in range(self._counts[0]):
            if self._address(0, index) is None:
                continue
            recs = self.leaf(index)
            for pos, (seq, pack, off, length, csum, digest) in enumerate(RECORD.iter_unpack(recs)):
                if seq:
                    yield index * LEAF_SPAN + pos, seq, pack, off, length, bytes(csum), bytes(digest)


_TREE_MAGIC = b"OCTREE02"
_TREE_HEAD = struct.Struct("<8sIIQI")  # magic, version, region_size, num_regions, depth
_TREE_HEADER = 64


class TreeState:
    """``remote.tree``: the addresses of the newest published tree's pages, and the dirty leaves.

    Layout: a 64-byte header, the dirty-leaf bitmap (one bit per leaf, in whole 8-byte words), then
    per level (0: leaves) one 16-byte address per page (zeros: no page). A leaf is marked dirty
    (:meth:`mark`) when a record in it changes, made durable by :meth:`sync` before the record is;
    :meth:`publish` re-encodes the dirty leaves and the nodes above them, and clears the bits only
    once the new root is stored. A crash can leave a leaf marked that did not change (it encodes to
    the same page), never one unmarked that did.
    """

    def __init__(self, path: str, region_size: int, num_regions: int) -> None:
        self.path = path
        self.depth, self.counts = tree_shape(num_regions)
        self.num_regions = num_regions
        self.region_size = region_size
        self._dirty_bytes = 8 * ((self.counts[0] + 63) // 64)
        self._offsets = []
        pos = _TREE_HEADER + self._dirty_bytes
        for c in self.counts:
            self._offsets.append(pos)
            pos += 16 * c
        self._length = pos
        head = _TREE_HEAD.pack(_TREE_MAGIC, 2, region_size, num_regions, self.depth)
        if not os.path.exists(path):
            write_file_atomic(path, head + bytes(self._length - len(head)))
        self._fd = os.open(path, os.O_RDWR)
        try:
            raw = os.pread(self._fd, self._length + 1, 0)
            if len(raw) != self._length or raw[: len(head)] != head:
                raise FormatError(f"{path}: not the map tree state of this volume (or truncated)", path)
        except BaseException:
            os.close(self._fd)
            raise
        self.dirty = bytearray(raw[_TREE_HEADER : _TREE_HEADER + self._dirty_bytes])
        self.addresses = [bytearray(raw[off : off + 16 * c]) for off, c in zip(self._offsets, self.counts)]
        self._dirty_changed = False
        self._pending: list[dict[int, bytes]] = []
        self._remarked: set[int] | None = None
        self._dirty_set = self._scan()

    def mark(self, region: int) -> None:
        """The record of ``region`` changed (durable at the next :meth:`sync`)."""
        i = region // LEAF_SPAN
        bit = 1 << (i & 7)
        if self._remarked is not None:
            self._remarked.add(i)  # changed after prepare(): stays dirty through commit()
        if not self.dirty[i >> 3] & bit:
            self.dirty[i >> 3] |= bit
            self._dirty_set.add(i)
            self._dirty_changed = True

    def mark_all(self) -> None:
        """Every leaf (after the records were reset or rebuilt)."""
        for i in range(self.counts[0]):
            self.dirty[i >> 3] |= 1 << (i & 7)
        self._dirty_set = set(range(self.counts[0]))
        self._dirty_changed = True

    def sync(self) -> None:
        """Make the dirty marks durable (call before the records they cover are synced)."""
        if self._dirty_changed:
            os.pwrite(self._fd, bytes(self.dirty), _TREE_HEADER)
            os.fdatasync(self._fd)
            self._dirty_changed = False

    def _scan(self) -> set[int]:
        out = set()
        for byte_index, byte in enumerate(self.dirty):
            if byte:
                for b in range(8):
                    if byte & (1 << b):
                        out.add(byte_index * 8 + b)
        return out

    def dirty_leaves(self) -> list[int]:
        """The leaves marked, in order (kept in memory: no scan of the bitmap per publish)."""
        return sorted(self._dirty_set)

    def top(self) -> list[tuple[int, bytes]]:
        """The newest tree's top-level pages: (index, address)."""
        level = self.addresses[self.depth - 1]
        return [(i, bytes(level[16 * i : 16 * i + 16])) for i in range(self.counts[self.depth - 1])
                if level[16 * i : 16 * i + 16] != _NO_PAGE]

    def prepare(self, leaf_body: Callable[[int], tuple[bytes, int]]
                ) -> tuple[list[tuple[int, int, bytes, bytes]], list[tuple[int, bytes]], list[int]]:
        """Encode the pages a publish writes.

        Parameters
        ----------
        leaf_body : callable
            ``leaf_body(i)``: the :data:`LEAF_ENTRY` entries of leaf ``i`` and their count, from
            the current records.

        Returns
        -------
        pages : list of (level, index, address, raw)
            New pages to store (before the root), children first.
        top : list of (index, address)
            The root's entries.
        leaves : list of int
            The dirty leaves this covers (pass to :meth:`commit`).
        """
        leaves = self.dirty_leaves()
        new = [dict[int, bytes]() for _ in range(self.depth)]
        pages: list[tuple[int, int, bytes, bytes]] = []
        for i in leaves:
            body, count = leaf_body(i)
            addr = _NO_PAGE
            if count:
                addr, raw = encode_page(0, i, body, count)
                pages.append((0, i, addr, raw))
            if addr != bytes(self.addresses[0][16 * i : 16 * i + 16]):
                new[0][i] = addr
        for level in range(1, self.depth):
            below = self.addresses[level - 1]
            for p in sorted({i // FANOUT for i in new[level - 1]}):
                span = bytearray(below[16 * p * FANOUT : 16 * min((p + 1) * FANOUT, self.counts[level - 1])])
                for i, addr in new[level - 1].items():
                    if i // FANOUT == p:
                        span[16 * (i - p * FANOUT) : 16 * (i - p * FANOUT) + 16] = addr
                body, count = _node_entries(span)
                addr = _NO_PAGE
                if count:
                    addr, raw = encode_page(level, p, body, count)
                    pages.append((level, p, addr, raw))
                if addr != bytes(self.addresses[level][16 * p : 16 * p + 16]):
                    new[level][p] = addr
        self._pending = new
        self._remarked = set()
        top_level = bytearray(self.addresses[self.depth - 1])
        for i, addr in new[self.depth - 1].items():
            top_level[16 * i : 16 * i + 16] = addr
        top = [(i, bytes(top_level[16 * i : 16 * i + 16])) for i in range(self.counts[self.depth - 1])
               if top_level[16 * i : 16 * i + 16] != _NO_PAGE]
        return pages, top, leaves

    def commit(self, leaves: Sequence[int]) -> list[bytes]:
        """The root of the last :meth:`prepare` is stored: keep its addresses, clear ``leaves``'
        dirty bits (leaves marked again since stay marked only if :meth:`mark` ran after prepare:
        the caller holds that off). Returns the addresses no longer in the newest tree."""
        replaced = []
        for level, changes in enumerate(self._pending):
            table = self.addresses[level]
            for i, addr in changes.items():
                old = bytes(table[16 * i : 16 * i + 16])
                if old != _NO_PAGE:
                    replaced.append(old)
                table[16 * i : 16 * i + 16] = addr
                os.pwrite(self._fd, addr, self._offsets[level] + 16 * i)
        os.fdatasync(self._fd)
        again = self._remarked or set()
        for i in leaves:
            if i not in again:
                self.dirty[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                self._dirty_set.discard(i)
        self._dirty_changed = True
        self.sync()
        self._pending = []
        self._remarked = None
        return replaced

    def abandon(self) -> None:
        """The root of the last :meth:`prepare` was not stored: keep the tree as it was."""
        self._pending = []
        self._remarked = None

    def all_addresses(self) -> set[bytes]:
        """Every page address of the newest tree."""
        out = set()
        for table in self.addresses:
            for i in range(len(table) // 16):
                addr = bytes(table[16 * i : 16 * i + 16])
                if addr != _NO_PAGE:
                    out.add(addr)
        return out

    def reset(self) -> None:
        """Forget the tree (a new secondary): no pages, every leaf clean (the records are reset too)."""
        for table in self.addresses:
            table[:] = bytes(len(table))
        os.pwrite(self._fd, bytes(self._length - _TREE_HEADER), _TREE_HEADER)
        os.fdatasync(self._fd)
        self.dirty = bytearray(self._dirty_bytes)
        self._dirty_set = set()

    def close(self) -> None:
        os.close(self._fd)


def build_tree(num_regions: int, leaves: dict[int, bytes]
               ) -> tuple[list[tuple[int, int, bytes, bytes]], list[tuple[int, bytes]]]:
    """Every page of a map tree, from scratch (no earlier tree to share with).

    Parameters
    ----------
    num_regions : int
        The volume's regions.
    leaves : dict of int to bytes
        Per leaf with any record, its :data:`LEAF_SPAN` dense records (:func:`leaf_records`'s form).

    Returns
    -------
    pages : list of (level, index, address, raw)
        The pages to store, children first.
    top : list of (index, address)
        The root's entries.
    """
    depth, counts = tree_shape(num_regions)
    pages: list[tuple[int, int, bytes, bytes]] = []
    below: dict[int, bytes] = {}
    for i in sorted(leaves):
        body, count = leaf_entries(leaves[i])
        if count:
            addr, raw = encode_page(0, i, body, count)
            pages.append((0, i, addr, raw))
            below[i] = addr
    for level in range(1, depth):
        above: dict[int, bytes] = {}
        for p in sorted({i // FANOUT for i in below}):
            span = bytearray(16 * (min((p + 1) * FANOUT, counts[level - 1]) - p * FANOUT))
            for i, addr in below.items():
                if i // FANOUT == p:
                    span[16 * (i - p * FANOUT) : 16 * (i - p * FANOUT) + 16] = addr
            body, count = _node_entries(span)
            addr, raw = encode_page(level, p, body, count)
            pages.append((level, p, addr, raw))
            above[p] = addr
        below = above
    return pages, sorted(below.items())


def reachable(roots: Iterable[Root], pages: PageSource) -> tuple[set[bytes], set[int]]:
    """Every page address and every pack the given roots reach; a page shared by several roots
    (or several places) is read once.

    Raises
    ------
    CorruptionError
        A page is missing or damaged.
    """
    seen, leaves = reachable_leaves(roots, pages)
    packs: set[int] = set()
    for index, addrs in leaves.items():
        for addr in addrs:
            body, count = pages.get(addr, 0, index)
            for k in range(count):
                pack = LEAF_ENTRY.unpack_from(body, k * LEAF_ENTRY.size)[2]
                if pack:
                    packs.add(int(pack))
    return seen, packs


def reachable_leaves(roots: Iterable[Root], pages: PageSource) -> tuple[set[bytes], dict[int, set[bytes]]]:
    """Every page address the given roots reach, and their leaves grouped by index (the versions
    of one leaf that several PITs hold, whose records :func:`leaf_versions` merges). Only the
    nodes are read.

    Raises
    ------
    CorruptionError
        A node is missing or damaged.
    """
    seen: set[bytes] = set()
    leaves: dict[int, set[bytes]] = {}
    for root in roots:
        depth, _counts = tree_shape(root.num_regions)
        todo = [(depth - 1, index, addr) for index, addr in root.children.items()]
        while todo:
            level, index, addr = todo.pop()
            if addr in seen:
                continue
            seen.add(addr)
            if level == 0:
                leaves.setdefault(index, set()).add(addr)
                continue
            body, count = pages.get(addr, level, index)
            for k in range(count):
                pos, child = NODE_ENTRY.unpack_from(body, k * NODE_ENTRY.size)
                todo.append((level - 1, index * FANOUT + int(pos), bytes(child)))
    return seen, leaves


def leaf_versions(index: int, addresses: Iterable[bytes], pages: PageSource) -> set[tuple[int, int, int, int]]:
    """The distinct region versions the leaves ``addresses`` (of leaf ``index``) record, each once:
    ``(region, seq, pack, length)``.

    Raises
    ------
    CorruptionError
        A leaf is missing or damaged.
    """
    out: set[tuple[int, int, int, int]] = set()
    base = index * LEAF_SPAN
    for addr in sorted(addresses):
        body, count = pages.get(addr, 0, index)
        for pos, seq, pack, _off, length, _csum, _digest in LEAF_ENTRY.iter_unpack(
                memoryview(body)[: count * LEAF_ENTRY.size]):
            out.add((base + pos, seq, pack, length))
    return out
