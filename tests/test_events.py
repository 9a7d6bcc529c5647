"""The event log: indexes, since(), bounded length."""

from __future__ import annotations

import pytest

from nbindustria.events import DONE, QUEUED, RUN_START, RUNNING, Event, EventLog, latest_states


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


def test_packed_events_are_one_entry_and_read_as_their_members():
    log = EventLog()
    seen: list[Event] = []
    packed: list[Event] = []
    log.subscribe(seen.append)
    log.subscribe(packed.append, packed=True)
    log.append(Event(RUN_START))
    queued = ("node", "task", "label", "key", "time", "reason")
    running = ("node", "task", "label", "key", "engine", "started")
    for i in range(3):
        log.pack(QUEUED, queued, (f"n{i}", "t", f"t({i})", f"k{i}", 100.0 + i, "never run"))
    for i in range(2):  # another kind: a new packed event
        log.pack(RUNNING, running, (f"n{i}", "t", f"t({i})", f"k{i}", "kernel", float(i)))
    assert log.next_index == 2 and len(seen) == 4  # the open group is not logged yet
    entries = log.since_packed(1)  # a reader's pull logs it
    assert [(e.kind, e.index, e.nodes()) for e in entries] == [
        (QUEUED, 1, ["n0", "n1", "n2"]), (RUNNING, 2, ["n0", "n1"])]
    log.pack(RUNNING, running, ("n2", "t", "t(2)", "k2", "kernel", 2.0))  # a new group
    log.append(Event(DONE, group={"node": ["n0", "n1"], "task": ["t", "t"], "reason": ["a", "b"]},
                     engine="kernel"))
    assert log.next_index == 5
    # Plain readers and subscribers see one event per node, in the writer's order.
    expected = [(RUN_START, ""), *[(QUEUED, f"n{i}") for i in range(3)],
                *[(RUNNING, f"n{i}") for i in range(3)], (DONE, "n0"), (DONE, "n1")]
    assert [(e.kind, e.node) for e in log.since(0)] == expected
    assert [(e.kind, e.node) for e in seen] == expected
    assert [e.kind for e in packed] == [RUN_START, QUEUED, RUNNING, RUNNING, DONE]
    members = log.since(1)
    assert members[0] == Event(QUEUED, "n0", "t", "t(0)", time=100.0, index=1, key="k0",
                               reason="never run")
    assert members[1].time == 101.0 and members[3].time == entries[1].time  # its own, or shared
    assert [e.index for e in members] == [1, 1, 1, 2, 2, 3, 4, 4]
    assert [(e.reason, e.engine) for e in members[-2:]] == [("a", "kernel"), ("b", "kernel")]
    assert members[-1].info == {} and members[0].group is None
    assert members[4].started == 1.0 and members[5].started == 2.0
    assert [e.node for e in log.since(4)] == ["n0", "n1"]
    assert list(latest_states(packed)) == ["n0", "n1", "n2"]
    assert latest_states(packed)["n2"].kind == RUNNING


def test_a_subscriber_gets_what_a_reader_logged_at_the_writers_next_write():
    log = EventLog()
    seen: list[str] = []
    log.subscribe(lambda e: seen.append(e.node))
    log.pack(QUEUED, ("node",), ("a",))
    assert log.since_packed(0) and seen == []  # logged by the reader: not delivered in its thread
    log.pack(QUEUED, ("node",), ("b",))  # the writer delivers it, then goes on
    assert seen == ["a"]
    log.seal()
    assert seen == ["a", "b"] and log.next_index == 2


def test_a_cached_rerun_logs_its_nodes_and_hits_packed_with_every_field(tmp_path):
    """A fully cached re-run of 300 calls over two levels is a handful of log entries; their
    members are the per-node ADDED and CACHED events every view reads (deps, labels, keys,
    and the recorded facts of each entry), in dependency order."""
    from nbindustria import Pipeline
    from nbindustria.events import ADDED, CACHED, RUN_END, RUN_START

    def calls(pipe):
        @pipe.task
        def base(i):
            return i

        @pipe.task
        def plus(x, i):
            return x + i

        firsts = [base(i) for i in range(150)]
        return firsts + [plus(f, i) for i, f in enumerate(firsts)]

    for run in range(2):
        pipe = Pipeline(name="packed", cache_dir=tmp_path / "c", key_dir=tmp_path / "k",
                        verbose=0)
        handles = calls(pipe)
        start = pipe.events.next_index
        pipe.run()
        entries = pipe.events.since_packed(start)
        members = pipe.events.since(start)
        if run == 0:
            first_run = {e.node: e for e in members if e.kind == "done"}
        pipe.close()
    assert [e.kind for e in entries] == [RUN_START, ADDED, CACHED, CACHED, RUN_END]
    added = [e for e in members if e.kind == ADDED]
    hits = [e for e in members if e.kind == CACHED]
    assert [e.node for e in added] == [h.node_id for h in handles]
    assert [e.label for e in added[:2]] == ["base(0)", "base(1)"]
    assert added[150].deps == (handles[0].node_id,) and added[0].deps == ()
    assert [e.node for e in hits] == [h.node_id for h in handles]  # level by level
    for hit in hits:
        done = first_run[hit.node]
        assert (hit.key, hit.task, hit.label, hit.engine) == (done.key, done.task, done.label,
                                                              done.engine)
        assert hit.size and hit.size > 0 and hit.duration is not None and hit.cpu is not None


def test_a_lazy_column_is_made_once_when_read_and_reads_pickles_and_compares_as_its_list():
    import pickle

    from nbindustria.events import LazyColumn

    made: list[int] = []

    def double(x: int) -> int:
        made.append(x)
        return 2 * x

    column = LazyColumn(double, [1, 2, 3])
    event = Event(QUEUED, group={"node": ["a", "b", "c"], "label": column})
    assert len(column) == 3 and made == []  # its length needs no value
    assert [m.label for m in event.members()] == [2, 4, 6]
    assert column[1:] == [4, 6] and list(column) == [2, 4, 6] and column == [2, 4, 6]
    assert 4 in column and 5 not in column and column.index(6) == 2 and column.count(2) == 1
    assert list(reversed(column)) == [6, 4, 2]
    assert made == [1, 2, 3]  # once, for every read
    copy = pickle.loads(pickle.dumps(event))
    assert type(copy.group["label"]) is list and copy == event


class _CountedRepr:
    """An argument that counts how often a label shows it."""

    shown = 0

    def __nbindustria_token__(self) -> str:
        return "counted"

    def __repr__(self) -> str:
        _CountedRepr.shown += 1
        return "counted"


def _show(x: object) -> str:
    return "shown"


def test_a_cached_run_nobody_watches_makes_no_label_and_reads_no_detail(tmp_path):
    """A fully cached re-run with no line per task and no dashboard formats no call's label and
    reads only keys and digests from the index; a view that reads them later gets them all:
    labels from the calls, the hits' recorded details from the index, even once the pipeline
    is closed (its index is then read from the file)."""
    from nbindustria import Pipeline
    from nbindustria.events import ADDED, CACHED

    def run():
        pipe = Pipeline(name="lazy", cache_dir=tmp_path / "c", key_dir=tmp_path / "k",
                        verbose=0)
        handles = [pipe.task(_show)(_CountedRepr()), pipe.task(_show)(1)]
        start = pipe.events.next_index
        pipe.run()
        return pipe, handles, pipe.events.since_packed(start)

    first, _, _ = run()
    recorded = {row.key: row for row in first.store.index.query()}
    first.close()
    _CountedRepr.shown = 0
    pipe, handles, entries = run()
    assert pipe.store.index.details([]) == {}
    assert _CountedRepr.shown == 0  # no label made
    hits = next(e for e in entries if e.kind == CACHED)
    pipe.close()
    assert hits.group["key"] == [h.key for h in handles]
    for member in hits.members():  # read after the close: from the index file
        row = recorded[member.key]
        assert (member.duration, member.size, member.engine, member.peak_memory, member.cpu) \
            == (row.duration, row.size, row.engine, row.peak_memory, row.cpu)
        assert member.size > 0 and member.duration is not None
    assert [m.label for m in hits.members()] == ["_show(counted)", "_show(1)"]
    assert _CountedRepr.shown == 1  # made once, when read, and kept
    added = next(e for e in entries if e.kind == ADDED)
    assert list(added.group["label"]) == ["_show(counted)", "_show(1)"]
    assert _CountedRepr.shown == 1


def test_a_hits_details_read_after_its_cache_was_deleted_are_unknown(tmp_path):
    import shutil

    from nbindustria import Pipeline
    from nbindustria.events import CACHED

    for _run in range(2):  # the second run: all hits
        pipe = Pipeline(name="gone", cache_dir=tmp_path / "c", key_dir=tmp_path / "k",
                        verbose=0)
        handle = pipe.task(_show)(2)
        start = pipe.events.next_index
        pipe.run()
        pipe.close()
    hits = next(e for e in pipe.events.since_packed(start) if e.kind == CACHED)
    shutil.rmtree(tmp_path / "c")
    (member,) = hits.members()
    assert (member.key, member.label) == (handle.key, "_show(2)")
    assert (member.duration, member.size, member.engine) == (None, None, None)
