"""The nanovlm node: camera frames in, answers out; a query service and an Ask action for
behavior trees; /diagnostics and an annotated image for rqt and rviz.

A thin adapter over parts with one job each, wired here:
  parameters.Settings  one snapshot of the parameters, replaced whole on a change
  FrameStats           every frame's fate, per camera (frame_stats.py)
  CameraInputs         the subscriptions (camera_inputs.py)
  CameraOutputs        the publishers of each camera (results.py)
  QueryService, AskAction, Diagnostics
  InferenceWorker      the one thread that runs the model (../worker.py), and ModelSlot
VLMNode is the plain node (loads and activates itself); lifecycle_node.py drives the same
parts through configure / activate / deactivate / cleanup.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ..default_model import DEFAULT_MODEL_DESCRIPTION, ensure_default_model
from ..engine import EngineConfig, EngineError
from ..worker import InferenceWorker, WorkerBusy
from . import parameters
from .ask_action import AskAction
from .asking import Asker, ask_engine, frame_to_rgb
from .camera_inputs import CALLBACKS_TAKE_MESSAGE_INFO, CameraInputs, IncomingFrame
from .diagnostics import Diagnostics, ModelState
from .entry import spin_node
from .frame_stats import FrameStats
from .image_conversion import ImageConversionError
from .model_slot import ModelSlot, ModelUnavailable
from .parameters import Settings
from .query_service import QueryService
from .results import AnsweredFrame, CameraOutputs, topic

ERROR_THROTTLE_S = 5.0
EXECUTOR_THREADS = 4
LOAD_WAIT_S = 3600.0  # a lifecycle configure waits this long at most for the model to load

__all__ = ["CALLBACKS_TAKE_MESSAGE_INFO", "NodeParts", "VLMNode", "main"]


class NodeParts:
    """Owns every part of one nanovlm node and their lifetimes; `node` is the rclpy Node (plain
    or lifecycle) they live in. Executor threads call the lifecycle methods and the parameter
    callbacks; the worker thread runs _answer_frames and the model loads."""

    def __init__(self, node: Node):
        self.node = node
        self._log = node.get_logger()
        # Which copy runs matters when a workspace overlays a pip install: say it.
        self._log.info(f"nanovlm node starting, code in {Path(__file__).resolve().parent.parent}")
        self.settings = Settings.from_values(self._declare_parameters())
        self.cameras: list[str] = list(self.settings["cameras"]) or [""]
        self.stats = FrameStats(self.cameras)
        self.model = ModelSlot(self._log.error)
        self._active = False
        self._wants_model = False  # configured: a new model.path loads at once
        self._stopping = threading.Event()  # cancels a frame's answer at shutdown
        self._inputs: CameraInputs | None = None
        self._outputs: dict[str, CameraOutputs] = {}
        self.worker = InferenceWorker(
            self._answer_frames,
            rate_hz=self.settings["rate"],
            max_pending_tasks=self.settings["max_pending_requests"],
            max_batch=len(self.cameras),
            on_error=self._frames_failed,
        )
        # Queries and goals wait as suspended coroutines, holding no thread: these threads serve
        # the cameras, parameters, timers and request intake, however many requests wait.
        self.executor_threads = EXECUTOR_THREADS

        requests = ReentrantCallbackGroup()
        self._asker = asker = Asker(
            self.worker,
            self.model.engine,
            lambda: self.settings,
            lambda: self._inputs,
            self.cameras,
            lambda camera: node.resolve_topic_name(topic(camera, "image")),
            report=self._report_request_error,
        )
        self._query = QueryService(node, asker, requests, is_active=lambda: self._active)
        self._action = AskAction(
            node,
            asker,
            requests,
            is_active=lambda: self._active,
            feedback_period=lambda: self.settings["feedback_period"],
        )
        self._diagnostics = Diagnostics(
            node,
            self.stats,
            self._model_state,
            rate_hz=lambda: self.settings["rate"],
            stale_after_s=lambda: self.settings["diagnostics.stale_after"],
        )
        node.add_on_set_parameters_callback(self._validate_parameters)
        if hasattr(node, "add_post_set_parameters_callback"):
            node.add_post_set_parameters_callback(self._apply_parameters)
        self._stats_timer = node.create_timer(10.0, self._log_stats)
        self.worker.start()

    # ---- lifetimes --------------------------------------------------------------------------

    def load_model(self):
        """Queue the model load on the worker; returns its Future (True when loaded)."""
        previous = (self.model.loading, self.model.problem)
        self.model.mark_loading()  # before the submit: the load itself may finish first
        try:
            future = self.worker.submit(self._load_and_check_prompts)
        except WorkerBusy:
            self.model.loading, self.model.problem = previous
            raise
        self._wants_model = True
        return future

    def activate(self) -> None:
        self._outputs = {camera: CameraOutputs(self.node, camera) for camera in self.cameras}
        self._inputs = CameraInputs(
            self.node,
            self.cameras,
            compressed=self.settings["subscribe_compressed"],
            stats=self.stats,
            worker=self.worker,
            max_pixels=lambda: self.settings["max_image_pixels"],
            on_rejected=self._reject_frame,
        )
        self._active = True

    def deactivate(self) -> None:
        self._active = False
        if self._inputs is not None:
            self._inputs.destroy()
            self._inputs = None
        # Frames still waiting will not be answered: count them, as the worker would have.
        for camera, _ in self.worker.drop_frames():
            self.stats.replaced(camera)
        outputs, self._outputs = self._outputs, {}
        for camera_outputs in outputs.values():
            camera_outputs.destroy()

    def cleanup(self) -> None:
        """Free the model and its memory (on the worker, after any running answer)."""
        if self._active:
            self.deactivate()
        self._wants_model = False
        self.worker.submit(self.model.close).result(timeout=LOAD_WAIT_S)

    def destroy(self) -> None:
        self._stopping.set()
        self._active = False
        self._asker.close()
        self.worker.stop()
        self.model.close()

    # ---- parameters -------------------------------------------------------------------------

    def _declare_parameters(self) -> dict:
        node = self.node
        for spec in parameters.SPECS:
            value = Parameter.Type.STRING_ARRAY if spec.string_array else spec.default
            try:
                node.declare_parameter(spec.name, value, spec.descriptor())
            except Exception as error:  # noqa: BLE001 - rclpy raises several types here
                self._log.error(f"{spec.name}: {error}; using the default {spec.default!r}")
                node.declare_parameter(spec.name, value, spec.descriptor(), ignore_override=True)
        values = {spec.name: self._param(spec.name) for spec in parameters.SPECS}
        for spec in parameters.SPECS:
            # model.path keeps its value: a wrong path is reported by the load, and the node must
            # not quietly answer with another model.
            if spec.name == "model.path":
                continue
            reason = parameters.check(spec.name, values[spec.name], values["max_prompt_tokens"])
            if reason:
                self._log.error(f"{reason}; using the default {spec.default!r}")
                if not spec.read_only:
                    node.set_parameters([Parameter(spec.name, value=spec.default)])
                values[spec.name] = spec.default
        return values

    def _param(self, name: str):
        try:
            value = self.node.get_parameter(name).value
        except ParameterUninitializedException:
            value = None
        spec = parameters.BY_NAME[name]
        return list(value or []) if spec.string_array else value

    def _validate_parameters(self, changed: list[Parameter]) -> SetParametersResult:
        max_prompt_tokens = self.settings["max_prompt_tokens"]
        engine = self.model.loaded
        count_tokens = engine.count_tokens if engine is not None else None
        for parameter in changed:
            reason = parameters.check(parameter.name, parameter.value, max_prompt_tokens, count_tokens)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            if parameter.name == "model.path" and self._wants_model and self.worker.queue_full:
                # The load would queue behind the requests and be refused: say so now, and keep
                # the value that names the model actually loaded.
                return SetParametersResult(
                    successful=False,
                    reason=f"busy: {self.worker.pending_tasks} requests wait for the model; set model.path again later",
                )
        if not hasattr(self.node, "add_post_set_parameters_callback"):  # Humble: no post-set hook
            self._apply_parameters(changed)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, changed: list[Parameter]) -> None:
        # One new snapshot for the whole change: the worker sees all of it or none of it.
        self.settings = self.settings.updated({p.name: p.value for p in changed})
        for parameter in changed:
            if parameter.name == "rate":
                self.worker.set_rate(parameter.value)
            elif parameter.name == "model.path" and self._wants_model:
                try:
                    self.load_model()
                except WorkerBusy as error:
                    # The value is set but the old model stays: say so, rather than crash the node.
                    self._log.error(f"model.path: the new model is not loaded ({error}); set it again later")

    # ---- model ------------------------------------------------------------------------------

    def _engine_config(self) -> EngineConfig:
        settings = self.settings
        model_path = settings["model.path"] or str(ensure_default_model())
        return EngineConfig(
            model_path=model_path,
            device=settings["model.device"],
            dtype=settings["model.dtype"],
            quantization=settings["model.quantization"],
            max_context_tokens=settings["model.max_context_tokens"],
            cpu_threads=settings["model.cpu_threads"],
            max_new_tokens=settings["max_new_tokens"],
            max_prompt_tokens=settings["max_prompt_tokens"],
            max_image_pixels=settings["max_image_pixels"],
        )

    def _load_and_check_prompts(self) -> bool:
        """Load (on the worker), then measure the prompts in the new model's tokens: they were
        checked only for length when set without a model. One too long goes back to its default,
        with an error, rather than failing every frame."""
        if not self.model.load(self._engine_config):
            return False
        engine = self.model.loaded
        limit = self.settings["max_prompt_tokens"]
        for name in ("prompt", "system_prompt"):
            reason = parameters.check(name, self.settings[name], limit, engine.count_tokens)
            if reason:
                default = parameters.BY_NAME[name].default
                self._log.error(f"{reason}; using the default {default!r}")
                self.node.set_parameters([Parameter(name, value=default)])
        return True

    def log_loaded(self) -> None:
        engine = self.model.loaded
        if engine is not None:
            note = f" ({DEFAULT_MODEL_DESCRIPTION})" if not self.settings["model.path"] else ""
            self._log.info(f"model '{engine.model_name}' loaded on {engine.device}{note}")

    def _model_state(self) -> ModelState:
        engine = self.model.loaded
        return ModelState(
            model=engine.model_name if engine else "",
            device=engine.device if engine else "",
            problem=self.model.problem,
            loading=self.model.loading,
            active=self._active,
            queue_depth=self.worker.pending_tasks + self.worker.waiting_frames,
            gpu_memory_mb=_cuda_memory_mb(engine.device) if engine else None,
        )

    # ---- camera stream (worker thread) ------------------------------------------------------

    def _answer_frames(self, batch: list[tuple[str, IncomingFrame]]) -> None:
        """Answer the frames the rate limiter let through, one settings snapshot for all. Several
        frames (several cameras) go through the vision encoder as one batch first."""
        settings = self.settings
        try:
            engine = self.model.engine()
        except ModelUnavailable as error:
            for camera, _ in batch:
                self._reject_frame(camera, error)
            return
        converted = []
        for camera, incoming in batch:
            try:
                converted.append((incoming, frame_to_rgb(incoming.msg, settings["max_image_pixels"])))
            except ImageConversionError as error:  # noqa: PERF203 - one frame's error, not the batch's
                self._reject_frame(camera, error)
        batch_vision_ms = 0.0
        if len(converted) > 1:
            started = time.perf_counter()
            try:
                engine.prepare_images([rgb for _, rgb in converted])
            except EngineError as error:  # each ask below reports its own frame's problem
                self._log.warning(f"batched image encoding failed: {error}")
            batch_vision_ms = (time.perf_counter() - started) * 1000.0 / len(converted)
        for incoming, rgb in converted:
            prompt = settings["prompt"]
            try:
                answer = ask_engine(engine, settings, rgb, prompt, cancel=self._stopping)
            except EngineError as error:
                self._reject_frame(incoming.camera, error)
                continue
            except Exception as error:  # noqa: BLE001 - a bug costs this frame, not the stream
                self._reject_frame(incoming.camera, f"internal error: {error!r}")
                continue
            latency_ms = self._latency_ms(incoming)
            self.stats.answered(incoming.camera, latency_ms)
            outputs = self._outputs.get(incoming.camera)
            if not self.node.context.ok():
                return  # Ctrl-C came during the answer: the publishers are gone with the context
            if outputs is not None:  # None once deactivated: the answer is counted, not published
                annotated = outputs.publish(
                    AnsweredFrame(
                        header=incoming.msg.header,
                        frame=rgb,
                        prompt=prompt,
                        answer=answer,
                        model=engine.model_name,
                        latency_ms=latency_ms,
                        frames_dropped=self.stats.dropped(incoming.camera),
                        batch_vision_ms=batch_vision_ms,
                    )
                )
                if annotated:
                    self.stats.annotated(incoming.camera)

    def _latency_ms(self, incoming: IncomingFrame) -> float:
        """Frame stamp -> now on the node's clock; from the frame's arrival when unstamped."""
        stamp = incoming.msg.header.stamp
        if stamp.sec or stamp.nanosec:
            now = self.node.get_clock().now().nanoseconds
            return (now - (stamp.sec * 1_000_000_000 + stamp.nanosec)) / 1e6
        return (time.monotonic() - incoming.received_at) * 1000.0

    def _frames_failed(self, error: BaseException) -> None:
        if self.node.context.ok():  # after Ctrl-C, publishing fails by design: not an error
            self._log.error(f"frames failed: {error!r}")

    def _report_request_error(self, problem: str) -> None:
        self.stats.error(problem)
        self._log.error(f"request failed: {problem}", throttle_duration_sec=ERROR_THROTTLE_S)

    def _reject_frame(self, camera: str, error: Exception | str) -> None:
        self.stats.rejected(camera, error)
        self._log.error(f"frame dropped: {error}", throttle_duration_sec=ERROR_THROTTLE_S)

    def _log_stats(self) -> None:
        snapshot = self.stats.snapshot()
        for camera, counts in snapshot.cameras.items():
            if counts["received"]:
                name = f"camera '{camera}': " if camera else ""
                self._log.info(
                    f"{name}frames: {counts['received']} received, {counts['answered']} answered, "
                    f"{counts['replaced']} dropped for newer ones, {counts['rejected']} rejected, "
                    f"{counts['lost']} lost before reaching the node"
                )


def _cuda_memory_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch  # only on CUDA, where the engine has imported it already

    return torch.cuda.memory_allocated(torch.device(device)) / 2**20


class VLMNode(Node):
    """The plain (unmanaged) node: loads its model in the background and serves at once."""

    def __init__(self, **kwargs):
        super().__init__("nanovlm", **kwargs)
        self.parts = NodeParts(self)
        self.executor_threads = self.parts.executor_threads
        self.parts.activate()
        self.parts.load_model().add_done_callback(lambda future: self.parts.log_loaded())

    def destroy_node(self) -> None:
        self.parts.destroy()
        super().destroy_node()


def main(args=None) -> None:
    spin_node(VLMNode, args=args)


if __name__ == "__main__":
    main()
