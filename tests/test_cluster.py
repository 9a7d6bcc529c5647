"""Engines on this machine: local and MPI clusters, started by us or by ipcluster, on real processes.

Each cluster start costs ~5-8 s on 2 cores, so tests share module-scoped clusters and order matters
only at the end (adding, killing and stopping engines come last). Profiles, logs and connection files
go to a temporary IPYTHONDIR, never ~/.ipython.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from nbindustria import cluster
from nbindustria.errors import EngineError

pytestmark = pytest.mark.engines

REPO = Path(__file__).resolve().parents[1]
HAVE_MPI = shutil.which("mpiexec") is not None and shutil.which("ipcluster") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpiexec (openmpi-bin) and ipcluster")
# Open MPI refuses to run as root without both variables (shared/RECIPES.md §1).
OMPI_ROOT_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


@pytest.fixture(scope="module", autouse=True)
def ipython_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("ipython")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IPYTHONDIR", str(path))
        yield path


@pytest.fixture(scope="module")
def local2(ipython_dir: Path) -> Iterator[cluster.Engines]:
    engines = cluster.start_local(2, timeout=90)
    yield engines
    engines.stop()


def process_tree(pids: list[int]) -> list[psutil.Process]:
    """The processes with these pids and all their descendants (engine nannies, MPI ranks)."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found.append(proc)
            found.extend(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return found


def alive(processes: list[psutil.Process], wait: float = 0.0) -> list[psutil.Process]:
    """Those still running (a zombie waiting for init to reap it has exited), after up to `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        left = []
        for proc in processes:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except psutil.NoSuchProcess:
                continue
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def our_ipyparallel_children() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ipyparallel" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


# --- a local cluster of 2 -------------------------------------------------------------------------


def test_start_local_reports_two_engines_on_this_host(local2: cluster.Engines) -> None:
    assert local2.owned
    assert local2.description == "2 local engines"
    assert local2.ids() == [0, 1]
    info = local2.info()
    assert [e.id for e in info] == [0, 1]
    assert len({e.pid for e in info}) == 2
    assert all(psutil.pid_exists(e.pid) for e in info)
    assert os.getpid() not in {e.pid for e in info}
    assert {e.host for e in info} == {socket.gethostname()}
    assert all(e.cores == psutil.cpu_count() and e.cores > 0 for e in info)
    assert all(e.memory == psutil.virtual_memory().total for e in info)
    assert all(e.mpi_rank is None and e.mpi_size is None for e in info)
    # Engines really run our work, each in its own process.
    assert sorted(local2.client[:].apply_sync(os.getpid)) == sorted(e.pid for e in info)


def test_info_is_cached_per_engine_and_refreshable(local2: cluster.Engines) -> None:
    first = local2.info()
    assert local2.info() == first
    assert local2.info(refresh=True) == first


def test_check_shared_dir(local2: cluster.Engines, tmp_path: Path) -> None:
    assert local2.check_shared_dir(tmp_path) == {0: True, 1: True}
    assert all(e.can_reach for e in local2.info())
    assert list(tmp_path.iterdir()) == []  # the probes are removed
    with pytest.raises(EngineError, match="probe file"):
        local2.check_shared_dir(tmp_path / "missing")


def test_wait_for_more_engines_than_exist_times_out(local2: cluster.Engines) -> None:
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"only 2 of 3 engine\(s\) registered"):
        local2.wait_for(3, timeout=1.0)
    assert time.monotonic() - start < 5


def test_add_engines_grows_ids(local2: cluster.Engines) -> None:
    new = local2.add_engines(1, timeout=60)
    assert new == [2]
    assert local2.ids() == [0, 1, 2]
    info = local2.info()
    assert len({e.pid for e in info}) == 3
    # The new engine takes work.
    assert local2.client[2].apply_sync(os.getpid) == info[2].pid


def test_interrupt_busy_stops_the_running_task_not_the_engine(local2: cluster.Engines) -> None:
    import ipyparallel

    pids = {e.id: e.pid for e in local2.info()}
    ar = local2.client[0].apply_async(time.sleep, 30)
    time.sleep(0.5)  # let it start
    start = time.monotonic()
    local2.interrupt_busy()  # engine 1 is idle: it must survive the signal too
    with pytest.raises(ipyparallel.error.RemoteError) as raised:
        ar.get(timeout=10)
    assert raised.value.ename == "KeyboardInterrupt"
    assert time.monotonic() - start < 5
    assert sorted(local2.client[:].apply_sync(os.getpid)) == sorted(pids.values())
    assert local2.ids() == sorted(pids)


def test_killed_engine_fails_its_task_fast_and_leaves_ids(local2: cluster.Engines) -> None:
    # What the engine executor relies on: a SIGKILLed engine's task fails with ipyparallel's
    # EngineError (wrapped in RemoteError) within a second, and its id leaves ids().
    import ipyparallel

    victim = local2.info()[-1]
    ar = local2.client[victim.id].apply_async(time.sleep, 30)
    time.sleep(0.5)  # let it start
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(ipyparallel.error.RemoteError) as raised:
        ar.get(timeout=15)
    assert raised.value.ename == "EngineError"
    assert time.monotonic() - killed < 5
    deadline = time.monotonic() + 5
    while victim.id in local2.ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.id not in local2.ids()
    assert [e.id for e in local2.info()] == local2.ids()


def test_stop_leaves_no_engine_processes(local2: cluster.Engines) -> None:
    tree = process_tree([e.pid for e in local2.info()])
    assert len(tree) >= 2  # engines and their nannies
    local2.stop()
    assert alive(tree) == []
    assert local2.ids() == []
    local2.stop()  # idempotent
    with pytest.raises(EngineError, match="were stopped"):
        local2.wait_for(1, timeout=1)


# --- the shared, embedded default -----------------------------------------------------------------


def engine_processes() -> set[int]:
    return {p.pid for p in our_ipyparallel_children() if p.cmdline()[2:3] == ["ipyparallel.engine"]}


def test_shared_local_is_one_instance_started_once(ipython_dir: Path) -> None:
    before = engine_processes()
    future = cluster.start_in_background(1)
    try:
        engines = cluster.shared_local(1)  # waits for the start under way: no second cluster
        assert future.result(timeout=90) is engines
        assert cluster.shared_local(1) is engines
        assert cluster.start_in_background(1).result(timeout=1) is engines
        assert engines.owned and engines.ids() == [0]
        assert len(engine_processes() - before) == 1
        tree = process_tree([e.pid for e in engines.info()])
    finally:
        cluster.stop_shared()
    assert engines.stopped
    assert alive(tree, wait=2) == []
    cluster.stop_shared()  # nothing left to stop


# --- errors ---------------------------------------------------------------------------------------


def test_connect_to_missing_profile_fails_fast(ipython_dir: Path) -> None:
    start = time.monotonic()
    with pytest.raises(EngineError) as raised:
        cluster.connect(profile="nbi-no-such-profile", timeout=30)
    assert time.monotonic() - start < 5
    message = str(raised.value)
    assert "'nbi-no-such-profile'" in message
    assert "ipcluster start -n 4 --profile nbi-no-such-profile --daemonize" in message


def test_connect_to_profile_without_controller_fails_fast(ipython_dir: Path) -> None:
    (ipython_dir / "profile_nbi-idle" / "security").mkdir(parents=True)
    start = time.monotonic()
    with pytest.raises(EngineError, match="no controller is running for profile 'nbi-idle'"):
        cluster.connect(profile="nbi-idle", timeout=30)
    assert time.monotonic() - start < 5


def test_controller_without_engines_then_dead_controller(ipython_dir: Path) -> None:
    security = ipython_dir / "profile_nbi-empty" / "security"
    controller = subprocess.Popen(
        [sys.executable, "-m", "ipyparallel.controller", "--profile=nbi-empty", "--ip=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tree = [psutil.Process(controller.pid)]
    try:
        deadline = time.monotonic() + 30
        while not (security / "ipcontroller-client.json").exists():
            assert time.monotonic() < deadline, "ipcontroller did not start"
            time.sleep(0.1)
        # A controller, but no engines: an error when the timeout is up, saying how to add some.
        start = time.monotonic()
        with pytest.raises(EngineError) as raised:
            cluster.connect(profile="nbi-empty", timeout=2.0)
        assert time.monotonic() - start < 6
        message = str(raised.value)
        assert "only 0 of 1 engine(s) registered" in message
        assert "ipcluster engines -n 4 --profile nbi-empty --daemonize" in message

        # Killed without cleaning up: its connection file stays, and nobody answers.
        tree = process_tree([controller.pid])
        for proc in tree:
            proc.kill()
        assert alive(tree, wait=5) == []
        start = time.monotonic()
        with pytest.raises(EngineError, match="does not answer") as raised:
            cluster.connect(profile="nbi-empty", timeout=2.0)
        assert time.monotonic() - start < 6
        assert "ipcluster stop --profile nbi-empty" in str(raised.value)
    finally:
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        controller.wait(20)


def test_start_local_that_cannot_finish_stops_what_it_started(ipython_dir: Path) -> None:
    before = {p.pid for p in our_ipyparallel_children()}
    start = time.monotonic()
    with pytest.raises(EngineError, match="could not start 1 local engine") as raised:
        cluster.start_local(1, timeout=0.5)
    assert time.monotonic() - start < 20
    assert "stopped what had started" in str(raised.value)
    assert "Pass a larger timeout (it was 0.5 s)" in str(raised.value)
    leftovers = [p for p in our_ipyparallel_children() if p.pid not in before]
    assert alive(leftovers, wait=2) == []


def test_bad_engine_count() -> None:
    with pytest.raises(EngineError, match=r"positive int or 'auto' \(got 0\)"):
        cluster.start_local(0)
    with pytest.raises(EngineError, match="got 'four'"):
        cluster.shared_local("four")


# --- MPI, both ways -------------------------------------------------------------------------------


@pytest.mark.mpi
@needs_mpi
def test_ipcluster_mpi_engines_then_connect(ipython_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, **OMPI_ROOT_ENV, "IPYTHONDIR": str(ipython_dir)}
    env.pop("PYTHONPATH", None)  # the probes must work on engines without nbindustria
    start_cmd = ["ipcluster", "start", "--engines=MPI", "-n", "2", "--profile", "nbi-mpi"]
    log = tmp_path / "ipcluster.log"
    with log.open("w") as out:
        done = subprocess.run(
            [*start_cmd, "--daemonize"], cwd=tmp_path, env=env, stdout=out, stderr=out, timeout=60
        )
    assert done.returncode == 0, log.read_text()
    tree: list[psutil.Process] = []
    try:
        engines = cluster.connect(profile="nbi-mpi", timeout=60, min_engines=2)
        try:
            assert not engines.owned
            assert engines.description == "2 MPI engines (profile nbi-mpi)"
            info = engines.info()
            assert {e.mpi_rank for e in info} == {0, 1}
            assert {e.mpi_size for e in info} == {2}
            assert len({e.pid for e in info}) == 2
            tree = process_tree([e.pid for e in info])
        finally:
            engines.stop()  # only closes our client
        assert len(alive(tree)) == len(tree)  # the cluster is not ours to stop
    finally:
        subprocess.run(
            ["ipcluster", "stop", "--profile", "nbi-mpi"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
    assert alive(tree, wait=10) == []


@pytest.mark.mpi
@needs_mpi
def test_start_local_mpi_engines(ipython_dir: Path) -> None:
    engines = cluster.start_local(2, mpi=True, timeout=90)
    try:
        assert engines.description == "2 MPI engines"
        info = engines.info()
        assert {e.mpi_rank for e in info} == {0, 1}
        assert {e.mpi_size for e in info} == {2}
        assert len({e.pid for e in info}) == 2
        # --bind-to none: each rank may use every core (a cpus=2 task must get 2).
        affinity = engines.client[:].apply_sync(os.sched_getaffinity, 0)
        assert all(len(cpus) == psutil.cpu_count() for cpus in affinity)
        tree = process_tree([e.pid for e in info])
    finally:
        engines.stop()
    assert alive(tree) == []


# --- the end of the process that started them -----------------------------------------------------

SCRIPT = """
import os, sys
from nbindustria import Pipeline

pipe = Pipeline(name="script", cache_dir=sys.argv[1], key_dir=sys.argv[2], engines=2, verbose=0)

@pipe.task
def where(i):
    return os.getpid()

handles = [where(i) for i in range(4)]
pipe.run()
print(sorted({h.result() for h in handles}), flush=True)
sys.stdin.readline()  # the test looks at our processes, then says how we end
"""


@pytest.mark.slow
@pytest.mark.parametrize("end", ["exit", "exception", "sigterm", "sigkill"])
def test_no_engine_survives_the_script_that_started_it(tmp_path: Path, end: str) -> None:
    """A script with ``Pipeline(engines=2)`` starts a local cluster; however the script ends
    (returns, raises, is terminated or killed), the controller and engines end with it."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT + {"exit": "", "exception": "raise SystemExit('boom')\n",
                                "sigterm": "import time; time.sleep(600)\n",
                                "sigkill": "import time; time.sleep(600)\n"}[end])
    errors = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "keys")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    tree: list[psutil.Process] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = " "
        while line and not line.startswith("["):  # the run's summary line comes first
            line = proc.stdout.readline()
        assert line.startswith("["), (tmp_path / "stderr").read_text()
        pids = set(eval(line))
        tree = [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "ipyparallel" in " ".join(p.cmdline())]
        engines = {p.pid for p in tree if p.cmdline()[2:3] == ["ipyparallel.engine"]}
        assert pids == engines and len(engines) == 2  # the tasks ran on the script's engines
        if end in ("exit", "exception"):
            proc.stdin.write("\n")
            proc.stdin.flush()
        else:
            proc.send_signal(signal.SIGTERM if end == "sigterm" else signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errors.close()
    assert alive(tree, wait=20) == [], [p.cmdline() for p in alive(tree)]
