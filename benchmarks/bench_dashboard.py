"""What the live dashboard costs a run: the same 10,000-task pipeline with the dashboard
following it, and without, side by side (interleaved repetitions, medians, ratio).

The dashboard here is the real one (``Dashboard(pipe.events, start="next")``): its thread pulls
the event log, recomputes the panels and pushes the changes into the widgets' traits, as in a
notebook. Without a browser attached nothing is drawn, so this measures the kernel's side of
the cost, which is the part that competes with the run.

Goal (issue 5): the dashboard adds at most 5% to the wall time of a 10,000-task run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbindustria import Pipeline


def tiny(i: int) -> int:
    return i + 1


def one_run(base: Path, n: int, with_dashboard: bool, rep: int) -> float:
    cache = base / f"cache-{with_dashboard}-{rep}"
    pipe = Pipeline(name="dash-bench", cache_dir=cache, key_dir=base / "keys", verbose=0)
    task = pipe.task(tiny)
    for i in range(n):
        task(i)
    board = None
    if with_dashboard:
        from nbindustria.dashboard import Dashboard

        board = Dashboard(pipe.events, start="next")
    t0 = time.perf_counter()
    pipe.run()
    if board is not None:
        board.refresh()  # the final sync is part of the run's cost
    elapsed = time.perf_counter() - t0
    if board is not None:
        board.close()
    pipe.close()
    shutil.rmtree(cache, ignore_errors=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="300 tasks, one repetition")
    args = parser.parse_args()
    n = 300 if args.quick else 10_000
    repeat = args.repeat or (1 if args.quick else 3)
    base = Path(tempfile.mkdtemp(prefix="nbi-bench-dash-"))
    os.environ["NBINDUSTRIA_KEY_DIR"] = str(base / "keys")
    try:
        # Warm-up: plotly and the widget modules import once (a notebook pays it once too).
        one_run(base, 50, True, -1)
        off: list[float] = []
        on: list[float] = []
        for rep in range(repeat):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for with_dashboard in order:
                (on if with_dashboard else off).append(one_run(base, n, with_dashboard, rep))
        m_off, m_on = statistics.median(off), statistics.median(on)
        print(f"{n} tasks, {repeat} repetitions each (median wall time of the run)")
        print(f"  dashboard off: {m_off:8.2f} s   ({[round(x, 2) for x in off]})")
        print(f"  dashboard on:  {m_on:8.2f} s   ({[round(x, 2) for x in on]})")
        overhead = m_on / m_off - 1
        verdict = "met" if overhead <= 0.05 else "NOT MET"
        print(f"ratio: dashboard on / off: {m_on / m_off:.3f} "
              f"(overhead {overhead * 100:+.1f}%, goal <= +5%): {verdict}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
