"""Retention of PIT snapshots: which ones a tiered policy keeps (the seed's snapshot collapsing).

Snapshots taken every few minutes are, as they age, represented by fewer and fewer of them: one per
15 minutes, then per hour, then per day. A policy is a list of *tiers*, ``keep_last`` and pinned
labels:

* ``I@H`` keeps, among the snapshots whose age (``now - created_at``) is at most ``H``, the newest
  of each interval bucket ``floor(created_at / I)``. Buckets are aligned to the Unix epoch (UTC),
  so a 1-day bucket runs from midnight UTC to midnight UTC whatever the machine's time zone. The
  newest snapshot of a bucket represents it: it is the state at the end of that interval, with
  every change of the bucket in it (the seed's synthetic snapshot).
* ``all@H`` keeps every snapshot of age at most ``H``.
* ``keep_last=N`` keeps the ``N`` newest (by seq), whatever their age: if PITs stop being taken,
  the history does not age away entirely.
* A snapshot whose label is pinned is always kept.
* A snapshot no rule keeps is dropped. A snapshot dated in the future (a clock set wrong) has age
  0: every tier keeps it until it is in the past.

Unlike restic's ``forget --keep-daily N``, which counts the last ``N`` days that have snapshots,
horizons here are durations back from ``now``: a policy keeps what it says for the time it says,
and :meth:`RetentionPolicy.decide` tells for each snapshot which rules keep it, so a preview
(``select``/``decide`` are pure functions, no store involved) shows exactly what a collapse does.

Durations are a number with a unit: ``s``, ``m``, ``h``, ``d`` (86,400 s), ``w`` (7 d); decimals
are allowed (``1.5h``, ``0.5s``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from overlaycache.errors import InvalidArgumentError
from overlaycache.snapshots import Snapshot

__all__ = ["Decision", "RetentionPolicy", "Tier", "parse_duration"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])\s*$")


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration such as ``"15m"``, ``"1.5h"`` or ``"90d"`` (a number: seconds).

    Parameters
    ----------
    text : str or float or int
        A number and a unit (``s``, ``m``, ``h``, ``d`` = 86,400 s, ``w`` = 7 d), or a number of
        seconds.

    Returns
    -------
    float
        Seconds, > 0.

    Raises
    ------
    InvalidArgumentError
        Not a positive, finite duration with one of the units s, m, h, d, w.
    """
    if isinstance(text, bool):
        raise InvalidArgumentError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str):
        match = _DURATION.match(text)
        if match is None:
            raise InvalidArgumentError(f"not a duration: {text!r} (a number and a unit: s, m, h, d or w)")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise InvalidArgumentError(f"not a duration: {text!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"a duration must be positive and finite, got {text!r}")
    return value


@dataclass(frozen=True)
class Tier:
    """One rule of a policy: ``every`` (seconds; None: every snapshot) for ``within`` seconds.

    ``str(tier)`` is its spec, e.g. ``"15m@1d"`` or ``"all@3h"``.

    Attributes
    ----------
    every : float or None
        Keep the newest snapshot of each interval of this many seconds (aligned to the Unix
        epoch); None keeps every snapshot.
    within : float
        Among the snapshots at most this many seconds old.
    """

    every: float | None
    within: float

    def __str__(self) -> str:
        return f"{'all' if self.every is None else _fmt(self.every)}@{_fmt(self.within)}"


def _fmt(seconds: float) -> str:
    for unit in ("w", "d", "h", "m", "s"):
        n = seconds / _UNITS[unit]
        if n >= 1 and abs(n - round(n)) < 1e-9:
            return f"{round(n)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Decision:
    """What a policy says of one snapshot: kept or not, and by which rules.

    Attributes
    ----------
    snapshot : Snapshot
        The snapshot.
    reasons : tuple of str
        The rules that keep it (``"last 3"``, ``"pinned 'golden'"``, ``"15m@1d"``, ...); empty when
        it is dropped.
    """

    snapshot: Snapshot
    reasons: tuple[str, ...]

    @property
    def kept(self) -> bool:
        """Whether any rule keeps it."""
        return bool(self.reasons)


class RetentionPolicy:
    """A tiered retention policy (see the module docstring).

    Parameters
    ----------
    tiers : sequence of Tier or (every, within) pairs
        ``every`` is ``"all"`` (or None) or a duration; ``within`` a duration.
    keep_last : int
        The newest snapshots always kept.
    pinned : iterable of str
        Labels always kept.

    Raises
    ------
    InvalidArgumentError
        A bad tier or duration, a negative ``keep_last``, or a policy that keeps nothing.
    """

    def __init__(self, tiers: Sequence[Tier | tuple[object, object]] = (), keep_last: int = 0,
                 pinned: Iterable[str] = ()) -> None:
        if type(keep_last) is not int or keep_last < 0:
            raise InvalidArgumentError(f"keep_last must be an int >= 0, got {keep_last!r}")
        if isinstance(pinned, str):
            raise InvalidArgumentError("pinned is a collection of labels, not one string")
        self.pinned = frozenset(pinned)
        if not all(isinstance(p, str) and p for p in self.pinned):
            raise InvalidArgumentError(f"pinned labels must be non-empty strings, got {sorted(map(repr, self.pinned))}")
        out = []
        for t in tiers:
            if isinstance(t, Tier):
                out.append(Tier(None if t.every is None else parse_duration(t.every), parse_duration(t.within)))
                continue
            if not isinstance(t, tuple) or len(t) != 2:
                raise InvalidArgumentError(f"a tier is (every, within), got {t!r}")
            every, within = t
            out.append(Tier(None if every in (None, "all") else parse_duration(every),  # type: ignore[arg-type]
                            parse_duration(within)))  # type: ignore[arg-type]
        self.tiers = tuple(out)
        self.keep_last = keep_last
        if not self.tiers and not keep_last and not self.pinned:
            raise InvalidArgumentError("a retention policy must keep something (tiers, keep_last or pinned)")

    @classmethod
    def parse(cls, spec: str, keep_last: int = 0, pinned: Iterable[str] = ()) -> RetentionPolicy:
        """A policy from ``"all@3h,15m@1d,1h@7d,1d@90d"`` (tiers separated by commas).

        Parameters
        ----------
        spec : str
            Tiers ``EVERY@WITHIN`` separated by commas; ``EVERY`` is ``all`` or a duration,
            ``WITHIN`` a duration (see :func:`parse_duration`). May be empty when ``keep_last``
            or ``pinned`` keeps something.
        keep_last, pinned
            As for :class:`RetentionPolicy`.

        Returns
        -------
        RetentionPolicy

        Raises
        ------
        InvalidArgumentError
            The spec is not a comma-separated list of ``EVERY@WITHIN``.
        """
        if not isinstance(spec, str):
            raise InvalidArgumentError(f"a policy spec is a string, got {spec!r}")
        tiers: list[tuple[object, object]] = []
        for part in spec.split(","):
            if not part.strip():
                continue
            every, sep, within = part.strip().partition("@")
            if not sep:
                raise InvalidArgumentError(f"{part.strip()!r}: a tier is EVERY@WITHIN, e.g. 15m@1d or all@3h")
            tiers.append((every.strip(), within.strip()))
        return cls(tiers, keep_last, pinned)

    def __str__(self) -> str:
        extra = [f"keep_last={self.keep_last}"] if self.keep_last else []
        extra += [f"pinned={sorted(self.pinned)}"] if self.pinned else []
        return ",".join(str(t) for t in self.tiers) + (" " + " ".join(extra) if extra else "")

    def __repr__(self) -> str:
        return f"RetentionPolicy({str(self)!r})"

    def decide(self, snapshots: Iterable[Snapshot], now: float) -> list[Decision]:
        """For each snapshot (in seq order), the rules that keep it (none: it is dropped).

        Pure: nothing is read or changed; :meth:`select` keeps the kept ones.

        Parameters
        ----------
        snapshots : iterable of Snapshot
            A volume's PIT snapshots (``store.snapshots(volume_id)``).
        now : float
            The time ages are measured from, in seconds since the epoch.

        Returns
        -------
        list of Decision
            One per snapshot, in seq order.
        """
        snaps = sorted(snapshots, key=lambda s: s.seq)
        reasons: dict[int, list[str]] = {s.seq: [] for s in snaps}
        for s in snaps[max(0, len(snaps) - self.keep_last):] if self.keep_last else []:
            reasons[s.seq].append(f"last {self.keep_last}")
        for s in snaps:
            if s.label is not None and s.label in self.pinned:
                reasons[s.seq].append(f"pinned {s.label!r}")
        for tier in self.tiers:
            young = [s for s in snaps if max(0.0, now - s.created_at) <= tier.within]
            if tier.every is None:
                for s in young:
                    reasons[s.seq].append(str(tier))
                continue
            newest: dict[int, Snapshot] = {}
            for s in young:
                bucket = math.floor(s.created_at / tier.every)
                best = newest.get(bucket)
                if best is None or (s.created_at, s.seq) > (best.created_at, best.seq):
                    newest[bucket] = s
            for s in newest.values():
                reasons[s.seq].append(str(tier))
        return [Decision(s, tuple(reasons[s.seq])) for s in snaps]

    def select(self, snapshots: Iterable[Snapshot], now: float) -> list[Snapshot]:
        """The snapshots this policy keeps at time ``now``, in seq order.

        Parameters
        ----------
        snapshots : iterable of Snapshot
            A volume's PIT snapshots.
        now : float
            The time ages are measured from, in seconds since the epoch.

        Returns
        -------
        list of Snapshot
        """
        return [d.snapshot for d in self.decide(snapshots, now) if d.kept]
