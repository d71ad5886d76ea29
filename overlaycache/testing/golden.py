"""Golden files: the builders of the files that pin the on-disk format and the objects on the
secondary (``tests/golden/``).

``tests/test_golden.py`` rebuilds them and compares byte for byte (for the zlib-compressed parts of
the v2 objects: the bytes before them, and what they decompress to). Regenerate only on a
deliberate format change.

The local volume of format 2 (``python -m overlaycache.testing.golden tests/golden/local-v2``) has
three regions of 4 KiB plus a partial one, a frozen overlay behind a snapshot, and a writable
overlay whose region 1 was rewritten (a second slot) with its journal batches not checkpointed.
Its id is fixed (all zeros), as every header, map record and journal batch is bound to it.

``tests/golden/v1`` is the same volume in local format 1 (two slots per region), kept as it was
written to show that format 1 is refused with a clear message; it is not rebuilt.

The v2 objects on the secondary (``python -m overlaycache.testing.golden --v2 tests/golden``) are
built from fixed inputs by :func:`build_pack_v2` and :func:`build_root_v2`: a pack
(``v2.pack``, :data:`PACK_V2`), the root of a PIT whose map has depth 1 (``v2.root``,
:data:`ROOT_V2`) and the root of one of depth 2 (``v2-deep.root``, :data:`DEEP_ROOT_V2`), and the
map pages of both (``v2-pages/<address in hex>``). The map pages are built here from the format's
definition, not by :class:`~overlaycache.remote.tree.TreeState`, so the two can be compared.

``tests/golden/v2-digestless/`` holds the same v2 objects as written before region versions had
digests (packs and pages of version 2); they are not rebuilt, and show that they are still read.

``tests/golden/v1.manifest`` is a PIT manifest of the removed format v1 (described by
:data:`MANIFEST_V1`), kept as it was written so that a v1 store is shown to be refused. It is not
rebuilt: the v1 codec is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

__all__ = [
    "DEEP_ROOT_V2",
    "GOLDEN_VOLUME_ID",
    "MANIFEST_V1",
    "PACK_V2",
    "ROOT_V2",
    "RootSpec",
    "build_local",
    "build_pack_v2",
    "build_root_v2",
    "normalise",
    "write_v2",
]

#: What the v1 golden manifest holds: volume id, size, region size, seq, created_at, label, and per
#: region the seq of its version (0: never stored) and the byte its checksum is taken over (16 of them).
MANIFEST_V1 = ("vol-1", 2 * 4096 + 100, 4096, 0x1234, 1700000000.5, "golden", ((0, 0), (7, 7), (0x1234, 0x34)))

#: The v2 golden pack: volume id, region size, the pack's seq, created_at, and its region versions as
#: (region, seq, bytes), in the order stored.
PACK_V2: tuple[str, int, int, float, tuple[tuple[int, int, bytes], ...]] = (
    "vol-1", 4096, 7, 1700000000.5, ((1, 5, b"B" * 4096), (2, 6, b"tail" * 25)))

#: A PIT root's inputs: volume id, size, region size, cutoff seq, created_at, label, and the records
#: of the regions that have one, as (region, seq, pack, offset, length, bytes); the checksum is
#: that of the bytes (pack 0: an all-zero version, not stored).
RootSpec = tuple[str, int, int, int, float, "str | None", tuple[tuple[int, int, int, int, int, bytes], ...]]

#: The v2 golden root of depth 1: the PIT of the volume :data:`PACK_V2` belongs to; region 0's
#: version is all zeros, regions 1 and 2 are in the pack (at the offsets its index gives).
ROOT_V2: RootSpec = (
    "vol-1", 2 * 4096 + 100, 4096, 0x1234, 1700000000.5, "golden",
    ((0, 3, 0, 0, 0, bytes(4096)), (1, 5, 7, 157, 4096, b"B" * 4096), (2, 6, 7, 4253, 100, b"tail" * 25)))

#: The v2 golden root of depth 2: 1,100,000 regions (1075 leaves under two level-1 nodes); records
#: in leaves 0, 1024 and 1074 (the last region), so each node has a child.
DEEP_ROOT_V2: RootSpec = (
    "vol-2", 1_100_000 * 4096, 4096, 0x2000, 1700000001.25, None,
    ((0, 1, 0x10, 157, 4096, b"x" * 4096), (1023, 2, 0, 0, 0, bytes(4096)),
     (1_048_581, 3, 0x10, 4253, 4096, b"y" * 4096), (1_099_999, 4, 0x10, 8349, 4096, b"z" * 4096)))


#: The golden volume's id.
GOLDEN_VOLUME_ID = "0" * 32


def build_local(path: str) -> None:
    """Create the golden volume of local format 2 at ``path`` (a new directory); call `normalise`
    after."""
    import uuid
    from unittest import mock

    from overlaycache import Volume

    rs = 4096
    with mock.patch("overlaycache.local.stack.uuid.uuid4", return_value=uuid.UUID(GOLDEN_VOLUME_ID)):
        vol = Volume.create(path, 3 * rs + 100, region_size=rs)
    with vol:
        vol.write(0, b"A" * rs)
        vol.write(rs, b"B" * rs)
        vol.merge_down()  # A, B into the base
        vol.write(2 * rs, b"C" * rs)
        vol.local_snapshot("golden")
        vol.write(rs + 10, b"overlay")  # partial write: copy-up from the base
        vol.flush()
        vol.write(rs + 10, b"OVERLAY")  # the second version goes to another slot
        vol.write(3 * rs, b"tail" * 25)
        vol.flush()  # commits the top overlay's journal batch
        # Keep the journal un-checkpointed: skip close()'s checkpoint by tearing down directly.
        vol._teardown()


def normalise(path: str) -> None:
    """Fixed times, so the files are reproducible."""
    from overlaycache._fs import write_json_atomic

    with open(os.path.join(path, "volume.json")) as f:
        meta = json.load(f)
    meta.pop("checksum")
    assert meta["id"] == GOLDEN_VOLUME_ID
    meta["created_at"] = 0.0
    for snap in meta["snapshots"]:
        snap["created_at"] = 0.0
    write_json_atomic(path, "volume.json", meta)
    os.unlink(os.path.join(path, "lock"))


def build_pack_v2() -> bytes:
    """The v2 golden pack (see :data:`PACK_V2`)."""
    from overlaycache._impl import core
    from overlaycache.remote.layout import encode_pack

    vid, rs, pack, created_at, versions = PACK_V2
    raw, _entries = encode_pack(vid, rs, pack, created_at,
                                [(r, seq, data, bytes(core.checksum(data))) for r, seq, data in versions])
    return bytes(raw)


def build_root_v2(spec: RootSpec = ROOT_V2) -> tuple[bytes, dict[bytes, bytes]]:
    """A v2 golden root and its map pages.

    Parameters
    ----------
    spec : RootSpec
        The PIT: :data:`ROOT_V2` or :data:`DEEP_ROOT_V2`.

    Returns
    -------
    root : bytes
        The root object.
    pages : dict of bytes to bytes
        Every page of its tree: address -> object.
    """
    from overlaycache._impl import core
    from overlaycache.remote.layout import (
        FANOUT,
        LEAF_ENTRY,
        LEAF_SPAN,
        NO_DIGEST,
        NODE_ENTRY,
        encode_page,
        encode_root,
        tree_shape,
        version_digest,
    )

    vid, size, rs, seq, created_at, label, records = spec
    depth, _counts = tree_shape((size + rs - 1) // rs)
    leaves: dict[int, list[tuple[int, bytes]]] = {}
    for region, rseq, pack, offset, length, data in sorted(records):
        i, pos = divmod(region, LEAF_SPAN)
        entry = LEAF_ENTRY.pack(pos, rseq, pack, offset, length, bytes(core.checksum(data)),
                                version_digest(data) if length else NO_DIGEST)
        leaves.setdefault(i, []).append((pos, entry))
    pages: dict[bytes, bytes] = {}
    level: dict[int, bytes] = {}
    for i, entries in sorted(leaves.items()):
        address, raw = encode_page(0, i, b"".join(e for _pos, e in entries), len(entries))
        pages[address] = raw
        level[i] = address
    for lvl in range(1, depth):
        nodes: dict[int, list[bytes]] = {}
        for i, address in sorted(level.items()):
            nodes.setdefault(i // FANOUT, []).append(NODE_ENTRY.pack(i % FANOUT, address))
        level = {}
        for p, entries2 in sorted(nodes.items()):
            address, raw = encode_page(lvl, p, b"".join(entries2), len(entries2))
            pages[address] = raw
            level[p] = address
    return encode_root(vid, size, rs, seq, created_at, label, sorted(level.items())), pages


def write_v2(directory: str) -> None:
    """Write the v2 golden objects into ``directory``: ``v2.pack``, ``v2.root``, ``v2-deep.root``
    and ``v2-pages/<address>`` (replaced)."""
    pages_dir = os.path.join(directory, "v2-pages")
    shutil.rmtree(pages_dir, ignore_errors=True)
    os.makedirs(pages_dir)
    with open(os.path.join(directory, "v2.pack"), "wb") as f:
        f.write(build_pack_v2())
    for name, spec in (("v2.root", ROOT_V2), ("v2-deep.root", DEEP_ROOT_V2)):
        root, pages = build_root_v2(spec)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(root)
        for address, raw in pages.items():
            with open(os.path.join(pages_dir, address.hex()), "wb") as f:
                f.write(raw)


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--v2":
        write_v2(argv[1])
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m overlaycache.testing.golden DIR   (replaces DIR, e.g. tests/golden/local-v2)\n"
              "       python -m overlaycache.testing.golden --v2 DIR   (the v2 objects, e.g. tests/golden)",
              file=sys.stderr)
        return 2
    target = argv[0]
    shutil.rmtree(target, ignore_errors=True)
    build_local(target)
    normalise(target)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
