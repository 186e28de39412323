"""The main() of every nanovlm node: init, spin, and a clean shutdown on Ctrl-C or SIGINT
(try/finally with rclpy.try_shutdown works on Humble, Jazzy and Kilted alike)."""

from __future__ import annotations

from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node


def spin_node(make_node: Callable[[], Node], *, threads: int = 1, args=None) -> None:
    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        # A node whose callbacks may run side by side says how many threads it wants.
        threads = getattr(node, "executor_threads", threads)
        executor = MultiThreadedExecutor(num_threads=threads) if threads > 1 else SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
