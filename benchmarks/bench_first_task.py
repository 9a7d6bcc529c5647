"""Time from ``run()`` to the first task running: engines started in the background vs cold.

Each measure is a fresh Python process (a fresh kernel: nothing imported or started before),
so that one-time costs are counted as a user meets them:

* nbindustria in IPython, engines started at load: the notebook path itself. An IPython shell
  (``InteractiveShell``) with ``NBINDUSTRIA_ENGINES=2`` runs ``%load_ext nbindustria`` (which
  starts the engines in the background), waits until they are up, defines a task, and runs
  a ``%%pipeline run`` cell that calls it; timed from the moment the cell is run;
* nbindustria, engines started at load: ``cluster.start_in_background(2)`` (what
  ``NBINDUSTRIA_ENGINES=2`` does when the extension loads), wait until it is up, then a
  ``Pipeline(engines=2)`` with one call recorded and ``run()``;
* nbindustria, cold: the same without the background start (``run()`` starts the cluster);
* raw ipyparallel, cold (context): ``ipyparallel.Cluster(n=2)``, start it, connect, wait for
  the engines, run one task.

Measured from the moment ``run()`` is called: the task's RUNNING event (the kernel sent it) and
the moment its body started on the engine (the DONE event's ``started``: same host, same
clock); and the whole ``run()`` (the whole cell for ``%%pipeline run``). Goal (issue 4): <= 1.5 s
from ``%%pipeline run`` to the first task running with the engines started at load (a cold
ipyparallel cluster takes about 6.6 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from _bench import Contender, NullStream, Report, interleave, parser, scratch

CHILD_TIMEOUT = 240.0

# Timed in each nbindustria measure (inclusive times, in the fresh process), to show where the
# time to the first task goes.
PHASES = {
    "nbindustria.cluster": ["shared_local"],
    "nbindustria.cluster.Engines": ["info", "check_shared_dir"],
    "nbindustria.dispatch.EngineExecutor": ["__init__", "store_dir_for_jobs", "submit"],
    "nbindustria.pipeline.Pipeline": ["_make_executor"],
    "nbindustria.scheduler.Run": ["_priorities_for", "_resolve", "_dispatch"],
}


def first(i):
    return i


def child(mode: str, root: str) -> None:
    """One measure, in this (fresh) process; prints one JSON line."""
    t_start = time.time()
    if mode == "ipp-cold":
        import ipyparallel

        t0 = time.time()
        cluster = ipyparallel.Cluster(n=2, cluster_id=f"bench-{os.getpid()}", log_level=40)
        client = cluster.start_and_connect_sync()
        try:
            client.wait_for_engines(2, timeout=120)
            started = client[client.ids[0]].apply_sync(time.time)
            end = time.time()
        finally:
            client.close()
            cluster.stop_cluster_sync()
        print(json.dumps({"running": started - t0, "started": started - t0, "run": end - t0}))
        return

    if mode == "magic-warm":
        magic_child(root)
        return
    from bench_engines_throughput import phase_timers

    from nbindustria import Pipeline
    from nbindustria import cluster as cluster_mod
    from nbindustria.events import DONE, RUNNING

    timers = phase_timers(PHASES)
    seconds, _calls = timers.__enter__()
    try:
        if mode == "nbi-warm":
            cluster_mod.start_in_background(2).result(timeout=180)
        t_ready = time.time()
        pipe = Pipeline(name="bench", cache_dir=os.path.join(root, f"cache-{os.getpid()}"),
                        key_dir=os.path.join(root, "keys"), engines=2, verbose=0,
                        stream=NullStream())
        pipe.task(first)(0)
        t0 = time.time()
        summary = pipe.run()
        end = time.time()
        if summary.ran != 1:
            raise SystemExit(f"expected one task to run: {summary.line()}")
        events = pipe.events.since(0)
        running = next(e.time for e in events if e.kind == RUNNING)
        done = next(e for e in events if e.kind == DONE)
        pipe.close()
    finally:
        timers.__exit__(None, None, None)
        cluster_mod.stop_shared()
    print(json.dumps({"running": running - t0, "started": (done.started or 0.0) - t0,
                      "run": end - t0, "prepare": t_ready - t_start,
                      **{f"phase {k}": v for k, v in seconds.items()}}))


def magic_child(root: str) -> None:
    """``%%pipeline run`` in an IPython shell whose extension started the engines at load."""
    os.environ["NBINDUSTRIA_ENGINES"] = "2"
    os.environ["NBINDUSTRIA_CACHE_DIR"] = os.path.join(root, f"cache-{os.getpid()}")
    os.environ["NBINDUSTRIA_DASHBOARD"] = "0"
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "nbindustria")
        from nbindustria import cluster as cluster_mod
        from nbindustria import magics
        from nbindustria.events import DONE, RUNNING

        cluster_mod.start_in_background(2).result(timeout=180)  # the start under way at load
        shell.run_cell("from nbindustria import task\n@task\ndef first(i):\n    return i\n")
        session = magics.session()
        assert session is not None
        session.pipe.reporter.verbose = 0
        t0 = time.time()
        result = shell.run_cell("%%pipeline run\nx = first(0)\n")
        end = time.time()
        if not result.success or shell.user_ns.get("x") != 0:
            raise SystemExit(f"the %%pipeline run cell failed: {result.error_in_exec}")
        events = session.pipe.events.since(0)
        running = next(e.time for e in events if e.kind == RUNNING)
        done = next(e for e in events if e.kind == DONE)
    finally:
        from nbindustria import cluster as cluster_mod

        cluster_mod.stop_shared()
    print(json.dumps({"running": running - t0, "started": (done.started or 0.0) - t0,
                      "run": end - t0}))


def run_child(mode: str, root: str) -> dict:
    import psutil

    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", mode, root],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        # Stop what that child started (its engines and controller), then the child.
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.communicate()
        raise SystemExit(f"{mode}: no answer within {CHILD_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return 0
    p = parser(__doc__.splitlines()[0], repeat=5)
    args = p.parse_args()
    report = Report("first_task", "Time from run() to the first task running, on 2 local "
                    "engines (each measure in a fresh process)", args)
    with scratch("first-task", args.keep, args.scratch_base) as root:
        contenders = []
        for mode, name in (("magic-warm", "%%pipeline run, engines started at load"),
                           ("nbi-warm", "nbindustria, engines started at load"),
                           ("nbi-cold", "nbindustria, cold (run() starts the engines)"),
                           ("ipp-cold", "raw ipyparallel, cold cluster")):
            def measure(mode: str = mode) -> dict:
                return run_child(mode, str(root))
            contenders.append(Contender(name, measure))
        # Each measure is a fresh process: no warm-up needed (and none would help).
        interleave(contenders, args.repeat, warmup=False)

    magic, warm, cold, ipp = contenders

    def row(c: Contender, text: str, phase: str) -> None:
        values = c.phases[phase]
        report.row(f"{c.name}: {text}", c.phase(phase), "s", c.phase(phase),
                   spread=(min(values), max(values)))

    for c in (magic, warm, cold):
        row(c, "to RUNNING", "running")
        row(c, "to the task's start on the engine", "started")
        row(c, "whole run()", "run")
    row(ipp, "to the task's start on the engine", "started")
    for name in sorted(warm.phases):
        if name.startswith("phase "):
            row(warm, f"in run(): {name[6:]}", name)
    report.ratio("%%pipeline run, engines started at load: to RUNNING",
                 magic.phase("running"), 1.5, unit=" s", at_most=True)
    report.ratio("%%pipeline run, engines started at load: to the task's start on the engine",
                 magic.phase("started"), None, unit=" s")
    report.ratio("nbindustria, engines started at load: run() to RUNNING",
                 warm.phase("running"), None, unit=" s")
    report.ratio("nbindustria, engines started at load: run() to the task's start on the "
                 "engine", warm.phase("started"), None, unit=" s")
    report.ratio("nbindustria cold: run() to RUNNING", cold.phase("running"), None, unit=" s")
    report.ratio("raw ipyparallel cold: start to the first task's start", ipp.phase("started"),
                 None, unit=" s")
    report.ratio("cold / started at load (to RUNNING)", cold.phase("running")
                 / warm.phase("running"), None)
    report.note("times from the moment run() is called; 'in run()' rows: inclusive time of "
                "that function during the run (engines started at load)")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
