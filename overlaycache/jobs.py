"""Jobs: long operations of a volume run in batches, with one handle for all of them.

A job walks a list of items (regions) in batches through a step function. Its handle reports
``done``/``total`` and calls ``progress(done, total)`` after each batch; it can be cancelled
(after the current batch), waited for, limited to a byte rate, and made to yield to foreground
I/O: before each batch it waits until ``idle`` seconds pass with no new foreground reads or writes
(an activity counter the volume bumps). It runs in the caller's thread or in a background thread;
an :class:`~overlaycache.errors.OverlayCacheError` that stops it is kept as ``error``. The model
is QEMU's block jobs (``include/qemu/job.h``) shared by stream, commit and mirror.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from overlaycache.errors import InvalidArgumentError, OverlayCacheError

_log = logging.getLogger(__name__)

#: A batch waits until no foreground I/O has arrived for this many seconds (default).
IDLE = 0.02


class Job:
    """The handle of a job.

    Parameters
    ----------
    name : str
        What it does, for messages and the thread name ("hydrate", ...).
    where : str
        What it works on (the volume's path), for messages.
    items : sequence of int
        The regions to go through, in order (a ``range`` is not materialized).
    step : callable
        ``step(batch) -> int``: do the work for a batch of items; returns the units of work done
        (e.g. regions installed), each ``unit_bytes`` long for the rate limit.
    batch : int
        Items per step.
    unit_bytes : int
        Bytes per unit of work, for ``rate``.
    progress : callable, optional
        ``progress(done, total)``, after each batch.
    rate : float, optional
        Bytes per second at most.
    idle : float
        Seconds without foreground I/O that a batch waits for (0: do not yield).
    activity : callable, optional
        The foreground I/O counter to yield to.

    Attributes
    ----------
    total : int
        Items when it started.
    done : int
        Items dealt with so far.
    moved : int
        Units of work done (what ``step`` returned, summed).
    paused : int
        Times a batch waited for foreground I/O to calm down.
    error : BaseException or None
        Why it stopped early, if it did.
    """

    def __init__(self, name: str, where: str, items: Sequence[int], step: Callable[[list[int]], int], *,
                 batch: int, unit_bytes: int, progress: Callable[[int, int], None] | None = None,
                 rate: float | None = None, idle: float = IDLE, activity: Callable[[], int] | None = None) -> None:
        if rate is not None and rate <= 0:
            raise InvalidArgumentError(f"rate must be > 0 bytes per second, got {rate}")
        if idle < 0:
            raise InvalidArgumentError(f"idle must be >= 0 seconds, got {idle}")
        if batch < 1:
            raise InvalidArgumentError(f"batch must be >= 1, got {batch}")
        self.name = name
        self.where = where
        self._items = items
        self._step = step
        self._batch = batch
        self._unit_bytes = unit_bytes
        self._progress = progress
        self._rate = rate
        self._idle = idle
        self._activity = activity
        self.total = len(self._items)
        self.done = 0
        self.moved = 0
        self.paused = 0
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen = activity() if activity is not None else 0

    @property
    def finished(self) -> bool:
        """Whether the run is over (completed, cancelled or failed)."""
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop after the current batch (idempotent)."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; returns whether it has.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait at most; None waits as long as it runs.

        Returns
        -------
        bool
            True once it ended (see :attr:`error` for why, if early), False on a timeout.
        """
        return self._finished.wait(timeout)

    def run_or_raise(self) -> None:
        """Run in the caller's thread; raise what stopped it early, if anything did."""
        self.run()
        if self.error is not None:
            raise self.error

    def start(self) -> None:
        """Run in a background thread."""
        self._thread = threading.Thread(target=self.run, name=f"overlaycache-{self.name}", daemon=True)
        self._thread.start()

    def _wait_for_quiet(self) -> None:
        """Yield to foreground I/O: if any arrived since the last batch, wait until a whole
        ``idle`` period passes without any."""
        if self._activity is None:
            return
        seen = self._seen
        while self._activity() != seen and self._idle:
            seen = self._activity()
            self.paused += 1
            if self._cancel.wait(self._idle):
                break
        self._seen = self._activity()

    def run(self) -> None:
        """Go through every batch (the body of the background thread, or of a foreground call)."""
        started = time.monotonic()
        try:
            for i in range(0, len(self._items), self._batch):
                if self._cancel.is_set():
                    break
                self._wait_for_quiet()
                if self._cancel.is_set():
                    break
                batch = list(self._items[i : i + self._batch])
                self.moved += self._step(batch)
                self.done += len(batch)
                if self._progress is not None:
                    self._progress(self.done, self.total)
                if self._rate is not None:
                    ahead = self.moved * self._unit_bytes / self._rate - (time.monotonic() - started)
                    if ahead > 0 and self._cancel.wait(ahead):
                        break
        except OverlayCacheError as exc:
            self.error = exc
            _log.error("%s: %s stopped after %d of %d regions: %s", self.where, self.name, self.done,
                       self.total, exc)
        finally:
            self._finished.set()
        if self.error is None:
            _log.info("%s: %s: %d done (%d of %d examined)%s", self.where, self.name, self.moved, self.done,
                      self.total, " (cancelled)" if self._cancel.is_set() else "")

    def __repr__(self) -> str:
        state = "finished" if self.finished else "running"
        return f"{type(self).__name__}({self.done}/{self.total}, moved={self.moved}, {state})"
