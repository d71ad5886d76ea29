"""The store contract, run against every store: a LocalStore directory and an S3Store on moto.

The integration suite (localstack/) runs the same class against LocalStack and SeaweedFS.
"""

from __future__ import annotations

from typing import Any

import pytest

from overlaycache.errors import (
    InvalidArgumentError,
    SecondaryUnavailableError,
    StoreAccessError,
)
from overlaycache.store import S3Store
from overlaycache.testing.store_contract import StoreContract


class TestStores(StoreContract):
    @pytest.fixture
    def store(self, any_store: Any) -> Any:
        return any_store


def test_local_store_rejects_bad_keys(tmp_path: Any) -> None:
    from overlaycache.store import LocalStore

    store = LocalStore(tmp_path)
    for key in ["", "/abs", "a//b", "a/../b", "a/./b"]:
        with pytest.raises(InvalidArgumentError):
            store.put(key, b"x")


def test_unreachable_endpoint_is_one_clear_error() -> None:
    store = S3Store("bkt", endpoint_url="http://127.0.0.1:9", aws_access_key_id="AKIDSECRETLOOKING",
                    aws_secret_access_key="very-secret-value", max_attempts=1, connect_timeout=1)
    with pytest.raises(SecondaryUnavailableError) as info:
        store.get("x")
    msg = str(info.value)
    assert "127.0.0.1:9" in msg and "bkt" in msg and "\n" not in msg
    assert "very-secret-value" not in msg and "AKIDSECRETLOOKING" not in msg
    assert info.value.__cause__ is not None


def test_missing_bucket(s3_store: Any, moto_endpoint: str) -> None:
    store = S3Store("no-such-bucket-here", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                    aws_secret_access_key="testing-secret", max_attempts=1)
    with pytest.raises(StoreAccessError) as info:
        store.put("x", b"y")
    assert "no such bucket" in str(info.value) and "no-such-bucket-here" in str(info.value)


def test_hung_server_times_out_with_a_clear_error() -> None:
    """A server that accepts connections and never answers is caught by the read timeout."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        store = S3Store("bkt", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="k",
                        aws_secret_access_key="s", max_attempts=1, connect_timeout=1, read_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(SecondaryUnavailableError) as info:
            store.get("x")
        assert time.monotonic() - start < 10
        assert f"127.0.0.1:{port}" in str(info.value)
        store.close()
    finally:
        listener.close()
