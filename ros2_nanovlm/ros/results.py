"""What one camera publishes for each answered frame: the answer (String), the VLMResult, the
same result as one JSON document (String), and the annotated image (raw and jpeg).

The annotated image costs an opencv draw and, for the compressed topic, a jpeg encode: both are
skipped while nobody subscribes. Everything published keeps the answered frame's header, so
rviz and message_filters can match answers to frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import cv2
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from nanovlm.msg import VLMResult

from ..engine import Answer
from .annotated_image import annotate
from .image_conversion import rgb_to_image_msg

JPEG_QUALITY = 85


@dataclass(frozen=True)
class AnsweredFrame:
    """One answer and what it was about: the worker hands this to CameraOutputs.publish."""

    header: Header
    frame: np.ndarray  # the RGB frame that was answered
    prompt: str
    answer: Answer
    model: str
    latency_ms: float | None  # frame stamp (or receipt) -> publish
    frames_dropped: int
    # With several cameras the frames of one batch go through the vision encoder together,
    # before their answers (which then find the embedding cached): each carries its share.
    batch_vision_ms: float = 0.0


def topic(camera: str, name: str) -> str:
    """`name` for the unnamed default camera, `<camera>/name` for a named one."""
    return f"{camera}/{name}" if camera else name


class CameraOutputs:
    """The publishers of one camera. Created and destroyed by the node (executor thread);
    publish() runs on the inference worker thread (rclpy publishers are thread-safe)."""

    def __init__(self, node: Node, camera: str):
        self._node = node
        self.camera = camera
        self._answer = node.create_publisher(String, topic(camera, "answer"), 10)
        self._result = node.create_publisher(VLMResult, topic(camera, "result"), 10)
        self._result_json = node.create_publisher(String, topic(camera, "result_json"), 10)
        self._annotated = node.create_publisher(Image, topic(camera, "annotated_image"), 1)
        self._annotated_jpeg = node.create_publisher(CompressedImage, topic(camera, "annotated_image/compressed"), 1)

    def publish(self, answered: AnsweredFrame) -> bool:
        """Publish everything about one answer; True when an annotated image went out too."""
        result = result_message(answered)
        self._answer.publish(String(data=answered.answer.text))
        self._result.publish(result)
        self._result_json.publish(String(data=result_to_json(result)))
        return self._publish_annotated(answered)

    def _publish_annotated(self, answered: AnsweredFrame) -> bool:
        raw_wanted = self._annotated.get_subscription_count() > 0
        jpeg_wanted = self._annotated_jpeg.get_subscription_count() > 0
        if not (raw_wanted or jpeg_wanted):
            return False
        latency = f" | {answered.latency_ms:.0f} ms" if answered.latency_ms is not None else ""
        status = f"{answered.model}{latency} | {answered.answer.generated_tokens} tokens"
        pixels = annotate(answered.frame, answered.prompt, answered.answer.text, status)
        if raw_wanted:
            self._annotated.publish(rgb_to_image_msg(pixels, "rgb8", header=answered.header))
        if jpeg_wanted:
            ok, encoded = cv2.imencode(
                ".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
            )
            if ok:
                self._annotated_jpeg.publish(
                    CompressedImage(header=answered.header, format="jpeg", data=encoded.tobytes())
                )

    def destroy(self) -> None:
        for publisher in (self._answer, self._result, self._result_json, self._annotated, self._annotated_jpeg):
            self._node.destroy_publisher(publisher)


def result_message(answered: AnsweredFrame) -> VLMResult:
    answer = answered.answer
    return VLMResult(
        header=answered.header,
        prompt=answered.prompt,
        answer=answer.text,
        json=answer.json,
        json_error=answer.json_error,
        model=answered.model,
        vision_ms=answer.timings.vision_ms + answered.batch_vision_ms,
        prefill_ms=answer.timings.prefill_ms,
        decode_ms=answer.timings.decode_ms,
        total_ms=answer.timings.total_ms + answered.batch_vision_ms,
        prompt_tokens=answer.prompt_tokens,
        reused_tokens=answer.reused_tokens,
        generated_tokens=answer.generated_tokens,
        image_cache_hit=answer.image_cache_hit,
        frames_dropped=answered.frames_dropped,
    )


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
