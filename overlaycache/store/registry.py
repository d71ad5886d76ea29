"""Open a store from a URL.

:func:`open_store` picks a backend by the URL's scheme from a registry, as fsspec's
``registry.py`` does, and :func:`register_store` adds backends::

    open_store("s3://backups/appliance-1?endpoint_url=http://127.0.0.1:8333&region=eu-west-1")
    open_store("file:///var/lib/oc-secondary")
    open_store("/var/lib/oc-secondary")              # a plain path is a local directory

Query parameters are the backend's keyword arguments, as text (``s3://``: ``endpoint_url``,
``region`` or ``region_name``, ``path_style``, ``max_attempts``, ``connect_timeout``,
``read_timeout``, ``max_pool_connections``, ``profile`` or ``profile_name``, ``object_lock``
(``governance`` or ``compliance``), ``object_lock_days``; ``file://``: ``prefix``). Keyword arguments of
:func:`open_store` are the same options as Python values. Credentials never come from a URL, which
ends up in logs and process listings: S3 takes them from the environment, the shared files or the
instance role as boto3 does, or from the keywords ``aws_access_key_id`` and
``aws_secret_access_key``. A URL that cannot be opened as written (unknown scheme, missing bucket,
unknown or mistyped option, relative file URL, credentials in it) raises
:class:`~overlaycache.errors.InvalidArgumentError` naming the problem, without repeating a secret.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from overlaycache.errors import InvalidArgumentError
from overlaycache.store.base import ObjectStore
from overlaycache.store.local import LocalStore
from overlaycache.store.s3 import S3Store

__all__ = ["StoreFactory", "open_store", "register_store", "registered_schemes"]

#: A backend: called as ``factory(url, **options)`` with the URL split by
#: :func:`urllib.parse.urlsplit` (scheme in lower case; the query already parsed into ``options``,
#: each given once, text values from the URL and Python values from the caller's keywords).
StoreFactory = Callable[..., ObjectStore]

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*\Z")
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?")
# Lenient on purpose: self-hosted servers accept names AWS refuses (upper case, underscores).
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")
_SECRET = re.compile(r"secret|password|passwd|token|credential|access_key|key_id", re.IGNORECASE)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

_registry: dict[str, StoreFactory] = {}


def register_store(scheme: str, factory: StoreFactory, *, clobber: bool = False) -> None:
    """Make :func:`open_store` open ``scheme://`` URLs with ``factory``.

    Parameters
    ----------
    scheme : str
        The URL scheme, e.g. ``"gs"``; case-insensitive.
    factory : callable
        Called as ``factory(url, **options)``, see :data:`StoreFactory`; returns an
        :class:`~overlaycache.store.base.ObjectStore`. It should raise
        :class:`~overlaycache.errors.InvalidArgumentError` for a URL or option it cannot take.
    clobber : bool
        Replace a factory already registered for ``scheme`` (otherwise that is an error).

    Raises
    ------
    InvalidArgumentError
        ``scheme`` is not a URL scheme, or is taken and ``clobber`` is false.
    """
    if not isinstance(scheme, str) or not _SCHEME.match(scheme.lower()):
        raise InvalidArgumentError(f"invalid store URL scheme {scheme!r}")
    if not callable(factory):
        raise InvalidArgumentError(f"store factory for {scheme!r} is not callable")
    scheme = scheme.lower()
    if scheme in _registry and not clobber and _registry[scheme] is not factory:
        raise InvalidArgumentError(f"store scheme {scheme!r} is already registered (pass clobber=True to replace it)")
    _registry[scheme] = factory


def registered_schemes() -> list[str]:
    """The URL schemes :func:`open_store` knows, sorted."""
    return sorted(_registry)


def open_store(url: str | os.PathLike[str], **options: Any) -> ObjectStore:
    """Open the store that ``url`` names.

    Parameters
    ----------
    url : str or PathLike
        ``scheme://...`` for a registered scheme (``s3://bucket/prefix``, ``file:///abs/dir``), or a
        plain path to a local directory (relative paths are taken from the current directory).
    **options
        The backend's keyword arguments; an option may not also be given in the URL's query.

    Returns
    -------
    ObjectStore
        The store; its ``location`` carries no credentials.

    Raises
    ------
    InvalidArgumentError
        The URL or an option is wrong; the message names what.
    """
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str):
        raise InvalidArgumentError(f"a store URL must be a str or a path, not {type(url).__name__}")
    if not url:
        raise InvalidArgumentError("empty store URL")
    url_scheme = _URL.match(url)
    # "name://..." is a URL; so is "name:..." for a known scheme (file:/abs/dir); else a path.
    if not url_scheme or not (url_scheme.group(2) or url_scheme.group(1).lower() in _registry):
        parts = urllib.parse.SplitResult("file", "", urllib.parse.quote(os.path.abspath(url)), "", "")
        return _registry["file"](parts, **options)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise InvalidArgumentError(f"malformed store URL ({exc})") from None
    where = _describe(parts)
    factory = _registry.get(parts.scheme)
    if factory is None:
        raise InvalidArgumentError(
            f"{where}: unknown store scheme {parts.scheme!r} (known: {', '.join(registered_schemes())})")
    if "@" in parts.netloc:
        raise InvalidArgumentError(f"{where}: credentials do not belong in a store URL; "
                                   "use the environment or keyword arguments")
    if parts.fragment:
        raise InvalidArgumentError(f"{where}: a store URL has no '#' fragment")
    return factory(parts, **_merge(where, parts.query, options))


def _describe(parts: urllib.parse.SplitResult) -> str:
    """The URL for messages: no user information, no query."""
    if not parts.netloc and parts.path and not parts.path.startswith("/"):
        return f"{parts.scheme}:{parts.path}"  # written without "//" (file:relative/dir)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _merge(where: str, query: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The query's options and the keyword ones, each name given once."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidArgumentError(f"{where}: malformed query (expected name=value pairs joined by '&')") from None
    merged: dict[str, Any] = {}
    for name, value in pairs:
        if _SECRET.search(name):
            raise InvalidArgumentError(f"{where}: credentials do not belong in a store URL ({name}); "
                                       "use the environment or keyword arguments")
        if name in merged:
            raise InvalidArgumentError(f"{where}: option {name!r} is given twice")
        merged[name] = value
    for name, value in options.items():
        if name in merged:
            raise InvalidArgumentError(f"{where}: option {name!r} is given in the URL and as a keyword")
        merged[name] = value
    return merged


def _coerce(where: str, name: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``: text from a URL is parsed, a Python value must have the type."""
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        try:
            if kind is bool:
                if text not in _TRUE | _FALSE:
                    raise ValueError(value)
                return text in _TRUE
            return kind(text)
        except ValueError:
            raise InvalidArgumentError(f"{where}: option {name}: expected {kind.__name__}, got {value!r}") from None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise InvalidArgumentError(f"{where}: option {name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _take(where: str, options: Mapping[str, Any], known: Mapping[str, type], *,
          aliases: Mapping[str, str] | None = None, nullable: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``options`` checked against ``known`` (name -> type) and converted; names in ``nullable``
    may also be None."""
    aliases = aliases or {}
    out: dict[str, Any] = {}
    for name, value in options.items():
        target = aliases.get(name, name)
        if target not in known:
            names = sorted({*known, *aliases})
            raise InvalidArgumentError(f"{where}: unknown store option {name!r} (known: {', '.join(names)})")
        if target in out:
            raise InvalidArgumentError(f"{where}: option {target!r} is given twice")
        out[target] = None if value is None and target in nullable else _coerce(where, name, value, known[target])
    return out


# -- s3:// ----------------------------------------------------------------------------------------

#: S3Store's keyword arguments and their types (tests/test_registry.py keeps this complete).
S3_OPTIONS: dict[str, type] = {
    "endpoint_url": str,
    "region_name": str,
    "path_style": bool,
    "max_attempts": int,
    "connect_timeout": float,
    "read_timeout": float,
    "max_pool_connections": int,
    "aws_access_key_id": str,
    "aws_secret_access_key": str,
    "profile_name": str,
    "object_lock": str,
    "object_lock_days": float,
}
_S3_ALIASES = {"region": "region_name", "profile": "profile_name"}
_S3_NULLABLE = frozenset({"endpoint_url", "aws_access_key_id", "aws_secret_access_key", "profile_name",
                          "object_lock"})


def _open_s3(url: urllib.parse.SplitResult, **options: Any) -> S3Store:
    """``s3://bucket/prefix?option=value&...``."""
    where = _describe(url)
    if not url.netloc:
        raise InvalidArgumentError(f"{where}: missing bucket (expected s3://bucket/prefix)")
    if not _BUCKET.match(url.netloc):
        raise InvalidArgumentError(f"{where}: invalid bucket name {url.netloc!r}")
    kwargs = _take(where, options, S3_OPTIONS, aliases=_S3_ALIASES, nullable=_S3_NULLABLE)
    endpoint = kwargs.get("endpoint_url")
    if endpoint is not None:
        ep = urllib.parse.urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname or ep.query or ep.fragment:
            raise InvalidArgumentError(f"{where}: endpoint_url must be http(s)://host[:port]")
        if "@" in ep.netloc:
            raise InvalidArgumentError(f"{where}: credentials do not belong in endpoint_url; "
                                       "use the environment or keyword arguments")
        try:
            ep.port
        except ValueError:
            raise InvalidArgumentError(f"{where}: endpoint_url has an invalid port") from None
    for name in ("max_attempts", "max_pool_connections"):
        if name in kwargs and kwargs[name] < 1:
            raise InvalidArgumentError(f"{where}: option {name} must be at least 1, not {kwargs[name]}")
    for name in ("connect_timeout", "read_timeout"):
        if name in kwargs and not (kwargs[name] > 0 and math.isfinite(kwargs[name])):
            raise InvalidArgumentError(f"{where}: option {name} must be a positive number of seconds")
    for name in ("region_name",):
        if name in kwargs and not kwargs[name]:
            raise InvalidArgumentError(f"{where}: option {name} is empty")
    return S3Store(url.netloc, prefix=urllib.parse.unquote(url.path).strip("/"), **kwargs)


# -- file:// and plain paths ----------------------------------------------------------------------

_FILE_OPTIONS: dict[str, type] = {"prefix": str}


def _open_file(url: urllib.parse.SplitResult, **options: Any) -> LocalStore:
    """``file:///abs/dir`` (``file://localhost/abs/dir`` too)."""
    where = _describe(url)
    if url.netloc not in ("", "localhost"):
        raise InvalidArgumentError(f"{where}: a file URL names no host, and {url.netloc!r} is in its place "
                                   "(expected file:///absolute/path, or a plain path)")
    path = urllib.parse.unquote(url.path)
    if not path.startswith("/"):
        raise InvalidArgumentError(f"{where}: relative file URL (expected file:///absolute/path)")
    kwargs = _take(where, options, _FILE_OPTIONS)
    return LocalStore(path, **kwargs)


register_store("s3", _open_s3)
register_store("file", _open_file)
