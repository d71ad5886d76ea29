"""S3 Object Lock: a primary whose credentials leak cannot delete its history before its time.

moto's server enforces Object Lock the way S3 does: deleting a version under retention is
``AccessDenied`` (governance mode gives way only with ``BypassGovernanceRetention``), while a delete
without a version id adds a delete marker and keeps the versions. These tests write a volume's
history through a store opened with ``object_lock``, then act as an attacker with the same
credentials.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from overlaycache import Volume
from overlaycache.cli import main
from overlaycache.errors import InvalidArgumentError
from overlaycache.store import S3Store, open_store

RS = 4096


def _store(endpoint: str, bucket: str, **kwargs: Any) -> S3Store:
    return S3Store(bucket, prefix="appliance-1", endpoint_url=endpoint, aws_access_key_id="testing",
                   aws_secret_access_key="testing-secret", max_attempts=2, **kwargs)


@pytest.fixture
def locked(moto_endpoint: str) -> Iterator[S3Store]:
    store = _store(moto_endpoint, f"oc-locked-{uuid.uuid4().hex[:10]}", object_lock="governance",
                   object_lock_days=7)
    store.create_bucket()  # with Object Lock (and so versioning)
    yield store
    store.close()


def _history(tmp_path: Path, store: S3Store) -> tuple[str, dict[str, bytes]]:
    """A volume with three PITs on ``store``; returns its id and what each PIT reads."""
    pits = {}
    with Volume.create(tmp_path / "v", 16 * RS, region_size=RS, secondary=store, replication="periodic",
                       period=3600.0) as vol:
        for i in range(3):
            vol.write(i * RS, bytes([i + 1]) * RS)
            snap = vol.snapshot(f"p{i}")
            pits[snap.id] = vol.read(0, vol.size)
        return vol.id, pits


def test_every_object_is_written_with_its_retention(tmp_path: Path, locked: S3Store) -> None:
    vid, pits = _history(tmp_path, locked)
    keys = list(locked.list(f"volumes/{vid}/"))
    assert any("/packs/" in k for k in keys) and any("/snapshots/" in k for k in keys) and any("/pages/" in k for k in keys)
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=6)
    for key in keys:
        head = locked.client.head_object(Bucket=locked.bucket, Key=locked._key(key))
        assert head["ObjectLockMode"] == "GOVERNANCE", key
        assert head["ObjectLockRetainUntilDate"] > soon, key
    for sid, data in pits.items():
        with locked.image(vid, sid) as img:
            assert img.read(0, img.size) == data


def test_the_primarys_credentials_cannot_destroy_history(tmp_path: Path, locked: S3Store) -> None:
    vid, pits = _history(tmp_path, locked)
    client, bucket = locked.client, locked.bucket
    versions = client.list_object_versions(Bucket=bucket, Prefix=locked._key(f"volumes/{vid}/"))["Versions"]
    assert versions
    for v in versions:  # deleting a version under retention is refused
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert info.value.response["Error"]["Code"] == "AccessDenied"
    # A plain delete only hides the objects behind delete markers: every version is still there.
    locked.delete(list(locked.list(f"volumes/{vid}/")))
    assert list(locked.list(f"volumes/{vid}/")) == []
    kept = client.list_object_versions(Bucket=bucket, Prefix=locked._key(f"volumes/{vid}/"))["Versions"]
    assert sorted((v["Key"], v["VersionId"]) for v in kept) == sorted((v["Key"], v["VersionId"]) for v in versions)
    # ...so history comes back by removing the markers (an administrator's job).
    markers = client.list_object_versions(Bucket=bucket, Prefix=locked._key(f"volumes/{vid}/"))["DeleteMarkers"]
    for m in markers:
        client.delete_object(Bucket=bucket, Key=m["Key"], VersionId=m["VersionId"])
    for sid, data in pits.items():
        with locked.image(vid, sid) as img:
            assert img.read(0, img.size) == data


def test_protection_reports_what_is_missing(moto_endpoint: str, s3_store: S3Store, locked: S3Store,
                                            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    plain = s3_store.protection()
    assert not plain.ok and plain.versioning is None and not plain.object_lock
    assert len(plain.problems) == 3 and any("versioning" in p for p in plain.problems)
    good = locked.protection()
    assert good.ok and good.versioning == "Enabled" and good.object_lock and good.store_retention == "GOVERNANCE 7 days"
    unlocked_writer = _store(moto_endpoint, locked.bucket)  # the right bucket, but writing without retention
    assert [p for p in unlocked_writer.protection().problems if "without a retention" in p]
    unlocked_writer.close()
    # The command line: exit status 3 while something is missing, JSON on request.
    url = f"s3://{locked.bucket}/appliance-1?object_lock=governance&object_lock_days=7"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    assert main(["check-bucket", "--store", url, "--endpoint-url", moto_endpoint, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["check-bucket", "--store", f"s3://{s3_store.bucket}/x", "--endpoint-url", moto_endpoint]) == 3
    assert capsys.readouterr().out.count("MISSING") == 3


def test_bad_object_lock_options_are_refused(moto_endpoint: str) -> None:
    with pytest.raises(InvalidArgumentError, match="object_lock"):
        _store(moto_endpoint, "b-x", object_lock="forever")
    with pytest.raises(InvalidArgumentError, match="object_lock_days"):
        _store(moto_endpoint, "b-x", object_lock="compliance", object_lock_days=0)
    with pytest.raises(InvalidArgumentError):
        open_store(f"s3://b-x/p?endpoint_url={moto_endpoint}&object_lock_days=soon")
    store = open_store(f"s3://b-x/p?endpoint_url={moto_endpoint}&object_lock=compliance&object_lock_days=1.5")
    assert store.object_lock == "COMPLIANCE" and store.object_lock_days == 1.5  # type: ignore[attr-defined]
    store.close()
