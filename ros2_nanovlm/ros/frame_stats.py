"""What happened to every camera frame, per camera: the one owner of the counters.

received  arrived at the node
answered  answered and published
replaced  dropped for a newer frame of the same camera before the model was free
rejected  invalid message, failed conversion, or an error while answering
lost      published but never arrived (sequence-number gaps, or DDS's message-lost reports)

The camera callbacks, the worker and the diagnostics timer all touch these; one lock guards
them. No ROS imports: the node passes in plain values. Latency and answer rate are kept over a
sliding window, so diagnostics describe now, not the average since start.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from .sequence_gaps import SequenceGaps

WINDOW_S = 10.0  # answer rate, errors: over the last WINDOW_S seconds
LATENCY_SAMPLES = 200  # p50 / p95 over the last LATENCY_SAMPLES answers


@dataclass
class CameraCounts:
    received: int = 0
    answered: int = 0
    replaced: int = 0
    rejected: int = 0
    lost_events: int = 0  # DDS message-lost reports
    annotated: int = 0  # annotated images published (only while someone subscribes)
    sequence_gaps: SequenceGaps = field(default_factory=SequenceGaps)
    last_received: float | None = None  # monotonic seconds

    @property
    def lost(self) -> int:
        """The sequence-number gaps also cover what DDS reports, where the rmw gives sequence
        numbers (Jazzy and later); else DDS's reports."""
        return max(self.sequence_gaps.missing, self.lost_events)

    @property
    def dropped(self) -> int:
        return self.lost + self.replaced + self.rejected


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of the counters, for diagnostics and logs."""

    cameras: dict[str, dict[str, int]]
    answer_rate_hz: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    errors_in_window: int
    last_error: str
    seconds_since_frame: float | None  # None before the first frame

    def total(self, counter: str) -> int:
        return sum(counts[counter] for counts in self.cameras.values())


class FrameStats:
    """Counters per camera, answer times and latencies. Thread-safe (one lock)."""

    def __init__(self, cameras: list[str], clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._cameras = {camera: CameraCounts() for camera in cameras}
        self._answer_times: collections.deque[float] = collections.deque()
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._error_times: collections.deque[float] = collections.deque()
        self._last_error = ""

    def received(self, camera: str) -> None:
        with self._lock:
            counts = self._cameras[camera]
            counts.received += 1
            counts.last_received = self._clock()

    def replaced(self, camera: str, count: int = 1) -> None:
        with self._lock:
            self._cameras[camera].replaced += count

    def rejected(self, camera: str, error: object) -> None:
        with self._lock:
            self._cameras[camera].rejected += 1
            self._note_error(str(error))

    def error(self, error: object) -> None:
        """An error that cost no frame (a failed query): shows in diagnostics all the same."""
        with self._lock:
            self._note_error(str(error))

    def answered(self, camera: str, latency_ms: float | None) -> None:
        with self._lock:
            self._cameras[camera].answered += 1
            self._answer_times.append(self._clock())
            if latency_ms is not None:
                self._latencies_ms.append(latency_ms)

    def annotated(self, camera: str) -> None:
        with self._lock:
            self._cameras[camera].annotated += 1

    def sequence_number(self, camera: str, publisher: Hashable, number: int) -> None:
        with self._lock:
            self._cameras[camera].sequence_gaps.observe(publisher, number)

    def lost_events(self, camera: str, count: int) -> None:
        with self._lock:
            self._cameras[camera].lost_events += count

    def dropped(self, camera: str) -> int:
        with self._lock:
            return self._cameras[camera].dropped

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            now = self._clock()
            _trim(self._answer_times, now - WINDOW_S)
            _trim(self._error_times, now - WINDOW_S)
            latencies = sorted(self._latencies_ms)
            last_frames = [c.last_received for c in self._cameras.values() if c.last_received is not None]
            return StatsSnapshot(
                cameras={
                    camera: {
                        "received": c.received,
                        "answered": c.answered,
                        "replaced": c.replaced,
                        "rejected": c.rejected,
                        "lost": c.lost,
                        "dropped": c.dropped,
                        "annotated": c.annotated,
                    }
                    for camera, c in self._cameras.items()
                },
                answer_rate_hz=len(self._answer_times) / WINDOW_S,
                latency_p50_ms=_percentile(latencies, 0.50),
                latency_p95_ms=_percentile(latencies, 0.95),
                errors_in_window=len(self._error_times),
                last_error=self._last_error,
                seconds_since_frame=now - max(last_frames) if last_frames else None,
            )

    def _note_error(self, message: str) -> None:
        self._error_times.append(self._clock())
        self._last_error = message


def _trim(times: collections.deque[float], oldest: float) -> None:
    while times and times[0] < oldest:
        times.popleft()


def _percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted `values`; None when empty."""
    if not values:
        return None
    rank = max(0, math.ceil(fraction * len(values)) - 1)
    return values[rank]
