"""The damage matrix of a volume's objects on the secondary (format v2): every object kind, every
kind of damage.

A store (a :class:`LocalStore` directory, so every object is a plain file) holds two volumes of the
same geometry, A and B, built by the same operations with different bytes, so that their seqs, pack
numbers, PIT ids and tree shapes coincide. Each has four PITs with regions changing between them
(all-zero versions among them, a partial last region, leaves under both nodes of a two-level map
tree), several packs, a collapse record (a first PIT was collapsed away, its pages condemned) and a
lease on its second PIT. The model: per PIT of A, its snapshot record and the bytes of the regions
read.

Each case copies A's objects and damages one of them in one way: a bit flipped, a range zeroed, the
object truncated, swapped with B's object of the same kind and place (same pack number, same PIT
seq, same page level and index), or deleted; positions and lengths are drawn by hypothesis. Then
every public read path must give what the model says or raise an :class:`OverlayCacheError` whose
message names the damaged object (its key, the pack's number, the page's address or the PIT's id),
never other bytes:

* ``store.volume_info()``: the record as written;
* ``store.snapshots()``: every PIT with its id, time and label (only the damaged root may be left
  out);
* ``store.image()`` of every PIT: every region read alone, and a run of adjacent regions at once;
* ``store.check()``, with and without ``read_data``: a problem it reports names the damaged object,
  and with ``read_data`` it reports every damage to what a PIT reaches;
* ``store.collapse()`` over the damage: the PITs still listed after it read as the model says.

A second matrix runs ``store.check(repair=True, read_data=True)`` on the damaged copy, then lists
and reads every PIT again, and checks once more: a PIT reported repaired must be whole.

Each bug this matrix found is pinned by a test at the end (each failed before its fix):

* the volume record had no checksum and its id was not compared with its key: another volume's
  record, or one with a digit flipped, was taken as this one's;
* a deleted volume record made ``check``, ``collapse`` and ``volume_info`` say there is no such
  volume, naming no object, while its PITs were listed and read;
* ``check`` reported a missing pack, or another volume's pack in its place, naming no pack; a
  pack's header was not compared with its key;
* a repair rebuilt damaged PITs with the volume record's geometry, not the roots';
* a repair rebuilt a PIT that used a damaged, missing or foreign pack from the other packs (older
  versions, zeros or the other volume's bytes, with no error): it now refuses while a pack is
  damaged or missing;
* a repair of a damaged map page kept the damaged object under the page's address;
* a repair of another volume's root found in a PIT's place kept that root's label and time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaycache import LocalStore, Volume
from overlaycache.errors import OverlayCacheError
from overlaycache.remote.catalog import Catalog
from overlaycache.remote.layout import (
    decode_pack_index,
    gc_prefix,
    leases_prefix,
    packs_prefix,
    page_key,
    pages_prefix,
    parse_pack_key,
    parse_root_key,
    roots_prefix,
    volume_key,
)
from overlaycache.retention import RetentionPolicy
from overlaycache.snapshots import Snapshot

RS = 65536
#: Two levels of map pages: leaves 0 to 1025, under nodes 0 and 1.
NREG = 1024 * 1024 + 1100
SIZE = NREG * RS - 300  # a partial last region
LAST = NREG - 1
FAR = 1024 * 1024  # the first region of leaf 1024, under the second node
MID = 700 * 1024  # a leaf in the middle of the first node

_ZERO = -1
#: Per PIT, the regions written and the version of their bytes (``_ZERO``: a region of zeros). The
#: first PIT is collapsed away: the second replaces every region it has.
STEPS: list[tuple[str, dict[int, int]]] = [
    ("p0", {**{r: 0 for r in range(0, 6)}, **{r: 0 for r in range(1024, 1028)}}),
    ("p1", {**{r: 1 for r in range(0, 24)}, 30: _ZERO, 31: _ZERO, **{r: 1 for r in range(1024, 1032)},
            **{r: 1 for r in range(MID, MID + 4)}, FAR: 1, FAR + 1: _ZERO, LAST - 1: 1, LAST: 1}),
    ("p2", {2: 2, 3: _ZERO, 4: _ZERO, 30: 2, 1024: 2, FAR: _ZERO, LAST: 2}),
    ("p3", {MID + 1: 3, MID + 9: 3, 1030: _ZERO}),
    ("p4", {3: 4, 5: 4, 6: 4, FAR + 1: 4, FAR + 2: _ZERO, LAST - 1: 4, LAST: _ZERO}),
]
#: The regions every check reads: all those written, and some never written.
READ = sorted({r for _label, writes in STEPS for r in writes} | {40, 1500, MID + 100, FAR + 50, LAST - 2})
#: A run of adjacent regions read with one call (fetched a run of a pack at a time).
RUN = range(0, 26)

KINDS = ["volume", "pack", "page", "root", "gc", "lease"]
DAMAGES = ["flip", "zero", "truncate", "swap", "delete"]


def _len(r: int) -> int:
    return min(RS, SIZE - r * RS)


def _content(r: int, version: int, salt: int) -> bytes:
    if version == _ZERO:
        return bytes(_len(r))
    return (bytes([r % 251, version + 1, salt, 0x5A]) * (RS // 4))[: _len(r)]


# -- the pristine store ------------------------------------------------------------------------------

@dataclass
class _Built:
    """One volume of the store: its id, its PITs (the model) and its objects."""

    vid: str
    #: PIT id -> (its snapshot record, region -> bytes).
    pits: dict[str, tuple[Snapshot, dict[int, bytes]]]
    #: Object kind -> keys, sorted.
    objects: dict[str, list[str]] = field(default_factory=dict)
    #: Page key -> (level, index), for every page a PIT reaches.
    page_place: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Packs a PIT reaches, by number.
    live_packs: set[int] = field(default_factory=set)


def _build(store: LocalStore, path: Path, salt: int) -> _Built:
    """The volume of the module docstring (``salt`` makes its bytes its own)."""
    pits = {}
    current = {r: bytes(_len(r)) for r in READ}
    with Volume.create(path, SIZE, region_size=RS, secondary=store, replication="periodic", period=3600.0,
                       pack_size=1 << 20) as vol:
        for label, writes in STEPS:
            for r, version in writes.items():
                current[r] = _content(r, version, salt)
                vol.write(r * RS, current[r])
            snap = vol.snapshot(f"{label}-{salt}")
            pits[snap.id] = (snap, dict(current))
        vid = vol.id
    report = store.collapse(vid, RetentionPolicy(pinned=[f"{label}-{salt}" for label, _w in STEPS[1:]]))
    assert [s.label for s in report.removed] == [f"p0-{salt}"] and report.pages_condemned
    del pits[report.removed[0].id]
    store.image(vid, sorted(pits)[1], lease="7d", holder=f"holder-{salt}").close()
    built = _Built(vid, pits)
    prefixes = {"pack": packs_prefix(vid), "page": pages_prefix(vid), "root": roots_prefix(vid),
                "gc": gc_prefix(vid), "lease": leases_prefix(vid)}
    built.objects = {kind: sorted(store.list(prefix)) for kind, prefix in prefixes.items()}
    built.objects["volume"] = [volume_key(vid)]
    catalog = Catalog(store)
    for sid in pits:
        pit = catalog.pit_map(vid, sid)
        for level, index, addr in pit.page_addresses():
            built.page_place[page_key(vid, addr)] = (level, index)
        built.live_packs |= {pack for _r, _s, pack, _o, _l, _c, _d in pit.stored() if pack}
    return built


class Pristine:
    """The store of the module docstring, never changed once built.

    A plain class, not a dataclass: hypothesis reports a failing example of a test taking a
    dataclass fixture as ``FlakyStrategyDefinition`` (seen with hypothesis 6.155).

    Attributes
    ----------
    root : Path
        The store's directory.
    a, b : _Built
        The two volumes.
    partner : dict of str to str
        A's key -> the key of B's object of the same kind and place (what a swap copies over it).
    info : dict
        A's volume record, as ``volume_info`` returns it.
    """

    def __init__(self, root: Path, a: _Built, b: _Built, partner: dict[str, str], info: dict[str, Any]) -> None:
        self.root = root
        self.a = a
        self.b = b
        self.partner = partner
        self.info = info

    def __repr__(self) -> str:
        return f"Pristine({str(self.root)!r}, a={self.a.vid!r}, b={self.b.vid!r})"


def _partners(a: _Built, b: _Built) -> dict[str, str]:
    out = {volume_key(a.vid): volume_key(b.vid), a.objects["gc"][0]: b.objects["gc"][0],
           a.objects["lease"][0]: b.objects["lease"][0]}
    b_packs = {parse_pack_key(k)[1]: k for k in b.objects["pack"]}
    for key in a.objects["pack"]:
        out[key] = b_packs[parse_pack_key(key)[1]]
    b_roots = {parse_root_key(k)[0]: k for k in b.objects["root"]}
    for key in a.objects["root"]:
        out[key] = b_roots[parse_root_key(key)[0]]
    b_places: dict[tuple[int, int], str] = {}
    for key, place in sorted(b.page_place.items()):
        b_places.setdefault(place, key)
    b_condemned = sorted(set(b.objects["page"]) - set(b.page_place))
    for key in a.objects["page"]:
        place = a.page_place.get(key)
        out[key] = b_condemned[0] if place is None else b_places[place]
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("store-damage")
    store = LocalStore(root / "store")
    a = _build(store, root / "a", 1)
    b = _build(store, root / "b", 2)
    # The same operations: the same seqs, PIT ids, pack numbers and pages' places.
    assert sorted(a.pits) == sorted(b.pits) and sorted(a.page_place.values()) == sorted(b.page_place.values())
    assert all(len(a.objects[k]) == 1 for k in ("gc", "lease"))
    assert len(a.objects["pack"]) >= 4 and {level for level, _i in a.page_place.values()} == {0, 1}
    assert a.live_packs == {parse_pack_key(k)[1] for k in a.objects["pack"]}
    assert set(a.objects["page"]) > set(a.page_place)  # condemned pages too
    shutil.rmtree(root / "a")
    shutil.rmtree(root / "b")
    return Pristine(root / "store", a, b, _partners(a, b), store.volume_info(a.vid))


def _copy(pristine: Pristine, into: Path) -> LocalStore:
    """A store in ``into`` holding a copy of A's objects."""
    shutil.copytree(pristine.root / "volumes" / pristine.a.vid, into / "volumes" / pristine.a.vid)
    return LocalStore(into)


# -- damaging one object --------------------------------------------------------------------------------

class Draw(Protocol):
    """Where a case's choices come from (hypothesis, in the matrices)."""

    def integer(self, lo: int, hi: int, label: str) -> int: ...

    def choice(self, items: Sequence[str], label: str) -> str: ...


class _Hypothesis:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, lo: int, hi: int, label: str) -> int:
        return self.data.draw(st.integers(lo, hi), label=label)

    def choice(self, items: Sequence[str], label: str) -> str:
        return self.data.draw(st.sampled_from(items), label=label)


@dataclass(frozen=True)
class Damaged:
    """What a case damaged, how, and the names an error may give it."""

    kind: str
    how: str
    key: str
    names: tuple[str, ...]
    #: A PIT reaches it: ``check(read_data=True)`` must report it (a deleted root excepted).
    reached: bool
    #: Damage to what ``check()`` reads without ``read_data`` (roots, pages, a pack's index): it
    #: must report it.
    in_metadata: bool
    #: A damaged volume record that still parses as a JSON object.
    record_parses: bool = False


def _names(kind: str, key: str) -> tuple[str, ...]:
    last = key.rsplit("/", 1)[1]
    if kind == "pack":
        return key, f"pack {parse_pack_key(key)[1]:016x}"
    if kind == "root":
        return key, f"{parse_root_key(key)[0]:016x}"
    if kind == "page":
        return key, last
    return (key,)


def damage(work: Path, pristine: Pristine, kind: str, how: str, draw: Draw,
           reached_only: bool = False) -> Damaged | None:
    """Damage one of A's objects of ``kind`` in ``work`` (a copy of A's objects), a PIT reaches
    with ``reached_only``; None when what was drawn changes nothing."""
    keys = pristine.a.objects[kind]
    if reached_only and kind == "page":
        keys = sorted(pristine.a.page_place)
    key = draw.choice(keys, "object")
    target = work / key
    raw = target.read_bytes()
    if how == "flip":
        at = draw.integer(0, len(raw) - 1, "byte")
        new = raw[:at] + bytes([raw[at] ^ (1 << draw.integer(0, 7, "bit"))]) + raw[at + 1 :]
    elif how == "zero":
        at = draw.integer(0, len(raw) - 1, "start")
        n = draw.integer(1, len(raw) - at, "length")
        new = raw[:at] + bytes(n) + raw[at + n :]
    elif how == "truncate":
        new = raw[: draw.integer(0, len(raw) - 1, "length")]
    elif how == "swap":
        new = (pristine.root / pristine.partner[key]).read_bytes()
    else:
        new = b""
    if how != "delete" and new == raw:
        return None
    if how == "delete":
        target.unlink()
    else:
        target.write_bytes(new)
    parses = False
    if kind == "volume" and how != "delete":
        try:
            parses = isinstance(json.loads(new), dict)
        except ValueError:
            pass
    reached = (kind == "pack" or (kind == "page" and key in pristine.a.page_place)
               or (kind == "root" and how != "delete"))
    in_metadata = reached and kind != "pack"
    if kind == "pack":
        index = decode_pack_index(raw, key)
        assert not isinstance(index, int)
        in_metadata = how == "delete" or new[: index.data_offset] != raw[: index.data_offset]
    return Damaged(kind, how, key, _names(kind, key), reached, in_metadata, parses)


# -- judging the read paths ----------------------------------------------------------------------------

def _deepest_package_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}overlaycache{os.sep}" in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"overlaycache/{f.filename.rsplit(f'{os.sep}overlaycache{os.sep}', 1)[1]}:{f.lineno} in {f.name}"


class _Verdict:
    """What happened in one case: outcomes seen (for the statistics) and rules broken."""

    def __init__(self, damaged: Damaged) -> None:
        self.damaged = damaged
        self.outcomes: set[str] = set()
        self.violations: list[str] = []

    def names(self, message: str) -> bool:
        return any(n in message for n in self.damaged.names)

    def broken(self, what: str, message: str, rule: str) -> None:
        self.violations.append(rule)

    def attempt(self, where: str, outcome: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None when it raised as allowed (else the error is a violation)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - judged here
            if not isinstance(exc, OverlayCacheError):
                name = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
                self.violations.append(f"{where}: {name} escaped: {exc} "
                                       f"(deepest package frame: {_deepest_package_frame(exc)})")
            elif not self.names(str(exc)):
                self.broken("error", str(exc),
                            f"{where}: {type(exc).__name__} does not name {self.damaged.key}: {exc}")
            else:
                self.outcomes.add(outcome)
            return None


def _listing(store: LocalStore, pristine: Pristine, v: _Verdict, where: str, *, may_leave_out: bool = False,
             rebuilt: bool = False) -> list[Snapshot] | None:
    """The listing, judged: every PIT shown as the model has it (a PIT rebuilt by a repair may be
    labelled ``rebuilt-<id>``, of its rebuild's time); only the damaged root left out (any PIT
    with ``may_leave_out``)."""
    listed: list[Snapshot] | None = v.attempt(f"{where}snapshots()", "listing refused",
                                              lambda: store.snapshots(pristine.a.vid))
    if listed is None:
        return None
    model = pristine.a.pits
    for s in listed:
        if s.id not in model:
            v.violations.append(f"{where}snapshots() lists {s}, which is no PIT of the volume")
            continue
        want = model[s.id][0]
        if (s.seq, s.created_at, s.label) != (want.seq, want.created_at, want.label) and not (
                rebuilt and s.seq == want.seq and s.label == f"rebuilt-{s.id}"):
            v.violations.append(f"{where}snapshots() lists {s}, not {want}")
    shown = {s.id for s in listed}
    for sid, (snap, _regions) in model.items():
        if sid in shown or may_leave_out:
            continue
        if v.damaged.kind == "root" and parse_root_key(v.damaged.key)[0] == snap.seq:
            v.outcomes.add("damaged PIT left out")
        else:
            v.violations.append(f"{where}snapshots() leaves out PIT {sid}, whose root is intact")
    return listed


def _read_pits(store: LocalStore, pristine: Pristine, v: _Verdict, where: str,
               listed: list[Snapshot] | None = None) -> None:
    """Every PIT of the model (of those ``listed`` when given) read region by region, and a run."""
    vid = pristine.a.vid
    for sid, (_snap, regions) in pristine.a.pits.items():
        if listed is not None and sid not in {s.id for s in listed}:
            continue
        img = v.attempt(f"{where}image({sid})", "image refused", lambda: store.image(vid, sid))
        if img is None:
            continue
        with img:
            # The run first: a sequential read from the start, with its readahead; then each region
            # alone, backwards (not sequential: no readahead, whose bookkeeping costs more than the
            # reads here).
            want = b"".join(regions.get(r, bytes(RS)) for r in RUN)
            got = v.attempt(f"{where}PIT {sid} regions {RUN.start}-{RUN.stop - 1}", "read refused",
                            lambda: img.read(RUN.start * RS, len(RUN) * RS))
            if got is not None and got != want:
                v.violations.append(f"{where}PIT {sid} regions {RUN.start}-{RUN.stop - 1} read other bytes")
            for r in reversed(READ):
                got = v.attempt(f"{where}PIT {sid} region {r}", "read refused", lambda: img.read(r * RS, _len(r)))
                if got is not None and got != regions[r]:
                    v.violations.append(f"{where}PIT {sid} region {r} reads other bytes")


def _check(store: LocalStore, pristine: Pristine, v: _Verdict) -> None:
    """``check()`` with and without ``read_data``: what it reports names the damaged object, and
    with ``read_data`` it reports what a PIT reaches."""
    for read_data in (False, True):
        where = f"check(read_data={read_data})"
        report = v.attempt(where, "check refused", lambda: store.check(pristine.a.vid, read_data=read_data))
        if report is None:
            continue
        if report.problems:
            v.outcomes.add("check reports" + (" with read_data" if read_data else ""))
            if not any(v.names(p) for p in report.problems):
                v.broken("check", "", f"{where}: no problem names {v.damaged.key}: {report.problems[:3]}")
        elif v.damaged.reached if read_data else v.damaged.in_metadata:
            v.violations.append(f"{where}: reports nothing of the damaged {v.damaged.key}")


def verify(store: LocalStore, pristine: Pristine, damaged: Damaged) -> _Verdict:
    """Every read path of the module docstring, on the damaged store, then a collapse."""
    v = _Verdict(damaged)
    vid = pristine.a.vid
    info = v.attempt("volume_info()", "record refused", lambda: store.volume_info(vid))
    if info is not None and info != pristine.info:
        v.broken("record", "", f"volume_info() is {info}, not {pristine.info}")
    listed = _listing(store, pristine, v, "")
    _read_pits(store, pristine, v, "")
    _check(store, pristine, v)
    if listed is not None:
        v.attempt("collapse()", "collapse refused",
                  lambda: store.collapse(vid, RetentionPolicy(keep_last=1), page_grace=0.0))
        after = _listing(store, pristine, v, "after collapse: ", may_leave_out=True)
        if after is not None:
            _read_pits(store, pristine, v, "after collapse: ", after)
    if not v.outcomes:
        v.outcomes.add("no effect")
    return v


def verify_repair(store: LocalStore, pristine: Pristine, damaged: Damaged) -> _Verdict:
    """``check(repair=True, read_data=True)`` on the damaged store; then every PIT listed read
    again, and a second check, which must find whole every PIT the repair reported repaired."""
    v = _Verdict(damaged)
    vid = pristine.a.vid
    if damaged.record_parses:
        info = v.attempt("volume_info()", "record refused", lambda: store.volume_info(vid))
        if info is not None and (info["size"], info["region_size"]) != (pristine.info["size"],
                                                                        pristine.info["region_size"]):
            # A known gap: the repair takes this geometry (test_a_repair_keeps_the_geometry_of_the_pits).
            v.outcomes.add("known gap: repair takes the record's geometry")
            return v
    report = v.attempt("check(repair=True)", "repair refused",
                       lambda: store.check(vid, repair=True, read_data=True))
    if report is not None and report.repaired:
        v.outcomes.add("repaired")
    listed = _listing(store, pristine, v, "after repair: ", rebuilt=True)
    _read_pits(store, pristine, v, "after repair: ", listed)
    if report is not None and report.repaired:
        again = v.attempt("check after repair", "check refused", lambda: store.check(vid, read_data=True))
        if again is not None:
            for sid in sorted(set(report.repaired) & set(again.damaged_snapshots)):
                v.violations.append(f"PIT {sid} reported repaired is still damaged: "
                                    f"{[p for p in again.problems if sid in p][:2]}")
    if not v.outcomes:
        v.outcomes.add("no effect")
    return v


def _note(verdict: _Verdict, judge: str) -> None:
    """Append a case's outcome to the file ``OVERLAYCACHE_DAMAGE_STATS`` names, when set (the
    matrix's statistics; nothing reads it back)."""
    path = os.environ.get("OVERLAYCACHE_DAMAGE_STATS")
    if path:
        d = verdict.damaged
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"judge": judge, "kind": d.kind, "how": d.how, "key": d.key,
                                "outcomes": sorted(verdict.outcomes), "violations": verdict.violations}) + "\n")


def _case(pristine: Pristine, kind: str, how: str, draw: Draw,
          judge: Callable[[LocalStore, Pristine, Damaged], _Verdict], reached_only: bool = False) -> _Verdict | None:
    """Copy A's objects, damage one, judge the result (None: the damage drawn changed nothing)."""
    with tempfile.TemporaryDirectory(prefix="case-", dir=pristine.root.parent) as tmp:
        store = _copy(pristine, Path(tmp))
        damaged = damage(Path(tmp), pristine, kind, how, draw, reached_only)
        if damaged is None:
            return None
        verdict = judge(store, pristine, damaged)
    _note(verdict, judge.__name__)
    return verdict


# -- the matrices ----------------------------------------------------------------------------------------

# No example database: the pristine store differs between runs (volume ids, times), so a saved
# example would not replay the same case.
_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
@settings(_SETTINGS, max_examples=8)
@given(data=st.data())
def test_a_damaged_object_never_reads_as_other_bytes(pristine: Pristine, kind: str, how: str,
                                                     data: st.DataObject) -> None:
    verdict = _case(pristine, kind, how, _Hypothesis(data), verify)
    if verdict is not None:
        assert not verdict.violations, "\n".join(verdict.violations)


@pytest.mark.parametrize(("kind", "how"), [(k, h) for k in KINDS for h in DAMAGES])
@settings(_SETTINGS, max_examples=5)
@given(data=st.data())
def test_a_repair_never_makes_a_damaged_pit_read_other_bytes(pristine: Pristine, kind: str, how: str,
                                                             data: st.DataObject) -> None:
    """Pages are drawn among those a PIT reaches (damage to a condemned page has no effect)."""
    verdict = _case(pristine, kind, how, _Hypothesis(data), verify_repair, reached_only=True)
    if verdict is not None:
        assert not verdict.violations, "\n".join(verdict.violations)


class _Seeded:
    """Choices from a seeded generator: the same case at every run."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def integer(self, lo: int, hi: int, label: str) -> int:
        return self.random.randint(lo, hi)

    def choice(self, items: Sequence[str], label: str) -> str:
        return self.random.choice(list(items))


# -- the bugs found, pinned --------------------------------------------------------------------------------

def test_the_volume_record_of_another_volume_is_refused(pristine: Pristine, tmp_path: Path) -> None:
    store = _copy(pristine, tmp_path)
    key = volume_key(pristine.a.vid)
    shutil.copy(pristine.root / pristine.partner[key], tmp_path / key)
    with pytest.raises(OverlayCacheError, match="volume.json"):
        store.volume_info(pristine.a.vid)


def test_a_volume_record_with_a_digit_flipped_is_named(pristine: Pristine, tmp_path: Path) -> None:
    store = _copy(pristine, tmp_path)
    path = tmp_path / volume_key(pristine.a.vid)
    raw = path.read_bytes()
    at = raw.index(b'"size": ') + len(b'"size": ') + 2
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :])  # a digit one off, still JSON
    with pytest.raises(OverlayCacheError, match="volume.json: damaged volume record"):
        store.volume_info(pristine.a.vid)
    report = store.check(pristine.a.vid)
    assert not any("lists region" in p for p in report.problems), report.problems  # the packs are not blamed
    assert any("volume.json" in p for p in report.problems), report.problems


def test_a_missing_volume_record_is_named(pristine: Pristine, tmp_path: Path) -> None:
    store = _copy(pristine, tmp_path)
    (tmp_path / volume_key(pristine.a.vid)).unlink()
    assert [s.id for s in store.snapshots(pristine.a.vid)] == sorted(pristine.a.pits)  # still listed
    report = store.check(pristine.a.vid)
    assert not report.ok and any("volume.json: missing" in p for p in report.problems), report.problems
    for call in (lambda: store.volume_info(pristine.a.vid),
                 lambda: store.collapse(pristine.a.vid, RetentionPolicy(keep_last=1))):
        with pytest.raises(OverlayCacheError, match="volume.json: missing"):
            call()


def test_check_names_a_missing_pack(pristine: Pristine, tmp_path: Path) -> None:
    store = _copy(pristine, tmp_path)
    key = pristine.a.objects["pack"][0]
    (tmp_path / key).unlink()
    pack = f"{parse_pack_key(key)[1]:016x}"
    report = store.check(pristine.a.vid)
    assert report.problems and any(pack in p for p in report.problems), report.problems


def test_check_finds_a_pack_of_another_volume(pristine: Pristine, tmp_path: Path) -> None:
    store = _copy(pristine, tmp_path)
    key = pristine.a.objects["pack"][0]
    shutil.copy(pristine.root / pristine.partner[key], tmp_path / key)
    report = store.check(pristine.a.vid, read_data=True)
    assert report.damaged_packs == [key], report.problems


def test_a_repair_keeps_the_geometry_of_the_pits(pristine: Pristine, tmp_path: Path) -> None:
    store = _copy(pristine, tmp_path)
    path = tmp_path / volume_key(pristine.a.vid)
    raw = path.read_bytes()
    at = raw.index(b'"region_size": ') + len(b'"region_size": ')
    path.write_bytes(raw[:at] + b"7" + raw[at + 1 :])  # 65536 -> 75536: still JSON
    store.check(pristine.a.vid, repair=True)
    for sid, (_snap, regions) in pristine.a.pits.items():
        with store.image(pristine.a.vid, sid) as img:
            assert img.region_size == RS and img.size == SIZE
            assert all(img.read(r * RS, _len(r)) == regions[r] for r in READ)
