"""The secondary as a separate security domain, enforced by the server: moto with IAM turned on.

A moto server started with ``INITIAL_NO_AUTH_ACTION_COUNT`` accepts the first few requests from
anyone (used here to create the bucket and two IAM users) and then authorizes every request by the
caller's IAM policies. The *primary* may only put, get, head and list; the *admin* may do anything.
A whole life cycle (replication, PITs, failover, recovery images, restore) runs as the primary;
a delete through the primary's credentials is refused with a clear error; collapse runs as the admin.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from overlaycache import Volume
from overlaycache.errors import StoreAccessError
from overlaycache.retention import RetentionPolicy
from overlaycache.store import S3Store

RS = 4096
BUCKET = "history"
SETUP_REQUESTS = 7  # the unauthenticated requests of _setup, in order

_PRIMARY = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject", "s3:ListBucket"],
    "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}
_ADMIN = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


#: moto's server, with its signature check skipped: it miscomputes the signature of a request whose
#: query has a "/" (moto issue 5948, open), which every prefixed listing has. The caller's identity
#: still comes from its access key, and every request is still authorized by that identity's IAM
#: policies, which is what these tests are about.
_LAUNCH = """
import sys
import moto.iam.access_control as access_control
access_control.IAMRequestBase.check_signature = lambda self: None
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def iam_server() -> Iterator[dict[str, Any]]:
    """A moto server enforcing IAM, with the bucket and the two identities; their credentials."""
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_REQUESTS))
    with subprocess.Popen([sys.executable, "-P", "-c", _LAUNCH, str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("moto's server did not start") from None
                    time.sleep(0.1)
            endpoint = f"http://127.0.0.1:{port}"
            yield {"endpoint": endpoint, **_setup(endpoint)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _setup(endpoint: str) -> dict[str, dict[str, str]]:
    anyone = {"endpoint_url": endpoint, "aws_access_key_id": "setup", "aws_secret_access_key": "setup",
              "region_name": "us-east-1"}
    boto3.client("s3", **anyone).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", **anyone)
    keys = {}
    for user, policy in (("primary", _PRIMARY), ("admin", _ADMIN)):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=user, PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
    return keys


def _store(server: dict[str, Any], who: str, prefix: str) -> S3Store:
    return S3Store(BUCKET, prefix=prefix, endpoint_url=server["endpoint"], max_attempts=2, **server[who])


def test_a_whole_life_cycle_needs_no_delete_right(tmp_path: Path, iam_server: dict[str, Any]) -> None:
    primary = _store(iam_server, "primary", "life")
    try:
        with Volume.create(tmp_path / "v", 32 * RS, region_size=RS, secondary=primary, replication="async") as vol:
            for r in range(8):
                vol.write(r * RS, bytes([r + 1]) * RS)
            t1 = vol.snapshot("t1")
            vol.write(0, b"\xee" * RS)
            vol.mark_unavailable([1, 2])  # failover: a PIT, then regions 1 and 2 from it
            assert vol.read(RS, RS) == bytes([2]) * RS
            with vol.image("t1") as img:
                assert img.read(0, RS) == bytes([1]) * RS
            vol.hydrate()
            vol.restore(t1)
            assert vol.read(0, 8 * RS) == b"".join(bytes([r + 1]) * RS for r in range(8))
            vid = vol.id
        with Volume.open(tmp_path / "v", secondary=primary) as vol:  # reopen, publish again
            vol.write(9 * RS, b"again")
            vol.snapshot("t2")
        assert [s.label for s in primary.snapshots(vid)][-1] == "t2"
    finally:
        primary.close()


def test_the_primary_cannot_delete_and_the_admin_collapses(tmp_path: Path, iam_server: dict[str, Any]) -> None:
    primary = _store(iam_server, "primary", "gc")
    admin = _store(iam_server, "admin", "gc")
    try:
        with Volume.create(tmp_path / "v", 8 * RS, region_size=RS, secondary=primary, replication="periodic",
                           period=3600.0) as vol:
            for i in range(4):
                vol.write(0, bytes([i + 1]) * RS)
                vol.snapshot(f"s{i}")
            vid = vol.id
        keys = list(primary.list(f"volumes/{vid}/snapshots/"))
        with pytest.raises(StoreAccessError, match="may not delete") as info:
            primary.delete(keys[:1])
        assert "AccessDenied" in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(StoreAccessError):
            primary.collapse(vid, RetentionPolicy(keep_last=1))  # type: ignore[attr-defined]
        assert len(primary.snapshots(vid)) == 4  # nothing was deleted
        report = admin.collapse(vid, RetentionPolicy(keep_last=1))  # type: ignore[attr-defined]
        assert [s.label for s in report.kept] == ["s3"] and len(report.removed) == 3
        assert [s.label for s in primary.snapshots(vid)] == ["s3"]
        with primary.image(vid, "s3") as img:  # type: ignore[attr-defined]
            assert img.read(0, RS) == bytes([4]) * RS
    finally:
        primary.close()
        admin.close()
