"""The managed (lifecycle) nanovlm node: the same parts as VLMNode, driven by transitions.

  configure   loads the model (the transition waits for it; a failed load fails it)
  activate    subscribes the cameras, creates the answer publishers, answers questions
  deactivate  unsubscribes; the query service and the Ask action answer "inactive"
  cleanup     frees the model and its memory (CPU RSS, CUDA memory)
  shutdown    frees everything and ends the process

The query service, the Ask action, /diagnostics and the parameters exist in every state, so a
caller gets "inactive" rather than silence, and rqt shows why. Only rclpy.lifecycle APIs that
Humble has are used.
"""

from __future__ import annotations

import rclpy
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from .entry import spin_node
from .node import LOAD_WAIT_S, NodeParts


class VLMLifecycleNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("nanovlm", **kwargs)
        self.parts = NodeParts(self)
        self.executor_threads = self.parts.executor_threads

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if not self.parts.load_model().result(timeout=LOAD_WAIT_S):
            return TransitionCallbackReturn.FAILURE  # the reason is logged and in /diagnostics
        self.parts.log_loaded()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.parts.activate()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.parts.deactivate()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.parts.cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.parts.cleanup()
        # End the process once the transition's reply is out: a one-shot timer, not from inside
        # the transition (the caller would get no answer).
        timer = self.create_timer(0.1, lambda: (timer.cancel(), rclpy.try_shutdown(context=self.context)))
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        self.parts.destroy()
        super().destroy_node()


def main(args=None) -> None:
    spin_node(VLMLifecycleNode, args=args)


if __name__ == "__main__":
    main()
