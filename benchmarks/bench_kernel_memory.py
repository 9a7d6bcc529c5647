"""Kernel memory while 1 GB of results flows between tasks on 2 engines.

10 producers each return a 100 MB numpy array; 10 consumers each reduce one of them to a
number. The kernel's resident memory (RSS) is sampled every 5 ms during the run; the growth is
the peak minus the RSS just before (after a gc).

* nbindustria: the pipeline of 20 calls on 2 engines over a fresh cache. Engines reach the
  cache directory, so producers store their arrays themselves and consumers load them from
  the store: the kernel handles metadata only.
* raw ipyparallel, data through the client: ``view.apply(produce, i).get()`` brings each array
  into the kernel, ``view.apply(reduce_sum, a)`` sends it back out; one pair at a time, the
  array dropped and ipyparallel's result cache purged after each (the most frugal way to pass
  values through the client).

Goal (issue 4): nbindustria's kernel grows by < 50 MB.
"""

from __future__ import annotations

import gc
import shutil
import sys
import threading
from pathlib import Path

import psutil
from _bench import Contender, NullStream, Report, interleave, parser, scratch

from nbindustria import Pipeline
from nbindustria import cluster as cluster_mod
from nbindustria.dispatch import EngineExecutor

MB = 1_000_000


def produce(i, nbytes):
    import numpy as np  # ipyparallel sends this function's code, not its module's globals

    a = np.empty(nbytes // 8, dtype=np.float64)
    a.fill(float(i))
    return a


def reduce_sum(a):
    return float(a.sum())


class PeakRSS:
    """Samples this process's RSS in a thread; ``growth`` = peak - RSS at the start."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


class NbiFlow:
    def __init__(self, root: Path, engines: cluster_mod.Engines, pairs: int, nbytes: int):
        self.root = root
        self.engines = engines
        self.pairs = pairs
        self.nbytes = nbytes
        self.count = 0
        self.cache = root / "nbi-0"

    def setup(self) -> None:
        self.count += 1
        self.cache = self.root / f"nbi-{self.count}"

    def run(self) -> dict:
        pipe = Pipeline(name="bench", cache_dir=self.cache, key_dir=self.root / "keys",
                        verbose=0, stream=NullStream())
        pipe._executor = EngineExecutor(self.engines)
        t_produce, t_reduce = pipe.task(produce), pipe.task(reduce_sum)
        sums = [t_reduce(t_produce(i, self.nbytes)) for i in range(self.pairs)]
        with PeakRSS() as rss:
            summary = pipe.run()
        if summary.ran != 2 * self.pairs:
            sys.exit(f"expected {2 * self.pairs} tasks to run: {summary.line()}")
        expected = [float(i) * (self.nbytes // 8) for i in range(self.pairs)]
        if [h.result() for h in sums] != expected:
            sys.exit("wrong sums")
        pipe.close()
        return {"growth": rss.growth}

    def teardown(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)


def ipyparallel_through_client(engines: cluster_mod.Engines, pairs: int, nbytes: int) -> dict:
    client = engines.client
    view = client.load_balanced_view()
    with PeakRSS() as rss:
        for i in range(pairs):
            a = view.apply_async(produce, i, nbytes).get()
            total = view.apply_async(reduce_sum, a).get()
            del a
            client.purge_local_results("all")
            if total != float(i) * (nbytes // 8):
                sys.exit("wrong sum")
    return {"growth": rss.growth}


def main() -> int:
    p = parser(__doc__.splitlines()[0], repeat=3)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--mb", type=int, default=100, help="MB per array")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.mb = 2, 20
    nbytes = args.mb * MB
    total_mb = args.pairs * args.mb
    report = Report("kernel_memory", f"Kernel RSS growth while {total_mb:,} MB of results flow "
                    f"between tasks ({args.pairs} x {args.mb} MB arrays) on 2 engines", args)
    with scratch("memory", args.keep, args.scratch_base) as root:
        engines = cluster_mod.start_local(2)
        try:
            nbi = NbiFlow(root, engines, args.pairs, nbytes)
            c_nbi = Contender("nbindustria (engines read and write the store)", nbi.run,
                              setup=nbi.setup, teardown=nbi.teardown)
            c_ipp = Contender("ipyparallel, values through the client",
                              lambda: ipyparallel_through_client(engines, args.pairs, nbytes))
            interleave([c_nbi, c_ipp], args.repeat)
        finally:
            engines.stop()

    for c in (c_nbi, c_ipp):
        growth = c.phase("growth")
        report.contender_row(c, "MB kernel RSS growth (median peak)", growth / MB)
    report.ratio("nbindustria kernel RSS growth", c_nbi.phase("growth") / MB, 50, unit=" MB",
                 at_most=True)
    report.ratio("ipyparallel through the client: kernel RSS growth",
                 c_ipp.phase("growth") / MB, None, unit=" MB")
    report.ratio("nbindustria / ipyparallel time", c_nbi.median / c_ipp.median, None)
    report.note("nbindustria's time includes writing every array to the store and making it "
                "durable; ipyparallel keeps nothing")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
