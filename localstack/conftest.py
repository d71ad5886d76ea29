"""The integration session: start LocalStack and SeaweedFS on 127.0.0.1 (installing them first if
needed), hand their endpoints to the tests, and stop what this session started.

A server that cannot be installed or started fails the run; these tests never skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import servers  # noqa: E402

NAMES = ("localstack", "seaweedfs")


def _up(name: str) -> bool:
    try:
        servers.wait_ready(name, 0.5)
        return True
    except Exception:  # noqa: BLE001 - not up, whatever the reason
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == HERE:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def real_servers() -> Iterator[dict[str, Any]]:
    """The endpoints of both servers, started by this session unless they already run."""
    need = [n for n in NAMES if not _up(n)]
    if need:
        subprocess.run(["bash", str(HERE / "install.sh")], check=True)
        subprocess.run(["bash", str(HERE / "start.sh"), *need], check=True)
    yield servers.ENDPOINTS
    if need:
        subprocess.run(["bash", str(HERE / "stop.sh"), *need], check=False)


def make_store(name: str, bucket: str | None = None, **kwargs: Any) -> Any:
    """An S3Store of server ``name``, on ``bucket`` or on a new bucket."""
    from overlaycache.store import S3Store

    ep = servers.ENDPOINTS[name]
    store = S3Store(bucket or f"oc-it-{uuid.uuid4().hex[:12]}", prefix="appliance-1", endpoint_url=ep.endpoint_url,
                    aws_access_key_id=ep.aws_access_key_id, aws_secret_access_key=ep.aws_secret_access_key,
                    region_name=ep.region_name, **kwargs)
    store.create_bucket()
    return store


@pytest.fixture(params=NAMES)
def server(request: pytest.FixtureRequest, real_servers: dict[str, Any]) -> str:
    """Each real server in turn."""
    return str(request.param)


@pytest.fixture
def real_store(server: str) -> Iterator[Any]:
    store = make_store(server, max_attempts=3, read_timeout=10)
    yield store
    store.close()


def pid_of(name: str) -> int:
    with open(os.path.join(servers.RUN_DIR, f"{name}.pid")) as f:
        return int(f.read().strip())
