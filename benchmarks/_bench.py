"""Shared helpers of the benchmarks (not a benchmark itself).

Every benchmark runs nbindustria and the tool a user would otherwise pick side by side in one
process, interleaving the contenders repetition by repetition (in a rotating order) so that a
noisy neighbour hurts them alike, and reports medians and the ratio of medians. Everything is
written under a fresh directory in /tmp; the NBINDUSTRIA_* variables point there too, so that
neither the user's cache, nor their signing keys, nor their config file is ever touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmark this checkout, not whatever is installed
    sys.path.insert(0, str(ROOT))

_ENV = ("NBINDUSTRIA_CACHE_DIR", "NBINDUSTRIA_KEY_DIR", "NBINDUSTRIA_CONFIG",
        "NBINDUSTRIA_ENGINES")


class _Parser(argparse.ArgumentParser):
    """``--repeat`` defaults to the benchmark's own count, or to 1 with ``--quick``."""

    default_repeat = 5

    def parse_args(self, *a: Any, **k: Any) -> Any:  # type: ignore[override]
        args = super().parse_args(*a, **k)
        if args.repeat is None:
            args.repeat = 1 if args.quick else self.default_repeat
        return args


def parser(description: str, repeat: int = 5) -> argparse.ArgumentParser:
    p = _Parser(description=description)
    p.default_repeat = repeat
    p.add_argument("--repeat", type=int, default=None,
                   help=f"timed repetitions of each measure; medians are reported "
                        f"(default {repeat}; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, one repetition: a smoke run (numbers mean nothing)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--scratch-base", default="/tmp", metavar="DIR",
                   help="where the temporary directory is made (default /tmp; e.g. /dev/shm "
                        "takes the disk out of the measure, for diagnosis only)")
    return p


@contextlib.contextmanager
def scratch(name: str, keep: bool = False, base: str = "/tmp") -> Iterator[Path]:
    """A private temporary directory (0700) under /tmp (or ``base``), with the NBINDUSTRIA_*
    settings pointing inside it for as long as it is in use."""
    path = Path(tempfile.mkdtemp(prefix=f"nbi-bench-{name}-", dir=base))
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ["NBINDUSTRIA_CACHE_DIR"] = str(path / "default-cache")
    os.environ["NBINDUSTRIA_KEY_DIR"] = str(path / "keys")
    os.environ["NBINDUSTRIA_CONFIG"] = str(path / "no-config.json")
    os.environ.pop("NBINDUSTRIA_ENGINES", None)
    try:
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if keep:
            print(f"(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Contender:
    """One thing to time. ``setup`` and ``teardown`` run around each timed call, untimed;
    ``run`` may return a dict of extra seconds it measured itself (e.g. phases)."""

    name: str
    run: Callable[[], Any]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process
    phases: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def phase(self, name: str) -> float:
        return statistics.median(self.phases[name])


def interleave(contenders: list[Contender], repeat: int, warmup: bool = True) -> None:
    """Time every contender ``repeat`` times, one repetition of each in turn (the order
    rotates), after one untimed warm-up call of each if ``warmup``."""
    if warmup:
        for c in contenders:
            if c.setup:
                c.setup()
            c.run()
            if c.teardown:
                c.teardown()
    for r in range(repeat):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            if c.setup:
                c.setup()
            c0 = time.process_time()
            t0 = time.perf_counter()
            extra = c.run()
            c.times.append(time.perf_counter() - t0)
            c.cpu.append(time.process_time() - c0)
            if isinstance(extra, dict):
                for name, seconds in extra.items():
                    c.phases.setdefault(name, []).append(seconds)
            if c.teardown:
                c.teardown()


class NullStream:
    """A text stream that drops what is written (for pipelines' summary lines)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                     enumerate(zip(headers, widths, strict=True)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                             enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


class Report:
    """Collects a benchmark's rows and ratios; prints them and writes them as JSON."""

    def __init__(self, name: str, title: str, args: argparse.Namespace):
        self.name = name
        self.title = title
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.ratios: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.started = time.time()
        self.machine = machine_info()
        print(f"== {title}")
        print(f"   {self.machine['summary']}")
        if args.quick:
            print("   --quick: smoke-run sizes; these numbers mean nothing")
        print(f"   medians of {args.repeat} interleaved repetition(s)")
        sys.stdout.flush()

    def row(self, measure: str, seconds: float, metric: str, value: float, *,
            spread: tuple[float, float] | None = None, cpu: float | None = None,
            note: str = "") -> None:
        self.rows.append({"measure": measure, "seconds": seconds, "metric": metric,
                          "value": value, "min": spread[0] if spread else None,
                          "max": spread[1] if spread else None, "cpu": cpu, "note": note})

    def contender_row(self, c: Contender, metric: str, value: float, note: str = "") -> None:
        self.row(c.name, c.median, metric, value, spread=(min(c.times), max(c.times)),
                 cpu=statistics.median(c.cpu) if c.cpu else None, note=note)

    def ratio(self, text: str, value: float, goal: float | None, *, unit: str = "x",
              at_most: bool = False, headline: bool = True) -> None:
        """A goal line: ``value >= goal`` (or ``<=`` with ``at_most``); goal None: context.
        ``headline`` marks the lines the issue's goals are judged by."""
        met = None if goal is None else (value <= goal if at_most else value >= goal)
        self.ratios.append({"text": text, "value": value, "goal": goal, "unit": unit,
                            "at_most": at_most, "met": met, "headline": headline})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def print(self) -> None:
        print()
        rows = []
        for r in self.rows:
            spread = (f"{fmt_time(r['min'])} .. {fmt_time(r['max'])}"
                      if r["min"] is not None else "")
            cpu = fmt_time(r["cpu"]) if r.get("cpu") is not None else ""
            rows.append([r["measure"], fmt_time(r["seconds"]), spread, cpu,
                         f"{r['value']:,.{_digits(r['value'])}f} {r['metric']}"])
        print(table(["measure", "median", "min .. max", "cpu", "rate"], rows))
        print("(median, min and max: wall time; cpu: median CPU time of this process; "
              "rate: from the median wall time)")
        print()
        for q in self.ratios:
            print("ratio: " + ratio_text(q))
        for n in self.notes:
            print(f"note: {n}")
        sys.stdout.flush()
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.as_dict(), indent=2))

    def as_dict(self) -> dict[str, Any]:
        return {"benchmark": self.name, "title": self.title, "quick": self.args.quick,
                "repeat": self.args.repeat, "started": self.started,
                "seconds": time.time() - self.started, "machine": self.machine,
                "rows": self.rows, "ratios": self.ratios, "notes": self.notes}


def ratio_text(q: dict[str, Any]) -> str:
    value = f"{q['value']:.{_digits(q['value'])}f}{q['unit']}"
    if q["goal"] is None:
        return f"{q['text']}: {value} (context, no goal)"
    verdict = "MET" if q["met"] else "NOT MET"
    sign = "<=" if q.get("at_most") else ">="
    return f"{q['text']}: {value} (goal {sign} {q['goal']:g}{q['unit']}): {verdict}"


def _digits(v: float) -> int:
    v = abs(v)
    return 0 if v >= 100 else 1 if v >= 10 else 2 if v >= 0.1 else 3


def machine_info() -> dict[str, Any]:
    import numpy

    versions = {"python": platform.python_version(), "numpy": numpy.__version__}
    for mod in ("xxhash", "joblib"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", getattr(m, "VERSION", "?"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpus = os.cpu_count()
    commit = git_commit()
    summary = (f"{platform.node()}: {cpus} cpus, load {load:.2f}, "
               + ", ".join(f"{k} {v}" for k, v in versions.items())
               + f"; nbindustria at {commit}")
    return {"cpus": cpus, "load": load, "versions": versions, "commit": commit,
            "summary": summary}


def git_commit() -> str:
    """The checkout's commit, with "+changes" when the package has uncommitted edits."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "nbindustria"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+changes" if dirty else "")
