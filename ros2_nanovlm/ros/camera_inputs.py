"""The camera subscriptions: `<camera>/image` (and `<camera>/image/compressed`) per camera.

Each arriving frame is counted, checked cheaply (header fields and buffer size; for a compressed
frame its format and declared size; decoding waits for the worker, since most frames are
replaced before the model is free), kept as the camera's
latest frame for queries, and offered to the worker, which keeps only the newest per camera.

Raw images are subscribed serialized and read by raw_image.py: only the frames the model answers
are ever converted, and none is deserialized by rclpy first (raw_image.py says why).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image

try:  # Jazzy and later
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

from ..worker import InferenceWorker
from .frame_stats import FrameStats
from .image_conversion import ImageConversionError, check_compressed_msg, check_image_msg
from .raw_image import RawImage, read_image
from .results import topic

# Jazzy and later hand a subscription callback the message's MessageInfo (sequence numbers).
CALLBACKS_TAKE_MESSAGE_INFO = hasattr(getattr(Subscription, "CallbackType", None), "WithMessageInfo")


@dataclass(frozen=True)
class IncomingFrame:
    """A camera message as the worker gets it."""

    camera: str
    msg: RawImage | Image | CompressedImage
    received_at: float = field(default_factory=time.monotonic)  # monotonic seconds


class CameraInputs:
    """Owns the subscriptions of every camera and each camera's latest frame. Callbacks run in
    one mutually exclusive group (frames arrive in order per camera); `latest()` is read by the
    query service and the action from other executor threads (a single reference swap)."""

    def __init__(
        self,
        node: Node,
        cameras: list[str],
        *,
        compressed: bool,
        stats: FrameStats,
        worker: InferenceWorker,
        max_pixels: Callable[[], int],
        on_rejected: Callable[[str, Exception], None],
    ):
        self._node = node
        self._stats = stats
        self._worker = worker
        self._max_pixels = max_pixels
        self._on_rejected = on_rejected
        self._latest: dict[str, IncomingFrame] = {}
        self._subscriptions = []
        group = MutuallyExclusiveCallbackGroup()
        for camera in cameras:
            inputs = [(Image, topic(camera, "image"), self._image_callback, True)]
            if compressed:  # small: deserialized as usual
                inputs.append((CompressedImage, topic(camera, "image/compressed"), self._compressed_callback, False))
            for message_type, name, callback, raw in inputs:
                self._subscriptions.append(
                    node.create_subscription(
                        message_type,
                        name,
                        self._receiver(camera, name, callback),
                        qos_profile_sensor_data,
                        callback_group=group,
                        raw=raw,
                        event_callbacks=SubscriptionEventCallbacks(
                            message_lost=lambda info, camera=camera: stats.lost_events(camera, info.total_count_change)
                        ),
                        qos_overriding_options=QoSOverridingOptions.with_default_policies(),
                    )
                )

    def latest(self, camera: str) -> IncomingFrame | None:
        return self._latest.get(camera)

    def destroy(self) -> None:
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)
        self._subscriptions.clear()

    def _receiver(self, camera: str, topic_name: str, callback):
        """The subscription callback: counts, before `callback(camera, msg)`, the frames the
        publisher sent that never arrived (where rclpy passes the MessageInfo)."""
        if not CALLBACKS_TAKE_MESSAGE_INFO:  # Humble: the message-lost events only
            return lambda msg: callback(camera, msg)

        def receive(msg, info) -> None:
            sequence_number = info.get("publication_sequence_number")
            if sequence_number is not None:
                publisher = (topic_name, str(info.get("publisher_gid")))
                self._stats.sequence_number(camera, publisher, sequence_number)
            callback(camera, msg)

        return receive

    def _image_callback(self, camera: str, serialized: bytes) -> None:
        self._stats.received(camera)
        try:
            msg = read_image(serialized)
            check_image_msg(msg, self._max_pixels())
        except ImageConversionError as error:
            self._on_rejected(camera, error)
            return
        except Exception as error:  # noqa: BLE001 - rclpy's deserialization raises several types
            self._on_rejected(camera, ImageConversionError(f"not a sensor_msgs/Image: {error}"))
            return
            self._on_rejected(camera, error)
            return
        self._offer(IncomingFrame(camera, msg))

    def _compressed_callback(self, camera: str, msg: CompressedImage) -> None:
        self._stats.received(camera)
        # The header only (format, declared size): a small file declaring a huge image is
        # refused here, and never becomes the latest frame a query would decode again.
        try:
            check_compressed_msg(msg, self._max_pixels())
        except ImageConversionError as error:
            self._on_rejected(camera, error)
            return
        self._offer(IncomingFrame(camera, msg))

    def _offer(self, frame: IncomingFrame) -> None:
        self._latest[frame.camera] = frame
        if self._worker.offer_frame(frame, frame.camera):
            self._stats.replaced(frame.camera)
