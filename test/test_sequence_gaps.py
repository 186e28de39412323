"""Counting the frames a publisher sent that never arrived, from sequence numbers (no ROS)."""

from ros2_nanovlm.ros.sequence_gaps import SequenceGaps


def test_gaps_are_counted_per_publisher():
    gaps = SequenceGaps()
    assert gaps.observe("camera", 7) == 0  # the first message we see: nothing before it is ours
    assert gaps.observe("camera", 8) == 0
    assert gaps.observe("camera", 12) == 3
    assert gaps.observe("other", 100) == 0  # another publisher has its own numbers
    assert gaps.observe("other", 102) == 1
    assert gaps.missing == 4


def test_a_restarted_publisher_starts_a_new_count():
    gaps = SequenceGaps()
    gaps.observe("camera", 50)
    assert gaps.observe("camera", 1) == 0  # numbers went back: a restart, not 50 missing ones
    assert gaps.observe("camera", 3) == 1
    assert gaps.missing == 1


def test_publishers_remembered_are_bounded():
    gaps = SequenceGaps(max_publishers=2)
    for name in ("a", "b", "c"):
        gaps.observe(name, 1)
    assert gaps.observe("a", 5) == 0  # "a" was forgotten: its first number again
    assert gaps.observe("c", 3) == 1
