"""The secondary killed under a distributed overlay, on a real S3 server: a moto server of this
process on a loopback port, stopped (connections refused) and started again on the same port.
Moto keeps its buckets in the process, so the server comes back with the same data.

The scenarios are in :mod:`overlaycache.testing.faults`; the integration suite runs them against SeaweedFS.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlaycache.errors import RegionUnavailableError
from overlaycache.testing import faults as ff


class MotoServer:
    """A dedicated moto S3 server on 127.0.0.1 that can be stopped and started again."""

    def __init__(self) -> None:
        self.port = 0
        self.bucket = f"oc-faults-{uuid.uuid4().hex[:12]}"
        self._server: Any = None
        self.start()
        ff_store = self.store()
        ff_store.create_bucket()
        ff_store.close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        assert self._server is None
        if self.port:
            # ThreadedMotoServer.start() waits forever if its thread cannot bind: check first.
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", self.port))
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server

    def stop(self) -> None:
        server, self._server = self._server, None
        assert server is not None, "stopped twice"
        server.stop()  # werkzeug closes every connection after its response: none lingers

    def store(self) -> Any:
        from overlaycache.store import S3Store

        return S3Store(self.bucket, prefix="appliance-1", endpoint_url=self.endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing-secret",
                       max_attempts=1, connect_timeout=2, read_timeout=10)


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    if server._server is not None:
        server.stop()


@pytest.mark.parametrize("mode", ["periodic", "async", "sync"])
def test_remote_reads_with_the_secondary_killed(tmp_path: Path, moto: MotoServer, mode: str) -> None:
    ff.remote_reads_with_the_secondary_killed(tmp_path, moto, mode)


def test_reopen_while_the_secondary_is_down(tmp_path: Path, moto: MotoServer) -> None:
    ff.reopen_while_the_secondary_is_down(tmp_path, moto)


@pytest.mark.parametrize(("k", "racing"), [(0, False), (3, False), (10, False), (5, True)],
                         ids=["first", "after-3", "after-10", "racing"])
def test_parallel_remote_read_killed(tmp_path: Path, moto: MotoServer, k: int, racing: bool) -> None:
    ff.parallel_remote_read_killed(tmp_path, moto, k, racing)


@pytest.mark.parametrize("reopen", [False, True], ids=["live", "reopened"])
@pytest.mark.parametrize(("where", "k"), [("regions", 0), ("regions", 4), ("root", 0),
                                          ("root-landed", 0)],
                         ids=["first-put", "after-4-puts", "root", "root-landed"])
def test_forced_replication_killed(tmp_path: Path, moto: MotoServer, where: str, k: int, reopen: bool) -> None:
    ff.forced_replication_killed(tmp_path, moto, where, k, reopen)


# -- regressions: failed begins, refused writes -----------------------------------------------------
@pytest.mark.parametrize("where", ["regions", "root"])
def test_lost_regions_survive_a_failed_begin(tmp_path: Path, moto: MotoServer, where: str) -> None:
    ff.lost_regions_survive_a_failed_begin(tmp_path, moto, where)


def test_read_after_a_failed_begin_retries_it(tmp_path: Path, moto: MotoServer) -> None:
    ff.read_after_a_failed_begin_retries_it(tmp_path, moto)


def test_write_across_a_remote_region_is_all_or_nothing(tmp_path: Path, moto: MotoServer) -> None:
    ff.write_across_a_remote_region_is_all_or_nothing(tmp_path, moto)


@pytest.mark.parametrize("mode", ["periodic", "async"])
def test_refused_partial_write_leaves_replication_alone(tmp_path: Path, moto: MotoServer, mode: str) -> None:
    ff.refused_partial_write_leaves_replication_alone(tmp_path, moto, mode)
