"""Profile the hot paths behind the benchmarks' goals (cProfile, or pyinstrument if asked).

    python3 benchmarks/profile_hot_paths.py rerun     # a fully cached re-run of 10,000 tasks
    python3 benchmarks/profile_hot_paths.py write     # 10,000 tiny tasks run and committed
    python3 benchmarks/profile_hot_paths.py load      # one cached 800 MB array, Pipeline path
    python3 benchmarks/profile_hot_paths.py rerun --pyinstrument
    python3 benchmarks/profile_hot_paths.py parts     # the re-run's steps timed one by one


Prints the top functions by own time and by cumulative time, in µs per task (per load for
``load``). cProfile adds a fixed cost to every Python call, so its absolute numbers run high
for code made of many small calls; the shares are what to read. The first line gives the same
work timed without the profiler.

``parts`` times each step of a fully cached re-run on its own, over all 10,000 calls, without
any profiler (median of --repeat, in CPU time of the process), so the µs per task are real; it uses the package's inner
functions and says "n/a" for a step whose function changed.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import numpy as np
from _bench import NullStream, parser, scratch

from nbindustria import Pipeline


def step(i):
    return i * 2


def tiny(i):
    return i


def make_array(n):
    return np.random.default_rng(42).random(n)


def main() -> int:
    p = parser(__doc__.splitlines()[0], repeat=1)
    p.add_argument("what", choices=("rerun", "write", "load", "parts"))
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--pyinstrument", action="store_true")
    p.add_argument("--cpu", action="store_true",
                   help="cProfile counts CPU time (time.process_time), not wall time: on a "
                        "busy machine this hides the waits for other processes (and for "
                        "the disk)")
    args = p.parse_args()
    if args.quick:
        args.tasks = 300
    if args.what == "parts":
        return parts(args)
    n = args.tasks if args.what != "load" else 1
    with scratch("profile", args.keep, args.scratch_base) as root:
        counter = iter(range(10**9))

        def pipeline(cache: str) -> Pipeline:
            return Pipeline(name="profile", cache_dir=root / cache, key_dir=root / "keys",
                            verbose=0, stream=NullStream())

        if args.what == "rerun":
            def work() -> None:
                pipe = pipeline("cache")
                t = pipe.task(step)
                for i in range(n):
                    t(i)
                pipe.run()
                pipe.close()
            work()  # fill
            work()  # warm
        elif args.what == "write":
            def work() -> None:
                pipe = pipeline(f"cache-{next(counter)}")
                t = pipe.task(tiny)
                for i in range(n):
                    t(i)
                pipe.run()
                pipe.close()
        else:
            size = 100_000_000 if args.quick else 800_000_000
            count = size // 8

            def work() -> None:
                pipe = pipeline("cache")
                h = pipe.task(make_array)(count)
                pipe.run()
                h.result().sum()
                pipe.close()
            work()  # fill
            work()  # warm

        c0 = time.process_time()
        t0 = time.perf_counter()
        work()
        plain = time.perf_counter() - t0
        cpu = time.process_time() - c0
        print(f"{args.what}: {plain * 1e6 / n:.1f} µs per {'task' if n > 1 else 'load'} "
              f"without the profiler ({plain:.3f} s for {n:,}; CPU {cpu * 1e6 / n:.1f} µs "
              f"per {'task' if n > 1 else 'load'})")
        if args.pyinstrument:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
            work()
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False))
            return 0
        prof = cProfile.Profile(time.process_time) if args.cpu else cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(work)
        profiled = time.perf_counter() - t0
    print(f"under cProfile: {profiled * 1e6 / n:.1f} µs per task")
    stats = pstats.Stats(prof)
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        print(f"\n-- top {args.top} by {title}, µs per {'task' if n > 1 else 'load'} "
              "(calls per task in brackets)")
        entries = sorted(stats.stats.items(),  # type: ignore[attr-defined]
                         key=lambda kv: kv[1][2 if key == "tottime" else 3], reverse=True)
        for (filename, line, func), (_cc, ncalls, tt, ct, _callers) in entries[:args.top]:
            where = filename.replace(str(_root()), "").lstrip("/")
            value = tt if key == "tottime" else ct
            print(f"{value * 1e6 / n:9.2f} µs  [{ncalls / n:7.2f}]  {where}:{line}({func})")
    return 0


def parts(args) -> int:
    """Each step of a cached re-run, timed alone over all calls."""
    import statistics

    from nbindustria import keys as K
    from nbindustria.events import CACHED, Event, EventLog
    from nbindustria.graph import Graph
    from nbindustria.reporting import TextReporter
    from nbindustria.worker import python_env

    n = args.tasks
    repeat = max(args.repeat, 5)
    # CPU time of this process: a busy neighbour inflates it far less than wall time (every
    # step here is CPU work or a system call, none waits for the disk).
    clock = time.process_time
    results: list[tuple[str, float | None]] = []
    with scratch("parts", args.keep, args.scratch_base) as root:
        def pipeline() -> Pipeline:
            return Pipeline(name="parts", cache_dir=root / "cache", key_dir=root / "keys",
                            verbose=0, stream=NullStream())

        def whole() -> None:
            pipe = pipeline()
            t = pipe.task(step)
            for i in range(n):
                t(i)
            pipe.run()
            pipe.close()

        whole()
        pipe = pipeline()
        task = pipe.task(step)
        handles = [task(i) for i in range(n)]
        pipe.run()
        code_digest = K.code_digest_of(task, __import__("nbindustria.hashing").hashing
                                       .CodeHasher())[0]
        encodings = [K.encode_call(task, (i,), {}) for i in range(n)]
        keys = [h.key for h in handles]
        env = python_env()

        def timed(name: str, fn, per: int = n) -> None:
            """fn() is timed whole, unless it returns the seconds it measured itself."""
            try:
                fn()
                times = []
                for _ in range(repeat):
                    t0 = clock()
                    own = fn()
                    elapsed = clock() - t0
                    times.append(own if isinstance(own, float) else elapsed)
                results.append((name, statistics.median(times) / per))
            except Exception as exc:  # an inner function changed: say so
                results.append((f"{name} (n/a: {type(exc).__name__}: {exc})", None))

        def open_store() -> float:
            t0 = clock()
            p2 = pipeline()
            _ = p2.store
            elapsed = clock() - t0
            p2.close()
            return elapsed

        def record() -> float:
            p2 = pipeline()
            t2 = p2.task(step)
            t0 = clock()
            for i in range(n):
                t2(i)
            elapsed = clock() - t0
            p2.close()
            return elapsed

        def run_only() -> float:
            p2 = pipeline()
            t2 = p2.task(step)
            for i in range(n):
                t2(i)
            _ = p2.store
            t0 = clock()
            p2.run()
            elapsed = clock() - t0
            p2.close()
            return elapsed

        def labels() -> float:
            p2 = pipeline()
            t2 = p2.task(step)
            hs = [t2(i) for i in range(n)]
            t0 = clock()
            for h in hs:
                _ = h.label
            elapsed = clock() - t0
            p2.close()
            return elapsed

        def events() -> None:
            log = EventLog()
            log.subscribe(TextReporter(NullStream(), verbose=0))
            for h in handles:
                log.append(Event("added", node=h.node_id, task="step", label=h.label,
                                 key=h.key or ""))
                log.append(Event(CACHED, node=h.node_id, task="step", label=h.label,
                                 key=h.key or ""))

        timed(f"whole re-run: Pipeline() + {n:,} calls + run() + close()", whole)
        timed("  Pipeline() + first use of its store (open, key, index), spread over the tasks",
              open_store)
        timed("  record: task(i) on a fresh pipeline", record)
        timed("    keys.bind (inspect.Signature.bind + apply_defaults)",
              lambda: [K.bind(task, (i,), {}) for i in range(n)])
        timed("    keys.encode_call (bind + encode)",
              lambda: [K.encode_call(task, (i,), {}) for i in range(n)])
        timed("    keys.node_id", lambda: [K.node_id(task, e) for e in encodings])
        timed("  run: pipe.run() (store already open)", run_only)
        timed("    Graph(handles)", lambda: Graph(handles))
        timed("    Handle.label, first use (call_label/short_repr)", labels)
        timed("    keys.cache_key", lambda: [K.cache_key(task, code_digest, e, env)
                                           for e in encodings])
        timed("    store.present(keys): index rows + os.stat per entry",
              lambda: pipe.store.present(keys))
        timed("      store.index.get_many(keys) alone", lambda: pipe.store.index.get_many(keys))
        timed("      os.stat of every entry file alone",
              lambda: [os.stat(pipe.store.entry_path(k)) for k in keys])
        timed("    2 events per task (added, cached) to a verbose=0 reporter", events)
        timed("    store.index.add_hits(keys)", lambda: pipe.store.index.add_hits(keys))

        def priorities() -> None:
            from nbindustria.scheduler import LocalExecutor, Run

            run = Run(store=pipe.store, events=EventLog(), executor=LocalExecutor(),
                      pipeline_name="parts")
            run._priorities_for(Graph(handles))

        timed("    Run._priorities_for: index queries of past durations + critical path "
              "(+ Graph)", priorities)
        pipe.close()
    print(f"A fully cached re-run of {n:,} tasks, step by step (median of {repeat}; CPU µs "
          "per task; the indented steps are parts of the line above them, measured alone)")
    for name, value in results:
        print(f"{'' if value is None else f'{value * 1e6:8.2f} µs'}  {name}")
    names = [k for k, _ in results]
    run_name = "  run: pipe.run() (store already open)"
    run_total = dict(results).get(run_name)
    after_run = results[names.index(run_name) + 1:] if run_name in names else []
    # The run's own steps (indented by 4, not 6); Graph is counted inside _priorities_for.
    run_parts = [v for k, v in after_run if k.startswith("    ") and not k.startswith("      ")
                 and v is not None and "Graph(handles)" not in k]
    if run_total is not None:
        print(f"{(run_total - sum(run_parts)) * 1e6:8.2f} µs  (run() minus its steps above: "
              "the scheduler's own per-task bookkeeping, building events, and the like)")
    return 0


def _root() -> str:
    from _bench import ROOT

    return str(ROOT)


if __name__ == "__main__":
    sys.exit(main())
