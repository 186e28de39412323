"""One question from a caller (the query service or the Ask action) to the model, and back.

The caller's executor thread resolves the image (the request's, or a camera's latest frame),
checks the schema, queues the question on the worker and waits for the outcome, bounded by
query_timeout (queue included). A timeout or a cancel sets the request's Event: a queued
question never starts, a running one stops within one token. Every path ends in an Outcome, an
answer or an error message, never a silent drop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ..engine import Answer, EngineError, InvalidInput, VLMEngine
from ..engine.structured import load_schema
from ..worker import InferenceWorker, WorkerBusy
from .camera_inputs import CameraInputs
from .image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb, is_empty
from .model_slot import ModelUnavailable
from .parameters import Settings

STOP_GRACE_S = 30.0  # after a timeout or cancel, how long to wait for the answer to stop


@dataclass
class Question:
    prompt: str
    image: Image  # empty = the latest frame of `camera`
    camera: str = ""
    json_schema: str = ""
    max_new_tokens: int = 0

    @classmethod
    def of(cls, request) -> Question:
        """The question in a Query request or an Ask goal (they share these fields)."""
        return cls(
            prompt=request.prompt,
            image=request.image,
            camera=request.camera,
            json_schema=request.json_schema,
            max_new_tokens=request.max_new_tokens,
        )


@dataclass
class Outcome:
    """How a question ended: `answer` set, or `error` says why not."""

    header: Header = field(default_factory=Header)
    answer: Answer | None = None
    error: str = ""
    queue_ms: float = 0.0


def frame_to_rgb(msg: Image | CompressedImage, max_pixels: int):
    if isinstance(msg, CompressedImage):
        return compressed_msg_to_rgb(msg, max_pixels)
    return image_msg_to_rgb(msg, max_pixels)


def ask_engine(engine: VLMEngine, settings: Settings, frame, prompt: str, **options) -> Answer:
    """One answer with the node's settings; `options` (max_new_tokens, json_schema, cancel,
    on_token) override them. JSON mode: a request's schema, else the node's json_schema, else
    json_output (any object)."""
    json_schema = options.pop("json_schema", None) or settings.json_schema
    return engine.ask(
        prompt,
        frame,
        system_prompt=settings["system_prompt"],
        max_new_tokens=options.pop("max_new_tokens", None) or settings["max_new_tokens"],
        json_output=settings["json_output"],
        json_schema=json_schema,
        **options,
    )


class Asker:
    """Runs Questions on the worker. Stateless between calls; any executor thread may call ask()
    (the service and the action run in a reentrant group), the model work runs on the worker."""

    def __init__(
        self,
        worker: InferenceWorker,
        engine: Callable[[], VLMEngine],  # the loaded engine, or raises ModelUnavailable
        settings: Callable[[], Settings],
        cameras: Callable[[], CameraInputs | None],  # None while inactive
        camera_names: list[str],
        topic_of_camera: Callable[[str], str],
    ):
        self._worker = worker
        self._engine = engine
        self._settings = settings
        self._cameras = cameras
        self._camera_names = camera_names
        self._topic_of_camera = topic_of_camera

    def ask(
        self,
        question: Question,
        cancel: threading.Event | None = None,
        on_token: Callable[[str], None] | None = None,
    ) -> Outcome:
        cancel = cancel or threading.Event()
        settings = self._settings()
        outcome = Outcome()
        try:
            frame_msg = self._image(question)
            schema = load_schema(question.json_schema)
        except (InvalidInput, LookupError) as error:
            outcome.error = str(error)
            return outcome
        outcome.header = frame_msg.header
        queued_at = time.monotonic()

        def answer() -> Answer:
            outcome.queue_ms = (time.monotonic() - queued_at) * 1000.0
            frame = frame_to_rgb(frame_msg, settings["max_image_pixels"])
            return ask_engine(
                self._engine(),
                settings,
                frame,
                question.prompt,
                max_new_tokens=question.max_new_tokens or None,
                json_schema=schema,
                cancel=cancel,
                on_token=on_token,
            )

        try:
            future = self._worker.submit(answer, cancel)
        except WorkerBusy as error:
            outcome.error = f"busy: {error}"
            return outcome
        timeout = settings["query_timeout"]
        try:
            outcome.answer = future.result(timeout=timeout)
        except FutureTimeout:
            outcome.error = f"no answer within query_timeout={timeout} s"
            _stop(future, cancel)
        except CancelledError:
            outcome.error = "cancelled before the model started"
        except (ImageConversionError, EngineError, ModelUnavailable) as error:
            outcome.error = str(error)
        except Exception as error:  # noqa: BLE001 - a caller always gets a reply
            outcome.error = f"internal error: {error!r}"
        return outcome

    def _image(self, question: Question) -> Image | CompressedImage:
        if not is_empty(question.image):
            return question.image
        camera = question.camera or self._camera_names[0]
        if camera not in self._camera_names:
            raise LookupError(f"no camera '{camera}'; the node's cameras are {self._camera_names}")
        inputs = self._cameras()
        latest = inputs.latest(camera) if inputs is not None else None
        if latest is None:
            raise LookupError(
                f"no camera frame has arrived yet on '{self._topic_of_camera(camera)}'; send an image in the request"
            )
        return latest.msg


def _stop(future: Future, cancel: threading.Event) -> None:
    """Withdraw a question that ran out of time: it never starts, or stops within one token.
    Wait for that, so the caller's reply does not race the model for the next question."""
    cancel.set()
    future.cancel()
    with contextlib.suppress(Exception):  # the outcome is the timeout already
        future.result(timeout=STOP_GRACE_S)
