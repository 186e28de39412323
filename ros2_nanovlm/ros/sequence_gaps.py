"""Frames a camera published that never reached the node, from the publishers' sequence numbers.

DDS reports a lost best-effort sample (the message-lost event) only for some losses. A frame
that arrives while the executor is busy sits in the reader's KEEP_LAST history, and a newer one
overwrites it without any event: with the model holding the CPU, that was half of a 30 Hz
stream in CI. Every message carries its publisher's sequence number (rmw MessageInfo), so a
jump from n to n + k means k - 1 frames went missing, whatever the cause.
No ROS imports: the node passes in what rclpy's MessageInfo holds.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable


class SequenceGaps:
    """Counts the sequence numbers skipped per publisher; `max_publishers` are remembered."""

    def __init__(self, max_publishers: int = 64):
        self._last: collections.OrderedDict[Hashable, int] = collections.OrderedDict()
        self._max_publishers = max_publishers
        self.missing = 0

    def observe(self, publisher: Hashable, sequence_number: int) -> int:
        """Record a message; returns how many before it from the same publisher were missed."""
        last = self._last.get(publisher)
        # A number that goes back is a restarted publisher (where the rmw gives no publisher id
        # to tell them apart) or, rarely, a late sample: start counting from it again.
        self._last[publisher] = sequence_number
        self._last.move_to_end(publisher)
        while len(self._last) > self._max_publishers:
            self._last.popitem(last=False)
        missed = sequence_number - last - 1 if last is not None and sequence_number > last + 1 else 0
        self.missing += missed
        return missed
