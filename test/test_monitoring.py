"""What rqt and rviz see, over real ROS 2 with the node in its own process: /diagnostics and
the annotated image."""

from __future__ import annotations

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from ros_harness import NodeProcess, connected_client
from sensor_msgs.msg import CompressedImage, Image
from test_node import frame_msg, stamp_of

from ros2_nanovlm.ros.image_conversion import image_msg_to_rgb


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_llava):
    log = tmp_path_factory.mktemp("logs") / "node.log"
    process = NodeProcess("/monitoring", log, f"model.path:={tiny_llava}", "rate:=0.0", "max_new_tokens:=4")
    with connected_client(process) as client:
        yield process, client


def publish_and_wait(client, msg, values_check):
    client.publish(msg)
    return client.wait_for_status(lambda status, values: values_check(values))


def answered(client, msg):
    assert client.spin_until(lambda: any(stamp_of(r) == stamp_of(msg) for r in client.results))


def test_diagnostics_counts_every_frame_exactly(node, photos):
    """A known sequence: a good frame, an invalid one, three that queue while the rate holds
    the model back (two of them replaced), then the last answered. Each publish waits for the
    node to count the previous frame, so nothing races."""
    _, client = node
    client.wait_for_status(lambda status, values: values["model"] == "tiny-llava")
    first = frame_msg(photos["dogs"])
    client.publish(first)
    answered(client, first)
    publish_and_wait(
        client, Image(width=4, height=4, encoding="yuv9", step=4, data=bytes(16)), lambda v: v["frames rejected"] == "1"
    )
    # rate 1e-6 Hz: the next start is ~11 days after the first answer, so frames wait.
    assert client.set_parameter("rate", 1e-6).successful
    for received, photo in zip((3, 4, 5), ("boxes", "fruit", "lake"), strict=True):
        msg = frame_msg(photos[photo])
        publish_and_wait(client, msg, lambda v, n=received: v["frames received"] == str(n))
    assert client.set_parameter("rate", 0.0).successful
    answered(client, msg)  # the newest frame, "lake"
    status, values = client.wait_for_status(lambda status, values: values["frames answered"] == "2")
    assert {key: values[key] for key in values if key.startswith("frames")} == {
        "frames received": "5",
        "frames answered": "2",
        "frames replaced": "2",
        "frames rejected": "1",
        "frames lost": "0",
    }
    assert "yuv9" in values["last error"]
    assert float(values["latency p50 (ms)"]) > 0 and float(values["answer rate (Hz)"]) > 0
    assert values["device"] == "cpu" and status.hardware_id == "cpu"
    assert values["queue depth"] == "0"
    # The invalid frame is an error within the last window: WARN, naming it.
    assert status.level == DiagnosticStatus.WARN and "yuv9" in status.message


def test_annotated_image_only_with_a_subscriber_and_with_the_frames_header(node, photos):
    _, client = node
    before = client.wait_for_status(lambda status, values: True)[1]
    msg = frame_msg(photos["boxes"], frame_id="annotated_cam")
    client.publish(msg)
    answered(client, msg)
    after = client.wait_for_status(
        lambda status, values: int(values["frames answered"]) > int(before["frames answered"])
    )
    assert after[1]["annotated images"] == before["annotated images"] == "0"  # nobody subscribed

    images, jpegs = [], []
    client.node.create_subscription(Image, "annotated_image", images.append, 10)
    client.node.create_subscription(CompressedImage, "annotated_image/compressed", jpegs.append, 10)
    # The node's publishers must have seen the new subscriptions before the next answer.
    assert client.spin_until(lambda: client.node.count_publishers("annotated_image") == 1)
    for _ in range(20):
        msg = frame_msg(photos["boxes"], frame_id="annotated_cam")
        client.publish(msg)
        answered(client, msg)
        if client.spin_until(lambda: any(stamp_of(i) == stamp_of(msg) for i in images), 5.0):
            break
    image = next(i for i in images if stamp_of(i) == stamp_of(msg))
    assert image.header.frame_id == "annotated_cam" and image.encoding == "rgb8"
    assert client.spin_until(lambda: any(stamp_of(j) == stamp_of(msg) for j in jpegs))
    assert next(j for j in jpegs if stamp_of(j) == stamp_of(msg)).format == "jpeg"
    annotated = image_msg_to_rgb(image, 1 << 24)
    original = photos["boxes"]
    assert annotated.shape == original.shape
    # The text bands at the top and bottom change the pixels; the middle is the frame as sent.
    height = original.shape[0]
    assert not np.array_equal(annotated[:10], original[:10])
    assert not np.array_equal(annotated[-10:], original[-10:])
    middle = slice(height // 2 - 5, height // 2 + 5)
    np.testing.assert_array_equal(annotated[middle], original[middle])


def test_diagnostics_say_error_with_the_reason_while_no_model_is_loaded(tmp_path):
    process = NodeProcess("/no_model", tmp_path / "node.log", f"model.path:={tmp_path}")
    with connected_client(process) as client:
        status, values = client.wait_for_status(lambda status, values: status.level == DiagnosticStatus.ERROR)
        assert "no model loaded" in status.message and "config.json" in status.message
        assert values["model"] == ""
        response = client.query("What is this?", frame_msg(np.zeros((32, 32, 3), np.uint8)))
        assert not response.success and "no model loaded" in response.error
