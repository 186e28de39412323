"""The deadline thread behind query_timeout: calls come in deadline order, a cancelled one
never comes, a huge timeout does not kill the thread, a failing call does not stop the rest."""

from __future__ import annotations

import threading

from ros2_nanovlm.deadlines import Deadlines

WAIT = 10.0


def test_calls_come_in_deadline_order_and_cancelled_ones_never():
    deadlines, calls, done = Deadlines(), [], threading.Event()
    try:
        deadlines.call_in(0.03, lambda: calls.append("third"))
        deadlines.call_in(0.01, lambda: calls.append("first"))
        skipped = deadlines.call_in(0.02, lambda: calls.append("cancelled"))
        deadlines.call_in(0.02, lambda: calls.append("second"))
        deadlines.call_in(0.04, done.set)
        skipped.cancel()
        assert done.wait(WAIT)
        assert calls == ["first", "second", "third"]
    finally:
        deadlines.close()


def test_a_huge_timeout_and_a_failing_call_leave_the_thread_working():
    errors, done = [], threading.Event()
    deadlines = Deadlines(on_error=errors.append)
    try:
        deadlines.call_in(1e300, done.set)  # never due; a wait this long would overflow a lock
        deadlines.call_in(0.0, lambda: 1 / 0)
        deadlines.call_in(0.01, done.set)
        assert done.wait(WAIT)
        assert [type(error) for error in errors] == [ZeroDivisionError]
    finally:
        deadlines.close()


def test_close_drops_what_is_not_due():
    deadlines, calls = Deadlines(), []
    deadlines.call_in(3600.0, lambda: calls.append("late"))
    assert len(deadlines) == 1
    deadlines.close()
    assert calls == [] and len(deadlines) == 0
