"""Deadlines: call a function when its time comes, without a thread per waiting request.

A question to the model must end at its timeout even while it is still queued behind a long
answer, and nothing else is running for it then: the executor thread that received it has gone
back to serving frames and parameters. One thread here sleeps until the earliest deadline.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

MAX_WAIT_S = 3600.0


class Deadline:
    """One registered call; cancel() makes it a no-op (the question ended first)."""

    __slots__ = ("cancelled", "function", "when")

    def __init__(self, when: float, function: Callable[[], None]):
        self.when = when
        self.function = function
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Deadlines:
    """Owns one daemon thread and a heap of Deadlines. Any thread may call call_at / close; the
    functions run on the deadline thread, so they must be quick (set an Event, complete a
    Future). The thread starts with the first deadline."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, on_error: Callable[[BaseException], None] = print):
        self._clock = clock
        self._on_error = on_error
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties: first registered runs first, Deadlines never compared
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def call_in(self, seconds: float, function: Callable[[], None]) -> Deadline:
        return self.call_at(self._clock() + seconds, function)

    def call_at(self, when: float, function: Callable[[], None]) -> Deadline:
        deadline = Deadline(when, function)
        with self._wake:
            if self._closed:
                raise RuntimeError("deadlines closed")
            heapq.heappush(self._heap, (when, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nanovlm-deadlines", daemon=True)
                self._thread.start()
            self._wake.notify()
        return deadline

    def close(self) -> None:
        """Stop the thread; deadlines not yet due never run."""
        with self._wake:
            self._closed = True
            self._heap.clear()
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def __len__(self) -> int:
        with self._wake:
            return sum(not deadline.cancelled for _, _, deadline in self._heap)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._heap or self._heap[0][0] > self._clock()):
                    # Cancelled deadlines leave the heap when they come up, not when cancelled:
                    # the heap holds at most the requests of one timeout period.
                    # Bounded: a wait longer than a lock can take raises OverflowError.
                    self._wake.wait(min(self._heap[0][0] - self._clock(), MAX_WAIT_S) if self._heap else None)
                if self._closed:
                    return
                _, _, deadline = heapq.heappop(self._heap)
            if deadline.cancelled:
                continue
            try:
                deadline.function()
            except Exception as error:  # noqa: BLE001 - one bad callback must not end the others
                self._on_error(error)
