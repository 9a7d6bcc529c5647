"""Writing 10,000 small entries durably: nbindustria (group commit) vs joblib.Memory.

Each repetition starts from an empty cache directory (created, with its key, untimed) and
writes 10,000 small results:

* nbindustria, the real path: a ``Pipeline`` of 10,000 tiny tasks ``tiny(i)`` run in this
  process; each result is staged by the worker code and committed by the scheduler in groups
  (sign, syncfs, rename, syncfs, index): a result counts as done only once it is durable;
* nbindustria, the store alone: ``stage_value`` for each entry, then ``Store.commit`` in groups
  of the scheduler's batch size (``COMMIT_BATCH``) with their index rows (small results are
  packed in one segment file per group);
* nbindustria, the store with groups of one entry (on fewer entries), to show what grouping buys;
* ``Store.present`` of as many keys, all indexed: the lookup a run makes first (index only);
* the file system's floor: 10,000 small files created, written and closed with plain
  ``os.open``/``os.write``/``os.close`` in one directory, no fsync, no rename: what one file
  per entry costs on this disk before anything else is done;
* joblib.Memory: 10,000 calls of a cached ``tiny(i)`` on an empty cache. joblib does not
  fsync anything: its entries are not durable when the call returns (a crash or power loss
  can lose them or leave them partial), so this is a speed reference, not a like-for-like.

``syncfs`` flushes the whole file system of /tmp, which other users of a shared machine also
write to: the durable rows are noisier than the others.

Goal (issue 2): >= 4,000 entries per second, durably.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import sys
import time

import joblib
from _bench import Contender, NullStream, Report, interleave, parser, scratch

from nbindustria import Pipeline
from nbindustria.scheduler import COMMIT_BATCH
from nbindustria.store import Store, row_from_header, stage_value

GROUP = COMMIT_BATCH  # the scheduler's group size


def tiny(i):
    return i


class Fresh:
    """A new, empty cache directory per repetition (its creation is not timed)."""

    def __init__(self, root, name):
        self.root = root
        self.name = name
        self.keys = root / "keys"
        self.counter = itertools.count()
        self.path = None

    def setup(self) -> None:
        self.path = self.root / f"{self.name}-{next(self.counter)}"
        if self.name in ("joblib", "floor"):
            self.path.mkdir(mode=0o700)
        else:
            Store(self.path, self.keys).close()

    def teardown(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def lookups(n: int, repeat: int, base: str) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``Store.present`` over ``n`` keys the index knows (a cache of
    ``n`` small entries; the lookup a run makes before deciding what to run)."""
    with scratch("present", False, base) as root:
        store = Store(root / "cache", root / "keys")
        keys = [f"{i:032x}" for i in range(n)]
        meta = {"node": "ab" * 16, "task": "tiny", "label": "tiny(1)", "code_digest": "cd" * 16,
                "args": {"i": "1"}, "arg_digests": {"i": "ef" * 16}}
        for start in range(0, n, GROUP):
            store.commit([stage_value(store.entries_dir, k, 1, meta)
                          for k in keys[start:start + GROUP]])
        walls, cpus = [], []
        for _ in range(max(repeat, 5)):
            t0, c0 = time.perf_counter(), time.process_time()
            found = store.present(keys)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            if len(found) != n:
                sys.exit(f"present found {len(found)} of {n} keys")
        store.close()
    return walls, cpus


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=10_000)
    p.add_argument("--single", type=int, default=300,
                   help="entries written with groups of one (each one synced alone)")
    args = p.parse_args()
    if args.quick:
        args.entries, args.single = 100, 5
    n = args.entries
    report = Report("write_entries", f"Writing {n:,} small entries durably", args)
    with scratch("write", args.keep, args.scratch_base) as root:
        pipe_dir, store_dir = Fresh(root, "pipeline"), Fresh(root, "store")
        single_dir, job_dir = Fresh(root, "single"), Fresh(root, "joblib")
        floor_dir = Fresh(root, "floor")

        def pipeline() -> dict:
            t0 = time.perf_counter()
            pipe = Pipeline(name="bench", cache_dir=pipe_dir.path, key_dir=pipe_dir.keys,
                            verbose=0, stream=NullStream())
            t_tiny = pipe.task(tiny)
            for i in range(n):
                t_tiny(i)
            t1 = time.perf_counter()
            summary = pipe.run()
            t2 = time.perf_counter()
            pipe.close()
            if summary.ran != n:
                sys.exit(f"expected {n} tasks to run: {summary.line()}")
            return {"record": t1 - t0, "run": t2 - t1}

        def store_groups(directory: Fresh, count: int, group: int) -> dict:
            store = Store(directory.path, directory.keys)
            t_stage = t_commit = 0.0
            for start in range(0, count, group):
                ta = time.perf_counter()
                staged = [stage_value(store.tmp_dir, f"{i:032x}", i, {"task": "tiny"})
                          for i in range(start, min(start + group, count))]
                rows = [row_from_header(s.key, "", s.header) for s in staged]
                tb = time.perf_counter()
                store.commit(staged, rows)
                t_stage += tb - ta
                t_commit += time.perf_counter() - tb
            written = len(list(store.keys()))
            store.close()
            if written != count:
                sys.exit(f"expected {count} entries, found {written}")
            return {"stage": t_stage, "commit": t_commit}

        def floor() -> None:
            payload = b"x" * 400  # about the size of a small entry (header + pickle)
            for i in range(n):
                fd = os.open(os.path.join(floor_dir.path, f"{i:032x}.part"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, payload)
                os.close(fd)

        def joblib_fill() -> None:
            cached = joblib.Memory(job_dir.path, verbose=0).cache(tiny)
            for i in range(n):
                cached(i)

        contenders = [
            Contender("nbindustria Pipeline, 10,000 tiny tasks run in-process".replace(
                "10,000", f"{n:,}"), pipeline, pipe_dir.setup, pipe_dir.teardown),
            Contender(f"nbindustria Store: stage + commit in groups of {GROUP}",
                      lambda: store_groups(store_dir, n, GROUP), store_dir.setup,
                      store_dir.teardown),
            Contender(f"nbindustria Store: groups of 1 ({args.single:,} entries)",
                      lambda: store_groups(single_dir, args.single, 1), single_dir.setup,
                      single_dir.teardown),
            Contender("joblib.Memory filling an empty cache (no fsync)", joblib_fill,
                      job_dir.setup, job_dir.teardown),
            Contender("floor: create + write + close small files (no fsync)", floor,
                      floor_dir.setup, floor_dir.teardown),
        ]
        interleave(contenders, args.repeat, warmup=False)

    pipe_c, store_c, single_c, job_c, floor_c = contenders
    present_times, present_cpu = lookups(n, args.repeat, args.scratch_base)
    for c, count in ((pipe_c, n), (store_c, n), (single_c, args.single), (job_c, n),
                     (floor_c, n)):
        report.contender_row(c, "entries/s", count / c.median)
        for phase in c.phases:
            report.row(f"  {phase} phase", c.phase(phase), "entries/s",
                           count / c.phase(phase))
    report.row(f"nbindustria Store.present of {n:,} indexed keys",
               statistics.median(present_times), "keys/s", n / statistics.median(present_times),
               spread=(min(present_times), max(present_times)),
               cpu=statistics.median(present_cpu))
    report.ratio("nbindustria Pipeline, durable entries per second", n / pipe_c.median,
                 4000.0, unit="/s")
    report.ratio("nbindustria Store.present, µs per indexed key (CPU)",
                 statistics.median(present_cpu) / n * 1e6, 3.0, unit=" µs", at_most=True,
                 headline=False)
    report.ratio("nbindustria Pipeline, entries per CPU second of the process (disk waits "
                 "excluded)", n / statistics.median(pipe_c.cpu), None, unit="/s",
                 headline=False)
    report.ratio("nbindustria Store in groups, durable entries per second",
                 n / store_c.median, 4000.0, unit="/s", headline=False)
    report.ratio("nbindustria Pipeline vs joblib.Memory (not durable), speed",
                 job_c.median / pipe_c.median, None, headline=False)
    report.ratio("nbindustria Pipeline vs the file system floor (one bare file per entry)",
                 floor_c.median / pipe_c.median, None, headline=False)
    report.ratio("group commit vs groups of 1, speed-up",
                 (single_c.median / args.single) / (store_c.median / n), None,
                 headline=False)
    report.note("joblib.Memory does not fsync: its entries can be lost or left partial by a "
                "crash; nbindustria's are signed, synced and renamed before a task is done")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
