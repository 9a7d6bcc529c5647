"""Profile the hot paths behind the benchmarks' goals (cProfile, or pyinstrument if asked).

    python3 benchmarks/profile_hot_paths.py rerun     # a fully cached re-run of 10,000 tasks
    python3 benchmarks/profile_hot_paths.py write     # 10,000 tiny tasks run and committed
    python3 benchmarks/profile_hot_paths.py load      # one cached 800 MB array, Pipeline path
    python3 benchmarks/profile_hot_paths.py rerun --pyinstrument
    python3 benchmarks/profile_hot_paths.py instructions  # a re-run's instructions per task


Prints the top functions by own time and by cumulative time, in µs per task (per load for
``load``). cProfile adds a fixed cost to every Python call, so its absolute numbers run high
for code made of many small calls; the shares are what to read. The first line gives the same
work timed without the profiler.

``instructions`` counts the instructions per task of a cached re-run (record + run, record
alone, the index lookup alone) under valgrind: deterministic, so two versions of the code can be
compared on a noisy machine where times cannot resolve 10%.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from typing import Any

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
    p.add_argument("what", choices=("rerun", "write", "load", "instructions"))
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
    if args.what == "instructions":
        return instructions(args)
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


# What `instructions` runs in a child process under valgrind, inside exec() so that callgrind
# (--toggle-collect=builtin_exec) counts this and nothing else: not the imports, not the
# interpreter's exit, not other threads (the index's hit counter writes in one of its own).
_MEASURED = {
    "record + run": "pipe = make()\nt = pipe.task(step)\nhs = [t(i) for i in range(n)]\n"
                    "pipe.run()",
    "record": "pipe = make()\nt = pipe.task(step)\nhs = [t(i) for i in range(n)]",
    "store.present": "found = store.present(keys)",
}


def instructions(args) -> int:
    """Instructions per task of a fully cached re-run, counted by valgrind: unlike times on a
    shared machine, the same code gives the same count (to ~0.1%), so two versions compare
    in one run each. The count of n/5 tasks is subtracted from that of n (fixed costs
    cancel)."""
    import re
    import shutil
    import subprocess

    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed (apt-get install valgrind)")
    n = args.tasks
    small = n // 5
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with scratch("instructions", args.keep, args.scratch_base) as root:
        subprocess.run([sys.executable, __file__, "--child", "fill", str(root), str(n)],
                       check=True, env=env)
        print(f"A fully cached re-run of {n:,} tasks step(i): instructions per task "
              "(valgrind callgrind, the main thread)")
        for what in list(_MEASURED)[:1] if args.quick else _MEASURED:  # (quick: a smoke run)
            counts = []
            for count in (small, n):
                out = root / f"callgrind-{count}"
                subprocess.run(
                    ["valgrind", "--tool=callgrind", "--separate-threads=yes",
                     "--toggle-collect=builtin_exec", f"--callgrind-out-file={out}",
                     os.path.realpath(sys.executable), __file__, "--child", what, str(root),
                     str(count)], check=True, env=env, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                text = (root / f"callgrind-{count}-01").read_text()
                counts.append(int(re.search(r"^totals: (\d+)", text, re.M).group(1)))
            print(f"{(counts[1] - counts[0]) / (n - small):10,.0f}  {what}")
    return 0


def _child(what: str, root: str, n: int) -> None:
    """One measured step (see ``_MEASURED``) in this process: the parent counts it."""
    def make() -> Pipeline:
        return Pipeline(name="instructions", cache_dir=f"{root}/cache", key_dir=f"{root}/keys",
                        verbose=0, stream=NullStream())

    if what == "fill":
        pipe = make()
        t = pipe.task(step)
        for i in range(n):
            t(i)
        pipe.run()
        pipe.close()
        return
    scope: dict[str, Any] = {"make": make, "step": step, "n": n}
    if what == "store.present":
        store = make().store
        scope["store"] = store
        scope["keys"] = [row[0] for row in store.index.execute(
            "SELECT key FROM entries LIMIT ?", (n,))]
    exec(_MEASURED[what], scope)


def _root() -> str:
    from _bench import ROOT

    return str(ROOT)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
