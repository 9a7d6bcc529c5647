"""The live dashboard of a run: an anywidget (header and task graph) and plotly charts.

``Dashboard(log).widget`` is an ipywidgets ``VBox`` that follows one run recorded in an
:class:`~nbindustria.events.EventLog`:

- the header and the task graph: our own front end, ``js/dashboard.js`` (shipped as
  ``static/dashboard.js``), fed with two synced traits, ``state`` and ``details``;
- a timeline (one row per engine, one bar per executed task), peak memory per task and cache hits
  vs runs: three charts in one plotly ``FigureWidget`` (each FigureWidget carries plotly.js).

The emitting thread (the scheduler) only appends to the log. A background thread pulls
``log.since_packed(index)`` a few times a second, folds the new entries (packed events from
their columns: see events.py) into a :class:`panels.RunView` and pushes what changed in one
batch; when a refresh gets expensive (a very large run) it waits longer, so that the
dashboard's share of the kernel's time stays small.

:func:`write_report` writes the same views as one standalone HTML file (plotly.js inlined, the graph
as inline SVG), which opens without a kernel and without internet.

ipywidgets, anywidget and plotly are imported only here, when a dashboard is made, so that
``import nbindustria`` stays fast; without them the error says what to install.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import html
import importlib
import json
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from . import panels
from .events import ADDED, CACHED, DONE, FAILED, RUN_END, RUN_START, RUNNING, Event, EventLog

__all__ = ["Dashboard", "write_report"]

STATIC = Path(__file__).parent / "static"
ESM_PATH = STATIC / "dashboard.js"
INSTALL_HINT = "pip install 'nbindustria[dashboard]'"

# Node geometry of the graph, as in js/dashboard.js (a test keeps the two in step).
NODE_W, NODE_H, PITCH_X, PITCH_Y, PAD = 144, 24, 176, 30, 14

INTERVAL = 0.33  # seconds between refreshes: at most ~3 a second
# The charts at most every two seconds: an update (plotly validates what it is given) costs
# more than everything else a refresh does; the header and graph still follow ~3 times a second.
CHART_INTERVAL = 2.0
COST_FACTOR = 50  # wait at least 50x the CPU time the last refresh took: about 2% of the GIL,
#                  which the run shares with this thread
CHART_COST_FACTOR = 100  # the charts' own share: about 1% (~20 ms an update for a large run)
CHART_MAX_WAIT = 5.0
MAX_WAIT = 2.0  # however dear a refresh, the dashboard still moves every two seconds
# A refresh's cost grows with the graph (its layout and counts are made again for each push):
# a run of more nodes than this refreshes proportionally less often (10,000 nodes: ~1 a second,
# ~5% of a 10,000-task run's CPU on two engines at ~3 a second, ~3.5% at one).
NODES_PER_INTERVAL = 3000
MEMORY_POINTS = 2000  # at most about this many memory points are drawn (an even sample)
# Engine memory lines: greys and slates that stay behind the task colours, in light and dark.
ENGINE_LINES = ("#8b95a5", "#5f6b7a", "#b0b8c4", "#6e7f99")
ENGINE_DASHES = ("solid", "dot", "dash")
FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"


def refresh_wait(interval: float, cost: float, nodes: int) -> float:
    """Seconds until the next refresh: ``interval``, longer for a graph of more than
    NODES_PER_INTERVAL nodes (in proportion) or when the last refresh took ``cost`` CPU seconds
    (COST_FACTOR times that), never more than MAX_WAIT."""
    size = max(1.0, nodes / NODES_PER_INTERVAL)
    return min(MAX_WAIT, max(interval * size, COST_FACTOR * cost))


def _require(module: str) -> Any:
    """Import ``module`` or say how to install the dashboard's dependencies."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the nbindustria dashboard needs {module.split('.')[0]} (not installed): "
            f"{INSTALL_HINT}"
        ) from exc


@functools.cache
def _widget_class() -> Any:
    """The anywidget class of the header and graph view, made on first use (lazy imports)."""
    anywidget = _require("anywidget")
    traitlets = _require("traitlets")

    class DashboardWidget(anywidget.AnyWidget):  # type: ignore[name-defined]
        """Header and task graph of one run; data from :mod:`nbindustria.panels`."""

        _esm = ESM_PATH
        state = traitlets.Dict().tag(sync=True)
        details = traitlets.Dict().tag(sync=True)

    return DashboardWidget


# -- plotly figures (the same for the live widget and the report) ------------------------------


_GRID = "rgba(128,128,128,0.22)"
_ZERO = "rgba(128,128,128,0.40)"
TIMELINE_RIGHT = 0.84  # the timeline's plot ends here; its legend (task names) sits to the right


def _axis(**extra: Any) -> dict[str, Any]:
    return {"gridcolor": _GRID, "zerolinecolor": _ZERO, "automargin": True, **extra}


def _title(text: str, x: float, y: float, name: str) -> dict[str, Any]:
    # Panel titles are annotations (one figure holds three charts); ``name`` keeps them apart.
    return {"name": name, "text": text, "x": x, "y": y, "xref": "paper", "yref": "paper",
            "xanchor": "left", "yanchor": "bottom", "showarrow": False,
            "font": {"size": 13}}


def _activity(timeline: dict[str, Any]) -> tuple[float, float] | None:
    """(first start, last end) of the executed and running tasks, None if none."""
    spans = timeline["bars"] or timeline["segments"]
    items = [*spans, *timeline["running"]]
    if not items:
        return None
    return min(b["start"] for b in items), max(b["end"] for b in items)


def _note(text: str, x: float, y: float, name: str) -> dict[str, Any]:
    return {"name": name, "text": text, "x": x, "y": y, "xref": "paper", "yref": "paper",
            "xanchor": "center", "yanchor": "middle", "showarrow": False,
            "font": {"size": 12}, "opacity": 0.75}


def _timeline_traces(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A trace per task name, and one for what is running (empty or not: a stable set of traces
    is updated in place, a changing one is rebuilt). Engines are rows 0, 1, ... of the y axis."""
    running = data["running"]
    row = {engine: i for i, engine in enumerate(data["engines"])}
    # Past panels.MAX_BARS tasks the panel sends merged segments (a bounded number) instead.
    lines = not data["bars"] and bool(data["segments"])
    by_task: dict[str, list[dict[str, Any]]] = {}
    for bar in data["segments"] if lines else data["bars"]:
        by_task.setdefault(bar["task"], []).append(bar)
    traces: list[dict[str, Any]] = []
    failed_color = panels.STATE_COLORS[FAILED]
    for task, group in by_task.items():
        color = group[0]["color"]
        # One offset group for every name: bars of one engine share its row.
        common = {"name": task, "legendgroup": task, "xaxis": "x", "yaxis": "y",
                  "offsetgroup": "timeline"}
        if lines:  # one path per task name: cheap to draw however many tasks ran
            xs: list[float | None] = []
            ys: list[int | None] = []
            for bar in group:
                xs += [bar["start"], bar["end"], None]
                ys += [row[bar["engine"]], row[bar["engine"]], None]
            traces.append({"type": "scatter", "mode": "lines", **common, "x": xs, "y": ys,
                           "line": {"color": color, "width": 12}, "hoverinfo": "name"})
            continue
        failed = [bar["state"] == FAILED for bar in group]
        traces.append({
            "type": "bar", "orientation": "h", **common,
            "y": [row[bar["engine"]] for bar in group],
            "x": [max(bar["duration"], 1e-3) for bar in group],
            "base": [bar["start"] for bar in group],
            # Hover text as one flat list of strings: plotly and ipywidgets walk nested lists
            # element by element, which costs more than everything else in an update.
            "hovertext": [f"<b>{_esc(bar['label'])}</b><br>{bar['engine']} · "
                          f"{panels.format_duration(bar['duration'])} · {bar['state']}"
                          f"<br>started +{bar['start']:.2f} s" for bar in group],
            "hovertemplate": "%{hovertext}<extra></extra>",
            "marker": {"color": color,
                       "line": {"color": [failed_color if f else color for f in failed],
                                "width": [2.5 if f else 0.5 for f in failed]}},
            "width": 0.7,
        })
    traces.append({
        "type": "bar", "orientation": "h", "name": "running", "legendgroup": "running",
        "showlegend": bool(running), "xaxis": "x", "yaxis": "y", "offsetgroup": "timeline",
        "y": [row[bar["engine"]] for bar in running],
        "x": [max(bar["duration"], 1e-3) for bar in running],
        "base": [bar["start"] for bar in running],
        "hovertext": [f"<b>{_esc(bar['label'])}</b><br>{bar['engine']} · running"
                      for bar in running],
        "hovertemplate": "%{hovertext}<extra></extra>",
        "marker": {"color": "rgba(59,130,246,0.25)",
                   "line": {"color": panels.STATE_COLORS[RUNNING], "width": 1.5}},
        "width": 0.7,
    })
    return traces


def _esc(text: str) -> str:
    """Text for plotly's hover labels, which read a subset of HTML."""
    return html.escape(text, quote=False)


def _sample(points: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most about ``limit`` points, evenly spread, always keeping the highest peak."""
    if len(points) <= limit:
        return points
    step = -(-len(points) // limit)
    kept = points[::step]
    top = max(points, key=lambda p: p["peak_memory"] or 0)
    return kept if top in kept else [*kept, top]


def _memory_traces(data: dict[str, Any], scale: int) -> list[dict[str, Any]]:
    """A line per engine (its memory over time, beneath), then the tasks' peaks as dots coloured
    by task name: each dot sits on the line of the engine that ran it."""
    traces: list[dict[str, Any]] = []
    engines = data["engines"]
    for i, series in enumerate(engines):
        engine = series["engine"]
        traces.append({
            "type": "scatter", "mode": "lines", "name": engine, "legendgroup": "engines",
            "showlegend": False, "xaxis": "x2", "yaxis": "y2",
            "x": series["t"], "y": [m / scale for m in series["memory"]],
            "line": {"color": ENGINE_LINES[i % len(ENGINE_LINES)], "width": 1.5,
                     "dash": ENGINE_DASHES[(i // len(ENGINE_LINES)) % len(ENGINE_DASHES)]},
            "hovertemplate": f"<b>{html.escape(engine)}</b><br>%{{y:.3~f}} "
            f"{'GiB' if scale == 2**30 else 'MiB'} at +%{{x:.2f}} s<extra></extra>",
        })
    by_task: dict[str, list[dict[str, Any]]] = {}
    for point in data["points"]:
        by_task.setdefault(point["task"], []).append(point)
    # Thousands of SVG markers redrawn a few times a second would slow the browser: a large
    # run shows an even sample (with each name's highest peak).
    share = max(1, MEMORY_POINTS // max(len(by_task), 1))
    for task, group in by_task.items():
        shown = _sample(group, share)
        traces.append({
            "type": "scatter", "mode": "markers", "name": task, "legendgroup": task,
            "showlegend": False, "xaxis": "x2", "yaxis": "y2",
            "x": [p["end"] for p in shown],
            "y": [(p["peak_memory"] or 0) / scale for p in shown],
            "hovertext": [f"<b>{_esc(p['label'])}</b><br>"
                          f"{panels.format_bytes(p['peak_memory'])} on {p['engine']}"
                          for p in shown],
            "hovertemplate": "%{hovertext}<extra></extra>",
            "marker": {"color": group[0]["color"], "size": 7, "opacity": 0.85,
                       "line": {"width": 0}},
        })
    return traces


def _cache_traces(data: dict[str, Any]) -> list[dict[str, Any]]:
    # One stacked bar per task name (hits, then ran, then failed), stacked by hand with ``base``:
    # the figure's barmode is "group" for the timeline's sake.
    tasks = data["tasks"]
    names = [t["name"] for t in tasks]
    hits = [t["hits"] for t in tasks]
    runs = [t["runs"] for t in tasks]
    saved = [panels.format_duration(t["saved"]) for t in tasks]
    colors = panels.STATE_COLORS
    common = {"type": "bar", "xaxis": "x3", "yaxis": "y3", "x": names, "legend": "legend2",
              "offsetgroup": "cache", "width": 0.6}
    return [
        {**common, "name": "cache hits", "y": hits, "base": [0] * len(tasks),
         "marker": {"color": colors[CACHED]}, "customdata": saved,
         "hovertemplate": "%{x}: %{y} cache hits · saved %{customdata}<extra></extra>"},
        {**common, "name": "ran", "y": runs, "base": hits,
         "marker": {"color": colors[DONE]}, "hovertemplate": "%{x}: %{y} ran<extra></extra>"},
        {**common, "name": "failed", "y": [t["failed"] for t in tasks],
         "base": [h + r for h, r in zip(hits, runs, strict=True)],
         "marker": {"color": colors[FAILED]},
         "hovertemplate": "%{x}: %{y} failed<extra></extra>"},
    ]


def charts_figure(
    timeline: dict[str, Any], memory: dict[str, Any], cache: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Traces and layout of the three charts, as one plotly figure.

    Top, full width: the timeline (a row per engine, a bar per executed task, coloured by task
    name). Below, side by side: peak memory per task over time (with the engines' memory limit),
    and cache hits vs runs per task name with the time the hits saved. One figure, because every
    ``FigureWidget`` carries plotly.js (5 MB) into the notebook's saved widget state.
    """
    engines = timeline["engines"]
    n_bars = timeline["count"]
    top_h = min(460, 56 + 34 * max(len(engines), 2))  # px of the timeline's plot area
    bottom_h, gap, margin_t, margin_b = 210, 92, 34, 46
    height = margin_t + top_h + gap + bottom_h + margin_b
    plot_h = height - margin_t - margin_b
    bottom_top = bottom_h / plot_h
    top_bottom = (bottom_h + gap) / plot_h
    highest = max([p["peak_memory"] or 0 for p in memory["points"]]
                  + [m for e in memory["engines"] for m in e["memory"]] + [1])
    # The engines' memory limit is drawn when it is in sight (within 3x the highest peak);
    # far above, the title names it instead of squashing every point to the bottom.
    limit = memory["limit"]
    limit_shown = bool(limit) and limit <= 3 * highest
    peak = max(highest, limit if limit_shown else 0)
    unit, scale = ("GiB", 2**30) if peak >= 2 * 2**30 else ("MiB", 2**20)
    total = cache["total"]
    traces = _timeline_traces(timeline) + _memory_traces(memory, scale) + _cache_traces(cache)
    title_pad = 14 / plot_h
    # When the tasks began late (engines starting, a long graph walk), the time axes show the
    # stretch where tasks ran rather than a blank start; the title says where it begins.
    window = _activity(timeline)
    late = window is not None and window[0] > 0.25 * window[1]
    x_range = None
    if window is not None and late:
        pad = 0.03 * (window[1] - window[0]) or 0.05
        x_range = [max(0.0, window[0] - pad), window[1] + pad]
    annotations = [
        _title((f"<b>Timeline</b> · {n_bars} task{'s' if n_bars != 1 else ''} ran on "
                f"{len(engines)} engine{'s' if len(engines) != 1 else ''}" if engines
                else "<b>Timeline</b> · no task ran")
               + (f" · the first began at +{window[0]:.1f} s" if window and late else ""),
               0, 1 + title_pad, "timeline"),
        _title("<b>Memory</b> · engines over time, dots: peak per task" + (
            f" · engine limit {panels.format_bytes(limit)}" if limit and not limit_shown else ""),
            0, bottom_top + title_pad, "memory"),
        _title(f"<b>Cache</b> · {total['hits']} hits, {total['runs']} ran · "
               f"{panels.format_duration(total['saved'])} saved", 0.56, bottom_top + title_pad,
               "cache"),
    ]
    if window is None:  # say why a chart is empty rather than draw bare axes
        hits = cache["total"]["hits"]
        empty = ("No task ran: every result came from the cache." if hits
                 else "No task has run yet.")
        annotations.append(_note(empty, TIMELINE_RIGHT / 2, (top_bottom + 1) / 2, "empty"))
    if not memory["points"]:
        if window is not None:
            why = "No memory samples."  # the tasks ran without measuring it
        elif cache["total"]["hits"]:
            why = "No memory samples: no task ran."
        else:
            why = "No memory samples yet."
        annotations.append(_note(why, 0.22, bottom_top / 2, "memory-empty"))
    if len(memory["engines"]) <= 6:  # name each engine's line at its end
        for series in memory["engines"]:
            if series["t"]:
                annotations.append({
                    "name": f"engine-label:{series['engine']}", "text": series["engine"],
                    "x": series["t"][-1], "y": series["memory"][-1] / scale, "xref": "x2",
                    "yref": "y2", "xanchor": "left", "yanchor": "middle", "xshift": 6,
                    "showarrow": False, "font": {"size": 10}, "opacity": 0.8})
    shapes: list[dict[str, Any]] = []
    if limit_shown:
        level = limit / scale
        shapes.append({"type": "line", "xref": "x2 domain", "yref": "y2", "x0": 0, "x1": 1,
                       "y0": level, "y1": level, "name": "limit",
                       "line": {"color": panels.STATE_COLORS[FAILED], "width": 1.5,
                                "dash": "dash"}})
        annotations.append({"name": "limit", "xref": "x2 domain", "yref": "y2", "x": 1,
                            "y": level, "xanchor": "right", "yanchor": "bottom",
                            "showarrow": False, "font": {"size": 10},
                            "text": f"engine limit {panels.format_bytes(limit)}"})
    layout = {
        # No plotly template: every style is set here, and the default template costs ~20 ms
        # of validation each time a figure is made.
        "template": "none",
        "height": height,
        "margin": {"l": 60, "r": 12, "t": margin_t, "b": margin_b},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "font": {"family": FONT, "size": 11, "color": "#6b7280"},
        "hoverlabel": {"font": {"family": FONT, "size": 11}},
        "barmode": "group",  # the cache's bars side by side (the timeline has one offset group)
        "bargap": 0.25,
        "showlegend": True,
        "legend": {"x": TIMELINE_RIGHT + 0.02, "y": 1, "yanchor": "top", "xanchor": "left",
                   "bgcolor": "rgba(0,0,0,0)", "title": {"text": "task"},
                   "tracegroupgap": 2, "font": {"size": 11}},
        "legend2": {"orientation": "h", "x": 1, "xanchor": "right", "y": -0.09,
                    "yanchor": "top", "bgcolor": "rgba(0,0,0,0)", "font": {"size": 11}},
        "xaxis": _axis(domain=[0, TIMELINE_RIGHT], anchor="y", rangemode="tozero",
                       range=x_range, autorange=x_range is None, visible=window is not None,
                       title={"text": "seconds since the run started", "standoff": 4}),
        "yaxis": _axis(domain=[top_bottom, 1], anchor="x", type="linear",
                       tickvals=list(range(len(engines))), ticktext=engines, zeroline=False,
                       range=[max(len(engines), 1) - 0.5, -0.5], showgrid=False),
        "xaxis2": _axis(domain=[0, 0.44], anchor="y2", rangemode="tozero",
                        range=x_range, autorange=x_range is None,
                        visible=bool(memory["points"]),
                        title={"text": "finished at (s)", "standoff": 4}),
        # From zero when the limit is drawn; else fitted to the data, so that an engine's
        # memory growing over the run shows.
        "yaxis2": _axis(domain=[0, bottom_top], anchor="x2", visible=bool(memory["points"]),
                        rangemode="tozero" if limit_shown else "normal",
                        range=[0, 1.08 * peak / scale] if limit_shown else None,
                        autorange=not limit_shown, title={"text": f"peak ({unit})", "standoff": 4}),
        "xaxis3": _axis(domain=[0.56, 1], anchor="y3", type="category"),
        "yaxis3": _axis(domain=[0, bottom_top], anchor="x3", rangemode="tozero",
                        title={"text": "tasks", "standoff": 4}),
        "annotations": annotations,
        "shapes": shapes,
    }
    return traces, layout


def _packed(trace: dict[str, Any]) -> dict[str, Any]:
    """``trace`` with its long numeric arrays as numpy arrays, which plotly's widget sends as
    binary buffers; it walks a Python list element by element (half a second for 10,000 bars)."""
    packed = dict(trace)
    for key in ("x", "y", "base"):
        values = trace.get(key)
        # (The types are checked in C; numpy turns None into NaN: a gap in a line.)
        if isinstance(values, list) and len(values) > 64 and set(map(type, values)) <= _NUMBERS:
            packed[key] = np.array(values, dtype=float)
    return packed


_NUMBERS = {int, float, bool, type(None)}


def _figure_widget(go: Any, traces: list[dict[str, Any]], layout: dict[str, Any]) -> Any:
    """The charts' ``FigureWidget``, made without plotly validating each property as it is set
    (half the cost of making it: ~5 ms of a large run's ~10). ``traces`` and ``layout`` are
    :func:`charts_figure`'s, which plotly takes as they are (tests check them with validation,
    and that this widget's state is the validated one's), once they say what validation would
    make of them: a None value is unset, an empty list of shapes or annotations is none, and the
    "none" template is plotly's own. What changes later is validated as usual."""
    fig = go.FigureWidget(data=[_packed(_set_only(t)) for t in traces],
                          layout={**_set_only(layout), "template": _none_template(go)},
                          _validate=False)
    # (Their parts made later, read or assigned, take the figure's, layout's or trace's.)
    for part in (fig, fig.layout, *fig.data):
        part._validate = True
    return fig


def _set_only(value: Any) -> Any:
    """``value`` without the None values of its dicts, at any depth (and without empty shapes
    or annotations): what plotly's validation keeps of it."""
    if isinstance(value, dict):
        return {k: _set_only(v) for k, v in value.items()
                if v is not None and not (k in ("shapes", "annotations") and v == [])}
    if isinstance(value, list) and value and isinstance(value[0], dict):  # (not data arrays)
        return [_set_only(v) for v in value]
    return value


@functools.cache
def _none_template(go: Any) -> dict[str, Any]:
    """plotly's "none" template as the widget state holds it (made once, validated)."""
    return cast("dict[str, Any]", go.Layout(template="none").template.to_plotly_json())


class _FigureSync:
    """Brings a FigureWidget to new traces and layout, sending only what changed.

    plotly validates every property it is given (a fraction of a millisecond each), which costs
    more than computing the panels; comparing plain dicts with the last ones sent is cheap, so
    only the changed keys of changed traces, and only the changed fields of the chart titles,
    are given to plotly.
    """

    def __init__(self, fig: Any) -> None:
        self.fig = fig
        self.traces: list[dict[str, Any]] = []
        self.layout: dict[str, Any] = {}

    def __call__(self, traces: list[dict[str, Any]], layout: dict[str, Any]) -> None:
        fig = self.fig
        shape = [(t["type"], t["name"], t.get("xaxis")) for t in traces]
        if shape != [(t["type"], t["name"], t.get("xaxis")) for t in self.traces]:
            with fig.batch_update():  # traces came or went (a new task name): replace them all
                fig.data = []
            fig.add_traces([_packed(t) for t in traces])
        else:
            changed = [(i, _changed(t, old))
                       for i, (t, old) in enumerate(zip(traces, self.traces, strict=True))
                       if t != old]
            if changed:
                with fig.batch_update():
                    for i, keys in changed:
                        fig.data[i].update(_packed(keys))
        delta: dict[str, Any] = {}
        for key, value in layout.items():
            old = self.layout.get(key)
            if old == value:
                continue
            if key == "annotations" and isinstance(old, list) and len(old) == len(value):
                # Titles change their text as the run goes on: set just that.
                for i, (item, before) in enumerate(zip(value, old, strict=True)):
                    delta.update((f"{key}[{i}].{k}", v) for k, v in _changed(item, before).items())
            else:
                delta[key] = value
        if delta:
            with fig.batch_update():
                for path, value in delta.items():
                    fig.layout[path] = value
        self.traces, self.layout = traces, layout


def _changed(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``new`` whose values differ from ``old``'s, and None for keys it dropped."""
    keys = {k: v for k, v in new.items() if k != "type" and old.get(k) != v}
    keys.update((k, None) for k in old if k not in new)
    return keys


# -- the live dashboard ------------------------------------------------------------------------


def _last_run_start(log: EventLog) -> int:
    """Index of the last run-start event in ``log`` (0 if none): where "the last run" begins."""
    start = 0
    for event in log.since_packed(0):
        if event.kind == RUN_START:
            start = event.index
    return start


class Dashboard:
    """The live view of one run of a pipeline, read from its :class:`EventLog`.

    Parameters
    ----------
    log
        The run's event log (``pipe.events``).
    start
        Which run: ``"last"`` (default) the last run in the log, or the next one if the log
        holds none; ``"next"`` the next run to start (for a dashboard shown just before a run);
        or the log index the run starts at.
    interval
        Seconds between refreshes while the run goes on (longer when a refresh is expensive,
        and in proportion for a graph of more than 3,000 nodes; at most two seconds).
    live
        Follow the run in a background thread. ``False``: show the log as it is (``refresh()``
        to update).

    The dashboard follows one run: it stops at that run's ``run-end`` event (or at the start of
    another run), after a last refresh, so that it stays in the notebook as the record of its run.

    The header and graph show at once; a live dashboard imports plotly's widget in a thread of
    its own (seconds, the first time in a session) and adds the charts when their first update
    is due (two seconds into the run, or at its end), made with the data of that moment, so a
    run is never held up by them.

    Attributes
    ----------
    widget
        What to display: an ipywidgets ``VBox`` (``display(dashboard)`` shows it too).
    graph_widget
        The header and graph (an anywidget); its ``state`` and ``details`` traits hold the data.
    charts
        The plotly ``FigureWidget`` of the timeline, memory and cache charts (``None`` until made).
    view
        The :class:`panels.RunView` the panels are computed from.
    cpu_seconds
        The CPU time the dashboard's own work has taken so far, in any thread (what it costs
        the run; ``benchmarks/bench_dashboard.py`` reports it).
    """

    def __init__(
        self,
        log: EventLog,
        *,
        start: int | Literal["last", "next"] = "last",
        interval: float = INTERVAL,
        live: bool = True,
    ) -> None:
        began = time.thread_time()
        widgets = _require("ipywidgets")
        _require("anywidget")  # plotly's FigureWidget needs it too, and would not say how to get it
        _require("plotly")  # cheap; plotly.graph_objects' FigureWidget is the costly part
        self.log = log
        self.interval = interval
        self.view = panels.RunView()
        if start == "last":
            self._next = _last_run_start(log)
        elif start == "next":
            self._next = log.next_index
        elif isinstance(start, int) and not isinstance(start, bool):
            self._next = start
        else:
            raise ValueError(f"'start' must be 'last', 'next' or a log index (got {start!r})")
        self._seen_start = False
        self._finished = False
        self._pushed: tuple[int, int] = (-1, -1)
        self._refreshed: tuple[int, int, int] | None = None  # the view a full refresh showed
        self._details_sent: dict[str, Any] | None = None
        # The charts are made when their first update is due (with the data of that moment:
        # an empty figure updated later costs a replacement of every trace), then updated at
        # most every CHART_INTERVAL; _charted is the view (version, structure) they show.
        self._charts_due = time.time() + CHART_INTERVAL
        self._charted: tuple[int, int] | None = None
        self._edited = False  # the charts changed since made or last snapshot
        self._imported = threading.Event()  # plotly's widget module is imported
        self._lock = threading.Lock()  # one sync at a time
        self._charts_lock = threading.Lock()  # one maker of the charts
        self._cpu_lock = threading.Lock()
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._charts_thread: threading.Thread | None = None
        self.charts: Any = None
        self._sync_charts: _FigureSync | None = None

        self.graph_widget = _widget_class()()
        self.widget = widgets.VBox([self.graph_widget], layout=widgets.Layout(width="100%"))
        self.widget.add_class("nbi-dashboard")
        self._spent(time.thread_time() - began)  # _sync counts its own
        self._sync(force=True)
        if live and not self._finished:
            self._thread = threading.Thread(
                target=self._follow, name="nbindustria-dashboard", daemon=True
            )
            self._charts_thread = threading.Thread(
                target=self._import_charts, name="nbindustria-dashboard-charts", daemon=True
            )
            self._thread.start()
            self._charts_thread.start()
        else:
            self.refresh()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def finished(self) -> bool:
        """True once the followed run has ended (the view no longer changes)."""
        return self._finished

    def refresh(self) -> None:
        """Read new events and push every panel now, the charts included (e.g. at the end of a
        run, so that a notebook saved with widget state holds the final counts)."""
        with self._lock:
            # The follower's last refresh may have done it all already (the run is over).
            done = self._finished and self._refreshed == self._stamp()
        if done:
            return
        self._sync(force=True)
        self._make_charts()  # (once: with the data of now, the run's last if it is over)
        with self._lock:
            began = time.thread_time()
            self._snapshot_charts()
            self._refreshed = self._stamp()
            self._spent(time.thread_time() - began)

    def _spent(self, seconds: float) -> None:
        with self._cpu_lock:
            self.cpu_seconds += seconds

    def _stamp(self) -> tuple[int, int, int]:
        return (self.view.version, self.view.structure_version, id(self.charts))

    def _snapshot_charts(self) -> None:
        """Put the charts' current data into their synced traits.

        plotly sends live edits as restyle/relayout messages and keeps its ``_widget_data`` and
        ``_widget_layout`` traits as they were when the figure was shown; a notebook saved with
        widget state would reopen on the charts of the run's first second. plotly's own
        ``_repr_mimebundle_`` re-assigns them the same way before display.
        """
        charts = self.charts
        if charts is None or not self._edited:  # (a figure just made holds its data there)
            return
        with contextlib.suppress(AttributeError):  # plotly internals; if renamed, skip quietly
            charts._widget_layout = copy.deepcopy(charts._layout_obj._props)
            charts._widget_data = copy.deepcopy(charts._data)
        self._edited = False

    def _make_charts(self) -> None:
        """Make the chart widget and add it to the dashboard (once)."""
        with self._charts_lock:
            if self.charts is not None:
                return
            began = time.thread_time()
            # Slow (plotly's widget imports nbformat, jsonschema, ...): not under the sync lock,
            # so the header and graph keep following the run meanwhile.
            go = _require("plotly.graph_objects")
            widgets = _require("ipywidgets")
            with self._lock:
                traces, layout = self._chart_data()
                charted = (self.view.version, self.view.structure_version)
            # Made with its data (plotly validates once, rather than an empty figure and then
            # its traces), outside the lock: the data are plain dicts of this moment. What
            # changes meanwhile reaches the charts at their next update (_charted).
            charts = _figure_widget(go, traces, layout)
            charts._config = {"displaylogo": False, "responsive": True}
            box = widgets.Box([charts], layout=widgets.Layout(margin="10px 0 0 0"))
            box.add_class("nbi-chart")
            sync = _FigureSync(charts)
            sync.traces, sync.layout = traces, layout
            with self._lock:
                self._sync_charts = sync
                self._charted = charted  # what changes later reaches them at their next update
                self._charts_due = time.time() + CHART_INTERVAL
                self.charts = charts
                self.widget.children = (*self.widget.children, box)
            self._spent(time.thread_time() - began)

    def _make_charts_quietly(self) -> None:
        # In the background a failure has nobody to tell: refresh() makes the charts again in
        # the caller's thread, where the error shows.
        with contextlib.suppress(Exception):
            self._make_charts()

    def _import_charts(self) -> None:
        """Import plotly's widget in the background (slow: it imports nbformat, jsonschema,
        ...), so that the charts can be made without holding up the header and graph."""
        began = time.thread_time()
        with contextlib.suppress(Exception):  # refresh() imports again, and says what failed
            _require("plotly.graph_objects")
            _require("ipywidgets")
            self._imported.set()
        self._spent(time.thread_time() - began)

    def close(self) -> None:
        """Stop following the log. The widgets stay, showing the last state."""
        self._stop.set()
        for thread in (self._thread, self._charts_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5)
        self._thread = self._charts_thread = None

    def _follow(self) -> None:
        wait = self.interval
        while not self._finished and not self._stop.wait(wait):
            # The cost is this thread's CPU time, not its wall time: waiting for the GIL while
            # the run holds it is not a cost to the run, and would stall the view for no gain.
            wait = refresh_wait(self.interval, self._sync(), len(self.view.state))
            if self.charts is None and self._imported.is_set() and time.time() >= self._charts_due:
                self._make_charts_quietly()
        if self._finished:  # the run ended: a last, complete refresh (charts and saved state)
            with contextlib.suppress(Exception):  # refresh() again in the caller's thread shows it
                self.refresh()

    def _ingest(self, events: list[Event]) -> None:
        """Feed the view the events of the run it follows; note when that run is over."""
        kinds = [e.kind for e in events]  # read once, here and by the view
        for i in sorted(panels.positions(kinds, RUN_START) + panels.positions(kinds, RUN_END)):
            if kinds[i] == RUN_START:
                if self._seen_start:  # another run began: this dashboard is its predecessor's
                    self.view.update(events[:i], kinds[:i])
                    self._finished = True
                    return
                self._seen_start = True
            else:
                self.view.update(events[: i + 1], kinds[: i + 1])
                self._finished = True
                return
        self.view.update(events, kinds)

    def _sync(self, force: bool = False) -> float:
        """Read new events and push what changed; returns the CPU seconds this thread spent
        (not counting a wait for the lock, which the chart maker may hold for a while)."""
        with self._lock:
            began = time.thread_time()
            if not self._finished:
                events = self.log.since_packed(self._next)  # folded from their columns
                if events:
                    self._next = events[-1].index + 1
                    self._ingest(events)
            stamp = (self.view.version, self.view.structure_version)
            now = time.time()
            if stamp != self._pushed or force:
                self._pushed = stamp
                self._push(now)
            final = force or self._finished
            if self._sync_charts is not None and self._charted != stamp and (
                    final or now >= self._charts_due):
                self._charted = stamp
                charts_began = time.thread_time()
                self._sync_charts(*self._chart_data(now))
                self._edited = True  # (live edits: the synced traits hold the figure as made)
                cost = time.thread_time() - charts_began
                self._charts_due = now + min(CHART_MAX_WAIT, max(CHART_INTERVAL,
                                                                 CHART_COST_FACTOR * cost))
            cost = time.thread_time() - began
            self._spent(cost)
            return cost

    def _push(self, now: float) -> None:
        """The header, graph and node details (the anywidget's traits)."""
        view = self.view
        graph = panels.graph(view)
        state = {"header": panels.header(view, now=now), "graph": graph}
        # Details change only with a node's state (panels caches them per node); the synced
        # trait is assigned only when they differ, as traitlets sends only changed values.
        details = panels.details(view, panels.graph_node_ids(graph))
        with self.graph_widget.hold_sync():
            self.graph_widget.state = state
            if details != self._details_sent:
                self.graph_widget.details = self._details_sent = details

    def _chart_data(self, now: float | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        view = self.view
        return charts_figure(panels.timeline(view, now=now or time.time()), panels.memory(view),
                             panels.cache_stats(view))


# -- the standalone report ---------------------------------------------------------------------


def _dashboard_css() -> str:
    """The widget's own CSS, read from the ES module, so the report looks like the widget."""
    source = ESM_PATH.read_text(encoding="utf-8")
    match = re.search(r"const CSS = `(.*?)`;", source, re.S)
    return match.group(1) if match else ""


# JupyterLab's variables the CSS reads, for a page outside JupyterLab: light, or dark when the
# reader's system prefers it.
_REPORT_VARS = """
:root { --jp-layout-color0: #ffffff; --jp-layout-color1: #ffffff; --jp-layout-color2: #f3f4f6;
  --jp-ui-font-color0: #111827; --jp-ui-font-color1: #1f2328; --jp-ui-font-color2: #57606a;
  --jp-ui-font-color3: #8c959f; --jp-border-color2: #d8dee4; --jp-brand-color1: #1976d2;
  --jp-error-color1: #d32f2f; --jp-cell-editor-background: #f6f8fa; }
@media (prefers-color-scheme: dark) {
  :root { --jp-layout-color0: #0d1117; --jp-layout-color1: #161b22; --jp-layout-color2: #21262d;
    --jp-ui-font-color0: #f0f6fc; --jp-ui-font-color1: #e6edf3; --jp-ui-font-color2: #9da7b3;
    --jp-ui-font-color3: #7d8590; --jp-border-color2: #30363d; --jp-brand-color1: #58a6ff;
    --jp-error-color1: #ff7b72; --jp-cell-editor-background: #0d1117; } }
body { margin: 0; padding: 24px; background: var(--jp-layout-color0); }
.nbi-report { max-width: 1280px; margin: 0 auto; }
.nbi-report .nbi-chart { margin-top: 10px; }
.nbi-report footer { color: var(--jp-ui-font-color3); font: 11px system-ui, sans-serif; margin-top: 12px; }
"""

_REPORT_SCRIPT = """
(function () {
  var details = JSON.parse(document.getElementById("nbi-details").textContent);
  var drawer = document.querySelector(".nbi-drawer");
  var svg = document.querySelector(".nbi-svg");
  function esc(t) { var d = document.createElement("div"); d.textContent = t; return d.innerHTML; }
  function show(id) {
    var nodes = svg.querySelectorAll(".nbi-node");
    for (var i = 0; i < nodes.length; i++) nodes[i].classList.toggle("selected", nodes[i].dataset.id === id);
    var d = id && details[id];
    document.querySelector(".nbi-graph").classList.toggle("has-drawer", !!d);
    if (!d) { drawer.classList.remove("open"); drawer.innerHTML = ""; return; }
    var html = '<h4><span class="nbi-label">' + esc(d.label) + '</span><button class="nbi-close" type="button">✕</button></h4>';
    html += '<span class="nbi-state" style="background:' + d.color + '">' + esc(d.state_label) + "</span>";
    var rows = "";
    d.rows.forEach(function (r) { rows += '<span class="nbi-k">' + esc(r[0]) + '</span><span class="nbi-v">' + esc(r[1]) + "</span>"; });
    if (d.why) html += '<p class="nbi-why' + (d.state === "failed" ? " nbi-error" : "") + '">' + esc(d.why) + "</p>";
    if (d.traceback) html += '<pre class="nbi-tb">' + esc(d.traceback) + "</pre>";
    html += '<div class="nbi-rows">' + rows + "</div>";
    drawer.innerHTML = html;
    drawer.classList.add("open");
    drawer.querySelector(".nbi-close").onclick = function () { show(null); };
  }
  svg.addEventListener("click", function (e) {
    var node = e.target.closest(".nbi-node");
    show(node ? node.dataset.id : null);
  });
})();
"""


def _header_html(h: dict[str, Any]) -> str:
    e = html.escape
    colors, labels = h["colors"], h["labels"]
    engines = h["engines"] or (f"{h['n_engines']} engine{'s' if h['n_engines'] != 1 else ''}"
                               if h["n_engines"] is not None else "")
    meta = " · ".join(part for part in (
        f"run <b>{e(str(h['run']))}</b>" if h["run"] is not None else "",
        e(engines),
        "<b>dry run</b>" if h["dryrun"] else "",
    ) if part)
    status = {"failed": f"finished · {h['counts']['failed']} failed"}.get(h["status"], h["status"])
    status_color = {"running": colors["running"], "finished": colors["done"],
                    "failed": colors["failed"], "interrupted": colors["skipped"]
                    }.get(h["status"], colors["added"])

    def bar(counts: dict[str, int], total: int, small: bool) -> str:
        segments = "".join(
            f'<span style="width:{100 * n / total:.3f}%;background:{colors[s]}" '
            f'title="{n} {s}"></span>'
            for s, n in counts.items() if n and s != ADDED and total
        )
        return f'<div class="nbi-bar{" small" if small else ""}">{segments}</div>'

    counts = "".join(
        f'<span class="nbi-count{"" if n else " zero"}" data-state="{s}">'
        f'<span class="nbi-swatch" style="background:{colors[s]}"></span>{e(labels[s])} <b>{n}</b>'
        f"</span>"
        for s, n in h["counts"].items()
    )
    tasks = "".join(
        f'<div class="nbi-task" data-task="{e(t["name"])}"><span class="nbi-task-name" '
        f'title="{e(t["name"])}"><span class="nbi-swatch" style="background:{t["color"]}"></span>'
        f'{e(t["name"])}</span>{bar(t["counts"], t["total"], True)}'
        f'<span class="nbi-task-frac">{t["finished"]}/{t["total"]}</span></div>'
        for t in h["tasks"]
    )
    return (
        f'<div class="nbi-head"><div class="nbi-top"><span class="nbi-name">{e(h["pipeline"])}'
        f'</span><span class="nbi-meta">{meta}</span><span class="nbi-spacer"></span>'
        f'<span class="nbi-pill {h["status"]}" style="color:{status_color}">{e(status)}</span>'
        f'<span class="nbi-elapsed">elapsed <b>{e(_elapsed(h["elapsed"]))}</b></span></div>'
        f'<div class="nbi-overall">{bar(h["counts"], h["total"], False)}<span class="nbi-frac">'
        f'<b>{h["finished"]}</b> / {h["total"]} tasks · {int(100 * h["progress"])}%</span></div>'
        f'<div class="nbi-counts">{counts}</div>'
        + (f'<div class="nbi-tasks">{tasks}</div>' if tasks else "")
        + "</div>"
    )


def _elapsed(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else panels.format_duration(seconds)


def graph_svg(graph: dict[str, Any]) -> str:
    """The task graph as inline SVG (as js/dashboard.js draws it, groups collapsed)."""
    e = html.escape
    nodes = graph["nodes"]
    if not nodes:
        return '<div class="nbi-empty">No tasks.</div>'
    colors = graph["state_colors"]
    width = 2 * PAD + (graph["columns"] - 1) * PITCH_X + NODE_W
    height = 2 * PAD + (graph["rows"] - 1) * PITCH_Y + NODE_H + 6
    xy = {n["id"]: (PAD + n["col"] * PITCH_X, PAD + n["row"] * PITCH_Y) for n in nodes}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="nbi-svg" viewBox="0 0 {width} '
             f'{height}" width="{width}" style="width:100%;max-width:{width}px;min-width:'
             f'{round(width * 0.62)}px" role="img" aria-label="task graph"><g class="nbi-edges">']
    for source, target in graph["edges"]:
        (ax, ay), (bx, by) = xy[source], xy[target]
        x1, y1, x2, y2 = ax + NODE_W, ay + NODE_H / 2, bx, by + NODE_H / 2
        dx = max(24, abs(x2 - x1) / 2)
        parts.append(f'<path class="nbi-edge" d="M{x1},{y1} C{x1 + dx},{y1} {x2 - dx},{y2} '
                     f'{x2},{y2}"/>')
    parts.append('</g><g class="nbi-nodes">')
    for n in nodes:
        x, y = xy[n["id"]]
        color = colors.get(n["state"], colors[ADDED])
        attrs = (f'data-id="{e(n["id"])}" data-state="{n["state"]}" data-task="{e(n["task"])}"')
        if n["group"]:
            counts = ", ".join(f"{c} {s}" for s, c in n["counts"].items() if c)
            label = f'<tspan class="name">{e(_fit(n["task"], NODE_W - 52, 7.2))}</tspan>'
            bar, bx = [], x + 6.0
            for s, c in n["counts"].items():
                if c:
                    w = (NODE_W - 12) * c / n["count"]
                    bar.append(f'<rect x="{bx:.1f}" y="{y + NODE_H - 5}" width="{w:.1f}" '
                               f'height="3" fill="{colors[s]}"/>')
                    bx += w
            parts.append(
                f'<g class="nbi-node group" {attrs} data-count="{n["count"]}"><title>'
                f'{e(n["label"])}: {e(counts)}</title>'
                f'<rect x="{x + 6}" y="{y - 6}" width="{NODE_W}" height="{NODE_H}" rx="5" '
                f'fill="{color}" fill-opacity=".10" stroke="{color}" stroke-opacity=".45"/>'
                f'<rect x="{x + 3}" y="{y - 3}" width="{NODE_W}" height="{NODE_H}" rx="5" '
                f'fill="var(--jp-layout-color1)" stroke="{color}" stroke-opacity=".7"/>'
                f'<rect class="box" x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="5" '
                f'fill="var(--jp-layout-color1)" stroke="{color}"/>'
                f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="5" fill="{color}" '
                f'fill-opacity=".16" pointer-events="none"/>'
                f'<text class="label" x="{x + 8}" y="{y + NODE_H / 2 - 2}">{label}</text>'
                f'<text class="count" x="{x + NODE_W - 7}" y="{y + NODE_H / 2 - 2}">'
                f'\u00d7{n["count"]}</text>{"".join(bar)}</g>'
            )
        else:
            opacity = ".30" if n["state"] == FAILED else ".16"
            parts.append(
                f'<g class="nbi-node" {attrs}><title>{e(n["label"])} — {n["state"]}</title>'
                f'<rect class="box" x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="5" '
                f'fill="var(--jp-layout-color1)" stroke="{color}"/>'
                f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="5" fill="{color}" '
                f'fill-opacity="{opacity}" pointer-events="none"/>'
                f'<rect x="{x}" y="{y}" width="4" height="{NODE_H}" rx="2" fill="{color}" '
                f'pointer-events="none"/><text class="label" x="{x + 10}" y="{y + NODE_H / 2}">'
                f'{_node_label(n["task"], n["args"], NODE_W - 17)}</text></g>'
            )
    parts.append("</g></svg>")
    return "".join(parts)


def _fit(text: str, width: float, char_width: float) -> str:
    limit = max(3, int(width // char_width))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _node_label(name: str, args: str, width: float) -> str:
    """As nodeLabel in js/dashboard.js, with average character widths instead of measuring."""
    shown = _fit(name, width, 7.2)
    rest = width - 7.2 * (len(shown) + 1)
    label = f'<tspan class="name">{html.escape(shown)}</tspan>'
    if args and shown == name and rest > 14:
        label += f'<tspan class="args"> {html.escape(_fit(args, rest, 6.4))}</tspan>'
    return label


def write_report(events: EventLog | Iterable[Event], path: str | Path,
                 title: str | None = None) -> Path:
    """Write the dashboard of the last run in ``events`` as one standalone HTML file.

    Everything is inside the file (plotly.js inlined, the graph as inline SVG, a few lines of
    script for node details), so it opens on a machine with no internet. Returns the path.
    """
    go = _require("plotly.graph_objects")
    if isinstance(events, EventLog):
        events = events.since_packed(0)
    view = panels.run_view(events)
    h = panels.header(view)
    graph = panels.graph(view)
    details = panels.details(view, panels.graph_node_ids(graph))
    for d in details.values():  # what the report's script needs beyond the widget's data
        d["color"] = panels.STATE_COLORS.get(d["state"], "#888")
        d["state_label"] = panels.STATE_LABELS.get(d["state"], d["state"])
    legend = "".join(
        f'<span><span class="nbi-swatch" style="background:{panels.STATE_COLORS[s]}"></span>'
        f"{panels.STATE_LABELS[s]}</span>"
        for s in panels.STATE_ORDER
    )
    traces, layout = charts_figure(panels.timeline(view), panels.memory(view),
                                   panels.cache_stats(view))
    charts_html = go.Figure(data=traces, layout=layout).to_html(
        full_html=False, include_plotlyjs=True, div_id="nbi-charts",
        config={"displaylogo": False, "responsive": True})
    details_json = json.dumps(details).replace("</", "<\\/")
    name = title or f"{h['pipeline']}" + (f" · run {h['run']}" if h["run"] is not None else "")
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(h["started"] or time.time()))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(name)} · nbindustria</title>
<style>{_REPORT_VARS}{_dashboard_css()}</style></head>
<body><div class="nbi-report nbi-dashboard">
<div class="nbi-dash">{_header_html(h)}
<div class="nbi-graph"><div class="nbi-toolbar"><span class="nbi-title">Task graph</span>
<span class="nbi-legend">{legend}</span><span class="nbi-spacer"></span>
<span class="nbi-hint">click a node for details</span></div>
<div class="nbi-scroll">{graph_svg(graph)}</div><div class="nbi-drawer"></div></div></div>
<div class="nbi-chart">{charts_html}</div>
<footer>nbindustria run report · started {html.escape(stamp)}</footer></div>
<script type="application/json" id="nbi-details">{details_json}</script>
<script>{_REPORT_SCRIPT}</script>
</body></html>
"""
    target = Path(path)
    target.write_text(page, encoding="utf-8")
    return target
