"""The thread that runs the model, fed by the ROS callbacks (no ROS imports here).

Two kinds of work: tasks (queries, action goals, model loads) wait in a bounded FIFO; camera
frames do not queue at all: each camera has one slot holding its newest frame,
a newer frame replaces it (the caller counts the old one as dropped), and slots are emptied at
most `rate` times a second in all. Cameras take turns (round robin from the one after the camera
answered last), so a fast camera cannot starve a slow one; when several frames are due at once
(rate 0, or the model fell behind the rate), they are handed over together as one batch, so the
vision encoder can take them in one forward.

When both are waiting, they take turns: a due batch of frames goes after each task, so callers
looping on the query service cannot starve the cameras (nor the cameras the callers). Under
full load, the cameras get up to half of the model's time, and their rate limit caps that.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

MAX_WAIT_S = 3600.0  # longest single wait; a longer period is waited in steps


class WorkerBusy(RuntimeError):
    """The task queue is full, or the worker is stopping."""


class RateLimiter:
    """Allows starts at most `rate` per second: a start is due once 1/rate seconds have passed
    since the previous one. Not thread-safe; the worker holds its lock around every call."""

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

    def starts_due(self, now: float, most: int) -> int:
        """How many starts (up to `most`) are due now: 1 when on time, more when the model fell
        behind by whole periods (those starts would have happened had the model been free);
        `most` at rate 0."""
        if now < self._next_start:
            return 0
        if self._period == 0.0 or self._next_start == float("-inf"):
            return most if self._period == 0.0 else 1
        return min(most, 1 + math.floor((now - self._next_start) / self._period))

    def mark_started(self, now: float, count: int = 1) -> None:
        # A batch of `count` answers uses `count` periods of the budget.
        self._next_start = now + count * self._period


class Task:
    """One queued function and the Future its caller waits on. `cancel` (optional Event) lets the
    caller withdraw it: a task cancelled while queued never runs; a running one is told through
    the same Event (the function passes it on to the engine)."""

    __slots__ = ("cancel", "function", "future", "queued_at")

    def __init__(self, function: Callable[[], Any], cancel: threading.Event | None, queued_at: float):
        self.function = function
        self.future: Future = Future()
        self.cancel = cancel
        self.queued_at = queued_at


class InferenceWorker:
    """Owns the inference thread, the task queue and the per-camera frame slots. The ROS
    callbacks (any executor thread) call offer_frame / submit / set_rate; only the worker's own
    thread runs `process_frames` and the tasks. One Condition guards all the state."""

    def __init__(
        self,
        process_frames: Callable[[list[tuple[Hashable, Any]]], None],
        *,
        rate_hz: float = 0.0,
        max_pending_tasks: int = 8,
        max_batch: int = 8,
        on_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._process_frames = process_frames
        self._on_error = on_error or (lambda error: None)
        self._clock = clock
        self._limiter = RateLimiter(rate_hz)
        self._max_pending_tasks = max_pending_tasks
        self._max_batch = max_batch
        self._tasks: collections.deque[Task] = collections.deque()
        # camera -> its newest frame; insertion order is the round-robin order
        self._slots: dict[Hashable, Any] = {}
        self._turn_order: list[Hashable] = []
        self._last_answered: Hashable | None = None
        self._stopping = False
        self._running_task: Task | None = None
        self._task_ran_last = False  # tasks and due frames take turns
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nanovlm-inference", daemon=True)
        self.batches_processed = 0
        self.frames_processed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the waiting tasks and the running one, drop waiting frames, join the thread."""
        with self._wake:
            self._stopping = True
            pending, self._tasks = list(self._tasks), collections.deque()
            self._slots.clear()
            if self._running_task is not None and self._running_task.cancel is not None:
                self._running_task.cancel.set()
            self._wake.notify_all()
        for task in pending:
            task.future.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def set_rate(self, rate_hz: float) -> None:
        with self._wake:
            self._limiter.set_rate(rate_hz)
            self._wake.notify_all()

    def offer_frame(self, frame: Any, camera: Hashable = "") -> bool:
        """Make `frame` the next one to answer for `camera`. Returns True when it replaced a
        frame that was still waiting (that one is dropped: the caller counts it)."""
        with self._wake:
            if self._stopping:
                return False
            if camera not in self._turn_order:
                self._turn_order.append(camera)
            replaced = camera in self._slots
            self._slots[camera] = frame
            self._wake.notify_all()
        return replaced

    def drop_frames(self) -> list[tuple[Hashable, Any]]:
        """Forget the waiting frames (the node is pausing); returns them, for counting."""
        with self._wake:
            dropped = list(self._slots.items())
            self._slots.clear()
        return dropped

    def submit(self, function: Callable[[], Any], cancel: threading.Event | None = None) -> Future:
        """Run `function` on the worker (next, or after one due batch of frames); its result comes in the Future.
        Raises WorkerBusy when max_pending_tasks are already waiting."""
        with self._wake:
            if self._stopping:
                raise WorkerBusy("the node is shutting down")
            if len(self._tasks) >= self._max_pending_tasks:
                # Withdrawn tasks (timed out, cancelled) wait for the worker to skip them: their
                # places are free now.
                self._tasks = collections.deque(t for t in self._tasks if not t.future.cancelled())
            if len(self._tasks) >= self._max_pending_tasks:
                raise WorkerBusy(f"{len(self._tasks)} requests are already waiting for the model")
            task = Task(function, cancel, self._clock())
            self._tasks.append(task)
            self._wake.notify_all()
        return task.future

    @property
    def pending_tasks(self) -> int:
        with self._wake:
            return len(self._tasks)

    @property
    def queue_full(self) -> bool:
        with self._wake:
            return sum(not task.future.cancelled() for task in self._tasks) >= self._max_pending_tasks

    @property
    def waiting_frames(self) -> int:
        with self._wake:
            return len(self._slots)

    def _take_batch(self, count: int) -> list[tuple[Hashable, Any]]:
        """Up to `count` waiting frames, cameras in turn from the one after the last answered."""
        order = self._turn_order
        first = (order.index(self._last_answered) + 1) % len(order) if self._last_answered in order else 0
        batch = []
        for step in range(len(order)):
            camera = order[(first + step) % len(order)]
            if camera in self._slots:
                batch.append((camera, self._slots.pop(camera)))
                if len(batch) == count:
                    break
        self._last_answered = batch[-1][0]
        return batch

    def _next_work(self) -> Task | list | None:
        """Block until there is something to do: a Task, a batch of frames, or None to stop."""
        with self._wake:
            while not self._stopping:
                now = self._clock()
                due = self._limiter.starts_due(now, min(len(self._slots), self._max_batch)) if self._slots else 0
                if self._tasks and not (due and self._task_ran_last):
                    self._task_ran_last = True
                    self._running_task = self._tasks.popleft()
                    return self._running_task
                if due:
                    self._task_ran_last = False
                    batch = self._take_batch(due)
                    self._limiter.mark_started(now, len(batch))
                    return batch
                if self._slots:
                    # Bounded: a tiny rate (1e-12 Hz) means a wait longer than a lock can take.
                    self._wake.wait(min(self._limiter.seconds_until_ready(now), MAX_WAIT_S))
                else:
                    self._wake.wait()
            return None

    def _run(self) -> None:
        while (work := self._next_work()) is not None:
            if isinstance(work, Task):
                self._run_task(work)
                with self._wake:
                    self._running_task = None
            else:
                try:
                    self._process_frames(work)
                except Exception as error:  # noqa: BLE001 - the worker must outlive any frame
                    self._on_error(error)
                finally:
                    self.batches_processed += 1
                    self.frames_processed += len(work)

    @staticmethod
    def _run_task(task: Task) -> None:
        if task.cancel is not None and task.cancel.is_set():
            task.future.cancel()  # withdrawn (timeout, cancelled goal) while it waited
        if not task.future.set_running_or_notify_cancel():
            return
        try:
            task.future.set_result(task.function())
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            task.future.set_exception(error)
