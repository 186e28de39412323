"""The thread that runs the model, fed by the ROS callbacks (no ROS imports here).

Two kinds of work: tasks (queries, model loads) wait in a bounded FIFO and always go first;
camera frames do not queue at all: one slot holds the newest, a newer frame replaces it (the
old one is counted as dropped), and the slot is emptied at most `rate` times a second.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

MAX_WAIT_S = 3600.0  # longest single wait; a longer period is waited in steps


class WorkerBusy(RuntimeError):
    """The task queue is full."""


class RateLimiter:
    """Allows a start when at least 1/rate seconds have passed since the previous one."""

    def __init__(self, rate_hz: float):
        self._next_start = float("-inf")
        self._period = 0.0
        self.set_rate(rate_hz)

    def set_rate(self, rate_hz: float) -> None:
        if rate_hz < 0:
            raise ValueError(f"rate must be >= 0, got {rate_hz}")
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        # Keep the last start time: a new rate applies from the previous start on.
        self._next_start += period - self._period
        self._period = period

    def seconds_until_ready(self, now: float) -> float:
        return max(0.0, self._next_start - now)

    def mark_started(self, now: float) -> None:
        self._next_start = now + self._period


class InferenceWorker:
    def __init__(
        self,
        process_frame: Callable[[Any], None],
        *,
        rate_hz: float = 0.0,
        max_pending_tasks: int = 8,
        on_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._process_frame = process_frame
        self._on_error = on_error or (lambda error: None)
        self._clock = clock
        self._limiter = RateLimiter(rate_hz)
        self._max_pending_tasks = max_pending_tasks
        self._tasks: collections.deque[tuple[Future, Callable[[], Any]]] = collections.deque()
        self._frame: Any = None
        self._has_frame = False
        self._stopping = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nanovlm-inference", daemon=True)
        self.frames_offered = 0
        self.frames_replaced = 0  # dropped: a newer frame arrived before the model was free
        self.frames_processed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            pending, self._tasks = list(self._tasks), collections.deque()
            self._wake.notify_all()
        for future, _ in pending:
            future.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def set_rate(self, rate_hz: float) -> None:
        with self._wake:
            self._limiter.set_rate(rate_hz)
            self._wake.notify_all()

    def offer_frame(self, frame: Any) -> None:
        """Make `frame` the next one to answer, dropping the one still waiting, if any."""
        with self._wake:
            self.frames_offered += 1
            if self._has_frame:
                self.frames_replaced += 1
            self._frame, self._has_frame = frame, True
            self._wake.notify_all()

    def submit(self, function: Callable[[], Any]) -> Future:
        """Run `function` on the worker before any further frame; its result comes in the Future."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                raise WorkerBusy("the node is shutting down")
            if len(self._tasks) >= self._max_pending_tasks:
                raise WorkerBusy(f"{len(self._tasks)} requests are already waiting for the model")
            self._tasks.append((future, function))
            self._wake.notify_all()
        return future

    def _next_work(self):
        """Block until there is something to do: ("task", (future, fn)), ("frame", f) or None to stop."""
        with self._wake:
            while not self._stopping:
                if self._tasks:
                    return "task", self._tasks.popleft()
                if self._has_frame:
                    now = self._clock()
                    wait = self._limiter.seconds_until_ready(now)
                    if wait <= 0:
                        self._limiter.mark_started(now)
                        frame, self._frame, self._has_frame = self._frame, None, False
                        return "frame", frame
                    # Bounded: a tiny rate (1e-12 Hz) means a wait longer than a lock can take.
                    self._wake.wait(min(wait, MAX_WAIT_S))
                else:
                    self._wake.wait()
            return None

    def _run(self) -> None:
        while (work := self._next_work()) is not None:
            kind, item = work
            if kind == "task":
                future, function = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(function())
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)
            else:
                try:
                    self._process_frame(item)
                except Exception as error:  # noqa: BLE001 - the worker must outlive any frame
                    self._on_error(error)
                finally:
                    self.frames_processed += 1
