"""Leases: a PIT in use is pinned on the store until a time, so that a collapse keeps it.

A volume serving a distributed overlay reads the regions it lost from its PIT: it takes a lease on
that PIT when the overlay begins, and renews it while the overlay lasts. A lease is one immutable
object whose key names the PIT, the expiry and the holder
(:func:`~overlaycache.remote.layout.lease_key`): taking or renewing one is a conditional PUT, which
the primary's credentials allow, and a collapse (with its own credentials) deletes the expired ones.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time

from overlaycache.errors import ObjectExistsError, StoreError
from overlaycache.remote.layout import lease_key, leases_prefix, parse_lease_key
from overlaycache.store.base import ObjectStore

__all__ = ["LEASE_TTL", "LeaseKeeper", "active_leases", "expired_leases", "holder_name", "take_lease"]

_log = logging.getLogger(__name__)

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


class LeaseKeeper:
    """Keeps a PIT pinned while something reads it: a lease renewed in the background.

    A thread takes a new lease (:func:`take_lease`, ``ttl`` seconds) every ``every`` seconds
    (default a third of ``ttl``) until :meth:`close`; a renewal that fails is logged and tried
    again at the next turn, the last lease holding until :attr:`expires`. Closing does not delete
    the last lease: it simply runs out (a collapse deletes it then).

    Parameters
    ----------
    store : ObjectStore
        The secondary (credentials that may PUT).
    volume_id, snapshot, holder : str
        The volume, the PIT's id and the holder's name (see :func:`holder_name`).
    ttl : float
        Seconds each lease lasts.
    every : float, optional
        Seconds between renewals (default ``ttl / 3``, at least 1).
    take_now : bool
        Take the first lease before returning (its failure raises); otherwise the first renewal
        comes after ``every`` seconds (the caller has taken one).

    Raises
    ------
    StoreError
        ``take_now`` and the first lease could not be stored.
    """

    def __init__(self, store: ObjectStore, volume_id: str, snapshot: str, holder: str, ttl: float,
                 every: float | None = None, take_now: bool = True) -> None:
        self.store, self.volume_id, self.snapshot, self.holder, self.ttl = store, volume_id, snapshot, holder, ttl
        self.every = max(1.0, ttl / 3 if every is None else every)
        self.expires = take_lease(store, volume_id, snapshot, holder, ttl=ttl) if take_now else 0.0
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"oc-lease-{snapshot[-8:]}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.expires = take_lease(self.store, self.volume_id, self.snapshot, self.holder, ttl=self.ttl)
                self.renewals += 1
            except StoreError as exc:
                _log.warning("cannot renew the lease of %s on PIT %s of volume %s (%s); it holds until %s",
                             self.holder, self.snapshot, self.volume_id, exc,
                             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires)))

    def close(self) -> None:
        """Stop renewing (idempotent)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


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
