"""Integration: the secondary killed under a distributed overlay, on SeaweedFS.

The scenarios of :mod:`overlaycache.testing.faults`, with the server a real ``weed mini`` process
that is SIGKILLed and started again by ``start.sh`` on the same ports with the same data directory
(``OC_KEEP_DATA=1``): the server comes back with everything it had acknowledged.

This module runs its own SeaweedFS instance, on free loopback ports and in its own run directory,
rather than the session's: killing the shared server would race with other tests (and with other
runs of the suite on this machine), and LocalStack, slow to start, is not needed here.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlaycache.errors import StoreError
from overlaycache.testing import faults as ff
from overlaycache.testing import servers

HERE = Path(__file__).parent
LOOPBACK = "127.0.0.1"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections take ports from there)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_ports(n: int) -> list[int]:
    """``n`` ports ``p`` with ``p`` and ``p + 10000`` (SeaweedFS's gRPC port) free on loopback, all
    below the ephemeral range: a port in it may be taken by any outgoing connection between the
    kill and the restart (a restarted weed once failed to bind its gRPC port that way)."""
    rnd = random.Random()
    top = min(_ephemeral_low(), 65536) - 10000
    out: list[int] = []
    while len(out) < n:
        p = rnd.randrange(10000, top)
        if all(abs(p - q) != 10000 and p != q for q in out) and _free(p) and _free(p + 10000):
            out.append(p)
    return out


class SeaweedServer:
    """A dedicated ``weed mini`` that can be killed and started again with its data."""

    def __init__(self, run_dir: Path) -> None:
        self.ports = _free_ports(5)
        s3, master, volume, filer, admin = self.ports
        self.run_dir = run_dir
        self.env = {**os.environ, "OC_SERVERS_RUN": str(run_dir), "OC_SEAWEEDFS_S3_PORT": str(s3),
                    "OC_SEAWEEDFS_MASTER_PORT": str(master), "OC_SEAWEEDFS_VOLUME_PORT": str(volume),
                    "OC_SEAWEEDFS_FILER_PORT": str(filer), "OC_SEAWEEDFS_ADMIN_PORT": str(admin)}
        self.endpoint = f"http://{LOOPBACK}:{s3}"
        self.bucket = f"oc-faults-{uuid.uuid4().hex[:12]}"
        self._pid: int | None = None
        self._run_start(keep_data=False)
        store = self.store()
        store.create_bucket()
        store.close()
        self._wait_for_data()

    def _run_start(self, keep_data: bool) -> None:
        env = {**self.env, "OC_KEEP_DATA": "1" if keep_data else "0"}
        subprocess.run(["bash", str(HERE / "start.sh"), "seaweedfs"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        self._pid = int((self.run_dir / "seaweedfs.pid").read_text().strip())

    def start(self) -> None:
        """Start it again on the same ports, with the data it had, and wait until it serves it."""
        assert self._pid is None, "already running"
        self._run_start(keep_data=True)
        self._wait_for_data()

    def _wait_for_data(self, timeout: float = 30.0) -> None:
        """``start.sh`` returns once the S3 gateway answers ListBuckets, but until weed's volume
        server has registered again a GET of a stored object gets InternalError and a PUT hangs:
        wait (bounded) until a probe object outside the volumes' prefix is written and read back,
        so that a test sees a restarted server, not a starting one."""
        from overlaycache.store import S3Store

        ep = servers.ENDPOINTS["seaweedfs"]
        probe = S3Store(self.bucket, prefix="oc-readiness", endpoint_url=self.endpoint,
                        aws_access_key_id=ep.aws_access_key_id, aws_secret_access_key=ep.aws_secret_access_key,
                        region_name=ep.region_name, max_attempts=1, connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    probe.put("probe", b"ready")
                    if probe.get("probe") == b"ready":
                        return
                except StoreError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
        finally:
            probe.close()

    def stop(self) -> None:
        """SIGKILL: no goodbye, every connection is cut."""
        pid, self._pid = self._pid, None
        assert pid is not None, "stopped twice"
        servers.kill(pid, "seaweedfs")

    def close(self) -> None:
        """Kill it (its data is not needed: SIGTERM can take stop.sh's full 20 s after restarts),
        then let stop.sh clean up, and remove the gRPC sockets weed leaves in /tmp when killed."""
        if self._pid is not None:
            self.stop()
        subprocess.run(["bash", str(HERE / "stop.sh"), "seaweedfs"], check=False, env=self.env,
                       stderr=subprocess.DEVNULL)
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port + 10000}.sock"):
                sock.unlink(missing_ok=True)

    def store(self) -> Any:
        from overlaycache.store import S3Store

        ep = servers.ENDPOINTS["seaweedfs"]
        return S3Store(self.bucket, prefix="appliance-1", endpoint_url=self.endpoint,
                       aws_access_key_id=ep.aws_access_key_id, aws_secret_access_key=ep.aws_secret_access_key,
                       region_name=ep.region_name, max_attempts=1, connect_timeout=2, read_timeout=10)


@pytest.fixture(scope="module")
def seaweed_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs-run"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def seaweed(seaweed_instance: SeaweedServer) -> Iterator[SeaweedServer]:
    """The dedicated server, running; a test that leaves it killed gets it restarted."""
    yield seaweed_instance
    if seaweed_instance._pid is None:
        seaweed_instance.start()


def test_remote_reads_with_the_secondary_killed(tmp_path: Path, seaweed: SeaweedServer) -> None:
    ff.remote_reads_with_the_secondary_killed(tmp_path, seaweed, "async")


def test_reopen_while_the_secondary_is_down(tmp_path: Path, seaweed: SeaweedServer) -> None:
    ff.reopen_while_the_secondary_is_down(tmp_path, seaweed)


@pytest.mark.parametrize(("k", "racing"), [(3, False), (5, True)], ids=["after-3", "racing"])
def test_parallel_remote_read_killed(tmp_path: Path, seaweed: SeaweedServer, k: int, racing: bool) -> None:
    ff.parallel_remote_read_killed(tmp_path, seaweed, k, racing)


@pytest.mark.parametrize(("where", "k", "reopen"), [("regions", 4, True), ("root", 0, False)],
                         ids=["after-4-puts-reopened", "root-live"])
def test_forced_replication_killed(tmp_path: Path, seaweed: SeaweedServer, where: str, k: int,
                                   reopen: bool) -> None:
    ff.forced_replication_killed(tmp_path, seaweed, where, k, reopen)
