"""The NBD server against real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) and a raw-socket client.

The clients come from the Debian packages qemu-utils and libnbd-bin; CI installs them, so a missing
one fails the test (with the package to install) rather than skipping it. Everything listens on
loopback, port 0, or on a Unix socket in the test's directory.

Wire values (magics, commands, errors) are spelled out here from the protocol document rather than
imported from the server, so that a wrong constant there cannot hide here.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlaycache import InvalidArgumentError, RegionUnavailableError, Volume
from overlaycache.nbd import MAX_PAYLOAD, NBDServer

SIZE = 4 << 20
REGION = 16384
TIMEOUT = 30  # seconds for any client program

# -- protocol values (NetworkBlockDevice/nbd doc/proto.md) -----------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 5, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA = 1, 2, 4, 8
FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, FLAG_CAN_MULTI_CONN = 32, 64, 256
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA, CMD_FLAG_DF = 1, 4
EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28


def tool(name: str) -> str:
    """The path of a client program; fails (not skips) when it is missing: CI installs them."""
    path = shutil.which(name)
    if path is None:
        package = "libnbd-bin" if name.startswith("nbd") else "qemu-utils"
        pytest.fail(f"{name} is not installed: apt-get install -y {package} (the NBD tests need it)")
    return path


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a client program; on failure the assertion shows its output."""
    proc = subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


class RawClient:
    """A minimal NBD client on a plain socket, for protocol-level checks."""

    def __init__(self, address: tuple[str, int] | str) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=10)
        self.handle = 0

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """Whether the server closed the connection (EOF with nothing pending)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def hello(self, client_flags: int = 3) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        assert flags & 1, "fixed newstyle"
        self.send(struct.pack(">I", client_flags))
        return int(flags)

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the final one (ACK or an error)."""
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, kind, length = struct.unpack(">QIII", self.recv(20))
            assert magic == OPT_REPLY_MAGIC and ropt == opt
            replies.append((kind, self.recv(length)))
            if kind == REP_ACK or kind & (1 << 31):
                return replies

    @staticmethod
    def info_data(name: bytes = b"", requests: tuple[int, ...] = ()) -> bytes:
        return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(requests)}H", len(requests), *requests)

    def go(self, name: bytes = b"") -> tuple[int, int]:
        """Handshake with NBD_OPT_GO; the export's (size, transmission flags)."""
        self.hello()
        replies = self.option(OPT_GO, self.info_data(name, (INFO_BLOCK_SIZE,)))
        assert replies[-1][0] == REP_ACK, replies
        for kind, data in replies:
            if kind == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                size, flags = struct.unpack(">QH", data[2:])
                return int(size), int(flags)
        raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")

    def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> tuple[int, bytes]:
        """Send a request; its (error, payload)."""
        self.handle += 1
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self.handle, offset, length) + data)
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_REPLY_MAGIC and handle == self.handle
        payload = self.recv(length) if cmd == CMD_READ and err == 0 else b""
        return int(err), payload

    def read(self, offset: int, length: int) -> bytes:
        err, data = self.request(CMD_READ, offset, length)
        assert err == 0
        return data

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        return self.request(CMD_WRITE, offset, len(data), data, flags)[0]

    def disconnect(self) -> None:
        """NBD_CMD_DISC: no reply; the server closes."""
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        assert self.closed_by_server()


@pytest.fixture
def layered(tmp_path: Path) -> Iterator[tuple[Volume, bytes]]:
    """A 4 MiB volume with data in the base, a frozen overlay and the top overlay; and its bytes."""
    rng = random.Random(14)
    vol = Volume.create(tmp_path / "vol", SIZE, region_size=REGION)
    try:
        vol.write(0, rng.randbytes(SIZE // 2))
        vol.merge_down()  # into the base
        vol.write(REGION * 3 + 100, rng.randbytes(REGION * 5))
        vol.local_snapshot("T1")  # a frozen overlay
        vol.write(SIZE - REGION * 7 - 11, rng.randbytes(REGION * 4))  # the top overlay, unaligned
        vol.write(REGION * 4, rng.randbytes(REGION))
        vol.flush()
        yield vol, vol.read(0, SIZE)
    finally:
        vol.close()


@pytest.fixture
def server(layered: tuple[Volume, bytes]) -> Iterator[NBDServer]:
    """A writable export of the layered volume on loopback."""
    with NBDServer(layered[0], port=0) as srv:
        yield srv


def address(srv: NBDServer) -> tuple[str, int]:
    assert srv.port is not None
    return ("127.0.0.1", srv.port)


class FakeTarget:
    """A bytearray target that records calls and can be told to fail."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.data = bytearray(b"\x5a" * size)
        self.writes: list[tuple[int, int]] = []
        self.flushes = 0
        self.events: list[str] = []
        self.fail: dict[int, BaseException] = {}  # offset -> exception raised by read/write there
        self.lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        if offset in self.fail:
            raise self.fail[offset]
        with self.lock:
            return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: Any) -> int:
        if offset in self.fail:
            raise self.fail[offset]
        with self.lock:
            self.data[offset : offset + len(data)] = data
            self.writes.append((offset, len(data)))
            self.events.append("write")
        return len(data)

    def flush(self) -> None:
        with self.lock:
            self.flushes += 1
            self.events.append("flush")


# -- real clients ------------------------------------------------------------------------------------
def test_qemu_img_compare_layered_volume(layered: tuple[Volume, bytes], server: NBDServer, tmp_path: Path) -> None:
    _, expected = layered
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    out = run("qemu-img", "info", "--output=json", server.url)
    assert json.loads(out.stdout)["virtual-size"] == SIZE
    out = run("qemu-img", "compare", "-s", "-f", "raw", "-F", "raw", server.url, str(raw))
    assert "identical" in out.stdout
    raw.write_bytes(expected[:-1] + bytes([expected[-1] ^ 1]))  # the check can fail
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", server.url, str(raw), check=False).returncode == 1


def test_nbdcopy_equals_volume(layered: tuple[Volume, bytes], server: NBDServer, tmp_path: Path) -> None:
    out = tmp_path / "copy.raw"
    out.touch()
    run("nbdcopy", server.url, str(out))  # several connections: the export has CAN_MULTI_CONN
    assert out.read_bytes() == layered[1]


CHILD = """
import sys
from overlaycache import Volume
from overlaycache.nbd import NBDServer
vol = Volume.open(sys.argv[1])
server = NBDServer(vol, port=0)
server.start()
print(server.port, flush=True)
sys.stdin.readline()
server.stop()
print("stopped", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("how", ["qemu-io", "flush", "stop"])
def test_write_is_durable(tmp_path: Path, how: str) -> None:
    """A write through NBD is in the volume after the server process dies without closing it (as a
    crash would leave it: only what was committed by a flush is there). "qemu-io": its default
    (writethrough: FUA on the write, a FLUSH at exit), then stop(); "flush": qemu-io in writeback mode,
    killed without stop(), so only its NBD_CMD_FLUSH makes the write durable; "stop": a raw write
    without flush or FUA, made durable by stop() alone."""
    path = tmp_path / "vol"
    before = random.Random(1).randbytes(SIZE)
    with Volume.create(path, SIZE, region_size=REGION) as vol:
        vol.write(0, before)
    child = subprocess.Popen([sys.executable, "-P", "-c", CHILD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        if how == "flush":
            run("qemu-io", "-f", "raw", "-t", "writeback", "-c", "write -P 0xab 4096 65536", f"nbd://127.0.0.1:{port}")
        else:
            if how == "qemu-io":
                run("qemu-io", "-f", "raw", "-c", "write -P 0xab 4096 65536", f"nbd://127.0.0.1:{port}")
            else:
                with RawClient(("127.0.0.1", port)) as c:
                    c.go()
                    assert c.write(4096, b"\xab" * 65536) == 0
                    c.disconnect()
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "stopped"
        child.send_signal(signal.SIGKILL)  # no close()
        child.wait(TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
    with Volume.open(path) as vol:
        assert vol.read(4096, 65536) == b"\xab" * 65536
        assert vol.read(0, 4096) == before[:4096]
        assert vol.read(69632, SIZE - 69632) == before[69632:]


def test_nbdinfo_readonly_snapshot_image(layered: tuple[Volume, bytes], tmp_path: Path) -> None:
    vol, _ = layered
    snap = vol.local_snapshot("T2")
    vol.write(0, b"\xff" * REGION)  # after the snapshot: not in its image
    with vol.image(snap) as img, NBDServer(img, port=0, description="snapshot T2") as srv:
        assert srv.readonly  # an image has no write()
        info = json.loads(run("nbdinfo", "--json", srv.url).stdout)
        (export,) = info["exports"]
        assert export["export-size"] == SIZE
        assert export["is_read_only"] is True
        assert export["block_size_preferred"] == REGION
        assert export.get("description") == "snapshot T2"
        raw = tmp_path / "t2.raw"
        raw.write_bytes(img.read(0, SIZE))
        run("qemu-img", "compare", "-s", "-f", "raw", "-F", "raw", srv.url, str(raw))
    assert vol.read(0, REGION) == b"\xff" * REGION


def test_two_clients_concurrently(layered: tuple[Volume, bytes], server: NBDServer) -> None:
    """Two qemu-io processes write and verify their own MiB at the same time; then two raw clients
    interleave many small requests on distinct regions."""
    vol, expected = layered
    procs = [subprocess.Popen([tool("qemu-io"), "-f", "raw",
                               "-c", f"write -P {pat:#x} {i << 20} 1M", "-c", f"read -P {pat:#x} {i << 20} 1M",
                               "-c", f"read -P {pat:#x} {i << 20} 4096", server.url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, pat in ((0, 0x11), (1, 0x22))]
    for p in procs:
        out, _ = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0 and "fail" not in out.lower(), out
    assert vol.read(0, 1 << 20) == b"\x11" * (1 << 20)
    assert vol.read(1 << 20, 1 << 20) == b"\x22" * (1 << 20)
    assert vol.read(2 << 20, 2 << 20) == expected[2 << 20 :]

    errors: list[BaseException] = []

    def worker(base: int, seed: int) -> None:
        try:
            rng = random.Random(seed)
            with RawClient(address(server)) as c:
                c.go()
                for _ in range(40):
                    off = base + rng.randrange(0, 8 * REGION - 5000)
                    data = rng.randbytes(rng.randrange(1, 5000))
                    assert c.write(off, data) == 0
                    assert c.read(off, len(data)) == data
                c.disconnect()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(base, seed)) for base, seed in ((2 << 20, 1), (3 << 20, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert not errors, errors


def test_unix_socket_export(layered: tuple[Volume, bytes], tmp_path: Path) -> None:
    vol, expected = layered
    path = tmp_path / "nbd.sock"
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    with NBDServer(vol, socket_path=path, readonly=True) as srv:
        assert srv.port is None and srv.url == f"nbd+unix:///?socket={path}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        run("qemu-img", "compare", "-s", "-f", "raw", "-F", "raw", f"nbd+unix:///?socket={path}", str(raw))
        with RawClient(str(path)) as c:
            assert c.go() == (SIZE, FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA
                              | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN)
            assert c.read(SIZE - 100, 100) == expected[-100:]
        with pytest.raises(InvalidArgumentError, match="listening"):
            NBDServer(vol, socket_path=path).start()
    assert not path.exists()
    # A stale socket left by a dead server is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with NBDServer(vol, socket_path=path) as srv:
        with RawClient(str(path)) as c:
            assert c.go()[0] == SIZE


def test_readonly_export_refuses_writes(layered: tuple[Volume, bytes]) -> None:
    vol, expected = layered
    with NBDServer(vol, port=0, readonly=True) as srv:
        # qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing ("Permission denied").
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0xcd 0 4096", srv.url, check=False)
        assert out.returncode != 0 and "permission denied" in out.stderr.lower(), out
        with RawClient(address(srv)) as c:
            size, flags = c.go()
            assert flags & FLAG_READ_ONLY
            assert c.write(0, b"\xcd" * 4096) == EPERM
            assert c.request(CMD_TRIM, 0, 4096)[0] == EPERM
            assert c.request(CMD_WRITE_ZEROES, 0, 4096)[0] == EPERM
            assert c.request(CMD_FLUSH)[0] == 0
            assert c.read(0, 4096) == expected[:4096]
    assert vol.read(0, SIZE) == expected


def test_volume_opened_readonly_is_a_readonly_export(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    with Volume.create(path, SIZE, region_size=REGION) as vol:
        vol.write(0, b"abc")
    with Volume.open(path, readonly=True) as vol, NBDServer(vol, port=0) as srv:
        assert srv.readonly
        with RawClient(address(srv)) as c:
            assert c.go()[1] & FLAG_READ_ONLY
            assert c.write(0, b"xyz") == EPERM
            assert c.read(0, 3) == b"abc"


# -- protocol robustness (raw client) -----------------------------------------------------------------
def test_bad_magic_closes_only_that_connection(layered: tuple[Volume, bytes], server: NBDServer) -> None:
    _, expected = layered
    with RawClient(address(server)) as good, RawClient(address(server)) as bad:
        good.go()
        bad.go()
        bad.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
        assert bad.closed_by_server()
        assert good.read(0, 512) == expected[:512]  # an open connection goes on
    with RawClient(address(server)) as c:  # and new ones are accepted
        c.go()
        assert c.read(4096, 512) == expected[4096:4608]
    with RawClient(address(server)) as c:  # a bad option magic, too
        c.hello()
        c.send(struct.pack(">QII", 0x1234, OPT_GO, 0))
        assert c.closed_by_server()
    with RawClient(address(server)) as c:  # unknown client flags
        c.hello(client_flags=1 << 7)
        assert c.closed_by_server()
    run("qemu-img", "info", server.url)


def test_disconnect_mid_write_payload(layered: tuple[Volume, bytes], server: NBDServer,
                                      caplog: pytest.LogCaptureFixture) -> None:
    vol, expected = layered
    offset = REGION * 10
    with caplog.at_level(logging.INFO, logger="overlaycache.nbd"):
        with RawClient(address(server)) as c:
            c.go()
            c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, CMD_FLAG_FUA, CMD_WRITE, 7, offset, 65536) + b"\xee" * 1000)
        with RawClient(address(server)) as c:  # also in the middle of a request header
            c.go()
            c.send(struct.pack(">IHHQ", REQUEST_MAGIC, 0, CMD_WRITE, 8))
        deadline = time.monotonic() + 10
        while sum("middle of a message" in r.getMessage() for r in caplog.records) < 2:
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.01)
    with RawClient(address(server)) as c:
        c.go()
        assert c.read(offset, 65536) == expected[offset : offset + 65536]  # nothing partial written
        assert c.request(CMD_FLUSH)[0] == 0
    assert vol.read(0, SIZE) == expected


def test_client_gone_while_reply_is_sent(server: NBDServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="overlaycache.nbd"):
        for _ in range(3):
            with RawClient(address(server)) as c:
                c.go()
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, SIZE))
                c.recv(100)  # then close with the rest unread: the server's send fails
        deadline = time.monotonic() + 10
        while sum("connection lost" in r.getMessage() for r in caplog.records) < 3:
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.01)
    run("qemu-img", "info", server.url)


def test_out_of_range_and_oversized_requests(layered: tuple[Volume, bytes], server: NBDServer) -> None:
    vol, expected = layered
    with RawClient(address(server)) as c:
        c.go()
        assert c.request(CMD_READ, SIZE - 4096, 8192) == (EINVAL, b"")
        assert c.request(CMD_READ, SIZE + 1, 0) == (EINVAL, b"")
        assert c.request(CMD_READ, (1 << 64) - 512, 1024) == (EINVAL, b"")
        assert c.write(SIZE - 100, b"\x01" * 200) == EINVAL
        assert c.request(CMD_WRITE_ZEROES, SIZE - 100, 200)[0] == EINVAL
        assert c.request(CMD_TRIM, SIZE, 1)[0] == EINVAL
        assert c.request(CMD_READ, 0, MAX_PAYLOAD + 1) == (EINVAL, b"")
        assert c.write(0, b"\x02" * (MAX_PAYLOAD + 1)) == EINVAL  # payload read and dropped
        assert c.request(99, 0, 0)[0] == EINVAL  # unknown command
        assert c.request(CMD_READ, 0, 512, flags=CMD_FLAG_DF)[0] == EINVAL  # flag not negotiated
        assert c.request(CMD_READ, SIZE - 512, 512) == (0, expected[-512:])  # still usable
        assert c.request(CMD_READ, SIZE, 0) == (0, b"")
    assert vol.read(0, SIZE) == expected
    with RawClient(address(server)) as c:  # an absurd payload: closed without reading it
        c.go()
        c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 0xFFFFFFFF))
        assert c.closed_by_server()


def test_options(layered: tuple[Volume, bytes]) -> None:
    vol, expected = layered
    with NBDServer(vol, port=0, name="vol1", description="the volume") as srv:
        assert srv.url.endswith("/vol1")
        with RawClient(address(srv)) as c:
            c.hello()
            assert c.option(OPT_LIST) == [(REP_SERVER, struct.pack(">I", 4) + b"vol1"), (REP_ACK, b"")]
            assert c.option(OPT_LIST, b"x")[-1][0] == REP_ERR_INVALID
            assert c.option(OPT_STRUCTURED_REPLY) == [(REP_ERR_UNSUP, b"")]
            assert c.option(OPT_STARTTLS) == [(REP_ERR_UNSUP, b"")]
            assert c.option(0x4242, b"some data") == [(REP_ERR_UNSUP, b"")]
            assert c.option(OPT_INFO, c.info_data(b"other"))[-1][0] == REP_ERR_UNKNOWN
            assert c.option(OPT_INFO, b"\0\0\0\x09abc")[-1][0] == REP_ERR_INVALID
            replies = c.option(OPT_INFO, c.info_data(b"vol1", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)))
            infos = {struct.unpack(">H", d[:2])[0]: d[2:] for kind, d in replies if kind == REP_INFO}
            assert replies[-1] == (REP_ACK, b"")
            assert struct.unpack(">QH", infos[INFO_EXPORT])[0] == SIZE
            assert infos[INFO_NAME] == b"vol1" and infos[INFO_DESCRIPTION] == b"the volume"
            assert struct.unpack(">III", infos[INFO_BLOCK_SIZE]) == (1, REGION, MAX_PAYLOAD)
            assert c.option(OPT_GO, c.info_data(b"vol1"))[-1][0] == REP_ACK
            assert c.read(0, 100) == expected[:100]
        with RawClient(address(srv)) as c:  # the old way in: NBD_OPT_EXPORT_NAME, with the zeros
            c.hello(client_flags=1)
            c.send(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 4) + b"vol1")
            size, flags = struct.unpack(">QH", c.recv(10))
            assert size == SIZE and flags & FLAG_SEND_FLUSH and c.recv(124) == bytes(124)
            assert c.read(100, 100) == expected[100:200]
        with RawClient(address(srv)) as c:  # an unknown name ends the session (no way to say no)
            c.hello()
            c.send(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 5) + b"other")
            assert c.closed_by_server()
        with RawClient(address(srv)) as c:
            c.hello()
            assert c.option(OPT_ABORT) == [(REP_ACK, b"")]
            assert c.closed_by_server()
        info = json.loads(run("nbdinfo", "--json", "--list", srv.url).stdout)
        assert [e["export-name"] for e in info["exports"]] == ["vol1"]


def test_target_errors_map_to_nbd_errors(caplog: pytest.LogCaptureFixture) -> None:
    target = FakeTarget()
    target.fail = {4096: RegionUnavailableError("region 1 lost", [1]),
                   8192: InvalidArgumentError("bad"),
                   12288: RuntimeError("a bug in the target"),
                   16384: OSError(28, "No space left on device")}
    with NBDServer(target, port=0) as srv, RawClient(address(srv)) as c:
        c.go()
        with caplog.at_level(logging.DEBUG, logger="overlaycache.nbd"):
            for _ in range(3):
                assert c.request(CMD_READ, 4096, 512) == (EIO, b"")
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "region 1 lost" in warnings[0].getMessage()  # logged once
        assert c.request(CMD_READ, 8192, 512) == (EINVAL, b"")
        assert c.request(CMD_READ, 12288, 512) == (EIO, b"")
        assert c.write(16384, b"x" * 512) == ENOSPC
        assert c.write(0, b"y" * 512) == 0
        assert c.read(0, 512) == b"y" * 512  # the connection goes on
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert [str(r.exc_info[1]) for r in tracebacks if r.exc_info] == ["a bug in the target"]


def test_unavailable_region_of_a_volume_is_eio(layered: tuple[Volume, bytes], server: NBDServer) -> None:
    vol, expected = layered
    vol.mark_unavailable([2])
    with RawClient(address(server)) as c:
        c.go()
        assert c.request(CMD_READ, 2 * REGION + 10, 100) == (EIO, b"")
        assert c.read(0, 2 * REGION) == expected[: 2 * REGION]
    out = run("qemu-io", "-f", "raw", "-r", "-c", f"read 0 {3 * REGION}", server.url, check=False)
    assert "error" in (out.stdout + out.stderr).lower(), out


def test_fua_flush_trim_and_write_zeroes() -> None:
    target = FakeTarget(8 << 20)
    with NBDServer(target, port=0) as srv, RawClient(address(srv)) as c:
        size, flags = c.go()
        assert flags & (FLAG_SEND_FUA | FLAG_SEND_FLUSH | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN)
        assert not flags & FLAG_READ_ONLY
        assert c.write(100, b"a" * 10) == 0 and target.flushes == 0
        assert c.write(200, b"b" * 10, flags=CMD_FLAG_FUA) == 0
        assert target.events[-2:] == ["write", "flush"]  # flushed before the reply
        assert c.request(CMD_FLUSH)[0] == 0 and target.flushes == 2
        target.writes.clear()
        assert c.request(CMD_TRIM, 0, 1 << 20)[0] == 0  # advisory: nothing done
        assert target.writes == [] and target.data[100:110] == b"a" * 10
        start, length = (1 << 20) - 5, (3 << 20) + 10
        assert c.request(CMD_WRITE_ZEROES, start, length, flags=CMD_FLAG_FUA)[0] == 0
        assert target.data[start : start + length] == bytes(length)
        assert target.data[start - 1] == 0x5A and target.data[start + length] == 0x5A
        assert max(n for _, n in target.writes) <= 1 << 20  # bounded chunks
        assert sum(n for _, n in target.writes) == length and target.events[-1] == "flush"
    assert target.flushes == 4  # and stop() flushed


def test_qemu_io_zero_and_discard(layered: tuple[Volume, bytes], server: NBDServer) -> None:
    vol, expected = layered
    run("qemu-io", "-f", "raw", "-c", f"write -z {REGION} {3 * REGION}", "-c", "discard 0 4096",
        "-c", f"write -f -P 0x7 {5 * REGION} 512", server.url)
    assert vol.read(REGION, 3 * REGION) == bytes(3 * REGION)
    assert vol.read(0, REGION) == expected[:REGION]  # discard is advisory: data kept
    assert vol.read(5 * REGION, 512) == b"\x07" * 512


def test_stop_finishes_requests_in_progress() -> None:
    class Slow(FakeTarget):
        def __init__(self) -> None:
            super().__init__()
            self.entered = threading.Event()
            self.release = threading.Event()

        def read(self, offset: int, length: int) -> bytes:
            self.entered.set()
            assert self.release.wait(10)
            return super().read(offset, length)

    target = Slow()
    srv = NBDServer(target, port=0)
    srv.start()
    idle, busy = RawClient(address(srv)), RawClient(address(srv))
    try:
        idle.go()
        busy.go()
        busy.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 4096))
        assert target.entered.wait(10)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        assert idle.closed_by_server()  # a client between requests is let go at once
        time.sleep(0.1)
        assert stopper.is_alive()  # stop() waits for the read in progress
        target.release.set()
        assert struct.unpack(">IIQ", busy.recv(16)) == (SIMPLE_REPLY_MAGIC, 0, 1)
        assert busy.recv(4096) == b"\x5a" * 4096  # answered in full
        assert busy.closed_by_server()
        stopper.join(10)
        assert not stopper.is_alive() and target.flushes == 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address(srv), timeout=5).close()
        srv.stop()  # idempotent
    finally:
        target.release.set()
        idle.close()
        busy.close()
        srv.stop()


def test_serve_forever_until_stopped(layered: tuple[Volume, bytes]) -> None:
    srv = NBDServer(layered[0], port=0, readonly=True)
    thread = threading.Thread(target=srv.serve_forever)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while srv.port is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        run("qemu-img", "info", srv.url)
    finally:
        srv.stop()
        thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(InvalidArgumentError):
        srv.start()


def test_max_clients() -> None:
    with NBDServer(FakeTarget(), port=0, max_clients=1) as srv, RawClient(address(srv)) as first:
        first.go()
        with RawClient(address(srv)) as second:
            assert second.closed_by_server()
        assert first.read(0, 4) == b"\x5a" * 4


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_refuses_non_loopback_host(layered: tuple[Volume, bytes], host: str) -> None:
    with pytest.raises(InvalidArgumentError, match="loopback"):
        NBDServer(layered[0], host=host)
    NBDServer(layered[0], host=host, allow_remote=True)  # explicit: allowed (not started here)
    NBDServer(layered[0], host="localhost")
    NBDServer(layered[0], host="::1")


def test_bad_targets() -> None:
    class NoFlush:
        size = 4096

        def read(self, offset: int, length: int) -> bytes:
            return bytes(length)

        def write(self, offset: int, data: bytes) -> None:
            pass

    with pytest.raises(InvalidArgumentError, match="flush"):
        NBDServer(NoFlush(), port=0)
    assert NBDServer(NoFlush(), port=0, readonly=True).readonly
    with pytest.raises(InvalidArgumentError, match="read"):
        NBDServer(object(), port=0)  # type: ignore[arg-type]
