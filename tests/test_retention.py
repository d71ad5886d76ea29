"""Retention policies: parsing, and the kept set against a reference implementation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaycache.errors import InvalidArgumentError
from overlaycache.retention import RetentionPolicy, parse_duration
from overlaycache.remote.layout import snapshot_id
from overlaycache.snapshots import Snapshot

H, D = 3600.0, 86400.0


def _snap(seq: int, t: float, label: str | None = None) -> Snapshot:
    return Snapshot(snapshot_id(seq), seq, t, label)


def test_durations() -> None:
    assert parse_duration("15m") == 900 and parse_duration("1.5h") == 5400 and parse_duration("0.5s") == 0.5
    assert parse_duration("2w") == 14 * D and parse_duration(" 90d ") == 90 * D and parse_duration(7) == 7
    for bad in ["", "5", "m", "1y", "-1h", "0s", "1.2.3h", "inf", True, None, float("nan"), 0, "1 h h"]:
        with pytest.raises(InvalidArgumentError):
            parse_duration(bad)  # type: ignore[arg-type]


def test_parse_and_keyword_forms_agree() -> None:
    a = RetentionPolicy.parse("all@3h,15m@1d,1h@7d,1d@90d", keep_last=3, pinned=("golden",))
    b = RetentionPolicy([("all", "3h"), ("15m", "1d"), ("1h", "7d"), ("1d", "90d")], keep_last=3, pinned=["golden"])
    assert a.tiers == b.tiers and a.keep_last == b.keep_last and a.pinned == b.pinned
    assert str(a) == "all@3h,15m@1d,1h@1w,1d@90d keep_last=3 pinned=['golden']"
    for bad in ["15m", "15m@", "@1d", "15x@1d", "all@", "1h@1d,,oops"]:
        with pytest.raises(InvalidArgumentError):
            RetentionPolicy.parse(bad)
    with pytest.raises(InvalidArgumentError, match="keep something"):
        RetentionPolicy.parse("")
    with pytest.raises(InvalidArgumentError):
        RetentionPolicy.parse("1h@1d", keep_last=-1)
    with pytest.raises(InvalidArgumentError):
        RetentionPolicy.parse("1h@1d", pinned="golden")


def test_the_readme_example() -> None:
    """5-minute PITs for 10 days; at 'now' the policy keeps: every PIT of the last 3 hours, one per
    15 minutes for a day, one per hour for a week, one per day beyond, the 3 newest, and 'golden'."""
    now = 1_000 * D  # midnight UTC
    snaps = [_snap(i + 1, now - 10 * D + 300 * i, "golden" if i == 7 else None) for i in range(10 * 288)]
    policy = RetentionPolicy.parse("all@3h,15m@1d,1h@7d,1d@90d", keep_last=3, pinned=("golden",))
    kept = policy.select(snaps, now)
    ages = sorted(now - s.created_at for s in kept)
    assert sum(1 for a in ages if a <= 3 * H) == 36  # every PIT of the last 3 hours (the newest is 5 min old)
    # one per 15 minutes back to a day: 96 buckets, of which the last 12 are inside the 3 hours already
    assert sum(1 for a in ages if 3 * H < a <= D) == 96 - 12
    assert sum(1 for a in ages if D < a <= 7 * D) == 6 * 24
    assert sum(1 for a in ages if 7 * D < a) == 3 + 1  # days -8, -9, -10 (its first bucket) and 'golden'
    decisions = {d.snapshot.seq: d.reasons for d in policy.decide(snaps, now)}
    assert decisions[8] == ("pinned 'golden'",)
    assert decisions[len(snaps)] == ("last 3", "all@3h", "15m@1d", "1h@1w", "1d@90d")


def test_future_snapshots_and_empty_input() -> None:
    policy = RetentionPolicy.parse("1d@7d")
    assert policy.select([], 0.0) == []
    future = _snap(1, 10 * D)
    assert policy.select([future], 0.0) == [future]  # age 0: kept


def _reference(snaps: list[Snapshot], now: float, tiers: list[tuple[float | None, float]], keep_last: int,
               pinned: set[str]) -> set[int]:
    """The rule as the issue states it, written plainly."""
    kept: set[int] = set()
    by_seq = sorted(snaps, key=lambda s: s.seq)
    if keep_last:
        kept |= {s.seq for s in by_seq[-keep_last:]}
    kept |= {s.seq for s in snaps if s.label in pinned}
    for every, within in tiers:
        young = [s for s in snaps if now - s.created_at <= within]
        if every is None:
            kept |= {s.seq for s in young}
            continue
        buckets: dict[int, list[Snapshot]] = {}
        for s in young:
            buckets.setdefault(math.floor(s.created_at / every), []).append(s)
        for members in buckets.values():
            kept.add(max(members, key=lambda s: (s.created_at, s.seq)).seq)
    return kept


durations = st.sampled_from([60.0, 300.0, 900.0, H, 6 * H, D, 7 * D])


@settings(max_examples=300, deadline=None)
@given(times=st.lists(st.floats(0, 30 * D), max_size=60),
       tiers=st.lists(st.tuples(st.one_of(st.none(), durations), durations), min_size=1, max_size=4),
       keep_last=st.integers(0, 5), later=st.floats(0, 40 * D), pin=st.integers(0, 3))
def test_select_is_the_rule(times: list[float], tiers: list[tuple[float | None, float]], keep_last: int,
                            later: float, pin: int) -> None:
    snaps = [_snap(i + 1, t, f"L{i % 4}") for i, t in enumerate(times)]
    now = max(times, default=0.0) + later
    pinned = {f"L{pin}"} if pin else set()
    policy = RetentionPolicy(tiers, keep_last, pinned)
    got = policy.select(snaps, now)
    assert [s.seq for s in got] == sorted(s.seq for s in got)
    assert {s.seq for s in got} == _reference(snaps, now, tiers, keep_last, pinned)
    assert policy.select(got, now) == got  # selecting again keeps the same set
