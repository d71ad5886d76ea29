"""S3 Object Lock on the real servers: LocalStack and SeaweedFS both enforce it (as moto does).

A volume's history written through a store opened with ``object_lock`` cannot be deleted with the
primary's credentials: every version under retention is refused, a plain delete only adds delete
markers, and removing the markers brings every PIT back byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import botocore.exceptions
import pytest

from overlaycache import Volume
from overlaycache.testing import servers

RS = 4096


def test_history_survives_the_primarys_credentials(tmp_path: Path, server: str) -> None:
    store = servers.make_store(server, object_lock="governance", object_lock_days=1, max_attempts=3, read_timeout=10)
    try:
        assert store.protection().ok, store.protection().problems
        pits = {}
        with Volume.create(tmp_path / "v", 16 * RS, region_size=RS, secondary=store, replication="periodic",
                           period=3600.0) as vol:
            for i in range(3):
                vol.write(i * RS, bytes([i + 1]) * RS)
                snap = vol.snapshot(f"p{i}")
                pits[snap.id] = vol.read(0, vol.size)
            vid = vol.id
        prefix = store._key(f"volumes/{vid}/")
        client = store.client
        versions = client.list_object_versions(Bucket=store.bucket, Prefix=prefix)["Versions"]
        assert len(versions) >= 3 * 3  # a pack, a page and a root per PIT, at least
        for v in versions:
            head = client.head_object(Bucket=store.bucket, Key=v["Key"], VersionId=v["VersionId"])
            assert head["ObjectLockMode"] == "GOVERNANCE", v["Key"]
            with pytest.raises(botocore.exceptions.ClientError) as info:
                client.delete_object(Bucket=store.bucket, Key=v["Key"], VersionId=v["VersionId"])
            assert info.value.response["Error"]["Code"] == "AccessDenied"
        store.delete(list(store.list(f"volumes/{vid}/")))  # delete markers only
        assert list(store.list(f"volumes/{vid}/")) == []
        listing = client.list_object_versions(Bucket=store.bucket, Prefix=prefix)
        assert len(listing["Versions"]) == len(versions)
        for m in listing.get("DeleteMarkers", []):
            client.delete_object(Bucket=store.bucket, Key=m["Key"], VersionId=m["VersionId"])
        for sid, data in pits.items():
            with store.image(vid, sid) as img:
                assert img.read(0, img.size) == data
    finally:
        store.close()
