"""Check the S3 behaviour that overlaycache relies on, against the servers ``start.sh`` runs.

Run after ``localstack/start.sh``, with the Python that has overlaycache (and so boto3) installed::

    python3 localstack/check_servers.py [--json] [localstack] [seaweedfs]

For each server (path-style addressing, ``http://127.0.0.1:PORT``) it creates a scratch bucket,
then checks: put/get, ranged get (``Range`` header), head, list with a prefix, a batch
``delete_objects``, conditional put ``IfNoneMatch='*'`` on a new and on an existing key, racing
conditional puts of one key from several threads, conditional ``CompleteMultipartUpload``, the
error codes for a missing bucket and a missing key, and whether wrong credentials are refused.
It prints what each server answered (error code and HTTP status) and deletes the bucket.

Exit status: 0 when the basic operations work and no conditional PutObject overwrote an
existing object; 1 otherwise. Deviations from AWS in error codes are reported, not failed, and so
is a race of conditional CompleteMultipartUpload calls with more than one winner (WARN), which
SeaweedFS 4.48 shows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

# Loopback only, never through a proxy (set before botocore reads the environment).
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from overlaycache.testing.servers import ENDPOINTS, Endpoint, wait_ready

# No retries: we want to see each server's first answer, including 409/412/503.
_CONFIG = Config(
    s3={"addressing_style": "path"},
    retries={"total_max_attempts": 1, "mode": "standard"},
    connect_timeout=5,
    read_timeout=60,
    max_pool_connections=32,
)


def _client(ep: Endpoint, **override: str) -> Any:
    kwargs = ep.boto3_kwargs()
    kwargs.update(override)
    return boto3.client("s3", config=_CONFIG, **kwargs)


def _outcome(fn: Callable[[], Any]) -> str:
    """Run ``fn``; return ``"OK <status>"`` or ``"<ErrorCode> <status>"``."""
    try:
        resp = fn()
    except ClientError as e:
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code', '?')} {status}"
    status = (
        resp.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(resp, dict) else ""
    )
    return f"OK {status}"


def _run_together(calls: list[Callable[[], Any]]) -> list[str]:
    """Run ``calls`` in threads released at once by a barrier; return their `_outcome` s."""
    barrier = threading.Barrier(len(calls))
    res = [""] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        res[i] = _outcome(calls[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return res


class _Checker:
    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.s3 = _client(ep)
        self.bucket = f"oc-check-{uuid.uuid4().hex[:12]}"
        self.results: dict[str, Any] = {}
        self.failures: list[str] = []
        self.warnings: list[str] = []

    def expect(self, label: str, ok: bool, detail: Any, fatal: bool = True) -> None:
        self.results[label] = detail
        if not ok:
            (self.failures if fatal else self.warnings).append(f"{label}: {detail}")

    def run(self) -> None:
        s3, b = self.s3, self.bucket
        t0 = time.perf_counter()
        timings: dict[str, float] = {}

        def step(name: str, fn: Callable[[], None]) -> None:
            t = time.perf_counter()
            try:
                fn()
            finally:
                timings[name] = round(time.perf_counter() - t, 2)

        step("create_bucket", lambda: s3.create_bucket(Bucket=b))
        try:
            step("basic", lambda: self._basic(s3, b))
            step("conditional", lambda: self._conditional(s3, b))
            step("race 4 KiB", lambda: self._race(s3, b, 5, 8, 4096, "race put 4 KiB"))
            step("race 4 MiB", lambda: self._race(s3, b, 3, 8, 4 << 20, "race put 4 MiB"))
            # Known to fail on SeaweedFS 4.48 (several conditional completions win): a warning,
            # since overlaycache writes region objects with single PUTs.
            step(
                "race mpu",
                lambda: self._race(s3, b, 3, 4, 4096, "race complete_mpu", mpu=True, fatal=False),
            )
            step("multipart", lambda: self._multipart(s3, b))
            step("conflict", lambda: self._conflict(s3, b))
            step("errors", lambda: self._errors(s3, b))
        finally:
            step("cleanup", lambda: self._empty_and_delete(s3, b))
            self.results["seconds per step"] = timings
            self.results["seconds total"] = round(time.perf_counter() - t0, 2)

    def _basic(self, s3: Any, b: str) -> None:
        body = bytes(range(256)) * 256  # 64 KiB
        s3.put_object(Bucket=b, Key="vol/a/regions/0", Body=body)
        got = s3.get_object(Bucket=b, Key="vol/a/regions/0")["Body"].read()
        self.expect("put+get", got == body, "OK" if got == body else "MISMATCH")

        r = s3.get_object(Bucket=b, Key="vol/a/regions/0", Range="bytes=1000-1999")
        data = r["Body"].read()
        ok = data == body[1000:2000] and r["ResponseMetadata"]["HTTPStatusCode"] == 206
        self.expect(
            "ranged get",
            ok,
            f"{r['ResponseMetadata']['HTTPStatusCode']} {r.get('ContentRange')} len={len(data)}"
            + ("" if ok else " WRONG BYTES"),
        )
        r = s3.get_object(Bucket=b, Key="vol/a/regions/0", Range="bytes=65000-")
        data = r["Body"].read()
        self.expect("ranged get (open end)", data == body[65000:], f"{r.get('ContentRange')}")

        h = s3.head_object(Bucket=b, Key="vol/a/regions/0")
        self.expect(
            "head", h["ContentLength"] == len(body), f"len={h['ContentLength']} etag={h['ETag']}"
        )

        for i in range(1, 5):
            s3.put_object(Bucket=b, Key=f"vol/a/regions/{i}", Body=b"x" * i)
        s3.put_object(Bucket=b, Key="vol/b/regions/0", Body=b"y")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=b, Prefix="vol/a/").get("Contents", [])]
        want = [f"vol/a/regions/{i}" for i in range(5)]
        self.expect("list prefix", sorted(keys) == want, f"{len(keys)} keys")
        page = s3.list_objects_v2(Bucket=b, Prefix="vol/", Delimiter="/")
        prefixes = sorted(p["Prefix"] for p in page.get("CommonPrefixes", []))
        self.expect("list delimiter", prefixes == ["vol/a/", "vol/b/"], prefixes)
        page = s3.list_objects_v2(Bucket=b, Prefix="vol/a/", MaxKeys=2)
        page2 = s3.list_objects_v2(
            Bucket=b, Prefix="vol/a/", MaxKeys=2, ContinuationToken=page["NextContinuationToken"]
        )
        ok = page["IsTruncated"] and [o["Key"] for o in page2["Contents"]] == want[2:4]
        self.expect("list pagination", ok, "OK" if ok else page2.get("Contents"))

        resp = s3.delete_objects(
            Bucket=b,
            Delete={"Objects": [{"Key": k} for k in want[1:4] + ["vol/a/never-existed"]]},
        )
        deleted = sorted(d["Key"] for d in resp.get("Deleted", []))
        errors = resp.get("Errors", [])
        left = sorted(
            o["Key"] for o in s3.list_objects_v2(Bucket=b, Prefix="vol/a/").get("Contents", [])
        )
        ok = not errors and left == [want[0], want[4]]
        self.expect(
            "delete_objects batch",
            ok,
            f"deleted={len(deleted)} (missing key reported deleted: "
            f"{'vol/a/never-existed' in deleted}) errors={errors} left={len(left)}",
        )

    def _conditional(self, s3: Any, b: str) -> None:
        key = "vol/a/regions/100/1"
        first = _outcome(lambda: s3.put_object(Bucket=b, Key=key, Body=b"first", IfNoneMatch="*"))
        self.expect("IfNoneMatch=* new key", first.startswith("OK"), first)
        second = _outcome(lambda: s3.put_object(Bucket=b, Key=key, Body=b"second", IfNoneMatch="*"))
        kept = s3.get_object(Bucket=b, Key=key)["Body"].read()
        self.expect("IfNoneMatch=* existing key", kept == b"first", second)
        self.results["IfNoneMatch=* existing key: object kept"] = kept == b"first"

    def _race(
        self,
        s3: Any,
        b: str,
        rounds: int,
        writers: int,
        size: int,
        label: str,
        mpu: bool = False,
        fatal: bool = True,
    ) -> None:
        """Several writers create one new key with IfNoneMatch='*' at once; exactly one may win.

        With ``mpu`` each writer has its own one-part multipart upload of the key and they race
        on the conditional CompleteMultipartUpload.
        """
        outcomes: Counter[str] = Counter()
        winners_per_round: Counter[int] = Counter()
        wrong_content = 0
        clients = [_client(self.ep) for _ in range(writers)]
        for rnd in range(rounds):
            key = f"race/{label.replace(' ', '-')}/{rnd}"
            bodies = [bytes([w]) * size for w in range(writers)]
            calls: list[Callable[[], Any]] = []
            for w in range(writers):
                if mpu:
                    upload_id = s3.create_multipart_upload(Bucket=b, Key=key)["UploadId"]
                    etag = s3.upload_part(
                        Bucket=b, Key=key, UploadId=upload_id, PartNumber=1, Body=bodies[w]
                    )["ETag"]
                    calls.append(
                        functools.partial(
                            clients[w].complete_multipart_upload,
                            Bucket=b,
                            Key=key,
                            UploadId=upload_id,
                            MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]},
                            IfNoneMatch="*",
                        )
                    )
                else:
                    calls.append(
                        functools.partial(
                            clients[w].put_object,
                            Bucket=b,
                            Key=key,
                            Body=bodies[w],
                            IfNoneMatch="*",
                        )
                    )
            res = _run_together(calls)
            outcomes.update(res)
            winners = [w for w, r in enumerate(res) if r.startswith("OK")]
            winners_per_round[len(winners)] += 1
            stored = s3.get_object(Bucket=b, Key=key)["Body"].read()
            if len(winners) != 1 or stored != bodies[winners[0]]:
                wrong_content += 1
        ok = wrong_content == 0
        self.expect(
            label,
            ok,
            {
                "rounds": rounds,
                "writers": writers,
                "outcomes": dict(outcomes),
                "winners per round": {str(k): v for k, v in winners_per_round.items()},
                "rounds not exactly one winner holding the object": wrong_content,
            },
            fatal=fatal,
        )

    def _multipart(self, s3: Any, b: str) -> None:
        """Conditional CompleteMultipartUpload when the key appeared during the upload."""
        key = "mpu/target"
        part = b"p" * (5 << 20)
        mpu = s3.create_multipart_upload(Bucket=b, Key=key)
        etag = s3.upload_part(Bucket=b, Key=key, UploadId=mpu["UploadId"], PartNumber=1, Body=part)[
            "ETag"
        ]
        s3.put_object(Bucket=b, Key=key, Body=b"meanwhile")
        out = _outcome(
            lambda: s3.complete_multipart_upload(
                Bucket=b,
                Key=key,
                UploadId=mpu["UploadId"],
                MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]},
                IfNoneMatch="*",
            )
        )
        kept = s3.get_object(Bucket=b, Key=key)["Body"].read() == b"meanwhile"
        self.expect("IfNoneMatch=* complete_multipart_upload, key exists", kept, out)
        self.results["IfNoneMatch=* complete_multipart_upload: object kept"] = kept
        _outcome(lambda: s3.abort_multipart_upload(Bucket=b, Key=key, UploadId=mpu["UploadId"]))

    def _conflict(self, s3: Any, b: str) -> None:
        """Look for 409 ConditionalRequestConflict: AWS answers it for a conditional multipart
        completion when the key changed (here: was deleted) during the upload."""
        key = "mpu/deleted-during-upload"
        s3.put_object(Bucket=b, Key=key, Body=b"old")
        upload_id = s3.create_multipart_upload(Bucket=b, Key=key)["UploadId"]
        etag = s3.upload_part(Bucket=b, Key=key, UploadId=upload_id, PartNumber=1, Body=b"new")[
            "ETag"
        ]
        s3.delete_object(Bucket=b, Key=key)
        self.results["IfNoneMatch=* complete_mpu, key deleted during upload"] = _outcome(
            lambda: s3.complete_multipart_upload(
                Bucket=b,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]},
                IfNoneMatch="*",
            )
        )
        _outcome(lambda: s3.abort_multipart_upload(Bucket=b, Key=key, UploadId=upload_id))

    def _errors(self, s3: Any, b: str) -> None:
        missing = f"oc-missing-{uuid.uuid4().hex[:12]}"
        r = self.results
        r["missing bucket: get_object"] = _outcome(lambda: s3.get_object(Bucket=missing, Key="k"))
        r["missing bucket: put_object"] = _outcome(
            lambda: s3.put_object(Bucket=missing, Key="k", Body=b"x")
        )
        r["missing bucket: list_objects_v2"] = _outcome(lambda: s3.list_objects_v2(Bucket=missing))
        r["missing bucket: head_bucket"] = _outcome(lambda: s3.head_bucket(Bucket=missing))
        r["missing bucket: delete_objects"] = _outcome(
            lambda: s3.delete_objects(Bucket=missing, Delete={"Objects": [{"Key": "k"}]})
        )
        r["missing key: get_object"] = _outcome(lambda: s3.get_object(Bucket=b, Key="nope"))
        r["missing key: head_object"] = _outcome(lambda: s3.head_object(Bucket=b, Key="nope"))
        r["missing key: ranged get past end"] = _outcome(
            lambda: s3.get_object(Bucket=b, Key="vol/a/regions/0", Range="bytes=999999-")
        )
        # Make sure the missing bucket was not created on the fly (SeaweedFS autoCreateBucket).
        names = [x["Name"] for x in s3.list_buckets().get("Buckets", [])]
        r["missing bucket created by the put"] = missing in names
        if missing in names:
            _outcome(lambda: s3.delete_object(Bucket=missing, Key="k"))
            _outcome(lambda: s3.delete_bucket(Bucket=missing))

        bad_secret = _client(self.ep, aws_secret_access_key="wrong-secret")
        bad_key = _client(self.ep, aws_access_key_id="NOSUCHKEY", aws_secret_access_key="x")
        r["wrong secret: list_buckets"] = _outcome(bad_secret.list_buckets)
        r["wrong secret: get_object"] = _outcome(
            lambda: bad_secret.get_object(Bucket=b, Key="vol/a/regions/0")
        )
        r["wrong secret: put_object"] = _outcome(
            lambda: bad_secret.put_object(Bucket=b, Key="intruder", Body=b"x")
        )
        r["unknown access key: list_buckets"] = _outcome(bad_key.list_buckets)
        anon = boto3.client(
            "s3",
            endpoint_url=self.ep.endpoint_url,
            region_name=self.ep.region_name,
            config=_CONFIG.merge(Config(signature_version=__import__("botocore").UNSIGNED)),
        )
        r["unsigned: list_objects_v2"] = _outcome(lambda: anon.list_objects_v2(Bucket=b))

    def _empty_and_delete(self, s3: Any, b: str) -> None:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                s3.delete_objects(Bucket=b, Delete={"Objects": objs, "Quiet": True})
        for up in s3.list_multipart_uploads(Bucket=b).get("Uploads", []):
            _outcome(
                functools.partial(
                    s3.abort_multipart_upload, Bucket=b, Key=up["Key"], UploadId=up["UploadId"]
                )
            )
        s3.delete_bucket(Bucket=b)


def main(argv: list[str] | None = None) -> int:
    """Run the checks; print a report; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("servers", nargs="*", help=f"any of {', '.join(ENDPOINTS)} (default: all)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    args.servers = args.servers or list(ENDPOINTS)
    unknown = sorted(set(args.servers) - set(ENDPOINTS))
    if unknown:
        parser.error(f"unknown servers: {', '.join(unknown)}")

    report: dict[str, Any] = {}
    failed = False
    for name in args.servers:
        wait_ready(name, timeout=30)
        checker = _Checker(ENDPOINTS[name])
        try:
            checker.run()
        except Exception as e:  # noqa: BLE001 - report it and go on with the other server
            checker.failures.append(f"aborted: {type(e).__name__}: {e}")
        report[name] = {
            "results": checker.results,
            "failures": checker.failures,
            "warnings": checker.warnings,
        }
        failed |= bool(checker.failures)

    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for name, rep in report.items():
            print(f"== {name} ({ENDPOINTS[name].endpoint_url})")
            for label, value in rep["results"].items():
                print(f"  {label:<53} {value}")
            for w in rep["warnings"]:
                print(f"  WARN {w}")
            for f in rep["failures"]:
                print(f"  FAIL {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
