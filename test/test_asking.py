"""One question's way through the Asker, without a node: the outcome a caller hears when the
question times out while still queued behind a long answer, or is cancelled while queued."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ros2_nanovlm.ros import parameters
from ros2_nanovlm.ros.asking import Asker, Question
from ros2_nanovlm.ros.image_conversion import rgb_to_image_msg
from ros2_nanovlm.ros.model_slot import ModelUnavailable
from ros2_nanovlm.worker import InferenceWorker

WAIT = 10.0


def no_model():
    raise ModelUnavailable("no model loaded: test")


@pytest.fixture
def busy_worker():
    """A worker held by a long task until the test ends."""
    worker = InferenceWorker(lambda batch: None, max_pending_tasks=4)
    worker.start()
    release = threading.Event()
    worker.submit(lambda: release.wait(WAIT))
    yield worker
    release.set()
    worker.stop()


def asker_with(worker, query_timeout: float) -> Asker:
    values = {spec.name: spec.default for spec in parameters.SPECS} | {"query_timeout": query_timeout}
    settings = parameters.Settings.from_values(values)
    return Asker(worker, no_model, lambda: settings, lambda: None, [""], lambda camera: "image")


def question() -> Question:
    return Question(prompt="What is it?", image=rgb_to_image_msg(np.zeros((8, 8, 3), np.uint8)))


def test_a_question_timing_out_in_the_queue_hears_the_timeout(busy_worker):
    outcome = asker_with(busy_worker, 0.2).start(question()).future.result(timeout=WAIT)
    assert outcome.answer is None and outcome.error == "no answer within query_timeout=0.2 s"
    assert busy_worker.pending_tasks <= 1 and not busy_worker.queue_full  # its place is free again


def test_a_question_cancelled_in_the_queue_ends_at_once(busy_worker):
    pending = asker_with(busy_worker, 60.0).start(question())
    pending.cancel()
    outcome = pending.future.result(timeout=WAIT)
    assert outcome.error == "cancelled before the model started"
