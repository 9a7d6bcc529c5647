"""No-op task throughput on 2 local engines: nbindustria vs ipyparallel vs Dask distributed.

What a user does to run N tiny independent tasks on two local engines:

* nbindustria (caching on): a fresh ``Pipeline`` over an empty cache, N calls ``noop(i)``
  recorded, ``run()`` (every call a miss: each result is stored, signed and committed durably).
  Timed from creating the pipeline to ``run()`` returning; the record and run phases too.
* raw ipyparallel: ``LoadBalancedView.apply_async(noop, i)`` N times, then every result
  (``ar.get()``), on the same two engines (nothing stored).
* Dask distributed: ``LocalCluster(n_workers=2, threads_per_worker=1)``,
  ``client.map(noop, range(N), pure=False)`` then ``client.gather`` (nothing stored). Dask runs
  in a process of its own (started once, told what to run), so that its client's threads do not
  compete with the others for this process's GIL, as they would not for a user.

The contenders alternate repetition by repetition. Goal (issue 4): nbindustria >= 10x the
ipyparallel rate and >= 5x the Dask rate.

``--phases`` also times the kernel's main phases in one extra nbindustria run (wrappers with
perf_counter around the scheduler's, the store's and the executor's methods): where each
task's microseconds go in the kernel.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _bench import Contender, NullStream, Report, interleave, parser, scratch

from nbindustria import Pipeline
from nbindustria import cluster as cluster_mod
from nbindustria.dispatch import EngineExecutor


def noop(i):
    return i


class NbiFresh:
    """One pipeline per repetition over a fresh, empty cache directory."""

    def __init__(self, root: Path, engines: cluster_mod.Engines, n: int):
        self.root = root
        self.engines = engines
        self.n = n
        self.count = 0
        self.cache: Path | None = None

    def setup(self) -> None:
        self.count += 1
        self.cache = self.root / f"nbi-{self.count}"

    def run(self) -> dict:
        assert self.cache is not None
        t0 = time.perf_counter()
        pipe = Pipeline(name="bench", cache_dir=self.cache, key_dir=self.root / "keys",
                        verbose=0, stream=NullStream())
        pipe._executor = EngineExecutor(self.engines)
        t_noop = pipe.task(noop)
        for i in range(self.n):
            t_noop(i)
        t1 = time.perf_counter()
        summary = pipe.run()
        t2 = time.perf_counter()
        pipe.close()
        if summary.ran != self.n:
            sys.exit(f"expected {self.n} tasks to run: {summary.line()}")
        return {"record": t1 - t0, "run": t2 - t1}

    def teardown(self) -> None:
        if self.cache is not None:
            shutil.rmtree(self.cache, ignore_errors=True)


def ipyparallel_lb(engines: cluster_mod.Engines, n: int) -> None:
    view = engines.client.load_balanced_view()
    results = [view.apply_async(noop, i) for i in range(n)]
    values = [ar.get() for ar in results]
    assert values[-1] == n - 1


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


class DaskProcess:
    """A Dask ``LocalCluster(n_workers, threads_per_worker=1)`` and its client in a process of
    their own; ``run(workload, arg)`` runs one workload there and returns its seconds."""

    def __init__(self, root: Path, n_workers: int = 2):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--dask-child", str(root / "dask"),
             str(n_workers)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # "ready"

    def _read(self) -> Any:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise SystemExit(f"the Dask process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self, workload: str, arg: Any) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([workload, arg]) + "\n")
        self.proc.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            import psutil

            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
            self.proc.wait()


def dask_child(directory: str, n_workers: int) -> None:
    """The Dask process: one JSON request per line in, its seconds out."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, local_directory=directory,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.wait_for_workers(n_workers, timeout=120)
        print(json.dumps("ready"), flush=True)
        for line in sys.stdin:
            workload, arg = json.loads(line)
            t0 = time.perf_counter()
            if workload == "map":  # arg: how many no-op tasks
                values = client.gather(client.map(noop, range(arg), pure=False))
                assert values[-1] == arg - 1
            elif workload == "sleeps":  # arg: durations, submitted in this order
                client.gather([client.submit(sleep_for, d, pure=False) for d in arg])
            else:
                raise SystemExit(f"unknown workload {workload!r}")
            print(json.dumps(time.perf_counter() - t0), flush=True)


# ---- --phases: where the kernel's time goes ------------------------------------------------------

PHASES = {
    "nbindustria.scheduler.Run": ["_resolve", "_enqueue", "_reason", "_dispatch", "_submit",
                                  "_job_for", "_handle", "_commit", "_emit", "_finish"],
    "nbindustria.scheduler": ["_param_summaries"],
    "nbindustria.store.Store": ["commit", "_sign"],
    "nbindustria.store.Index": ["put"],
    "nbindustria.store": ["_syncfs"],
    "nbindustria.dispatch.EngineExecutor": ["store_dir_for_jobs", "free_slot_for", "submit",
                                            "_send", "finished"],
}


@contextlib.contextmanager
def phase_timers(phases: dict[str, list[str]] | None = None,
                 ) -> Iterator[tuple[dict[str, float], collections.Counter]]:
    """Wrap the functions in ``phases`` (default PHASES: {"module.Class" or "module": [names]})
    with timers for as long as the context lasts (inclusive times: a phase's time includes the
    phases it calls)."""
    import importlib

    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    saved: list[tuple[Any, str, Any]] = []

    def timed(label: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return func(*a, **k)
            finally:
                seconds[label] += time.perf_counter() - t
                calls[label] += 1
        return wrapper

    for where, names in (PHASES if phases is None else phases).items():
        module, _, cls = where.rpartition(".")
        try:
            owner = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            owner = importlib.import_module(where)
        for name in names:
            func = owner.__dict__.get(name)
            if func is None:
                continue
            saved.append((owner, name, func))
            setattr(owner, name, timed(f"{owner.__name__}.{name}", func))
    try:
        yield seconds, calls
    finally:
        for owner, name, func in saved:
            setattr(owner, name, func)


def print_phases(nbi: NbiFresh) -> None:
    nbi.setup()
    with phase_timers() as (seconds, calls):
        t0 = time.perf_counter()
        phases = nbi.run()
        wall = time.perf_counter() - t0
    nbi.teardown()
    n = nbi.n
    print(f"\nphases of one nbindustria run of {n:,} tasks ({n / wall:,.0f} tasks/s with the "
          f"timers on; record {phases['record'] / n * 1e6:.0f} µs/task, run "
          f"{phases['run'] / n * 1e6:.0f} µs/task), inclusive kernel time per task:")
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {label:38s} {s / n * 1e6:8.1f} µs/task  ({calls[label]:,} calls, "
              f"{s / calls[label] * 1e3:.2f} ms/call)")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--dask-child":
        dask_child(sys.argv[2], int(sys.argv[3]))
        return 0
    p = parser(__doc__.splitlines()[0], repeat=5)
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--phases", action="store_true",
                   help="also time the kernel's phases in one extra nbindustria run")
    args = p.parse_args()
    if args.quick:
        args.tasks = 100
    n = args.tasks
    report = Report("engines_throughput", f"No-op task throughput on 2 engines, {n:,} tasks",
                    args)
    with scratch("throughput", args.keep, args.scratch_base) as root:
        engines = dask = None
        try:
            engines = cluster_mod.start_local(2)
            dask = DaskProcess(root)
            nbi = NbiFresh(root, engines, n)
            c_nbi = Contender("nbindustria (first run, all misses, stored)", nbi.run,
                              setup=nbi.setup, teardown=nbi.teardown)
            c_ipp = Contender("ipyparallel LoadBalancedView.apply_async",
                              lambda: ipyparallel_lb(engines, n))
            c_dask = Contender("Dask LocalCluster client.map", lambda: dask.run("map", n))
            contenders = [c_nbi, c_ipp, c_dask]
            interleave(contenders, args.repeat)
            dask.close()
            dask = None
            if args.phases:
                print_phases(NbiFresh(root, engines, n))
        finally:
            if dask is not None:
                dask.close()
            if engines is not None:
                engines.stop()

    for c in contenders:
        report.contender_row(c, "tasks/s", n / c.median)
    report.row("  nbindustria: record the calls", c_nbi.phase("record"), "µs/task",
               c_nbi.phase("record") / n * 1e6)
    report.row("  nbindustria: run()", c_nbi.phase("run"), "tasks/s", n / c_nbi.phase("run"))
    report.ratio("nbindustria / ipyparallel rate", c_ipp.median / c_nbi.median, 10)
    report.ratio("nbindustria / Dask rate", c_dask.median / c_nbi.median, 5)
    report.ratio("nbindustria run() alone / ipyparallel rate", c_ipp.median / c_nbi.phase("run"),
                 None)
    report.note("nbindustria stores every result (written on the engine, signed and made "
                "durable by the kernel); ipyparallel and Dask keep them in memory")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
