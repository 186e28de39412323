"""sensor_msgs/Image and CompressedImage <-> RGB numpy frames, checked field by field.

A plain numpy/opencv converter instead of cv_bridge: cv_bridge is not installable from PyPI,
and the engine wants RGB uint8 whatever the camera sends. Every rejected message gets an
ImageConversionError whose text says what was wrong.
"""

from __future__ import annotations

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image

# encoding -> (channels, opencv conversion to RGB, or None when the layout is RGB already)
ENCODINGS = {
    "rgb8": (3, None),
    "bgr8": (3, cv2.COLOR_BGR2RGB),
    "rgba8": (4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, cv2.COLOR_GRAY2RGB),
}
SUPPORTED = ", ".join(ENCODINGS)


class ImageConversionError(ValueError):
    """The message cannot be turned into a frame; str() says why."""


def is_empty(msg: Image) -> bool:
    """An Image with no pixels: what a Query request sends to mean 'the latest camera frame'."""
    return msg.width == 0 and msg.height == 0 and len(msg.data) == 0


def check_image_msg(msg: Image, max_pixels: int) -> None:
    """Cheap checks of the header fields and the buffer size, without touching the pixels."""
    if msg.encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported image encoding '{msg.encoding}'; supported: {SUPPORTED}")
    if msg.width == 0 or msg.height == 0:
        raise ImageConversionError(f"image is empty ({msg.width}x{msg.height})")
    pixels = msg.width * msg.height
    if pixels > max_pixels:
        raise ImageConversionError(
            f"image is {msg.width}x{msg.height} = {pixels} pixels, over max_image_pixels={max_pixels}"
        )
    channels, _ = ENCODINGS[msg.encoding]
    row_bytes = msg.width * channels
    if msg.step < row_bytes:
        raise ImageConversionError(f"step {msg.step} is smaller than width * channels = {row_bytes} for {msg.encoding}")
    if len(msg.data) != msg.step * msg.height:
        raise ImageConversionError(f"data holds {len(msg.data)} bytes, but step * height = {msg.step * msg.height}")


def image_msg_to_rgb(msg: Image, max_pixels: int) -> np.ndarray:
    """An RGB uint8 (height, width, 3) copy of the image in `msg`."""
    check_image_msg(msg, max_pixels)
    channels, to_rgb = ENCODINGS[msg.encoding]
    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.step)
    pixels = rows[:, : msg.width * channels].reshape(msg.height, msg.width, channels)
    if to_rgb is None:
        return pixels.copy()
    return cv2.cvtColor(np.ascontiguousarray(pixels), to_rgb)


def compressed_msg_to_rgb(msg: CompressedImage, max_pixels: int) -> np.ndarray:
    """Decode a jpeg/png CompressedImage to RGB uint8 with opencv."""
    if len(msg.data) == 0:
        raise ImageConversionError("compressed image holds no data")
    buffer = np.frombuffer(msg.data, dtype=np.uint8)
    # opencv itself refuses files that claim more than 2**30 pixels (OPENCV_IO_MAX_IMAGE_PIXELS).
    try:
        decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise ImageConversionError(f"cannot decode compressed image ({msg.format}): {error}") from error
    if decoded is None:
        raise ImageConversionError(
            f"cannot decode compressed image (format '{msg.format}'); jpeg and png are supported"
        )
    height, width = decoded.shape[:2]
    if width * height > max_pixels:
        raise ImageConversionError(
            f"image is {width}x{height} = {width * height} pixels, over max_image_pixels={max_pixels}"
        )
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def rgb_to_image_msg(frame: np.ndarray, encoding: str = "rgb8", header=None) -> Image:
    """Build an Image message from an RGB uint8 frame, in any of the supported encodings."""
    if encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported image encoding '{encoding}'; supported: {SUPPORTED}")
    from_rgb = {
        "rgb8": None,
        "bgr8": cv2.COLOR_RGB2BGR,
        "rgba8": cv2.COLOR_RGB2RGBA,
        "bgra8": cv2.COLOR_RGB2BGRA,
        "mono8": cv2.COLOR_RGB2GRAY,
    }[encoding]
    pixels = frame if from_rgb is None else cv2.cvtColor(frame, from_rgb)
    pixels = np.ascontiguousarray(pixels)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = pixels.shape[:2]
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = pixels.strides[0]
    msg.data = pixels.tobytes()
    return msg


def rgb_to_compressed_msg(frame: np.ndarray, fmt: str = "jpeg", header=None) -> CompressedImage:
    extension = {"jpeg": ".jpg", "png": ".png"}[fmt]
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageConversionError(f"opencv could not encode the frame as {fmt}")
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = fmt
    msg.data = encoded.tobytes()
    return msg
