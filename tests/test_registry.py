"""open_store: every scheme opens a working store, bad URLs are one clear error, no secret leaks."""

from __future__ import annotations

import inspect
import os
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

import overlaycache
from overlaycache import InvalidArgumentError, LocalStore, S3Store, open_store
from overlaycache.errors import ObjectNotFoundError
from overlaycache.store import ObjectStore, register_store, registry

SECRET = "wJalrXUtnFEMI-not-a-real-secret"
KEY_ID = "AKIDNOTAREALKEYID"


@pytest.fixture
def env_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials in the environment only, as boto3 finds them; nothing from this machine's files."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def round_trip(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    store.put("registry/probe", b"through the registry")
    assert store.get("registry/probe") == b"through the registry"
    assert store.get("registry/probe", 8, 3) == b"the"
    assert list(store.list("registry/")) == ["registry/probe"]


# -- each scheme ----------------------------------------------------------------------------------

def test_s3_url(s3_store: Any, moto_endpoint: str, env_credentials: None) -> None:
    url = (f"s3://{s3_store.bucket}/appliance-1?endpoint_url={moto_endpoint}&region=eu-west-1"
           "&max_attempts=2&connect_timeout=3&read_timeout=10.5&max_pool_connections=4&path_style=true")
    store = open_store(url)
    try:
        assert isinstance(store, S3Store)
        assert (store.bucket, store.prefix, store.endpoint) == (s3_store.bucket, "appliance-1", moto_endpoint)
        assert store.max_attempts == 2
        config = store.client.meta.config
        assert (config.connect_timeout, config.read_timeout, config.max_pool_connections) == (3, 10.5, 4)
        assert store.client.meta.region_name == "eu-west-1"
        round_trip(store)
        assert s3_store.get("registry/probe") == b"through the registry"  # the same bucket and prefix
        assert store.volumes() == []  # the catalog's methods come along
    finally:
        store.close()


def test_s3_options_as_keywords(s3_store: Any, moto_endpoint: str) -> None:
    store = open_store(f"s3://{s3_store.bucket}/appliance-1", endpoint_url=moto_endpoint, region_name="us-east-1",
                       aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, max_attempts=2, read_timeout=10)
    try:
        round_trip(store)
        assert s3_store.get("registry/probe") == b"through the registry"
    finally:
        store.close()


def test_s3_options_cover_every_s3store_argument() -> None:
    params = set(inspect.signature(S3Store.__init__).parameters) - {"self", "bucket", "prefix"}
    assert set(registry.S3_OPTIONS) == params


def test_file_url(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/secondary")
    assert isinstance(store, LocalStore) and store.root == str(tmp_path / "secondary")
    round_trip(store)
    assert LocalStore(tmp_path / "secondary").get("registry/probe") == b"through the registry"
    assert (tmp_path / "secondary" / "registry" / "probe").read_bytes() == b"through the registry"


def test_file_url_forms(tmp_path: Path) -> None:
    spaced = tmp_path / "with space"
    assert open_store("file://" + urllib.parse.quote(str(spaced))).root == str(spaced)  # type: ignore[attr-defined]
    assert open_store(f"file://localhost{tmp_path}/a").root == str(tmp_path / "a")  # type: ignore[attr-defined]
    assert open_store(f"file:{tmp_path}/b").root == str(tmp_path / "b")  # type: ignore[attr-defined]
    store = open_store(f"file://{tmp_path}/c?prefix=appliance-1")
    round_trip(store)
    assert (tmp_path / "c" / "appliance-1" / "registry" / "probe").exists()
    # A LocalStore's location opens the same place again.
    again = open_store(store.location)
    assert again.get("registry/probe") == b"through the registry"


def test_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    round_trip(open_store(tmp_path / "as-path"))
    round_trip(open_store(str(tmp_path / "as-str"), prefix="p"))
    assert (tmp_path / "as-str" / "p" / "registry" / "probe").exists()
    monkeypatch.chdir(tmp_path)
    store = open_store("relative/dir")
    assert isinstance(store, LocalStore) and store.root == str(tmp_path / "relative" / "dir")
    round_trip(store)
    assert open_store(str(tmp_path / "odd:name")).root == str(tmp_path / "odd:name")  # type: ignore[attr-defined]


def test_exported() -> None:
    assert overlaycache.open_store is open_store is registry.open_store
    assert "open_store" in overlaycache.__all__
    assert {"open_store", "register_store"} <= set(overlaycache.store.__all__)


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "options", "names"), [
    ("gs://bucket/prefix", {}, "unknown store scheme 'gs'"),
    ("s3://", {}, "missing bucket"),
    ("s3:///prefix", {}, "missing bucket"),
    ("s3:bucket/prefix", {}, "missing bucket"),
    ("s3://bucket:9000/prefix", {}, "invalid bucket name"),
    ("s3://bucket?endpoint=http://127.0.0.1:9", {}, "unknown store option 'endpoint'"),
    ("s3://bucket?max_attempts=three", {}, "option max_attempts: expected int"),
    ("s3://bucket?read_timeout=soon", {}, "option read_timeout: expected float"),
    ("s3://bucket?path_style=maybe", {}, "option path_style: expected bool"),
    ("s3://bucket?max_attempts=0", {}, "max_attempts must be at least 1"),
    ("s3://bucket?read_timeout=-1", {}, "read_timeout must be a positive number"),
    ("s3://bucket?connect_timeout=nan", {}, "connect_timeout must be a positive number"),
    ("s3://bucket?region=", {}, "region_name is empty"),
    ("s3://bucket?region=a&region=b", {}, "'region' is given twice"),
    ("s3://bucket?region=a&region_name=b", {}, "'region_name' is given twice"),
    ("s3://bucket?max_attempts=2", {"max_attempts": 3}, "given in the URL and as a keyword"),
    ("s3://bucket", {"max_attempts": "x"}, "option max_attempts: expected int"),
    ("s3://bucket", {"max_attempts": True}, "option max_attempts: expected int, got bool"),
    ("s3://bucket", {"path_style": 1}, "option path_style: expected bool, got int"),
    ("s3://bucket", {"bucket": "other"}, "unknown store option 'bucket'"),
    ("s3://bucket?endpoint_url=ftp://127.0.0.1", {}, "endpoint_url must be http(s)://host[:port]"),
    ("s3://bucket?endpoint_url=", {}, "endpoint_url must be http(s)://host[:port]"),
    ("s3://bucket?endpoint_url=http://127.0.0.1:port", {}, "endpoint_url has an invalid port"),
    ("s3://bucket?novalue", {}, "malformed query"),
    ("s3://bucket/prefix#part", {}, "no '#' fragment"),
    ("file:relative/dir", {}, "file:relative/dir: relative file URL"),
    ("file://relative/dir", {}, "a file URL names no host"),
    ("file:///srv/oc?bogus=1", {}, "unknown store option 'bogus'"),
    ("/srv/oc", {"bogus": 1}, "unknown store option 'bogus'"),
    ("", {}, "empty store URL"),
    (42, {}, "must be a str or a path, not int"),
])
def test_bad_input_is_one_clear_error(url: Any, options: dict[str, Any], names: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        open_store(url, **options)
    message = str(info.value)
    assert names in message and "\n" not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("url", [
    f"s3://{KEY_ID}:{SECRET}@bucket/prefix",
    f"s3://{SECRET}@bucket/prefix",
    f"s3://bucket/prefix?aws_secret_access_key={SECRET}",
    f"s3://bucket/prefix?aws_access_key_id={KEY_ID}",
    f"s3://bucket/prefix?secret_key={SECRET}",
    f"s3://bucket/prefix?endpoint_url=http://{KEY_ID}:{SECRET}@127.0.0.1:9",
    f"gs://{KEY_ID}:{SECRET}@bucket",
])
def test_credentials_in_a_url_are_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        open_store(url)
    assert SECRET not in str(info.value) and KEY_ID not in str(info.value)


def test_location_never_holds_credentials(s3_store: Any, moto_endpoint: str, env_credentials: None) -> None:
    stores = [
        open_store(f"s3://{s3_store.bucket}/appliance-1?endpoint_url={moto_endpoint}&max_attempts=1"),
        open_store(f"s3://{s3_store.bucket}/appliance-1?endpoint_url={moto_endpoint}&max_attempts=1",
                   aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET),
        S3Store(s3_store.bucket, "appliance-1", endpoint_url=moto_endpoint.replace("//", f"//{KEY_ID}:{SECRET}@"),
                max_attempts=1),
    ]
    for store in stores:
        for text in (store.location, repr(store), getattr(store, "endpoint", "")):
            assert SECRET not in text and KEY_ID not in text
        assert store.location == f"{moto_endpoint}/{s3_store.bucket}/appliance-1"
    for store in stores[:2]:
        with pytest.raises(ObjectNotFoundError) as info:
            store.get("no/such/key")
        assert SECRET not in str(info.value) and KEY_ID not in str(info.value)
    for store in stores:
        store.close()


# -- new backends ---------------------------------------------------------------------------------

def test_register_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    seen: list[tuple[urllib.parse.SplitResult, dict[str, Any]]] = []

    def factory(url: urllib.parse.SplitResult, **options: Any) -> ObjectStore:
        seen.append((url, options))
        return LocalStore(tmp_path / url.netloc, **options)

    register_store("Mem", factory)
    assert "mem" in registry.registered_schemes()
    store = open_store("MEM://box/ignored?prefix=p")
    round_trip(store)
    assert (tmp_path / "box" / "p" / "registry" / "probe").exists()
    url, options = seen[0]
    assert (url.scheme, url.netloc, url.path, options) == ("mem", "box", "/ignored", {"prefix": "p"})

    register_store("mem", factory)  # the same factory again is fine
    with pytest.raises(InvalidArgumentError, match="already registered"):
        register_store("mem", lambda url, **options: LocalStore(tmp_path))
    register_store("mem", lambda url, **options: LocalStore(tmp_path / "other"), clobber=True)
    assert open_store("mem://x").root == str(tmp_path / "other")  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgumentError, match="invalid store URL scheme"):
        register_store("3d", factory)
    with pytest.raises(InvalidArgumentError, match="not callable"):
        register_store("obj", "factory")  # type: ignore[arg-type]


def test_plain_paths_go_through_the_file_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    seen: list[str] = []

    def factory(url: urllib.parse.SplitResult, **options: Any) -> ObjectStore:
        seen.append(urllib.parse.unquote(url.path))
        return LocalStore(seen[-1], **options)

    register_store("file", factory, clobber=True)
    open_store(tmp_path / "x y")
    assert seen == [os.path.join(tmp_path, "x y")]
