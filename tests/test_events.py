"""The event log: indexes, since(), bounded length."""

from __future__ import annotations

import pytest

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


def test_an_event_compares_pickles_and_prints_by_its_fields():
    import pickle

    event = Event(DONE, node="n1", task="fit", label="fit(1)", duration=2.5, info={"a": 1})
    copy = pickle.loads(pickle.dumps(event))
    assert copy == event and copy is not event
    assert copy != Event(DONE, node="n1", task="fit", label="fit(1)", duration=2.6,
                         info={"a": 1}, time=event.time)
    plain = pickle.loads(pickle.dumps(Event(DONE)))  # the shared empty info pickles too
    assert plain.info == {} and isinstance(plain.info, dict)
    text = repr(event)
    assert text.startswith("Event('done', ") and "duration=2.5" in text
    assert "error=" not in text  # fields at their defaults are left out


def test_events_share_no_mutable_default():
    first, second = Event(DONE), Event(DONE)
    with pytest.raises(TypeError):  # read-only: no event can change another's
        first.info["x"] = 1  # type: ignore[index]
    assert second.info == {} and first.info == {}
    assert first.time <= second.time
