"""Fault scenarios: the secondary killed under a distributed overlay.

Shared by the unit suite (``tests/test_failover_faults.py``, a moto server in this process) and
the integration suite (``localstack/test_seaweedfs_faults.py``, a SeaweedFS process). Each scenario
is a plain function that asserts; a test module calls it with its own server. Imports pytest: for
test suites only.

A scenario takes a *server*: an object with ``store()`` (an :class:`S3Store` on the scenario's
bucket, the same bucket every time), ``stop()`` (the server goes away: new connections are refused)
and ``start()`` (it comes back on the same port with the same data). A :class:`Tripwire` wraps a
real store and stops the server at a chosen request, while parallel requests are in flight.

Each region of the volume holds one *version*: a pattern naming the region and a tag, so a region
from the wrong place or the wrong time is always told apart.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import pytest

from overlaycache import Volume
from overlaycache.errors import RegionUnavailableError, SecondaryUnavailableError, StoreError
from overlaycache.local.unavailable import UnavailableMap
from overlaycache.remote.layout import is_pack_key, is_root_key
from overlaycache.testing.stores import PackRegions

RS = 4096
#: Bound on any single blocking step of a scenario: a hang fails the test instead of the run.
HANG = 120.0


__all__ = [
    "HANG",
    "RS",
    "Model",
    "Server",
    "Tripwire",
    "forced_replication_killed",
    "lost_regions_survive_a_failed_begin",
    "parallel_remote_read_killed",
    "read_after_a_failed_begin_retries_it",
    "refused_partial_write_leaves_replication_alone",
    "remote_reads_with_the_secondary_killed",
    "reopen_while_the_secondary_is_down",
    "version",
    "write_across_a_remote_region_is_all_or_nothing",
]


class Server(Protocol):
    """The S3 server a scenario kills and restarts."""

    def store(self) -> Any:
        """An S3Store on the scenario's bucket (the same bucket on every call)."""
        ...

    def stop(self) -> None:
        """Stop the server: new connections are refused."""
        ...

    def start(self) -> None:
        """Start it again on the same port, with the same data."""
        ...


# -- region versions ------------------------------------------------------------------------------
def region_length(size: int, r: int) -> int:
    return min(RS, size - r * RS)


def version(size: int, r: int, tag: int) -> bytes:
    """The bytes of region ``r`` at version ``tag`` (distinct for every region and tag)."""
    return (struct.pack("<II", r, tag) * (RS // 8))[: region_length(size, r)]


class Model:
    """What each region must read as, region by region."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.nreg = (size + RS - 1) // RS
        self.regions = [bytes(region_length(size, r)) for r in range(self.nreg)]

    def put(self, vol: Volume, r: int, tag: int) -> None:
        """A full-region write of version ``tag``."""
        data = version(self.size, r, tag)
        assert vol.write(r * RS, data) == len(data)
        self.regions[r] = data

    def patch(self, vol: Volume, offset: int, data: bytes) -> None:
        """A partial write inside one region."""
        r = offset // RS
        assert (offset + len(data) - 1) // RS == r
        vol.write(offset, data)
        intra = offset - r * RS
        self.regions[r] = self.regions[r][:intra] + data + self.regions[r][intra + len(data):]

    def image(self) -> bytes:
        return b"".join(self.regions)


def check_regions(vol: Any, model: Model, regions: Iterable[int]) -> None:
    """Each region reads exactly as the model says, one read per region."""
    for r in regions:
        assert vol.read(r * RS, len(model.regions[r])) == model.regions[r], f"region {r}"


def region_gets(regions: Iterable[int]) -> list[int]:
    """The regions recorded by a :class:`Tripwire`, sorted."""
    return sorted(regions)


def assert_no_pool_threads(before: set[threading.Thread]) -> None:
    """No thread pool of the read path outlives the read (a leak would pile up per failure)."""
    left = [t.name for t in threading.enumerate()
            if t.name.startswith("ThreadPoolExecutor-") and t not in before and t.is_alive()]
    assert left == []


def pool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor-")}


def with_timeout(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread; a hang fails the test after ``HANG`` seconds."""
    with ThreadPoolExecutor(1, thread_name_prefix="oc-test-call") as pool:
        return pool.submit(fn).result(timeout=HANG)


# -- a store that stops its server at the k-th request ----------------------------------------------
class Tripwire:
    """A real store whose server is stopped at a chosen request.

    ``arm("get", k)`` / ``arm("put", k)``: region GETs (PUTs) 0..k-1 go through and complete, then
    the k-th stops the server and goes on (and fails, as do all later ones); requests run in
    parallel meanwhile. With ``racing=True`` nothing waits: the k-th stops the server while
    others may be in flight, and whether those succeed is up to the server (both are recorded). ``arm("root")``: the server is stopped just before the PUT of a PIT's root;
    ``arm("root-landed")``: just after it (the root is stored, then the connection is
    lost: the caller gets :class:`SecondaryUnavailableError`, as when the server dies before the
    response). ``ok`` and ``failed`` list the region keys whose armed request succeeded or failed;
    ``gets`` every region GET, ``puts`` every region PUT since the last ``arm``.
    """

    def __init__(self, inner: Any, stop: Callable[[], None]) -> None:
        self.inner = inner
        self.location = inner.location
        self._stop = stop
        self._cv = threading.Condition()
        self.op: str | None = None
        self.k = 0
        self.racing = False
        self.entered = self.finished = 0
        self.tripped = False
        self.ok: list[int] = []
        self.failed: list[int] = []
        self.gets: list[int] = []
        self.puts: list[int] = []
        self.packs = PackRegions(inner)

    def arm(self, op: str, k: int = 0, racing: bool = False) -> None:
        with self._cv:
            self.op, self.k, self.racing = op, k, racing
            self.entered = self.finished = 0
            self.tripped = False
            self.ok, self.failed, self.puts = [], [], []

    def disarm(self) -> None:
        with self._cv:
            self.op = None

    def _trip(self) -> None:
        self._stop()
        with self._cv:
            self.tripped = True
            if self.op is not None and self.op.startswith("root"):
                self.op = None  # once; armed GETs and PUTs go on being recorded
            self._cv.notify_all()

    def _counted(self, key: str) -> Any:
        """Before an armed region request: let k of them complete, stop the server at the k-th."""
        with self._cv:
            n = self.entered
            self.entered += 1
            if self.racing:
                pass
            elif n == self.k:
                assert self._cv.wait_for(lambda: self.finished == self.k, HANG), "earlier requests hang"
            elif n > self.k:
                assert self._cv.wait_for(lambda: self.tripped, HANG), "the trip never came"
        if n == self.k:
            self._trip()

    def _record(self, regions: list[int], ok: bool) -> None:
        with self._cv:
            (self.ok if ok else self.failed).extend(regions)
            self.finished += 1
            self._cv.notify_all()

    def _armed(self, op: str, key: str) -> bool:
        return self.op == op and is_pack_key(key)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        regions = self.packs.regions(key, start, length) if is_pack_key(key) else []
        self.gets.extend(regions)
        if not self._armed("get", key):
            return bytes(self.inner.get(key, start, length))
        self._counted(key)
        try:
            data = bytes(self.inner.get(key, start, length))
        except BaseException:
            self._record(regions, False)
            raise
        self._record(regions, True)
        return data

    def put(self, key: str, data: Any, *, if_absent: bool = False) -> None:
        regions = self.packs.learn(key, data) if is_pack_key(key) else []
        self.puts.extend(regions)
        if is_root_key(key) and self.op == "root":
            self._trip()
        elif is_root_key(key) and self.op == "root-landed":
            self.inner.put(key, data, if_absent=if_absent)
            self._trip()
            raise SecondaryUnavailableError(f"{self.location}: put {key}: connection lost (test)",
                                            getattr(self.inner, "endpoint", None), None, key)
        if not self._armed("put", key):
            self.inner.put(key, data, if_absent=if_absent)
            return
        self._counted(key)
        try:
            self.inner.put(key, data, if_absent=if_absent)
        except BaseException:
            self._record(regions, False)
            raise
        self._record(regions, True)

    def image(self, volume_id: str, snapshot: Any, cache_regions: int = 256) -> Any:
        from overlaycache.remote.catalog import Catalog

        return Catalog(self).image(volume_id, snapshot, cache_regions)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def assert_down(store: Any) -> None:
    """The server really is gone: a plain request fails as unreachable."""
    with pytest.raises(SecondaryUnavailableError):
        store.get("volumes/probe")


def one_region_packs(vol: Volume) -> Volume:
    """Make ``vol`` store each region version in a pack of its own (below the public minimum pack
    size), so that a scenario's k-th request is its k-th region."""
    repl = vol._repl
    if repl is not None:
        repl.pack_regions = 1
    return vol


def create(path: Path, store: Any, size: int, mode: str = "periodic") -> Volume:
    # No readahead: these tests count and name exactly the GETs each read makes.
    kwargs: dict[str, Any] = {"period": 3600.0} if mode == "periodic" else {}
    return one_region_packs(Volume.create(path, size, region_size=RS, secondary=store, replication=mode,
                                          readahead=0, **kwargs))


def reopen_volume(path: Path, store: Any) -> Volume:
    return one_region_packs(Volume.open(path, secondary=store, readahead=0))


# -- 1. the secondary killed while regions are read from it ------------------------------------------
def remote_reads_with_the_secondary_killed(tmp_path: Path, server: Server, mode: str) -> None:
    """R regions read once are served from the cache, the others raise naming exactly them; PO
    and PB regions and writes carry on; when the server is back, everything reads again."""
    size = 12 * RS - 512  # the last region is partial
    model = Model(size)
    store = server.store()
    remote, cached, written = [2, 3, 5, 8, 9, 11], [2, 8], [0, 10]
    uncached = [3, 5, 9, 11]
    with create(tmp_path / "vol", store, size, mode) as vol:
        for r in range(model.nreg):
            model.put(vol, r, 1)
        vol.replicate()
        vol.mark_unavailable(remote)
        do = vol.distributed_overlay
        assert do is not None and do["lost"] == []
        for r in written:
            model.put(vol, r, 2)
        check_regions(vol, model, cached)  # now in the local cache of remote regions
        locs = ["PO", "PB", "R", "R", "PB", "R", "PB", "PB", "R", "R", "PO", "R"]
        assert vol.location_map() == locs
        vol.replicate()  # nothing behind when the server dies

        server.stop()
        assert_down(store)
        for r in uncached:
            with pytest.raises(RegionUnavailableError) as info:
                vol.read(r * RS + 7, 10)
            assert type(info.value) is RegionUnavailableError
            assert (info.value.regions, info.value.reason) == ((r,), "secondary unavailable")
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(0, size)
        assert info.value.regions == tuple(uncached)
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(RS + 100, 3 * RS)  # regions 1-4: PB, cached R, R, PB
        assert info.value.regions == (3,)
        sentinel = b"\xee" * size
        buf = bytearray(sentinel)
        with pytest.raises(RegionUnavailableError) as info:
            vol.readinto(0, buf)
        assert info.value.regions == tuple(uncached)
        for r in range(model.nreg):  # never a wrong byte: each region is right or untouched
            got = bytes(buf[r * RS : r * RS + len(model.regions[r])])
            assert got in (model.regions[r], sentinel[: len(got)]), f"region {r}"
            if r in uncached:
                assert got == sentinel[: len(got)]
        check_regions(vol, model, [r for r in range(model.nreg) if r not in uncached])
        assert vol.read(0, 3 * RS) == model.image()[: 3 * RS]  # PO, PB, cached R in one read

        # Writes: whole regions anywhere; partial writes wherever the rest of the region is here.
        model.put(vol, 3, 3)  # uncached R -> PO
        model.put(vol, 4, 3)  # PB -> PO
        model.patch(vol, 8 * RS + 100, b"patched-cached")  # cached R: the rest comes from the cache
        model.patch(vol, 1 * RS + 5, b"patched-base")
        with pytest.raises(SecondaryUnavailableError):
            vol.replicate()
        assert vol.replication_lag.regions == 4  # regions 1, 3, 4, 8 are behind
        # A partial write to an uncached R region needs the rest of it: refused, nothing written.
        # (It does mark the region changed: see refused_partial_write_leaves_replication_alone.)
        with pytest.raises(RegionUnavailableError) as info:
            vol.write(5 * RS + 100, b"partial")
        assert type(info.value) is RegionUnavailableError
        assert (info.value.regions, info.value.reason) == ((5,), "secondary unavailable")
        assert vol.location_map() == ["PO", "PO", "R", "PO", "PO", "R", "PB", "PB", "PO", "R", "PO", "R"]
        check_regions(vol, model, [0, 1, 2, 3, 4, 6, 7, 8, 10])
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(0, size)
        assert info.value.regions == (5, 9, 11)
        vol.flush()

        server.start()
        assert vol.read(0, size) == model.image()  # region 5 as it was: the refused write left no trace
        model.patch(vol, 5 * RS + 100, b"partial")  # fetched first, now that the server is back
        assert vol.read(0, size) == model.image()
        snap = vol.snapshot()
        with store.image(vol.id, snap) as pit:
            assert pit.read(0, size) == model.image()
    with reopen_volume(tmp_path / "vol", store) as vol:
        assert vol.read(0, size) == model.image()


def reopen_while_the_secondary_is_down(tmp_path: Path, server: Server) -> None:
    """A volume in a distributed overlay opens with its secondary unreachable: the PIT root
    and the cache of remote regions are local; only uncached R regions wait for the server."""
    size = 8 * RS
    model = Model(size)
    store = server.store()
    with create(tmp_path / "vol", store, size, "async") as vol:
        for r in range(model.nreg):
            model.put(vol, r, 1)
        vol.replicate()
        vol.mark_unavailable([2, 3, 5])
        check_regions(vol, model, [2])
        model.put(vol, 0, 2)
    server.stop()
    assert_down(store)
    with reopen_volume(tmp_path / "vol", store) as vol:
        assert vol.distributed_overlay is not None
        assert vol.location_map() == ["PO", "PB", "R", "R", "PB", "R", "PB", "PB"]
        check_regions(vol, model, [0, 1, 2, 4, 6, 7])
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(0, size)
        assert info.value.regions == (3, 5)
        model.put(vol, 3, 3)
        model.patch(vol, 2 * RS + 9, b"on the cached copy")
        vol.flush()
        server.start()
        assert vol.read(0, size) == model.image()
        snap = vol.snapshot()
        with store.image(vol.id, snap) as pit:
            assert pit.read(0, size) == model.image()


def parallel_remote_read_killed(tmp_path: Path, server: Server, k: int, racing: bool = False) -> None:
    """The server dies in the middle of a read that fetches many R regions in parallel: the read
    raises naming exactly the regions it could not get, never returns wrong bytes, leaves no
    thread behind, and what it did fetch is kept: the retry fetches only the rest. With
    ``racing``, GETs may be in flight when it dies (which of them succeed is the server's call)."""
    size = 24 * RS
    model = Model(size)
    trip = Tripwire(server.store(), server.stop)
    remote = [*range(2, 10), *range(12, 22)]  # two runs of R regions, PB between and around
    with create(tmp_path / "vol", trip, size) as vol:
        for r in range(model.nreg):
            model.put(vol, r, 1)
        vol.replicate()
        vol.mark_unavailable(remote)
        model.put(vol, 0, 2)
        check_regions(vol, model, [5])  # cached before the failure
        before = pool_threads()
        trip.arm("get", k, racing)
        buf = bytearray(b"\xee" * size)
        with pytest.raises(RegionUnavailableError) as info:
            with_timeout(lambda: vol.readinto(0, buf))
        assert trip.tripped
        assert_no_pool_threads(before)
        fetched = region_gets(trip.ok)
        if not racing:
            assert len(fetched) == k
        missing = sorted(set(remote) - {5} - set(fetched))
        # Fetches not started when the first one failed may be cancelled: fewer GETs, same answer.
        assert trip.failed and set(region_gets(trip.failed)) <= set(missing)
        assert info.value.regions == tuple(missing)
        assert info.value.reason == "secondary unavailable"
        for r in range(model.nreg):
            got = bytes(buf[r * RS : (r + 1) * RS])
            assert got in (model.regions[r], b"\xee" * RS), f"region {r}"
            if r in missing:
                assert got == b"\xee" * RS
        # While the server is down, a region fetched by the failed read is served from the cache.
        check_regions(vol, model, [r for r in range(model.nreg) if r not in missing])

        server.start()
        gets = len(trip.gets)
        assert with_timeout(lambda: vol.read(0, size)) == model.image()
        assert region_gets(trip.gets[gets:]) == missing
        assert_no_pool_threads(before)


# -- 2. the secondary killed while the distributed overlay ships unsynced regions --------------------
UNSYNCED = [1, 2, 4, 6, 7, 9, 10, 12, 13, 14, 15]
BAD = [3, 6]  # 3 is on the secondary; 6 was rewritten since and is not: its new version is lost
READABLE_UNSYNCED = [r for r in UNSYNCED if r not in BAD]


def _failed_begin(tmp_path: Path, server: Server, where: str, k: int) -> tuple[Volume, Tripwire, Model, list[str]]:
    """A volume whose forced replication was cut by the server dying; returns it (the server
    is down), the tripwire, the model of acknowledged writes and the PITs stored before."""
    size = 16 * RS
    model = Model(size)
    trip = Tripwire(server.store(), server.stop)
    vol = create(tmp_path / "vol", trip, size)
    for r in range(model.nreg):
        model.put(vol, r, 1)
    vol.snapshot("T1")
    pits = [s.id for s in vol.snapshots()]
    for r in UNSYNCED:
        model.put(vol, r, 2)
    trip.arm("put" if where == "regions" else where, k)
    with pytest.raises(StoreError) as info:
        with_timeout(lambda: vol.mark_unavailable(BAD))
    assert isinstance(info.value, SecondaryUnavailableError)
    assert trip.tripped
    return vol, trip, model, pits


def _check_failed_state(vol: Volume, model: Model, pending: set[int]) -> None:
    """No distributed overlay, the marks on disk, local data intact, the rest still to ship."""
    assert vol.distributed_overlay is None
    assert vol.unavailable == frozenset(BAD)
    assert UnavailableMap(vol.path, vol.num_regions, vol.id, True).regions() == frozenset(BAD)
    check_regions(vol, model, [r for r in range(model.nreg) if r not in BAD])
    for r in BAD:  # not valid locally, and no PIT to read them from
        with pytest.raises(RegionUnavailableError) as info:
            vol.read(r * RS, RS)
        assert info.value.regions == (r,)
    repl = vol._repl
    assert repl is not None
    assert {r for r in range(model.nreg) if r not in BAD and repl.pending.test(r)} == pending
    assert not repl.set.inflight


def forced_replication_killed(tmp_path: Path, server: Server, where: str, k: int, reopen: bool) -> None:
    """The server dies while the distributed overlay ships the unsynced regions (after ``k``
    region PUTs) or publishes its PIT: a clear error, no distributed overlay, the marks kept;
    writes go on; a retry once the server is back publishes a PIT holding every acknowledged
    readable write."""
    vol, trip, model, pits = _failed_begin(tmp_path, server, where, k)
    store = trip.inner
    try:
        if where == "regions":
            shipped = region_gets(trip.ok)
            assert len(shipped) == k
        else:
            shipped = READABLE_UNSYNCED
            assert region_gets(trip.puts) == READABLE_UNSYNCED
        trip.disarm()
        _check_failed_state(vol, model, set(READABLE_UNSYNCED) - set(shipped))
        # The volume keeps taking writes meanwhile; they must be in the PIT of the retry.
        model.put(vol, 12, 3)
        model.patch(vol, 4 * RS + 100, b"during the outage")
        model.put(vol, 0, 3)
        pending = set(READABLE_UNSYNCED) - set(shipped) | {0, 4, 12}
        if reopen:
            vol.close()
            vol = reopen_volume(tmp_path / "vol", trip)
            _check_failed_state(vol, model, pending)
        server.start()
        stored = [s.id for s in store.snapshots(vol.id)]
        if where == "root-landed":
            assert len(stored) == len(pits) + 1 and stored[:-1] == pits  # stored, never acknowledged
        else:
            assert stored == pits
        snap = with_timeout(vol.begin_distributed_overlay)
        do = vol.distributed_overlay
        assert do is not None and do["snapshot_id"] == snap.id and snap.id not in pits
        assert vol.unavailable == frozenset(BAD)
        assert vol.location_map() == ["R" if r in BAD else "PB" for r in range(model.nreg)]
        assert vol.replication_lag.regions == 0
        # Region 6's unsynced version is lost: the PIT has its last replicated one.
        want = model.regions[:6] + [version(model.size, 6, 1)] + model.regions[7:]
        with store.image(vol.id, snap) as pit:
            for r in range(model.nreg):
                assert pit.read(r * RS, RS) == want[r], f"region {r}"
        assert vol.read(0, model.size) == b"".join(want)
        vol.close()
        with reopen_volume(tmp_path / "vol", store) as again:
            assert again.distributed_overlay == do
            assert again.read(0, model.size) == b"".join(want)
    finally:
        vol.close()


def lost_regions_survive_a_failed_begin(tmp_path: Path, server: Server, where: str) -> None:
    """The unsynced version of region 6 could not be read; a retried begin must still say so."""
    vol, trip, model, pits = _failed_begin(tmp_path, server, where, 2)
    with vol:
        server.start()
        vol.begin_distributed_overlay()
        do = vol.distributed_overlay
        assert do is not None and do["lost"] == [6]


def read_after_a_failed_begin_retries_it(tmp_path: Path, server: Server) -> None:
    """With a secondary attached and back, reading a region marked unavailable routes it there
    (beginning the distributed overlay that failed earlier) instead of raising forever."""
    vol, trip, model, pits = _failed_begin(tmp_path, server, "regions", 2)
    with vol:
        server.start()
        assert vol.read(3 * RS, RS) == version(model.size, 3, 1)
        assert vol.distributed_overlay is not None


def write_across_a_remote_region_is_all_or_nothing(tmp_path: Path, server: Server) -> None:
    """A write over a PB region and an uncached R region it only partly covers raises and leaves
    both regions as they were."""
    size = 8 * RS
    model = Model(size)
    store = server.store()
    with create(tmp_path / "vol", store, size) as vol:
        for r in range(model.nreg):
            model.put(vol, r, 1)
        vol.replicate()
        vol.mark_unavailable([5])
        server.stop()
        with pytest.raises(RegionUnavailableError) as info:
            vol.write(4 * RS + 100, b"x" * RS)
        assert info.value.regions == (5,)
        check_regions(vol, model, [4])
        assert vol.location_map(4, 2) == ["PB", "R"]


def refused_partial_write_leaves_replication_alone(tmp_path: Path, server: Server, mode: str) -> None:
    """A refused partial write to an uncached R region changed nothing, so nothing is behind, and
    once the server is back the next PIT is taken (in async mode: the shipper idles)."""
    size = 8 * RS
    model = Model(size)
    store = server.store()
    with create(tmp_path / "vol", store, size, mode) as vol:
        for r in range(model.nreg):
            model.put(vol, r, 1)
        vol.replicate()
        vol.mark_unavailable([5])
        server.stop()
        with pytest.raises(RegionUnavailableError) as info:
            vol.write(5 * RS + 100, b"partial")
        assert info.value.regions == (5,)
        assert vol.replication_lag.regions == 0
        server.start()
        snap = with_timeout(vol.snapshot)
        with store.image(vol.id, snap) as pit:
            assert pit.read(0, size) == model.image()
