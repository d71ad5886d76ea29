"""An S3-compatible object store through boto3.

Retries, timeouts and the connection pool belong to the store instance. botocore errors are
translated into the package's exceptions in exactly one place, :func:`translate_boto_error`,
keeping the original as ``__cause__``. Messages name the endpoint and bucket, never a secret.
"""

from __future__ import annotations

import builtins
import datetime

import logging
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from overlaycache.errors import (
    InvalidArgumentError,
    ObjectExistsError,
    ObjectNotFoundError,
    SecondaryUnavailableError,
    StoreAccessError,
    StoreError,
)
from overlaycache.remote.catalog import CatalogMixin

_log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_ACCESS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "NoSuchBucket",
           "AllAccessDisabled", "InvalidBucketName", "AccountProblem", "ExpiredToken", "InvalidToken"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part, for ``location`` and messages."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def translate_boto_error(exc: BaseException, store: S3Store, op: str, key: str | None = None) -> StoreError:
    """The package exception for a botocore/boto3 exception raised by ``op`` on ``key``.

    The one place botocore errors become the package's; raise the result ``from exc`` so that the
    original stays the ``__cause__``. Messages name the endpoint, bucket and key, never a secret.

    Parameters
    ----------
    exc : BaseException
        What boto3 or botocore raised.
    store : S3Store
        The store the request was made for (its endpoint and bucket go into the error).
    op : str
        The operation, for the message (``"get"``, ``"put"``, ...).
    key : str, optional
        The object concerned.

    Returns
    -------
    StoreError
        :class:`ObjectNotFoundError` (404, ``NoSuchKey``), :class:`ObjectExistsError` (412, a
        conditional write that lost), :class:`StoreAccessError` (403, bad or missing credentials,
        no such bucket), :class:`SecondaryUnavailableError` (connection errors, timeouts, other
        server errors), or :class:`StoreError` for anything else.
    """
    where = f"{store.location}"
    what = f"{op} {key}" if key else op
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
            return ObjectNotFoundError(f"{where}: {what}: no such object", store.endpoint, store.bucket, key)
        if code in _EXISTS or status == 412:
            return ObjectExistsError(f"{where}: {what}: object exists", store.endpoint, store.bucket, key)
        if code in _ACCESS or status == 403:
            reason = "no such bucket" if code == "NoSuchBucket" else f"access refused ({code})"
            return StoreAccessError(f"{where}: {what}: {reason}", store.endpoint, store.bucket, key)
        return SecondaryUnavailableError(f"{where}: {what}: {code or status} {err.get('Message', '')}".rstrip(),
                                         store.endpoint, store.bucket, key)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StoreAccessError(f"{where}: {what}: no credentials found", store.endpoint, store.bucket, key)
    if isinstance(exc, (botocore.exceptions.BotoCoreError, OSError)):
        name = type(exc).__name__
        return SecondaryUnavailableError(f"{where}: {what}: unreachable ({name})", store.endpoint, store.bucket, key)
    return StoreError(f"{where}: {what}: {type(exc).__name__}: {exc}", store.endpoint, store.bucket, key)


@dataclass(frozen=True)
class BucketProtection:
    """What :meth:`S3Store.protection` found.

    Attributes
    ----------
    location : str
        The store.
    versioning : str or None
        The bucket's versioning status ("Enabled", "Suspended", or None: never enabled).
    object_lock : bool
        Whether Object Lock is enabled on the bucket.
    default_retention : str or None
        The bucket's default retention ("GOVERNANCE 30 days"), if any.
    store_retention : str or None
        The retention this store writes objects with, if any.
    problems : list of str
        What is missing for history to survive a holder of the primary's credentials.
    """

    location: str
    versioning: str | None
    object_lock: bool
    default_retention: str | None
    store_retention: str | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        """Whether nothing is missing."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {"location": self.location, "versioning": self.versioning, "object_lock": self.object_lock,
                "default_retention": self.default_retention, "store_retention": self.store_retention,
                "problems": list(self.problems), "ok": self.ok}


class S3Store(CatalogMixin):
    """An object store in an S3 bucket (AWS, SeaweedFS, LocalStack, MinIO, Ceph RGW, ...).

    The catalog's reads (``volumes()``, ``volume_info()``, ``snapshots()``, ``image()``) come from
    :class:`~overlaycache.remote.catalog.CatalogMixin`.

    Parameters
    ----------
    bucket : str
        The bucket.
    prefix : str
        Keys of this store live under ``prefix/`` in the bucket.
    endpoint_url : str, optional
        The server, e.g. ``http://127.0.0.1:8333``; None for AWS.
    region_name : str
        Signing region.
    aws_access_key_id, aws_secret_access_key : str, optional
        Explicit credentials; by default the standard credential chain.
    path_style : bool
        Path-style addressing (most self-hosted servers want it).
    max_attempts : int
        Total attempts per request, first one included.
    connect_timeout, read_timeout : float
        Seconds. A hung server is only noticed through ``read_timeout``.
    max_pool_connections : int
        Parallel connections (replication ships regions in parallel).
    profile_name : str, optional
        A profile of the AWS shared config and credentials files (as ``AWS_PROFILE``).
    object_lock : {"governance", "compliance"}, optional
        Write every object with an S3 Object Lock retention of this mode, until
        ``object_lock_days`` from its write: the bucket (versioned, Object Lock enabled) then
        keeps every version it was given for that long, whoever asks to delete it (compliance), or
        unless an identity allowed to bypass governance retention asks (governance). See
        :meth:`protection`.
    object_lock_days : float
        The retention period, in days (default 30); longer than the oldest PIT kept is wise.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str = "us-east-1",
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        path_style: bool = True,
        max_attempts: int = 4,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        max_pool_connections: int = 32,
        profile_name: str | None = None,
        object_lock: str | None = None,
        object_lock_days: float = 30.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = _without_userinfo(endpoint_url) if endpoint_url else "https://s3.amazonaws.com"
        self.location = f"{self.endpoint}/{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.max_attempts = max_attempts
        if object_lock is not None and object_lock.lower() not in ("governance", "compliance"):
            raise InvalidArgumentError(f"object_lock must be 'governance' or 'compliance', got {object_lock!r}")
        if isinstance(object_lock_days, bool) or not isinstance(object_lock_days, (int, float)) \
                or not 0 < object_lock_days <= 36500:
            raise InvalidArgumentError(f"object_lock_days must be from 0 to 36500 days, got {object_lock_days!r}")
        self.object_lock = None if object_lock is None else object_lock.upper()
        self.object_lock_days = float(object_lock_days)
        config = Config(
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            s3={"addressing_style": "path" if path_style else "auto"},
            # Region objects carry their own mmh3 checksum; skip the extra CRC pass of new botocore.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session(
                aws_access_key_id=aws_access_key_id,
                aws_secret_access_key=aws_secret_access_key,
                region_name=region_name,
                profile_name=profile_name,
            )
        except botocore.exceptions.ProfileNotFound as exc:
            raise InvalidArgumentError(f"AWS profile {profile_name!r} not found in the shared config files") from exc
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint!r})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (for tests and first setup), with Object Lock
        enabled when the store writes with a retention (``object_lock``).

        A bucket that exists already, ``BucketAlreadyExists`` included (on AWS: owned by another
        account), is not an error here; the requests that follow then fail if it is not ours.

        Raises
        ------
        StoreAccessError
            The credentials may not create it.
        SecondaryUnavailableError
            The server cannot be reached.
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError:
            pass
        except Exception as exc:  # noqa: BLE001 - translated below
            raise translate_boto_error(exc, self, "head_bucket") from exc
        try:
            if self.object_lock is not None:  # Object Lock (and so versioning) is chosen at creation
                self.client.create_bucket(Bucket=self.bucket, ObjectLockEnabledForBucket=True)
            else:
                self.client.create_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, botocore.exceptions.ClientError) and exc.response.get("Error", {}).get("Code") in (
                "BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise translate_boto_error(exc, self, "create_bucket") from exc

    def protection(self) -> BucketProtection:
        """How the bucket protects what the store writes from deletion, and what is missing.

        The secondary is a separate security domain when a holder of the primary's credentials
        cannot destroy history: the bucket keeps versions (so an overwrite or a delete leaves the
        old version) and has Object Lock enabled, and this store writes every object with a
        retention (``object_lock``), so no version is deleted before its time; deleting belongs to
        another identity (``overlaycache collapse`` with its own credentials).

        Returns
        -------
        BucketProtection
            The bucket's versioning, Object Lock and default retention, and the problems found.

        Raises
        ------
        StoreAccessError, SecondaryUnavailableError, StoreError
            The bucket's configuration cannot be read.
        """
        try:
            versioning = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
        except Exception as exc:  # noqa: BLE001
            raise translate_boto_error(exc, self, "get_bucket_versioning") from exc
        enabled, default = False, None
        try:
            cfg = self.client.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
            enabled = cfg.get("ObjectLockEnabled") == "Enabled"
            rule = cfg.get("Rule", {}).get("DefaultRetention")
            if rule:
                default = f"{rule.get('Mode')} {rule.get('Days') or rule.get('Years')} " \
                          f"{'days' if rule.get('Days') else 'years'}"
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
                raise translate_boto_error(exc, self, "get_object_lock_configuration") from exc
        except Exception as exc:  # noqa: BLE001
            raise translate_boto_error(exc, self, "get_object_lock_configuration") from exc
        problems = []
        if versioning != "Enabled":
            problems.append(f"versioning is {versioning or 'off'}: an overwrite or a delete destroys the old object")
        if not enabled:
            problems.append("Object Lock is not enabled on the bucket (S3 enables it when the bucket is created, "
                            "or on a versioned bucket with PutObjectLockConfiguration)")
        if self.object_lock is None and default is None:
            problems.append("objects are written without a retention: open the store with object_lock= "
                            "(s3://...?object_lock=governance&object_lock_days=30) or give the bucket a default "
                            "retention")
        return BucketProtection(self.location, versioning, enabled, default,
                                None if self.object_lock is None else f"{self.object_lock} {self.object_lock_days:g} days",
                                problems)

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        """Store ``data`` under ``key`` with one PutObject.

        Parameters
        ----------
        key : str
            The object's key, under the store's prefix.
        data : bytes-like
            The object's bytes.
        if_absent : bool
            Send ``If-None-Match: *``: the server refuses to replace an existing object.

        Raises
        ------
        ObjectExistsError
            ``if_absent`` and the key exists (HTTP 412 or 409).
        StoreAccessError, SecondaryUnavailableError, StoreError
            See :func:`translate_boto_error`.
        """
        body = data if isinstance(data, (bytes, bytearray)) else bytes(data)  # a pack is not copied again
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": body}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if self.object_lock is not None:
            kwargs["ObjectLockMode"] = self.object_lock
            kwargs["ObjectLockRetainUntilDate"] = (datetime.datetime.now(datetime.timezone.utc)
                                                   + datetime.timedelta(days=self.object_lock_days))
            kwargs["ChecksumAlgorithm"] = "CRC32"  # S3 wants an integrity checksum with a retention
        try:
            self.client.put_object(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise translate_boto_error(exc, self, "put", key) from exc

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` bytes from ``start`` with a ranged GetObject.

        A body stream that breaks off (a server killed mid-GET, a read timeout), which botocore
        does not retry, is requested again, up to ``max_attempts`` times in all.

        Parameters
        ----------
        key : str
            The object's key.
        start : int
            The first byte to return.
        length : int, optional
            Bytes to return (fewer at the end of the object); None: up to the end.

        Returns
        -------
        bytes

        Raises
        ------
        ObjectNotFoundError
            No object under ``key``.
        StoreAccessError, SecondaryUnavailableError, StoreError
            See :func:`translate_boto_error`.
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            if length == 0:
                return b""
            kwargs["Range"] = f"bytes={start}-{end}"
        last: BaseException | None = None
        # botocore retries the request but not a body stream that breaks (server killed mid-GET).
        for _attempt in range(self.max_attempts):
            try:
                resp = self.client.get_object(**kwargs)
                return bytes(resp["Body"].read())
            except (botocore.exceptions.ResponseStreamingError, botocore.exceptions.ReadTimeoutError,
                    botocore.exceptions.IncompleteReadError) as exc:
                last = exc
                _log.warning("%s: GET %s broke off (%s); retrying", self.location, key, type(exc).__name__)
            except Exception as exc:  # noqa: BLE001
                raise translate_boto_error(exc, self, "get", key) from exc
        assert last is not None
        raise translate_boto_error(last, self, "get", key) from last

    def head(self, key: str) -> int | None:
        """The object's size (HeadObject), or None when there is no such object.

        Parameters
        ----------
        key : str
            The object's key.

        Returns
        -------
        int or None

        Raises
        ------
        StoreAccessError, SecondaryUnavailableError, StoreError
            See :func:`translate_boto_error`.
        """
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            err = translate_boto_error(exc, self, "head", key)
            if isinstance(err, ObjectNotFoundError):
                return None
            raise err from exc
        return int(resp["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, sorted (ListObjectsV2, every page).

        Parameters
        ----------
        prefix : str
            A key prefix; empty: every key under the store's prefix.

        Returns
        -------
        iterator of str
            Keys relative to the store's prefix.

        Raises
        ------
        StoreAccessError, SecondaryUnavailableError, StoreError
            See :func:`translate_boto_error`.
        """
        return (key for key, _size in self.list_sizes(prefix))

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int | None]]:
        """Keys starting with ``prefix`` with their sizes, sorted (the same ListObjectsV2 pages as
        :meth:`list`).

        Parameters
        ----------
        prefix : str
            As for :meth:`list`.

        Returns
        -------
        iterator of (str, int)
            Each key, relative to the store's prefix, and its size.

        Raises
        ------
        StoreAccessError, SecondaryUnavailableError, StoreError
            See :func:`translate_boto_error`.
        """
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else ""))
            keys: list[tuple[str, int | None]] = [(obj["Key"][strip:], int(obj["Size"]))
                                                  for page in pages for obj in page.get("Contents", ())]
        except Exception as exc:  # noqa: BLE001
            raise translate_boto_error(exc, self, "list", prefix) from exc
        return iter(sorted(keys))

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """The next path components below ``prefix`` (ListObjectsV2 with delimiter ``/``), sorted.

        Parameters
        ----------
        prefix : str
            A "directory" of keys, ending with ``/`` (empty: the store's top).

        Returns
        -------
        list of str
            Common prefixes (without their ``/``) and keys directly below ``prefix``.

        Raises
        ------
        StoreAccessError, SecondaryUnavailableError, StoreError
            See :func:`translate_boto_error`.
        """
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/")
            out = []
            for page in pages:
                out += [p["Prefix"][len(full):].rstrip("/") for p in page.get("CommonPrefixes", ())]
                out += [o["Key"][len(full):] for o in page.get("Contents", ())]
        except Exception as exc:  # noqa: BLE001
            raise translate_boto_error(exc, self, "list", prefix) from exc
        return sorted(out)

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` with DeleteObjects, 1,000 at a time; missing keys are fine.

        Parameters
        ----------
        keys : iterable of str
            The objects' keys.

        Raises
        ------
        StoreError
            A batch failed, or the server reported keys it could not delete (the first is named);
            the batches before it are deleted.
        """
        batch: builtins.list[str] = []

        def flush() -> None:
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True})
            except Exception as exc:  # noqa: BLE001
                raise translate_boto_error(exc, self, "delete", batch[0]) from exc
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                if first.get("Code") == "AccessDenied":
                    raise StoreAccessError(
                        f"{self.location}: delete refused (AccessDenied) for {len(errors)} of {len(batch)} keys, first "
                        f"{first.get('Key')}: these credentials may not delete (collapse and repair run with the "
                        "store's own)", self.endpoint, self.bucket, first.get("Key"))
                raise StoreError(f"{self.location}: delete: {len(errors)} failed, first {first}",
                                 self.endpoint, self.bucket, first.get("Key"))
            batch.clear()

        for key in keys:
            batch.append(key)
            if len(batch) == 1000:
                flush()
        if batch:
            flush()

    def close(self) -> None:
        """Close the client's connection pool."""
        self.client.close()
