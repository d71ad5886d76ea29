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
