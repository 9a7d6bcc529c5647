"""The views a script or notebook reaches from a Pipeline: pipe.dashboard(), pipe.report()."""

from __future__ import annotations

import pytest

from nbindustria import Pipeline


def square(x: int) -> int:
    return x * x


def test_report_and_dashboard_of_a_real_run(tmp_path):
    pytest.importorskip("plotly")
    pytest.importorskip("anywidget")
    pipe = Pipeline(name="views", cache_dir=tmp_path / "c", key_dir=tmp_path / "k", verbose=0)
    sq = pipe.task(square)
    for i in range(5):
        sq(i)
    pipe.run()
    path = pipe.report(tmp_path / "run.html")
    html = path.read_text()
    assert "plotly" in html.lower() and "views" in html
    assert html.count('class="nbi-node') >= 5 or html.count("nbi-node") >= 5
    assert "<script src=\"http" not in html
    board = pipe.dashboard()
    try:
        board.refresh()
        header = board.graph_widget.state["header"]
        assert header["total"] == 5 and header["counts"]["done"] == 5
    finally:
        board.close()
