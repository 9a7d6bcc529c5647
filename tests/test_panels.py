"""The pure functions that turn run events into the dashboard's panel data."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time

import pytest

from nbindustria import panels
from nbindustria.events import (
    ADDED,
    CACHED,
    DONE,
    FAILED,
    QUEUED,
    RUN_END,
    RUN_START,
    RUNNING,
    SKIPPED,
    Event,
)

T0 = 1_700_000_000.0


def added(node: str, task: str, deps: tuple[str, ...] = (), label: str = "") -> Event:
    return Event(ADDED, node=node, task=task, label=label or f"{task}({node})", time=T0,
                 deps=deps)


def ran(node: str, task: str, start: float, end: float, engine: str = "engine 0 (h:1)",
        memory: int = 2**20, kind: str = DONE) -> list[Event]:
    label = f"{task}({node})"
    extra = {"error": "ValueError: bad", "traceback": "Traceback ...\nValueError: bad"} \
        if kind == FAILED else {"reason": "never run", "size": 10}
    return [
        Event(QUEUED, node=node, task=task, label=label, time=T0 + start),
        Event(RUNNING, node=node, task=task, label=label, time=T0 + start, engine=engine),
        Event(kind, node=node, task=task, label=label, time=T0 + end, engine=engine,
              started=T0 + start, ended=T0 + end, duration=end - start, cpu=(end - start) / 2,
              peak_memory=memory, key=f"key-{node}", **extra),
    ]


def small_run(end: bool = True) -> list[Event]:
    """load -> (a, b) -> c ; a fails, so c is skipped; load is a cache hit."""
    events = [
        Event(RUN_START, time=T0, info={"pipeline": "demo", "engines": "2 local engines",
                                        "n_engines": 2, "run": 3, "memory_limit": 2**30}),
        added("L", "load"),
        added("A", "fit", ("L",)),
        added("B", "fit", ("L",)),
        added("C", "report", ("A", "B")),
        Event(CACHED, node="L", task="load", label="load(L)", time=T0 + 0.1, duration=4.5,
              size=100, key="key-L", engine="engine 1 (h:2)"),
        *ran("A", "fit", 0.2, 1.2, kind=FAILED),
        *ran("B", "fit", 0.2, 2.2, engine="engine 1 (h:2)", memory=3 * 2**20),
        Event(SKIPPED, node="C", task="report", label="report(C)", time=T0 + 2.3,
              reason="upstream task fit(A) failed"),
    ]
    if end:
        events.append(Event(RUN_END, time=T0 + 2.5, info={"wall": 2.5, "failed": 1}))
    return events


# -- colours and formatting ------------------------------------------------------------------


def test_task_color_is_stable_and_pinned():
    assert panels.task_color("fit") == panels.task_color("fit")
    # Pinned: a refactor must not recolour every user's dashboard.
    assert [panels.task_color(n) for n in ("fit", "load", "evaluate")] == [
        "#59a14f", "#f28e2b", "#9c755f"]
    for name in ("a", "load", "évaluer", ""):
        assert panels.task_color(name) in panels.PALETTE[: panels.HASHED_COLORS]


def test_task_names_of_one_run_get_distinct_colors():
    names = ["evaluate", "report"]  # both hash to the same colour
    assert panels.task_color("evaluate") == panels.task_color("report")
    colors = [t["color"] for t in panels.header([added(n, n) for n in names])["tasks"]]
    assert colors[0] == panels.task_color("evaluate") and colors[1] != colors[0]
    many = [f"task{i}" for i in range(len(panels.PALETTE))]
    colors = [t["color"] for t in panels.header([added(n, n) for n in many])["tasks"]]
    assert sorted(colors) == sorted(panels.PALETTE)


def test_task_color_is_the_same_in_another_process():
    code = "from nbindustria.panels import task_color; print(task_color('fit'), task_color('x'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == [panels.task_color("fit"), panels.task_color("x")]


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "—"), (0, "0 s"), (0.000042, "42 µs"), (0.0042, "4.2 ms"), (1.234, "1.23 s"), (12.34, "12.3 s"),
    (245, "4 min 05 s"), (7620, "2 h 07 min"),
])
def test_format_duration(seconds, text):
    assert panels.format_duration(seconds) == text


@pytest.mark.parametrize(("size", "text"), [
    (None, "—"), (512, "512 B"), (1536, "1.5 KiB"), (12.3 * 2**20, "12.3 MiB"),
    (2 * 2**30, "2 GiB"), (300 * 2**20, "300 MiB"),
])
def test_format_bytes(size, text):
    assert panels.format_bytes(size) == text


def test_short_label_drops_keyword_names():
    assert panels.short_label("fit(df=load(), alpha=0.1)") == "fit(load(), 0.1)"
    assert panels.short_args("fit(df=load(), alpha=0.1)") == "load(), 0.1"
    assert panels.short_args("fit") == ""
    assert panels.short_label('load(path="a=b")') == 'load("a=b")'
    assert panels.short_label("f(x==1)") == "f(x==1)"


# -- header ----------------------------------------------------------------------------------


def test_header_counts_and_progress():
    h = panels.header(small_run())
    assert h["pipeline"] == "demo" and h["run"] == 3 and h["n_engines"] == 2
    assert h["status"] == "failed"
    assert h["total"] == 4 and h["finished"] == 4 and h["progress"] == 1.0
    assert h["counts"] == {DONE: 1, CACHED: 1, FAILED: 1, SKIPPED: 1, RUNNING: 0, QUEUED: 0,
                           ADDED: 0}
    assert h["elapsed"] == 2.5  # the run's own wall time
    by_name = {t["name"]: t for t in h["tasks"]}
    assert [t["name"] for t in h["tasks"]] == ["load", "fit", "report"]  # first appearance
    assert by_name["fit"]["total"] == 2 and by_name["fit"]["counts"][FAILED] == 1
    assert [t["color"] for t in h["tasks"]] == [panels.task_color(n) for n in ("load", "fit")] + [
        h["tasks"][2]["color"]]
    json.dumps(h)


def test_header_while_running_and_before():
    assert panels.header([])["status"] == "waiting"
    events = small_run(end=False)[:8]  # L cached, A queued+running
    h = panels.header(events, now=T0 + 10)
    assert h["status"] == "running"
    assert h["busy"] == 1 and h["counts"][RUNNING] == 1 and h["counts"][ADDED] == 2
    assert h["elapsed"] == pytest.approx(10)
    assert h["progress"] == pytest.approx(0.25)
    # Engines started on demand are unknown at the start: the header counts those seen, and
    # busy counts engines, not tasks (an engine may hold several).
    on_demand = [Event(RUN_START, time=T0, info={"n_engines": 0}), added("a", "t"), added("b", "t"),
                 added("c", "t"),
                 Event(RUNNING, node="a", task="t", time=T0, engine="engine 0 (h:1)"),
                 Event(RUNNING, node="b", task="t", time=T0, engine="engine 0 (h:1)"),
                 Event(RUNNING, node="c", task="t", time=T0, engine="engine 1 (h:2)")]
    h = panels.header(on_demand)
    assert (h["n_engines"], h["busy"]) == (2, 2)
    assert panels.header(on_demand[:-1])["n_engines"] == 1
    end = Event(RUN_END, time=T0 + 3, info={"interrupted": True})
    assert panels.header([*events, end])["status"] == "interrupted"


def test_a_new_run_start_shows_only_the_last_run():
    second = [Event(RUN_START, time=T0 + 100, info={"pipeline": "demo", "run": 4}),
              added("L", "load"),
              Event(CACHED, node="L", task="load", time=T0 + 100.1, duration=4.5)]
    h = panels.header(small_run() + second)
    assert h["run"] == 4 and h["total"] == 1 and h["counts"][CACHED] == 1


def test_incremental_updates_give_the_same_panels():
    events = small_run()
    whole = panels.run_view(events)
    view = panels.RunView()
    changed = [view.update([e]) for e in events]
    assert all(changed)
    assert view.update([]) is False
    for fn in (panels.header, panels.graph, panels.details, panels.timeline, panels.memory,
               panels.cache_stats):
        assert fn(view) == fn(whole), fn.__name__


def _eventful_run() -> list[Event]:
    """Retries, a node that ran twice, a re-added node, a dependency named before it was
    added, nodes without ADDED events, several task names and engines."""
    events = [Event(RUN_START, time=T0, info={"pipeline": "demo", "n_engines": 2}),
              added("L", "load"), added("A", "fit", ("L", "Z")), added("B", "fit", ("L",)),
              added("Z", "prep")]
    events += ran("L", "load", 0.1, 0.3)
    # A starts on engine 0, its engine dies: queued again, runs on engine 1.
    events += [Event(QUEUED, node="A", task="fit", time=T0 + 0.3),
               Event(RUNNING, node="A", task="fit", time=T0 + 0.3, engine="engine 0 (h:1)"),
               Event(QUEUED, node="A", task="fit", time=T0 + 0.5, reason="retry 1"),
               *ran("A", "fit", 0.6, 0.9, engine="engine 1 (h:2)")]
    events += ran("Z", "prep", 0.3, 0.4, engine="engine 1 (h:2)")
    events += ran("B", "fit", 0.4, 0.7, kind=FAILED)
    events += [added("B", "fit", ("L",))]  # re-added: keeps its state
    events += ran("B", "fit", 0.9, 1.1)  # and runs again: two bars
    events += [Event(CACHED, node="M", task="more", time=T0 + 1.2, duration=2.0, key="k-M"),
               Event(SKIPPED, node="N", task="more", time=T0 + 1.3, reason="B failed"),
               Event(QUEUED, node="P", task="more", time=T0 + 1.3),
               Event(RUNNING, node="P", task="more", time=T0 + 1.4, engine="engine 0 (h:1)")]
    return events


def _folded_both_ways(events: list[Event], stream: list[Event],
                      size: int) -> tuple[panels.RunView, panels.RunView]:
    """``stream`` (the same events, maybe packed) folded ``size`` entries at a time, and
    ``events`` one by one; asserts that every panel agrees."""
    one_by_one = panels.RunView()
    for event in events:
        one_by_one.update([event])
    view = panels.RunView()
    for i in range(0, len(stream), size):
        view.update(stream[i : i + size])
    for fn in (panels.header, panels.graph, panels.details, panels.timeline, panels.memory,
               panels.cache_stats):
        assert fn(view) == fn(one_by_one), fn.__name__
    return view, one_by_one


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 1000])
def test_any_batching_gives_the_same_panels(size: int):
    """The bulk fold (a node visited once per batch) agrees with folding event by event."""
    events = _eventful_run()
    view, one_by_one = _folded_both_ways(events, events, size)
    h = panels.header(view)
    assert h["counts"] == {DONE: 4, CACHED: 1, FAILED: 0, SKIPPED: 1, RUNNING: 1, QUEUED: 0,
                           ADDED: 0}
    assert panels.timeline(view)["count"] == 5  # B's failed attempt and its second run
    assert view.attempts["A"] == 2 and view.attempts["B"] == 2
    # The nodes as records, made when read (the notebooks of tests/browser read them so).
    assert list(view.nodes) == list(one_by_one.nodes) and len(view.nodes) == 7
    assert view.nodes["B"] == one_by_one.nodes["B"] and "Q" not in view.nodes
    assert view.nodes["A"].engine == "engine 1 (h:2)" and view.nodes["A"].deps == ("L", "Z")
    assert view.nodes["M"].state == CACHED and view.nodes["M"].key == "k-M"
    assert [n.id for n in view.nodes.values() if n.state == RUNNING] == ["P"]
    assert panels.details(view, ["A"])["A"]["rows"][-1] == ["Attempts", "2"]
    assert panels.graph(view)["rows"] >= 1
    assert panels.positions([RUN_START, DONE, RUN_END, DONE, RUN_START], RUN_START) == [0, 4]
    assert {n["id"]: n["depth"] for n in panels.graph(view)["nodes"]}["A"] == 1


_COLUMNS = ("node", "task", "label", "key", "time", "deps", "engine", "started", "ended",
            "duration", "cpu", "peak_memory", "size", "reason", "error", "traceback", "info")


def packed(events: list[Event], size: int) -> list[Event]:
    """The same stream with each stretch of task events of one kind (at most ``size``) packed
    into one event, as the scheduler logs them (events.py), every field a column."""
    out: list[Event] = []
    for kind, stretch in itertools.groupby(events, key=lambda e: e.kind):
        stretch = list(stretch)
        if kind in (RUN_START, RUN_END):
            out += stretch
            continue
        for i in range(0, len(stretch), size):
            part = stretch[i : i + size]
            out.append(Event(kind, time=part[-1].time, group={
                name: [getattr(e, name) for e in part] for name in _COLUMNS}))
    return out


@pytest.mark.parametrize(("pack", "size"), [(1, 1), (2, 1), (3, 2), (1000, 3), (1000, 1000)])
def test_packed_events_give_the_same_panels(pack: int, size: int):
    """Packed events (a column per field) fold to the same panels as their members one by
    one, however they are packed and batched, and their members are the events themselves."""
    events = _eventful_run()
    stream = packed(events, pack)
    assert [e for p in stream for e in p.members()] == events
    view, one_by_one = _folded_both_ways(events, stream, size)
    assert dict(view.nodes) == dict(one_by_one.nodes)
    assert view.attempts == one_by_one.attempts and list(view.running) == ["P"]
    # Shared fields (not columns) hold for every member.
    done = Event(DONE, time=T0 + 2, engine="kernel", group={
        "node": ["A", "B"], "task": ["fit", "fit"], "started": [T0, T0 + 1],
        "ended": [T0 + 1, T0 + 2], "duration": [1.0, 1.0]})
    for v in (view, one_by_one):
        v.update(done.members() if v is one_by_one else [done])
    assert panels.timeline(view) == panels.timeline(one_by_one)
    assert view.engine("A") == "kernel" and view.nodes["B"] == one_by_one.nodes["B"]


@pytest.mark.parametrize("size", [1, 2, 3, 1000])
@pytest.mark.parametrize("known", [False, True])
def test_nodes_added_then_queued_at_once(size: int, known: bool):
    """A run's nodes, added and then queued (two packed events of the same nodes), start in
    the queued state when folded together: the same panels as their members one by one, also
    when one of them was known before (re-added: it keeps its state) or they come apart."""
    events = [Event(RUN_START, time=T0, info={"pipeline": "p"})]
    if known:
        events += [added("b", "t"), *ran("b", "t", 0.1, 0.2)]
    names = ["a", "b", "c", "d"]
    events += [added(n, "t" if n != "d" else "u", ("a",) if n == "c" else ()) for n in names]
    events += [Event(QUEUED, node=n, task="t" if n != "d" else "u", label=f"t({n})",
                     time=T0 + 1, reason="needed") for n in names]
    queued_only = packed(events, 1000)
    view, _ = _folded_both_ways(events, queued_only, size)
    counts = panels.header(view)["counts"]
    assert (counts[QUEUED], counts[ADDED], counts[DONE]) == (4, 0, 0)  # (b runs again)
    assert dict(view.nodes) == dict(panels.run_view(events).nodes)
    assert view.nodes["c"].state == QUEUED and view.depths()["c"] == 1
    events += ran("a", "t", 2.0, 2.5) + ran("c", "t", 2.5, 3.0)
    view, _ = _folded_both_ways(events, packed(events, 1000), size)
    assert panels.header(view)["counts"][DONE] == 2
    assert view.attempts["b"] == (1 if known else 0)


def test_packed_events_naming_a_node_twice():
    """A node placed twice in one packed event (taken back, placed again), two outcomes of
    one node in one, nodes without ADDED events: as their members one by one."""
    def group(kind: str, nodes: list[str], **columns: list[object]) -> Event:
        return Event(kind, time=T0 + len(columns), group={
            "node": nodes, "task": ["t"] * len(nodes), "label": [f"t({n})" for n in nodes],
            **columns})

    stream = [
        Event(RUN_START, time=T0, info={"pipeline": "p"}),
        group(ADDED, ["X", "Y", "X"], deps=[(), ("X",), ("Y",)]),
        group(QUEUED, ["X", "Y", "W"]),
        group(RUNNING, ["X", "Y", "X", "W"], engine=["e 0", "e 1", "e 2", "e 0"],
              started=[T0 + 1, T0 + 1, T0 + 2, None]),
        group(DONE, ["Y", "X", "Y"], started=[T0 + 1, T0 + 2, T0 + 3],
              ended=[T0 + 2, T0 + 3, T0 + 4], duration=[1.0, 1.0, None],
              engine=["e 1", "", "e 1"], peak_memory=[1, 2, None]),
        group(CACHED, ["Z"], duration=[3.0], engine=["e 9"]),
        # V and U start (neither was added); V ends within the same batch, U runs on
        group(RUNNING, ["V", "U"], engine=["e 3", "e 3"], started=[T0 + 5, T0 + 5]),
        group(DONE, ["V"], started=[T0 + 5], ended=[T0 + 6], duration=[1.0], engine=["e 3"]),
    ]
    members = [e for p in stream for e in p.members()]
    for size in (1, 2, 100):
        view, one_by_one = _folded_both_ways(members, stream, size)
        assert dict(view.nodes) == dict(one_by_one.nodes)
        assert view.attempts == {"X": 2, "Y": 1, "W": 1, "V": 1, "U": 1}
        assert list(view.running) == ["W", "U"] and view.state["V"] == DONE
        assert list(view.task_of)[-2:] == ["V", "U"]  # in the order they first appeared
        assert view.engine("X") == "e 2" and view.running_at("W") == stream[3].time


def test_a_re_added_node_keeps_its_state():
    events = [*small_run(end=False), added("B", "fit", ("L",))]
    assert panels.header(events)["counts"][DONE] == 1


# -- graph -----------------------------------------------------------------------------------


def test_graph_depth_layout_and_edges():
    g = panels.graph(small_run())
    nodes = {n["id"]: n for n in g["nodes"]}
    assert {k: v["depth"] for k, v in nodes.items()} == {"L": 0, "A": 1, "B": 1, "C": 2}
    assert [(nodes[k]["col"], nodes[k]["row"]) for k in "LABC"] == [(0, 0), (1, 0), (1, 1),
                                                                     (2, 0)]
    assert nodes["A"]["state"] == FAILED and nodes["C"]["state"] == SKIPPED
    assert sorted(map(tuple, g["edges"])) == [("A", "C"), ("B", "C"), ("L", "A"), ("L", "B")]
    assert g["columns"] == 3 and g["rows"] == 2 and g["grouped"] == []
    assert nodes["C"]["deps"] == ["A", "B"]
    json.dumps(g)


def test_depth_does_not_depend_on_event_order_and_survives_long_chains():
    # A dependent added before its dependency still gets the right depth.
    events = [added("B", "b", ("A",)), added("A", "a")]
    assert {n["id"]: n["depth"] for n in panels.graph(events)["nodes"]} == {"A": 0, "B": 1}
    chain = [added("n0", "step")] + [added(f"n{i}", "step", (f"n{i - 1}",))
                                     for i in range(1, 5000)]
    depths = panels.run_view(chain).depths()
    assert depths["n4999"] == 4999


def test_layout_wraps_a_wide_depth_into_sub_columns():
    items = [("root", 0, 0, 0)] + [(f"x{i}", 1, 1, i + 1) for i in range(30)] + [("end", 2, 2, 99)]
    pos = panels.layout_positions(items, max_rows=12)
    assert pos["root"] == (0, 0)
    assert pos["x0"] == (1, 0) and pos["x11"] == (1, 11) and pos["x12"] == (2, 0)
    assert pos["x29"] == (3, 5)
    assert pos["end"] == (4, 0)


def big_fanout(n: int) -> list[Event]:
    """load -> fit x n -> reduce, with a few fits done and one failed."""
    events = [Event(RUN_START, time=T0, info={"pipeline": "big"}), added("L", "load")]
    events += [added(f"f{i}", "fit", ("L",)) for i in range(n)]
    events.append(added("R", "reduce", tuple(f"f{i}" for i in range(n))))
    events += ran("f0", "fit", 0, 1) + ran("f1", "fit", 0, 1, kind=FAILED)
    return events


def test_many_nodes_of_one_name_collapse_into_a_group():
    g = panels.graph(big_fanout(50))
    ids = [n["id"] for n in g["nodes"]]
    assert ids == ["L", "R", "group:fit"]
    group = g["nodes"][2]
    assert group["group"] and group["count"] == 50 and group["task"] == "fit"
    assert group["counts"][DONE] == 1 and group["counts"][FAILED] == 1
    assert group["counts"][ADDED] == 48
    assert group["state"] == FAILED  # alarm first
    assert sorted(map(tuple, g["edges"])) == [("L", "group:fit"), ("group:fit", "R")]
    assert g["grouped"] == ["fit"]
    # Members travel with the group so the front end can expand it without the kernel.
    assert len(group["members"]) == 50 and group["members"][0]["deps"] == ["L"]
    reduce = next(n for n in g["nodes"] if n["id"] == "R")
    assert reduce["deps"] == [f"f{i}" for i in range(50)]
    assert set(panels.graph_node_ids(g)) == {"L", "R", "group:fit"} | {f"f{i}" for i in range(50)}


def test_an_expanded_group_shows_its_nodes():
    g = panels.graph(big_fanout(50), expanded=["fit"])
    assert len(g["nodes"]) == 52 and g["grouped"] == []
    assert len(g["edges"]) == 100
    assert max(n["row"] for n in g["nodes"]) == panels.MAX_ROWS - 1


def test_threshold_and_budgets():
    assert len(panels.graph(big_fanout(30))["nodes"]) == 32  # under the threshold
    assert len(panels.graph(big_fanout(30), threshold=10)["nodes"]) == 3
    # Too many visible nodes overall: the largest names collapse even under the threshold.
    events = [added(f"{name}{i}", name) for name in ("a", "b", "c") for i in range(30)]
    g = panels.graph(events, max_nodes=40)
    assert sum(1 for n in g["nodes"] if n["group"]) == 2 and len(g["nodes"]) == 32
    # A group too large for the member budget is sent without members (not expandable here),
    # and what depends on its members points at the group.
    g = panels.graph(big_fanout(50), max_members=10)
    group = next(n for n in g["nodes"] if n["group"])
    assert group["members"] is None
    assert next(n for n in g["nodes"] if n["id"] == "R")["deps"] == ["group:fit"]


# -- details ---------------------------------------------------------------------------------


def test_details_say_why_and_show_the_traceback():
    d = panels.details(small_run())
    failed = d["A"]
    assert failed["state"] == FAILED and "ValueError: bad" in failed["traceback"]
    assert failed["why"].startswith("Failed: ValueError: bad")
    rows = dict(failed["rows"])
    assert rows["Engine"] == "engine 0" and rows["Host"] == "h:1" and rows["Key"] == "key-A"
    assert rows["Wall time"] == "1.00 s" and rows["CPU time"] == "0.50 s"
    assert rows["Peak memory"] == "1 MiB"
    assert d["B"]["why"] == "Ran: never run."
    assert d["L"]["why"].startswith("Cache hit") and "4.50 s" in d["L"]["why"]
    assert dict(d["L"]["rows"])["Made on"] == "engine 1"
    assert d["C"]["why"] == "Skipped: upstream task fit(A) failed."
    assert d["group:fit"]["group"] and dict(d["group:fit"]["rows"])["Nodes"] == "2"
    assert set(panels.details(small_run(), ["A", "nope"])) == {"A"}
    json.dumps(d)


def test_details_arguments_come_from_the_label():
    events = [added("x", "fit", label="fit(df=load(), alpha=0.1)")]
    assert dict(panels.details(events)["x"]["rows"])["Arguments"] == "df=load(), alpha=0.1"


# -- charts ----------------------------------------------------------------------------------


def test_timeline_one_bar_per_executed_task():
    t = panels.timeline(small_run())
    assert len(t["bars"]) == 2 and t["running"] == []
    a = next(b for b in t["bars"] if b["node"] == "A")
    assert (a["engine"], a["state"]) == ("engine 0", FAILED)
    assert (a["start"], a["end"]) == (pytest.approx(0.2), pytest.approx(1.2))
    assert a["host"] == "engine 0 (h:1)" and a["color"] == panels.task_color("fit")
    assert t["engines"] == ["engine 0", "engine 1"]


def test_timeline_rows_sort_naturally_and_running_bars_grow():
    events = [Event(RUN_START, time=T0)]
    for i in (10, 2, 1):
        events += [added(f"n{i}", "t"), *ran(f"n{i}", "t", 0, 1, engine=f"engine {i} (h:{i})")]
    events += [added("r", "t"), Event(RUNNING, node="r", task="t", time=T0 + 2,
                                      engine="engine 3 (h:3)"),
               added("q", "t"), Event(RUNNING, node="q", task="t", time=T0 + 2)]  # no engine yet
    t = panels.timeline(events, now=T0 + 5)
    assert t["engines"] == ["engine 1", "engine 2", "engine 3", "engine 10"]
    assert [(b["node"], b["start"], b["end"]) for b in t["running"]] == [
        ("r", pytest.approx(2), pytest.approx(5))]


def test_depths_of_a_graph_without_dependencies_and_after_one_arrives():
    """Nodes without dependencies are at depth 0 (a flat graph keeps no depth per node); a
    node that depends on them, added later, is one deeper."""
    view = panels.RunView()
    view.update([Event(RUN_START, time=T0, info={"pipeline": "p"}),
                 added("a", "t"), added("b", "t"), added("c", "u")])
    flat = panels.graph(view)
    assert {n["id"]: (n["depth"], n["col"]) for n in flat["nodes"]} == {
        "a": (0, 0), "b": (0, 0), "c": (0, 0)}
    view.update([added("d", "u", ("a", "c")), added("e", "u", ("d",))])
    deep = {n["id"]: (n["depth"], n["col"]) for n in panels.graph(view)["nodes"]}
    assert deep == {"a": (0, 0), "b": (0, 0), "c": (0, 0), "d": (1, 1), "e": (2, 2)}
    assert view.depths() == {"a": 0, "b": 0, "c": 0, "d": 1, "e": 2}


def test_bars_reach_the_charts_alike_at_once_or_one_at_a_time():
    """The charts' structures (timeline segments, memory samples per task name and per
    engine) take the executed attempts grouped by engine and task name: the same as one at a
    time, with several of each, interleaved, and attempts without a memory measure."""
    engines = ["engine 0 (h:1)", "engine 1 (h:2)", "engine 2 (h:3)"]
    events = [Event(RUN_START, time=T0, info={"pipeline": "p"})]
    events += [added(f"n{i}", "fit" if i % 3 else "load") for i in range(90)]
    for i in range(90):
        events += ran(f"n{i}", "fit" if i % 3 else "load", 2.0 * i, 2.0 * i + 1,
                      engine=engines[(i * 7 // 5) % 3],
                      memory=None if i % 4 == 1 else 2**20 + (i * 37 % 101) * 2**14)  # type: ignore[arg-type]
    at_once = panels.RunView()
    at_once.update(events)
    at_once.fold_bars()
    one_by_one = panels.RunView()
    for event in events:
        one_by_one.update([event])
        one_by_one.fold_bars()
    assert len(at_once.bars) == 90 and len(at_once.engine_memory) == 3
    assert at_once.segments.rows == one_by_one.segments.rows
    assert len(at_once.segments.rows) == 6  # engine x task name
    for name in ("fit", "load"):
        assert at_once.task_points[name].sample() == one_by_one.task_points[name].sample()
        assert None not in [at_once.bars.peak[i] for i in at_once.task_points[name].sample()]
    for row, envelope in at_once.engine_memory.items():
        # An engine's memory line runs forward in time, whichever task names it ran.
        assert envelope.series() == one_by_one.engine_memory[row].series()
        assert [t for t, _ in envelope.series()] == sorted(t for t, _ in envelope.series())
    assert panels.memory(at_once) == panels.memory(one_by_one)
    assert panels.timeline(at_once) == panels.timeline(one_by_one)


def test_memory_points_and_limit():
    m = panels.memory(small_run())
    assert sorted(p["peak_memory"] for p in m["points"]) == [2**20, 3 * 2**20]
    assert m["limit"] == 2**30
    assert panels.memory([])["limit"] is None


def test_memory_per_engine_over_time():
    events = [Event(RUN_START, time=T0, info={"memory_limit": 8 * 2**30})]
    for i, (engine, end, rss) in enumerate([("engine 1 (h:2)", 1.0, 300), ("engine 0 (h:1)", 2.0, 100),
                                            ("engine 1 (h:2)", 3.0, 500), ("engine 0 (h:1)", 4.0, 200),
                                            ("engine 10 (h:3)", 4.5, 50)]):
        events += [added(f"n{i}", "fit"), *ran(f"n{i}", "fit", end - 0.5, end, engine=engine,
                                                memory=rss * 2**20)]
    m = panels.memory(events)
    assert [e["engine"] for e in m["engines"]] == ["engine 0", "engine 1", "engine 10"]
    by_engine = {e["engine"]: e for e in m["engines"]}
    assert by_engine["engine 1"]["t"] == [pytest.approx(1.0), pytest.approx(3.0)]
    assert by_engine["engine 1"]["memory"] == [300 * 2**20, 500 * 2**20]
    assert by_engine["engine 0"]["memory"] == [100 * 2**20, 200 * 2**20]
    assert m["limit"] == 8 * 2**30 and m["count"] == 5
    json.dumps(m)
    # A failed task has no peak (it did not finish): no point, no engine sample.
    assert panels.memory(small_run())["count"] == 2


def test_chart_data_stays_bounded_and_keeps_the_peaks():
    envelope = panels.Envelope(limit=10)
    for i in range(1000):
        envelope.add(float(i), 5000.0 if i == 777 else float(i % 7))
    series = envelope.series()
    assert len(series) <= 11 and (777.0, 5000.0) in series
    assert [t for t, _ in series] == sorted(t for t, _ in series)
    sample = panels.EvenSample(limit=10)
    for i in range(1000):
        sample.add(i, -abs(i - 333))
    kept = sample.sample()
    assert len(kept) <= 11 and 333 in kept and kept[0] == 0
    segments = panels.Segments(limit=50)
    for i in range(10_000):  # two task names taking turns on four engines
        segments.add(f"engine {i % 4}", ("a", "b")[i // 4 % 2], i * 0.01, i * 0.01 + 0.008)
    assert segments.count <= 50
    assert sum(len(r) for r in segments.rows.values()) == segments.count
    starts = [r[0][0] for r in segments.rows.values()]
    ends = [r[-1][1] for r in segments.rows.values()]
    assert min(starts) == 0 and max(ends) == pytest.approx(99.998)


@pytest.mark.parametrize("seed", range(8))
def test_bulk_chart_structures_agree_with_one_at_a_time(seed: int):
    """add_many of the charts' bounded structures, as the fold of a batch of bars uses them:
    the same sample and envelope as adding one by one; segments that cover every bar. (Seeds
    6 and 7: limits as large as the charts' own, where whole stretches go through numpy.)"""
    rng = random.Random(seed)
    n, limit = rng.randint(200, 3000), rng.randint(3, 40)
    if seed >= 6:
        n, limit = rng.randint(5000, 20000), panels.ENGINE_POINTS
    values = [rng.choice([rng.random(), 0.5]) for _ in range(n)]
    items = [(i,) for i in range(n)]
    cuts = [0, *sorted(rng.sample(range(1, n), 3)), n]
    one, many = panels.EvenSample(limit), panels.EvenSample(limit)
    line, lines = panels.Envelope(limit), panels.Envelope(limit)
    for item, value in zip(items, values, strict=True):
        one.add(item, value)
        line.add(float(item[0]), value)
    for a, b in itertools.pairwise(cuts):
        many.add_many(items[a:b], values[a:b])
        lines.add_many([float(i) for i in range(a, b)], values[a:b])
    assert (many.items, many.stride, many.count, many.top) == (one.items, one.stride,
                                                               one.count, one.top)
    assert many.sample() == one.sample() and len(many.sample()) <= limit + 1
    assert (lines.points, lines.width, lines.pending) == (line.points, line.width, line.pending)
    segments = panels.Segments(limit=limit)
    spans = [(i * 0.01 + rng.random() * 0.005, i * 0.01 + 0.008) for i in range(n)]
    for a, b in itertools.pairwise(cuts):
        segments.add_many("kernel", "t", [s for s, _ in spans[a:b]],
                          [e for _, e in spans[a:b]])
    row = segments.rows["kernel", "t"]
    assert segments.count == len(row) <= limit
    assert all(any(s >= lo and e <= hi for lo, hi in row) for s, e in spans)


def test_cache_stats_hits_runs_and_time_saved():
    c = panels.cache_stats(small_run())
    by_name = {t["name"]: t for t in c["tasks"]}
    assert by_name["load"] == {"name": "load", "color": panels.task_color("load"), "hits": 1,
                               "runs": 0, "failed": 0, "saved": 4.5}
    assert by_name["fit"]["runs"] == 1 and by_name["fit"]["failed"] == 1
    assert c["total"] == {"hits": 1, "runs": 1, "failed": 1, "saved": 4.5}


def test_ten_thousand_tasks_stay_cheap():
    events = [Event(RUN_START, time=T0, info={"pipeline": "big"}), added("L", "load")]
    for i in range(10_000):
        events.append(added(f"f{i}", ("fit", "score")[i % 2], ("L",)))
    for i in range(10_000):
        events += ran(f"f{i}", ("fit", "score")[i % 2], i * 0.01, i * 0.01 + 0.5,
                      engine=f"engine {i % 16} (h:{i % 16})")
    began = time.perf_counter()
    view = panels.run_view(events)
    for fn in (panels.header, panels.graph, panels.timeline, panels.memory, panels.cache_stats):
        fn(view)
    elapsed = time.perf_counter() - began
    g = panels.graph(view)
    assert len(g["nodes"]) == 3  # load and two groups
    assert all(n["members"] is None for n in g["nodes"] if n["group"])  # 5,000 each: too many
    assert elapsed < 3.0, elapsed
    # What the charts carry is bounded, whatever the size of the run.
    t, m = panels.timeline(view), panels.memory(view)
    assert t["count"] == 10_000 and t["bars"] == [] and len(t["segments"]) <= panels.MAX_SEGMENTS
    assert len(m["points"]) <= 2 * (panels.TASK_POINTS + 1) and m["count"] == 10_000
    assert all(len(e["t"]) <= panels.ENGINE_POINTS + 1 for e in m["engines"])
    assert len(m["engines"]) == 16
    # A refresh after the run has been read is cheaper still: the layout is cached.
    began = time.perf_counter()
    panels.graph(view)
    panels.header(view)
    assert time.perf_counter() - began < 0.2
