"""Await a concurrent.futures.Future in an rclpy coroutine callback without holding a thread.

rclpy runs an `async def` service or action callback as a Task, and resumes a pending Task each
time its executor wakes. A Future completed on another thread (the worker, the deadline thread)
wakes nobody by itself, so the reply could wait for the next camera frame or timer. Here the
completion also schedules a no-op done callback on the executor, which wakes it: the coroutine
resumes at once. Works the same on Humble, Jazzy and Kilted (public rclpy.task API only).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TypeVar

from rclpy.executors import Executor
from rclpy.task import Future as RclpyFuture

T = TypeVar("T")


def _wake(_future) -> None:
    """Scheduling this on the executor is what wakes it."""


async def wait_for(future: Future[T], executor: Executor | None) -> T:
    """The result of `future` (which must not raise: PendingQuestion's never does)."""
    bridge: RclpyFuture = RclpyFuture(executor=executor)
    bridge.add_done_callback(_wake)
    future.add_done_callback(lambda done: bridge.set_result(done.result()))
    return await bridge
