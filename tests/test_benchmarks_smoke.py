"""The benchmarks still run: each one with --quick (tiny sizes) in its own interpreter.

Speed goals are checked by the benchmarks themselves (benchmarks/RESULTS.md), never here: these
tests only keep the scripts from rotting when the package changes, so they assert that each
script exits 0 and prints its table and its ratio lines, and nothing about the numbers. The
scripts start together (most of their time is waiting for imports and fsync), so the
whole module takes about as long as the slowest one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("joblib")  # the benchmarks compare with it (the "bench" extra)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NAMES = ["cached_rerun", "hash_array", "load_array", "write_entries", "dashboard"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, str, Path]]]:
    """Start every benchmark with --quick at once; {name: (exit code, output, json path)}."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = {}
    for name in NAMES:
        out = tmp / f"{name}.json"
        procs[name] = (subprocess.Popen(
            [sys.executable, str(BENCHMARKS / f"bench_{name}.py"), "--quick", "--json",
             str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
            env=env), out)
    results = {}
    try:
        for name, (proc, out) in procs.items():
            output, _ = proc.communicate(timeout=120)
            results[name] = (proc.returncode, output, out)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    yield results


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_runs_quick(name: str, runs: dict[str, tuple[int, str, Path]]) -> None:
    code, output, out = runs[name]
    assert code == 0, output
    ratio_lines = [line for line in output.splitlines() if line.startswith("ratio: ")]
    assert ratio_lines, output
    assert all(("MET" in line or "context" in line) for line in ratio_lines), ratio_lines
    assert "median" in output  # the table's header
    data = json.loads(out.read_text())
    assert data["rows"] and data["ratios"]
    assert any(q["headline"] and q["goal"] is not None for q in data["ratios"])
    assert "(kept " not in output  # each script removes its scratch directory in /tmp


def test_instruction_counts_of_a_cached_rerun(tmp_path: Path) -> None:
    """The deterministic measure (valgrind) still runs and counts a cached re-run's work (with
    --quick, only its first measure: each takes two interpreters under valgrind)."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "profile_hot_paths.py"), "instructions", "--quick"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("A fully cached re-run of 300 tasks"), proc.stdout
    count, what = lines[1].split(maxsplit=1)
    assert what == "record + run" and int(count.replace(",", "")) > 1000, proc.stdout


# ---- the engine benchmarks (issue 4) -------------------------------------------------------------
# They start ipyparallel clusters (and Dask for two of them), so they are marked engines and slow;
# the five start together, each with --quick, and must leave no engine process behind.

ENGINE_NAMES = ["engines_throughput", "makespan", "speedup", "kernel_memory", "first_task"]


def _processes_in(directory: Path) -> list[str]:
    """Processes still running whose working directory is ``directory`` (or below): the
    scripts run there, and so do what they start (clusters, Dask, fresh interpreters)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cwd = proc.cwd()
        except (psutil.Error, OSError):
            continue
        if cwd == str(directory) or cwd.startswith(f"{directory}{os.sep}"):
            found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])}")
    return found


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[dict[str, tuple[int, str, Path, Path]]]:
    """Start the engine benchmarks with --quick at once; {name: (code, output, json, dir)}."""
    pytest.importorskip("ipyparallel")
    pytest.importorskip("distributed")
    tmp = tmp_path_factory.mktemp("engine-benchmarks")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = {}
    for name in ENGINE_NAMES:
        out = tmp / f"{name}.json"
        procs[name] = (subprocess.Popen(
            [sys.executable, str(BENCHMARKS / f"bench_{name}.py"), "--quick", "--json",
             str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
            env=env), out)
    results = {}
    try:
        for name, (proc, out) in procs.items():
            output, _ = proc.communicate(timeout=600)
            results[name] = (proc.returncode, output, out, tmp)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    yield results


@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_benchmark_runs_quick(name: str,
                                     engine_runs: dict[str, tuple[int, str, Path, Path]]) -> None:
    code, output, out, _dir = engine_runs[name]
    assert code == 0, output
    ratio_lines = [line for line in output.splitlines() if line.startswith("ratio: ")]
    assert ratio_lines, output
    assert all(("MET" in line or "context" in line) for line in ratio_lines), ratio_lines
    assert "median" in output
    data = json.loads(out.read_text())
    assert data["rows"] and data["ratios"]
    assert any(q["headline"] and q["goal"] is not None for q in data["ratios"])
    assert "(kept " not in output


@pytest.mark.engines
@pytest.mark.slow
def test_engine_benchmarks_stop_their_clusters(
        engine_runs: dict[str, tuple[int, str, Path, Path]]) -> None:
    import time

    directory = next(iter(engine_runs.values()))[3]
    deadline = time.monotonic() + 10  # processes told to stop may take a moment to go
    while (left := _processes_in(directory)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
