"""sensor_msgs/Image read from its serialized bytes, without deserializing the pixels.

A 1920x1080 camera at 30 Hz sends 180 MB/s. rclpy deserializes every message before the callback
runs (5 ms a frame here, holding the GIL, on the thread the model shares), although at `rate` 1
the node answers one frame in thirty and drops the rest. So camera topics are subscribed raw
(the serialized CDR bytes): the header fields before the pixels are read here (a few dozen bytes),
and the pixels stay where they arrived, viewed, not copied, until the worker converts the one
frame it answers.

Only plain CDR (XCDR1, either byte order: what rmw_fastrtps and rmw_cyclonedds write for this
type) is read here; any other layout, or bytes that do not add up, go through rclpy's own
deserialization instead, which is always right and only slower.
"""

from __future__ import annotations

import struct

from builtin_interfaces.msg import Time
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import Image
from std_msgs.msg import Header

# The 4-byte encapsulation header: representation id (plain CDR, big or little endian), options.
CDR_BIG_ENDIAN, CDR_LITTLE_ENDIAN = b"\x00\x00", b"\x00\x01"


class RawImage:
    """An Image as it arrived: header fields parsed, `data` a read-only view of the pixels in the
    serialized bytes. It has the attributes of sensor_msgs/Image that image_conversion reads, so
    it converts like one. Built on an executor thread, read by the worker and by queries;
    never changed."""

    __slots__ = ("data", "encoding", "header", "height", "is_bigendian", "step", "width")

    def __init__(self, header, height, width, encoding, is_bigendian, step, data):
        self.header = header
        self.height = height
        self.width = width
        self.encoding = encoding
        self.is_bigendian = is_bigendian
        self.step = step
        self.data = data


class _Reader:
    """CDR fields in order, each aligned to its size from the start of the body."""

    def __init__(self, body: memoryview, byte_order: str):
        self.body = body
        self.order = byte_order
        self.position = 0

    def _unpack(self, code: str, size: int):
        self.position = (self.position + size - 1) & ~(size - 1)
        (value,) = struct.unpack_from(self.order + code, self.body, self.position)
        self.position += size
        return value

    def int32(self) -> int:
        return self._unpack("i", 4)

    def uint32(self) -> int:
        return self._unpack("I", 4)

    def uint8(self) -> int:
        return self._unpack("B", 1)

    def string(self) -> str:
        length = self.uint32()  # bytes, the terminating NUL included
        end = self.position + length
        if length == 0 or end > len(self.body) or self.body[end - 1] != 0:
            raise ValueError("malformed string")
        text = bytes(self.body[self.position : end - 1]).decode()
        self.position = end
        return text

    def octets(self) -> memoryview:
        length = self.uint32()
        end = self.position + length
        if end > len(self.body):
            raise ValueError("sequence runs past the message")
        view = self.body[self.position : end]
        self.position = end
        return view


def read_image(serialized: bytes) -> RawImage | Image:
    """The Image in `serialized` (a raw subscription's message). Raises what rclpy's
    deserialization raises for bytes that are no Image at all."""
    try:
        return _parse(serialized)
    except (ValueError, struct.error, UnicodeDecodeError):
        return deserialize_message(serialized, Image)


def _parse(serialized: bytes) -> RawImage:
    encapsulation = serialized[:2]
    if encapsulation not in (CDR_BIG_ENDIAN, CDR_LITTLE_ENDIAN):
        raise ValueError("not plain CDR")
    fields = _Reader(memoryview(serialized)[4:], "<" if encapsulation == CDR_LITTLE_ENDIAN else ">")
    stamp = Time(sec=fields.int32(), nanosec=fields.uint32())
    header = Header(stamp=stamp, frame_id=fields.string())
    height, width = fields.uint32(), fields.uint32()
    encoding = fields.string()
    is_bigendian = fields.uint8()
    step = fields.uint32()
    data = fields.octets()
    return RawImage(header, height, width, encoding, is_bigendian, step, data)
