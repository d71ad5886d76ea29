"""The secondary as a separate security domain: what the primary's credentials need.

The primary (a volume replicating, publishing PITs, serving a distributed overlay, opening images
and clones) needs only conditional PUT, GET, HEAD and LIST: it never overwrites and never deletes.
Everything that deletes (collapse, repair) runs with other credentials. Here the primary's store is
a wrapper that refuses a plain PUT and a DELETE, as a bucket policy for its identity would.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from overlaycache import LocalStore, RetentionPolicy, Volume
from overlaycache.errors import StoreAccessError

RS = 4096
NREG = 16


class PrimaryIdentity:
    """A store seen with the primary's credentials: conditional PUT, GET, HEAD, LIST only."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.location = inner.location
        self.refused: list[str] = []

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        if not if_absent:
            self.refused.append(f"PUT {key}")
            raise StoreAccessError(f"{self.location}: put {key}: access denied (the primary may not overwrite)")
        self.inner.put(key, data, if_absent=True)

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.refused.append(f"DELETE {keys[:1]}")
        raise StoreAccessError(f"{self.location}: delete: access denied (the primary may not delete)")

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return bytes(self.inner.get(key, start, length))

    def head(self, key: str) -> int | None:
        size: int | None = self.inner.head(key)
        return size

    def list(self, prefix: str = "") -> Iterator[str]:
        return iter(self.inner.list(prefix))

    def list_dirs(self, prefix: str) -> list[str]:
        out: list[str] = self.inner.list_dirs(prefix)
        return out

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # the catalog's methods, bound to this identity
        from overlaycache.remote.catalog import CatalogMixin

        method = getattr(CatalogMixin, name)
        return lambda *a, **k: method(self, *a, **k)


@pytest.mark.parametrize("mode", ["sync", "async", "periodic"])
def test_the_primary_never_overwrites_or_deletes(tmp_path: Path, mode: str) -> None:
    admin = LocalStore(tmp_path / "s")
    primary = PrimaryIdentity(admin)
    kwargs: dict[str, Any] = {"period": 3600.0} if mode == "periodic" else {}
    with Volume.create(tmp_path / "v", NREG * RS, region_size=RS, secondary=primary, replication=mode,
                       **kwargs) as vol:
        for r in range(NREG):
            vol.write(r * RS, bytes([r + 1]) * RS)
        t1 = vol.snapshot("T1")
        vol.write(0, bytes(RS))  # an all-zero version
        vol.snapshot("T2")
        vol.mark_unavailable([2, 3])  # the distributed overlay: a PIT, a lease
        assert vol.read(2 * RS, 2) == b"\x03\x03"
        vol.write(2 * RS, b"x" * RS)
        vol.snapshot("T3")
        with vol.image(t1) as img:  # a recovery image: a lease
            assert img.read(RS, 1) == b"\x02"
            with img.clone(tmp_path / "clone") as clone:
                clone.write(0, b"c")
        vol.hydrate()
        vol.restore(t1)
        vid = vol.id
    with Volume.open(tmp_path / "v", secondary=primary) as vol:
        vol.write(5 * RS, b"again")
        vol.snapshot()
    assert primary.refused == []
    # Collapsing needs the other credentials: with the primary's it is refused, clearly.
    with pytest.raises(StoreAccessError, match="may not delete"):
        primary.collapse(vid, RetentionPolicy([], keep_last=1), page_grace=0)
    report = admin.collapse(vid, RetentionPolicy([], keep_last=1), page_grace=0)
    assert len(report.kept) >= 1 and admin.check(vid).problems == []


# -- self-verifying history -----------------------------------------------------------------------

def _two_pits(tmp_path: Path) -> tuple[LocalStore, str, list[Any], dict[str, bytes]]:
    store = LocalStore(tmp_path / "s")
    images = {}
    with Volume.create(tmp_path / "v", NREG * RS, region_size=RS, secondary=store, replication="periodic",
                       period=3600.0) as vol:
        snaps = []
        for tag in (1, 2):
            vol.write(0, bytes([tag]) * RS)
            snaps.append(vol.snapshot(f"t{tag}"))
            images[snaps[-1].id] = vol.read(0, vol.size)
        return store, vol.id, snaps, images


def _forged_root(store: Any, vid: str, like: Any, seq: int) -> bytes:
    """A root valid in every check of its own (header and body checksums): PIT ``like``'s map
    under cutoff ``seq``, as whoever holds PUT rights can write."""
    from overlaycache.remote.layout import encode_root
    from overlaycache.remote.listing import find_root_key, read_root

    root = read_root(store, vid, find_root_key(store, vid, like.seq))
    return encode_root(vid, root.size, root.region_size, seq, root.created_at, "forged", sorted(root.children.items()))


def test_an_overwritten_root_is_refused(tmp_path: Path) -> None:
    """A plain PUT over a PIT's root with a root that passes its own checksums (the newer PIT's map
    under the older PIT's number) is refused on read: the key names the BLAKE2b of the bytes."""
    from overlaycache.errors import CorruptionError
    from overlaycache.remote.listing import find_root_key

    store, vid, (one, two), images = _two_pits(tmp_path)
    key = find_root_key(store, vid, one.seq)
    store.put(key, _forged_root(store, vid, two, one.seq))  # overwrite
    with pytest.raises(CorruptionError, match="BLAKE2b digest in its key"):
        store.snapshots(vid)
    with pytest.raises(CorruptionError, match="BLAKE2b digest in its key"):
        store.image(vid, one.id)
    report = store.check(vid)
    assert not report.ok and one.id in report.damaged_snapshots
    assert store.check(vid, repair=True).repaired == [one.id]  # rebuilt from the packs, as it was
    assert [s.label for s in store.snapshots(vid)] == [f"rebuilt-{one.id}", "t2"]  # not the forger's label
    assert store.image(vid, one.id).read(0, NREG * RS) == images[one.id]
    assert store.image(vid, two.id).read(0, NREG * RS) == images[two.id]


def test_a_second_root_for_a_pit_is_refused(tmp_path: Path) -> None:
    """A root added beside a PIT's own (under its own correct digest) makes the PIT ambiguous:
    readers refuse it naming both keys, and check reports it, rather than pick one."""
    from overlaycache.errors import CorruptionError
    from overlaycache.remote.layout import root_digest, root_key

    store, vid, (one, two), _images = _two_pits(tmp_path)
    forged = _forged_root(store, vid, two, one.seq)
    extra = root_key(vid, one.seq, root_digest(forged))
    store.put(extra, forged, if_absent=True)
    with pytest.raises(CorruptionError, match=f"PIT {one.id} has 2 roots.*{extra}"):
        store.snapshots(vid)
    with pytest.raises(CorruptionError, match="2 roots"):
        store.image(vid, one.id)
    problems = store.check(vid).problems
    assert any(f"PIT {one.id}: 2 roots" in p and extra in p for p in problems), problems
    store.delete([extra])  # an administrator removes the one that is not the primary's
    assert [s.id for s in store.snapshots(vid)] == [one.id, two.id]


def test_a_publish_whose_answer_was_lost_is_published(tmp_path: Path) -> None:
    """The root's conditional PUT stored it but the answer was lost and the retry found the key
    taken (S3 answers 412): as the key names the digest, it is this root, and the PIT stands."""
    from overlaycache.errors import ObjectExistsError

    class LostAnswer(LocalStore):
        def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
            super().put(key, data, if_absent=if_absent)
            if key.endswith(".root"):
                raise ObjectExistsError(f"{self.location}: {key} exists (the retry of a PUT that succeeded)")

    store = LostAnswer(tmp_path / "s")
    with Volume.create(tmp_path / "v", NREG * RS, region_size=RS, secondary=store, replication="periodic",
                       period=3600.0) as vol:
        vol.write(0, b"x" * RS)
        snap = vol.snapshot("kept")
        assert [s.id for s in store.snapshots(vol.id)] == [snap.id]
        assert store.image(vol.id, snap).read(0, RS) == b"x" * RS


def test_every_version_a_pit_names_carries_its_blake3_digest(tmp_path: Path) -> None:
    """What a reader checks fetched bytes against: the BLAKE3 digest the map records (beside the
    mmh3 checksum), computed when the version was shipped; all-zero versions need none."""
    from overlaycache.remote.layout import NO_DIGEST, version_digest
    from overlaycache.remote.listing import find_root_key, read_root
    from overlaycache.remote.tree import PageSource, PitMap

    store, vid, (_one, two), images = _two_pits(tmp_path)
    pit = PitMap(read_root(store, vid, find_root_key(store, vid, two.seq)), PageSource(store, vid))
    image = images[two.id]
    stored = list(pit.stored())
    assert stored
    for r, _seq, _pack, _off, length, _csum, digest in stored:
        data = image[r * RS : (r + 1) * RS]
        assert digest == (version_digest(data) if length else NO_DIGEST), r
        assert pit.digest(r) == digest
