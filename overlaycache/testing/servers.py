"""Endpoints of the real S3 servers that ``localstack/start.sh`` runs, and a readiness probe.

Both servers listen on 127.0.0.1 only, on fixed ports (overridable through the same environment
variables that ``start.sh`` reads). At import this module uses the standard library alone, so that
``start.sh`` can run this file by its path with any Python 3 (without importing overlaycache), and
the integration suite and ``localstack/check_servers.py`` import it::

    from overlaycache.testing.servers import ENDPOINTS, wait_ready
    ep = ENDPOINTS["seaweedfs"]
    wait_ready("seaweedfs", timeout=30)
    client = boto3.client("s3", **ep.boto3_kwargs(),
                          config=Config(s3={"addressing_style": "path"}))

`make_store` (an S3Store on one of them) imports overlaycache when called.

The readiness probe is a SigV4-signed ``ListBuckets`` (``GET /``): it succeeds only when the S3
layer answers *and* accepts the configured credentials, which for SeaweedFS also proves that the
identities file was loaded.

Command line (used by ``start.sh``, which runs this file by its path)::

    python3 overlaycache/testing/servers.py wait NAME [TIMEOUT]   exit 0 once NAME answers, 1 on timeout
    python3 overlaycache/testing/servers.py show [NAME ...]       print the endpoints
    python3 overlaycache/testing/servers.py seaweedfs-s3-config   print the SeaweedFS identities JSON
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from overlaycache.store import S3Store

__all__ = ["ENDPOINTS", "RUN_DIR", "SEAWEEDFS_PRIMARY", "Endpoint", "kill", "make_store", "pid", "wait_ready"]

#: Where ``start.sh`` keeps PID files, logs and the servers' data.
RUN_DIR: str = os.environ.get("OC_SERVERS_RUN", "/tmp/overlaycache-servers")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One S3 server: where it listens and the credentials it accepts.

    Attributes
    ----------
    name : str
        Key in `ENDPOINTS`, also the stem of its PID and log files in `RUN_DIR`.
    endpoint_url : str
        ``http://127.0.0.1:PORT``; use path-style addressing.
    aws_access_key_id, aws_secret_access_key : str
        Credentials; SeaweedFS checks them against its identities file, LocalStack accepts any.
    region_name : str
        Signing region.
    """

    name: str
    endpoint_url: str
    aws_access_key_id: str
    aws_secret_access_key: str
    region_name: str

    @property
    def port(self) -> int:
        """TCP port of the S3 endpoint."""
        port = urllib.parse.urlsplit(self.endpoint_url).port
        assert port is not None
        return port

    def boto3_kwargs(self) -> dict[str, str]:
        """Return keyword arguments for ``boto3.client("s3", ...)``.

        Returns
        -------
        dict of str to str
            ``endpoint_url``, the two credentials and ``region_name``.
        """
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.aws_access_key_id,
            "aws_secret_access_key": self.aws_secret_access_key,
            "region_name": self.region_name,
        }


def _port(var: str, default: int) -> int:
    return int(os.environ.get(var, default))


ENDPOINTS: dict[str, Endpoint] = {
    "localstack": Endpoint(
        name="localstack",
        endpoint_url=f"http://127.0.0.1:{_port('OC_LOCALSTACK_PORT', 4566)}",
        # LocalStack's conventional credentials; it does not check them (see README.md).
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    ),
    "seaweedfs": Endpoint(
        name="seaweedfs",
        endpoint_url=f"http://127.0.0.1:{_port('OC_SEAWEEDFS_S3_PORT', 8333)}",
        aws_access_key_id="overlaycache",
        aws_secret_access_key="overlaycache-secret",
        region_name="us-east-1",
    ),
}


#: Credentials of the SeaweedFS identity that may put (conditionally or not), get and list, but not
#: delete: what a primary needs (:func:`seaweedfs_s3_config`).
SEAWEEDFS_PRIMARY = ("overlaycache-primary", "overlaycache-primary-secret")


def seaweedfs_s3_config() -> dict[str, object]:
    """Return the SeaweedFS ``-s3.config`` identities document for `ENDPOINTS` ``"seaweedfs"``.

    Returns
    -------
    dict
        An admin identity with the test credentials, a primary's identity
        (:data:`SEAWEEDFS_PRIMARY`: put, get and list only) and no anonymous identity, so that
        every request must be signed.
    """
    ep = ENDPOINTS["seaweedfs"]
    # What a primary needs and no more: its identity's policy names the fine-grained actions
    # (SeaweedFS's coarse "Write" action would let it delete too).
    primary_policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject", "s3:ListBucket"],
        "Resource": ["arn:aws:s3:::*", "arn:aws:s3:::*/*"]}]}
    return {
        "identities": [
            {
                "name": "overlaycache",
                "credentials": [
                    {"accessKey": ep.aws_access_key_id, "secretKey": ep.aws_secret_access_key}
                ],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "overlaycache-primary",
                "credentials": [{"accessKey": SEAWEEDFS_PRIMARY[0], "secretKey": SEAWEEDFS_PRIMARY[1]}],
                "policyNames": ["overlaycache-primary"],
            },
        ],
        "policies": [{"name": "overlaycache-primary", "content": json.dumps(primary_policy)}],
    }


def pid(name: str) -> int | None:
    """Return the PID of server ``name`` if its PID file names a live process, else None.

    Parameters
    ----------
    name : str
        A key of `ENDPOINTS`.

    Returns
    -------
    int or None
        The PID, or None when there is no PID file or the process is gone.
    """
    try:
        with open(os.path.join(RUN_DIR, f"{name}.pid"), encoding="ascii") as f:
            value = int(f.read().strip())
        os.kill(value, 0)
    except (OSError, ValueError):
        return None
    return value


def kill(pid: int, what: str, timeout: float = 30.0) -> None:
    """SIGKILL ``pid`` and wait until it is dead (a zombie counts as dead)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(line.split()[1:2] == ["Z"] for line in f if line.startswith("State:")):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.02)  # polling for the kernel to finish the kill; not a synchronization guess
    raise AssertionError(f"{what} (PID {pid}) survived SIGKILL")


def make_store(name: str, bucket: str | None = None, **kwargs: Any) -> S3Store:
    """Return an S3Store on server ``name``, on ``bucket`` or on a new bucket.

    Parameters
    ----------
    name : str
        A key of `ENDPOINTS`.
    bucket : str, optional
        The bucket, created if missing; by default a new one named ``oc-it-<random>``.
    **kwargs
        Passed on to :class:`~overlaycache.store.S3Store` (timeouts, retries).

    Returns
    -------
    S3Store
        With prefix ``appliance-1`` and the server's endpoint, credentials and region.
    """
    from overlaycache.store import S3Store

    ep = ENDPOINTS[name]
    store = S3Store(bucket or f"oc-it-{uuid.uuid4().hex[:12]}", prefix="appliance-1", endpoint_url=ep.endpoint_url,
                    aws_access_key_id=ep.aws_access_key_id, aws_secret_access_key=ep.aws_secret_access_key,
                    region_name=ep.region_name, **kwargs)
    store.create_bucket()
    return store


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _signed_list_buckets(ep: Endpoint) -> urllib.request.Request:
    """Build a SigV4-signed ``GET /`` (ListBuckets) for ``ep``."""
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    host = urllib.parse.urlsplit(ep.endpoint_url).netloc
    payload_hash = hashlib.sha256(b"").hexdigest()
    signed_headers = "host;x-amz-content-sha256;x-amz-date"
    canonical = "\n".join(
        [
            "GET",
            "/",
            "",
            f"host:{host}",
            f"x-amz-content-sha256:{payload_hash}",
            f"x-amz-date:{amz_date}",
            "",
            signed_headers,
            payload_hash,
        ]
    )
    scope = f"{day}/{ep.region_name}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + ep.aws_secret_access_key).encode(), day)
    for part in (ep.region_name, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    auth = (
        f"AWS4-HMAC-SHA256 Credential={ep.aws_access_key_id}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return urllib.request.Request(
        ep.endpoint_url + "/",
        headers={
            "Host": host,
            "x-amz-date": amz_date,
            "x-amz-content-sha256": payload_hash,
            "Authorization": auth,
        },
    )


# No proxy, whatever the environment says: these servers are on loopback and traffic must stay there.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_ready(name: str, timeout: float = 60.0, interval: float = 0.2) -> float:
    """Block until server ``name`` answers a signed ListBuckets with HTTP 200.

    Parameters
    ----------
    name : str
        A key of `ENDPOINTS`.
    timeout : float
        Seconds to wait at most.
    interval : float
        Seconds between probes.

    Returns
    -------
    float
        Seconds waited.

    Raises
    ------
    KeyError
        If ``name`` is not in `ENDPOINTS`.
    TimeoutError
        If the server did not answer in time; the message holds the last failure.
    """
    ep = ENDPOINTS[name]
    start = time.monotonic()
    last = "no attempt"
    while True:
        try:
            with _OPENER.open(_signed_list_buckets(ep), timeout=max(interval, 2.0)) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read(300)!r}"
        except (OSError, ValueError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() - start >= timeout:
            raise TimeoutError(f"{name} at {ep.endpoint_url} not ready after {timeout:g}s ({last})")
        time.sleep(interval)


def _main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "wait":
        timeout = float(argv[2]) if len(argv) > 2 else 60.0
        try:
            waited = wait_ready(argv[1], timeout)
        except TimeoutError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"{argv[1]} ready after {waited:.1f}s")
        return 0
    if argv[:1] == ["show"]:
        for ep in (ENDPOINTS[n] for n in (argv[1:] or ENDPOINTS)):
            print(
                f"{ep.name:<11} {ep.endpoint_url}  key={ep.aws_access_key_id} "
                f"secret={ep.aws_secret_access_key} region={ep.region_name} (path-style)"
            )
        return 0
    if argv == ["seaweedfs-s3-config"]:
        print(json.dumps(seaweedfs_s3_config(), indent=2))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
