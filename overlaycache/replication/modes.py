"""The replication modes as policy objects: how changes reach the secondary.

``sync``
    A write is acknowledged once its regions are stored on the secondary; the background shipper
    only drains what piled up while the secondary was unreachable (degraded).
``async``
    Writes are acknowledged locally; a background shipper drains the durable replication map,
    with optional back-pressure (``max_lag_regions``).
``periodic``
    A consistent PIT every ``period`` seconds when something changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from overlaycache.errors import InvalidArgumentError

MODES = ("sync", "async", "periodic")


@dataclass(frozen=True)
class Mode:
    """A replication mode.

    Attributes
    ----------
    name : str
        "sync", "async" or "periodic".
    period : float or None
        Seconds between PITs (periodic only).
    """

    name: str
    period: float | None = None

    @property
    def ships_on_write(self) -> bool:
        """Whether a write ships its regions before it is acknowledged."""
        return self.name == "sync"

    @property
    def periodic(self) -> bool:
        """Whether a timer publishes PITs (instead of a shipper draining the map)."""
        return self.name == "periodic"

    @property
    def throttles(self) -> bool:
        """Whether writes wait for the lag to fall under ``max_lag_regions``."""
        return self.name != "periodic"

    def ships_in_background(self, degraded: bool) -> bool:
        """Whether the background shipper drains the pending regions now."""
        return self.name != "sync" or degraded


def mode_for(name: object, period: float | None) -> Mode:
    """The mode called ``name``, checked.

    Raises
    ------
    InvalidArgumentError
        Unknown mode, or periodic without a period > 0.
    """
    if name not in MODES:
        raise InvalidArgumentError(f"replication must be one of {MODES} or None, got {name!r}")
    if name == "periodic" and (period is None or not period > 0):
        raise InvalidArgumentError("periodic replication needs period > 0 (seconds)")
    return Mode(str(name), period)
