"""Durable file operations shared by every local file of a volume or clone.

Contract
--------
* :func:`write_file_atomic` replaces a file so that a crash leaves either the old or the new
  contents, never a mix: temp file, fsync, rename, fsync of the directory.
* :func:`write_json_atomic` does the same for a JSON descriptor carrying a checksum of itself, which
  :func:`read_json_checked` verifies (with its kind and format version) before anything trusts it.
* :func:`lock_directory` takes the ``flock`` that makes one writer process at a time.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterable
from typing import Any

from overlaycache._impl import core
from overlaycache.errors import FormatError, VolumeLockedError

#: Volume data is private: files and directories of volumes, clones and caches have no group or
#: other access (the umask can only take more away).
FILE_MODE = 0o600
DIR_MODE = 0o700


def fsync_dir(path: str) -> None:
    """fsync a directory so that renames and creations in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_new(path: str, data: bytes) -> None:
    """Create (or truncate) ``path`` with ``data`` and fsync it; the caller fsyncs the directory."""
    _write_chunks(path, (data,))


def _write_chunks(path: str, chunks: Iterable[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_chunks_atomic(path: str, chunks: Iterable[bytes]) -> None:
    """As :func:`write_file_atomic`, for data produced a chunk at a time (never all in memory)."""
    tmp = path + ".tmp"
    _write_chunks(tmp, chunks)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def write_file_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync of
    the directory)."""
    tmp = path + ".tmp"
    write_file_new(tmp, data)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def json_checksum(obj: dict[str, Any]) -> str:
    """The checksum of a descriptor: of its canonical JSON without the ``checksum`` field."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return bytes(core.checksum(json.dumps(body, sort_keys=True).encode())).hex()


def write_json_atomic(directory: str, name: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` with its checksum to ``directory/name`` (see :func:`write_file_atomic`)."""
    obj = dict(obj)
    obj["checksum"] = json_checksum(obj)
    write_file_atomic(os.path.join(directory, name), json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")


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


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of ``[start, end)`` of the file ``fd`` that may hold data: its holes left out
    (``SEEK_DATA``/``SEEK_HOLE``). Where the file system cannot tell, the rest counts as data."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # no hole support: assume data
                out.append((pos, end))
            break  # ENXIO: no data past ``pos``
        if a >= end:
            break
        b = min(end, os.lseek(fd, a, os.SEEK_HOLE))
        out.append((a, b))
        pos = b
    return out


def lock_directory(directory: str, shared: bool, busy: str) -> int:
    """Take the ``flock`` on ``directory/lock`` (shared or exclusive, not waiting); returns its fd.

    Raises
    ------
    VolumeLockedError
        Someone else holds it (``busy`` says who, in the message).
    """
    lock_path = os.path.join(directory, "lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        raise FormatError(f"{lock_path}: cannot open lock file: {exc.strerror}", lock_path) from exc
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        holder = lock_holder(fd)  # the last exclusive holder's PID, if that process still runs
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            who = f" (PID {holder})" if holder is not None else ""
            raise VolumeLockedError(f"{directory}: {busy}{who}") from exc
        raise
    if not shared:  # the holder's PID, for the message of whoever finds the lock taken
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # only for messages
    return fd


def lock_holder(fd: int) -> int | None:
    """The PID written in a lock file by its exclusive holder, if it is a running process."""
    try:
        pid = int(os.pread(fd, 32, 0).decode("ascii").strip())
        os.kill(pid, 0)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return pid
