"""The integration session: start LocalStack and SeaweedFS on 127.0.0.1 (installing them first if
needed), hand their endpoints to the tests, and stop what this session started.

A server that cannot be installed or started fails the run; these tests never skip.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Detailed assertion messages in the shared harnesses too; registered before they are imported.
pytest.register_assert_rewrite("overlaycache.testing")

from overlaycache.testing import servers  # noqa: E402

HERE = Path(__file__).parent
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


@pytest.fixture(params=NAMES)
def server(request: pytest.FixtureRequest, real_servers: dict[str, Any]) -> str:
    """Each real server in turn."""
    return str(request.param)


@pytest.fixture
def real_store(server: str) -> Iterator[Any]:
    store = servers.make_store(server, max_attempts=3, read_timeout=10)
    yield store
    store.close()
