"""/diagnostics for rqt_robot_monitor and the diagnostic aggregator, once a second.

Published as diagnostic_updater does it (that package is not on PyPI, so this is the small
publisher by hand): a DiagnosticArray on the absolute topic /diagnostics, one status named
"<node name>: <task>", hardware_id the device the model runs on, values as KeyValue strings.
One status for the node ("vlm") and, with several cameras, one per camera.

The level is a judgement on what the counters say (FrameStats) and on the model's state:
ERROR  no model (the load failed, or the node is unconfigured)
WARN   the model is loading; inactive; no frame for diagnostics.stale_after seconds; answers
       well below the rate limit while frames wait; errors in the last window
OK     otherwise
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

from .frame_stats import WINDOW_S, FrameStats, StatsSnapshot

PERIOD_S = 1.0
SLOW_FRACTION = 0.5  # answer rate below this fraction of `rate` (while frames arrive faster) warns


@dataclass(frozen=True)
class ModelState:
    """What the node says about its model, for diagnostics."""

    model: str  # "" when none is loaded
    device: str
    problem: str  # why there is no model ("" when loaded)
    loading: bool
    active: bool
    queue_depth: int
    gpu_memory_mb: float | None  # CUDA memory allocated by this process; None on the CPU


def node_status(snapshot: StatsSnapshot, state: ModelState, rate_hz: float, stale_after_s: float):
    """(level, message) of the whole node."""
    if state.loading:
        return DiagnosticStatus.WARN, "the model is loading"
    if not state.model:
        return DiagnosticStatus.ERROR, state.problem or "no model loaded"
    if not state.active:
        return DiagnosticStatus.WARN, "inactive (lifecycle): not answering"
    if snapshot.seconds_since_frame is None:
        return DiagnosticStatus.WARN, "no camera frame received yet"
    if snapshot.seconds_since_frame > stale_after_s:
        return DiagnosticStatus.WARN, f"no camera frame for {snapshot.seconds_since_frame:.1f} s"
    if snapshot.errors_in_window:
        return (
            DiagnosticStatus.WARN,
            f"{snapshot.errors_in_window} errors in the last {WINDOW_S:.0f} s; last: {snapshot.last_error}",
        )
    if rate_hz > 0 and snapshot.answer_rate_hz < SLOW_FRACTION * rate_hz and snapshot.total("replaced"):
        return (
            DiagnosticStatus.WARN,
            f"answering {snapshot.answer_rate_hz:.2f} frames/s, well below rate={rate_hz:g} (the model is too slow)",
        )
    return DiagnosticStatus.OK, "answering"


def _values(snapshot: StatsSnapshot, state: ModelState) -> list[KeyValue]:
    def ms(value):
        return "" if value is None else f"{value:.1f}"

    values = {
        "model": state.model,
        "device": state.device,
        "frames received": snapshot.total("received"),
        "frames answered": snapshot.total("answered"),
        "frames replaced": snapshot.total("replaced"),
        "frames rejected": snapshot.total("rejected"),
        "frames lost": snapshot.total("lost"),
        "annotated images": snapshot.total("annotated"),
        "answer rate (Hz)": f"{snapshot.answer_rate_hz:.3f}",
        "latency p50 (ms)": ms(snapshot.latency_p50_ms),
        "latency p95 (ms)": ms(snapshot.latency_p95_ms),
        "queue depth": state.queue_depth,
        "last error": snapshot.last_error,
    }
    if state.gpu_memory_mb is not None:
        values["GPU memory (MB)"] = f"{state.gpu_memory_mb:.0f}"
    return [KeyValue(key=key, value=str(value)) for key, value in values.items()]


def _camera_key(counter: str) -> str:
    return "annotated images" if counter == "annotated" else f"frames {counter}"


class Diagnostics:
    """Owns the /diagnostics publisher and its 1 Hz timer (executor thread)."""

    def __init__(
        self,
        node: Node,
        stats: FrameStats,
        state: Callable[[], ModelState],
        rate_hz: Callable[[], float],
        stale_after_s: Callable[[], float],
    ):
        self._node = node
        self._stats = stats
        self._state = state
        self._rate_hz = rate_hz
        self._stale_after_s = stale_after_s
        self._publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._timer = node.create_timer(PERIOD_S, self.publish)

    def destroy(self) -> None:
        self._node.destroy_timer(self._timer)
        self._node.destroy_publisher(self._publisher)

    def publish(self) -> None:
        snapshot = self._stats.snapshot()
        state = self._state()
        name = self._node.get_name()
        level, message = node_status(snapshot, state, self._rate_hz(), self._stale_after_s())
        hardware_id = state.device or "none"
        statuses = [
            DiagnosticStatus(
                level=level,
                name=f"{name}: vlm",
                message=message,
                hardware_id=hardware_id,
                values=_values(snapshot, state),
            )
        ]
        if len(snapshot.cameras) > 1:
            for camera, counts in snapshot.cameras.items():
                statuses.append(
                    DiagnosticStatus(
                        level=DiagnosticStatus.OK if counts["received"] else DiagnosticStatus.WARN,
                        name=f"{name}: camera {camera}",
                        message="receiving" if counts["received"] else "no frame received yet",
                        hardware_id=hardware_id,
                        values=[KeyValue(key=_camera_key(key), value=str(value)) for key, value in counts.items()],
                    )
                )
        array = DiagnosticArray(status=statuses)
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._publisher.publish(array)
