"""Re-running a fully cached pipeline of 10,000 small tasks: nbindustria vs joblib.Memory.

What a user does when nothing changed: run the same cell (or script) again. With nbindustria
that is a fresh ``Pipeline``, 10,000 calls ``step(i)`` recorded, and ``run()``, which finds every
result in the store. With joblib it is 10,000 calls of a ``joblib.Memory``-cached ``step(i)``.

Measured per repetition (all caches filled beforehand, all files in page cache):

* nbindustria, verbose=0: Pipeline() + 10,000 calls recorded + run() (every one a cache hit);
  the record and run phases are shown too.
* nbindustria, verbose=1 writing its ndustria-style line per task into an io.StringIO.
* nbindustria, verbose=0, then ``.result()`` of every handle: loading the values too, which
  is what a joblib cached call does (it returns the value), so the fairest comparison; and the
  same with ``pipe.results(handles)``, which loads them together (what ``%%pipeline run`` does
  for the values a cell binds).
* joblib.Memory: 10,000 cached calls (each hashes its arguments and loads the value).
* A second layer: 5,000 ``step(i)`` and 5,000 ``add(step(i), i)`` (edges: the key of ``add``
  needs its input's result digest); joblib: ``add(step(i), i)`` with both cached.

Between repetitions (untimed) each contender's objects are dropped and the cyclic garbage
collector runs: a pipeline's handles refer to it and it to them, so a repetition would otherwise
leave 10,000 handles for the *next* contender's collector to traverse, a cost that a script (one
pipeline per process) or a notebook (one pipeline per kernel, its handles reused) never pays.

Goal (issue 2): <= 10 µs per task, and >= 7x faster than the joblib cached call.
"""

from __future__ import annotations

import gc
import io
import statistics
import sys
import time
from pathlib import Path

import joblib
from _bench import Contender, Report, interleave, parser, scratch

from nbindustria import Pipeline
from nbindustria.store import wait_closed


def step(i):
    return i * 2


def add(x, i):
    return x + i


class NbiRerun:
    """One pipeline per repetition, over one cache directory filled beforehand."""

    def __init__(self, root: Path, n: int, layers: int):
        self.cache = root / f"nbi-cache-{layers}"
        self.keys = root / "keys"
        self.n = n
        self.layers = layers
        self.pipe: Pipeline | None = None
        self.handles: list = []

    def _calls(self, pipe: Pipeline) -> list:
        t_step = pipe.task(step)
        if self.layers == 1:
            return [t_step(i) for i in range(self.n)]
        t_add = pipe.task(add)
        half = self.n // 2
        firsts = [t_step(i) for i in range(half)]
        return firsts + [t_add(firsts[i], i) for i in range(half)]

    def run(self, verbose: int = 0, load: str = "", expect_cached: bool = True) -> dict:
        """``load``: "" (values not loaded), "each" (``.result()`` of each), "bulk"
        (``pipe.results``)."""
        stream = io.StringIO()
        t0 = time.perf_counter()
        pipe = Pipeline(name="bench", cache_dir=self.cache, key_dir=self.keys,
                        verbose=verbose, stream=stream)
        handles = self._calls(pipe)
        t1 = time.perf_counter()
        summary = pipe.run()
        t2 = time.perf_counter()
        phases = {"record": t1 - t0, "run": t2 - t1}
        if load:
            values = pipe.results(handles) if load == "bulk" else [h.result() for h in handles]
            phases["load"] = time.perf_counter() - t2
            assert values[-1] is not None
        if expect_cached and (summary.ran or summary.cached != len(handles)):
            sys.exit(f"not a fully cached re-run: {summary.line()}")
        if verbose and stream.getvalue().count("[Cache hit!]") != len(handles):
            sys.exit("verbose=1 did not print a line per task")
        self.pipe, self.handles = pipe, handles
        return phases

    def close(self) -> None:
        if self.pipe is not None:
            index = self.pipe.store.index.path
            self.pipe.close()
            # Closing finishes on a thread (hit counts written, the WAL checkpointed), which
            # would otherwise run during the next contender's repetition: a script's next run
            # is a new process, which starts after the last one's exit waited for it.
            wait_closed(index)
        self.pipe, self.handles = None, []
        gc.collect()  # see the module's docstring


class JoblibRerun:
    def __init__(self, root: Path, n: int, layers: int):
        self.location = root / f"joblib-{layers}"
        self.n = n
        self.layers = layers

    def run(self) -> None:
        memory = joblib.Memory(self.location, verbose=0)
        c_step = memory.cache(step)
        if self.layers == 1:
            values = [c_step(i) for i in range(self.n)]
        else:
            c_add = memory.cache(add)
            half = self.n // 2
            values = [c_step(i) for i in range(half)]
            values += [c_add(c_step(i), i) for i in range(half)]
        assert len(values) == self.n

    def check_cached(self) -> None:
        memory = joblib.Memory(self.location, verbose=0)
        c_step, c_add = memory.cache(step), memory.cache(add)
        half = self.n // 2 if self.layers == 2 else self.n
        ok = all(c_step.check_call_in_cache(i) for i in range(half))
        if self.layers == 2:
            ok = ok and all(c_add.check_call_in_cache(step(i), i) for i in range(half))
        if not ok:
            sys.exit("joblib's cache is not filled: the comparison would be wrong")


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=10_000)
    args = p.parse_args()
    if args.quick:
        args.tasks = 100
    n = args.tasks
    report = Report("cached_rerun", f"Re-running a fully cached pipeline of {n:,} tasks", args)
    with scratch("rerun", args.keep, args.scratch_base) as root:
        nbi1, nbi2 = NbiRerun(root, n, 1), NbiRerun(root, n, 2)
        job1, job2 = JoblibRerun(root, n, 1), JoblibRerun(root, n, 2)
        for nbi in (nbi1, nbi2):  # fill the caches
            nbi.run(expect_cached=False)
            nbi.close()
        job1.run()
        job2.run()
        job1.check_cached()
        job2.check_cached()

        c_nbi = Contender("nbindustria, verbose=0", lambda: nbi1.run(), teardown=nbi1.close)
        c_verbose = Contender("nbindustria, verbose=1 (to StringIO)",
                              lambda: nbi1.run(verbose=1), teardown=nbi1.close)
        c_load = Contender("nbindustria, verbose=0, + .result() of each",
                           lambda: nbi1.run(load="each"), teardown=nbi1.close)
        c_bulk = Contender("nbindustria, verbose=0, + results() of all",
                           lambda: nbi1.run(load="bulk"), teardown=nbi1.close)
        c_job = Contender("joblib.Memory cached calls", job1.run, teardown=gc.collect)
        c_nbi2 = Contender("2 layers: nbindustria, verbose=0", lambda: nbi2.run(),
                           teardown=nbi2.close)
        c_job2 = Contender("2 layers: joblib.Memory cached calls", job2.run,
                           teardown=gc.collect)
        contenders = [c_nbi, c_verbose, c_load, c_bulk, c_job, c_nbi2, c_job2]
        interleave(contenders, args.repeat)

    per = 1e6 / n
    for c in contenders:
        report.contender_row(c, "µs/task", c.median * per)
        for phase in c.phases:
            report.row(f"  {phase} phase", c.phase(phase), "µs/task", c.phase(phase) * per)
    us = c_nbi.median * per
    report.ratio("nbindustria time per cached task", us, 10.0, unit=" µs", at_most=True)
    report.ratio("nbindustria (verbose=0) vs joblib cached call, speed-up",
                 c_job.median / c_nbi.median, 7.0)
    cpu_nbi, cpu_job = statistics.median(c_nbi.cpu), statistics.median(c_job.cpu)
    report.ratio("same, by CPU time of the process (less sensitive to busy neighbours)",
                 cpu_job / cpu_nbi, None, headline=False)
    report.ratio("nbindustria (verbose=1 to StringIO) vs joblib, speed-up",
                 c_job.median / c_verbose.median, 7.0, headline=False)
    report.ratio("nbindustria with every value loaded vs joblib, speed-up",
                 c_job.median / c_load.median, None, headline=False)
    report.ratio("nbindustria with every value loaded by results() vs joblib, speed-up",
                 c_job.median / c_bulk.median, None, headline=False)
    report.ratio("2 layers: nbindustria vs joblib, speed-up",
                 c_job2.median / c_nbi2.median, 7.0, headline=False)
    report.note(f"nbindustria: {us:.1f} µs per task; joblib: {c_job.median * per:.1f} µs per "
                "call (joblib's figure includes loading the value; see the '+ .result()' row)")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
