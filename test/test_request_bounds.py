"""No request is lost, none waits without bound, and shutdown does not wait for an answer: the
node in its own process over real ROS 2."""

from __future__ import annotations

import signal
import time

import pytest
from rclpy.qos import QoSProfile
from ros_harness import TIMEOUT, Client, NodeProcess, connected_client
from test_node import frame_msg, stamp_of

from nanovlm.action import Ask
from nanovlm.srv import Query


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_llava):
    log = tmp_path_factory.mktemp("logs") / "node.log"
    process = NodeProcess("/bounds", log, f"model.path:={tiny_llava}", "rate:=0.0", "max_new_tokens:=4")
    with connected_client(process) as client:
        yield process, client


def test_a_burst_of_100_calls_is_answered_or_refused_busy_never_lost(node, photos):
    _, client = node
    # The caller's side must hold 100 replies too (the default client queue keeps 10).
    burst = client.node.create_client(Query, "query", qos_profile=QoSProfile(depth=256))
    assert burst.wait_for_service(timeout_sec=TIMEOUT)
    image = frame_msg(photos["dogs"])
    futures = [burst.call_async(Query.Request(prompt=f"Question {i}?", image=image)) for i in range(100)]
    assert client.spin_until(lambda: all(f.done() for f in futures), timeout=600), (
        f"{sum(not f.done() for f in futures)} of 100 calls got no reply"
    )
    replies = [f.result() for f in futures]
    answered = [r for r in replies if r.success]
    busy = [r for r in replies if r.error.startswith("busy:")]
    others = [r.error for r in replies if not r.success and not r.error.startswith("busy:")]
    assert others == []
    assert len(answered) + len(busy) == 100
    # max_pending_requests (8) wait, one runs: a burst of 100 must meet the bound.
    assert answered and busy
    assert all(r.answer for r in answered)
    # The node is still serving afterwards.
    assert client.query("One more?", image).success


def test_questions_waiting_for_the_model_hold_no_executor_thread(node, photos):
    """Eight long questions (max_pending_requests) against a node with 4 executor threads:
    parameters and camera frames are still served while they wait, and the frame is answered
    between two of them, not after all of them."""
    _, client = node
    waiting = client.node.create_client(Query, "query", qos_profile=QoSProfile(depth=16))
    assert waiting.wait_for_service(timeout_sec=TIMEOUT)
    image = frame_msg(photos["soccer"])
    futures = [
        waiting.call_async(Query.Request(prompt=f"Describe it at length {i}.", image=image, max_new_tokens=100))
        for i in range(8)
    ]
    assert client.get_parameter("rate") == 0.0
    assert not all(f.done() for f in futures), "the questions ended before the parameter reply"
    frame = frame_msg(photos["fruit"])
    client.publish(frame)
    client.wait_for_result(lambda result: stamp_of(result) == stamp_of(frame))
    assert not all(f.done() for f in futures), "the frame waited for every question"
    assert client.spin_until(lambda: all(f.done() for f in futures), timeout=600)
    assert all(f.result().success for f in futures), [f.result().error for f in futures]


def test_setting_model_path_while_the_queue_is_full_is_refused_busy_and_the_node_lives(node, tiny_llava, photos):
    process, client = node
    image = frame_msg(photos["lake"])
    # A long goal runs (its feedback says so) and eight queries wait behind it: the queue is full.
    streaming = []
    assert client.ask_client.wait_for_server(timeout_sec=TIMEOUT)
    goal = Ask.Goal(prompt="Describe everything.", image=image, max_new_tokens=4000)
    goal_future = client.ask_client.send_goal_async(goal, feedback_callback=streaming.append)
    assert client.spin_until(lambda: len(streaming) >= 1)
    waiting = client.node.create_client(Query, "query", qos_profile=QoSProfile(depth=16))
    assert waiting.wait_for_service(timeout_sec=TIMEOUT)
    futures = [waiting.call_async(Query.Request(prompt=f"All {i}?", image=image, max_new_tokens=8)) for i in range(8)]
    client.wait_for_status(lambda status, values: values["queue depth"] == "8")

    result = client.set_parameter("model.path", str(tiny_llava))
    assert not result.successful and result.reason.startswith("busy: 8 requests wait"), result.reason

    client._await(goal_future.result().cancel_goal_async())
    assert client.spin_until(lambda: all(f.done() for f in futures), timeout=600)
    assert all(f.result().success for f in futures)
    assert process.process.poll() is None  # alive
    assert client.set_parameter("model.path", str(tiny_llava)).successful  # free again: accepted


def test_a_timed_out_request_is_stopped_and_the_model_is_free_again(node, photos):
    _, client = node
    image = frame_msg(photos["boxes"])
    _, probe, _ = client.ask(Ask.Goal(prompt="How fast?", image=image, max_new_tokens=20))
    token_ms = probe.decode_ms / max(1, probe.generated_tokens - 1)
    assert client.set_parameter("query_timeout", 1.0).successful
    try:
        # ~4000 tokens would hold the tiny model for minutes: the timeout must stop it.
        response = client.query("Describe everything.", image, max_new_tokens=4000)
        assert not response.success and "no answer within query_timeout=1.0 s" in response.error
    finally:
        assert client.set_parameter("query_timeout", 60.0).successful
    # An Ask goal right after reports how long it waited for the model: had the timed-out answer
    # gone on, thousands of tokens; stopped, none (the reply came once it had stopped).
    _, result, _ = client.ask(Ask.Goal(prompt="Quick?", image=image, max_new_tokens=2))
    assert result.success and result.queue_ms < 20 * token_ms, (result.queue_ms, token_ms)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_long_answer_ends_the_node_cleanly(tmp_path, tiny_llava, photos, signal_number):
    namespace = f"/bounds_{signal.Signals(signal_number).name.lower()}"
    process = NodeProcess(namespace, tmp_path / "node.log", f"model.path:={tiny_llava}")
    client = Client(namespace)
    try:
        client.wait_ready()
        started = []
        goal = Ask.Goal(prompt="Describe everything.", image=frame_msg(photos["lake"]), max_new_tokens=4000)
        assert client.ask_client.wait_for_server(timeout_sec=TIMEOUT)
        client.ask_client.send_goal_async(goal, feedback_callback=lambda message: started.append(message))
        assert client.spin_until(lambda: len(started) >= 2)  # the answer is being generated
        signalled = time.monotonic()
        process.process.send_signal(signal_number)
        exit_code = process.process.wait(timeout=30)  # a bound for a hang, not a speed claim
        print(f"node exited {time.monotonic() - signalled:.2f} s after {signal_number!r}, mid-answer")
        assert exit_code == 0, process.log()[-2000:]
    finally:
        client.close()
        process.stop()
