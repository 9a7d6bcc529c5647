"""The dashboard as a user sees it: JupyterLab in headless Chromium runs notebooks/dashboard.ipynb.

The notebook makes the run(s) and prints what to expect (``NBI-EXPECT``, one entry per run); this
test checks each rendered dashboard against it: graph nodes and their states, one timeline bar per
executed task, the failed node's traceback on click; then it takes screenshots in the light and
dark themes. Swapping the synthetic run for a real pipeline is a change to the notebook only.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from harness import VIEWPORT, open_notebook, run_all, screenshot, set_theme, wait_until_idle

PlaywrightTimeout = pytest.importorskip("playwright.sync_api").TimeoutError

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The charts are one plotly figure: timeline on axes x/y, memory on x2/y2, cache on x3/y3.
TIMELINE_BARS = """([dash, n]) => [...dash.querySelectorAll('.js-plotly-plot')].some(gd => gd.data
  && gd.data.filter(t => t.type === 'bar' && t.xaxis === 'x' && t.name !== 'running')
            .reduce((sum, t) => sum + t.x.length, 0) === n)"""
ENGINE_LINES = """([dash, names]) => [...dash.querySelectorAll('.js-plotly-plot')].some(gd => gd.data
  && JSON.stringify(gd.data.filter(t => t.xaxis === 'x2' && t.mode === 'lines').map(t => t.name))
     === JSON.stringify(names))"""
TIMELINE_TITLE = """([dash, text]) => [...dash.querySelectorAll('.js-plotly-plot')].some(
  gd => (gd.layout.annotations || []).some(a => a.name === 'timeline' && a.text.includes(text)))"""
CHART_TITLES = """(dash) => [...dash.querySelectorAll('.js-plotly-plot')].flatMap(
  gd => (gd.layout.annotations || []).map(a => a.name))"""


class Stopwatch:
    """Prints how long each phase took (where a slow run spends its time)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def lap(self, what: str) -> None:
        now = time.monotonic()
        print(f"{now - self.last:5.1f} s  {what}")
        self.last = now


def expectations(page: Any) -> list[dict[str, Any]]:
    output = page.locator(".jp-OutputArea-output:has-text('NBI-EXPECT')")  # not the source
    output.wait_for(timeout=90_000)
    text = output.inner_text()
    return list(json.loads(text[text.index("NBI-EXPECT") + len("NBI-EXPECT"):].strip()))


def rendered_states(dash: Any) -> dict[str, int]:
    states = dash.locator("svg.nbi-svg g.nbi-node:not(.group)").evaluate_all(
        "nodes => nodes.map(n => n.dataset.state)")
    return {s: states.count(s) for s in set(states)}


def check_dashboard(page: Any, dash: Any, expect: dict[str, Any]) -> None:
    counts = {state: n for state, n in expect["counts"].items() if n}
    # Lab skips the layout of off-screen outputs (content-visibility): their text reads empty.
    dash.scroll_into_view_if_needed()
    # The header's final count, then the graph: one node per task, in its state.
    dash.locator(".nbi-frac b").filter(has_text=str(expect["total"])).wait_for()
    assert dash.locator(".nbi-name").inner_text() == expect["pipeline"]
    header_counts = dash.locator(".nbi-count").evaluate_all(
        "items => Object.fromEntries(items.map(i => [i.dataset.state, +i.querySelector('b')"
        ".textContent]))")
    assert {s: n for s, n in header_counts.items() if n} == counts
    if expect["grouped"]:
        sizes = dash.locator("svg.nbi-svg g.nbi-node").evaluate_all(
            "nodes => nodes.map(n => +(n.dataset.count || 1))")
        assert sum(sizes) == expect["total"]
    else:
        assert dash.locator("svg.nbi-svg g.nbi-node").count() == expect["total"]
        assert rendered_states(dash) == counts
    # The timeline: one bar per executed task (plotly's own data on the rendered plot).
    page.wait_for_function(TIMELINE_BARS, arg=[dash.element_handle(), expect["bars"]],
                           timeout=90_000)  # plotly's widget is 5 MB of JavaScript to load
    # The charts arrive after the header (their figure is built in the background): wait for
    # their titles rather than reading them once.
    page.wait_for_function(f"(dash) => {{ const t = ({CHART_TITLES})(dash); "
                           "return ['timeline', 'memory', 'cache'].every(n => t.includes(n)); }",
                           arg=dash.element_handle(), timeout=90_000)
    assert dash.locator(".js-plotly-plot .main-svg .barlayer .point").count() >= expect["bars"]
    # The layout follows the run too (titles are relayout messages, not data): the timeline's
    # title counts the tasks that ran.
    ran = f"{expect['bars']} task" if expect["bars"] else "no task ran"
    page.wait_for_function(TIMELINE_TITLE, arg=[dash.element_handle(), ran], timeout=30_000)
    # Memory over time: a line per engine that ran a task (data, then the drawn SVG paths).
    page.wait_for_function(ENGINE_LINES, arg=[dash.element_handle(), expect["engines"]],
                           timeout=30_000)
    lines = dash.locator(".js-plotly-plot .subplot.x2y2 .scatterlayer path.js-line")
    assert lines.count() == len(expect["engines"])


def test_dashboard_in_jupyterlab(lab, page):
    clock = Stopwatch()
    open_notebook(page, lab, "dashboard.ipynb")
    clock.lap("notebook open, kernel idle")
    run_all(page)
    page.locator(".nbi-dash").first.wait_for(timeout=90_000)
    clock.lap("header and graph shown")
    # While the run goes on (best effort: a slow machine may show it only when it has ended).
    live = page.locator(".nbi-dash:has(.nbi-pill.running)").first
    try:
        # (the engines start first: several seconds on a busy machine)
        live.locator("g.nbi-node[data-state='running']").first.wait_for(timeout=30_000)
        screenshot(live, "dashboard-light-live")
    except PlaywrightTimeout:
        print("the run ended before the dashboard showed it running")
    runs = expectations(page)
    wait_until_idle(page)
    clock.lap("all cells run")
    dashboards = page.locator(".nbi-dashboard")
    screenshot(page, "dashboard-light-after-run")  # what was there when the checks began
    assert dashboards.count() == len(runs), "one dashboard per run"
    for index, expect in enumerate(runs):
        check_dashboard(page, dashboards.nth(index), expect)
    clock.lap("dashboards checked (charts drawn)")

    # Clicking the failed node opens its details, with the traceback.
    first = next(i for i, e in enumerate(runs) if e["failed"])
    dash, failed = dashboards.nth(first), runs[first]["failed"][0]
    dash.locator(".nbi-graph").scroll_into_view_if_needed()
    dash.locator(f'g.nbi-node[data-id="{failed["id"]}"]').click()
    drawer = dash.locator(".nbi-drawer.open")
    drawer.wait_for()
    assert drawer.locator(".nbi-label").inner_text() == failed["label"]
    assert failed["error"] in drawer.locator(".nbi-tb").inner_text()
    assert "Traceback" in drawer.locator(".nbi-tb").inner_text()
    assert dash.locator("g.nbi-node.selected").count() == 1
    clock.lap("failed node clicked")

    for theme, tag in (("JupyterLab Light", "light"), ("JupyterLab Dark", "dark")):
        if theme != page.evaluate("() => document.body.dataset.jpThemeName"):
            set_theme(page, theme)
        dash.locator(".nbi-dash").scroll_into_view_if_needed()
        page.evaluate("(el) => el.scrollIntoView({block: 'start'})", dash.element_handle())
        screenshot(page, f"dashboard-{tag}-lab")  # what a 1280x800 laptop shows
        screenshot(dash.locator(".nbi-dash"), f"dashboard-{tag}-failure")
        page.set_viewport_size({"width": 1280, "height": 1700})  # the whole widget at once
        page.evaluate("(el) => el.scrollIntoView({block: 'start'})", dash.element_handle())
        screenshot(dash, f"dashboard-{tag}-full")
        if len(runs) > 1:  # the last run: every task a cache hit
            last = dashboards.nth(len(runs) - 1)
            page.evaluate("(el) => el.scrollIntoView({block: 'start'})", last.element_handle())
            screenshot(last, f"dashboard-{tag}-cached")
        page.set_viewport_size(VIEWPORT)
        clock.lap(f"{tag} screenshots")
    # The header's bars per task name and the chart colours follow the theme: nothing fails.
    assert not page.errors, page.errors
