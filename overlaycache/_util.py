"""Helpers shared by the volume and its clones: argument checks, checksummed JSON descriptors
written atomically, and the directory lock."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import Any

from overlaycache._impl import core
from overlaycache.errors import FormatError, InvalidArgumentError, InvalidBufferError, VolumeLockedError
from overlaycache.layers import fsync_dir


def check_int(name: str, value: Any) -> int:
    """``value`` if it is an int (not a bool); else :class:`InvalidArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__}")
    return value


def byte_view(data: Any) -> memoryview:
    """A flat byte view of any C-contiguous buffer; else :class:`InvalidBufferError`."""
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise InvalidBufferError(f"expected a bytes-like object, got {type(data).__name__}") from exc
    if not view.c_contiguous:
        raise InvalidBufferError("buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def json_checksum(obj: dict[str, Any]) -> str:
    """The checksum of a descriptor: of its canonical JSON without the ``checksum`` field."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return bytes(core.checksum(json.dumps(body, sort_keys=True).encode())).hex()


def write_json_atomic(directory: str, name: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` with its checksum to ``directory/name``: temp file, fsync, rename, fsync of
    the directory."""
    obj = dict(obj)
    obj["checksum"] = json_checksum(obj)
    final = os.path.join(directory, name)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(directory)


def read_json_checked(directory: str, name: str, kind: str, max_version: int, what: str,
                      missing_hint: str = "") -> dict[str, Any]:
    """Read and check a descriptor written by :func:`write_json_atomic`.

    Raises
    ------
    FormatError
        ``directory`` is not a ``what`` (no directory, no descriptor, another kind), or the
        descriptor is corrupted or of a format newer than ``max_version``.
    """
    path = os.path.join(directory, name)
    if not os.path.isdir(directory):
        raise FormatError(f"{directory}: not an overlaycache {what} (not a directory)", directory)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise FormatError(f"{directory}: not an overlaycache {what} (no {name}){missing_hint}", path) from exc
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: truncated or corrupted ({exc})", path) from exc
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise FormatError(f"{path}: not an overlaycache {what} description", path)
    version = obj.get("version")
    if not isinstance(version, int):
        raise FormatError(f"{path}: missing format version", path)
    if version > max_version:
        raise FormatError(f"{path}: format version {version} is newer than this overlaycache ({max_version})",
                          path)
    if obj.get("checksum") != json_checksum(obj):
        raise FormatError(f"{path}: checksum mismatch (file corrupted)", path)
    return obj


def lock_directory(directory: str, shared: bool, busy: str) -> int:
    """Take the ``flock`` on ``directory/lock`` (shared or exclusive, not waiting); returns its fd.

    Raises
    ------
    VolumeLockedError
        Someone else holds it (``busy`` says who, in the message).
    """
    lock_path = os.path.join(directory, "lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FormatError(f"{lock_path}: cannot open lock file: {exc.strerror}", lock_path) from exc
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise VolumeLockedError(f"{directory}: {busy}") from exc
        raise
    return fd
