"""Camera images read from their serialized bytes (raw subscriptions): every field the same as
rclpy's own deserialization, the pixels a view into the bytes, and anything that does not add
up handed to rclpy (which is always right)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from ros2_nanovlm.ros.image_conversion import image_msg_to_rgb, rgb_to_image_msg
from ros2_nanovlm.ros.raw_image import RawImage, read_image

FIELDS = ("height", "width", "encoding", "is_bigendian", "step")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    sec=st.integers(-(2**31), 2**31 - 1),
    nanosec=st.integers(0, 2**32 - 1),
    frame_id=st.text(max_size=30),
    encoding=st.text(max_size=12),
    sizes=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    is_bigendian=st.integers(0, 255),
    data=st.binary(max_size=64),
)
def test_every_field_reads_as_rclpy_deserializes_it(sec, nanosec, frame_id, encoding, sizes, is_bigendian, data):
    msg = Image(encoding=encoding, is_bigendian=is_bigendian, data=data)
    msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = sec, nanosec, frame_id
    msg.height, msg.width, msg.step = sizes
    serialized = serialize_message(msg)
    raw = read_image(serialized)
    assert isinstance(raw, RawImage)
    expected = deserialize_message(serialized, Image)
    assert raw.header == expected.header
    assert [getattr(raw, name) for name in FIELDS] == [getattr(expected, name) for name in FIELDS]
    assert bytes(raw.data) == bytes(expected.data)


def test_a_raw_frame_converts_like_the_message_without_copying_its_pixels(photos):
    msg = rgb_to_image_msg(photos["dogs"], "bgr8", Header(frame_id="camera"))
    serialized = serialize_message(msg)
    raw = read_image(serialized)
    assert raw.data.obj is serialized  # a view into the arrived bytes
    assert np.array_equal(image_msg_to_rgb(raw, 1 << 24), photos["dogs"])


def test_bytes_that_do_not_add_up_go_to_rclpy():
    serialized = serialize_message(rgb_to_image_msg(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(Exception):  # noqa: B017 - rclpy's own error, whatever its type
        read_image(serialized[:-10])  # the pixels are cut short
    unknown_layout = b"\x00\x07" + serialized[2:]  # not plain CDR: rclpy decides
    try:
        message = read_image(unknown_layout)
    except Exception:  # noqa: BLE001 - refusing it is as right as reading it
        return
    assert not isinstance(message, RawImage)
