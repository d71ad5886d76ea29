"""Leases: a PIT in use is pinned on the store until a time, so that a collapse keeps it.

A volume serving a distributed overlay reads the regions it lost from its PIT: it takes a lease on
that PIT when the overlay begins, and renews it while the overlay lasts. A lease is one immutable
object whose key names the PIT, the expiry and the holder
(:func:`~overlaycache.remote.layout.lease_key`): taking or renewing one is a conditional PUT, which
the primary's credentials allow, and a collapse (with its own credentials) deletes the expired ones.
"""

from __future__ import annotations

import re
import socket
import time

from overlaycache.errors import ObjectExistsError
from overlaycache.remote.layout import lease_key, leases_prefix, parse_lease_key
from overlaycache.store.base import ObjectStore

__all__ = ["LEASE_TTL", "active_leases", "expired_leases", "holder_name", "take_lease"]

#: How long a lease lasts unless renewed (seconds).
LEASE_TTL = 7 * 86400.0


def holder_name(volume_id: str) -> str:
    """A lease holder's name for a volume on this machine: host name and the volume's id."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:60] or "host"
    return f"{host}.{volume_id[:16]}"


def take_lease(store: ObjectStore, volume_id: str, snapshot: str, holder: str, ttl: float = LEASE_TTL,
               now: float | None = None) -> float:
    """Pin PIT ``snapshot`` for ``ttl`` seconds; returns the expiry (seconds since the epoch).

    Raises
    ------
    StoreError
        The lease could not be stored.
    """
    expires = (time.time() if now is None else now) + ttl
    body = f'{{"holder": "{holder}", "snapshot": "{snapshot}", "expires": {int(expires)}}}'.encode()
    try:
        store.put(lease_key(volume_id, snapshot, expires, holder), body, if_absent=True)
    except ObjectExistsError:
        pass  # the same lease, taken within the same second
    return float(int(expires))


def _leases(store: ObjectStore, volume_id: str) -> list[tuple[str, str, float, str]]:
    out = []
    for key in store.list(leases_prefix(volume_id)):
        parsed = parse_lease_key(key)
        if parsed is not None:
            out.append((key, *parsed))
    return out


def active_leases(store: ObjectStore, volume_id: str, now: float) -> dict[str, list[tuple[str, float]]]:
    """Per PIT id, the holders of its leases that have not expired at ``now``, and until when."""
    out: dict[str, list[tuple[str, float]]] = {}
    for _key, snapshot, expires, holder in _leases(store, volume_id):
        if expires > now:
            out.setdefault(snapshot, []).append((holder, expires))
    return out


def expired_leases(store: ObjectStore, volume_id: str, now: float) -> list[str]:
    """Keys of the leases that expired before ``now``."""
    return [key for key, _snapshot, expires, _holder in _leases(store, volume_id) if expires <= now]
