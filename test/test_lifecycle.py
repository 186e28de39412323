"""The managed node over real ROS 2, in its own process: transitions in order, "inactive"
answers while not active, the model's memory given back at cleanup, and a deactivate /
activate cycle that leaves the node serving."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from ros_harness import Client, NodeProcess, connected_client
from test_node import frame_msg, send_until_answered


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def managed(tmp_path_factory, demo_model):
    log = tmp_path_factory.mktemp("logs") / "node.log"
    # The demo model (~0.5 GB of weights) makes the memory given back at cleanup measurable.
    process = NodeProcess(
        "/managed",
        log,
        f"model.path:={demo_model}",
        "rate:=0.0",
        "max_new_tokens:=3",
        command=[sys.executable, "-m", "ros2_nanovlm.ros.lifecycle_node"],
    )
    with connected_client(process, camera_topic=None) as client:
        yield process, client


def transition(client, transition_id: int) -> bool:
    change = client.node.create_client(ChangeState, "nanovlm/change_state")
    assert change.wait_for_service(timeout_sec=60)
    response = client._await(change.call_async(ChangeState.Request(transition=Transition(id=transition_id))), 600)
    return response.success


def state(client) -> int:
    get = client.node.create_client(GetState, "nanovlm/get_state")
    assert get.wait_for_service(timeout_sec=60)
    return client._await(get.call_async(GetState.Request())).current_state.id


def test_transitions_in_order_with_memory_given_back_and_a_pause_that_resumes(managed, photos):
    process, client = managed
    pid = process.process.pid
    image = frame_msg(photos["dogs"])
    assert state(client) == State.PRIMARY_STATE_UNCONFIGURED
    response = client.query("What is this?", image)
    assert not response.success and response.error.startswith("inactive")
    before_model = rss_mb(pid)

    assert transition(client, Transition.TRANSITION_CONFIGURE)
    assert state(client) == State.PRIMARY_STATE_INACTIVE
    with_model = rss_mb(pid)
    assert with_model - before_model > 200, (before_model, with_model)  # the weights are in
    assert client.query("What is this?", image).error.startswith("inactive")

    assert transition(client, Transition.TRANSITION_ACTIVATE)
    assert state(client) == State.PRIMARY_STATE_ACTIVE
    first = client.query("What is this?", image)
    assert first.success and first.answer
    send_until_answered(client, frame_msg(photos["lake"]))  # the camera is subscribed

    assert transition(client, Transition.TRANSITION_DEACTIVATE)
    assert state(client) == State.PRIMARY_STATE_INACTIVE
    assert client.query("What is this?", image).error.startswith("inactive")
    assert client.spin_until(lambda: client.node.count_subscribers("image") == 0)

    assert transition(client, Transition.TRANSITION_ACTIVATE)
    again = client.query("What is this?", image)
    assert again.success and again.answer == first.answer
    send_until_answered(client, frame_msg(photos["lake"]))

    assert transition(client, Transition.TRANSITION_DEACTIVATE)
    loaded = rss_mb(pid)
    assert transition(client, Transition.TRANSITION_CLEANUP)
    assert state(client) == State.PRIMARY_STATE_UNCONFIGURED
    freed = loaded - rss_mb(pid)
    # Most of what the model took comes back (allocator caches and imported code stay).
    assert freed > 0.6 * (with_model - before_model), (before_model, with_model, loaded, rss_mb(pid))
    response = client.query("What is this?", image)
    assert not response.success and response.error.startswith("inactive")


def test_a_failed_configure_says_why_and_stays_unconfigured(tmp_path):
    process = NodeProcess(
        "/managed_bad",
        tmp_path / "node.log",
        f"model.path:={tmp_path}",
        command=[sys.executable, "-m", "ros2_nanovlm.ros.lifecycle_node"],
    )
    with connected_client(process, camera_topic=None) as client:
        assert not transition(client, Transition.TRANSITION_CONFIGURE)
        assert state(client) == State.PRIMARY_STATE_UNCONFIGURED
        status, _ = client.wait_for_status(lambda status, values: "config.json" in status.message)
        assert "no model loaded" in status.message


def test_shutdown_ends_the_process(tmp_path, tiny_llava):
    process = NodeProcess(
        "/managed_end",
        tmp_path / "node.log",
        f"model.path:={tiny_llava}",
        command=[sys.executable, "-m", "ros2_nanovlm.ros.lifecycle_node"],
    )
    client = None
    try:
        client = Client("/managed_end")
        client.wait_ready(camera_topic=None)
        assert transition(client, Transition.TRANSITION_CONFIGURE)
        assert transition(client, Transition.TRANSITION_INACTIVE_SHUTDOWN)
        assert process.process.wait(timeout=60) == 0  # the process ends by itself
    finally:
        if client is not None:
            client.close()
        process.stop()
