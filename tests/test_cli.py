"""The ``nbindustria`` command, run in-process on a cache made by a real pipeline."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support import flip_last_payload_byte

from nbindustria import Pipeline
from nbindustria.cli import main
from nbindustria.store import Store


def make_rows(n):
    return [float(i) for i in range(n)]


def total(rows, scale=1.0):
    return sum(rows) * scale


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def filled(cache_dir: Path, key_dir: Path) -> Pipeline:
    """A cache with two runs of a small pipeline (timed, memory-checked, profiled)."""
    pipe = Pipeline(name="cli", cache_dir=cache_dir, key_dir=key_dir, memcheck=True,
                    profiling=True, stream=io.StringIO())
    load = pipe.task(make_rows)
    add = pipe.task(total)
    rows = load(100)
    for scale in (1.0, 2.0):
        add(rows, scale=scale)
    pipe.run()
    add(rows, scale=3.0)
    pipe.run(rerun=["total"])
    pipe.close()
    return pipe


def test_init_writes_the_config_and_makes_a_private_cache(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "chosen"
    code, out, _ = run_cli(capsys, "init", str(target), "--engines", "2")
    assert code == 0 and f"cache directory: {target}" in out
    config = json.loads(Path(os.environ["NBINDUSTRIA_CONFIG"]).read_text())
    assert config == {"cache_dir": str(target), "engines": "2"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / "nbindustria-cache.json").exists()


def test_ls_and_show(filled: Pipeline, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "ls")
    assert code == 0
    assert "make_rows(100)" in out and "total(make_rows(100), scale=3.0)" in out
    assert "4 result(s)" in out
    _, only, _ = run_cli(capsys, "ls", "--task", "make_rows", "--sort", "size")
    assert "make_rows(100)" in only and "total(" not in only
    key = next(line.split()[0] for line in out.splitlines() if "scale=2.0" in line)
    code, shown, _ = run_cli(capsys, "show", key[:8], "--value")
    assert code == 0
    assert "call         total(make_rows(100), scale=2.0)" in shown
    assert "scale = 2.0" in shown and "return sum(rows) * scale" in shown
    assert "value: 9900.0" in shown
    code, _, err = run_cli(capsys, "show", "zzzz")
    assert code == 2 and "no stored result" in err


def test_timings_memory_and_profile(filled: Pipeline, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("plotly")
    chart = tmp_path / "t.html"
    code, out, _ = run_cli(capsys, "timings", "--html", str(chart))
    assert code == 0 and f"chart: {chart}" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("total"))
    assert row[1] == "3"  # two calls in the first run, one (forced) in the second
    assert "<html>" in chart.read_text()[:500].lower() and "plotly" in chart.read_text()
    code, out, _ = run_cli(capsys, "memory", "--no-plot")
    assert code == 0 and "MiB" in out and "make_rows" in out
    code, out, _ = run_cli(capsys, "memory")
    assert (filled.settings.cache_dir / "reports" / "memory.html").exists()
    code, out, _ = run_cli(capsys, "profile", "total", "--top", "5")
    assert code == 0 and "profiled call(s) of total" in out and "function calls" in out


def test_gc_clear_and_verify(filled: Pipeline, key_dir: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = filled.settings.cache_dir
    code, out, _ = run_cli(capsys, "verify")
    assert code == 0 and "4 of 4 result(s) verified" in out
    # Small results are records of segment files: flip the last payload byte of one of them.
    store = Store(store_dir, key_dir)
    key = store.index.query("task = ?", ("total",))[0].key
    path, _offset, packed = store.locate(key)
    assert packed and path.startswith(str(store_dir / "entries" / "packs"))
    flip_last_payload_byte(store, key)
    code, out, _ = run_cli(capsys, "verify")
    assert code == 1 and "BAD" in out and "3 of 4 result(s) verified; 1 bad" in out
    code, out, _ = run_cli(capsys, "verify", "--reindex")
    assert code == 0 and "index rebuilt from the entries: 3 result(s)" in out

    code, out, _ = run_cli(capsys, "gc", "--max-size", "0", "--dry-run")
    assert "would delete 3 result(s)" in out and "1 quarantined entry" in out
    cleared = {r.key for r in store.index.query("task = ?", ("make_rows",))}
    assert cleared
    code, out, _ = run_cli(capsys, "clear", "make_rows")
    assert "deleted" in out
    # A cleared result does not come back when the index is made again from the entries.
    code, out, _ = run_cli(capsys, "verify", "--reindex")
    assert code == 0
    assert not cleared & set(store.keys())
    code, _, err = run_cli(capsys, "clear", "--all")
    assert code == 2 and "--yes" in err
    code, out, _ = run_cli(capsys, "clear", "--all", "--yes")
    assert code == 0
    code, out, _ = run_cli(capsys, "gc", "--older-than", "0")
    assert code == 0 and "1 quarantined entry" in out
    _, out, _ = run_cli(capsys, "ls")
    assert "no stored results" in out
    assert list((store_dir / "entries" / "packs").iterdir()) == []
    store.close()


def test_missing_cache_and_the_installed_command(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--cache-dir", str(tmp_path / "none"), "ls")
    assert code == 2 and "no nbindustria cache at" in err and "nbindustria init" in err
    done = subprocess.run([sys.executable, "-m", "nbindustria.cli", "--help"],
                          capture_output=True, text=True, check=True)
    for command in ("init", "ls", "show", "timings", "memory", "profile", "gc", "clear",
                    "verify"):
        assert command in done.stdout
