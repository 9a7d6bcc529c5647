"""The scheduler on real ipyparallel engines: placement, engine loss, joins, resources, data flow.

Every test here starts or uses real local engines (marked ``engines``). Task functions live in
this module; they travel to the engines by value (dispatch pickles user code by value).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from nbindustria import Pipeline, PipelineError
from nbindustria import cluster as cluster_mod
from nbindustria.dispatch import EngineExecutor

pytestmark = [pytest.mark.engines, pytest.mark.slow]


@pytest.fixture(scope="module")
def engines():
    eng = cluster_mod.start_local(2)
    yield eng
    eng.stop()


def _pipe(tmp_path: Path, engines, **kw) -> Pipeline:
    pipe = Pipeline(name="t", cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys",
                    verbose=0, **kw)
    pipe._executor = EngineExecutor(engines)
    return pipe


def record_pid(i: int, delay: float = 0.3) -> tuple[int, int, float, float]:
    start = time.time()
    time.sleep(delay)
    return i, os.getpid(), start, time.time()


def test_tasks_spread_over_engines(tmp_path, engines):
    pipe = _pipe(tmp_path, engines)
    task = pipe.task(record_pid)
    handles = [task(i) for i in range(6)]
    summary = pipe.run()
    assert summary.ran == 6
    pids = {h.result()[1] for h in handles}
    engine_pids = {info.pid for info in engines.info()}
    assert len(pids) == 2 and pids <= engine_pids
    assert os.getpid() not in pids
    # A second run is all cache hits, resolved in the kernel: no engine is asked.
    again = _pipe(tmp_path, engines)
    task2 = again.task(record_pid)
    for i in range(6):
        task2(i)
    assert again.run().cached == 6


def write_pid_then_sleep(marker: str, seconds: float) -> int:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def _kill_when_written(marker: Path, killed: list[int], within: float, poll: float,
                       after: float = 0.0) -> threading.Thread:
    """A started thread that SIGKILLs the process whose pid ``marker`` gets (``after`` seconds
    later), and notes it in ``killed``."""
    def killer() -> None:
        deadline = time.time() + within
        while time.time() < deadline:
            if marker.exists() and marker.read_text():
                time.sleep(after)
                killed.append(int(marker.read_text()))
                os.kill(killed[0], signal.SIGKILL)
                return
            time.sleep(poll)

    thread = threading.Thread(target=killer)
    thread.start()
    return thread


def small(i: int) -> int:
    return i * i


def test_sigkill_mid_task_is_resubmitted(tmp_path, engines):
    pipe = _pipe(tmp_path, engines)
    slow = pipe.task(write_pid_then_sleep)
    sq = pipe.task(small)
    marker = tmp_path / "pid"
    victim = slow(str(marker), 2.0)
    others = [sq(i) for i in range(5)]

    killed: list[int] = []
    thread = _kill_when_written(marker, killed, within=30, poll=0.02)
    summary = pipe.run()
    thread.join()
    assert summary.failed == 0
    assert [h.result() for h in others] == [i * i for i in range(5)]
    # The task ran again elsewhere (on a surviving or replacement engine).
    assert killed and victim.result() != killed[0]
    assert victim.reason.startswith("resubmitted") or "lost" in victim.reason
    assert pipe.store.verify_all(quarantine=False) == {}
    # The cluster was topped up again to its size.
    engines.wait_for(2, 60)


def kill_my_engine() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_task_that_kills_every_engine_fails_alone(tmp_path):
    engines = cluster_mod.start_local(2)
    request = None
    try:
        _kills_every_engine(tmp_path, engines)
    finally:
        engines.stop()
    del request


def _kills_every_engine(tmp_path, engines):
    pipe = _pipe(tmp_path, engines)
    bad = pipe.task(kill_my_engine)
    sq = pipe.task(small)
    after = pipe.task(small)
    doomed = bad()
    fine = [sq(i) for i in range(4)]
    with pytest.raises(PipelineError) as info:
        pipe.run()
    failure = info.value.failures[0]
    assert failure.label == "kill_my_engine()"
    assert "3 engines died" in failure.message
    assert [h.result() for h in fine] == [0, 1, 4, 9]
    assert doomed.state == "failed"
    assert "3 engines died" in failure.message and "killed by SIGKILL" in failure.message, failure.message
    del after


def test_engine_added_mid_run_gets_work(tmp_path):
    eng = cluster_mod.start_local(1)
    try:
        pipe = _pipe(tmp_path, eng)
        task = pipe.task(record_pid)
        handles = [task(i, 0.5) for i in range(30)]
        added: list[int] = []
        errors: list[BaseException] = []

        def add() -> None:
            try:
                added.extend(eng.add_engines(1))
            except BaseException as exc:
                errors.append(exc)

        threading.Thread(target=add).start()
        pipe.run()
        assert not errors, errors
        assert added, "the extra engine never registered"
        pids = {h.result()[1] for h in handles}
        assert len(pids) == 2, f"the engine that joined got no work: {pids}"
    finally:
        eng.stop()


def busy_interval(i: int) -> tuple[float, float]:
    start = time.time()
    time.sleep(0.4)
    return start, time.time()


def test_cpu_resources_are_respected(tmp_path, engines):
    cores = min(info.cores for info in engines.info())
    pipe = _pipe(tmp_path, engines)
    heavy = pipe.task(busy_interval, cpus=cores)
    handles = [heavy(i) for i in range(3)]
    pipe.run()
    _assert_never_together([h.result() for h in handles], f"two cpus={cores} tasks")


def _assert_never_together(intervals: list[tuple[float, float]], what: str) -> None:
    intervals = sorted(intervals)
    for (_s1, e1), (s2, _e2) in itertools.pairwise(intervals):
        assert s2 >= e1 - 0.01, f"{what} overlapped: {intervals}"


def test_task_that_fits_no_engine_is_an_error_before_running(tmp_path, engines):
    from nbindustria import NbindustriaError

    pipe = _pipe(tmp_path, engines)
    huge = pipe.task(small, cpus=10_000)
    huge(1)
    with pytest.raises(NbindustriaError, match="no engine has that"):
        pipe.run()
    assert pipe.store.index.query() == []


def make_array(i: int, megabytes: int) -> np.ndarray:
    return np.full(megabytes * 131072, float(i))


def reduce_array(a: np.ndarray) -> float:
    return float(a[0] + a[-1])


def test_results_between_tasks_do_not_pass_through_the_kernel(tmp_path, engines):
    pipe = _pipe(tmp_path, engines)
    make = pipe.task(make_array)
    red = pipe.task(reduce_array)
    outs = [red(make(i, 100)) for i in range(6)]  # 600 MB flows between tasks
    before = psutil.Process().memory_info().rss
    pipe.run()
    growth = psutil.Process().memory_info().rss - before
    assert [h.result() for h in outs] == [2.0 * i for i in range(6)]
    assert growth < 50 * 2**20, f"kernel RSS grew by {growth / 2**20:.0f} MiB"


def mpi_rank(i: int) -> tuple[int, int | None]:
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        from mpi4py import MPI as mpi
    return i, mpi.COMM_WORLD.Get_rank()


@pytest.mark.mpi
def test_pipeline_runs_on_mpi_engines_started_by_ipcluster(tmp_path, monkeypatch):
    """Engines started by `ipcluster start --engines=MPI`, reached by profile name, as a user
    with a cluster would: the pipeline runs on both ranks."""
    import subprocess
    import sys

    for var in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
                "OMPI_MCA_rmaps_base_oversubscribe"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    ipcluster = [sys.executable, "-m", "ipyparallel.cluster"]
    subprocess.run([sys.executable, "-m", "IPython", "profile", "create", "nbi-mpi",
                    "--parallel"], check=True, capture_output=True)
    log = open(tmp_path / "ipcluster.log", "w")  # noqa: SIM115 - closed below
    subprocess.run([*ipcluster, "start", "--engines=MPI", "-n", "2", "--profile=nbi-mpi",
                    "--daemonize"], check=True, stdout=log, stderr=log)
    try:
        # Both ranks registered before the run (a connection waits for one engine only: under
        # load the other could register after the eight tiny tasks are done).
        cluster_mod.connect(profile="nbi-mpi", min_engines=2, timeout=90).stop()
        pipe = Pipeline(name="mpi", cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys",
                        engines="nbi-mpi", verbose=0)
        rank = pipe.task(mpi_rank)
        handles = [rank(i) for i in range(8)]
        pipe.run()
        ranks = {h.result()[1] for h in handles}
        assert ranks == {0, 1}
        assert "MPI" in pipe.executor.description or "nbi-mpi" in pipe.executor.description
    finally:
        subprocess.run([*ipcluster, "stop", "--profile=nbi-mpi"], stdout=log, stderr=log,
                       timeout=60)
        log.close()


def sleepy(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


def test_interrupt_keeps_finished_work_and_resumes(tmp_path, engines):
    import _thread

    pipe = _pipe(tmp_path, engines)
    quick = pipe.task(sleepy)
    first = [quick(i, 0.05) for i in range(2)]
    slow = [quick(i, 30.0) for i in range(10, 14)]
    done_events = []

    def interrupt_after_first_results() -> None:
        deadline = time.time() + 30
        while time.time() < deadline:
            if sum(1 for e in pipe.events.since(0) if e.kind == "done") >= 2:
                done_events.append(time.time())
                break
            time.sleep(0.02)
        else:
            return
        # A simulated Ctrl-C can be lost (raised inside a destructor or a callback, Python
        # only prints it); a user would press it again: so does this test, until the run
        # has seen one.
        for _attempt in range(3):
            _thread.interrupt_main()
            seen = time.time() + 5
            while time.time() < seen:
                run = pipe.last_run
                if run is not None and run.summary.interrupted:
                    return
                time.sleep(0.02)

    threading.Thread(target=interrupt_after_first_results, daemon=True).start()
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    assert time.time() - started < 20, "the interrupt did not stop the slow tasks"
    assert all(h.state == "done" for h in first)
    # The engines are alive and free again: the next run finds the quick tasks cached.
    again = _pipe(tmp_path, engines)
    quick2 = again.task(sleepy)
    for i in range(2):
        quick2(i, 0.05)
    summary = again.run()
    assert summary.cached == 2 and summary.ran == 0
    assert len(engines.ids()) == 2
    # The running slow tasks were interrupted on the engines, not left to finish.
    for engine_id in engines.ids():
        assert engines.client[engine_id].apply_async(os.getpid).get(timeout=5) > 0
    assert not any(h.state == "done" for h in slow)


def where_am_i(i: int) -> int:
    return os.getpid()


def test_custom_resources_place_tasks_only_where_they_exist(tmp_path, engines):
    first = min(engines.ids())
    pipe = Pipeline(name="t", cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys",
                    verbose=0)
    pipe._executor = EngineExecutor(engines, resources={first: {"bigdb": 1}})
    needs_db = pipe.task(where_am_i, resources={"bigdb": 1})
    handles = [needs_db(i) for i in range(4)]
    pipe.run()
    pid_of_first = next(info.pid for info in engines.info() if info.id == first)
    assert {h.result() for h in handles} == {pid_of_first}


def test_results_travel_back_when_engines_cannot_reach_the_store(tmp_path, engines):
    pipe = Pipeline(name="t", cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys",
                    verbose=0)
    pipe._executor = EngineExecutor(engines, share_store=False)
    make = pipe.task(make_array)
    red = pipe.task(reduce_array)
    outs = [red(make(i, 1)) for i in range(3)]
    pipe.run()
    assert [h.result() for h in outs] == [2.0 * i for i in range(3)]
    assert all(e["reaches_store"] is False for e in pipe.executor.engine_table())
    assert pipe.store.verify_all(quarantine=False) == {}


def test_a_fully_cached_run_starts_no_engines(tmp_path):
    first = Pipeline(name="t", cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys",
                     verbose=0)
    sq = first.task(small)
    for i in range(3):
        sq(i)
    first.run()
    again = Pipeline(name="t", cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys",
                     engines=2, verbose=0)
    sq2 = again.task(small)
    handles = [sq2(i) for i in range(3)]
    assert again.run().cached == 3
    assert again.executor.started is False  # type: ignore[attr-defined]
    assert [h.result() for h in handles] == [0, 1, 4]


def square_record(i: int) -> dict[str, int]:
    return {"i": i, "sq": i * i}


def sum_squares(parts: list[dict[str, int]]) -> tuple[int, int]:
    return sum(p["sq"] for p in parts), os.getpid()


def test_small_results_of_engines_are_packed_in_segments(tmp_path, engines):
    """Engines stage a batch's small results in one part file; the kernel signs them into
    segments; engines then read their inputs from segments by (file, offset)."""
    pipe = _pipe(tmp_path, engines)
    part = pipe.task(square_record)
    total = pipe.task(sum_squares)
    parts = [part(i) for i in range(300)]
    tops = [total(parts[:150]), total(parts[150:])]
    assert pipe.run().ran == 302
    store = pipe.store
    locations = [store.locate(h.key) for h in parts]
    assert all(packed for _path, _offset, packed in locations)
    segments = {path for path, _offset, _packed in locations}
    assert 1 <= len(segments) < 30  # groups, not one file per result
    assert list(store.packs_dir.glob(".*.part")) == []  # every part file was consumed
    assert [t.result()[0] for t in tops] == [sum(i * i for i in range(150)),
                                            sum(i * i for i in range(150, 300))]
    assert {t.result()[1] for t in tops} <= {info.pid for info in engines.info()}
    assert store.verify_all(quarantine=False) == {}


def noop(i: int) -> int:
    return i


def test_short_tasks_travel_in_batches_long_ones_alone(tmp_path, engines):
    pipe = _pipe(tmp_path, engines)
    tiny = pipe.task(noop)
    handles = [tiny(i) for i in range(600)]
    summary = pipe.run()
    assert summary.ran == 600 and [h.result() for h in handles] == list(range(600))
    executor = pipe.executor
    # The first calls go alone (nothing is known of them); then they travel in batches.
    assert executor.messages_sent < 600 / 5, executor.messages_sent
    # Both engines took part.
    assert all(row["tasks_done"] > 0 for row in executor.engine_table())

    again = _pipe(tmp_path, engines)
    slow = again.task(sleepy)
    for i in range(4):
        slow(i, 0.1)
    again.run()
    assert again.executor.messages_sent == 4  # long tasks: one message each


def _placements(pipe: Pipeline) -> dict[str, list[tuple[float, float, float, str]]]:
    """Per engine: (placed, started, ended, label) of each task, in the order placed."""
    events = pipe.events.since(0)
    placed = {e.node: e.time for e in events if e.kind == "running"}
    per_engine: dict[str, list[tuple[float, float, float, str]]] = {}
    for e in events:
        if e.kind == "done":
            per_engine.setdefault(e.engine, []).append(
                (placed[e.node], e.started or 0.0, e.ended or 0.0, e.label))
    return {k: sorted(v) for k, v in per_engine.items()}


def test_first_run_hands_the_next_task_to_the_next_free_engine(tmp_path, engines):
    """Nothing is known of the tasks: no task is queued behind another on an engine, so a
    long task never holds back work that the other engine could do."""
    pipe = _pipe(tmp_path, engines)
    slow = pipe.task(sleepy)
    long_one = slow(0, 1.2)
    shorts = [slow(i, 0.1) for i in range(1, 11)]
    started = time.monotonic()
    pipe.run()
    took = time.monotonic() - started
    placements = _placements(pipe)
    for rows in placements.values():
        for (_p1, _s1, ended, _l1), (placed, _s2, _e2, label) in itertools.pairwise(rows):
            assert placed >= ended - 0.005, f"{label} was queued behind another task"
    long_engine = next(k for k, rows in placements.items()
                       if any(r[3] == long_one.label for r in rows))
    assert len(placements[long_engine]) == 1  # the other engine did every short task
    assert {h.result() for h in shorts} == set(range(1, 11))
    assert took < 1.2 + 1.0 + 3.0  # 1 s of short work beside the long task, plus slack


def test_recorded_durations_order_a_rerun_longest_first(tmp_path, engines):
    """A second run knows each call's duration: the longest go first (critical path), and a
    known task is queued behind one about to end (the round trip is hidden)."""
    seconds = [0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.6]
    first = _pipe(tmp_path, engines)
    task = first.task(sleepy)
    for i, s in enumerate(seconds):
        task(i, s)
    first.run()
    first_order = [e.label for e in first.events.since(0) if e.kind == "running"]
    assert first_order[:2] == ["sleepy(0, 0.05)", "sleepy(1, 0.1)"]  # in the order called

    again = _pipe(tmp_path, engines)
    task2 = again.task(sleepy)
    for i, s in enumerate(seconds):
        task2(i, s)
    summary = again.run(rerun=["sleepy"])
    assert summary.ran == len(seconds)
    order = [e.label for e in again.events.since(0) if e.kind == "running"]
    assert set(order[:2]) == {"sleepy(6, 0.5)", "sleepy(7, 0.6)"}, order
    assert order[-1] == "sleepy(0, 0.05)", order
    queued_behind = sum(
        1 for rows in _placements(again).values()
        for (_p, _s, ended, _l), (placed, _s2, _e2, _l2) in itertools.pairwise(rows)
        if placed < ended)
    assert queued_behind >= 1


def burn(megabytes: int) -> np.ndarray:
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    return np.ones(megabytes * 131072)


def test_engines_measure_time_cpu_and_memory_into_the_index(tmp_path, engines):
    pipe = _pipe(tmp_path, engines)
    task = pipe.task(burn)
    small_one, big_one = task(1), task(200)
    pipe.run()
    rows = {row.label: row for row in pipe.store.index.query()}
    small_row, big_row = rows[small_one.label], rows[big_one.label]
    engine_hosts = {info.host for info in engines.info()}
    for row in (small_row, big_row):
        assert row.duration >= 0.2 and 0.15 <= row.cpu <= row.duration + 0.05
        assert row.engine.startswith("engine ") and row.host in engine_hosts
    # The 200 MiB result was resident on its engine when the call returned.
    assert big_row.peak_memory - small_row.peak_memory > 150 * 2**20, \
        (big_row.peak_memory, small_row.peak_memory)


def _process_holds(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of process ``pid`` (Linux)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar]" in line or "[vsyscall]" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, ValueError, OverflowError):
                continue
    return False


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="reads /proc/PID/mem")
def test_engines_never_hold_the_cache_key(tmp_path, engines):
    pipe = _pipe(tmp_path, engines)
    make = pipe.task(make_array)
    red = pipe.task(reduce_array)
    outs = [red(make(i, 1)) for i in range(4)]
    pipe.run()
    assert [h.result() for h in outs] == [2.0 * i for i in range(4)]
    key = pipe.store._key
    assert len(key) == 32
    assert _process_holds(os.getpid(), key)  # the kernel signs: the scan finds it here
    for info in engines.info():
        assert not _process_holds(info.pid, key), f"engine {info.id} holds the cache key"


def test_memory_resources_are_respected(tmp_path, engines):
    memory = min(info.memory for info in engines.info())
    pipe = _pipe(tmp_path, engines)
    big = pipe.task(busy_interval, memory=int(memory * 0.6))
    handles = [big(i) for i in range(3)]
    pipe.run()
    _assert_never_together([h.result() for h in handles], "two tasks needing 60% of memory")


def test_an_engine_shut_down_mid_run_is_not_a_failure(tmp_path):
    eng = cluster_mod.start_local(2)
    try:
        pipe = _pipe(tmp_path, eng)
        task = pipe.task(record_pid)
        handles = [task(i, 0.3) for i in range(12)]

        def shut_one_down() -> None:
            deadline = time.time() + 30
            while time.time() < deadline:
                if any(e.kind == "done" for e in pipe.events.since(0)):
                    eng.client.shutdown(targets=[max(eng.ids())], block=False)
                    return
                time.sleep(0.02)

        threading.Thread(target=shut_one_down, daemon=True).start()
        summary = pipe.run()
        assert summary.failed == 0
        assert [h.result()[0] for h in handles] == list(range(12))
        assert pipe.store.verify_all(quarantine=False) == {}
    finally:
        eng.stop()


def _gaps(pipe: Pipeline) -> list[float]:
    """Seconds from a task's end to the next one's start on the same engine."""
    return [s2 - e1 for rows in _placements(pipe).values()
            for (_p1, _s1, e1, _l1), (_p2, s2, _e2, _l2) in itertools.pairwise(rows)]


def test_recorded_tasks_run_back_to_back_from_the_engines_task_loops(tmp_path, engines):
    """With recorded durations, each engine of this host has its next task queued in its own
    task loop: it starts the next one without a round trip to the kernel (about 1 ms here,
    against 6-9 ms through the ipyparallel controller), longest first."""
    seconds = [0.03 + 0.01 * (i % 5) for i in range(24)]
    first = _pipe(tmp_path, engines)
    task = first.task(sleepy)
    for i, s in enumerate(seconds):
        task(i, s)
    first.run()
    assert first.executor.loop_messages == first.executor.messages_sent == 24

    again = _pipe(tmp_path, engines)
    task2 = again.task(sleepy)
    for i, s in enumerate(seconds):
        task2(i, s)
    summary = again.run(rerun=["sleepy"])
    assert summary.ran == 24
    executor = again.executor
    assert executor.loop_messages == executor.messages_sent == 24
    rows = _placements(again)
    queued_behind = sum(1 for r in rows.values() for (_p, _s, ended, _l), (placed, *_rest)
                        in itertools.pairwise(r) if placed < ended)
    assert queued_behind >= 20, rows  # every task but the first two and a few at the end
    gaps = sorted(_gaps(again))
    # Through ipyparallel even a task already queued on the engine starts ~4 ms after the
    # previous one ended; the loop takes it in well under that (generous bound: shared cores).
    assert gaps[len(gaps) // 2] < 0.004, gaps
    durations = [float(e.label.split(", ")[1][:-1]) for e in again.events.since(0)
                 if e.kind == "running"]
    assert durations[:2] == [0.07, 0.07] and durations[-1] == 0.03, durations
    # The loops ended with the run: the engines answer ordinary requests at once.
    for engine_id in engines.ids():
        assert engines.client[engine_id].apply_async(os.getpid).get(timeout=5) > 0


def sleep_as_told(i: int, told: str) -> int:
    """Sleeps for what the file ``told`` says for ``i`` now (0.1 s by default): the recorded
    durations of a first run can then be wrong in the next."""
    import json

    time.sleep(json.loads(Path(told).read_text()).get(str(i), 0.1))
    return i


def test_an_idle_engine_takes_back_a_task_queued_behind_one_that_runs_long(tmp_path, engines):
    """Recorded durations can be wrong: a task queued in an engine's loop behind one that now
    runs much longer is taken back by the other engine when that one has nothing else to do,
    instead of waiting there."""
    told = tmp_path / "told.json"
    # Recorded: task 1 is the longest (it goes first), task 0 next (the other engine), and the
    # next task queues behind task 0 (whose recorded end comes first).
    told.write_text('{"0": 0.2, "1": 0.3}')
    first = _pipe(tmp_path, engines)
    task = first.task(sleep_as_told)
    for i in range(8):
        task(i, str(told))
    first.run()

    told.write_text('{"0": 2.0, "1": 0.3}')  # task 0 now runs 10 times longer
    again = _pipe(tmp_path, engines)
    task2 = again.task(sleep_as_told)
    handles = [task2(i, str(told)) for i in range(8)]
    summary = again.run(rerun=["sleep_as_told"])
    assert summary.ran == 8 and summary.failed == 0
    assert [h.result() for h in handles] == list(range(8))
    # A task was queued behind the long one (its recorded end came first), then taken back.
    assert again.executor.withdrawn >= 1
    rows = _placements(again)
    long_engine = next(k for k, v in rows.items() if any(r[3].startswith("sleep_as_told(0,")
                                                         for r in v))
    assert [r[3][:16] for r in rows[long_engine]] == ["sleep_as_told(0,"], rows
    assert sum(len(v) for v in rows.values()) == 8


def test_engines_without_task_loops_still_run_everything(tmp_path, engines):
    """Engines of other hosts get one ipyparallel message per batch (no task loop): that path
    still runs a first run and a recorded one, prefetch included."""
    pipe = _pipe(tmp_path, engines)
    pipe._executor = EngineExecutor(engines, engine_loops=False)
    task = pipe.task(sleepy)
    handles = [task(i, 0.06 * (i % 3 + 1)) for i in range(12)]
    assert pipe.run().ran == 12
    assert pipe.executor.loop_messages == 0 and pipe.executor.messages_sent == 12
    again = _pipe(tmp_path, engines)
    again._executor = EngineExecutor(engines, engine_loops=False)
    task2 = again.task(sleepy)
    for i in range(12):
        task2(i, 0.06 * (i % 3 + 1))
    assert again.run(rerun=["sleepy"]).ran == 12
    assert again.executor.loop_messages == 0
    assert [h.result() for h in handles] == list(range(12))


def test_the_shared_dir_probe_is_made_once_per_directory_for_every_executor(tmp_path, engines,
                                                                             monkeypatch):
    """Whether engines reach the cache directory is asked once per directory (a round trip to
    every engine), kept with the engines for later executors, and never leaves its probe file
    behind, also when no job is placed."""
    probes: list[str] = []

    class Counted(cluster_mod.SharedDirProbe):  # each probe writes one of these
        def __init__(self, path):
            probes.append(str(path))
            super().__init__(path)

    monkeypatch.setattr(cluster_mod, "SharedDirProbe", Counted)
    for i in range(2):
        pipe = _pipe(tmp_path, engines)
        task = pipe.task(sleepy)
        handles = [task(j, 0.06) for j in range(4)]
        summary = pipe.run(rerun=["sleepy"] if i else ())
        assert summary.ran == 4 and [h.result() for h in handles] == list(range(4))
        assert all(row["reaches_store"] for row in pipe.executor.engine_table())
    assert len(probes) == 1, probes
    # A new directory is probed; with every result cached no job is placed, and the probe's
    # file is still removed.
    other = tmp_path / "other"
    first = Pipeline(name="t", cache_dir=other / "cache", key_dir=tmp_path / "keys", verbose=0)
    first.task(noop)(1)
    first.run()
    again = Pipeline(name="t", cache_dir=other / "cache", key_dir=tmp_path / "keys", verbose=0)
    again._executor = EngineExecutor(engines)
    again.task(noop)(1)
    assert again.run().cached == 1
    assert len(probes) == 2
    assert not [p for p in (other / "cache").rglob("*") if ".nbindustria-probe" in p.name]


def test_task_loops_start_with_the_run_and_answer_the_probe(tmp_path, engines, monkeypatch):
    """After a run that placed jobs, the engines' task loops start when the next run starts,
    not with its first job (their start is a round trip that then overlaps the keys and the
    cache lookups): when the first job is placed, every loop is already running and has
    answered the shared-dir probe of a new cache directory; no probe goes through ipyparallel;
    every result comes back."""
    def no_ipyparallel_probe(*args, **kwargs):
        raise AssertionError("engines with a task loop were probed through ipyparallel")

    warm = Pipeline(name="t", cache_dir=tmp_path / "warm", key_dir=tmp_path / "keys",
                    verbose=0)
    warm._executor = EngineExecutor(engines)
    warm.task(noop)(1)
    assert warm.run().ran == 1  # a run on these engines placed a job: the next starts loops
    monkeypatch.setattr(engines, "start_shared_dir_check", no_ipyparallel_probe)
    pipe = _pipe(tmp_path, engines)
    executor = pipe.executor
    at_first_job: list[dict[int, bool]] = []
    submit = executor.submit

    def watched(job, *args, **kwargs):
        if not at_first_job:
            at_first_job.append({e.id: e.loop is not None for e in executor._engines.values()})
        return submit(job, *args, **kwargs)

    monkeypatch.setattr(executor, "submit", watched)
    task = pipe.task(sleepy)
    handles = [task(i, 0.05) for i in range(6)]
    assert pipe.run().ran == 6
    assert at_first_job and len(at_first_job[0]) == 2
    assert all(at_first_job[0].values()), at_first_job
    assert all(row["reaches_store"] for row in executor.engine_table())
    assert executor.loop_messages == executor.messages_sent == 6
    assert [h.result() for h in handles] == list(range(6))
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".nbindustria-probe" in p.name]
    # The engines answer ordinary requests again.
    assert sorted(engines.client[:].apply_sync(os.getpid)) == sorted(
        e.pid for e in executor._engines.values())


def test_task_loops_are_not_started_for_runs_that_place_nothing(tmp_path, engines, monkeypatch):
    """A run right after one that placed jobs starts the loops early (it will likely need
    them); once a run placed nothing (every result cached), the next one starts none unless a
    job is placed."""
    import nbindustria.dispatch as dispatch

    channels: list[object] = []

    class Counted(dispatch.Channel):
        def __init__(self, *args, **kwargs):
            channels.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(dispatch, "Channel", Counted)
    task_calls = 4

    def run_once(rerun: tuple[str, ...] = ()) -> tuple[int, int, int]:
        pipe = _pipe(tmp_path, engines)
        task = pipe.task(sleepy)
        handles = [task(i, 0.02) for i in range(task_calls)]
        before = len(channels)
        summary = pipe.run(rerun=rerun)
        assert [h.result() for h in handles] == list(range(task_calls))
        return summary.ran, summary.cached, len(channels) - before

    assert run_once() == (4, 0, 1)
    assert run_once() == (0, 4, 1)  # the last run placed jobs: started early, for nothing
    assert run_once() == (0, 4, 0)  # the last run placed nothing: none started
    assert run_once(("sleepy",)) == (4, 0, 1)  # started with the first job
    assert run_once() == (0, 4, 1)


def test_a_first_run_offers_each_next_task_to_whichever_engine_ends_first(tmp_path, engines):
    """Durations unknown: once both engines are busy, the next task is offered to both task
    loops and the first to end its task claims it and runs it at once (no round trip to the
    kernel between the two). No task runs before the previous one on its engine ended, tasks
    start in the order they were queued, and every result comes back."""
    pipe = _pipe(tmp_path, engines)
    task = pipe.task(record_pid)
    handles = [task(i, 0.05 + 0.03 * (i % 4)) for i in range(16)]
    assert pipe.run().ran == 16
    executor = pipe.executor
    rows = [h.result() for h in handles]
    assert [r[0] for r in rows] == list(range(16))
    assert executor.offers_made >= 10 and executor.offers_claimed >= 8, (
        executor.offers_made, executor.offers_claimed)
    # Greedy in queue order: a task starts no later than those queued after it (up to the
    # few ms by which two engines' starts can differ).
    starts = [r[2] for r in rows]
    assert all(a <= b + 0.01 for a, b in itertools.combinations(starts, 2)), starts
    for pid in {r[1] for r in rows}:
        mine = sorted((r[2], r[3]) for r in rows if r[1] == pid)
        assert all(b[0] >= a[1] for a, b in itertools.pairwise(mine))  # one at a time
    assert pipe.store.verify_all(quarantine=False) == {}


def test_offers_are_claimed_once(tmp_path):
    """Many claimers of one offer (threads here; engine processes in a run): exactly one
    wins, and the claim file names it; the kernel's take-back is just another claimer."""
    from nbindustria.engineloop import claim, claimed_by

    def claimer(name: str, seq: int, barrier: threading.Barrier, wins: list[str]) -> None:
        barrier.wait()
        if claim(str(tmp_path), seq, name):
            wins.append(name)

    for seq in range(20):
        wins: list[str] = []
        barrier = threading.Barrier(6)
        threads = [threading.Thread(target=claimer, args=(str(n), seq, barrier, wins))
                   for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and claimed_by(str(tmp_path), seq) == wins[0]
        assert not claim(str(tmp_path), seq, "kernel")
    assert claimed_by(str(tmp_path), 99) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"offer-{s}" for s in range(20))


def write_pid_as(directory: str, i: int, seconds: float) -> int:
    (Path(directory) / f"{i}.pid").write_text(str(os.getpid()))
    time.sleep(seconds)
    return i


def test_an_engine_killed_while_running_a_task_it_claimed_loses_nothing(tmp_path):
    """An engine dies in the middle of a task it claimed from an offer: that task runs again
    elsewhere, the offers still out go to the engines left, and every result is stored."""
    engines = cluster_mod.start_local(2)  # its own: killing engines ends their engine set
    try:
        _killed_while_running_a_claimed_task(tmp_path, engines)
    finally:
        engines.stop()


def _killed_while_running_a_claimed_task(tmp_path, engines):
    pipe = _pipe(tmp_path, engines)
    pids = tmp_path / "pids"
    pids.mkdir()
    task = pipe.task(write_pid_as)
    handles = [task(str(pids), i, 0.6 if i == 4 else 0.15) for i in range(12)]
    killed: list[int] = []
    # Tasks 0 and 1 are sent; later ones are offered: the engine dies 0.1 s into task 4.
    thread = _kill_when_written(pids / "4.pid", killed, within=60, poll=0.005, after=0.1)
    summary = pipe.run()
    thread.join()
    assert killed and summary.failed == 0 and summary.ran == 12
    assert pipe.executor.offers_claimed >= 2
    assert [h.result() for h in handles] == list(range(12))
    assert handles[4].reason.startswith("resubmitted") or "lost" in handles[4].reason
    assert pipe.store.verify_all(quarantine=False) == {}
