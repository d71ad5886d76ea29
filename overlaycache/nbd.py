"""Serve a volume, or any image, over the NBD protocol so that unmodified clients use it as a disk.

:class:`NBDServer` exports ONE target (a :class:`~overlaycache.Volume`, an image of a snapshot, a
clone, or any object with ``size`` and ``read``) to clients such as ``qemu-img``, ``qemu-io``,
``qemu-nbd -c``, ``nbd-client``, ``nbdcopy`` and ``nbdinfo``.

Contract
--------
* Handshake: fixed newstyle only. Options ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_GO`` and
  ``NBD_OPT_INFO`` (replying ``NBD_INFO_EXPORT`` and ``NBD_INFO_BLOCK_SIZE``, and ``NBD_INFO_NAME``
  and ``NBD_INFO_DESCRIPTION`` when asked), ``NBD_OPT_LIST`` and ``NBD_OPT_ABORT``; any other option
  is answered ``NBD_REP_ERR_UNSUP``. Structured replies are not negotiated: every reply is simple.
  The export's name is ``name`` (default ``""``); the empty name always selects it too.
* Commands: ``READ``, ``WRITE``, ``FLUSH``, ``DISC``, ``TRIM`` and ``WRITE_ZEROES``.
  ``NBD_CMD_FLAG_FUA`` makes the server flush the target before it replies. ``TRIM`` is advisory and
  does nothing (it succeeds; the data stays as it was, which the protocol allows). ``WRITE_ZEROES``
  writes zeros through the target in chunks of at most 1 MiB (or one region, if larger).
  A reply is sent only once the target call returned; an acknowledged write is in the target, and
  durable once a ``FLUSH`` (or a request with FUA) was acknowledged, or once :meth:`NBDServer.stop`
  returned.
* Read-only: with ``readonly=True``, for a target without ``write``, or for one whose ``readonly``
  attribute is true (a volume opened read-only), the export carries ``NBD_FLAG_READ_ONLY`` and
  ``WRITE``, ``TRIM`` and ``WRITE_ZEROES`` fail with ``NBD_EPERM``.
* Threads: one per client. The requests of one connection are handled one at a time, in the order
  they arrive (each reply is sent before the next request is read): simple, and a client's own
  writes and reads never race. Clients run concurrently, so the target must accept calls from
  several threads at once (volumes, images and clones do). ``NBD_FLAG_CAN_MULTI_CONN`` is
  advertised: the target is one shared object without per-connection caches, so a write is seen by
  every connection as soon as it is acknowledged, and its ``flush()`` makes every acknowledged write
  durable, whichever connection sent it.
* Errors: a request outside the export gets ``NBD_EINVAL`` and the connection stays usable.
  An exception from the target becomes an error reply, logged once (repeats of the same error on a
  connection go to the debug log): :class:`~overlaycache.InvalidArgumentError` (an out-of-range
  access among them) ``NBD_EINVAL``, a closed volume ``NBD_ESHUTDOWN``, ``ENOSPC``/``EDQUOT``/``EFBIG``
  ``NBD_ENOSPC``, anything else (:class:`~overlaycache.RegionUnavailableError`, other errors)
  ``NBD_EIO``. A bad request magic, a broken handshake, or a client gone in the middle of a
  request (even of a WRITE payload, which is then never written) closes that connection only.
* Limits: ``READ`` and ``WRITE`` carry at most :data:`MAX_PAYLOAD` (32 MiB) of data; a larger
  ``READ`` gets ``NBD_EINVAL``, a larger ``WRITE`` too once its payload was read and dropped, unless
  it is over 128 MiB, when the connection is closed instead (a client that claims such a payload is
  broken or hostile). Options carry at most 64 KiB. A client has 30 s to finish its handshake.
  ``TRIM`` and ``WRITE_ZEROES`` carry no payload and may cover the whole export.
* Listening: TCP on ``host``/``port`` (loopback only unless ``allow_remote=True``: NBD has no
  authentication, and this server no TLS), or a Unix socket (mode 0600) at ``socket_path``.
  Plain sockets only: no ``mmap``, nothing here that can raise SIGBUS.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
import urllib.parse
from typing import Any, Protocol

from overlaycache.errors import InvalidArgumentError, OverlayCacheError, VolumeClosedError

__all__ = ["DEFAULT_PORT", "MAX_PAYLOAD", "BlockTarget", "NBDServer"]

_log = logging.getLogger(__name__)

#: The IANA port of NBD.
DEFAULT_PORT = 10809
#: The largest READ or WRITE payload served (the protocol's default maximum, advertised in
#: ``NBD_INFO_BLOCK_SIZE``).
MAX_PAYLOAD = 32 << 20

_DISCARD_LIMIT = 128 << 20  # an oversized WRITE payload up to this is read and dropped; beyond, close
_MAX_OPTION = 64 << 10
_HANDSHAKE_TIMEOUT = 30.0
_ZERO_CHUNK = 1 << 20
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)  # EPIPE, never SIGPIPE, whatever the process does

# -- protocol constants (doc/proto.md of NetworkBlockDevice/nbd) -------------------------------------
_NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
_OPT_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698

_FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags
_FLAG_NO_ZEROES = 1 << 1
_FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
_FLAG_C_NO_ZEROES = 1 << 1

_FLAG_HAS_FLAGS = 1 << 0  # transmission flags
_FLAG_READ_ONLY = 1 << 1
_FLAG_SEND_FLUSH = 1 << 2
_FLAG_SEND_FUA = 1 << 3
_FLAG_SEND_TRIM = 1 << 5
_FLAG_SEND_WRITE_ZEROES = 1 << 6
_FLAG_CAN_MULTI_CONN = 1 << 8

_OPT_EXPORT_NAME = 1
_OPT_ABORT = 2
_OPT_LIST = 3
_OPT_INFO = 6
_OPT_GO = 7

_REP_ACK = 1
_REP_SERVER = 2
_REP_INFO = 3
_REP_ERR_UNSUP = (1 << 31) + 1
_REP_ERR_INVALID = (1 << 31) + 3
_REP_ERR_UNKNOWN = (1 << 31) + 6
_REP_ERR_SHUTDOWN = (1 << 31) + 7

_INFO_EXPORT = 0
_INFO_NAME = 1
_INFO_DESCRIPTION = 2
_INFO_BLOCK_SIZE = 3

_CMD_READ = 0
_CMD_WRITE = 1
_CMD_DISC = 2
_CMD_FLUSH = 3
_CMD_TRIM = 4
_CMD_WRITE_ZEROES = 6
_CMD_NAMES = {_CMD_READ: "READ", _CMD_WRITE: "WRITE", _CMD_FLUSH: "FLUSH", _CMD_TRIM: "TRIM",
              _CMD_WRITE_ZEROES: "WRITE_ZEROES"}

_CMD_FLAG_FUA = 1 << 0
_CMD_FLAG_NO_HOLE = 1 << 1
#: Command flags accepted per command; others get EINVAL. FUA is valid on every command.
_ALLOWED_FLAGS = {_CMD_WRITE_ZEROES: _CMD_FLAG_FUA | _CMD_FLAG_NO_HOLE}

_EPERM = 1
_EIO = 5
_EINVAL = 22
_ENOSPC = 28
_ESHUTDOWN = 108

_HELLO = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class BlockTarget(Protocol):
    """What :class:`NBDServer` exports: ``size`` and ``read``; when writable, ``write`` and ``flush``.

    ``readinto(offset, buffer)`` is used instead of ``read`` when present (no copy). ``write`` must
    not keep a reference to ``data`` after it returns (the server reuses the buffer).
    """

    @property
    def size(self) -> int:
        """Bytes in the target."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``.

        Parameters
        ----------
        offset : int
            The first byte, ``0 <= offset <= size``.
        length : int
            Bytes to read; ``offset + length <= size`` (the server checks before it calls).

        Returns
        -------
        bytes
            Exactly ``length`` bytes. An exception becomes an error reply to the client (see the
            module docstring for which).
        """
        ...


class _Closed(Exception):
    """The connection must be closed: the client went away (``level`` says how to log it) or broke
    the protocol."""

    def __init__(self, message: str, level: int = logging.WARNING) -> None:
        super().__init__(message)
        self.level = level


class _Client:
    """One connection: its socket, its thread, its I/O buffer and the errors already logged."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.thread: threading.Thread | None = None
        self.closed = False
        self.lock = threading.Lock()  # close vs shutdown from stop()
        self.buf = bytearray(0)
        self.view = memoryview(self.buf)
        self.logged: dict[tuple[str, str, str], int] = {}

    def buffer(self, length: int) -> memoryview:
        """A view of at least ``16 + length`` bytes: a reply header, then the payload."""
        if len(self.buf) < 16 + length:
            # A new buffer, not a resize: a view the target still holds cannot block it.
            self.buf = bytearray(16 + length)
            self.view = memoryview(self.buf)
        return self.view

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket; :class:`_Closed` if the client goes away first."""
        pos, end = 0, len(view)
        while pos < end:
            n = self.sock.recv_into(view[pos:])
            if n == 0:
                if pos == 0:  # between messages: an abrupt but ordinary end
                    raise _Closed("disconnected", logging.DEBUG)
                raise _Closed(f"disconnected in the middle of a message ({pos} of {end} bytes)", logging.INFO)
            pos += n

    def recv(self, length: int) -> bytes:
        """``length`` bytes from the socket (small messages of the handshake)."""
        buf = bytearray(length)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def discard(self, length: int) -> None:
        """Read and drop ``length`` bytes."""
        chunk = memoryview(bytearray(min(length, 1 << 20)))
        while length > 0:
            n = min(length, len(chunk))
            self.recv_into(chunk[:n])
            length -= n

    def send(self, data: bytes | memoryview) -> None:
        """Send all of ``data``."""
        self.sock.sendall(data, _SEND_FLAGS)

    def shutdown(self, how: int) -> None:
        """Shut the socket down (wakes a thread blocked reading it); ignored once closed."""
        with self.lock:
            if not self.closed:
                try:
                    self.sock.shutdown(how)
                except OSError:
                    pass

    def close(self) -> None:
        """Close the socket (idempotent)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.sock.close()


class NBDServer:
    """Serve one target as one NBD export (fixed newstyle handshake, simple replies).

    Parameters
    ----------
    target : BlockTarget
        What to export: ``size`` (int) and ``read(offset, length) -> bytes``; when it also has
        ``write(offset, data)`` and ``flush()`` the export is writable. A
        :class:`~overlaycache.Volume`, ``vol.image(...)``, ``store.image(...)`` or a clone.
        It must accept calls from several threads at once; the server never closes it.
    host : str, default "127.0.0.1"
        TCP address to listen on. Only a loopback address is accepted unless ``allow_remote``.
    port : int, default 10809
        TCP port; 0 picks a free one (see :attr:`port` once started).
    socket_path : str or os.PathLike, optional
        Listen on this Unix socket instead of TCP (``host`` and ``port`` are then ignored). It is
        created with mode 0600 and removed by :meth:`stop`; a stale socket there is replaced, one
        that a server still answers on is an error.
    readonly : bool, default False
        Refuse writes (``NBD_EPERM``) and advertise ``NBD_FLAG_READ_ONLY``. Implied for a target
        without ``write`` or whose ``readonly`` attribute is true.
    name : str, default ""
        The export's name (``NBD_OPT_LIST``); the empty name selects the export too.
    description : str, optional
        Free text for ``NBD_INFO_DESCRIPTION`` (shown by ``nbdinfo``).
    allow_remote : bool, default False
        Allow a ``host`` that is not a loopback address. NBD has no authentication: whoever
        reaches the port can read (and, unless read-only, overwrite) the whole target.
    max_clients : int, default 64
        Connections served at once; further ones are closed as soon as they are accepted.

    Raises
    ------
    InvalidArgumentError
        A non-loopback ``host`` without ``allow_remote``, a target without ``size`` and ``read``,
        or with ``write`` but no ``flush``.

    Examples
    --------
    >>> with Volume.open(path) as vol, NBDServer(vol, port=0) as server:   # doctest: +SKIP
    ...     subprocess.run(["qemu-img", "info", server.url])
    """

    def __init__(self, target: BlockTarget, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 socket_path: str | os.PathLike[str] | None = None, readonly: bool = False, name: str = "",
                 description: str | None = None, allow_remote: bool = False, max_clients: int = 64) -> None:
        if not callable(getattr(target, "read", None)):
            raise InvalidArgumentError(f"cannot export {target!r}: it has no read(offset, length)")
        size = getattr(target, "size", None)
        if type(size) is not int or size < 0:
            raise InvalidArgumentError(f"cannot export {target!r}: its size is not a non-negative int: {size!r}")
        has_write = callable(getattr(target, "write", None))
        if has_write and not readonly and not callable(getattr(target, "flush", None)):
            raise InvalidArgumentError(f"cannot export {target!r} writable: it has write() but no flush()")
        if not isinstance(name, str) or len(name.encode()) > 4096:
            raise InvalidArgumentError(f"export name must be a str of at most 4096 bytes, got {name!r}")
        if description is not None and not isinstance(description, str):
            raise InvalidArgumentError(f"description must be a str, got {description!r}")
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise InvalidArgumentError(f"max_clients must be a positive int, got {max_clients!r}")
        self._target: Any = target
        self.size: int = size
        self.readonly: bool = bool(readonly) or not has_write or getattr(target, "readonly", False) is True
        self.name = name
        self.description = description
        self.max_clients = max_clients
        self._socket_path: str | None = None
        self._host = host
        self._port = port
        if socket_path is not None:
            self._socket_path = os.fspath(socket_path)
        else:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise InvalidArgumentError(f"port must be an int in [0, 65535], got {port!r}")
            if not allow_remote and not _is_loopback(host):
                raise InvalidArgumentError(
                    f"refusing to serve NBD on {host!r}, which is not a loopback address: NBD has no "
                    "authentication (pass allow_remote=True to do it anyway)")
        flags = (_FLAG_HAS_FLAGS | _FLAG_SEND_FLUSH | _FLAG_SEND_FUA | _FLAG_SEND_TRIM | _FLAG_SEND_WRITE_ZEROES
                 | _FLAG_CAN_MULTI_CONN)
        self._flags = flags | _FLAG_READ_ONLY if self.readonly else flags
        self._readinto = getattr(target, "readinto", None)
        region = getattr(target, "region_size", None)
        rs = region if type(region) is int and region > 0 and region & (region - 1) == 0 else 0
        self._preferred: int = rs if 512 <= rs <= MAX_PAYLOAD else 4096
        self._zero_chunk: int = rs if _ZERO_CHUNK < rs <= 64 << 20 else _ZERO_CHUNK
        self._zeros: bytes | None = None
        self._lock = threading.Lock()
        self._clients: set[_Client] = set()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._accept_done = threading.Event()
        self._stopped = threading.Event()
        self._started = False
        self._bound = False
        self._stopping = False
        self._stop_started = False

    # -- addresses ----------------------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        """The TCP port listened on (the one picked for port 0), also after :meth:`stop`; None before
        :meth:`start` or on a Unix socket."""
        if not self._bound or self._socket_path is not None:
            return None
        return self._port

    @property
    def socket_path(self) -> str | None:
        """The Unix socket's path, or None on TCP."""
        return self._socket_path

    @property
    def url(self) -> str:
        """The export's NBD URI, as qemu and libnbd take it (``nbd://127.0.0.1:10809``,
        ``nbd+unix:///?socket=/run/vol.sock``)."""
        path = urllib.parse.quote(self.name)
        if self._socket_path is not None:
            return f"nbd+unix:///{path}?socket={urllib.parse.quote(self._socket_path)}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"nbd://{host}:{self._port}" + (f"/{path}" if path else "")

    def __repr__(self) -> str:
        where = self._socket_path if self._socket_path is not None else f"{self._host}:{self._port}"
        return f"NBDServer({where}, size={self.size}, readonly={self.readonly})"

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, and accept clients in a background thread; returns once listening.

        Raises
        ------
        OSError
            The address cannot be bound (port in use, ...).
        InvalidArgumentError
            Already started, or stopped.
        """
        thread = threading.Thread(target=self._run, name="nbd-server", daemon=True)
        self._listen(thread)
        thread.name = f"nbd-server-{self._port}"
        try:
            thread.start()
        except BaseException:
            self._accept_done.set()  # no loop will run: stop() must not wait for it
            raise

    def serve_forever(self) -> None:
        """Listen and accept clients in this thread until :meth:`stop` (from another thread) returns.

        An exception here (``KeyboardInterrupt`` at Ctrl-C) stops the server, as :meth:`stop`, and
        propagates.
        """
        self._listen(threading.current_thread())
        try:
            self._accept_loop()
        except BaseException:
            self.stop()
            raise
        self._stopped.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let requests in progress finish, close the clients, flush the target.

        A request whose reply is being computed completes and is answered; a client waiting
        between requests, or still sending a request, is disconnected (a partial WRITE is never
        written). Idempotent; a second caller waits for the first to finish.

        Parameters
        ----------
        timeout : float, default 30.0
            Seconds to wait for requests in progress; after that their connections are cut (the
            target calls still finish in the background).

        Raises
        ------
        Exception
            What the target's ``flush()`` raised (after everything else was shut down).
        """
        with self._lock:
            first = not self._stop_started
            self._stop_started = self._stopping = True
            clients = list(self._clients)
        if not first:
            if threading.current_thread() is not self._accept_thread:
                self._stopped.wait()
            return
        try:
            self._wake()
            if self._bound and self._accept_thread is not threading.current_thread():
                self._accept_done.wait()  # the loop runs once listening; it returns at the wake-up
            self._close_listener()
            for c in clients:
                c.shutdown(socket.SHUT_RD)  # a thread between requests (or mid-payload) sees EOF
            _join(clients, timeout)
            late = [c for c in clients if c.thread is not None and c.thread.is_alive()]
            if late:
                _log.warning("NBD: %d request(s) still running after %.1f s; closing their connections",
                             len(late), timeout)
                for c in late:
                    c.shutdown(socket.SHUT_RDWR)
                _join(late, 1.0)
            if not self.readonly:
                try:
                    self._target.flush()
                except VolumeClosedError:
                    pass  # closing a volume flushes it
        finally:
            for c in clients:
                if c.thread is None or not c.thread.is_alive():
                    c.close()
            for s in (self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            self._stopped.set()
            _log.info("NBD: server on %s stopped", self._where())

    def __enter__(self) -> NBDServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _where(self) -> str:
        return self._socket_path if self._socket_path is not None else f"{self._host}:{self._port}"

    def _listen(self, accept_thread: threading.Thread) -> None:
        with self._lock:
            if self._started or self._stop_started:
                raise InvalidArgumentError(f"{self!r}: already started" if self._started else f"{self!r}: stopped")
            self._started = True
            self._accept_thread = accept_thread
        if self._socket_path is not None:
            listener = self._bind_unix(self._socket_path)
        else:
            family, kind, proto, _, address = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            listener = socket.socket(family, kind, proto)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(address)
                listener.listen(16)
            except BaseException:
                listener.close()
                raise
            self._port = int(listener.getsockname()[1])
        listener.setblocking(False)
        self._listener = listener
        self._bound = True
        self._wake_r, self._wake_w = socket.socketpair()
        _log.info("NBD: serving %s (%d bytes%s) on %s", self._target, self.size,
                  ", read-only" if self.readonly else "", self.url)

    @staticmethod
    def _bind_unix(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise InvalidArgumentError(f"{path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody listens there
            else:
                raise InvalidArgumentError(f"{path}: a server is listening on this socket")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)  # before listen(): no one can connect in between
            listener.listen(16)
        except BaseException:
            listener.close()
            raise
        return listener

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            if self._socket_path is not None:
                try:
                    os.unlink(self._socket_path)
                except FileNotFoundError:
                    pass

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass

    # -- accepting ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._accept_loop()
        except Exception:  # a bug: log it rather than die silently in a thread
            _log.exception("NBD: the accept loop failed; no new clients are accepted")

    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake_r
        assert listener is not None and wake is not None
        sel = selectors.DefaultSelector()
        try:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is wake:
                        return
                    try:
                        sock, address = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:  # EMFILE and the like: the listener stays
                        _log.warning("NBD: accept failed: %s", exc)
                        continue
                    self._admit(sock, address)
        finally:
            sel.close()
            self._accept_done.set()

    def _admit(self, sock: socket.socket, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "unix"
        sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are small and awaited
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # find clients that vanished
        with self._lock:
            if self._stopping or len(self._clients) >= self.max_clients:
                full = not self._stopping
                sock.close()
                if full:
                    _log.warning("NBD: refusing %s: %d clients already", peer, self.max_clients)
                return
            c = _Client(sock, peer)
            c.thread = threading.Thread(target=self._serve_client, args=(c,), name=f"nbd-client-{peer}",
                                        daemon=True)
            self._clients.add(c)
            c.thread.start()

    def _serve_client(self, c: _Client) -> None:
        _log.debug("NBD: %s connected", c.peer)
        try:
            if self._handshake(c):
                self._transmit(c)
            _log.debug("NBD: %s disconnected", c.peer)
        except _Closed as exc:
            _log.log(exc.level, "NBD: %s: connection closed: %s", c.peer, exc)
        except OSError as exc:  # the socket only: target errors are answered, not raised
            _log.info("NBD: %s: connection lost: %s", c.peer, exc)
        except Exception:
            _log.exception("NBD: %s: unexpected error; closing this connection", c.peer)
        finally:
            repeats = sum(c.logged.values()) - len(c.logged)
            if repeats:
                _log.warning("NBD: %s: %d more request(s) failed with errors logged above", c.peer, repeats)
            c.close()
            with self._lock:
                self._clients.discard(c)

    # -- handshake ----------------------------------------------------------------------------------
    def _handshake(self, c: _Client) -> bool:
        """Negotiate; True to go on to transmission, False to close."""
        c.sock.settimeout(_HANDSHAKE_TIMEOUT)
        c.send(_HELLO.pack(_NBDMAGIC, _IHAVEOPT, _FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", c.recv(4))
        if cflags & ~(_FLAG_C_FIXED_NEWSTYLE | _FLAG_C_NO_ZEROES):
            raise _Closed(f"unknown client flags {cflags:#x}")
        while True:
            magic, opt, length = _OPTION.unpack(c.recv(_OPTION.size))
            if magic != _IHAVEOPT:
                raise _Closed(f"bad option magic {magic:#x}")
            if length > _MAX_OPTION:
                raise _Closed(f"option {opt} with {length} bytes of data")
            data = c.recv(length)
            if self._stopping and opt != _OPT_ABORT:
                self._opt_reply(c, opt, _REP_ERR_SHUTDOWN, b"server shutting down")
            elif opt == _OPT_EXPORT_NAME:
                if not self._is_export(data):
                    raise _Closed(f"unknown export {data[:64]!r}")
                zeroes = b"" if cflags & _FLAG_C_NO_ZEROES else bytes(124)
                c.send(struct.pack(">QH", self.size, self._flags) + zeroes)
                break
            elif opt in (_OPT_INFO, _OPT_GO):
                if self._info(c, opt, data) and opt == _OPT_GO:
                    break
            elif opt == _OPT_LIST:
                if data:
                    self._opt_reply(c, opt, _REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                else:
                    name = self.name.encode()
                    self._opt_reply(c, opt, _REP_SERVER, struct.pack(">I", len(name)) + name)
                    self._opt_reply(c, opt, _REP_ACK)
            elif opt == _OPT_ABORT:
                try:
                    self._opt_reply(c, opt, _REP_ACK)
                except OSError:
                    pass  # the client may close without waiting for the reply
                return False
            else:
                self._opt_reply(c, opt, _REP_ERR_UNSUP)
        c.sock.settimeout(None)
        _log.debug("NBD: %s: transmission (flags %#x)", c.peer, self._flags)
        return True

    def _is_export(self, raw: bytes) -> bool:
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            return False
        return name in ("", self.name)

    def _info(self, c: _Client, opt: int, data: bytes) -> bool:
        """Answer NBD_OPT_INFO or NBD_OPT_GO; True if it ended with NBD_REP_ACK."""
        n = struct.unpack_from(">I", data)[0] if len(data) >= 6 else -1
        if n < 0 or n > len(data) - 6:
            self._opt_reply(c, opt, _REP_ERR_INVALID, b"malformed request")
            return False
        (k,) = struct.unpack_from(">H", data, 4 + n)
        if len(data) != 6 + n + 2 * k:
            self._opt_reply(c, opt, _REP_ERR_INVALID, b"malformed request")
            return False
        if not self._is_export(data[4 : 4 + n]):
            self._opt_reply(c, opt, _REP_ERR_UNKNOWN, b"no such export")
            return False
        wanted = set(struct.unpack_from(f">{k}H", data, 6 + n))
        self._opt_reply(c, opt, _REP_INFO, struct.pack(">HQH", _INFO_EXPORT, self.size, self._flags))
        if _INFO_NAME in wanted:
            self._opt_reply(c, opt, _REP_INFO, struct.pack(">H", _INFO_NAME) + self.name.encode())
        if _INFO_DESCRIPTION in wanted and self.description:
            text = self.description.encode()[:4096]
            self._opt_reply(c, opt, _REP_INFO, struct.pack(">H", _INFO_DESCRIPTION) + text)
        # The defaults but for the preferred size (a region): sent unasked too, which is allowed.
        self._opt_reply(c, opt, _REP_INFO, struct.pack(">HIII", _INFO_BLOCK_SIZE, 1, self._preferred, MAX_PAYLOAD))
        self._opt_reply(c, opt, _REP_ACK)
        return True

    @staticmethod
    def _opt_reply(c: _Client, opt: int, kind: int, data: bytes = b"") -> None:
        c.send(_OPT_REPLY.pack(_OPT_REPLY_MAGIC, opt, kind, len(data)) + data)

    # -- transmission -------------------------------------------------------------------------------
    def _transmit(self, c: _Client) -> None:
        header = memoryview(bytearray(_REQUEST.size))
        try:
            while True:
                c.recv_into(header)
                magic, flags, cmd, handle, offset, length = _REQUEST.unpack(header)
                if magic != _REQUEST_MAGIC:
                    raise _Closed(f"bad request magic {magic:#x}")
                if cmd == _CMD_DISC:
                    return
                if cmd == _CMD_WRITE:
                    if length > MAX_PAYLOAD:
                        if length > _DISCARD_LIMIT:
                            raise _Closed(f"WRITE of {length} bytes")
                        c.discard(length)
                        self._reply(c, handle, _EINVAL)
                        continue
                    c.recv_into(c.buffer(length)[16 : 16 + length])
                if cmd == _CMD_READ:
                    err = self._read(c, flags, offset, length)
                    if err == 0:
                        view = c.view
                        _REPLY.pack_into(view, 0, _SIMPLE_REPLY_MAGIC, 0, handle)
                        c.send(view[: 16 + length])
                        continue
                else:
                    err = self._execute(c, cmd, flags, offset, length)
                self._reply(c, handle, err)
        finally:
            header.release()

    @staticmethod
    def _reply(c: _Client, handle: int, err: int) -> None:
        c.send(_REPLY.pack(_SIMPLE_REPLY_MAGIC, err, handle))

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """The error for a request before it reaches the target (0: none)."""
        if flags & ~_ALLOWED_FLAGS.get(cmd, _CMD_FLAG_FUA):
            return _EINVAL
        if cmd in (_CMD_WRITE, _CMD_TRIM, _CMD_WRITE_ZEROES) and self.readonly:
            return _EPERM
        if offset + length > self.size:
            return _EINVAL
        return 0

    def _read(self, c: _Client, flags: int, offset: int, length: int) -> int:
        """Read into the client's buffer after its 16-byte reply header; returns the error."""
        if length > MAX_PAYLOAD:
            return _EINVAL
        err = self._check(_CMD_READ, flags, offset, length)
        if err:
            return err
        view = c.buffer(length)[16 : 16 + length]
        try:  # the view is not released explicitly: a failed target call's traceback may hold it
            if self._readinto is not None:
                n = self._readinto(offset, view)
                if n != length:
                    raise OSError(errno.EIO, f"readinto returned {n} of {length} bytes")
            else:
                data = self._target.read(offset, length)
                if len(data) != length:
                    raise OSError(errno.EIO, f"read returned {len(data)} of {length} bytes")
                view[:] = data
        except Exception as exc:
            return self._failed(c, _CMD_READ, offset, length, exc)
        return 0

    def _execute(self, c: _Client, cmd: int, flags: int, offset: int, length: int) -> int:
        """Run WRITE (its payload in the client's buffer), FLUSH, TRIM or WRITE_ZEROES; returns the error."""
        if cmd not in _CMD_NAMES:
            _log.debug("NBD: %s: unknown command %d", c.peer, cmd)
            return _EINVAL
        err = self._check(cmd, flags, offset, length)
        if err:
            return err
        try:
            if cmd == _CMD_WRITE:
                self._target.write(offset, c.view[16 : 16 + length])
            elif cmd == _CMD_WRITE_ZEROES:
                if not self._write_zeroes(offset, length):
                    return _ESHUTDOWN
            elif cmd == _CMD_FLUSH:
                if not self.readonly:
                    self._target.flush()
                return 0
            elif cmd == _CMD_TRIM:
                return 0  # advisory, and not done: FUA has nothing to persist
            if flags & _CMD_FLAG_FUA:
                self._target.flush()
        except Exception as exc:
            return self._failed(c, cmd, offset, length, exc)
        return 0

    def _write_zeroes(self, offset: int, length: int) -> bool:
        """Write zeros in chunks aligned to the chunk size; False if the server began stopping."""
        chunk = self._zero_chunk
        if self._zeros is None:
            self._zeros = bytes(chunk)
        zeros = memoryview(self._zeros)
        pos, end = offset, offset + length
        while pos < end:
            if self._stopping:
                return False
            n = min(chunk - pos % chunk, end - pos)
            self._target.write(pos, zeros[:n])
            pos += n
        return True

    def _failed(self, c: _Client, cmd: int, offset: int, length: int, exc: Exception) -> int:
        """Log a failed target call (once per distinct error and connection); its NBD error."""
        err = _nbd_errno(exc)
        what = _CMD_NAMES.get(cmd, str(cmd))
        key = (what, type(exc).__name__, str(exc))
        seen = c.logged.get(key, 0)
        c.logged[key] = seen + 1
        level = logging.WARNING if seen == 0 else logging.DEBUG
        # A traceback only for what the package does not raise on purpose: that is a bug.
        _log.log(level, "NBD: %s: %s of %d bytes at %d failed (error %d): %s: %s", c.peer, what, length, offset,
                 err, type(exc).__name__, exc, exc_info=seen == 0 and not isinstance(exc, (OverlayCacheError, OSError)))
        return err


def _nbd_errno(exc: BaseException) -> int:
    """The NBD error value for an exception from the target."""
    if isinstance(exc, VolumeClosedError):
        return _ESHUTDOWN
    if isinstance(exc, InvalidArgumentError):
        return _EINVAL
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return _ENOSPC
    return _EIO


def _is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidArgumentError(f"cannot resolve {host!r}: {exc}") from exc
    try:
        return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)
    except ValueError:
        return False


def _join(clients: list[_Client], timeout: float) -> None:
    """Join the clients' threads within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    for c in clients:
        if c.thread is not None:
            c.thread.join(max(0.0, deadline - time.monotonic()))
