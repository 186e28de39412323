"""The embedded demo VLM (EfficientNet-Lite0 -> projector -> SmolLM2) answers for real: its
answers name what is in the photographs, through the engine and through the node over ROS 2."""

from __future__ import annotations

import pytest
from ros_harness import NodeProcess, connected_client
from subjects import SUBJECTS, names_subject

from ros2_nanovlm.engine import EngineConfig, VLMEngine
from ros2_nanovlm.ros.image_conversion import rgb_to_compressed_msg, rgb_to_image_msg

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def demo_engine(demo_model):
    return VLMEngine.load(EngineConfig(model_path=str(demo_model), max_new_tokens=24))


def test_answers_name_the_main_subject(demo_engine, photos):
    answers = {name: demo_engine.ask(QUESTION, photos[name]).text for name in SUBJECTS}
    named = [name for name, answer in answers.items() if names_subject(name, answer)]
    # 5 of the 7 photos whose subject is an ImageNet class, at least (the bar).
    assert len(named) >= 5, answers
    for dog_photo in ("dogs", "dogs_2"):
        assert dog_photo in named, answers
    # The answer follows the frame (not a constant, not the previous frame's).
    assert len(set(answers.values())) >= 5, answers


@pytest.fixture(scope="module")
def demo_node(tmp_path_factory, demo_model):
    log = tmp_path_factory.mktemp("logs") / "demo-node.log"
    process = NodeProcess("/demo", log, f"model.path:={demo_model}", "max_new_tokens:=24", "subscribe_compressed:=true",
                          "rate:=0.0")  # fmt: skip
    with connected_client(process) as client:
        yield client


def frames_in_every_encoding(frame, photo):
    """The same photo as a camera might send it: colour encodings and sizes."""
    from conftest import REPO

    from ros2_nanovlm.camera_player import load_photo

    path = REPO / "data" / "images" / f"{photo}.jpg"
    return {
        "rgb8": rgb_to_image_msg(frame, "rgb8"),
        "bgr8": rgb_to_image_msg(frame, "bgr8"),
        "rgba8": rgb_to_image_msg(frame, "rgba8"),
        "bgra8": rgb_to_image_msg(frame, "bgra8"),
        "rgb8 640 px": rgb_to_image_msg(load_photo(path, 640), "rgb8"),
        "bgr8 full size": rgb_to_image_msg(load_photo(path, 0), "bgr8"),
    }


@pytest.mark.parametrize("photo", ["dogs", "fruit", "soccer"])
def test_node_answers_name_the_subject_in_every_encoding(demo_node, photos, photo):
    answers = {}
    for label, msg in frames_in_every_encoding(photos[photo], photo).items():
        response = demo_node.query(QUESTION, msg)
        assert response.success, response.error
        answers[label] = response.answer
    assert all(names_subject(photo, answer) for answer in answers.values()), answers
    # the colour encodings carry the same pixels: the same answer
    assert len({answers[k] for k in ("rgb8", "bgr8", "rgba8", "bgra8")}) == 1, answers


def test_node_answers_compressed_and_mono_frames(demo_node, photos):
    from builtin_interfaces.msg import Time

    jpeg = rgb_to_compressed_msg(photos["dogs"], "jpeg")
    jpeg.header.stamp = Time(sec=4242, nanosec=1)
    for _ in range(20):  # best effort: publish until the answer arrives
        demo_node.publish(jpeg)
        if demo_node.spin_until(lambda: any(r.header.stamp.sec == 4242 for r in demo_node.results), 5.0):
            break
    result = next(r for r in demo_node.results if r.header.stamp.sec == 4242)
    assert names_subject("dogs", result.answer), result.answer
    # Grey frames keep shapes: the sign is still a sign.
    mono = demo_node.query(QUESTION, rgb_to_image_msg(photos["path"], "mono8"))
    assert mono.success and names_subject("path", mono.answer), mono.answer
