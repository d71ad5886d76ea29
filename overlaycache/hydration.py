"""Hydration: copying the remote (R) regions of a distributed overlay back to local storage.

During a distributed overlay the regions not valid locally are read from the remote PIT (R).
Hydration fetches them (through the region cache) and installs each as a whole local version in
the volume's top overlay, so that the volume stops depending on the secondary for reads; the
restore that ends the distributed overlay then folds them into the base. A hydrated region is the
PIT's version, which the secondary already holds: it is not shipped again.

Like dm-clone's background hydration, it works in small batches, yields to foreground I/O (a batch
waits while reads or writes of the volume keep arriving) and can be limited to a byte rate. It
runs in the caller's thread or in a background thread (:class:`Hydration` is the handle), and
reports progress as ``progress(done, total)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from overlaycache.errors import InvalidArgumentError, OverlayCacheError

_log = logging.getLogger(__name__)

#: Regions fetched per batch (in parallel).
BATCH = 16
#: A batch waits until no foreground I/O has arrived for this many seconds.
IDLE = 0.02


class Hydration:
    """The handle of a hydration run.

    Attributes
    ----------
    total : int
        R regions found when it started.
    done : int
        Regions dealt with so far: installed locally, or found no longer remote (written meanwhile).
    installed : int
        Regions installed from the PIT.
    error : BaseException or None
        Why it stopped early, if it did.
    """

    def __init__(self, vol: Any, regions: list[int], progress: Callable[[int, int], None] | None,
                 rate: float | None, idle: float) -> None:
        if rate is not None and rate <= 0:
            raise InvalidArgumentError(f"rate must be > 0 bytes per second, got {rate}")
        if idle < 0:
            raise InvalidArgumentError(f"idle must be >= 0 seconds, got {idle}")
        self._vol = vol
        self._regions = regions
        self._progress = progress
        self._rate = rate
        self._idle = idle
        self.total = len(regions)
        self.done = 0
        self.installed = 0
        self.paused = 0  # times a batch waited for foreground I/O to calm down
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: int = vol._io_count

    @property
    def finished(self) -> bool:
        """Whether the run is over (completed, cancelled or failed)."""
        return self._finished.is_set()

    def cancel(self) -> None:
        """Stop after the current batch (idempotent); regions not installed stay remote."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; returns whether it has."""
        return self._finished.wait(timeout)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="overlaycache-hydrate", daemon=True)
        self._thread.start()

    def _wait_for_quiet(self) -> None:
        """Yield to foreground I/O: if any arrived since the last batch, wait until a whole
        ``idle`` period passes without any."""
        seen = self._seen
        while self._vol._io_count != seen and self._idle:
            seen = self._vol._io_count
            self.paused += 1
            if self._cancel.wait(self._idle):
                break
        self._seen = self._vol._io_count

    def run(self) -> None:
        """Hydrate every region (the body of the background thread, or of a foreground call)."""
        started = time.monotonic()
        moved = 0
        try:
            for i in range(0, len(self._regions), BATCH):
                if self._cancel.is_set():
                    break
                self._wait_for_quiet()
                if self._cancel.is_set():
                    break
                batch = self._regions[i : i + BATCH]
                installed = self._vol._hydrate_batch(batch)
                self.installed += installed
                self.done += len(batch)
                moved += installed * self._vol.region_size
                if self._progress is not None:
                    self._progress(self.done, self.total)
                if self._rate is not None:
                    ahead = moved / self._rate - (time.monotonic() - started)
                    if ahead > 0 and self._cancel.wait(ahead):
                        break
        except OverlayCacheError as exc:
            self.error = exc
            _log.error("%s: hydration stopped after %d of %d regions: %s", self._vol.path, self.done,
                       self.total, exc)
        finally:
            self._finished.set()
        if self.error is None:
            _log.info("%s: hydrated %d regions (%d of %d examined)%s", self._vol.path, self.installed,
                      self.done, self.total, " (cancelled)" if self._cancel.is_set() else "")

    def __repr__(self) -> str:
        state = "finished" if self.finished else "running"
        return f"Hydration({self.done}/{self.total}, installed={self.installed}, {state})"
