"""The nanovlm node: camera frames in, answers out; a query service for behavior trees.

A thin adapter: it turns messages into frames, parameters into an EngineConfig and answers into
messages. The model runs on one worker thread (inference_worker.py), so the executor keeps
serving subscriptions, the service and parameter changes while the model is busy.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup

try:  # Jazzy and later
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from nanovlm.msg import VLMResult
from nanovlm.srv import Query

from . import parameters
from .default_model import DEFAULT_MODEL_DESCRIPTION, ensure_default_model
from .engine import Answer, EngineConfig, EngineError, InvalidInput, VLMEngine
from .engine.structured import load_schema
from .image_conversion import (
    ImageConversionError,
    check_image_msg,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    is_empty,
)
from .inference_worker import InferenceWorker, WorkerBusy
from .ros_entry import spin_node
from .sequence_gaps import SequenceGaps

ERROR_THROTTLE_S = 5.0
# Jazzy and later hand a subscription callback the message's MessageInfo (sequence numbers).
CALLBACKS_TAKE_MESSAGE_INFO = hasattr(getattr(Subscription, "CallbackType", None), "WithMessageInfo")


class ModelUnavailable(RuntimeError):
    """No model is loaded (still loading, or the load failed); str() says which."""


class VLMNode(Node):
    def __init__(self, **kwargs):
        super().__init__("nanovlm", **kwargs)
        # Which copy runs matters when a workspace overlays a pip install: say it.
        self.get_logger().info(f"nanovlm node starting, code in {Path(__file__).resolve().parent}")
        self._declare_parameters()

        self._engine: VLMEngine | None = None
        self._engine_status = "the model is loading"
        # The parsed json_schema parameter (checked when set); replaced whole, read by the worker.
        self._json_schema = load_schema(self._param("json_schema"))
        self._latest_frame: Image | CompressedImage | None = None
        self._counts_lock = threading.Lock()
        self.frames_received = 0
        self.frames_rejected = 0  # invalid messages, failed conversions, errors while answering
        self._frames_lost_events = 0  # what DDS reports as lost (message-lost events)
        self._sequence_gaps = SequenceGaps()  # what the publishers' sequence numbers show missing
        self.frames_answered = 0

        self._answer_pub = self.create_publisher(String, "answer", 10)
        self._result_pub = self.create_publisher(VLMResult, "result", 10)
        self._result_json_pub = self.create_publisher(String, "result_json", 10)

        self._worker = InferenceWorker(
            self._answer_frame,
            rate_hz=self._param("rate"),
            on_error=lambda error: self.get_logger().error(f"frame failed: {error!r}"),
        )

        camera_group = MutuallyExclusiveCallbackGroup()
        cameras = [(Image, "image", self._image_callback)]
        if self._param("subscribe_compressed"):
            cameras.append((CompressedImage, "image/compressed", self._compressed_callback))
        for message_type, topic, callback in cameras:
            self.create_subscription(
                message_type,
                topic,
                self._with_message_info(callback, topic),
                qos_profile_sensor_data,
                callback_group=camera_group,
                event_callbacks=SubscriptionEventCallbacks(message_lost=self._frames_lost_callback),
                qos_overriding_options=QoSOverridingOptions.with_default_policies(),
            )
        # Reentrant: several callers may wait for their answers at once.
        self.create_service(Query, "query", self._query_callback, callback_group=ReentrantCallbackGroup())
        self.add_on_set_parameters_callback(self._validate_parameters)
        if hasattr(self, "add_post_set_parameters_callback"):
            self.add_post_set_parameters_callback(self._apply_parameters)
        self._stats_timer = self.create_timer(10.0, self._log_stats)

        self._worker.start()
        self._worker.submit(self._load_engine)

    # ---- parameters -------------------------------------------------------------------------

    def _declare_parameters(self) -> None:
        max_prompt_chars = None
        for spec in parameters.SPECS:
            try:
                value = self.declare_parameter(spec.name, spec.default, spec.descriptor()).value
            except Exception as error:  # noqa: BLE001 - rclpy raises several types here
                self.get_logger().error(f"{spec.name}: {error}; using the default {spec.default!r}")
                value = self.declare_parameter(spec.name, spec.default, spec.descriptor(), ignore_override=True).value
            if spec.name == "max_prompt_chars":
                max_prompt_chars = value
        for spec in parameters.SPECS:
            # model.path keeps its value: a wrong path is reported by the load, and the node must
            # not quietly answer with another model.
            if spec.name == "model.path":
                continue
            reason = parameters.check(spec.name, self._param(spec.name), max_prompt_chars)
            if reason:
                self.get_logger().error(f"{reason}; using the default {spec.default!r}")
                self.set_parameters([Parameter(spec.name, value=spec.default)])

    def _param(self, name: str):
        return self.get_parameter(name).value

    def _validate_parameters(self, changed: list[Parameter]) -> SetParametersResult:
        max_prompt_chars = self._param("max_prompt_chars")
        for parameter in changed:
            reason = parameters.check(parameter.name, parameter.value, max_prompt_chars)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        if not hasattr(self, "add_post_set_parameters_callback"):  # Humble: no post-set hook
            self._apply_parameters(changed)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, changed: list[Parameter]) -> None:
        for parameter in changed:
            if parameter.name == "rate":
                self._worker.set_rate(parameter.value)
            elif parameter.name == "json_schema":
                self._json_schema = load_schema(parameter.value)
            elif parameter.name == "model.path":
                try:
                    self._worker.submit(lambda path=parameter.value: self._load_engine(path))
                except WorkerBusy as error:
                    # The value is set but the old model stays: say so, rather than crash the node.
                    self.get_logger().error(f"model.path: the new model is not loaded ({error}); set it again later")
                    continue
                self._engine_status = "the model is loading"

    # ---- model ------------------------------------------------------------------------------

    def _load_engine(self, model_path: str | None = None) -> None:
        """Runs on the worker: replace the engine (the old one goes first, to free its memory)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if model_path is None:
            model_path = self._param("model.path")
        try:
            if not model_path:
                model_path = str(ensure_default_model())
            config = EngineConfig(
                model_path=model_path,
                device=self._param("model.device"),
                dtype=self._param("model.dtype"),
                max_context_tokens=self._param("model.max_context_tokens"),
                max_new_tokens=self._param("max_new_tokens"),
                max_prompt_chars=self._param("max_prompt_chars"),
                max_image_pixels=self._param("max_image_pixels"),
            )
            engine = VLMEngine.load(config)
        except Exception as error:  # noqa: BLE001 - any load failure leaves a clear state, never "loading"
            reason = str(error) if isinstance(error, (EngineError, ValueError, OSError)) else repr(error)
            self._engine_status = f"no model loaded: {reason}"
            self.get_logger().error(self._engine_status)
            return
        self._engine = engine
        self._engine_status = ""
        note = f" ({DEFAULT_MODEL_DESCRIPTION})" if not self._param("model.path") else ""
        self.get_logger().info(f"model '{engine.model_name}' loaded on {engine.device}{note}")

    def _ask(self, frame_msg, prompt: str, max_new_tokens: int | None, json_schema: dict | None = None) -> Answer:
        """Runs on the worker: one answer about one image message. JSON mode: `json_schema`
        (a request's), else the node's json_schema, else json_output (any object)."""
        engine = self._engine
        if engine is None:
            raise ModelUnavailable(self._engine_status)
        max_pixels = self._param("max_image_pixels")
        if isinstance(frame_msg, CompressedImage):
            frame = compressed_msg_to_rgb(frame_msg, max_pixels)
        else:
            frame = image_msg_to_rgb(frame_msg, max_pixels)
        if json_schema is None:
            json_schema = self._json_schema
        return engine.ask(
            prompt,
            frame,
            system_prompt=self._param("system_prompt"),
            max_new_tokens=max_new_tokens or self._param("max_new_tokens"),
            json_output=self._param("json_output"),
            json_schema=json_schema,
        )

    # ---- camera stream ----------------------------------------------------------------------

    def _with_message_info(self, callback, topic: str):
        """A subscription callback that counts, before `callback(msg)`, the frames the
        publisher sent that never arrived (where rclpy passes the MessageInfo)."""
        if not CALLBACKS_TAKE_MESSAGE_INFO:  # Humble: the message-lost events only
            return callback

        def receive(msg, info) -> None:
            sequence_number = info.get("publication_sequence_number")
            if sequence_number is not None:
                with self._counts_lock:
                    self._sequence_gaps.observe((topic, str(info.get("publisher_gid"))), sequence_number)
            callback(msg)

        return receive

    def _image_callback(self, msg: Image) -> None:
        self._count("frames_received")
        try:
            check_image_msg(msg, self._param("max_image_pixels"))
        except ImageConversionError as error:
            self._reject_frame(error)
            return
        self._latest_frame = msg
        self._worker.offer_frame(msg)

    def _frames_lost_callback(self, info) -> None:
        with self._counts_lock:
            self._frames_lost_events += info.total_count_change

    @property
    def frames_lost(self) -> int:
        """Frames published that never reached the node: the sequence-number gaps, which also
        cover what DDS reports, where the rmw gives sequence numbers; else DDS's reports."""
        return max(self._sequence_gaps.missing, self._frames_lost_events)

    def _compressed_callback(self, msg: CompressedImage) -> None:
        self._count("frames_received")
        # Decoding waits for the worker: most frames are dropped and never need it.
        self._latest_frame = msg
        self._worker.offer_frame(msg)

    def _answer_frame(self, msg) -> None:
        """Runs on the worker for each frame the rate limiter lets through."""
        prompt = self._param("prompt")
        try:
            answer = self._ask(msg, prompt, None)
        except (ImageConversionError, EngineError, ModelUnavailable) as error:
            self._reject_frame(error)
            return
        self._count("frames_answered")
        self._publish(msg.header, prompt, answer)

    def _reject_frame(self, error: Exception) -> None:
        self._count("frames_rejected")
        self.get_logger().error(f"frame dropped: {error}", throttle_duration_sec=ERROR_THROTTLE_S)

    def _publish(self, header: Header, prompt: str, answer: Answer) -> None:
        result = VLMResult()
        result.header = header
        result.prompt = prompt
        result.answer = answer.text
        result.json = answer.json
        result.json_error = answer.json_error
        result.model = self._engine.model_name if self._engine else ""
        result.vision_ms = answer.timings.vision_ms
        result.prefill_ms = answer.timings.prefill_ms
        result.decode_ms = answer.timings.decode_ms
        result.total_ms = answer.timings.total_ms
        result.prompt_tokens = answer.prompt_tokens
        result.reused_tokens = answer.reused_tokens
        result.generated_tokens = answer.generated_tokens
        result.image_cache_hit = answer.image_cache_hit
        result.frames_dropped = self.frames_dropped
        self._answer_pub.publish(String(data=answer.text))
        self._result_pub.publish(result)
        self._result_json_pub.publish(String(data=result_to_json(result)))

    # ---- query service ----------------------------------------------------------------------

    def _query_callback(self, request: Query.Request, response: Query.Response) -> Query.Response:
        response.success = False
        frame_msg = request.image
        if is_empty(frame_msg):
            frame_msg = self._latest_frame
            if frame_msg is None:
                response.error = (
                    "no camera frame has arrived yet on "
                    f"'{self.resolve_topic_name('image')}'; send an image in the request"
                )
                return response
        response.header = frame_msg.header
        try:
            json_schema = load_schema(request.json_schema)
        except InvalidInput as error:
            response.error = str(error)
            return response
        try:
            future = self._worker.submit(
                lambda: self._ask(frame_msg, request.prompt, request.max_new_tokens, json_schema)
            )
        except WorkerBusy as error:
            response.error = f"busy: {error}"
            return response
        timeout = self._param("query_timeout")
        try:
            answer = future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            response.error = f"no answer within query_timeout={timeout} s"
            return response
        except (ImageConversionError, EngineError, ModelUnavailable) as error:
            response.error = str(error)
            return response
        except Exception as error:  # noqa: BLE001 - a caller always gets a reply
            self.get_logger().error(f"query failed: {error!r}")
            response.error = f"internal error: {error!r}"
            return response
        response.answer = answer.text
        response.json = answer.json
        response.error = answer.json_error
        # JSON mode without complete JSON is a failure: a robot program must not parse the partial text.
        response.success = not answer.json_error
        return response

    # ---- bookkeeping ------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._counts_lock:
            setattr(self, name, getattr(self, name) + 1)

    @property
    def frames_dropped(self) -> int:
        """Frames that got no answer: lost on the way, replaced by a newer one while waiting for
        the model, or rejected."""
        return self.frames_lost + self._worker.frames_replaced + self.frames_rejected

    def _log_stats(self) -> None:
        if self.frames_received:
            self.get_logger().info(
                f"frames: {self.frames_received} received, {self.frames_answered} answered, "
                f"{self._worker.frames_replaced} dropped for newer ones, {self.frames_rejected} rejected, "
                f"{self.frames_lost} lost before reaching the node"
            )

    def destroy_node(self) -> None:
        self._worker.stop()
        super().destroy_node()


def result_to_json(result: VLMResult) -> str:
    """The result as one JSON document, for consumers that cannot import nanovlm messages."""
    parsed = json.loads(result.json) if result.json else None
    document = {
        "answer": result.answer,
        "json": parsed,
        "json_error": result.json_error,
        "prompt": result.prompt,
        "stamp": {"sec": result.header.stamp.sec, "nanosec": result.header.stamp.nanosec},
        "frame_id": result.header.frame_id,
        "model": result.model,
        "timings_ms": {
            "vision": round(result.vision_ms, 3),
            "prefill": round(result.prefill_ms, 3),
            "decode": round(result.decode_ms, 3),
            "total": round(result.total_ms, 3),
        },
        "tokens": {
            "prompt": result.prompt_tokens,
            "reused": result.reused_tokens,
            "generated": result.generated_tokens,
        },
        "image_cache_hit": result.image_cache_hit,
        "frames_dropped": result.frames_dropped,
    }
    return json.dumps(document, ensure_ascii=False)


def main(args=None) -> None:
    spin_node(VLMNode, threads=4, args=args)


if __name__ == "__main__":
    main()
