"""The store contract: behaviour every ObjectStore must have, as a pytest test class.

Subclass :class:`StoreContract` in a test module and give it a ``store`` fixture yielding an empty
store; pytest collects the inherited tests. The project runs it against LocalStore and moto
(``tests/test_store.py``) and against LocalStack and SeaweedFS (``localstack/test_integration.py``).
Imports pytest: for test suites only.
"""

from __future__ import annotations

from typing import Any

import pytest

from overlaycache.errors import ObjectExistsError, ObjectNotFoundError
from overlaycache.store import ObjectStore


__all__ = ["StoreContract"]


class StoreContract:
    """Behaviour every ObjectStore must have; subclasses provide the ``store`` fixture.

    The fixture yields an empty store (no keys under its prefix); the tests write, read, list and
    delete keys in it, including 1001 keys to cross one listing page.
    """

    def test_put_get_head(self, store: Any) -> None:
        assert isinstance(store, ObjectStore)
        store.put("a/b/c", b"hello world")
        assert store.get("a/b/c") == b"hello world"
        assert store.get("a/b/c", 6) == b"world"
        assert store.get("a/b/c", 2, 3) == b"llo"
        assert store.get("a/b/c", 0, 0) == b""
        assert store.head("a/b/c") == 11
        assert store.head("a/b/missing") is None
        store.put("a/b/c", bytearray(b"replaced"))
        assert store.get("a/b/c") == b"replaced"
        store.put("a/big", memoryview(bytes(range(256)) * 1024))
        assert store.get("a/big", 1000, 10) == (bytes(range(256)) * 1024)[1000:1010]

    def test_conditional_put_never_overwrites(self, store: Any) -> None:
        store.put("k/1", b"first", if_absent=True)
        with pytest.raises(ObjectExistsError) as info:
            store.put("k/1", b"second", if_absent=True)
        assert info.value.key == "k/1" and isinstance(info.value, FileExistsError)
        assert store.get("k/1") == b"first"

    def test_missing_object(self, store: Any) -> None:
        with pytest.raises(ObjectNotFoundError) as info:
            store.get("no/such/key")
        assert isinstance(info.value, KeyError) and info.value.key == "no/such/key"

    def test_list_and_delete(self, store: Any) -> None:
        keys = ["v/x/1", "v/x/2", "v/y/1", "w/1"]
        for k in keys:
            store.put(k, k.encode())
        assert list(store.list("v/")) == ["v/x/1", "v/x/2", "v/y/1"]
        assert list(store.list("v/x/")) == ["v/x/1", "v/x/2"]
        assert list(store.list()) == sorted(keys)
        assert store.list_dirs("v/") == ["x", "y"]
        store.delete(["v/x/1", "v/y/1", "never/existed"])
        assert list(store.list("v/")) == ["v/x/2"]

    def test_many_keys_list_past_one_page(self, store: Any) -> None:
        for i in range(1001):
            store.put(f"many/{i:05d}", b"")
        assert len(list(store.list("many/"))) == 1001
        store.delete(store.list("many/"))
        assert list(store.list("many/")) == []
