"""Loading an 800 MB cached array: nbindustria vs joblib.Memory vs np.load of a .npy.

The same float64 array (random, so incompressible) is stored three ways, and every file is in
the page cache (each is written, then loaded once untimed, before the timed repetitions):

* nbindustria: ``Store.load(key)`` (the default for arrays >= 1 MiB: a read-only memory map,
  checked by one xxh3 pass over the mapped pages), ``Store.load(key, mmap_arrays=False)``
  (read into memory, then checked), and the whole user path: a fresh ``Pipeline``, the call
  recorded, ``run()`` (a cache hit) and ``handle.result()``;
* joblib: a ``joblib.Memory``-cached call returning the array, with the default
  ``mmap_mode=None`` and with ``mmap_mode="r"``;
* numpy: ``np.load`` of a ``.npy`` file (and ``mmap_mode="r"``, as context: it checks nothing
  and reads nothing until the pages are touched).

nbindustria checks its digest on every load and numpy and joblib check nothing, so a memory
map that is not touched says little: each repetition also sums the result (touching every
page) and the "load + sum" times are reported beside the load times.

Goal (issue 2): >= 1.0x np.load, with the digest checked.
"""

from __future__ import annotations

import sys
import time

import joblib
import numpy as np
from _bench import Contender, NullStream, Report, interleave, parser, scratch

from nbindustria import Pipeline
from nbindustria.store import Store


def make_array(n):
    return np.random.default_rng(42).random(n)


class Fixture:
    def __init__(self, root, n):
        self.root = root
        self.n = n
        self.keys = root / "keys"
        self.cache = root / "nbi-cache"
        self.npy = root / "array.npy"
        self.value = None
        self.pipe = None

    def fill(self) -> float:
        array = make_array(self.n)
        np.save(self.npy, array)
        expected = float(array.sum())
        del array
        pipe = self.pipeline()
        handle = pipe.task(make_array)(self.n)
        summary = pipe.run()
        if summary.ran != 1:
            sys.exit(f"filling the nbindustria cache failed: {summary.line()}")
        self.key = handle.key
        pipe.close()
        self.store = Store(self.cache, self.keys)
        for mode in (None, "r"):
            joblib.Memory(self.root / "joblib", mmap_mode=mode, verbose=0).cache(
                make_array)(self.n)
        return expected

    def pipeline(self) -> Pipeline:
        return Pipeline(name="bench", cache_dir=self.cache, key_dir=self.keys, verbose=0,
                        stream=NullStream())

    def pipeline_result(self):
        pipe = self.pipeline()
        handle = pipe.task(make_array)(self.n)
        summary = pipe.run()
        if summary.cached != 1:
            sys.exit(f"not a cache hit: {summary.line()}")
        self.pipe = pipe
        return handle.result()

    def joblib_call(self, mode):
        return joblib.Memory(self.root / "joblib", mmap_mode=mode, verbose=0).cache(
            make_array)(self.n)

    def release(self) -> None:
        self.value = None
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


def load_and_touch(fixture: Fixture, load, sums: dict, name: str):
    def run() -> dict:
        c0 = time.process_time()
        t0 = time.perf_counter()
        value = load()
        t1 = time.perf_counter()
        c1 = time.process_time()
        total = float(value.sum())
        t2 = time.perf_counter()
        c2 = time.process_time()
        sums.setdefault(name, total)
        fixture.value = value  # released untimed, in the teardown
        return {"load": t1 - t0, "load + sum": t2 - t0, "cpu load": c1 - c0,
                "cpu load + sum": c2 - c0}

    return run


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=800.0, help="array size in MB (10^6 bytes)")
    args = p.parse_args()
    if args.quick:
        args.mb = 8.0
    n = int(args.mb * 1e6) // 8
    report = Report("load_array", f"Loading a {n * 8 / 1e6:.0f} MB cached array", args)
    with scratch("load", args.keep, args.scratch_base) as root:
        fx = Fixture(root, n)
        expected = fx.fill()
        sums: dict[str, float] = {}
        loaders = [
            ("nbindustria Store.load (default: mmap + xxh3 check)",
             lambda: fx.store.load(fx.key)),
            ("nbindustria Store.load(mmap_arrays=False) + check",
             lambda: fx.store.load(fx.key, mmap_arrays=False)),
            ("nbindustria Pipeline: record + cached run + .result()", fx.pipeline_result),
            ("joblib.Memory cached call (mmap_mode=None)", lambda: fx.joblib_call(None)),
            ("joblib.Memory cached call (mmap_mode='r')", lambda: fx.joblib_call("r")),
            ("np.load(.npy)", lambda: np.load(fx.npy)),
            ("np.load(.npy, mmap_mode='r'), no check", lambda: np.load(fx.npy, mmap_mode="r")),
        ]
        contenders = [Contender(name, load_and_touch(fx, load, sums, name),
                                teardown=fx.release) for name, load in loaders]
        interleave(contenders, args.repeat)
        fx.store.close()
    for name, total in sums.items():
        if total != expected:
            sys.exit(f"{name} returned different data (sum {total} != {expected})")

    size = n * 8
    for c in contenders:
        for phase in ("load", "load + sum"):
            seconds = c.phase(phase)
            report.row(f"{c.name}: {phase}", seconds, "GB/s", size / seconds / 1e9,
                       spread=(min(c.phases[phase]), max(c.phases[phase])),
                       cpu=c.phase(f"cpu {phase}"))
    nbi, nbi_mem, nbi_pipe, job, job_mm, npl, npl_mm = contenders
    for phase in ("load", "load + sum"):
        report.ratio(f"nbindustria Store.load (default) vs np.load, {phase}, speed",
                     npl.phase(phase) / nbi.phase(phase), 1.0)
    report.ratio("same (load + sum), by CPU time of the process",
                 npl.phase("cpu load + sum") / nbi.phase("cpu load + sum"), None,
                 headline=False)
    # (No goal: the is the default load above. mmap_arrays=False asks for a private
    # copy in memory: a read and a hash pass, where np.load reads and checks nothing.)
    report.ratio("nbindustria Store.load(mmap_arrays=False) vs np.load, load + sum, speed",
                 npl.phase("load + sum") / nbi_mem.phase("load + sum"), None, headline=False)
    report.ratio("nbindustria Pipeline .result() vs np.load, load + sum, speed",
                 npl.phase("load + sum") / nbi_pipe.phase("load + sum"), 1.0, headline=False)
    report.ratio("nbindustria Pipeline .result() vs joblib.Memory call, load + sum, speed",
                 job.phase("load + sum") / nbi_pipe.phase("load + sum"), None,
                 headline=False)
    report.ratio("nbindustria Pipeline .result() vs joblib.Memory(mmap_mode='r'), load + sum",
                 job_mm.phase("load + sum") / nbi_pipe.phase("load + sum"), None,
                 headline=False)
    report.ratio("nbindustria Store.load (default) vs np.load(mmap_mode='r'), load + sum",
                 npl_mm.phase("load + sum") / nbi.phase("load + sum"), None, headline=False)
    report.note("nbindustria hashes every byte on load (xxh3); joblib and numpy check nothing")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
