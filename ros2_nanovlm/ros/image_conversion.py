"""sensor_msgs/Image and CompressedImage <-> RGB numpy frames, checked field by field.

A plain numpy/opencv converter instead of cv_bridge: cv_bridge is not installable from PyPI,
and the engine wants RGB uint8 whatever the camera sends. Every rejected message gets an
ImageConversionError whose text says what was wrong.

Image encodings read (sensor_msgs/image_encodings names):
- rgb8, bgr8, rgba8, bgra8, mono8; 8UC1, 8UC3, 8UC4 as cv_bridge reads them (mono8, bgr8, bgra8);
- rgb16, bgr16, rgba16, bgra16, mono16, 16UC1: each sample kept to its high byte (>> 8), in the
  byte order is_bigendian gives;
- uyvy and yuyv (yuv 4:2:2, two bytes a pixel, even width), also under ROS's older names yuv422
  and yuv422_yuy2; nv12 and nv21 (yuv 4:2:0: height rows of luma, then height/2 rows of
  interleaved chroma, even width and height). All BT.601 video range, as UVC cameras send and
  opencv reads them;
- bayer_rggb8, bayer_bggr8, bayer_gbrg8, bayer_grbg8 and their 16-bit forms, demosaiced by opencv.
`step` is checked in bytes of that layout, and the buffer against step times its rows.

A CompressedImage is sized from its jpeg or png header before opencv decodes it: a small file can
declare a huge image, and only the header check keeps max_image_pixels from coming too late.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one encoding puts its samples in Image.data, and the opencv code that makes them RGB."""

    name: str  # the sample order: rgb, bgr, rgba, bgra, mono, uyvy, yuyv, nv12, nv21, or a Bayer pattern
    channels: int  # samples a pixel in a row: 2 for uyvy (U or V, then Y), 1 for nv12's luma and chroma rows
    to_rgb: int | None  # None when the samples are RGB already
    sample_bytes: int = 1  # 2: 16-bit samples, kept to their high byte
    shared: tuple[int, int] = (1, 1)  # (rows, columns) of the pixel blocks that share one U and V

    def row_bytes(self, width: int) -> int:
        return width * self.channels * self.sample_bytes

    def data_rows(self, height: int) -> int:
        """Rows of `step` bytes in the data: 4:2:0 adds height/2 rows of chroma below the luma."""
        return height + height // 2 if self.shared[0] == 2 else height


def sixteen_bit(layout: Layout) -> Layout:
    return dataclasses.replace(layout, sample_bytes=2)


RGB = Layout("rgb", 3, None)
BGR = Layout("bgr", 3, cv2.COLOR_BGR2RGB)
RGBA = Layout("rgba", 4, cv2.COLOR_RGBA2RGB)
BGRA = Layout("bgra", 4, cv2.COLOR_BGRA2RGB)
MONO = Layout("mono", 1, cv2.COLOR_GRAY2RGB)
UYVY = Layout("uyvy", 2, cv2.COLOR_YUV2RGB_UYVY, shared=(1, 2))
YUYV = Layout("yuyv", 2, cv2.COLOR_YUV2RGB_YUY2, shared=(1, 2))
NV12 = Layout("nv12", 1, cv2.COLOR_YUV2RGB_NV12, shared=(2, 2))
NV21 = Layout("nv21", 1, cv2.COLOR_YUV2RGB_NV21, shared=(2, 2))
# ROS names a Bayer pattern by its top-left 2x2 block, row by row; opencv by the 2nd and 3rd pixels
# of its 2nd row, so ROS's rggb is opencv's BG (cv_bridge maps them the same way). The newer
# COLOR_BayerRGGB2RGB aliases are missing from the opencv 4.5 that Ubuntu 22.04 (Humble) ships.
BAYER = {
    "rggb": cv2.COLOR_BayerBG2RGB,
    "bggr": cv2.COLOR_BayerRG2RGB,
    "gbrg": cv2.COLOR_BayerGR2RGB,
    "grbg": cv2.COLOR_BayerGB2RGB,
}

ENCODINGS = {
    "rgb8": RGB,
    "bgr8": BGR,
    "rgba8": RGBA,
    "bgra8": BGRA,
    "mono8": MONO,
    # opencv matrix types, read as cv_bridge reads them: colour in opencv's BGR(A) order
    "8UC1": MONO,
    "8UC3": BGR,
    "8UC4": BGRA,
    # 16UC1 is mostly depth in millimetres: kept to its high byte, near things come out black
    "mono16": sixteen_bit(MONO),
    "16UC1": sixteen_bit(MONO),
    "rgb16": sixteen_bit(RGB),
    "bgr16": sixteen_bit(BGR),
    "rgba16": sixteen_bit(RGBA),
    "bgra16": sixteen_bit(BGRA),
    "uyvy": UYVY,
    "yuv422": UYVY,  # ROS's older name for uyvy
    "yuyv": YUYV,
    "yuv422_yuy2": YUYV,  # ROS's older name for yuyv
    "nv12": NV12,
    "nv21": NV21,
    **{f"bayer_{pattern}8": Layout(pattern, 1, code) for pattern, code in BAYER.items()},
    **{f"bayer_{pattern}16": Layout(pattern, 1, code, sample_bytes=2) for pattern, code in BAYER.items()},
}
SUPPORTED = ", ".join(ENCODINGS)
COMPRESSED_SUPPORTED = "jpeg, png"

# Text from a message (encoding, format) is cut to this many characters in error messages, so a
# 1 MB string does not become a 1 MB log line.
SHOWN_CHARS = 40

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# Formats opencv could decode but the node refuses, named only to make the refusal clearer.
OTHER_SIGNATURES = {b"GIF8": "gif", b"BM": "bmp", b"II*\x00": "tiff", b"MM\x00*": "tiff"}

# JPEG start-of-frame markers SOF0..SOF15, less DHT (C4), JPG (C8) and DAC (CC), which share the range.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers with no length field after them: TEM, RST0..RST7 and SOI.
JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8), 0xD8])
JPEG_SOS, JPEG_EOI = 0xDA, 0xD9
# A marker: 0xFF, any number of 0xFF fill bytes, then the marker byte (not 0xFF). A regex skips long
# fill runs in C.
JPEG_MARKER = re.compile(rb"\xff+([\x00-\xfe])")
# Real files have a dozen or so segments before the frame header (APPn, DQT, COM); a bound keeps a
# payload of millions of tiny segments from costing seconds of Python before anything is decoded.
JPEG_MAX_SEGMENTS = 4096


class ImageConversionError(ValueError):
    """The message cannot be turned into a frame; str() says why."""


def shown(text: str) -> str:
    """`text` from a message, cut to SHOWN_CHARS and escaped so it cannot forge log lines."""
    cut = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
    return cut if cut.isprintable() else ascii(cut)[1:-1]


def is_empty(msg: Image) -> bool:
    """An Image with no pixels: what a Query request sends to mean 'the latest camera frame'."""
    return msg.width == 0 and msg.height == 0 and len(msg.data) == 0


def check_image_msg(msg: Image, max_pixels: int) -> None:
    """Cheap checks of the header fields and the buffer size, without touching the pixels."""
    if msg.encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported image encoding '{shown(msg.encoding)}'; supported: {SUPPORTED}")
    if msg.width == 0 or msg.height == 0:
        raise ImageConversionError(f"image is empty ({msg.width}x{msg.height})")
    pixels = msg.width * msg.height
    if pixels > max_pixels:
        raise ImageConversionError(
            f"image is {msg.width}x{msg.height} = {pixels} pixels, over max_image_pixels={max_pixels}"
        )
    _check_chroma_blocks(msg.encoding, msg.width, msg.height)
    layout = ENCODINGS[msg.encoding]
    row_bytes = layout.row_bytes(msg.width)
    if msg.step < row_bytes:
        raise ImageConversionError(
            f"step {msg.step} is smaller than a row of {msg.width} {msg.encoding} pixels, {row_bytes} bytes"
        )
    rows = layout.data_rows(msg.height)
    if len(msg.data) != msg.step * rows:
        rows_text = "height" if rows == msg.height else "height * 3/2"
        raise ImageConversionError(
            f"data holds {len(msg.data)} bytes, but step * {rows_text} = {msg.step * rows} for {msg.encoding}"
        )


def _check_chroma_blocks(encoding: str, width: int, height: int) -> None:
    """yuv shares one U and V between a pixel pair (4:2:2) or a 2x2 block (4:2:0): no half blocks."""
    block_rows, block_columns = ENCODINGS[encoding].shared
    if width % block_columns or height % block_rows:
        needs = "an even width" if block_rows == 1 else "an even width and height"
        raise ImageConversionError(
            f"{encoding} needs {needs} ({block_columns}x{block_rows} pixel blocks share one U and V), "
            f"got {width}x{height}"
        )


def image_msg_to_rgb(msg: Image, max_pixels: int) -> np.ndarray:
    """An RGB uint8 (height, width, 3) copy of the image in `msg`."""
    check_image_msg(msg, max_pixels)
    layout = ENCODINGS[msg.encoding]
    rows = layout.data_rows(msg.height)
    samples = np.frombuffer(msg.data, dtype=np.uint8).reshape(rows, msg.step)[:, : layout.row_bytes(msg.width)]
    if layout.sample_bytes == 2:
        # A copy first: with an odd step the rows' 16-bit samples are not aligned.
        words = np.ascontiguousarray(samples).view(">u2" if msg.is_bigendian else "<u2")
        samples = (words >> 8).astype(np.uint8)
    samples = samples.reshape(rows, msg.width, layout.channels)
    if layout.to_rgb is None:
        return samples.copy()
    return cv2.cvtColor(np.ascontiguousarray(samples), layout.to_rgb)


def check_compressed_msg(msg: CompressedImage, max_pixels: int) -> tuple[int, int]:
    """Cheap checks of a CompressedImage's header, without decoding; its (width, height) if they pass.

    The size must come from the header before decoding: a 100 kB png can declare 30000x30000
    pixels, and decoding it first costs gigabytes of memory and tens of seconds.
    """
    width, height = compressed_size(bytes(msg.data), shown(msg.format))
    if width == 0 or height == 0:
        raise ImageConversionError(f"compressed image header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageConversionError(
            f"compressed image header declares {width}x{height} = {width * height} pixels, "
            f"over max_image_pixels={max_pixels}; not decoded"
        )
    return width, height


def compressed_msg_to_rgb(msg: CompressedImage, max_pixels: int) -> np.ndarray:
    """Decode a jpeg/png CompressedImage to RGB uint8 with opencv, once its header passes the checks."""
    width, height = check_compressed_msg(msg, max_pixels)
    decoded = _decode(msg.data, shown(msg.format))
    # opencv applies a jpeg's EXIF orientation, which may swap width and height; the pixel count
    # checked above stays the same. Any other size means the header lied.
    if decoded.shape[:2] not in ((height, width), (width, height)):
        raise ImageConversionError(
            f"compressed image decoded to {decoded.shape[1]}x{decoded.shape[0]}, "
            f"but its header declares {width}x{height}"
        )
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def compressed_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from a jpeg or png header; anything else is refused by its magic bytes.

    The bytes decide, not msg.format: opencv sniffs the bytes itself, and format is free text.
    """
    if len(data) == 0:
        raise ImageConversionError("compressed image holds no data")
    if data.startswith(PNG_SIGNATURE):
        return _png_size(data)
    if data.startswith(JPEG_SOI):
        return _jpeg_size(data)
    raise ImageConversionError(
        f"unsupported compressed image ({_other_format(data)}, format '{fmt}'); supported: {COMPRESSED_SUPPORTED}"
    )


def _other_format(data: bytes) -> str:
    """What bytes that are neither jpeg nor png look like, for the refusal message."""
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in OTHER_SIGNATURES.items():
        if data.startswith(magic):
            return name
    return f"data starting {data[:8].hex(' ')}"


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the png spec puts right after the signature."""
    # signature (8), IHDR length (4) = 13, b"IHDR" (4), width (4), height (4), 5 more bytes, CRC (4)
    if len(data) < 33:
        raise ImageConversionError(f"png header is truncated: {len(data)} bytes, the IHDR chunk ends at 33")
    if data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise ImageConversionError("png header is corrupt: the first chunk is not a 13-byte IHDR")
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        raise ImageConversionError("png header is corrupt: the IHDR checksum does not match")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first start-of-frame header, reached by skipping whole segments."""
    position = len(JPEG_SOI)
    for _ in range(JPEG_MAX_SEGMENTS):
        marker, position = _jpeg_marker(data, position)
        if marker in JPEG_STANDALONE:
            continue
        if marker in (JPEG_SOS, JPEG_EOI):
            raise ImageConversionError(f"jpeg is corrupt: marker 0x{marker:02X} comes before any frame header")
        length = _jpeg_segment_length(data, position)
        if marker in JPEG_SOF:
            return _jpeg_frame_size(data[position : position + length])
        position += length
    raise ImageConversionError(f"jpeg has over {JPEG_MAX_SEGMENTS} segments before its frame header")


def _jpeg_marker(data: bytes, position: int) -> tuple[int, int]:
    """The marker at `position` (after any 0xFF fill bytes) and the position just after it."""
    match = JPEG_MARKER.match(data, position)
    if match is None:
        if position >= len(data) or data[position] == 0xFF:  # only fill bytes up to the end
            raise ImageConversionError(f"jpeg header is truncated at byte {len(data)}: no frame header")
        raise ImageConversionError(f"jpeg is corrupt: no marker at byte {position}")
    marker = match.group(1)[0]
    if marker == 0x00:
        raise ImageConversionError(f"jpeg is corrupt: byte-stuffed 0xFF00 outside a scan at byte {position}")
    return marker, match.end()


def _jpeg_segment_length(data: bytes, position: int) -> int:
    """The length field at `position` (it counts its own two bytes), checked against the data."""
    if position + 2 > len(data):
        raise ImageConversionError(f"jpeg header is truncated at byte {len(data)}: a segment length is cut")
    length = int.from_bytes(data[position : position + 2], "big")
    if length < 2:
        raise ImageConversionError(f"jpeg is corrupt: segment length {length} at byte {position}")
    if position + length > len(data):
        raise ImageConversionError(
            f"jpeg header is truncated: a segment at byte {position} needs {length} bytes, {len(data) - position} left"
        )
    return length


def _jpeg_frame_size(segment: bytes) -> tuple[int, int]:
    """(width, height) from a start-of-frame segment: length (2), precision (1), height (2), width (2), ..."""
    if len(segment) < 8:
        raise ImageConversionError(f"jpeg is corrupt: the frame header is {len(segment)} bytes, at least 8 expected")
    return int.from_bytes(segment[5:7], "big"), int.from_bytes(segment[3:5], "big")


def _decode(data, fmt: str) -> np.ndarray:
    """opencv's BGR decode of bytes whose header has passed the checks."""
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise ImageConversionError(f"cannot decode compressed image (format '{fmt}'): {error}") from error
    if decoded is None:
        raise ImageConversionError(f"cannot decode compressed image (format '{fmt}'): opencv found it corrupt")
    return decoded


def rgb_to_image_msg(frame: np.ndarray, encoding: str = "rgb8", header=None) -> Image:
    """Build an Image message from an RGB uint8 frame, in any of the supported encodings.

    What image_msg_to_rgb reads back, for tests and the camera stand-in: 16-bit samples are
    value * 257, little-endian; yuv is BT.601 video range.
    """
    if encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported image encoding '{shown(encoding)}'; supported: {SUPPORTED}")
    layout = ENCODINGS[encoding]
    height, width = frame.shape[:2]
    _check_chroma_blocks(encoding, width, height)
    samples = _samples_from_rgb(frame, layout)
    if layout.sample_bytes == 2:
        samples = (samples.astype(np.uint16) * 257).astype("<u2")
    samples = np.ascontiguousarray(samples)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = height, width
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = samples.strides[0]
    msg.data = samples.tobytes()
    return msg


def _samples_from_rgb(frame: np.ndarray, layout: Layout) -> np.ndarray:
    """The 8-bit samples of `layout` for an RGB frame, one row of the data per row of the array."""
    if layout.name in BAYER:
        mosaic = np.empty(frame.shape[:2], np.uint8)
        for index, colour in enumerate(layout.name):  # the 2x2 block, row by row
            row, column = divmod(index, 2)
            mosaic[row::2, column::2] = frame[row::2, column::2, "rgb".index(colour)]
        return mosaic
    if layout.shared != (1, 1):
        return _yuv_from_rgb(frame, layout)
    from_rgb = {
        "rgb": None,
        "bgr": cv2.COLOR_RGB2BGR,
        "rgba": cv2.COLOR_RGB2RGBA,
        "bgra": cv2.COLOR_RGB2BGRA,
        "mono": cv2.COLOR_RGB2GRAY,
    }[layout.name]
    return frame if from_rgb is None else cv2.cvtColor(frame, from_rgb)


def _yuv_from_rgb(frame: np.ndarray, layout: Layout) -> np.ndarray:
    """BT.601 video-range yuv in `layout`, U and V averaged over each block of pixels sharing them.

    Written out in numpy: opencv's RGB2YUV_UYVY and _YUY2 are newer than Humble's opencv 4.5.
    """
    height, width = frame.shape[:2]
    rgb = frame.astype(np.float64) / 255
    y = 16 + rgb @ np.array([65.481, 128.553, 24.966])
    u = 128 + rgb @ np.array([-37.797, -74.203, 112.0])
    v = 128 + rgb @ np.array([112.0, -93.786, -18.214])
    block_rows, block_columns = layout.shared
    u, v = (c.reshape(height // block_rows, block_rows, -1, block_columns).mean(axis=(1, 3)) for c in (u, v))
    y, u, v = (np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v))
    if layout.name in ("nv12", "nv21"):
        chroma = np.stack((u, v) if layout.name == "nv12" else (v, u), axis=-1).reshape(height // 2, width)
        return np.vstack([y, chroma])
    chroma = np.stack((u, v), axis=-1).reshape(height, width)  # U of a pixel pair, then its V
    pairs = np.stack((chroma, y) if layout.name == "uyvy" else (y, chroma), axis=-1)
    return pairs.reshape(height, width * 2)


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
