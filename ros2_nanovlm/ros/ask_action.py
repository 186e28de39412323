"""The `ask` action (nanovlm/action/Ask): a question whose answer streams back as feedback and
that a behavior tree can cancel.

Feedback carries the whole answer so far (not a delta: a client that misses one loses
nothing), at most one message per feedback_period seconds (0 = one per token). A cancel sets
the goal's Event, which the generation loop checks before every token: the goal ends CANCELED
within one token, its result holding the partial answer. Goals past max_pending_requests are
accepted and then aborted with a "busy" error, because a rejected goal carries no reason.
"""

from __future__ import annotations

import threading
import time

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import CallbackGroup
from rclpy.node import Node

from nanovlm.action import Ask

from .asking import Asker, PendingQuestion, Question
from .awaiting import wait_for
from .query_service import REQUEST_QUEUE


class AskAction:
    """Owns the action server and the PendingQuestion of each goal. Its callbacks run on executor
    threads (reentrant group); the execute callback is a coroutine suspended while the model
    answers; feedback is published from the worker thread, inside the token callback."""

    def __init__(self, node: Node, asker: Asker, group: CallbackGroup, is_active, feedback_period):
        self._asker = asker
        self._is_active = is_active
        self._feedback_period = feedback_period
        self._node = node
        self._pending: dict[bytes, PendingQuestion] = {}
        self._lock = threading.Lock()
        self._server = ActionServer(
            node,
            Ask,
            "ask",
            execute_callback=self._execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=self._cancel,
            callback_group=group,
            goal_service_qos_profile=REQUEST_QUEUE,
            cancel_service_qos_profile=REQUEST_QUEUE,
            result_service_qos_profile=REQUEST_QUEUE,
        )

    def destroy(self) -> None:
        with self._lock:
            for pending in self._pending.values():
                pending.cancel()
        self._server.destroy()

    def _cancel(self, goal_handle) -> CancelResponse:
        with self._lock:
            pending = self._pending.get(bytes(goal_handle.goal_id.uuid))
        if pending is not None:
            pending.cancel()
        return CancelResponse.ACCEPT

    async def _execute(self, goal_handle) -> Ask.Result:
        goal: Ask.Goal = goal_handle.request
        result = Ask.Result(success=False)
        if not self._is_active():
            result.error = "inactive: the node is not active (lifecycle); activate it first"
            goal_handle.abort()
            return result
        key = bytes(goal_handle.goal_id.uuid)
        pending = self._asker.start(Question.of(goal), on_token=_FeedbackStream(goal_handle, self._feedback_period()))
        with self._lock:
            self._pending[key] = pending
        if goal_handle.is_cancel_requested:  # cancelled between acceptance and now
            pending.cancel()
        try:
            outcome = await wait_for(pending.future, self._node.executor)
        finally:
            with self._lock:
                del self._pending[key]
        result.header = outcome.header
        result.queue_ms = outcome.queue_ms
        answer = outcome.answer
        if answer is None:
            result.error = outcome.error
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
            else:
                goal_handle.abort()
            return result
        result.answer = answer.text
        result.json = answer.json
        result.stop_reason = answer.stop_reason
        result.prompt_tokens = answer.prompt_tokens
        result.generated_tokens = answer.generated_tokens
        result.vision_ms = answer.timings.vision_ms
        result.prefill_ms = answer.timings.prefill_ms
        result.decode_ms = answer.timings.decode_ms
        result.total_ms = answer.timings.total_ms
        if answer.stop_reason == "cancelled" or goal_handle.is_cancel_requested:
            result.error = "cancelled"
            goal_handle.canceled()
        elif answer.json_error:
            result.error = answer.json_error
            goal_handle.abort()
        else:
            result.success = True
            goal_handle.succeed()
        return result


class _FeedbackStream:
    """The token callback of one goal (runs on the worker): the answer so far, throttled."""

    def __init__(self, goal_handle, period_s: float):
        self._goal_handle = goal_handle
        self._period_s = period_s
        self._text = ""
        self._tokens = 0
        self._last_sent = float("-inf")

    def __call__(self, piece: str) -> None:
        self._text += piece
        self._tokens += 1
        now = time.monotonic()
        if now - self._last_sent >= self._period_s:
            self._last_sent = now
            self._goal_handle.publish_feedback(Ask.Feedback(answer=self._text, tokens=self._tokens))
