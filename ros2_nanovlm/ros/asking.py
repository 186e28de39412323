"""One question from a caller (the query service or the Ask action) to the model, and back.

The caller's executor thread resolves the image (the request's, or a camera's latest frame),
checks the schema and queues the question on the worker, then returns: the outcome comes later
in a Future, which the service and the action await without holding a thread. query_timeout
bounds it (queue included). A timeout or a cancel sets the request's Event: a queued question
never starts, a running one stops within one token. Every path ends in an Outcome, an answer or
an error message, never a silent drop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ..deadlines import Deadline, Deadlines
from ..engine import Answer, EngineError, InvalidInput, VLMEngine
from ..engine.structured import load_schema
from ..worker import InferenceWorker, WorkerBusy
from .camera_inputs import CameraInputs
from .image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb, is_empty
from .model_slot import ModelUnavailable
from .parameters import BY_NAME, Settings

MAX_NEW_TOKENS = BY_NAME["max_new_tokens"]


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


class PendingQuestion:
    """One question on its way to the model. `future` resolves to its Outcome exactly once and
    never raises: the answer, an error, the timeout or a cancel, whichever comes first. The
    worker, the deadline thread and executor threads (cancel) may all complete it."""

    def __init__(
        self,
        cancel: threading.Event,
        header: Header | None = None,
        report: Callable[[str], None] = lambda problem: None,
    ):
        self.future: Future[Outcome] = Future()
        self._report = report
        self.header = header or Header()
        self._cancel = cancel
        self._task: Future | None = None
        self._deadline: Deadline | None = None
        self.queue_ms = 0.0

    def cancel(self) -> None:
        """Withdraw it: a queued question ends now, a running one within one token (its outcome
        then carries the partial answer, stop reason "cancelled")."""
        self._cancel.set()
        if self._task is None or self._task.cancel():
            self.finish(error="cancelled before the model started")

    def expire(self, timeout: float) -> None:
        """The timeout: the caller hears now; the model stops within one token."""
        self.finish(error=f"no answer within query_timeout={timeout} s")  # first: it is the outcome
        self._cancel.set()
        if self._task is not None:
            self._task.cancel()

    def finish(self, answer: Answer | None = None, error: str = "") -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        outcome = Outcome(header=self.header, answer=answer, error=error, queue_ms=self.queue_ms)
        with contextlib.suppress(InvalidStateError):  # the first of answer/timeout/cancel wins
            self.future.set_result(outcome)

    def _settle(self, task: Future) -> None:
        """The worker's task ended (on the worker thread, or on the canceller's)."""
        if task.cancelled():
            self.finish(error="cancelled before the model started")
            return
        error = task.exception()
        if error is None:
            self.finish(answer=task.result())
        elif isinstance(error, (ImageConversionError, InvalidInput, ModelUnavailable)):
            self.finish(error=str(error))  # the caller's input, or a state diagnostics shows
        else:
            # The node's own failure (out of memory, a bug): the caller hears, and so do the
            # log and /diagnostics, where an operator looks.
            problem = str(error) if isinstance(error, EngineError) else f"internal error: {error!r}"
            self._report(problem)
            self.finish(error=problem)


class Asker:
    """Puts Questions on the worker and never waits for them: start() returns at once with a
    PendingQuestion, so no executor thread is held while the model works. Any executor thread
    may call start(); the model work runs on the worker, the timeouts on one Deadlines thread."""

    def __init__(
        self,
        worker: InferenceWorker,
        engine: Callable[[], VLMEngine],  # the loaded engine, or raises ModelUnavailable
        settings: Callable[[], Settings],
        cameras: Callable[[], CameraInputs | None],  # None while inactive
        camera_names: list[str],
        topic_of_camera: Callable[[str], str],
        report: Callable[[str], None] = lambda problem: None,
    ):
        self._worker = worker
        self._report = report
        self._engine = engine
        self._settings = settings
        self._cameras = cameras
        self._camera_names = camera_names
        self._topic_of_camera = topic_of_camera
        self._deadlines = Deadlines(on_error=lambda error: None)

    def close(self) -> None:
        self._deadlines.close()

    def start(
        self,
        question: Question,
        on_token: Callable[[str], None] | None = None,
    ) -> PendingQuestion:
        settings = self._settings()
        cancel = threading.Event()
        try:
            self._check(question)
            frame_msg = self._image(question)
            schema = load_schema(question.json_schema)
        except (InvalidInput, LookupError) as error:
            pending = PendingQuestion(cancel)
            pending.finish(error=str(error))
            return pending
        pending = PendingQuestion(cancel, frame_msg.header, self._report)
        queued_at = time.monotonic()

        def answer() -> Answer:
            pending.queue_ms = (time.monotonic() - queued_at) * 1000.0
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
            task = self._worker.submit(answer, cancel)
        except WorkerBusy as error:
            pending.finish(error=f"busy: {error}")
            return pending
        pending._task = task
        timeout = settings["query_timeout"]
        # The timeout counts the queue too: the caller's budget, not the model's.
        pending._deadline = self._deadlines.call_in(timeout, lambda: pending.expire(timeout))
        task.add_done_callback(pending._settle)
        return pending

    def _check(self, question: Question) -> None:
        """What can be refused before the question queues: its answer budget and, with a model
        loaded, its length in that model's tokens."""
        most = MAX_NEW_TOKENS.high
        if not 0 <= question.max_new_tokens <= most:
            raise InvalidInput(
                f"max_new_tokens is {question.max_new_tokens}, outside 0..{most:g} (0 = the node's max_new_tokens)"
            )
        try:
            engine = self._engine()
        except ModelUnavailable:
            return  # the worker says why there is no answer
        engine.check_prompt(question.prompt)

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
