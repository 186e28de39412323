"""The worker's scheduling: newest frame per camera, cameras in turn, batches when several are
due, tasks and frames in turn, rate limit, cancelled tasks never run, errors contained."""

from __future__ import annotations

import threading

import pytest

from ros2_nanovlm.worker import InferenceWorker, RateLimiter, WorkerBusy

WAIT = 10.0  # generous bound on every wait for an event; never reached when things work


class Recorder:
    """A batch handler that records frames and batches and can be held inside a batch."""

    def __init__(self):
        self.frames = []
        self.batches = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.release.set()
        self.done = threading.Condition()

    def __call__(self, batch):
        self.entered.release()
        assert self.release.wait(WAIT)
        with self.done:
            self.batches.append([camera for camera, _ in batch])
            self.frames.extend(frame for _, frame in batch)
            self.done.notify_all()

    def wait_for(self, count):
        with self.done:
            assert self.done.wait_for(lambda: len(self.frames) >= count, WAIT)


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def worker(recorder):
    worker = InferenceWorker(recorder, rate_hz=0.0, max_pending_tasks=2)
    worker.start()
    yield worker
    recorder.release.set()
    worker.stop()


def test_only_the_newest_frame_waits_and_the_rest_are_counted(worker, recorder):
    recorder.release.clear()
    worker.offer_frame(1)
    assert recorder.entered.acquire(timeout=WAIT)  # the worker is busy with frame 1
    replaced = [worker.offer_frame(frame) for frame in (2, 3, 4, 5)]
    recorder.release.set()
    recorder.wait_for(2)
    assert recorder.frames == [1, 5]
    assert replaced == [False, True, True, True]  # the caller counts these as dropped


def test_tasks_go_before_a_waiting_frame(worker, recorder):
    order = []
    recorder.release.clear()
    worker.offer_frame("first")
    assert recorder.entered.acquire(timeout=WAIT)
    worker.offer_frame("waiting")
    task = worker.submit(lambda: order.append("task") or 42)
    recorder.release.set()
    assert task.result(timeout=WAIT) == 42
    recorder.wait_for(2)
    assert order == ["task"] and recorder.frames == ["first", "waiting"]


def test_callers_looping_on_requests_cannot_starve_the_cameras(worker, recorder):
    order, started, hold = [], threading.Event(), threading.Event()

    def first():
        order.append("A")
        started.set()
        assert hold.wait(WAIT)

    running = worker.submit(first)
    assert started.wait(WAIT)
    later = [worker.submit(lambda name=name: order.append(name)) for name in ("B", "C")]
    worker.offer_frame("frame")
    recorder.release.clear()
    hold.set()
    assert recorder.entered.acquire(timeout=WAIT)  # the frame went next, before B and C
    assert order == ["A"]
    recorder.release.set()
    running.result(timeout=WAIT)
    for future in later:
        future.result(timeout=WAIT)
    assert order == ["A", "B", "C"] and recorder.frames == ["frame"]


def test_withdrawn_tasks_free_their_places_in_the_queue(worker, recorder):
    recorder.release.clear()
    worker.offer_frame("busy")
    assert recorder.entered.acquire(timeout=WAIT)
    withdrawn = [worker.submit(lambda: None) for _ in range(2)]
    for future in withdrawn:
        assert future.cancel()
    kept = worker.submit(lambda: "answered")  # the queue is full of withdrawn tasks only
    recorder.release.set()
    assert kept.result(timeout=WAIT) == "answered"


def test_task_errors_reach_the_caller_and_the_worker_goes_on(worker):
    failing = worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=WAIT)
    assert worker.submit(lambda: "still alive").result(timeout=WAIT) == "still alive"


def test_frame_errors_are_reported_and_the_worker_goes_on():
    errors, seen = [], threading.Event()

    def handler(batch):
        if batch[0][1] == "bad":
            raise ValueError("broken frame")
        seen.set()

    worker = InferenceWorker(handler, on_error=errors.append)
    worker.start()
    try:
        worker.offer_frame("bad")
        worker.submit(lambda: None).result(timeout=WAIT)  # the bad frame has been handled
        worker.offer_frame("good")
        assert seen.wait(WAIT)
        assert [str(e) for e in errors] == ["broken frame"]
    finally:
        worker.stop()


def test_the_task_queue_is_bounded(worker, recorder):
    recorder.release.clear()
    worker.offer_frame("busy")
    assert recorder.entered.acquire(timeout=WAIT)
    worker.submit(lambda: None)
    worker.submit(lambda: None)
    with pytest.raises(WorkerBusy, match="2 requests are already waiting"):
        worker.submit(lambda: None)


def test_stop_cancels_waiting_tasks(recorder):
    worker = InferenceWorker(recorder)
    worker.start()
    recorder.release.clear()
    worker.offer_frame("busy")
    assert recorder.entered.acquire(timeout=WAIT)
    waiting = worker.submit(lambda: None)
    recorder.release.set()
    worker.stop()
    assert waiting.cancelled() or waiting.done()
    with pytest.raises(WorkerBusy, match="shutting down"):
        worker.submit(lambda: None)


def test_rate_limiter_spaces_starts_by_the_period():
    limiter = RateLimiter(2.0)
    assert limiter.seconds_until_ready(100.0) == 0.0
    limiter.mark_started(100.0)
    assert limiter.seconds_until_ready(100.2) == pytest.approx(0.3)
    assert limiter.seconds_until_ready(100.5) == 0.0
    limiter.set_rate(1.0)  # a slower rate counts from the last start
    assert limiter.seconds_until_ready(100.5) == pytest.approx(0.5)
    limiter.set_rate(0.0)  # 0 = no limit
    assert limiter.seconds_until_ready(100.0) == 0.0
    with pytest.raises(ValueError):
        limiter.set_rate(-1.0)


def test_a_tiny_rate_waits_without_killing_the_worker(recorder):
    """rate 1e-12 Hz is inside the parameter's range: its period overflowed the condition wait
    and killed the thread, so the node answered nothing, forever."""
    worker = InferenceWorker(recorder, rate_hz=1e-12)
    worker.start()
    try:
        worker.offer_frame("first")
        recorder.wait_for(1)  # the first frame starts at once
        worker.offer_frame("second")  # waits for its period: 10^12 s
        assert worker.submit(lambda: "still serving").result(WAIT) == "still serving"
        assert recorder.frames == ["first"]
    finally:
        worker.stop()


def test_cameras_take_turns_and_waiting_frames_go_as_one_batch(worker, recorder):
    recorder.release.clear()
    worker.offer_frame("front-1", "front")
    assert recorder.entered.acquire(timeout=WAIT)  # busy with front-1
    worker.offer_frame("front-2", "front")
    worker.offer_frame("rear-1", "rear")
    worker.offer_frame("left-1", "left")
    recorder.release.set()
    recorder.wait_for(4)
    # rate 0: everything waiting is due, one batch, starting after the camera answered last
    assert recorder.batches == [["front"], ["rear", "left", "front"]]


def test_a_busy_camera_cannot_starve_the_others(recorder):
    """At a rate limit, one frame per period: the cameras alternate even though one camera
    offers a new frame before every answer."""
    now = [0.0]
    worker = InferenceWorker(recorder, rate_hz=1.0, clock=lambda: now[0])
    worker.start()
    try:
        for step in range(6):
            recorder.release.clear()
            worker.offer_frame(f"a{step}", "a")
            if step % 2 == 0:
                worker.offer_frame(f"b{step}", "b")
            now[0] += 1.0
            worker.set_rate(1.0)  # wakes the worker to look at the (fake) clock again
            assert recorder.entered.acquire(timeout=WAIT)
            recorder.release.set()
            recorder.wait_for(step + 1)
        assert [b[0] for b in recorder.batches] == ["a", "b", "a", "b", "a", "b"]
    finally:
        worker.stop()


def test_rate_limiter_lets_a_late_model_catch_up_by_whole_periods():
    limiter = RateLimiter(2.0)
    assert limiter.starts_due(10.0, most=4) == 1  # the first start
    limiter.mark_started(10.0)
    assert limiter.starts_due(10.2, most=4) == 0
    assert limiter.starts_due(10.5, most=4) == 1
    assert limiter.starts_due(11.1, most=4) == 2  # one period late: two frames may go now
    assert limiter.starts_due(20.0, most=4) == 4  # never more than the frames waiting
    limiter.mark_started(11.1, count=2)  # a batch of two uses two periods
    assert limiter.seconds_until_ready(11.1) == pytest.approx(1.0)


def test_a_task_cancelled_while_queued_never_runs(worker, recorder):
    recorder.release.clear()
    worker.offer_frame("busy")
    assert recorder.entered.acquire(timeout=WAIT)
    ran, cancel = [], threading.Event()
    withdrawn = worker.submit(lambda: ran.append("ran"), cancel)
    cancel.set()
    later = worker.submit(lambda: "next")
    recorder.release.set()
    assert later.result(timeout=WAIT) == "next"
    assert withdrawn.cancelled() and ran == []


def test_dropped_frames_are_handed_back_for_counting(worker, recorder):
    recorder.release.clear()
    worker.offer_frame("busy", "a")
    assert recorder.entered.acquire(timeout=WAIT)
    worker.offer_frame("a2", "a")
    worker.offer_frame("b1", "b")
    assert sorted(worker.drop_frames()) == [("a", "a2"), ("b", "b1")]
    assert worker.waiting_frames == 0
