"""Several cameras over real ROS 2, node in its own process: each camera's frames are answered
on its own topics with their own headers, and two streaming cameras share the model fairly."""

from __future__ import annotations

import pytest
from rclpy.qos import qos_profile_sensor_data
from ros_harness import NodeProcess, connected_client
from sensor_msgs.msg import Image
from test_node import frame_msg, stamp_of

from nanovlm.msg import VLMResult

CAMERAS = ("front", "rear")


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_llava):
    log = tmp_path_factory.mktemp("logs") / "node.log"
    process = NodeProcess(
        "/cams", log, f"model.path:={tiny_llava}", "rate:=0.0", "max_new_tokens:=2", "cameras:=[front, rear]"
    )
    with connected_client(process, camera_topic="front/image") as client:
        publishers = {c: client.node.create_publisher(Image, f"{c}/image", qos_profile_sensor_data) for c in CAMERAS}
        results = {c: [] for c in CAMERAS}
        for camera in CAMERAS:
            client.node.create_subscription(VLMResult, f"{camera}/result", results[camera].append, 100)
        assert client.spin_until(lambda: all(p.get_subscription_count() for p in publishers.values()))
        yield client, publishers, results


def test_each_camera_is_answered_on_its_own_topics_with_its_own_header(node, photos):
    client, publishers, results = node
    sent = {
        camera: frame_msg(photos[photo], frame_id=f"{camera}_optical")
        for camera, photo in zip(CAMERAS, ("dogs", "lake"), strict=True)
    }
    for _ in range(20):
        for camera, msg in sent.items():
            publishers[camera].publish(msg)
        if client.spin_until(
            lambda: all(any(stamp_of(r) == stamp_of(sent[c]) for r in results[c]) for c in CAMERAS), 3.0
        ):
            break
    for camera in CAMERAS:
        assert {r.header.frame_id for r in results[camera]} == {f"{camera}_optical"}
    # The unnamed default topics are not used when cameras are named.
    assert client.node.count_subscribers("image") == 0
    assert client.node.count_subscribers("front/image") == 1


def test_two_streaming_cameras_share_the_model_fairly(node, photos):
    """Both cameras always have a frame waiting: answers alternate (or go as one batch), so the
    counts never differ by more than one, whatever the model's speed."""
    client, publishers, results = node
    start = {camera: len(results[camera]) for camera in CAMERAS}

    def answered():
        return {camera: len(results[camera]) - start[camera] for camera in CAMERAS}

    def keep_streaming():
        for camera in CAMERAS:
            publishers[camera].publish(frame_msg(photos["fruit"], frame_id=camera))
        return sum(answered().values()) >= 10

    assert client.spin_until(keep_streaming)
    counts = answered()
    assert abs(counts["front"] - counts["rear"]) <= 2, counts
    # Per-camera diagnostics count the same answers (and more may come after the last look).
    client.wait_for_status(
        lambda status, values: int(values["frames answered"]) >= counts["front"], name="nanovlm: camera front"
    )
