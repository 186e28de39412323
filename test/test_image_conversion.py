"""The message <-> frame converter, on hand-built messages (no spinning)."""

from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from ros2_nanovlm.ros import image_conversion
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
        (dict(encoding="nv24"), "unsupported image encoding 'nv24'; supported: rgb8, bgr8"),
        (dict(encoding="32FC1"), "unsupported image encoding"),
        (dict(width=0, height=0, step=0, data=b""), "empty"),
        (dict(step=20), "step 20 is smaller than a row of 7 rgb8 pixels, 21 bytes"),
        (dict(data=bytes(104)), "data holds 104 bytes, but step \\* height = 105"),
        (dict(width=4000, height=3000, step=12000, data=b""), "over max_image_pixels"),
        # The yuv and 16-bit layouts: step counts bytes, not pixels or samples.
        (dict(encoding="yuv422", step=14, data=bytes(70)), "yuv422 needs an even width .*, got 7x5"),
        (dict(encoding="yuv422_yuy2", width=6, step=6, data=bytes(30)), "step 6 .* 6 yuv422_yuy2 pixels, 12 bytes"),
        (dict(encoding="nv12", width=6, step=6, data=bytes(36)), "nv12 needs an even width and height .*, got 6x5"),
        (
            dict(encoding="nv21", width=6, height=4, step=6, data=bytes(24)),
            "24 bytes, but step \\* height \\* 3/2 = 36",
        ),
        (dict(encoding="nv12", width=4000, height=3000, step=4000, data=b""), "over max_image_pixels"),
        (dict(encoding="rgb16"), "step 21 is smaller than a row of 7 rgb16 pixels, 42 bytes"),
        (dict(encoding="mono16", step=14, data=bytes(69)), "data holds 69 bytes, but step \\* height = 70"),
        (dict(encoding="bayer_rggb16", step=7), "step 7 is smaller than a row of 7 bayer_rggb16 pixels, 14 bytes"),
    ],
)
def test_bad_messages_get_clear_errors(frame, fields, message):
    msg = rgb_to_image_msg(frame)
    for name, value in fields.items():
        setattr(msg, name, value)
    with pytest.raises(ImageConversionError, match=message):
        image_msg_to_rgb(msg, LIMIT)


def test_unsupported_encoding_error_lists_every_supported_one(frame):
    msg = rgb_to_image_msg(frame)
    msg.encoding = "32FC1"
    with pytest.raises(ImageConversionError) as error:
        image_msg_to_rgb(msg, LIMIT)
    assert str(error.value).endswith("supported: " + ", ".join(image_conversion.ENCODINGS))
    for encoding in ["yuv422", "yuv422_yuy2", "nv12", "nv21", "bayer_grbg8", "8UC3", "16UC1", "bgra16"]:
        assert encoding in str(error.value)


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


@pytest.mark.parametrize(
    "data, message", [(b"", "holds no data"), (b"not a jpeg at all", "unsupported compressed image")]
)
def test_bad_compressed_images_get_clear_errors(data, message):
    with pytest.raises(ImageConversionError, match=message):
        compressed_msg_to_rgb(CompressedImage(format="jpeg", data=data), LIMIT)


def test_compressed_image_over_the_pixel_limit_is_refused(frame):
    big = cv2.resize(frame, (400, 300))
    with pytest.raises(ImageConversionError, match="over max_image_pixels=1000"):
        compressed_msg_to_rgb(rgb_to_compressed_msg(big, "png"), 1000)


# Decompression bombs and lying headers: the size comes from the header, before any decoding.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width=30_000, height=30_000) -> bytes:
    """A valid png start declaring width x height, with a tiny IDAT stream that never fills it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(bytes(4096))
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """`png` with its IHDR size replaced, and the IHDR CRC fixed so only the size lies."""
    edited = bytearray(png)
    edited[16:24] = struct.pack(">II", width, height)
    edited[29:33] = struct.pack(">I", zlib.crc32(bytes(edited[12:29])))
    return bytes(edited)


def small_jpeg(frame) -> bytes:
    return bytes(rgb_to_compressed_msg(frame, "jpeg").data)


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its SOF0 size replaced (opencv writes SOF0 after DQT, whose small values hold no 0xFF)."""
    sof = jpeg.index(b"\xff\xc0")
    # marker (2), length (2), precision (1), height (2), width (2)
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


@pytest.fixture
def no_decoding(monkeypatch):
    def imdecode(*args, **kwargs):
        pytest.fail("cv2.imdecode was called on an image the header check should have refused")

    monkeypatch.setattr(image_conversion.cv2, "imdecode", imdecode)


def compressed(data: bytes, fmt: str = "jpeg") -> CompressedImage:
    return CompressedImage(format=fmt, data=data)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_bomb_is_refused_from_its_header_without_decoding(frame, kind, no_decoding):
    if kind == "png":
        data = png_bomb()
    else:
        data = with_jpeg_size(small_jpeg(frame), 30_000, 30_000)
    started = time.perf_counter()
    with pytest.raises(ImageConversionError, match="30000x30000 = 900000000 pixels, over max_image_pixels=16777216"):
        compressed_msg_to_rgb(compressed(data, kind), 16_777_216)
    # It took 25 s and 5 GB when the decode came first; the bound is loose for loaded CI machines.
    assert time.perf_counter() - started < 5


def test_jpeg_walk_skips_fill_bytes_and_standalone_markers(frame, no_decoding):
    jpeg = with_jpeg_size(small_jpeg(frame), 30_000, 30_000)
    # After SOI: fill bytes, TEM, RST0, a COM segment holding 0xFF C0 (not a frame header), then the rest.
    padded = jpeg[:2] + b"\xff\xff\xff\x01\xff\xd0" + b"\xff\xfe\x00\x06\xff\xc0\x00\x01" + jpeg[2:]
    with pytest.raises(ImageConversionError, match="30000x30000"):
        compressed_msg_to_rgb(compressed(padded), LIMIT)


def test_jpeg_with_fill_bytes_and_standalone_markers_still_decodes(frame):
    jpeg = small_jpeg(frame)
    padded = jpeg[:2] + b"\xff\xff\xff\x01\xff\xd0" + jpeg[2:]
    assert compressed_msg_to_rgb(compressed(padded), LIMIT).shape == frame.shape


@pytest.mark.parametrize(
    "data, message",
    [
        (PNG_SIGNATURE, "png header is truncated"),
        (png_bomb()[:25], "png header is truncated"),
        (PNG_SIGNATURE + png_chunk(b"tEXt", b"hello world!!"), "first chunk is not a 13-byte IHDR"),
        (png_bomb()[:29] + b"\x00\x00\x00\x00", "IHDR checksum does not match"),
        (png_bomb(0, 10), "empty image \\(0x10\\)"),
        (b"\xff\xd8", "jpeg header is truncated"),
        (b"\xff\xd8\xff\xff", "jpeg header is truncated"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg header is truncated"),
        (b"\xff\xd8\xff\xe0\x00", "jpeg header is truncated"),
        (b"\xff\xd8\xff\xc0\x00\x11\x08\x00", "jpeg header is truncated"),
        (b"\xff\xd8\xff\xc0\x00\x05\x08\x00\x10", "frame header is 5 bytes"),
        (b"\xff\xd8\xff\xe0\x00\x01", "segment length 1"),
        (b"\xff\xd8JFIF", "no marker at byte 2"),
        (b"\xff\xd8\xff\x00", "byte-stuffed"),
        (b"\xff\xd8\xff\xda\x00\x02", "0xDA comes before any frame header"),
        (b"\xff\xd8\xff\xd9", "0xD9 comes before any frame header"),
        (b"\xff\xd8" + b"\xff\x01" * 5000, "over 4096 segments"),
    ],
)
def test_truncated_or_corrupt_headers_get_clear_errors(data, message, no_decoding):
    with pytest.raises(ImageConversionError, match=message):
        compressed_msg_to_rgb(compressed(data), LIMIT)


def test_jpeg_frame_header_with_height_zero_is_refused(frame, no_decoding):
    # Height 0 means "given later by a DNL marker", which opencv's libjpeg does not support.
    with pytest.raises(ImageConversionError, match="empty image \\(7x0\\)"):
        compressed_msg_to_rgb(compressed(with_jpeg_size(small_jpeg(frame), 7, 0)), LIMIT)


@pytest.mark.parametrize("extension, name", [(".gif", "gif"), (".bmp", "bmp"), (".webp", "webp"), (".tiff", "tiff")])
def test_formats_other_than_jpeg_and_png_are_refused_whatever_format_says(frame, extension, name, no_decoding):
    ok, encoded = cv2.imencode(extension, frame)
    assert ok  # opencv could decode these: the refusal is the node's own
    with pytest.raises(ImageConversionError, match=f"unsupported compressed image \\({name}.*supported: jpeg, png"):
        compressed_msg_to_rgb(compressed(encoded.tobytes(), "jpeg"), LIMIT)


def test_unknown_bytes_are_refused_with_their_first_bytes(no_decoding):
    with pytest.raises(ImageConversionError, match="data starting 00 01 02 03 04 05 06 07, format 'png'"):
        compressed_msg_to_rgb(compressed(bytes(range(100)), "png"), LIMIT)


def test_jpeg_declared_as_png_still_decodes(photos):
    # The bytes decide, as they do for opencv: format is free text ("rgb8; jpeg compressed bgr8").
    photo = photos["fruit"]
    jpeg = bytes(rgb_to_compressed_msg(photo, "jpeg").data)
    assert compressed_msg_to_rgb(compressed(jpeg, "rgb8; jpeg compressed bgr8"), LIMIT).shape == photo.shape


def test_png_decodes_to_the_right_rgb():
    frame = np.zeros((2, 3, 3), np.uint8)
    frame[0, 0] = (255, 0, 0)  # red top-left: RGB order must survive opencv's BGR
    frame[1, 2] = (0, 0, 255)
    np.testing.assert_array_equal(compressed_msg_to_rgb(rgb_to_compressed_msg(frame, "png"), LIMIT), frame)


def test_jpeg_decodes_to_the_right_rgb():
    frame = np.zeros((16, 16, 3), np.uint8)
    frame[:, :8] = (230, 20, 20)  # red left half, blue right half
    frame[:, 8:] = (20, 20, 230)
    decoded = compressed_msg_to_rgb(rgb_to_compressed_msg(frame, "jpeg"), LIMIT)
    assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8
    np.testing.assert_allclose(decoded[:, :4].mean(axis=(0, 1)), (230, 20, 20), atol=12)
    np.testing.assert_allclose(decoded[:, 12:].mean(axis=(0, 1)), (20, 20, 230), atol=12)


def test_png_whose_header_lies_about_its_size_is_refused():
    rng = np.random.default_rng(3)
    real = bytes(rgb_to_compressed_msg(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "png").data)
    # IHDR says 10x10 with a valid CRC: libpng reads rows of the wrong length and gives up.
    with pytest.raises(ImageConversionError, match="cannot decode compressed image"):
        compressed_msg_to_rgb(compressed(with_png_size(real, 10, 10), "png"), LIMIT)


def test_decoded_size_other_than_the_headers_is_refused(frame, monkeypatch):
    # Should a decoder ever read a size other than the header's, the header check proved nothing.
    monkeypatch.setattr(image_conversion.cv2, "imdecode", lambda *args: np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ImageConversionError, match="decoded to 20x20, but its header declares 7x5"):
        compressed_msg_to_rgb(rgb_to_compressed_msg(frame, "png"), LIMIT)


def test_jpeg_rotated_by_exif_orientation_still_decodes():
    frame = np.zeros((20, 40, 3), np.uint8)
    jpeg = bytes(rgb_to_compressed_msg(frame, "jpeg").data)
    # APP1 Exif: little-endian TIFF with one IFD entry, Orientation (0x0112) = 6 (rotate 90°).
    tiff = b"II*\x00" + struct.pack("<IHHHIII", 8, 1, 0x0112, 3, 1, 6, 0)
    app1 = b"Exif\x00\x00" + tiff
    rotated = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]
    # opencv applies the orientation, swapping width and height: the pixel count is the header's.
    assert compressed_msg_to_rgb(compressed(rotated), LIMIT).shape == (40, 20, 3)


def test_long_encoding_is_cut_in_the_error(frame):
    msg = rgb_to_image_msg(frame)
    msg.encoding = "x" * 1_000_000
    with pytest.raises(ImageConversionError) as error:
        image_msg_to_rgb(msg, LIMIT)
    assert f"'{'x' * 40}...'" in str(error.value)
    assert len(str(error.value)) < 100 + len(image_conversion.SUPPORTED)


def test_long_format_is_cut_in_the_error(no_decoding):
    with pytest.raises(ImageConversionError) as error:
        compressed_msg_to_rgb(compressed(b"GIF89a" + bytes(20), "f" * 1_000_000), LIMIT)
    assert f"format '{'f' * 40}...'" in str(error.value)
    assert len(str(error.value)) < 200


def test_control_characters_in_encoding_are_escaped(frame):
    msg = rgb_to_image_msg(frame)
    msg.encoding = "rgb8\nERROR forged log line"
    with pytest.raises(ImageConversionError) as error:
        image_msg_to_rgb(msg, LIMIT)
    assert "\n" not in str(error.value) and "rgb8\\nERROR" in str(error.value)


# The encodings robots send besides rgb8: every message below is packed by hand, in numpy,
# independently of the converter.


def raw_msg(rows, encoding: str, width: int, height: int, pad: int = 0, is_bigendian: int = 0) -> Image:
    """An Image whose data is `rows` (one data row per row, as bytes), each padded with `pad` bytes."""
    rows = np.asarray(rows, np.uint8).reshape(len(rows), -1)
    padded = np.pad(rows, ((0, 0), (0, pad)), constant_values=0xAB)
    return Image(
        width=width,
        height=height,
        encoding=encoding,
        step=padded.shape[1],
        is_bigendian=is_bigendian,
        data=padded.tobytes(),
    )


@pytest.mark.parametrize(
    "encoding, data, expected",
    [
        ("8UC3", [10, 20, 30, 40, 50, 60], [[30, 20, 10], [60, 50, 40]]),  # BGR, as bgr8
        ("8UC1", [0, 200], [[0, 0, 0], [200, 200, 200]]),  # grey, as mono8
        ("8UC4", [10, 20, 30, 255, 40, 50, 60, 0], [[30, 20, 10], [60, 50, 40]]),  # BGRA, alpha dropped
    ],
)
def test_opencv_types_are_read_as_cv_bridge_reads_them(encoding, data, expected):
    assert image_msg_to_rgb(raw_msg([data], encoding, 2, 1), LIMIT).tolist() == [expected]


def sixteen_bit_rows(samples: np.ndarray, big_endian: int, seed: int = 0) -> np.ndarray:
    """uint8 `samples` as 16-bit words (sample in the high byte, noise in the low), as bytes per row."""
    noise = np.random.default_rng(seed).integers(0, 256, samples.shape, dtype=np.uint16)
    words = samples.astype(np.uint16) << 8 | noise
    return words.astype(">u2" if big_endian else "<u2").view(np.uint8).reshape(len(samples), -1)


@pytest.mark.parametrize("encoding", ["rgb16", "bgr16", "rgba16", "bgra16"])
@pytest.mark.parametrize("big_endian", [0, 1])
def test_16_bit_colour_keeps_the_high_byte(frame, encoding, big_endian):
    height, width, _ = frame.shape
    rgba = np.concatenate([frame, np.full((height, width, 1), 77, np.uint8)], axis=2)
    order = encoding.removesuffix("16")
    samples = rgba[..., ["rgba".index(channel) for channel in order]]
    # An odd pad: the rows' 16-bit words then start at odd byte offsets.
    msg = raw_msg(sixteen_bit_rows(samples, big_endian), encoding, width, height, pad=3, is_bigendian=big_endian)
    np.testing.assert_array_equal(image_msg_to_rgb(msg, LIMIT), frame)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
def test_mono16_is_read_in_the_declared_byte_order(encoding):
    def read(data: bytes, is_bigendian: int) -> list:
        msg = Image(width=2, height=1, encoding=encoding, step=4, is_bigendian=is_bigendian, data=data)
        return image_msg_to_rgb(msg, LIMIT)[0, :, 0].tolist()

    # 0x1234 and 0x00FF in each byte order: the high byte is kept, the low one dropped.
    assert read(b"\x34\x12\xff\x00", 0) == [0x12, 0x00]
    assert read(b"\x12\x34\x00\xff", 1) == [0x12, 0x00]
    # Big-endian bytes read as little-endian give the low bytes: is_bigendian must be honoured.
    assert read(b"\x12\x34\x00\xff", 0) == [0x34, 0xFF]


def bt601(frame: np.ndarray) -> tuple[np.ndarray, ...]:
    """(Y, U, V) of an RGB frame as floats: BT.601 video range (Y 16..235, U and V 16..240)."""
    r, g, b = (frame[..., channel].astype(np.float64) for channel in range(3))
    y = 16 + (65.738 * r + 129.057 * g + 25.064 * b) / 256
    u = 128 + (-37.945 * r - 74.494 * g + 112.439 * b) / 256
    v = 128 + (112.439 * r - 94.154 * g - 18.285 * b) / 256
    return tuple(np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v))


def blocky_frame(height: int, width: int, block_rows: int, block_columns: int, seed: int = 5) -> np.ndarray:
    """Random colours, constant over each block of pixels that shares one U and V: nothing is lost to subsampling."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // block_rows, width // block_columns, 3), dtype=np.uint8)
    return blocks.repeat(block_rows, axis=0).repeat(block_columns, axis=1)


# The tolerance covers rounding Y, U and V to bytes and opencv's fixed-point arithmetic.
YUV_ATOL = 3


@pytest.mark.parametrize(
    "encoding, byte_order",
    [("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuv422_yuy2", "yuyv"), ("yuyv", "yuyv")],
)
@pytest.mark.parametrize("pad", [0, 6])
def test_yuv422_packed_by_hand_reads_back(encoding, byte_order, pad):
    frame = blocky_frame(6, 10, 1, 2)
    y, u, v = bt601(frame)
    # Two pixels in four bytes: UYVY is U Y0 V Y1, YUYV (YUY2) is Y0 U Y1 V.
    planes = {"y": (y[:, 0::2], y[:, 1::2]), "u": u[:, 0::2], "v": v[:, 0::2]}
    if byte_order == "uyvy":
        quads = [planes["u"], planes["y"][0], planes["v"], planes["y"][1]]
    else:
        quads = [planes["y"][0], planes["u"], planes["y"][1], planes["v"]]
    rows = np.stack(quads, axis=-1).reshape(6, 20)
    got = image_msg_to_rgb(raw_msg(rows, encoding, 10, 6, pad), LIMIT)
    np.testing.assert_allclose(got, frame, atol=YUV_ATOL)


@pytest.mark.parametrize("encoding", ["nv12", "nv21"])
@pytest.mark.parametrize("pad", [0, 6])
def test_nv12_and_nv21_packed_by_hand_read_back(encoding, pad):
    frame = blocky_frame(6, 10, 2, 2)
    y, u, v = bt601(frame)
    # Six rows of Y, then three rows of chroma pairs: U V for nv12, V U for nv21.
    chroma = np.empty((3, 10), np.uint8)
    first, second = (u, v) if encoding == "nv12" else (v, u)
    chroma[:, 0::2], chroma[:, 1::2] = first[::2, ::2], second[::2, ::2]
    got = image_msg_to_rgb(raw_msg(np.vstack([y, chroma]), encoding, 10, 6, pad), LIMIT)
    np.testing.assert_allclose(got, frame, atol=YUV_ATOL)


def test_uyvy_red_reads_as_red():
    # Pure red in BT.601 video range: Y 81, U 90, V 240.
    msg = raw_msg([[90, 81, 240, 81]], "yuv422", 2, 1)
    np.testing.assert_allclose(image_msg_to_rgb(msg, LIMIT), [[[255, 0, 0]] * 2], atol=YUV_ATOL)


QUADRANT_COLOURS = [(220, 40, 30), (30, 200, 60), (40, 50, 210), (230, 210, 40)]  # red, green, blue, yellow


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("bits", [8, 16])
def test_bayer_mosaics_demosaic_to_their_colours(pattern, bits):
    # Four flat 16x16 quadrants; each pixel keeps the one channel the pattern (top-left 2x2 block,
    # row by row, as ROS names it) puts at its place.
    frame = np.empty((32, 32, 3), np.uint8)
    for index, colour in enumerate(QUADRANT_COLOURS):
        frame[16 * (index // 2) : 16 * (index // 2 + 1), 16 * (index % 2) : 16 * (index % 2 + 1)] = colour
    channel_at = np.array(["rgb".index(colour) for colour in pattern]).reshape(2, 2)
    rows, columns = np.mgrid[0:32, 0:32]
    mosaic = np.take_along_axis(frame, channel_at[rows % 2, columns % 2][..., None], axis=2)[..., 0]
    data = mosaic if bits == 8 else sixteen_bit_rows(mosaic, big_endian=0)
    got = image_msg_to_rgb(raw_msg(data, f"bayer_{pattern}{bits}", 32, 32, pad=4), LIMIT)
    assert got.shape == (32, 32, 3)
    for index, colour in enumerate(QUADRANT_COLOURS):
        top, left = 16 * (index // 2) + 4, 16 * (index % 2) + 4
        centre = got[top : top + 8, left : left + 8].reshape(-1, 3)
        np.testing.assert_allclose(centre, np.broadcast_to(colour, centre.shape), atol=2)


def smooth_frame(height: int = 24, width: int = 32) -> np.ndarray:
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack([columns * 7, rows * 9, 250 - columns * 6], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("encoding", list(image_conversion.ENCODINGS))
def test_rgb_to_image_msg_writes_every_encoding_it_reads(encoding):
    frame = smooth_frame()
    msg = rgb_to_image_msg(frame, encoding)
    assert (msg.encoding, msg.width, msg.height) == (encoding, 32, 24)
    got = image_msg_to_rgb(msg, LIMIT)
    if encoding in ("mono8", "8UC1", "mono16", "16UC1"):
        np.testing.assert_array_equal(got, cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB))
        return
    # yuv loses a little to subsampling; Bayer is exact inside on a linear ramp, not at the border.
    atol = 8 if image_conversion.ENCODINGS[encoding].shared != (1, 1) else 0
    np.testing.assert_allclose(got[2:-2, 2:-2], frame[2:-2, 2:-2], atol=atol)


@pytest.mark.parametrize("encoding, size", [("yuv422", (4, 5)), ("nv12", (5, 4)), ("nv21", (4, 5))])
def test_rgb_to_image_msg_refuses_half_chroma_blocks(encoding, size):
    with pytest.raises(ImageConversionError, match=f"{encoding} needs an even width"):
        rgb_to_image_msg(smooth_frame(*size), encoding)


def test_the_camera_player_can_send_every_photo_in_every_encoding():
    from ros2_nanovlm.camera_player import _even
    from ros2_nanovlm.resources import bundled_photos_dir, list_photos, load_photo

    frames = [_even(load_photo(path, 640)) for path in list_photos(bundled_photos_dir())]
    for encoding in image_conversion.ENCODINGS:
        for frame in frames:
            msg = rgb_to_image_msg(frame, encoding)
            assert image_msg_to_rgb(msg, 1 << 24).shape == frame.shape
