"""The tutorial notebooks, executed twice each in real kernels (nbclient) on one fresh cache:
the first run's outputs say what ran; the second run is cache hits (``%%cache`` cells replay
their output), except what a notebook forces to run again on purpose.

The kernel inherits the test's environment: its own cache, key and config (tests/conftest.py).
The live dashboard is turned off (NBINDUSTRIA_DASHBOARD=0): it has tests of its own, and these
check what ran, from the text lines.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str) -> list[str]:
    """Run a notebook; returns the text each code cell showed (stdout, stderr, displays)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    shown = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        text = ""
        for out in cell.outputs:
            if out.output_type == "stream":
                text += out.text
            elif out.output_type in ("display_data", "execute_result"):
                text += "".join(f"[{mime}] {value}\n" for mime, value in out.data.items()
                                if mime.startswith("text/"))
        shown.append(text)
    return shown


def counts(text: str) -> tuple[int, int]:
    """(ran, cached) from the summary lines of the runs a cell made."""
    found = re.findall(r"--- ran (\d+), cached (\d+), failed 0, skipped 0", text)
    return sum(int(r) for r, _ in found), sum(int(c) for _, c in found)


def cell_with(cells: list[str], needle: str, start: int = 0) -> int:
    return next(i for i in range(start, len(cells)) if needle in cells[i])


@pytest.fixture(autouse=True)
def no_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBINDUSTRIA_DASHBOARD", "0")


def test_quickstart(tmp_path: Path) -> None:
    first = execute("quickstart.ipynb")
    assert "cache " + str(tmp_path / "cache") in first[0]
    run1 = cell_with(first, "starting a run with 7 tasks")
    assert counts(first[run1]) == (7, 0)
    assert "Saved result of make_data(5000)" in first[run1]
    assert "kept 4950 of 5000 points" in first[run1 + 1]
    run2 = cell_with(first, "starting a run with 7 tasks", run1 + 1)
    assert counts(first[run2]) == (1, 6), "editing summarize must re-run summarize only"
    assert "Saved result of summarize(" in first[run2]
    assert "'best_degree': 5" in first[run2 + 1]
    why = first[run2 + 2]
    assert "code of __main__.summarize changed" in why and "+    best = min(" in why

    second = execute("quickstart.ipynb")
    runs = [i for i, text in enumerate(second) if "starting a run" in text]
    assert len(runs) == 2
    assert all(counts(second[i]) == (0, 7) for i in runs), [second[i] for i in runs]
    assert second[runs[1] + 1] == first[run2 + 1]  # the same report, from the cache


def test_ndustria_tutorial(tmp_path: Path) -> None:
    first = execute("ndustria-tutorial.ipynb")
    simple = cell_with(first, "starting a run with 8 tasks")
    assert counts(first[simple]) == (8, 0)
    text = first[simple]
    # as in ndustria: every product is saved before the first parameters are computed
    assert text.rindex("Saved result of matrix_multiplication") < text.index(
        "Saved result of matrix_parameters")
    assert "Size of Matrix: (512, 512)" in text
    assert counts(first[simple + 1]) == (0, 8)
    assert counts(first[simple + 3]) == (4, 4)  # --rerun matrix_parameters
    dry = cell_with(first, "dry run:")
    assert "dry run: 1 to run, 4 cached (nothing was run)" in first[dry]
    timed = first[dry + 1]
    assert counts(timed) == (4, 0) and "peak" in timed and "slowest:" in timed
    table = first[-1]
    assert "matrix_multiplication" in table and "executions in" in table

    second = execute("ndustria-tutorial.ipynb")
    assert counts(second[simple]) == (0, 8) and counts(second[simple + 1]) == (0, 8)
    # forced on purpose: the rerun cell and the timed run
    assert counts(second[simple + 3]) == (4, 4)
    assert counts(second[dry + 1]) == (4, 0)
    assert "dry run: 1 to run, 4 cached" in second[dry]


def test_cell_caching_replays_outputs(tmp_path: Path) -> None:
    first = execute("cell-caching.ipynb")
    data = cell_with(first, "generated 20000 points")
    assert "[Cached] %%cache data: stored rng, x, y" in first[data]
    fits = cell_with(first, "%%cache fits")
    assert "[text/markdown] | degree | rmse |" in first[fits]
    assert "[Cached] %%cache fits" in first[fits]
    assert "best degree" in first[fits + 1] and "True" in first[fits + 2]
    graph = cell_with(first, "notebook graph")
    assert "%%cache fits  <- %%cache data" in first[graph]
    stream = cell_with(first, "batches ready")
    assert "CellCacheWarning" in first[stream] and "'batches' cannot be stored" in first[stream]

    second = execute("cell-caching.ipynb")
    assert "[Cache hit!] %%cache data: restored rng, x, y" in second[data]
    assert "[Cache hit!] %%cache fits" in second[fits]

    def replayed(text: str) -> str:  # the cell's own output, without nbindustria's status line
        return "\n".join(line for line in text.splitlines() if "%%cache" not in line)

    assert replayed(second[data]) == replayed(first[data])
    assert replayed(second[fits]) == replayed(first[fits])
    assert second[fits + 1] == first[fits + 1] and second[fits + 2] == first[fits + 2]
    assert "batches ready" in second[stream]  # not cacheable: it ran again
