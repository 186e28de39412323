"""A camera stand-in: plays photographs as a sensor_msgs/Image stream at a fixed rate.

nanovlm-camera --ros-args -p rate:=10.0 -p encoding:=bgr8 -r image:=/camera/image_raw
"""

from __future__ import annotations

import collections

from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from .resources import bundled_photos_dir, list_photos, load_photo
from .ros.entry import spin_node
from .ros.image_conversion import ENCODINGS, rgb_to_compressed_msg, rgb_to_image_msg

SENT_STAMPS_KEPT = 1000


class CameraPlayer(Node):
    def __init__(self, **kwargs):
        super().__init__("camera_player", **kwargs)
        source = self.declare_parameter("photos", str(bundled_photos_dir())).value
        rate = self.declare_parameter("rate", 5.0).value
        self._encoding = self.declare_parameter("encoding", "rgb8").value
        self._frame_id = self.declare_parameter("frame_id", "camera").value
        self._count = self.declare_parameter("count", 0).value  # frames to send; 0 = forever
        width = self.declare_parameter("width", 640).value
        publish_compressed = self.declare_parameter("publish_compressed", False).value
        if self._encoding not in ENCODINGS:
            raise ValueError(f"encoding '{self._encoding}' is not one of {', '.join(ENCODINGS)}")
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")

        self.photos = list_photos(source)
        # Even sizes: 4:2:2 and 4:2:0 encodings (yuv422, nv12) share chroma between pixel pairs.
        self._frames = [_even(load_photo(path, width)) for path in self.photos]
        self._publisher = self.create_publisher(Image, "image", qos_profile_sensor_data)
        self._compressed_publisher = (
            self.create_publisher(CompressedImage, "image/compressed", qos_profile_sensor_data)
            if publish_compressed
            else None
        )
        self.sent = 0
        # stamp -> photo name of the last frames sent (the demo names the photo of each answer);
        # bounded, since the player may run for days
        self.sent_stamps: collections.OrderedDict[tuple[int, int], str] = collections.OrderedDict()
        self._timer = self.create_timer(1.0 / rate, self._publish_next)
        self.get_logger().info(f"playing {len(self.photos)} photos from {source} at {rate} Hz as {self._encoding}")

    def _publish_next(self) -> None:
        if self._count and self.sent >= self._count:
            self._timer.cancel()
            return
        index = self.sent % len(self._frames)
        msg = rgb_to_image_msg(self._frames[index], self._encoding)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self._frame_id
        self._publisher.publish(msg)
        if self._compressed_publisher is not None:
            self._compressed_publisher.publish(rgb_to_compressed_msg(self._frames[index], header=msg.header))
        self.sent_stamps[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = self.photos[index].name
        if len(self.sent_stamps) > SENT_STAMPS_KEPT:
            self.sent_stamps.popitem(last=False)
        self.sent += 1


def _even(frame):
    return frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2]


def main(args=None) -> None:
    spin_node(CameraPlayer, args=args)


if __name__ == "__main__":
    main()
