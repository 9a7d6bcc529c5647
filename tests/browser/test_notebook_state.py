"""The browser test's notebook, run headless by nbclient: the saved widget state holds the final
run, so a notebook saved after a run shows its dashboard's last state."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
from harness import NOTEBOOKS, ROOT

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def widget_states(nb: Any) -> list[dict[str, Any]]:
    saved = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return [model["state"] for model in saved.get("state", {}).values()]


def test_saved_widget_state_holds_the_final_counts(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("anywidget")
    shutil.copy(NOTEBOOKS / "dashboard.ipynb", tmp_path)
    # The kernel imports nbindustria from this checkout even when it is not installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(tmp_path / "dashboard.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    printed = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", ()))
    expected = json.loads(printed[printed.index("NBI-EXPECT") + len("NBI-EXPECT"):].strip())
    states = widget_states(nb)
    headers = [s["state"]["header"] for s in states
               if s.get("_anywidget_id") == "nbindustria.dashboard.DashboardWidget"]
    assert len(headers) == len(expected)
    for header, expect in zip(headers, expected, strict=True):
        assert header["status"] in ("finished", "failed")
        assert header["total"] == header["finished"] == expect["total"]
        assert header["counts"] == expect["counts"]
    charts = [s for s in states if "_widget_data" in s]
    assert len(charts) == len(expected)
    for chart, expect in zip(charts, expected, strict=True):
        bars = [t for t in chart["_widget_data"]
                if t.get("type") == "bar" and t.get("xaxis") == "x" and t.get("name") != "running"]
        assert sum(len(t["x"]) for t in bars) == expect["bars"]
    # Widget outputs are there too, not only their state.
    mime = "application/vnd.jupyter.widget-view+json"
    assert any(mime in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", ()))
