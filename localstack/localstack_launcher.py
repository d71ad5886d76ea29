"""Run LocalStack's runtime (``python -m localstack.runtime.main``) with every bind kept on loopback.

Run with the LocalStack venv's interpreter, by path, never imported by the project. LocalStack's
default ("twisted") gateway (4.x and 2026.x) ignores the host part of ``GATEWAY_LISTEN`` for IPv4
(``TCP4ServerEndpoint(reactor, port)``, a TODO upstream) and so listens on 0.0.0.0. This wrapper
guards ``socket.bind`` before LocalStack is imported: a wildcard address becomes the loopback one of
the same family, and any other non-loopback address is refused, so no listener of this process can
ever be reachable from outside the machine, whatever LocalStack starts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import runpy
import socket
import sys
from typing import Any

LOG = logging.getLogger("overlaycache.localstack_launcher")

# This file lives in a directory named "localstack": keep it off sys.path so that it can never
# shadow the real package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

_original_bind = socket.socket.bind


def _loopback_only(address: Any, family: int) -> Any:
    """Return ``address`` with a wildcard host replaced by loopback; raise for other hosts."""
    if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return address
    host = address[0]
    if host in ("", "0.0.0.0", "::", "::0"):
        new_host = "127.0.0.1" if family == socket.AF_INET else "::1"
        LOG.info("binding %s instead of wildcard %r (port %s)", new_host, host, address[1])
        return (new_host, *address[1:])
    try:
        loopback = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise PermissionError(f"refusing to bind non-loopback address {host!r}")
    return address


def _guarded_bind(self: socket.socket, address: Any) -> None:
    _original_bind(self, _loopback_only(address, self.family))


socket.socket.bind = _guarded_bind  # type: ignore[method-assign, assignment]

if __name__ == "__main__":
    runpy.run_module("localstack.runtime.main", run_name="__main__", alter_sys=True)
