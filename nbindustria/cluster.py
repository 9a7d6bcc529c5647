"""Engines: start a local ipyparallel cluster, or connect to one that is running (MPI included).

This is the only module of nbindustria that imports ipyparallel, and it does so inside the functions
that need it, so that ``import nbindustria`` stays fast.

- :func:`start_local` starts a controller and ``n`` engines on this machine (plain processes, or one
  ``mpiexec`` with ``mpi=True``) and returns an owned :class:`Engines`: ``stop()`` stops them all.
- :func:`connect` attaches to a cluster someone started with ``ipcluster start --profile NAME``
  (SSH, batch and MPI launchers included); ``stop()`` then only closes the client.
- :func:`shared_local` is the embedded default: one owned local cluster per process, reused by every
  run, started on first use (or early, by :func:`start_in_background`) and stopped at exit.

Every wait is bounded and every failure is an :class:`~nbindustria.errors.EngineError` that says what
happened and which command fixes it. ipyparallel's coroutines (cluster start/stop) run on a private
event-loop thread per owned cluster, so they behave the same in a script and in a Jupyter kernel
whose own loop is already running.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import glob
import importlib.util
import json
import logging
import os
import secrets
import shutil
import site
import subprocess
import threading
import time
import types
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import EngineError
from .worker import probe_shared_dir

if TYPE_CHECKING:
    import ipyparallel

__all__ = [
    "EngineInfo",
    "Engines",
    "connect",
    "shared_local",
    "start_in_background",
    "start_local",
    "stop_shared",
]

_T = TypeVar("_T")

#: How long a small probe function (facts, shared-dir check) may take on an engine. Engines run
#: one request at a time, so an engine busy with a long task answers late: that is an error, not a hang.
PROBE_TIMEOUT = 30.0

#: Seconds an owned cluster gets to stop before its leftover processes are killed.
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class EngineInfo:
    """Facts about one engine, measured on the engine itself.

    Attributes
    ----------
    id : int
        The ipyparallel engine id.
    host : str
        ``socket.gethostname()`` on the engine.
    pid : int
        The engine's process id (on ``host``).
    mpi_rank, mpi_size : int or None
        Rank and size of ``MPI.COMM_WORLD`` when the engine runs under MPI (mpi4py loaded and
        initialised), else None.
    cores : int
        Logical CPUs of the engine's host (psutil): engines on one host share them.
    memory : int
        Total memory of the engine's host in bytes (psutil).
    can_reach : bool
        Whether the engine could read and write the directory last given to
        :meth:`Engines.check_shared_dir` (False until that is called).
    """

    id: int
    host: str
    pid: int
    mpi_rank: int | None
    mpi_size: int | None
    cores: int
    memory: int
    can_reach: bool = False


# --- functions that run on the engines ----------------------------------------------------------
# They import what they use inside their bodies and are sent by value (see _by_value), so an engine
# can answer them even where nbindustria itself is not installed.


def _engine_facts() -> dict[str, Any]:
    """Host, pid, MPI rank/size, cores and memory of the engine that runs this."""
    import os
    import socket
    import sys

    import psutil

    rank = size = None
    # Only ask MPI when the engine already loaded it (ipengine --mpi does): importing mpi4py here
    # would initialise MPI in a plain engine, which is slow and, as root, refused by Open MPI.
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        rank, size = mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "mpi_rank": rank,
        "mpi_size": size,
        "cores": psutil.cpu_count() or 1,
        "memory": psutil.virtual_memory().total,
    }


class SharedDirProbe:
    """A probe file with a random token, written by the kernel into a directory: an engine
    that reads the token back and can write a file beside it shares that directory (same host,
    or a shared filesystem). :meth:`Engines.start_shared_dir_check` sends :meth:`check` through
    ipyparallel; an engine's task loop runs it when it starts (dispatch.py)."""

    def __init__(self, path: str | os.PathLike[str]):
        directory = os.path.abspath(os.fspath(path))
        self.token = secrets.token_hex(16)
        self.path = os.path.join(directory, f".nbindustria-probe-{self.token}")
        try:
            with open(self.path, "x", encoding="utf-8") as f:
                f.write(self.token)
        except OSError as exc:
            raise EngineError(
                f"cannot write a probe file into {directory!r} from the kernel ({exc}); "
                "the directory must exist and be writable to be shared with engines"
            ) from exc

    def check(self) -> Callable[[], bool]:
        """What an engine calls (nbindustria installed there) to answer the probe."""
        return functools.partial(probe_shared_dir, self.path, self.token)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _by_value(func: Callable[..., _T]) -> Callable[..., _T]:
    """A copy of ``func`` that ipyparallel ships as code instead of importing its module.

    ipyparallel re-imports a function's module on the engine to find its globals, except for
    interactively defined functions (module ``__main__``), whose code it sends. The probes use
    no module globals, so a copy "defined in __main__" works on engines without nbindustria.
    """
    copy = types.FunctionType(func.__code__, {"__name__": "__main__"}, func.__name__)
    copy.__module__ = "__main__"
    return copy


# --- the private event loop of an owned cluster ---------------------------------------------------


class _LoopThread:
    """An asyncio loop in a daemon thread, to run ipyparallel's Cluster coroutines with a timeout.

    ipyparallel's ``*_sync`` wrappers use a throw-away loop per call when none is running; the
    launchers then post their "process exited" callbacks to a closed loop. One long-lived loop per
    cluster keeps those callbacks working and gives every call a bound.
    """

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float, what: str) -> _T:
        """Run ``coro`` on the loop; TimeoutError naming ``what`` if it takes over ``timeout`` s."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(max(timeout, 0.0))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{what} did not finish in time") from None

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


# --- Engines --------------------------------------------------------------------------------------


class Engines:
    """A connected set of ipyparallel engines (started by us or found running).

    Use :func:`start_local`, :func:`connect` or :func:`shared_local` to get one.

    Attributes
    ----------
    client : ipyparallel.Client
        The connected client: ``client[engine_id].apply_async(...)`` runs work on one engine.
    owned : bool
        True when nbindustria started this cluster: :meth:`stop` then stops its processes.
    description : str
        For people, e.g. ``"2 local engines"`` or ``"4 MPI engines (profile mpi)"``.
    """

    client: ipyparallel.Client
    owned: bool
    description: str

    def __init__(
        self,
        client: ipyparallel.Client,
        *,
        owned: bool,
        description: str,
        how_to_start: str,
        cluster: ipyparallel.Cluster | None = None,
        loop: _LoopThread | None = None,
    ):
        self.client = client
        self.owned = owned
        self.description = description
        # The command that brings these engines (back): quoted in errors.
        self._how_to_start = how_to_start
        self._cluster = cluster
        self._loop = loop
        self._facts: dict[int, dict[str, Any]] = {}
        self._reach: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._exits: dict[int, Any] = {}  # pid -> exit code of engines that stopped (owned)
        self._watched: set[int] = set()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"ids={self.ids()}"
        return f"<Engines {self.description!r} owned={self.owned} {state}>"

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopped

    def ids(self) -> list[int]:
        """Engine ids currently registered with the controller (empty once stopped).

        The client updates this list from the controller's notifications, so polling it is how
        to notice engines that join or die (a dead engine leaves it within ~0.1 s locally).
        """
        if self._stopped:
            return []
        return list(self.client.ids)

    def wait_for(self, n: int, timeout: float) -> None:
        """Wait until at least ``n`` engines are registered.

        Raises
        ------
        EngineError
            If fewer than ``n`` register within ``timeout`` seconds, or (owned clusters) the engine
            processes exit while we wait; the message says how to start engines and, for a
            cluster we started, ends with the last lines of its logs.
        """
        self._check_running()
        if len(self.client.ids) >= n:
            return
        future = self.client.wait_for_engines(
            n, timeout=max(timeout, 0.0), block=False, interactive=False
        )
        try:
            # ipyparallel enforces the timeout on its IO thread; the extra margin here only guards
            # against that thread being stuck, so that this call can never hang.
            future.result(timeout + 10.0)
        except Exception as exc:
            have = self.client.ids
            reason = (
                f"only {len(have)} of {n} engine(s) registered within {timeout:.1f} s (ids {have})"
                if isinstance(exc, TimeoutError)
                else f"engines stopped while waiting for {n} of them: {exc}"
            )
            raise EngineError(
                f"{self.description}: {reason}. {self._how_to_start}{self._log_tail_text()}"
            ) from exc

    def info(self, refresh: bool = False) -> list[EngineInfo]:
        """Host, pid, MPI rank, cores and memory of every registered engine, in id order.

        Facts are measured on each engine (a small function run there) the first time an id is
        seen and cached per id; ``refresh=True`` measures them all again.

        Raises
        ------
        EngineError
            If an engine does not answer within :data:`PROBE_TIMEOUT` (busy with a long task, or
            dead) or the probe fails there.
        """
        ids = self.ids()
        with self._lock:
            todo = [i for i in ids if refresh or i not in self._facts]
        if todo:
            results = self._on_each(todo, _engine_facts)
            still = set(self.client.ids)
            # An engine that died meanwhile is simply no longer listed; one that is there and did
            # not answer is an error.
            failed = {
                i: r for i, r in results.items() if isinstance(r, BaseException) and i in still
            }
            results = {i: r for i, r in results.items() if isinstance(r, dict)}
            ids = [i for i in ids if i in still]
            if failed:
                detail = "; ".join(f"engine {i}: {r}" for i, r in failed.items())
                raise EngineError(
                    f"could not read the facts of engine(s) {sorted(failed)} ({detail}). "
                    "An engine answers one request at a time: wait for its current task, or "
                    "restart the engines."
                )
            with self._lock:
                self._facts.update(results)
        with self._lock:
            # Forget engines that left, so a reused id is measured again.
            for gone in set(self._facts) - set(ids):
                del self._facts[gone]
            return [
                EngineInfo(id=i, can_reach=self._reach.get(i, False), **self._facts[i])
                for i in ids
                if i in self._facts
            ]

    def check_shared_dir(
        self, path: str | os.PathLike[str], ids: list[int] | None = None
    ) -> dict[int, bool]:
        """Which engines can read and write files in ``path`` (same host or a shared filesystem).

        The kernel writes a probe file with a random token into ``path``; each engine reads it
        back, compares the token, and writes (then removes) a file of its own beside it. The probe
        is removed afterwards. The answers are kept and show as :attr:`EngineInfo.can_reach`.
        ``ids``: probe only these engines (default: all; their answers replace the kept ones).

        Returns
        -------
        dict of int to bool
            Per engine id; an engine that fails or does not answer in time counts as False.

        Raises
        ------
        EngineError
            If the kernel itself cannot write into ``path``.
        """
        return self.start_shared_dir_check(path, ids)()

    def start_shared_dir_check(
        self, path: str | os.PathLike[str], ids: list[int] | None = None
    ) -> Callable[[], dict[int, bool]]:
        """:meth:`check_shared_dir` in two steps: this sends the probe to the engines and
        returns at once; calling what it returns waits for their answers (so the round trip
        overlaps other work)."""
        probe = SharedDirProbe(path)
        try:
            pending, results = self._send_each(self.ids() if ids is None else ids,
                                               probe_shared_dir, probe.path, probe.token)
        except BaseException:
            probe.remove()
            raise

        def answers() -> dict[int, bool]:
            try:
                results.update(self._gather(pending))
            finally:
                probe.remove()
            reach = {i: r is True for i, r in results.items()}
            self.remember_reach(reach, replace=ids is None)
            return reach

        return answers

    def remember_reach(self, reach: dict[int, bool], replace: bool = False) -> None:
        """Keep engines' answers to a shared-dir probe (shown as :attr:`EngineInfo.can_reach`);
        ``replace``: they replace every kept answer."""
        with self._lock:
            if replace:
                self._reach = dict(reach)
            else:
                self._reach.update(reach)

    def add_engines(self, n: int, timeout: float = 90.0) -> list[int]:
        """Start ``n`` more engines in this (owned) cluster and wait for them to register.

        Local clusters get ``n`` more engine processes; MPI clusters one more ``mpiexec -n n``
        (its own MPI world: ranks 0..n-1). A running pipeline sees them in :meth:`ids`.

        Returns
        -------
        list of int
            The ids of the engines that registered meanwhile.

        Raises
        ------
        EngineError
            For engines we did not start (use ``ipcluster engines``), or when the new engines do
            not register within ``timeout`` seconds.
        """
        n = _check_count(n)
        self._check_running()
        if not self.owned or self._cluster is None or self._loop is None:
            raise EngineError(
                f"{self.description} were not started by nbindustria, so it cannot add engines "
                "to them: start more with `ipcluster engines -n N --profile NAME --daemonize` "
                "(the profile they were started with)"
            )
        before = set(self.client.ids)
        want = len(before) + n
        deadline = time.monotonic() + timeout
        try:
            self._loop.run(
                self._cluster.start_engines(n, environment=_engine_environment()),
                timeout,
                "starting the engines",
            )
        except Exception as exc:
            raise EngineError(
                f"could not start {n} more engine(s): {exc}{self._log_tail_text()}"
            ) from exc
        self._watch_exits()
        self.wait_for(want, deadline - time.monotonic())
        _reap_if_orphaned(_cluster_processes(self._cluster))
        return sorted(set(self.client.ids) - before)

    def interrupt_busy(self, ids: list[int] | None = None, timeout: float = 5.0) -> None:
        """Interrupt the task running on engines, as Ctrl-C would: the engines live on.

        Sends SIGINT (through each engine's nanny): a running task raises ``KeyboardInterrupt``
        (its AsyncResult fails with ``RemoteError``, ``ename == "KeyboardInterrupt"``) within
        ~0.2 s, and an idle engine ignores it. Tasks still queued behind it then run: abort those
        first with ``client.abort(async_results)``.

        Parameters
        ----------
        ids : list of int, optional
            The engines to interrupt; default: every registered engine (also those busy with
            another client's work, on a cluster shared with others).
        timeout : float
            Seconds to wait for the engines to acknowledge; engines that do not are skipped.
        """
        targets = [i for i in (self.ids() if ids is None else ids) if i in self.client.ids]
        if not targets:
            return
        import signal

        reply = self.client.send_signal(signal.SIGINT, targets=targets, block=False)
        with contextlib.suppress(Exception):  # best effort: a dead engine does not answer
            reply.get(timeout)

    def _watch_exits(self) -> None:
        """Remember how each engine process of an owned local cluster ends (its exit code or
        signal), so that a task whose engine died can say how it died."""
        if self._cluster is None:
            return
        for engine_set in list(getattr(self._cluster, "engines", {}).values()):
            for launcher in list(getattr(engine_set, "launchers", {}).values()):
                if id(launcher) in self._watched or not hasattr(launcher, "on_stop"):
                    continue
                self._watched.add(id(launcher))

                def record(data: Any, launcher: Any = launcher) -> None:
                    pid = (data or {}).get("pid") or getattr(launcher, "pid", None)
                    if pid is not None:
                        self._exits[int(pid)] = (data or {}).get("exit_code")

                launcher.on_stop(record)

    def exit_status(self, pid: int, wait: float = 0.5) -> str | None:
        """How the engine process ``pid`` ended ("killed by SIGKILL", "exited with code 1"),
        if this is an owned local cluster and it has ended; waits up to ``wait`` seconds for the
        news (it comes a moment after the engine's task is reported lost)."""
        deadline = time.monotonic() + wait
        while pid not in self._exits and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid not in self._exits:
            return None
        code = self._exits[pid]
        try:
            number = int(code)
        except (TypeError, ValueError):
            return f"ended ({code})"
        if number < 0:
            import signal

            try:
                return f"killed by {signal.Signals(-number).name}"
            except ValueError:
                return f"killed by signal {-number}"
        return f"exited with code {number}"

    def stop(self) -> None:
        """Stop the engines if we started them, else just close the client. Idempotent.

        For an owned cluster every process it started (controller, engines, their nanny and
        ``mpiexec`` processes) is gone when this returns: what ipyparallel does not stop within
        :data:`STOP_TIMEOUT` seconds is killed.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        _OWNED.discard(self)
        if not self.owned or self._cluster is None or self._loop is None:
            self.client.close()
            return
        self.client.close(linger=0)
        _stop_cluster(self._cluster, self._loop)

    # -- helpers --

    def _check_running(self) -> None:
        if self._stopped:
            raise EngineError(f"{self.description} were stopped. {self._how_to_start}")

    def _on_each(
        self, ids: list[int], func: Callable[..., Any], *args: Any, timeout: float = PROBE_TIMEOUT
    ) -> dict[int, Any]:
        """Run ``func(*args)`` on each engine; per id its result or the exception it raised."""
        pending, results = self._send_each(ids, func, *args)
        results.update(self._gather(pending, timeout))
        return results

    def _send_each(self, ids: list[int], func: Callable[..., Any], *args: Any
                   ) -> tuple[dict[int, Any], dict[int, Any]]:
        """Send ``func(*args)`` to each engine: (AsyncResult per id, exception per id that
        could not be sent)."""
        results: dict[int, Any] = {}
        pending: dict[int, Any] = {}
        if not ids:
            return pending, results
        import ipyparallel

        remote = _by_value(func)
        for i in ids:
            try:
                pending[i] = self.client[i].apply_async(remote, *args)
            except (IndexError, ipyparallel.error.IPythonError) as exc:  # left meanwhile
                results[i] = exc
        return pending, results

    def _gather(self, pending: dict[int, Any], timeout: float = PROBE_TIMEOUT
                ) -> dict[int, Any]:
        import ipyparallel

        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        for i, ar in pending.items():
            try:
                results[i] = ar.get(max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                results[i] = TimeoutError(f"no answer within {timeout:g} s")
            except ipyparallel.error.IPythonError as exc:
                results[i] = exc
        return results

    def _log_tail_text(self) -> str:
        if not self.owned or self._cluster is None:
            return ""
        tail = _log_tail(self._cluster)
        return f"\nLast lines of the cluster's logs:\n{tail}" if tail else ""


_log = logging.getLogger(__name__)

# Owned clusters still running: stopped at exit (strong references, so that a cluster nobody
# holds any more is still stopped rather than leaked).
_OWNED: set[Engines] = set()
_ATEXIT_LOCK = threading.Lock()
_atexit_registered = False


def _stop_all_owned() -> None:
    for engines in list(_OWNED):
        with contextlib.suppress(Exception):
            engines.stop()


# --- the reaper: no engine outlives the process that started it -----------------------------------
# atexit stops owned clusters when the process ends normally. A process that is killed (SIGKILL,
# the OOM killer, SIGTERM without a handler) runs no atexit, and ipyparallel's processes do not
# watch the process that started them. So a small reaper process holds the read end of a pipe
# from us; when we end, however we end, the pipe closes and the reaper kills what we started.

_REAPER_CODE = """
import sys
import psutil

started = {}
for line in sys.stdin:  # "pid create_time" per process; end of file: our parent is gone
    pid, created = line.split()
    started[int(pid)] = float(created)
victims = []
for pid, created in started.items():
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) > 0.01:
            continue  # that pid was reused by an unrelated process
        victims += [proc, *proc.children(recursive=True)]
    except psutil.Error:
        continue
for proc in victims:
    try:
        proc.kill()
    except psutil.Error:
        pass
"""

_REAPER_LOCK = threading.Lock()
_reaper: subprocess.Popen[str] | None = None


def _reap_if_orphaned(processes: list[Any]) -> None:
    """Have the reaper kill ``processes`` (and their children) if this process dies first."""
    global _reaper
    import sys

    lines = []
    for proc in processes:
        with contextlib.suppress(Exception):
            lines.append(f"{proc.pid} {proc.create_time()}\n")
    with _REAPER_LOCK:
        try:
            if _reaper is None or _reaper.poll() is not None:
                # Its own session: a Ctrl-C meant for us must not end it.
                _reaper = subprocess.Popen(
                    [sys.executable, "-c", _REAPER_CODE], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                    start_new_session=True)
            assert _reaper.stdin is not None
            _reaper.stdin.write("".join(lines))
            _reaper.stdin.flush()
        except OSError as exc:  # the safety net is gone; atexit still stops the clusters
            _log.warning("could not hand engine processes to the reaper: %s", exc)


def _register_owned(engines: Engines) -> None:
    global _atexit_registered
    with _ATEXIT_LOCK:
        _OWNED.add(engines)
        if not _atexit_registered:
            atexit.register(_stop_all_owned)
            _atexit_registered = True


# --- starting and connecting ----------------------------------------------------------------------


def _check_count(n: int | str) -> int:
    """``n`` as a positive engine count; ``"auto"`` is one engine per core."""
    if n == "auto":
        return os.cpu_count() or 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EngineError(f"the number of engines must be a positive int or 'auto' (got {n!r})")
    return n


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _engine_environment() -> dict[str, str]:
    """Environment for local engines: they must import the same nbindustria as this process.

    When nbindustria runs from a source checkout (not installed), engines started elsewhere would
    not find it, so its parent directory goes in front of PYTHONPATH. Installed copies (in
    site-packages) need nothing.
    """
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site_dirs = {os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if parent in site_dirs:
        return {}
    current = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join([parent, current]) if current else parent}


@functools.cache
def _is_open_mpi(mpiexec: str) -> bool:
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def _mpi_args(mpiexec: str) -> list[str]:
    """mpiexec flags a local MPI cluster needs.

    Open MPI refuses to run as root without ``--allow-run-as-root`` (and ``ipcluster`` still exits
    0, so the engines just never come), and refuses more ranks than cores without
    ``--oversubscribe``. Passing them as ``Cluster(mpi_args=...)`` is silently ignored: they must go
    in as traitlets config (``MPILauncher.mpi_args``). ``--bind-to none``: Open MPI pins each rank
    to one core by default, which would leave a ``cpus=2`` task one core. MPICH needs none of these
    and rejects them.
    """
    if not _is_open_mpi(mpiexec):
        return []
    args = ["--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.insert(0, "--allow-run-as-root")
    return args


def _check_mpi_available() -> str:
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise EngineError(
            "MPI engines need an MPI implementation, and no `mpiexec` is on PATH: install one "
            "(Debian/Ubuntu: `apt-get install openmpi-bin`; or `pip install mpich`)"
        )
    if importlib.util.find_spec("mpi4py") is None:
        raise EngineError("MPI engines need mpi4py: `pip install mpi4py`")
    return mpiexec


def _cluster_processes(cluster: ipyparallel.Cluster) -> list[Any]:
    """psutil.Process of the controller, the engines, and everything they started."""
    import psutil

    pids: list[int] = []
    if cluster.controller is not None:
        pids.append(cluster.controller.pid)
    for engine_set in cluster.engines.values():
        children = getattr(engine_set, "launchers", None)  # local sets: one launcher per engine
        if children:
            pids.extend(launcher.pid for launcher in children.values())
        else:  # an mpiexec (or another single-process launcher)
            pids.append(getattr(engine_set, "pid", -1))
    processes = []
    for pid in pids:
        if pid is None or pid <= 0:
            continue
        try:
            proc = psutil.Process(pid)
            processes.append(proc)
            processes.extend(proc.children(recursive=True))
        except psutil.Error:
            continue
    return processes


def _running(proc: Any) -> bool:
    import psutil

    try:
        # An exited process whose parent died stays a zombie until init reaps it: that is gone.
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _kill_leftovers(processes: list[Any], grace: float = 5.0) -> None:
    """Wait up to ``grace`` seconds for ``processes`` to exit, then SIGKILL the rest."""
    import psutil

    deadline = time.monotonic() + grace
    alive = [p for p in processes if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _running(p)]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _running(p)]


def _log_tail(cluster: ipyparallel.Cluster, lines: int = 20) -> str:
    """The last lines of each log file this cluster's controller and engines wrote."""
    log_dir = os.path.join(cluster.profile_dir, "log")
    parts = []
    for path in sorted(glob.glob(os.path.join(log_dir, f"*{cluster.cluster_id}*.log"))):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            continue
        if tail:
            parts.append(f"--- {path} ---\n" + "\n".join(tail))
    return "\n".join(parts)


def start_local(
    n: int | str = "auto", *, mpi: bool = False, timeout: float = 90.0, log_level: int = 30
) -> Engines:
    """Start a controller and ``n`` engines on this machine and connect to them.

    Parameters
    ----------
    n : int or "auto"
        Number of engines; ``"auto"`` starts one per core (``os.cpu_count()``).
    mpi : bool
        Start the engines with one ``mpiexec -n n`` (they share an MPI world, ranks 0..n-1). For
        Open MPI, ``--allow-run-as-root`` (as root), ``--oversubscribe`` and ``--bind-to none``
        are passed for you.
    timeout : float
        Seconds for the controller to start and all ``n`` engines to register.
    log_level : int
        Level of ipyparallel's cluster log (``logging`` levels; 30 = warnings).

    Returns
    -------
    Engines
        Owned: :meth:`Engines.stop` (or the end of the process) stops every process started.

    Raises
    ------
    EngineError
        If MPI or mpi4py are missing, or the engines do not register in time; what was started is
        stopped first, and the message ends with the last lines of the cluster's logs.
    """
    count = _check_count(n)
    mpiexec = _check_mpi_available() if mpi else ""
    import ipyparallel
    from traitlets.config import Config

    config = Config()
    if mpi:
        config.MPILauncher.mpi_args = _mpi_args(mpiexec)
    cluster_id = f"nbi-{os.getpid()}-{secrets.token_hex(3)}"
    log = logging.getLogger(f"{__name__}.ipyparallel.{cluster_id}")
    log.setLevel(log_level)
    what = _plural(count, "MPI engine" if mpi else "local engine")
    how = (
        "Check that `mpiexec -n 2 python3 -c 'import mpi4py.MPI'` works here (as root, Open MPI "
        "also needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 for that)."
        if mpi
        else "Check that `ipcluster start -n 2` works here."
    )
    loop = _LoopThread(name=f"nbindustria-cluster-{cluster_id}")
    cluster = ipyparallel.Cluster(
        n=count,
        engines="mpi" if mpi else "local",
        cluster_id=cluster_id,
        config=config,
        log=log,
        # Our own profile settings only: a user's ipcluster_config.py (e.g. batch launchers)
        # must not change what the embedded default starts.
        load_profile=False,
        # We stop it ourselves (Engines.stop, atexit): ipyparallel's exit hook prints to stderr.
        shutdown_atexit=False,
    )
    deadline = time.monotonic() + timeout
    engines: Engines | None = None
    try:
        loop.run(cluster.start_controller(), timeout, "starting the controller")
        loop.run(
            cluster.start_engines(count, environment=_engine_environment()),
            deadline - time.monotonic(),
            "starting the engines",
        )
        client = loop.run(
            cluster.connect_client(), deadline - time.monotonic(), "connecting to the controller"
        )
        engines = Engines(
            client,
            owned=True,
            description=what,
            how_to_start=how,
            cluster=cluster,
            loop=loop,
        )
        _register_owned(engines)
        engines._watch_exits()
        _reap_if_orphaned(_cluster_processes(cluster))
        engines.wait_for(count, deadline - time.monotonic())
    except BaseException as exc:
        tail = _log_tail(cluster)
        if engines is not None:
            engines.stop()
        else:
            _stop_cluster(cluster, loop)
        if not isinstance(exc, Exception):  # KeyboardInterrupt: stopped, now let it through
            raise
        failed = f"could not start {what} (stopped what had started)"
        if isinstance(exc, EngineError):  # from wait_for: already says how, with the logs
            raise EngineError(f"{failed}: {exc}") from exc
        if isinstance(exc, TimeoutError):
            how = f"Pass a larger timeout (it was {timeout:g} s), or: {how[0].lower()}{how[1:]}"
        raise EngineError(
            f"{failed}: {exc}. {how}"
            + (f"\nLast lines of the cluster's logs:\n{tail}" if tail else "")
        ) from exc
    return engines


async def _stop_in_order(cluster: ipyparallel.Cluster) -> None:
    """Engines first, then the controller.

    Each engine's nanny reports the engine's exit to the controller before it exits itself; with
    the controller already gone (ipyparallel's stop_cluster stops both at once) the nannies wait
    for it and are killed seconds later.
    """
    await cluster.stop_engines()
    await cluster.stop_controller()


def _stop_cluster(cluster: ipyparallel.Cluster, loop: _LoopThread) -> None:
    """Stop every process of an owned cluster (killing what does not stop), then its loop."""
    processes = _cluster_processes(cluster)
    # Engines stopped on purpose exit with SIGTERM's status, and ipyparallel then logs their
    # whole output as a warning: noise, not news, so silence this cluster's log while stopping.
    cluster.log.setLevel(logging.CRITICAL)
    try:
        loop.run(_stop_in_order(cluster), STOP_TIMEOUT, "stopping the cluster")
        # Let the launchers' exit callbacks run before the loop goes.
        loop.run(asyncio.sleep(0.05), 5, "exit callbacks")
    except Exception as exc:  # stopping must not fail: leftovers are killed below
        _log.warning("stopping cluster %s: %s; killing what is left", cluster.cluster_id, exc)
    _kill_leftovers(processes)
    loop.stop()


def _controller_starting(security_dir: str, cluster_id: str) -> bool:
    """True if ipcluster recorded a live controller for this cluster id (file not written yet)."""
    import psutil

    try:
        with open(os.path.join(security_dir, f"cluster-{cluster_id}.json"), encoding="utf-8") as f:
            pid = json.load(f)["controller"]["state"]["pid"]
        return bool(psutil.pid_exists(int(pid)))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def connect(
    profile: str | None = None,
    *,
    cluster_id: str = "",
    timeout: float = 30.0,
    min_engines: int = 1,
) -> Engines:
    """Connect to a running ipyparallel cluster (``ipcluster start --profile NAME``).

    Parameters
    ----------
    profile : str, optional
        The IPython profile the cluster was started with (default: ``"default"``), looked up in
        ``$IPYTHONDIR`` (``~/.ipython``).
    cluster_id : str
        The cluster id, if it was started with one (``ipcluster start --cluster-id ID``).
    timeout : float
        Seconds to wait, in all, for the controller to answer and ``min_engines`` to register.
    min_engines : int
        How many engines must be registered before this returns.

    Returns
    -------
    Engines
        Not owned: :meth:`Engines.stop` closes the client and leaves the cluster running.

    Raises
    ------
    EngineError
        At once for a profile that does not exist or has no running controller; after
        ``timeout`` for a controller that does not answer or engines that do not register.
    """
    import ipyparallel
    import zmq
    from IPython.core.profiledir import ProfileDir, ProfileDirError
    from IPython.paths import get_ipython_dir

    name = profile or "default"
    with_id = f" --cluster-id {cluster_id}" if cluster_id else ""
    start_cmd = f"ipcluster start -n 4 --profile {name}{with_id} --daemonize"
    mpi_cmd = f"ipcluster start --engines=MPI -n 4 --profile {name}{with_id} --daemonize"
    how = f"Start engines with `{start_cmd}` (MPI engines: `{mpi_cmd}`)."
    deadline = time.monotonic() + timeout
    ipython_dir = get_ipython_dir()
    try:
        profile_dir = ProfileDir.find_profile_dir_by_name(ipython_dir, name)
    except ProfileDirError:
        raise EngineError(
            f"there is no IPython profile {name!r} in {ipython_dir}, so no cluster to connect "
            f"to. {how} ipcluster creates the profile."
        ) from None

    security = profile_dir.security_dir
    client_file = os.path.join(
        security,
        f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json",
    )
    # `ipcluster start --daemonize` returns before the controller writes its connection file:
    # wait for it only while a live controller is recorded, else say at once that none runs.
    while not os.path.exists(client_file) and time.monotonic() < deadline:
        if not _controller_starting(security, cluster_id):
            break
        time.sleep(0.1)
    if not os.path.exists(client_file):
        raise EngineError(
            f"no controller is running for profile {name!r}"
            + (f" and cluster id {cluster_id!r}" if cluster_id else "")
            + f" (no connection file {client_file}). {how}"
        )

    try:
        client = ipyparallel.Client(
            client_file,
            profile_dir=profile_dir.location,
            timeout=max(deadline - time.monotonic(), 0.5),
        )
    except (OSError, TimeoutError, ValueError, KeyError, zmq.ZMQError) as exc:
        raise EngineError(
            f"the controller of profile {name!r} does not answer ({exc}): its connection file "
            f"may be left over from a controller that died. Restart it: "
            f"`ipcluster stop --profile {name}{with_id}` then `{start_cmd}`"
        ) from exc

    where = f"profile {name}" + (f", cluster {cluster_id}" if cluster_id else "")
    # The controller answers, so what is missing now are engines: say how to add them to it.
    add = f"ipcluster engines -n 4 --profile {name}{with_id} --daemonize"
    engines = Engines(
        client,
        owned=False,
        description=f"engines ({where})",
        how_to_start=f"A controller is running for {where}: start engines for it with `{add}` "
        f"(MPI engines: add --engines=MPI), or restart the cluster with "
        f"`ipcluster stop --profile {name}{with_id}` then `{start_cmd}`.",
    )
    try:
        engines.wait_for(min_engines, deadline - time.monotonic())
    except BaseException:
        engines.stop()
        raise
    # Name them for people ("4 MPI engines (profile mpi)"). Engines busy with someone else's long
    # task answer late: then the description just does without the MPI tag.
    ids = engines.ids()
    answers = engines._on_each(ids, _engine_facts, timeout=min(5.0, max(timeout, 1.0)))
    with engines._lock:
        engines._facts.update({i: r for i, r in answers.items() if isinstance(r, dict)})
    mpi = any(isinstance(r, dict) and r["mpi_rank"] is not None for r in answers.values())
    engines.description = f"{_plural(len(ids), 'MPI engine' if mpi else 'engine')} ({where})"
    return engines


# --- the embedded default: one shared local cluster per process -----------------------------------

_SHARED_LOCK = threading.Lock()
_shared: Engines | None = None
_shared_key: tuple[int, bool] | None = None
# A start under way (maybe in start_in_background's thread), and its n/mpi: callers wait on it.
_pending: concurrent.futures.Future[Engines] | None = None
_pending_key: tuple[int, bool] | None = None


def _claim(
    key: tuple[int, bool],
) -> tuple[concurrent.futures.Future[Engines], Engines | None, bool]:
    """Under the lock: (future to wait on, cluster to stop first, whether the caller starts it)."""
    global _shared, _shared_key, _pending, _pending_key
    with _SHARED_LOCK:
        if _pending is not None:
            return _pending, None, False
        # A shared cluster whose engines all died is replaced, not handed out.
        if _shared is not None and _shared_key == key and _shared.ids():
            done: concurrent.futures.Future[Engines] = concurrent.futures.Future()
            done.set_result(_shared)
            return done, None, False
        old, _shared, _shared_key = _shared, None, None
        _pending, _pending_key = concurrent.futures.Future(), key
        return _pending, old, True


def _fulfil(
    future: concurrent.futures.Future[Engines], key: tuple[int, bool], old: Engines | None
) -> None:
    """Start the shared cluster for ``key`` and settle ``future`` (never raises)."""
    global _shared, _shared_key, _pending, _pending_key
    try:
        if old is not None:
            old.stop()
        engines = start_local(key[0], mpi=key[1])
        # Measure the engines' facts now, while nobody waits (a start in the background):
        # the first run then finds them known instead of asking every engine.
        with contextlib.suppress(EngineError):
            engines.info()
    except BaseException as exc:
        with _SHARED_LOCK:
            _pending = _pending_key = None
        future.set_exception(exc)
        return
    with _SHARED_LOCK:
        _shared, _shared_key, _pending, _pending_key = engines, key, None, None
    future.set_result(engines)


def shared_local(n: int | str = "auto", *, mpi: bool = False) -> Engines:
    """The process-wide local cluster: the embedded default engines.

    Returns the running shared cluster when it has the same ``n`` and ``mpi``; otherwise stops it
    and starts a new one (:func:`start_local`). A start already under way (from
    :func:`start_in_background`) is waited for, never duplicated. The cluster is stopped when the
    script or kernel exits.

    Raises
    ------
    EngineError
        As :func:`start_local`.
    """
    key = (_check_count(n), bool(mpi))
    while True:
        future, old, mine = _claim(key)
        if mine:
            _fulfil(future, key, old)
        engines = future.result()
        with _SHARED_LOCK:
            if engines is _shared and _shared_key == key and not engines.stopped:
                return engines
        # That start was for another n/mpi (or was stopped meanwhile): claim again.


def start_in_background(
    n: int | str = "auto", *, mpi: bool = False
) -> concurrent.futures.Future[Engines]:
    """Start the shared local cluster in a thread, so that the first run need not wait for it.

    :func:`shared_local` with the same arguments then returns this very cluster (waiting for it
    if it is still starting). The future's exception is the start's :class:`EngineError`.
    """
    key = (_check_count(n), bool(mpi))
    with _SHARED_LOCK:
        starting = _pending if _pending_key == key else None
    if starting is not None:
        return starting  # the same start, already under way
    future, old, mine = _claim(key)
    if mine:
        # Claimed before the thread starts, so a shared_local() right after us waits for it.
        threading.Thread(
            target=_fulfil, args=(future, key, old), name="nbindustria-engines-start", daemon=True
        ).start()
        return future
    if future.done():
        return future  # the running shared cluster already has this n/mpi
    # Another n/mpi is starting: once it is up, shared_local() replaces it with ours.
    result: concurrent.futures.Future[Engines] = concurrent.futures.Future()

    def settle() -> None:
        try:
            result.set_result(shared_local(key[0], mpi=key[1]))
        except BaseException as exc:
            result.set_exception(exc)

    threading.Thread(target=settle, name="nbindustria-engines-start", daemon=True).start()
    return result


def stop_shared() -> None:
    """Stop the shared local cluster (waiting for a start under way first), if there is one."""
    global _shared, _shared_key
    with _SHARED_LOCK:
        pending = _pending
    if pending is not None:
        with contextlib.suppress(Exception):
            pending.result(timeout=120)
    with _SHARED_LOCK:
        engines, _shared, _shared_key = _shared, None, None
    if engines is not None:
        engines.stop()
