"""The secondary as a separate security domain on SeaweedFS: the primary's identity may put, get and
list but not delete (a policy of fine-grained actions in SeaweedFS's identities file); the store's
admin identity collapses. What the primary's credentials can still do, put over an object, is
detected by every reader.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from overlaycache import RetentionPolicy, Volume
from overlaycache.errors import CorruptionError, StoreAccessError
from overlaycache.remote.layout import encode_root
from overlaycache.remote.listing import find_root_key, read_root
from overlaycache.store import S3Store
from overlaycache.testing import servers

RS = 4096
NREG = 16


def _primary(bucket: str) -> S3Store:
    ep = servers.ENDPOINTS["seaweedfs"]
    access, secret = servers.SEAWEEDFS_PRIMARY
    return S3Store(bucket, prefix="appliance-1", endpoint_url=ep.endpoint_url, aws_access_key_id=access,
                   aws_secret_access_key=secret, region_name=ep.region_name, max_attempts=3, read_timeout=10)


def test_the_primary_identity_cannot_delete_and_the_admin_collapses(tmp_path: Path,
                                                                    real_servers: object) -> None:
    admin = servers.make_store("seaweedfs", max_attempts=3, read_timeout=10)  # creates the bucket
    primary = _primary(admin.bucket)
    try:
        images = {}
        rnd = random.Random(3)
        with Volume.create(tmp_path / "v", NREG * RS, region_size=RS, secondary=primary, replication="periodic",
                           period=3600.0) as vol:  # the whole primary life cycle, as the primary
            vol.write(0, rnd.randbytes(NREG * RS))
            for i in range(4):
                vol.write(rnd.randrange(NREG - 1) * RS, rnd.randbytes(2 * RS))
                snap = vol.snapshot(f"s{i}")
                images[snap.id] = vol.read(0, vol.size)
            vid = vol.id
        keys = list(primary.list(f"volumes/{vid}/snapshots/"))
        with pytest.raises(StoreAccessError, match="may not delete") as info:
            primary.delete(keys[:1])
        assert "\n" not in str(info.value)
        with pytest.raises(StoreAccessError):
            primary.collapse(vid, RetentionPolicy(keep_last=1))  # type: ignore[attr-defined]
        assert [s.id for s in primary.snapshots(vid)] == sorted(images)  # nothing was deleted
        report = admin.collapse(vid, RetentionPolicy(keep_last=2), max_unused=0.0)  # type: ignore[attr-defined]
        assert [s.label for s in report.kept] == ["s2", "s3"] and len(report.removed) == 2
        assert report.packs_repacked > 0
        for snap in primary.snapshots(vid):
            with primary.image(vid, snap) as img:  # type: ignore[attr-defined]
                assert img.read(0, NREG * RS) == images[snap.id]
        # What the primary's identity can still do, a plain PUT over a root, is refused on read.
        newest, older = primary.snapshots(vid)[-1], primary.snapshots(vid)[0]
        root = read_root(primary, vid, find_root_key(primary, vid, newest.seq))
        forged = encode_root(vid, root.size, root.region_size, older.seq, older.created_at, older.label,
                             sorted(root.children.items()))  # passes every check of its own
        primary.put(find_root_key(primary, vid, older.seq), forged)
        with pytest.raises(CorruptionError, match="BLAKE2b digest in its key"):
            primary.image(vid, older.id)  # type: ignore[attr-defined]
    finally:
        primary.close()
        admin.close()
