"""The `query` service (nanovlm/srv/Query): one question, one reply, for behavior trees.

The callback is a coroutine: it queues the question and awaits its outcome without holding an
executor thread, so frames, parameters and timers are served while the model works. A request
past max_pending_requests is refused as busy at once; every request gets a reply.
"""

from __future__ import annotations

from rclpy.callback_groups import CallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_services_default

from nanovlm.srv import Query

from .asking import Asker, Question
from .awaiting import wait_for

# Requests wait in the service's DDS reader until an executor thread takes them; the default
# depth (10) drops the 11th of a burst before the node can answer it, even "busy". Deep enough
# for a burst of 100 calls: each is taken at once, and answered or refused.
REQUEST_QUEUE = QoSProfile(
    depth=256,
    history=qos_profile_services_default.history,
    reliability=qos_profile_services_default.reliability,
    durability=qos_profile_services_default.durability,
)


class QueryService:
    """Owns the service server. Its callback runs on executor threads (reentrant group), as an
    rclpy Task that is suspended while the model answers."""

    def __init__(self, node: Node, asker: Asker, group: CallbackGroup, is_active):
        self._node = node
        self._asker = asker
        self._is_active = is_active
        self._service = node.create_service(
            Query, "query", self._callback, qos_profile=REQUEST_QUEUE, callback_group=group
        )

    def destroy(self) -> None:
        self._node.destroy_service(self._service)

    async def _callback(self, request: Query.Request, response: Query.Response) -> Query.Response:
        response.success = False
        if not self._is_active():
            response.error = "inactive: the node is not active (lifecycle); activate it first"
            return response
        outcome = await wait_for(self._asker.start(Question.of(request)).future, self._node.executor)
        response.header = outcome.header
        if outcome.answer is None:
            response.error = outcome.error
            return response
        answer = outcome.answer
        response.answer = answer.text
        response.json = answer.json
        response.error = answer.json_error
        # JSON mode without complete JSON is a failure: a robot program must not parse the partial text.
        response.success = not answer.json_error
        return response
