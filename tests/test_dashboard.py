"""The dashboard widget and the standalone report, built from a synthetic run (no kernel)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")
pytest.importorskip("plotly")

from browser.synthetic import ERROR, FAILING, replay_in_thread, synthetic_events, synthetic_log

from nbindustria import dashboard as dashboard_module
from nbindustria import panels
from nbindustria.dashboard import Dashboard, write_report
from nbindustria.events import RUN_START, Event, EventLog

ROOT = Path(__file__).resolve().parents[1]
N_TASKS = 60
EXPECTED = {"done": 49, "cached": 7, "failed": 1, "skipped": 3}


def executed_bars(fig) -> int:
    return sum(len(t.x) for t in fig.data
               if t.type == "bar" and t.xaxis == "x" and t.name != "running")


@pytest.fixture
def finished():
    dash = Dashboard(synthetic_log(), live=False)
    yield dash
    dash.close()


def test_widget_state_holds_the_run(finished):
    state = finished.graph_widget.state
    header, graph = state["header"], state["graph"]
    assert header["pipeline"] == "sales-forecast" and header["status"] == "failed"
    assert header["total"] == N_TASKS and header["finished"] == N_TASKS
    assert {k: v for k, v in header["counts"].items() if v} == EXPECTED
    assert [t["name"] for t in header["tasks"]] == ["load", "clean", "features", "fit",
                                                    "evaluate", "summary", "report"]
    assert len(graph["nodes"]) == N_TASKS and not graph["grouped"]
    states = [n["state"] for n in graph["nodes"]]
    assert {s: states.count(s) for s in set(states)} == EXPECTED
    failed = next(n for n in graph["nodes"] if n["state"] == "failed")
    assert failed["label"] == FAILING
    details = finished.graph_widget.details[failed["id"]]
    assert details["error"] == ERROR and "Traceback (most recent call last)" in details["traceback"]
    assert len(finished.graph_widget.details) == N_TASKS + 0  # no groups at this size


def test_charts_hold_one_bar_per_executed_task(finished):
    charts = finished.charts
    assert executed_bars(charts) == EXPECTED["done"] + EXPECTED["failed"]
    timeline = [t for t in charts.data if t.xaxis == "x"]
    assert [t.name for t in timeline] == ["features", "fit", "evaluate", "summary", "running"]
    assert {y for t in timeline for y in t.y} == {0, 1}  # engine rows
    assert list(charts.layout.yaxis.ticktext) == ["engine 0", "engine 1"]
    memory = [t for t in charts.data if t.xaxis == "x2"]
    assert sum(len(t.x) for t in memory if t.mode == "markers") == 50  # a peak per task
    lines = [t for t in memory if t.mode == "lines"]  # a line per engine, through its peaks
    assert [t.name for t in lines] == ["engine 0", "engine 1"]
    assert sum(len(t.x) for t in lines) == 50
    assert all(list(t.x) == sorted(t.x) for t in lines)
    cache = {t.name: t for t in charts.data if t.xaxis == "x3"}
    assert sum(cache["cache hits"].y) == 7 and sum(cache["ran"].y) == 49
    assert sum(cache["failed"].y) == 1
    titles = {a.name: a.text for a in charts.layout.annotations}
    assert titles["timeline"].startswith("<b>Timeline</b> · 50 tasks ran on 2 engines")
    assert "saved" in titles["cache"]
    assert charts.layout.shapes[0].y0 == pytest.approx(4.0)  # the 4 GiB engine limit


def test_charts_crop_a_late_start_and_say_why_they_are_empty():
    from nbindustria.dashboard import charts_figure

    def bar(start, end):
        return {"node": "n", "task": "t", "label": "t()", "engine": "engine 0", "host": "",
                "start": start, "end": end, "duration": end - start, "state": "done",
                "color": "#4e79a7"}

    memory = {"points": [], "engines": [], "limit": None, "count": 0}
    cache = {"tasks": [], "total": {"hits": 0, "runs": 0, "failed": 0, "saved": 0.0}}
    late = {"engines": ["engine 0"], "count": 2, "bars": [bar(9.0, 9.5), bar(9.5, 10.0)],
            "segments": [], "running": []}
    _, layout = charts_figure(late, memory, cache)
    assert layout["xaxis"]["range"][0] == pytest.approx(8.97) and not layout["xaxis"]["autorange"]
    assert layout["xaxis2"]["range"] == layout["xaxis"]["range"]  # memory shares the window
    titles = {a["name"]: a["text"] for a in layout["annotations"]}
    assert "the first began at +9.0 s" in titles["timeline"]
    assert titles["memory-empty"] == "No memory samples."
    early = dict(late, bars=[bar(0.5, 9.5)])
    assert charts_figure(early, memory, cache)[1]["xaxis"]["range"] is None
    none = dict(late, count=0, bars=[])
    hits = {"tasks": [], "total": {"hits": 3, "runs": 0, "failed": 0, "saved": 1.0}}
    titles = {a["name"]: a["text"] for a in charts_figure(none, memory, hits)[1]["annotations"]}
    assert titles["empty"] == "No task ran: every result came from the cache."
    assert titles["memory-empty"] == "No memory samples: no task ran."


def test_a_large_run_draws_bounded_segments():
    from nbindustria.dashboard import charts_figure

    events = [Event(RUN_START, time=1000.0, info={"pipeline": "big"})]
    for i in range(3000):
        node, engine = f"n{i}", f"engine {i % 2} (h:{i % 2})"
        start = 1000.0 + i // 2 * 0.01
        events += [Event("added", node=node, task=("fit", "score")[i // 7 % 2], time=1000.0),
                   Event("done", node=node, task=("fit", "score")[i // 7 % 2], time=start + 0.01,
                         engine=engine, started=start, ended=start + 0.008, duration=0.008,
                         peak_memory=2**20 * (100 + i % 50))]
    view = panels.run_view(events)
    traces, layout = charts_figure(panels.timeline(view), panels.memory(view),
                                   panels.cache_stats(view))
    timeline = [t for t in traces if t["xaxis"] == "x" and t["name"] != "running"]
    assert {t["type"] for t in timeline} == {"scatter"}  # merged segments, one path per name
    points = sum(len(t["x"]) for t in timeline)
    assert 0 < points <= 3 * panels.MAX_SEGMENTS
    assert layout["annotations"][0]["text"].startswith("<b>Timeline</b> · 3000 tasks ran on 2")
    markers = [t for t in traces if t["xaxis"] == "x2" and t["mode"] == "markers"]
    assert sum(len(t["x"]) for t in markers) <= 2 * (panels.TASK_POINTS + 1)
    # What the live widget is given is valid for plotly, packed arrays included.
    import plotly.graph_objects as go

    from nbindustria.dashboard import _packed

    packed = [_packed(t) for t in traces]
    assert any(not isinstance(t["x"], list) for t in packed)  # long numbers go as arrays
    go.Figure(data=packed, layout=layout)  # raises on a property plotly does not know


def _plain(value):
    """A widget's data or layout as plain lists and dicts (arrays as lists, NaN as None),
    without plotly's random trace ids."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "uid"}
    if isinstance(value, np.ndarray):
        return [None if v != v else v for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def test_charts_made_without_validation_hold_what_validation_gives():
    """The charts' widget is made without plotly validating each property (half its cost):
    its state, made and after updates, is what the validated widget holds, for the chart data
    of an empty run, a run under way and over, and a large run with a memory limit drawn."""
    import plotly.graph_objects as go

    from nbindustria.dashboard import _figure_widget, _FigureSync, _packed, charts_figure

    def chart_data(events):
        view = panels.run_view(events)
        return charts_figure(panels.timeline(view, now=events[-1].time if events else None),
                             panels.memory(view), panels.cache_stats(view))

    run = synthetic_events()
    large = [Event(RUN_START, time=1000.0, info={"pipeline": "big", "memory_limit": 2**30})]
    for i in range(2000):
        large += [Event("added", node=f"n{i}", task="fit", time=1000.0),
                  Event("done", node=f"n{i}", task="fit", time=1000.01 + i * 0.01,
                        engine=f"engine {i % 2} (h:{i % 2})", started=1000.0 + i * 0.01,
                        ended=1000.008 + i * 0.01, duration=0.008,
                        peak_memory=2**20 * (500 + i % 300))]
    states = [chart_data(e) for e in ([], run[: len(run) // 2], run, large)]
    assert chart_data(large)[1]["shapes"] and not states[0][1]["shapes"]
    for (traces, layout), (after, after_layout) in zip(states, states[1:] + states[:1],
                                                       strict=True):
        checked = go.FigureWidget(data=[_packed(t) for t in traces], layout=layout)
        fast = _figure_widget(go, traces, layout)
        assert _plain(fast._widget_data) == _plain(checked._widget_data)
        assert _plain(fast._widget_layout) == _plain(checked._widget_layout)
        for fig in (checked, fast):
            sync = _FigureSync(fig)
            sync.traces, sync.layout = traces, layout
            sync(after, after_layout)
        assert _plain(fast._data) == _plain(checked._data)
        assert _plain(fast._layout) == _plain(checked._layout)
        for part in (fast.layout, fast.data[0]):  # and what is set later is validated
            with pytest.raises(ValueError):
                part["hoverlabel"] = {"nonsense": 1}


def test_only_changed_traces_are_sent(finished):
    sync = finished._sync_charts
    sent = []
    original = finished.charts.data[0].update
    finished.charts.data[0].update = lambda *a, **k: sent.append(a) or original(*a, **k)
    sync(list(sync.traces), dict(sync.layout))  # the same again: nothing to send
    assert sent == []


def test_widget_tree_and_module():
    dash = Dashboard(EventLog(), live=False)
    assert dash.widget.children[0] is dash.graph_widget
    assert "nbi-dashboard" in dash.widget._dom_classes
    assert dash.graph_widget.state["header"]["status"] == "waiting"
    esm = dash.graph_widget._esm
    assert "export default" in esm and "render(" in esm
    bundle = dash._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data


def test_static_copy_is_the_source_and_geometry_matches():
    source = (ROOT / "js" / "dashboard.js").read_text()
    assert (ROOT / "nbindustria" / "static" / "dashboard.js").read_text() == source
    for name in ("NODE_W", "NODE_H", "PITCH_X", "PITCH_Y", "PAD"):
        js_value = int(re.search(rf"const {name} = (\d+);", source).group(1))
        assert js_value == getattr(dashboard_module, name), name


def test_charts_are_made_during_a_run_once_their_first_update_is_due(monkeypatch):
    monkeypatch.setattr(dashboard_module, "CHART_INTERVAL", 0.3)
    log = EventLog()
    dash = Dashboard(log, interval=0.05)
    try:
        replay_in_thread(log, synthetic_events(), seconds=3.0)
        deadline = time.monotonic() + 20
        while dash.charts is None and time.monotonic() < deadline:
            time.sleep(0.02)
        made_while_running = not dash.finished
        assert dash.charts is not None and made_while_running
        while not dash.finished and time.monotonic() < deadline:
            time.sleep(0.02)
        dash._thread.join(30)
        assert executed_bars(dash.charts) == 50  # and updated to the end of the run
        # The synced (saved) state was made with the figure, then updated live: the last
        # refresh put the final charts there too.
        assert sum(len(t["x"]) for t in dash.charts._widget_data
                   if t["type"] == "bar" and t["xaxis"] == "x") == 50
    finally:
        dash.close()


def test_follows_a_live_run_and_stops_at_its_end():
    log = EventLog()
    dash = Dashboard(log, interval=0.05)
    try:
        assert dash._thread is not None and dash._thread.is_alive()
        assert not log._subscribers  # nothing runs in the emitting thread but the append
        # The run starts while plotly's widget is still being imported (in its own thread):
        # the header and graph follow it meanwhile; the charts are made when their first
        # update is due (here: at the end of this short run, with its final data).
        replay_in_thread(log, synthetic_events(), seconds=1.0)
        seen_running = False
        deadline = time.monotonic() + 10
        while not dash.finished and time.monotonic() < deadline:
            seen_running |= dash.graph_widget.state["header"]["status"] == "running"
            time.sleep(0.02)
        assert dash.finished and seen_running
        dash._charts_thread.join(30)
        dash._thread.join(30)
        assert not dash._thread.is_alive()
        assert dash.charts is not None and len(dash.widget.children) == 2
        # The thread's last refresh put the final charts into the synced (saved) state too.
        assert executed_bars(dash.charts) == 50
        assert sum(len(t["x"]) for t in dash.charts._widget_data
                   if t["type"] == "bar" and t["xaxis"] == "x") == 50
        header = dash.graph_widget.state["header"]
        assert {k: v for k, v in header["counts"].items() if v} == EXPECTED
        # A later run in the same log does not change this dashboard: it is its run's record.
        log.extend(synthetic_events(all_cached=True))
        dash.refresh()
        assert dash.graph_widget.state["header"]["run"] == 1
    finally:
        dash.close()


def test_default_is_the_last_run_and_start_pins_one():
    log = synthetic_log()
    second_start = log.next_index
    log.extend(synthetic_events(all_cached=True))
    last = Dashboard(log, live=False)
    assert last.graph_widget.state["header"]["run"] == 2
    assert last.graph_widget.state["header"]["counts"]["cached"] == 56
    assert last.finished
    first = Dashboard(log, start=0, live=False)
    assert first.graph_widget.state["header"]["run"] == 1
    assert first.finished
    assert Dashboard(log, start=second_start, live=False).graph_widget.state["header"]["run"] == 2
    upcoming = Dashboard(log, start="next", live=False)
    assert upcoming.graph_widget.state["header"]["status"] == "waiting" and not upcoming.finished
    log.extend(synthetic_events(all_cached=True))
    upcoming.refresh()
    assert upcoming.graph_widget.state["header"]["run"] == 2 and upcoming.finished
    with pytest.raises(ValueError, match="'start' must be"):
        Dashboard(log, start="first", live=False)  # type: ignore[arg-type]


def test_refresh_pushes_new_events_and_close_stops():
    log = EventLog()
    dash = Dashboard(log, interval=30)  # the thread would wait 30 s: refresh() does the work
    log.append(Event(RUN_START, info={"pipeline": "p"}))
    log.append(Event("added", node="a", task="t", label="t()"))
    dash.refresh()
    assert dash.graph_widget.state["header"]["total"] == 1
    began = time.monotonic()
    dash.close()
    assert time.monotonic() - began < 2 and dash._thread is None


def test_report_is_standalone(tmp_path):
    path = write_report(synthetic_log(), tmp_path / "run.html")
    text = path.read_text(encoding="utf-8")
    assert path.stat().st_size > 1_000_000  # plotly.js is inside
    assert "plotly.js v" in text or "Plotly" in text
    assert not re.search(r"<script[^>]+src=[\"']?https?:", text)
    assert not re.search(r"<link[^>]+href=[\"']?https?:", text)
    assert len(re.findall(r'<g class="nbi-node[ "]', text)) == N_TASKS
    states = re.findall(r'<g class="nbi-node" data-id="\w+" data-state="(\w+)"', text)
    assert {s: states.count(s) for s in set(states)} == EXPECTED
    assert 'id="nbi-charts"' in text
    # Memory per engine over time: a line per engine in the memory chart.
    assert re.findall(r'"mode":"lines","name":"(engine \d+)"', text) == ["engine 0", "engine 1"]
    assert "Traceback (most recent call last)" in text  # in the node details
    assert "sales-forecast" in text


def test_report_of_an_empty_log(tmp_path):
    text = write_report([], tmp_path / "empty.html").read_text()
    assert "No tasks." in text


def test_report_groups_large_task_names(tmp_path):
    events = [Event(RUN_START, info={"pipeline": "big"}), Event("added", node="L", task="load")]
    events += [Event("added", node=f"f{i}", task="fit", deps=("L",)) for i in range(100)]
    text = write_report(events, tmp_path / "big.html").read_text()
    assert len(re.findall(r'<g class="nbi-node group"', text)) == 1
    assert 'data-count="100"' in text


def test_missing_dependency_names_the_extra(monkeypatch, tmp_path):
    for name in ("ipywidgets", "anywidget", "plotly"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, name, None)  # makes ``import name`` fail
            with pytest.raises(ImportError, match=r"needs .* pip install 'nbindustria\[dashboard\]'"):
                Dashboard(EventLog())
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "plotly.graph_objects", None)
        with pytest.raises(ImportError, match=r"nbindustria\[dashboard\]"):
            write_report([], tmp_path / "unused.html")  # the report needs plotly, not the widgets
        # A live dashboard makes its charts in the background; refresh() says what failed.
        dash = Dashboard(EventLog())
        try:
            with pytest.raises(ImportError, match=r"nbindustria\[dashboard\]"):
                dash.refresh()
        finally:
            dash.close()


def test_importing_the_dashboard_module_imports_no_widget_library():
    code = ("import sys, nbindustria.dashboard, nbindustria.panels; "
            "print(sorted(m for m in ('ipywidgets', 'anywidget', 'plotly', 'traitlets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_panels_module_imports_no_widget_library():
    source = (ROOT / "nbindustria" / "panels.py").read_text()
    imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, re.M)
    assert not {i.split(".")[0] for i in imports} & {"ipywidgets", "anywidget", "plotly"}
    assert panels.RunView  # used


def test_refreshes_are_spaced_by_their_cost_and_by_the_size_of_the_graph() -> None:
    wait = dashboard_module.refresh_wait
    assert wait(0.33, 0.0, 100) == 0.33  # a small run: ~3 a second
    assert wait(0.33, 0.0, 3000) == 0.33
    assert wait(0.33, 0.0, 10_000) == pytest.approx(1.1)  # 10,000 nodes: ~1 a second
    assert wait(0.33, 0.02, 100) == pytest.approx(1.0)  # a dear refresh: 50x its cost
    assert wait(0.33, 1.0, 100) == dashboard_module.MAX_WAIT  # never longer than 2 s
    assert wait(0.33, 0.0, 10**6) == dashboard_module.MAX_WAIT
