"""The event log: indexes, since(), bounded length."""

from __future__ import annotations

from nbindustria.events import DONE, Event, EventLog


def test_since_returns_the_events_from_an_index_and_notes_a_gap():
    log = EventLog(maxlen=5)
    log.extend(Event(DONE, node=str(i)) for i in range(8))
    assert log.next_index == 8 and len(log) == 5
    assert [e.index for e in log.since(6)] == [6, 7]
    assert [e.index for e in log.since(0)] == [3, 4, 5, 6, 7]  # a reader that fell behind
    assert [e.index for e in log.since(-3)] == [3, 4, 5, 6, 7]
    assert log.since(8) == [] and log.since(100) == []
    log.clear()
    assert log.since(0) == []
