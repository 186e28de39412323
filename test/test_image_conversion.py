"""The message <-> frame converter, on hand-built messages (no spinning)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from ros2_nanovlm.ros.image_conversion import (
    ImageConversionError,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    is_empty,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
)

LIMIT = 10_000_000


@pytest.fixture
def frame():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_round_trip_to_the_same_rgb(frame, encoding):
    msg = rgb_to_image_msg(frame, encoding)
    assert msg.encoding == encoding
    np.testing.assert_array_equal(image_msg_to_rgb(msg, LIMIT), frame)


def test_bgr8_is_not_read_as_rgb(frame):
    msg = Image(height=1, width=1, encoding="bgr8", step=3, data=bytes([10, 20, 30]))
    assert image_msg_to_rgb(msg, LIMIT).tolist() == [[[30, 20, 10]]]


def test_mono8_becomes_grey_rgb():
    msg = Image(height=1, width=2, encoding="mono8", step=2, data=bytes([0, 200]))
    assert image_msg_to_rgb(msg, LIMIT).tolist() == [[[0, 0, 0], [200, 200, 200]]]


def test_row_padding_in_step_is_skipped(frame):
    height, width, _ = frame.shape
    step = width * 3 + 5  # 5 bytes of padding per row, as some drivers send
    padded = np.full((height, step), 255, np.uint8)
    padded[:, : width * 3] = frame.reshape(height, width * 3)
    msg = Image(height=height, width=width, encoding="rgb8", step=step, data=padded.tobytes())
    np.testing.assert_array_equal(image_msg_to_rgb(msg, LIMIT), frame)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(encoding="yuv422"), "unsupported image encoding 'yuv422'"),
        (dict(encoding="16UC1"), "unsupported image encoding"),
        (dict(width=0, height=0, step=0, data=b""), "empty"),
        (dict(step=20), "step 20 is smaller than width \\* channels = 21"),
        (dict(data=bytes(104)), "data holds 104 bytes, but step \\* height = 105"),
        (dict(width=4000, height=3000, step=12000, data=b""), "over max_image_pixels"),
    ],
)
def test_bad_messages_get_clear_errors(frame, fields, message):
    msg = rgb_to_image_msg(frame)
    for name, value in fields.items():
        setattr(msg, name, value)
    with pytest.raises(ImageConversionError, match=message):
        image_msg_to_rgb(msg, LIMIT)


def test_empty_request_image_means_latest_frame(frame):
    assert is_empty(Image())
    assert not is_empty(rgb_to_image_msg(frame))


def test_png_compressed_round_trips_exactly(frame):
    np.testing.assert_array_equal(compressed_msg_to_rgb(rgb_to_compressed_msg(frame, "png"), LIMIT), frame)


def test_jpeg_compressed_keeps_colours(photos):
    photo = photos["fruit"]
    decoded = compressed_msg_to_rgb(rgb_to_compressed_msg(photo, "jpeg"), LIMIT)
    assert decoded.shape == photo.shape
    # Lossy, but channel order must survive: mean colour within a few levels.
    np.testing.assert_allclose(decoded.mean(axis=(0, 1)), photo.mean(axis=(0, 1)), atol=3)


@pytest.mark.parametrize("data, message", [(b"", "holds no data"), (b"not a jpeg at all", "cannot decode")])
def test_bad_compressed_images_get_clear_errors(data, message):
    with pytest.raises(ImageConversionError, match=message):
        compressed_msg_to_rgb(CompressedImage(format="jpeg", data=data), LIMIT)


def test_compressed_image_over_the_pixel_limit_is_refused(frame):
    big = cv2.resize(frame, (400, 300))
    with pytest.raises(ImageConversionError, match="over max_image_pixels=1000"):
        compressed_msg_to_rgb(rgb_to_compressed_msg(big, "png"), 1000)
