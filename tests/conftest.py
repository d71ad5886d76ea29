"""Shared fixtures: the core implementations to test, and volumes in temporary directories."""

from __future__ import annotations

from types import ModuleType

import pytest

# Detailed assertion messages in the shared harnesses too; registered before they are imported.
pytest.register_assert_rewrite("overlaycache.testing")

from overlaycache.testing.cores import IMPLEMENTATIONS  # noqa: E402


@pytest.fixture(params=IMPLEMENTATIONS, ids=[m.IMPLEMENTATION for m in IMPLEMENTATIONS])
def core(request: pytest.FixtureRequest) -> ModuleType:
    """Each core implementation in turn (compiled and pure Python)."""
    return request.param  # type: ignore[no-any-return]


# -- S3: one moto server per session on a free loopback port, reset between tests -----------------

import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto S3 server running in this process."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_store(moto_endpoint: str) -> Iterator[Any]:
    """An S3Store on a fresh bucket of the moto server (state reset before each test)."""
    from overlaycache.store import S3Store

    req = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10).close()
    store = S3Store(f"oc-{uuid.uuid4().hex[:12]}", prefix="appliance-1", endpoint_url=moto_endpoint,
                    aws_access_key_id="testing", aws_secret_access_key="testing-secret",
                    max_attempts=2, read_timeout=10)
    store.create_bucket()
    yield store
    store.close()


@pytest.fixture(params=["local", "moto"])
def any_store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """Each store implementation in turn: a LocalStore directory and an S3Store on moto."""
    if request.param == "local":
        from overlaycache.store import LocalStore

        return LocalStore(tmp_path / "secondary", prefix="appliance-1")
    return request.getfixturevalue("s3_store")
