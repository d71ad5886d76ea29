"""S3 servers for the benchmarks: moto's server in its own process on a free loopback port, and
SeaweedFS when ``OC_BENCH_SEAWEEDFS`` names its endpoint (``localstack/start.sh seaweedfs``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

WORKERS = 16
CREDS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(endpoint: str, timeout: float = 30) -> None:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDS)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _servers() -> list[str]:
    names = ["moto"]
    if os.environ.get("OC_BENCH_SEAWEEDFS"):
        names.append("seaweedfs")
    return names


@pytest.fixture(scope="module", params=_servers())
def endpoint(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(name, endpoint_url, credentials) of a running S3 server."""
    if request.param == "seaweedfs":
        creds = {"aws_access_key_id": os.environ.get("OC_BENCH_S3_KEY", "overlaycache"),
                 "aws_secret_access_key": os.environ.get("OC_BENCH_S3_SECRET", "overlaycache-secret")}
        yield "seaweedfs", os.environ["OC_BENCH_SEAWEEDFS"], creds
        return
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url)
        yield "moto", url, CREDS
    finally:
        proc.terminate()
        proc.wait(10)


def client(url: str, creds: dict[str, str]) -> Any:
    """A plain boto3 client for the baselines, with the same pool size as the store."""
    cfg = Config(max_pool_connections=WORKERS, s3={"addressing_style": "path"},
                 retries={"total_max_attempts": 4, "mode": "standard"},
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=cfg, **creds)


def pit_ranges(store: Any, volume_id: str, snapshot: Any, regions: set[int] | None = None,
               prefix: str = "") -> list[tuple[str, int, int]]:
    """The byte ranges of a PIT's regions in their packs, adjacent ones merged as the region source
    merges them (:data:`overlaycache.remote.source.MAX_RUN_BYTES`): what a plain boto3 client
    that knew the layout would GET. Keys carry ``prefix`` (the store's own prefix)."""
    from overlaycache.remote.catalog import Catalog
    from overlaycache.remote.layout import pack_key
    from overlaycache.remote.source import MAX_RUN_BYTES

    pit = Catalog(store).pit_map(volume_id, snapshot)
    runs: list[list[int]] = []  # [pack, start, end]
    for r, _seq, pack, off, length, _csum, _digest in sorted(pit.stored(), key=lambda e: (e[2], e[3])):
        if pack == 0 or (regions is not None and r not in regions):
            continue
        if runs and runs[-1][0] == pack and runs[-1][2] == off and off + length - runs[-1][1] <= MAX_RUN_BYTES:
            runs[-1][2] = off + length
        else:
            runs.append([pack, off, off + length])
    return [(f"{prefix}{pack_key(volume_id, p)}", a, b - a) for p, a, b in runs]


def ranged_get(client: Any, bucket: str, key: str, start: int, length: int) -> bytes:
    """One ranged GET with plain boto3."""
    body: bytes = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")["Body"].read()
    return body
