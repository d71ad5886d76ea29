"""A minimal NBD client for the benchmarks: the same client in front of every server compared.

Fixed newstyle handshake with ``NBD_OPT_GO`` on the default export, simple replies only (structured
replies are not asked for, so ``qemu-nbd`` and overlaycache's ``NBDServer`` both answer with simple
replies), one request in flight at a time: ``READ``, ``WRITE``, ``FLUSH`` and ``DISC``. It is what a
queue-depth-1 client costs, the same for every server; nothing here is meant for production use.
"""

from __future__ import annotations

import socket
import struct
import urllib.parse
from typing import Any

_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_OPT_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698

_FLAG_C_FIXED_NEWSTYLE = 1
_FLAG_C_NO_ZEROES = 2
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_INFO_EXPORT = 0

_CMD_READ = 0
_CMD_WRITE = 1
_CMD_DISC = 2
_CMD_FLUSH = 3

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT_REPLY = struct.Struct(">QIII")


class NBDError(OSError):
    """The server answered a request with an error, or broke the protocol."""


class NBDClient:
    """One connection to an NBD server: on ``host``:``port`` (TCP, with ``TCP_NODELAY``), or on the Unix
    socket ``unix_path`` when given.

    Attributes
    ----------
    size : int
        Bytes in the export.
    flags : int
        The export's transmission flags.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 10809, timeout: float = 30.0,
                 unix_path: str | None = None) -> None:
        if unix_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(unix_path)
            except BaseException:
                self.sock.close()
                raise
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._handle = 0
        self._header = memoryview(bytearray(_REPLY.size))
        try:
            self.size, self.flags = self._handshake()
        except BaseException:
            self.sock.close()
            raise

    @classmethod
    def from_url(cls, url: str) -> NBDClient:
        """Connect to ``nbd://HOST:PORT`` or ``nbd+unix:///?socket=PATH`` (the default export)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "nbd+unix":
            return cls(unix_path=urllib.parse.parse_qs(parts.query)["socket"][0])
        if parts.scheme != "nbd" or parts.hostname is None or parts.port is None:
            raise ValueError(f"not an NBD URL this client takes: {url!r}")
        return cls(parts.hostname, parts.port)

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_into(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        recv_into = self.sock.recv_into
        while pos < end:
            n = recv_into(view[pos:])
            if n == 0:
                raise NBDError("server closed the connection")
            pos += n

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _handshake(self) -> tuple[int, int]:
        magic, opt_magic, _hflags = struct.unpack(">QQH", self._recv(18))
        if magic != _NBDMAGIC or opt_magic != _IHAVEOPT:
            raise NBDError("not a fixed newstyle NBD server")
        self.sock.sendall(struct.pack(">I", _FLAG_C_FIXED_NEWSTYLE | _FLAG_C_NO_ZEROES))
        data = struct.pack(">IH", 0, 0)  # the default export, no information requests
        self.sock.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
        size = flags = -1
        while True:
            magic, _opt, kind, length = _OPT_REPLY.unpack(self._recv(_OPT_REPLY.size))
            payload = self._recv(length)
            if magic != _OPT_REPLY_MAGIC:
                raise NBDError(f"bad option reply magic {magic:#x}")
            if kind == _REP_ACK:
                break
            if kind & (1 << 31):
                raise NBDError(f"NBD_OPT_GO refused ({kind:#x}): {payload!r}")
            if kind == _REP_INFO and struct.unpack_from(">H", payload)[0] == _INFO_EXPORT:
                size, flags = struct.unpack_from(">QH", payload, 2)
        if size < 0:
            raise NBDError("the server did not say the export's size")
        self.sock.settimeout(None)
        return size, flags

    def _request(self, cmd: int, offset: int, length: int) -> None:
        self._handle += 1
        self.sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, cmd, self._handle, offset, length))

    def _reply(self) -> None:
        self._recv_into(self._header)
        magic, err, handle = _REPLY.unpack(self._header)
        if magic != _SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NBDError(f"unexpected reply (magic {magic:#x}, handle {handle})")
        if err:
            raise NBDError(err, f"NBD error {err}")

    def readinto(self, offset: int, buf: Any) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (a writable buffer)."""
        view = memoryview(buf).cast("B")
        self._request(_CMD_READ, offset, len(view))
        self._reply()
        self._recv_into(view)

    def write(self, offset: int, data: Any) -> None:
        """Write ``data`` at ``offset`` and wait for the reply."""
        view = memoryview(data).cast("B")
        self._request(_CMD_WRITE, offset, len(view))
        self.sock.sendall(view)
        self._reply()

    def flush(self) -> None:
        """``NBD_CMD_FLUSH``: every acknowledged write made durable."""
        self._request(_CMD_FLUSH, 0, 0)
        self._reply()

    def close(self) -> None:
        """Send ``NBD_CMD_DISC`` and close the socket."""
        try:
            self._request(_CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()
