"""What the live dashboard costs a run: the same 10,000-task pipeline with the dashboard
following it, and without, side by side.

The dashboard here is the real one (``Dashboard(pipe.events, start="next")``, made just before
the run, as ``%%pipeline run`` does): its threads pull the event log, fold the new events into
the panels, push what changed into the widgets' traits and make the plotly charts, as in a
notebook. Without a browser attached nothing is drawn, so this measures the kernel's side of
the cost, which is the part that competes with the run. The timed span covers making the
dashboard, the run and the dashboard's last refresh (the user waits for all three).

Made trustworthy on a shared, noisy 2-core machine:

- on and off alternate, repetition by repetition (the order flips), after an untimed pair;
- the caches live on tmpfs (``/dev/shm``): ext4 slows down after 10,000 files are deleted
  (a 5.5 s run next to 13 s ones), which would drown a 5% effect;
- wall time AND the process's CPU time (every thread: the dashboard's included) are reported,
  as medians, with the ratio of medians and the median of the on/off ratios of each pair.

``--engines N`` runs the tasks on N local ipyparallel engines instead of in the kernel: there
the kernel mostly waits for results, as in a notebook, and the dashboard's thread works in
those waits.

Goal (issue 5): the dashboard adds at most 5% to the wall time of a 10,000-task run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import Contender, NullStream, Report, interleave, parser, scratch

from nbindustria import Pipeline
from nbindustria.store import wait_closed


def tiny(i: int) -> int:
    return i + 1


def main() -> int:
    p = parser(__doc__.splitlines()[0], repeat=7)
    p.set_defaults(scratch_base="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    p.add_argument("--engines", type=int, default=0,
                   help="run the tasks on this many local engines (default: in the kernel)")
    p.add_argument("--tasks", type=int, default=None, help="tasks per run (default 10,000)")
    args = p.parse_args()
    n = args.tasks or (300 if args.quick else 10_000)
    where = f"on {args.engines} local engines" if args.engines else "in the kernel"
    report = Report("dashboard", f"Dashboard cost: a run of {n:,} tiny tasks {where}, "
                    f"dashboard on vs off (caches in {args.scratch_base})", args)
    engines = None
    if args.engines:
        from nbindustria import cluster

        engines = cluster.start_local(args.engines)
    load_before = os.getloadavg()
    with scratch("dashboard", args.keep, args.scratch_base) as base:
        runs = {"count": 0}
        pipes: dict[bool, Any] = {}
        own: list[float] = []  # the dashboard's own CPU seconds in each run (Dashboard.cpu_seconds)

        def setup(with_dashboard: bool) -> None:
            runs["count"] += 1
            pipe = Pipeline(name="dash-bench", cache_dir=base / f"cache-{runs['count']}",
                            key_dir=base / "keys", verbose=0, stream=NullStream())  # type: ignore[arg-type]
            if engines is not None:
                from nbindustria.dispatch import EngineExecutor

                pipe._executor = EngineExecutor(engines)
            task = pipe.task(tiny)
            for i in range(n):
                task(i)
            pipes[with_dashboard] = pipe

        def run(with_dashboard: bool) -> None:
            pipe = pipes[with_dashboard]
            board = None
            if with_dashboard:
                from nbindustria.dashboard import Dashboard

                board = Dashboard(pipe.events, start="next")
            pipe.run()
            if board is not None:
                board.refresh()  # the last refresh is part of the run's cost, as in a notebook
                board.close()
                own.append(board.cpu_seconds)

        def teardown(with_dashboard: bool) -> None:
            pipe = pipes.pop(with_dashboard)
            pipe.close()
            # Its index finishes closing on a thread (the WAL checkpointed), which would
            # otherwise run during the next repetition, on or off at random.
            wait_closed(pipe.store.index.path)
            shutil.rmtree(pipe.store.path, ignore_errors=True)

        off = Contender("dashboard off", lambda: run(False), lambda: setup(False),
                        lambda: teardown(False))
        on = Contender("dashboard on", lambda: run(True), lambda: setup(True),
                       lambda: teardown(True))
        # The warm-up pair also imports plotly and the widget modules once (a notebook pays
        # that once per session too).
        try:
            interleave([off, on], args.repeat)
        finally:
            if engines is not None:
                engines.stop()
    load_after = os.getloadavg()
    for c in (off, on):
        report.contender_row(c, "tasks/s", n / c.median)
    wall_ratio = on.median / off.median
    cpu_ratio = statistics.median(on.cpu) / statistics.median(off.cpu)
    pairs = [a / b for a, b in zip(on.times, off.times, strict=True)]
    cpu_pairs = [a / b for a, b in zip(on.cpu, off.cpu, strict=True)]
    report.ratio("wall time on / off (medians)", wall_ratio, 1.05, at_most=True)
    report.ratio("CPU time on / off (medians)", cpu_ratio, 1.05, at_most=True)
    own = own[-args.repeat:]  # not the warm-up's
    share = statistics.median(own) / statistics.median(off.cpu)
    report.ratio("wall time on / off (median of the pairs)", statistics.median(pairs), None)
    report.ratio("the dashboard's own CPU time / CPU time of the run without it", share, None,
                 unit="")
    report.ratio("CPU time on / off (median of the pairs)", statistics.median(cpu_pairs), None)
    report.note(f"wall, off: {[round(t, 2) for t in off.times]}")
    report.note(f"wall, on:  {[round(t, 2) for t in on.times]}")
    report.note(f"cpu, off:  {[round(t, 2) for t in off.cpu]}")
    report.note(f"cpu, on:   {[round(t, 2) for t in on.cpu]}")
    report.note(f"the dashboard's own CPU (its threads and calls): {[round(t, 3) for t in own]}")
    report.note(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}"
                f"; after {', '.join(f'{x:.2f}' for x in load_after)}; "
                f"{time.strftime('%Y-%m-%d %H:%M')}")
    report.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
