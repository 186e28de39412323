"""The Ask action over real ROS 2, node in its own process: feedback streams token by token,
the result equals the query service's answer, cancel stops the answer early."""

from __future__ import annotations

import itertools

import pytest
from action_msgs.msg import GoalStatus
from ros_harness import NodeProcess, connected_client
from test_node import frame_msg

from nanovlm.action import Ask


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_llava):
    log = tmp_path_factory.mktemp("logs") / "node.log"
    process = NodeProcess(
        "/action", log, f"model.path:={tiny_llava}", "rate:=0.0", "feedback_period:=0.0", "max_new_tokens:=12"
    )
    with connected_client(process) as client:
        yield process, client


def test_feedback_grows_token_by_token_and_the_result_equals_the_service(node, photos):
    _, client = node
    image = frame_msg(photos["dogs"], frame_id="goal_cam")
    status, result, feedbacks = client.ask(Ask.Goal(prompt="What is in the picture?", image=image))
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.error
    assert result.stop_reason in ("eos", "max_new_tokens")
    # feedback_period 0: one message per text piece, each the whole answer so far
    assert len(feedbacks) >= 2
    assert [f.tokens for f in feedbacks] == list(range(1, len(feedbacks) + 1))
    for shorter, longer in itertools.pairwise(feedbacks):
        assert longer.answer.startswith(shorter.answer) and len(longer.answer) > len(shorter.answer)
    assert feedbacks[-1].answer == result.answer
    assert result.header.frame_id == "goal_cam"
    assert result.generated_tokens == 12 or result.stop_reason == "eos"
    assert result.total_ms > 0 and result.prompt_tokens > 0

    response = client.query("What is in the picture?", image)
    assert response.success and response.answer == result.answer and response.json == result.json


def test_cancel_stops_the_answer_early_with_the_partial_text(node, photos):
    _, client = node
    image = frame_msg(photos["boxes"])
    goal = Ask.Goal(prompt="Describe everything.", image=image, max_new_tokens=400)
    status, result, feedbacks = client.ask(goal, cancel_when=lambda feedbacks: len(feedbacks) >= 3)
    assert status == GoalStatus.STATUS_CANCELED
    assert result.stop_reason == "cancelled" and result.error == "cancelled" and not result.success
    # The tiny model writes 400 tokens when left alone (no end-of-answer token): the cancel cut it.
    assert 3 <= result.generated_tokens < 400
    assert result.answer.startswith(feedbacks[2].answer)
    # The node serves the next goal as before.
    status, result, _ = client.ask(Ask.Goal(prompt="And now?", image=image, max_new_tokens=3))
    assert status == GoalStatus.STATUS_SUCCEEDED and result.generated_tokens == 3


def test_goal_errors_abort_with_the_reason(node):
    _, client = node
    status, result, _ = client.ask(Ask.Goal(prompt="Anything?", camera="left"))
    assert status == GoalStatus.STATUS_ABORTED
    assert "no camera 'left'" in result.error
    status, result, _ = client.ask(Ask.Goal(prompt="Anything?"))
    assert status == GoalStatus.STATUS_ABORTED and "no camera frame has arrived yet" in result.error
