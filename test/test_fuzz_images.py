"""Fuzzing the message -> frame converter: a frame within limits or an ImageConversionError, nothing else.

Camera messages come from the network, so any bytes and any field values can arrive. A fixed,
derandomized budget keeps the run repeatable and short enough for CI.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CompressedImage, Image

from ros2_nanovlm.ros.image_conversion import ENCODINGS, ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb

PHOTOS = Path(__file__).resolve().parent.parent / "data" / "images"
UINT32_MAX = 2**32 - 1

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def seeds() -> tuple[bytes, ...]:
    """The photos re-encoded small, as baseline jpeg, progressive jpeg and png: valid starting points."""
    encoded = []
    for path in sorted(PHOTOS.glob("*.jpg")):
        small = cv2.resize(cv2.imread(str(path)), (24, 16), interpolation=cv2.INTER_AREA)
        for extension, params in [(".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".png", [])]:
            ok, data = cv2.imencode(extension, small, params)
            assert ok
            encoded.append(data.tobytes())
    return tuple(encoded)


def mutate(data: bytes, kind: str, position: int, extra: bytes) -> bytes:
    """One edit: flip a byte's bits (xor with extra[0]), cut the data, or insert `extra`."""
    if kind == "flip" and data:
        position %= len(data)
        return data[:position] + bytes([data[position] ^ extra[0]]) + data[position + 1 :]
    position %= len(data) + 1
    if kind == "truncate":
        return data[:position]
    return data[:position] + extra + data[position:]


edits = st.tuples(
    st.sampled_from(["flip", "truncate", "insert"]),
    st.integers(0, 1 << 16),
    # Header-like insertions (fill bytes, SOI, a SOF0 start, zeros) find the parsers' corners sooner.
    st.sampled_from([b"\xff", b"\xff\xd8", b"\xff\xc0\x00\x11", b"\x00\x00"]) | st.binary(min_size=1, max_size=16),
)


@st.composite
def mutated_images(draw) -> bytes:
    """A seed image with one to four edits."""
    data = draw(st.sampled_from(seeds()))
    for kind, position, extra in draw(st.lists(edits, min_size=1, max_size=4)):
        data = mutate(data, kind, position, extra)
    return data


# Arbitrary bytes, often behind a png or jpeg signature so that the header parsers get exercised.
arbitrary_images = st.builds(
    lambda prefix, rest: prefix + rest,
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd8\xff"]),
    st.binary(max_size=512),
)
# Mostly limits the 24x16 seeds pass, so that damaged data reaches the decoder.
pixel_limits = st.sampled_from([1, 24 * 16, 4096, 1 << 16, 1 << 20])


def assert_frame_or_refusal(convert, msg, max_pixels: int):
    """The conversion gives an RGB uint8 frame within max_pixels, or raises ImageConversionError."""
    try:
        frame = convert(msg, max_pixels)
    except ImageConversionError:
        return None
    assert isinstance(frame, np.ndarray) and frame.dtype == np.uint8
    assert frame.ndim == 3 and frame.shape[2] == 3
    assert 0 < frame.shape[0] * frame.shape[1] <= max_pixels
    return frame


@FUZZ
@given(data=arbitrary_images, fmt=st.sampled_from(["jpeg", "png", "", "bmp"]), max_pixels=pixel_limits)
def test_arbitrary_compressed_bytes(data, fmt, max_pixels):
    assert_frame_or_refusal(compressed_msg_to_rgb, CompressedImage(format=fmt, data=data), max_pixels)


@FUZZ
@given(data=mutated_images(), max_pixels=pixel_limits)
def test_mutated_jpeg_and_png(data, max_pixels):
    assert_frame_or_refusal(compressed_msg_to_rgb, CompressedImage(format="jpeg", data=data), max_pixels)


@pytest.mark.parametrize("index", range(len(seeds())))
def test_unmutated_seeds_decode(index):
    frame = assert_frame_or_refusal(compressed_msg_to_rgb, CompressedImage(data=seeds()[index]), 1 << 16)
    assert frame is not None and frame.shape == (16, 24, 3)


def mostly(draw, usual, rare):
    """A draw from `usual` three times in four, else from `rare`: most examples get past the first check."""
    return draw(draw(st.sampled_from([usual, usual, usual, rare])))


# Even sizes half the time, more than integers() alone gives: yuv refuses odd ones first.
small_sizes = st.integers(1, 48) | st.integers(1, 24).map(lambda half: 2 * half)


@st.composite
def image_msgs(draw, encodings=None, sizes=None) -> Image:
    """Image fields as the network may send them; mostly consistent, so that pixels get read.

    With `encodings` and `sizes`, the encoding and the width and height come only from those.
    """
    if encodings is None:
        encoding = mostly(draw, st.sampled_from(list(ENCODINGS)), st.text(max_size=60))
    else:
        encoding = draw(encodings)
    if sizes is None:
        width = mostly(draw, small_sizes, st.integers(0, UINT32_MAX))
        height = mostly(draw, small_sizes, st.integers(0, UINT32_MAX))
    else:
        width, height = draw(sizes), draw(sizes)
    layout = ENCODINGS.get(encoding, ENCODINGS["rgb8"])
    # Padding up to 16 bytes: odd steps too, which misalign 16-bit samples.
    step = min(
        mostly(draw, st.integers(0, 16).map(lambda pad: layout.row_bytes(width) + pad), st.integers(0, UINT32_MAX)),
        UINT32_MAX,
    )
    rows = layout.data_rows(height)  # nv12 and nv21 add height/2 rows of chroma
    exact = st.sampled_from([0, 0, 0, 0, 0, -1, 1]).map(lambda error: max(step * rows + error, 0))
    size = mostly(draw, exact, st.integers(0, 4096)) if step * rows <= 1 << 16 else draw(st.integers(0, 4096))
    data = np.random.default_rng(draw(st.integers(0, 1000))).bytes(size)
    is_bigendian = draw(st.sampled_from([0, 1, 255]))
    return Image(width=width, height=height, step=step, encoding=encoding, is_bigendian=is_bigendian, data=data)


@FUZZ
@given(msg=image_msgs(), max_pixels=pixel_limits)
def test_arbitrary_image_fields(msg, max_pixels):
    check_image_conversion(msg, max_pixels)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_every_encoding_with_room_for_its_pixels(encoding, data):
    # Even sizes and a limit they pass: about half the examples reach the pixels, in every layout
    # (the test above mostly stops earlier: at its limits, odd yuv sizes, unknown encodings).
    msg = data.draw(image_msgs(st.just(encoding), st.integers(1, 24).map(lambda half: 2 * half)))
    check_image_conversion(msg, 1 << 16)


def check_image_conversion(msg: Image, max_pixels: int) -> None:
    """A frame of the declared size, with rgb8 and rgb16 pixels where the data puts them, or a refusal."""
    frame = assert_frame_or_refusal(image_msg_to_rgb, msg, max_pixels)
    if frame is None:
        return
    assert frame.shape == (msg.height, msg.width, 3)
    if msg.encoding in ("rgb8", "rgb16"):
        rows = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.step)
        if msg.encoding == "rgb8":
            expected = rows[:, : msg.width * 3]
        else:  # the high byte of each 16-bit sample: the first byte if big-endian
            expected = rows[:, : msg.width * 6][:, 0 if msg.is_bigendian else 1 :: 2]
        np.testing.assert_array_equal(frame.reshape(msg.height, -1), expected)
