"""Running jobs on ipyparallel engines: placement, batching, engine loss.

:class:`EngineExecutor` is the scheduler's executor for engines. The scheduler's loop thread owns
the placement state here too (which engine runs what, what each host has free); ipyparallel's
completion callbacks only turn replies into outcomes and put them on the scheduler's queue, and
the loop then calls :meth:`EngineExecutor.finished` to free the resources.

Placement. Each engine runs one message at a time. A task goes to an idle engine whose host still
has the task's ``cpus``, ``memory`` and ``gpus`` free and whose own custom resources cover it, so
the tasks on one host never together exceed its cores or memory. The scheduler hands tasks over
in priority order, so "the next task to the next free engine" is the policy.

* Long tasks go one at a time: nothing is queued behind a task whose end is unknown, so no work
  is stranded behind a task that runs longer than thought. In a first run, once every engine
  of the kernel's host is busy, the next task is *offered* to all of their task loops: the
  first to end its task claims it (engineloop.py) and runs it without a round trip to the
  kernel, which is greedy list scheduling without the round trip; an engine the kernel sees
  free takes an offer still out back first. Recorded durations hide the round trip otherwise: on an engine of the kernel's host, which runs a task loop
  (engineloop.py), a task with a recorded duration is queued behind the one running there, on
  the engine whose known work ends first (longest-processing-time order); an engine that falls
  idle with nothing ready for it takes back the last message queued on a busy loop if it has
  not started. Elsewhere (one ipyparallel message per batch) it may be queued only behind a
  task expected to end within ``PREFETCH_WINDOW``.
* Short tasks (expected under ``SHORT_TASK``, from recorded durations or, in a first run, from
  the calls of the same task that finished) travel in batches, several jobs per message, so
  that fine-grained graphs are not drowned in messaging. A batch holds about ``batch_seconds``
  of expected work, measured on the engine (the call and the staging of its result); that
  grows with how late the kernel takes replies (a group commit holds its loop), so that each
  engine keeps working while the kernel is away. Each engine holds at most two batches' worth,
  and the next batch goes to the engine that holds the least, which keeps the engines even at
  the end of a run.

Messages. To an engine of the kernel's host, a message goes to its task loop over a local
socket (about 1 ms from one task's end to the next one's start, against 6-9 ms through the
ipyparallel controller); to other engines, as one ipyparallel request each.

Data. When an engine can reach the cache directory, it reads its inputs from the store (checking
them against the header digests the kernel vouched for) and stages its result there; only
metadata comes back. Otherwise values travel through ipyparallel and the kernel stages them.

Engine loss. If the engine running a task dies, every job of its in-flight messages comes back as
an ``EngineLost`` outcome; the scheduler resubmits it elsewhere and fails the task after
``MAX_ENGINE_DEATHS`` deaths.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from .engineloop import Channel, claimed_by, serve
from .errors import EngineError, NbindustriaError
from .task import TaskOptions
from .worker import Job, Outcome, engine_loader, execute

if TYPE_CHECKING:
    from .cluster import EngineInfo, Engines
    from .store import Store

SHORT_TASK = 0.05  # seconds: below this a task travels in a batch
BATCH_MAX = 256  # jobs per message at most
BATCH_TARGET_SECONDS = 0.05  # a batch holds at least this much expected work...
BATCH_SECONDS_MAX = 0.25  # ...and at most this much (what a late kernel can make it grow to)
LAG_DECAY = 0.95  # per reply: how fast the remembered worst lag of the kernel fades
SHORT_INFLIGHT = 3  # messages of short tasks in flight per engine at most
PREFETCH_WINDOW = 0.06  # s: a known task may queue behind one expected to end this soon
MAX_ENGINE_DEATHS = 3
UNKNOWN = 1.0  # the expected duration the scheduler passes when none was recorded
POLL_INTERVAL = 0.5  # seconds between looks for engines that joined or left
MAX_REPLACEMENTS = 16  # engines started to replace dead ones, per executor

# On the engine: functions already received, by digest (sent once per engine, not per job).
_ENGINE_FUNCTIONS: dict[str, Any] = {}


def _run_batch(functions: dict[str, bytes], jobs_blob: bytes, engine_label: str) -> list[Outcome]:
    """Runs on an engine: unpickle the functions we have not seen, run each job in order."""
    import cloudpickle

    for digest, blob in functions.items():
        if digest not in _ENGINE_FUNCTIONS:
            _ENGINE_FUNCTIONS[digest] = cloudpickle.loads(blob)
    from .store import SegmentWriter

    jobs: list[tuple[str, Job]] = cloudpickle.loads(jobs_blob)
    outcomes = []
    # The small results of the batch go into one part file (one file created per batch, not
    # per result); the kernel copies each record into its commit's segment and signs it there.
    writers: dict[str, SegmentWriter] = {}
    try:
        for digest, job in jobs:
            job.func = _ENGINE_FUNCTIONS[digest]
            writer = None
            if job.tmp_dir is not None:
                writer = writers.get(job.tmp_dir)
                if writer is None:
                    writer = writers[job.tmp_dir] = SegmentWriter(job.tmp_dir)
            t0 = time.perf_counter()
            outcome = execute(job, engine_loader, engine=engine_label, segment=writer)
            if outcome.has_value:  # the kernel stages it: send it by value, cloudpickled
                outcome.value = cloudpickle.dumps(outcome.value)
            # What the job cost this engine in all (the call, loading, staging): batches are
            # planned with it, since for tiny tasks the staging is most of it.
            outcome.extra["cost"] = time.perf_counter() - t0
            outcomes.append(outcome)
    finally:
        for writer in writers.values():
            writer.close()
    counts = {w.path: w.count for w in writers.values()}
    for outcome in outcomes:
        if outcome.staged is not None and outcome.staged.packed:
            outcome.staged.part_records = counts.get(outcome.staged.path, 0)
    return outcomes


@dataclass
class _Engine:
    id: int
    host: str
    pid: int
    cores: int
    memory: int
    label: str
    reaches_store: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    messages: int = 0  # messages in flight
    # node -> (options, message id (-1: in the batch being filled), expected seconds)
    jobs: dict[str, tuple[TaskOptions, int, float]] = field(default_factory=dict)
    queued: float = 0.0  # expected seconds of work it holds (sent or being batched)
    long_held: int = 0  # how many of the jobs it holds are long ones
    # When the work it was sent is expected to end (monotonic), if every job it holds has a
    # recorded duration; else None (nothing may be queued behind it).
    ends_at: float | None = None
    functions: set[str] = field(default_factory=set)
    alive: bool = True
    local: bool = False  # on the kernel's host: runs a task loop (engineloop.py) during a run
    loop: Any = None  # the AsyncResult of its task loop in this run, while it runs
    done: int = 0  # jobs finished here (any outcome)
    # (cpus, memory, gpus) of the jobs it holds (sent or being batched) -> how many; and what
    # it reserves on its host for them: the largest of each, since it runs one job at a time.
    needs: dict[tuple[float, int, float], int] = field(default_factory=dict)
    held: tuple[float, int, float] = (0.0, 0, 0.0)


@dataclass
class _Host:
    cores: float
    memory: int
    gpus: float
    used_cpus: float = 0.0
    used_memory: int = 0
    used_gpus: float = 0.0


@dataclass
class _Offer:
    """A job of unknown duration offered to the task loops of busy engines: the first of them
    to end its task runs it (engineloop.py), so that it starts without a round trip to the
    kernel and still waits behind no task in particular."""
    seq: int
    msg: int
    job: Job
    options: TaskOptions
    expected: float
    digest: str
    placed: Callable[[str], None] | None
    to: set[int]  # the engines it was offered to (their loops may claim it)
    claimed: int | None = None  # the engine that claimed it, once the kernel heard


class EngineExecutor:
    """Places jobs on ipyparallel engines (see the module docstring for the policy)."""

    def __init__(self, engines: Engines,
                 resources: dict[int | str, dict[str, float]] | None = None,
                 gpus_per_host: dict[str, float] | None = None, *,
                 share_store: bool | None = None, engine_loops: bool | None = None):
        """``resources``: custom resources per engine id, host name, or ``"*"`` (every engine),
        as ``ray start --resources`` (default: ``NBINDUSTRIA_ENGINE_RESOURCES``, JSON).
        ``gpus_per_host``: GPUs per host name or ``"*"`` (default: ``NBINDUSTRIA_HOST_GPUS``).
        ``share_store=False`` makes results travel back to the kernel even when engines could
        reach the cache directory (None: probe each engine). ``engine_loops=False``: no task
        loops (default: ``NBINDUSTRIA_ENGINE_LOOPS``, on unless ``0``)."""
        self.engines = engines
        self._custom = _setting_json("NBINDUSTRIA_ENGINE_RESOURCES") if resources is None \
            else dict(resources)
        self._gpus = _setting_json("NBINDUSTRIA_HOST_GPUS") if gpus_per_host is None \
            else dict(gpus_per_host)
        self._share_store = share_store
        self._engines: dict[int, _Engine] = {}
        self._hosts: dict[str, _Host] = {}
        self._store_tmp: str | None = None
        # directory -> engine id -> reaches it: kept with the engines, for every executor
        try:
            self._reach_by_dir = _REACH.setdefault(engines, {})
        except TypeError:  # engines that cannot be weakly referenced: kept here only
            self._reach_by_dir = {}
        self._reach: dict[int, bool] = {}
        self._reach_wait: Callable[[], dict[int, bool]] | None = None  # a probe under way
        self._store: Store | None = None
        self._store_path: str | None = None
        self._pending: dict[int, list[tuple[Job, TaskOptions]]] = {}
        self._report: Callable[[Outcome], None] | None = None
        self._msg_seq = 0
        self._messages: dict[int, Any] = {}  # msg id -> AsyncResult
        self._arrived: dict[int, float] = {}  # msg id -> when its reply came (ipyparallel's thread)
        # The kernel's lag: how long replies waited before the loop took them (a decaying
        # maximum, seconds). Batches grow with it so that engines do not wait for the kernel.
        self._lag = 0.0
        self.messages_sent = 0
        self.loop_messages = 0  # of which through engines' task loops
        self.withdrawn = 0  # messages taken back from a loop's queue by an idle engine
        # What the last free_slot_for found: (options, expected, engine); any change of the
        # placement state (a send, a finished job, engines joining) forgets it.
        self._slot: tuple[TaskOptions, float, _Engine] | None = None
        self._last_poll = 0.0
        # Durations measured in this run, per task name: (calls, total seconds, calls that
        # were not short).
        self._measured: dict[str, tuple[int, float, int]] = {}
        self._local_host = socket.gethostname()
        # Task loops on the engines of this host (engineloop.py); off: one ipyparallel message
        # per batch everywhere.
        self._use_loops = os.environ.get("NBINDUSTRIA_ENGINE_LOOPS", "1") != "0" \
            if engine_loops is None else engine_loops
        self._channel: Channel | None = None
        self._lock = threading.Lock()  # guards the two below (three threads touch them)
        # engine id -> message id -> (node, key) of its jobs: messages sent to a task loop whose
        # outcomes have not come back, in the order sent (the loop runs them in that order).
        self._loop_msgs: dict[int, dict[int, list[tuple[str, str]]]] = {}
        self._withdrawing: set[int] = set()
        self._loop_of: dict[int, Any] = {}  # engine id -> the AsyncResult of its current loop
        # engine id -> its loop's answer to the shared-dir probe (None: not yet)
        self._hellos: dict[int, bool | None] = {}
        self._hello_answered = threading.Condition(self._lock)
        self._placed = False  # a job was placed in this run
        # Offers not yet settled, by offer number (guarded by _lock: a loop's end, on
        # ipyparallel's thread, reads them), and the claims the channel's thread heard of,
        # applied to the placement state by the scheduler's loop thread (_settle_offers).
        self._offers: dict[int, _Offer] = {}
        self._claims: list[int] = []
        self._offer_seq = 0
        self.offers_made = 0
        self.offers_claimed = 0  # by an engine's loop (the others went to a free engine)
        self.replacements = 0
        self.replacement_errors: list[str] = []
        self._refresh()
        if not self._engines:
            raise EngineError(f"no engines are registered with {engines.description}")

    @classmethod
    def from_setting(cls, setting: int | str) -> EngineExecutor:
        from . import cluster

        if isinstance(setting, int) or setting == "auto":
            return cls(cluster.shared_local(setting))
        if setting.startswith("mpi:"):  # "mpi:4": four local engines under mpiexec
            return cls(cluster.shared_local(int(setting[4:]), mpi=True))
        return cls(cluster.connect(profile=setting))

    # ---- engines -------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        return self.engines.description

    @property
    def n_engines(self) -> int:
        return sum(1 for e in self._engines.values() if e.alive)

    def _resources_of(self, engine_id: int, host: str) -> dict[str, float]:
        for key in (engine_id, str(engine_id), host, "*"):
            if key in self._custom:
                return {str(k): float(v) for k, v in self._custom[key].items()}
        return {}

    def set_resources(self, engine_id: int, resources: dict[str, float]) -> None:
        """Custom resources an engine offers (as ``ray start --resources``)."""
        self._custom[engine_id] = dict(resources)
        if engine_id in self._engines:
            self._engines[engine_id].resources = dict(resources)

    def _refresh(self) -> None:
        """Take in engines that joined; forget engines that left while idle."""
        self._slot = None
        ids = set(self.engines.ids())
        known = {i for i, e in self._engines.items() if e.alive}
        if ids - known:
            # info() measures only engines it has not seen: busy engines are not asked.
            for info in self.engines.info():
                if info.id in ids and info.id not in known:
                    self._add(info)
        for gone in known - ids:
            engine = self._engines[gone]
            if not engine.jobs:
                engine.alive = False  # a graceful removal: nothing was lost

    def _add(self, info: EngineInfo) -> None:
        engine = _Engine(id=info.id, host=info.host, pid=info.pid, cores=info.cores,
                         memory=info.memory, label=f"engine {info.id} ({info.host}:{info.pid})",
                         resources=self._resources_of(info.id, info.host),
                         local=self._use_loops and info.host == self._local_host)
        if self._reach_wait is not None:
            self._settle_reach()
        if self._store_path is not None:
            # An engine that joins mid-run is not probed (the others are busy and answer one
            # request at a time): it reaches the store if it shares a host with one that does;
            # else its results travel back by value, which is always safe.
            engine.reaches_store = any(e.reaches_store and e.host == info.host
                                       for e in self._engines.values())
        self._engines[info.id] = engine
        gpus = self._gpus.get(info.host, self._gpus.get("*", 0.0))
        self._hosts.setdefault(info.host, _Host(cores=info.cores, memory=info.memory,
                                                gpus=float(gpus)))

    def store_dir_for_jobs(self, store: Store) -> str | None:
        # Called at the start of each run: functions are pickled again, since a global they
        # read by value may have changed since the last run.
        _BLOBS.clear()
        self._measured.clear()
        for engine in self._engines.values():
            engine.functions.clear()
        self._store = store
        self._store_path = str(store.path)
        self._store_tmp = str(store.entries_dir)
        self._reach_wait = None
        self._placed = False
        todo: list[int] = []
        if self._share_store is False:
            reach: dict[int, bool] = {}
        else:
            # Each engine is probed once per directory (for as long as the engines are
            # connected), not once per run: a probe is a round trip to every engine, and it is
            # sent now but waited for only when the first job is placed (keys are computed
            # meanwhile). One that fails to read the store later stops sharing it.
            reach = self._reach_by_dir.setdefault(self._store_tmp, {})
            todo = [e.id for e in self._engines.values() if e.alive and e.id not in reach]
        self._reach = reach
        if self._use_loops:
            todo = self._start_loops_early(todo if self._share_store is not False else [])
        if todo:
            self._reach_wait = self._and_then(
                self._reach_wait, self.engines.start_shared_dir_check(self._store_tmp, todo))
        self._settle_reach(wait=False)
        return self._store_tmp

    def _start_loops_early(self, todo: list[int]) -> list[int]:
        """Start the task loops of this host's engines now, at the start of the run, so that
        they listen by the time the first job is placed (a loop's start is an ipyparallel
        round trip, 10-15 ms) instead of starting with it; the engines among ``todo`` answer
        the shared-dir probe as their loop starts (no request of its own). Done only when the
        last run on these engines placed jobs: a run whose results are all cached would start
        and stop loops for nothing, and engines that never ran a loop first import
        nbindustria (0.1-0.3 s each, all at once here), which the first job would then wait
        for (the probe, through ipyparallel, needs no import). Returns the engines of ``todo``
        still to probe through ipyparallel."""
        local = [e for e in self._engines.values() if e.alive and e.local and e.loop is None]
        if not local or not _placed_last(self.engines):
            return todo
        from . import cluster

        probe = cluster.SharedDirProbe(self._store_tmp or "") if todo else None
        asked: list[int] = []
        for engine in local:
            hello = (engine.id, probe.check()) if probe is not None and engine.id in todo \
                else None
            if hello is not None:
                with self._lock:  # before the request: its answer may come at once
                    self._hellos[engine.id] = None
            try:
                self._start_loop(engine, hello)
            except Exception:
                with self._lock:
                    self._hellos.pop(engine.id, None)
                continue  # its first job starts it again (and reports it lost if that fails)
            if hello is not None:
                asked.append(engine.id)
        if probe is None:
            return todo
        if not asked:
            probe.remove()
            return todo
        self._reach_wait = self._and_then(self._reach_wait,
                                          lambda: self._loop_probe_answers(asked, probe))
        return [i for i in todo if i not in asked]

    def _loop_probe_answers(self, asked: list[int], probe: Any) -> dict[int, bool]:
        """Wait for the probe answers of the loops that were asked (a loop that ended first, or
        no answer within the probe's timeout, counts as not reaching the store)."""
        from . import cluster

        deadline = time.monotonic() + cluster.PROBE_TIMEOUT
        try:
            with self._hello_answered:
                while any(self._hellos.get(i) is None for i in asked):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._hello_answered.wait(left)
                answers = {i: self._hellos.pop(i, None) is True for i in asked}
        finally:
            probe.remove()
        self.engines.remember_reach(answers)
        return answers

    @staticmethod
    def _and_then(first: Callable[[], dict[int, bool]] | None,
                  second: Callable[[], dict[int, bool]]) -> Callable[[], dict[int, bool]]:
        """One wait for the answers of two probes."""
        if first is None:
            return second
        return lambda: {**first(), **second()}

    def _loop_hello(self, engine_id: int, answer: Any) -> None:
        """The channel's thread: a loop answered the probe it was started with."""
        with self._hello_answered:
            if engine_id in self._hellos:
                self._hellos[engine_id] = answer is True
                self._hello_answered.notify_all()

    def _settle_reach(self, wait: bool = True) -> None:
        """Which engines share the store, once the probe sent at the start of the run has
        answered (``wait=False``: from what is known so far)."""
        probe = self._reach_wait
        if probe is not None and wait:
            self._reach_wait = None
            self._reach.update(probe())
        for engine in self._engines.values():
            engine.reaches_store = bool(self._reach.get(engine.id))

    def poll(self) -> None:
        now = time.monotonic()
        if now - self._last_poll >= POLL_INTERVAL:
            self._last_poll = now
            self._refresh()

    # ---- placement -----------------------------------------------------------------------------

    def _host_fits(self, host: _Host, options: TaskOptions, free: bool) -> bool:
        cpus, memory, gpus = options.cpus, options.memory or 0, options.gpus
        if free:
            return (host.used_cpus + cpus <= host.cores + 1e-9
                    and host.used_memory + memory <= host.memory
                    and host.used_gpus + gpus <= host.gpus + 1e-9)
        return cpus <= host.cores and memory <= host.memory and gpus <= host.gpus

    @staticmethod
    def _custom_fits(engine: _Engine, options: TaskOptions) -> bool:
        return all(engine.resources.get(name, 0.0) >= amount
                   for name, amount in options.resources.items())

    def check_fits(self, options: TaskOptions, label: str) -> None:
        for engine in self._engines.values():
            if engine.alive and self._custom_fits(engine, options) and self._host_fits(
                    self._hosts[engine.host], options, free=False):
                return
        hosts = ", ".join(f"{name}: {h.cores:g} cores, {h.memory / 2**30:.1f} GiB, "
                          f"{h.gpus:g} GPUs" for name, h in self._hosts.items())
        raise NbindustriaError(
            f"{label} needs cpus={options.cpus:g}, memory={options.memory or 0} bytes, "
            f"gpus={options.gpus:g}, resources={dict(options.resources)}, and no engine has "
            f"that ({hosts}; custom resources: "
            f"{ {e.id: e.resources for e in self._engines.values()} }). Lower the request or "
            "add engines that have it.")

    @property
    def batch_seconds(self) -> float:
        """Expected work per batch of short tasks: enough to cover the kernel's lag."""
        return min(BATCH_SECONDS_MAX, max(BATCH_TARGET_SECONDS, 2.0 * self._lag))

    def _candidate(self, options: TaskOptions, expected: float) -> _Engine | None:
        """The engine that takes a job expected to take ``expected`` s, or None: an engine that
        holds nothing first, then (short jobs) the one holding the least work, or (a long job
        with a recorded duration) the one whose known work ends first, if within the window."""
        short = expected < SHORT_TASK
        known = not short and expected != UNKNOWN
        now = time.monotonic() if known else 0.0
        best: _Engine | None = None
        best_rank: tuple[int, float, int] | None = None
        for engine in self._engines.values():
            if not engine.alive or (options.resources
                                    and not self._custom_fits(engine, options)):
                continue
            if not engine.jobs:
                rank = (0, 0.0, engine.id)
            elif short:
                if (engine.long_held or engine.messages >= SHORT_INFLIGHT
                        or engine.queued >= 2.0 * self.batch_seconds):
                    continue
                rank = (1, engine.queued, engine.id)
            elif engine.messages == 1 and len(engine.jobs) == 1 and engine.long_held:
                if not known or engine.ends_at is None or engine.ends_at < now - PREFETCH_WINDOW:
                    # A first run stays truly dynamic: nothing waits behind a task of unknown
                    # end, nor behind one that already runs longer than recorded.
                    continue
                if engine.local:
                    # Its task loop queues it behind the running one (no round trip between
                    # them; an engine that falls idle takes it back if it has not started);
                    # the engine whose known work ends first takes it (longest-processing-
                    # time order).
                    rank = (1, engine.ends_at, engine.id)
                elif engine.ends_at - now <= PREFETCH_WINDOW:
                    rank = (1, engine.ends_at, engine.id)
                else:
                    continue
            else:
                continue
            if best_rank is not None and rank >= best_rank:
                continue
            if not self._fits_beside(engine, options):
                continue
            best, best_rank = engine, rank
        return best

    def _expected(self, options: TaskOptions, expected: float) -> float:
        """The duration to plan with. The scheduler passes ``UNKNOWN`` (1 s) for a task with no
        recorded duration; once calls of that task finished in this run, their mean cost is
        used instead, so that a first run of many short tasks switches to batches after the
        first replies rather than sending every task alone. A task is batched only if most of
        its calls were short (more than a tenth long: uneven durations, whose batches would
        spoil the balance between engines), so a rare slow call does not stop the batching
        either. A short recorded duration counts the call only: the cost measured on the
        engines (staging included) is used when it is larger."""
        measured = self._measured.get(options.name)
        if measured is None:
            return expected
        count, total, long_calls = measured
        mean = total / count
        if expected == UNKNOWN:
            return mean if long_calls <= count / 10 else max(mean, SHORT_TASK)
        return max(expected, mean) if expected < SHORT_TASK else expected

    def free_slot_for(self, options: TaskOptions, expected: float = UNKNOWN) -> bool:
        if self._offers or self._claims:
            self._settle_offers()
        known = expected != UNKNOWN
        expected = self._expected(options, expected)
        engine = self._candidate(options, expected)
        # The scheduler submits right after asking: remember the answer for that submit.
        self._slot = (options, expected, engine) if engine is not None else None
        return engine is not None or bool(self._offer_targets(options, expected, known))

    def next_free_in(self) -> float | None:
        """Seconds until the first engine with work of recorded durations is expected to be
        free (negative: overdue); None when no busy engine's end is known."""
        now = time.monotonic()
        ends = [e.ends_at for e in self._engines.values()
                if e.alive and e.jobs and e.ends_at is not None]
        return min(ends) - now if ends else None

    @property
    def memory_limit(self) -> int | None:
        """The smallest memory of the hosts the engines run on (the charts draw it)."""
        hosts = [h.memory for h in self._hosts.values() if h.memory]
        return min(hosts) if hosts else None

    def submit(self, job: Job, options: TaskOptions, report: Callable[[Outcome], None],
               expected: float = UNKNOWN, placed: Callable[[str], None] | None = None,
               ) -> None:
        self._report = report
        self._placed = True
        if self._reach_wait is not None:
            self._settle_reach()
        if self._offers or self._claims:
            self._settle_offers()
        known = expected != UNKNOWN
        expected = self._expected(options, expected)
        short = expected < SHORT_TASK
        slot, self._slot = self._slot, None
        if slot is not None and slot[0] is options and slot[1] == expected:
            engine: _Engine | None = slot[2]  # nothing changed since free_slot_for found it
        else:
            engine = self._candidate(options, expected)
        if engine is None:
            targets = self._offer_targets(options, expected, known)
            if not targets:
                raise EngineError(f"no engine is free for {job.label}")  # the loop checked
            self._offer(job, options, expected, placed, targets)
            return
        self._reserve(engine, options)
        if not short:
            # Its end is known only if this job's duration and the end of what the engine
            # already holds are.
            if known and (not engine.jobs or engine.ends_at is not None):
                engine.ends_at = max(engine.ends_at or 0.0, time.monotonic()) + expected
            else:
                engine.ends_at = None
            engine.long_held += 1
        if placed is not None:
            placed(engine.label)
        if not engine.reaches_store:
            # The engine cannot read the store: its inputs go with the job, loaded (and
            # checked, signature included) here; its result comes back by value.
            job.tmp_dir = None
            job.args, job.kwargs = self._inputs_by_value(job)
        elif engine.host != self._local_host:
            job.fsync = True  # our syncfs does not reach another host's page cache
        batch = self._pending.setdefault(engine.id, [])
        batch.append((job, options))
        engine.jobs[job.node_id] = (options, -1, expected)
        engine.queued += expected
        if not short:
            self._send(engine)
            return
        budget = max(1, min(BATCH_MAX, int(self.batch_seconds / max(expected, 1e-5))))
        if len(batch) >= budget:
            self._send(engine)

    def _inputs_by_value(self, job: Job) -> tuple[tuple[Any, ...], dict[str, Any]]:
        from .worker import Input, substitute

        store = self._store
        assert store is not None

        def load(item: Input) -> Any:
            return store.load(item.key)

        return substitute(job.args, load), substitute(job.kwargs, load)

    def engine_cannot_reach_store(self, engine_label: str) -> bool:
        """An engine failed to read an entry the kernel finds whole: stop sharing the store
        with it. Returns True if that engine was sharing it."""
        for engine in self._engines.values():
            if engine.label == engine_label and engine.reaches_store:
                engine.reaches_store = False
                self._reach_by_dir.get(self._store_tmp or "", {})[engine.id] = False
                return True
        return False

    def flush(self) -> None:
        """Send every batch being filled (the scheduler calls this after each dispatch)."""
        for engine_id in list(self._pending):
            if self._pending[engine_id]:
                self._send(self._engines[engine_id])
        if self._channel is not None:
            if self._offers or self._claims:
                self._settle_offers()
            self._steal()

    # An engine runs one job at a time: the jobs it holds (a batch, a second message queued
    # behind the first) never run together, so it reserves on its host the largest cpus, memory
    # and gpus among them, not their sum. Engines of one host together never exceed it.

    @staticmethod
    def _need(options: TaskOptions) -> tuple[float, int, float]:
        return (options.cpus, options.memory or 0, options.gpus)

    def _fits_beside(self, engine: _Engine, options: TaskOptions) -> bool:
        """Whether the host still has room if ``engine`` also holds a job with ``options``."""
        host = self._hosts[engine.host]
        cpus, memory, gpus = self._need(options)
        held_cpus, held_memory, held_gpus = engine.held
        return (host.used_cpus - held_cpus + max(held_cpus, cpus) <= host.cores + 1e-9
                and host.used_memory - held_memory + max(held_memory, memory) <= host.memory
                and host.used_gpus - held_gpus + max(held_gpus, gpus) <= host.gpus + 1e-9)

    def _reserve(self, engine: _Engine, options: TaskOptions) -> None:
        need = self._need(options)
        engine.needs[need] = engine.needs.get(need, 0) + 1
        self._hold(engine)

    def _release(self, engine: _Engine, options: TaskOptions) -> None:
        need = self._need(options)
        left = engine.needs.get(need, 0) - 1
        if left > 0:
            engine.needs[need] = left
        else:
            engine.needs.pop(need, None)
        self._hold(engine)

    def _hold(self, engine: _Engine) -> None:
        """Reserve on the engine's host the largest need of the jobs it holds."""
        needs = engine.needs
        if len(needs) == 1:
            new = next(iter(needs))
        elif needs:
            new = (max(n[0] for n in needs), max(n[1] for n in needs), max(n[2] for n in needs))
        else:
            new = (0.0, 0, 0.0)
        old = engine.held
        if new == old:
            return
        host = self._hosts[engine.host]
        host.used_cpus = max(0.0, host.used_cpus + new[0] - old[0])
        host.used_memory = max(0, host.used_memory + new[1] - old[1])
        host.used_gpus = max(0.0, host.used_gpus + new[2] - old[2])
        engine.held = new

    def _send(self, engine: _Engine) -> None:
        batch = self._pending.pop(engine.id, [])
        if not batch:
            return
        self._slot = None
        functions: dict[str, bytes] = {}
        jobs: list[tuple[str, Job]] = []
        for job, _options in batch:
            blob, digest = _function_blob(job.func)
            if digest not in engine.functions:
                functions[digest] = blob
                engine.functions.add(digest)
            jobs.append((digest, job))
        self._msg_seq += 1
        self.messages_sent += 1
        msg = self._msg_seq
        for job, _options in batch:
            options, _, expected = engine.jobs[job.node_id]
            engine.jobs[job.node_id] = (options, msg, expected)
        engine.messages += 1
        report = self._report
        assert report is not None
        if engine.local:
            self._send_to_loop(engine, msg, functions, jobs, batch)
            return
        view = self.engines.client[engine.id]
        try:
            async_result = view.apply_async(_run_batch, functions, _pickle_jobs(jobs),
                                            engine.label)
        except Exception as exc:
            engine.functions.clear()
            for job, _options in batch:
                report(_lost(job.key, job.node_id, engine, f"could not send: {exc}"))
            return
        self._messages[msg] = async_result
        keys = [(job.key, job.node_id) for job, _ in batch]

        def done(ar: Any, keys: list[tuple[str, str]] = keys, engine: _Engine = engine,
                 msg: int = msg) -> None:
            # ipyparallel's thread: only turn the reply into outcomes and hand them over.
            self._arrived[msg] = time.monotonic()
            try:
                outcomes = ar.result()
            except Exception as exc:
                outcomes = [_lost(key, node, engine, f"{type(exc).__name__}: {exc}")
                            for key, node in keys]
            for outcome in outcomes:
                report(outcome)

        async_result.add_done_callback(done)

    # ---- task loops on the engines of this host (engineloop.py) -------------------------------

    def _send_to_loop(self, engine: _Engine, msg: int, functions: dict[str, bytes],
                      jobs: list[tuple[str, Job]], batch: list[tuple[Job, TaskOptions]]) -> None:
        report = self._report
        assert report is not None
        keys = [(job.node_id, job.key) for job, _ in batch]
        try:
            if engine.loop is None:
                self._start_loop(engine)
            channel = self._channel
            assert channel is not None
            with self._lock:
                self._loop_msgs[engine.id][msg] = keys
            channel.send(engine.id, msg, functions, _pickle_jobs(jobs))
            self.loop_messages += 1
        except Exception as exc:
            with self._lock:
                self._loop_msgs.get(engine.id, {}).pop(msg, None)
            engine.functions.clear()
            for job, _options in batch:
                report(_lost(job.key, job.node_id, engine, f"could not send: {exc}"))

    def _start_loop(self, engine: _Engine,
                    hello: tuple[int, Callable[[], Any]] | None = None) -> None:
        """Start an engine's task loop for this run (one ipyparallel request, answered when the
        run ends)."""
        if self._channel is None:
            self._channel = Channel(self._loop_done, self._loop_withdrawn, self._loop_hello,
                                    self._loop_claimed)
        channel = self._channel
        # Connect first: messages wait until it binds.
        channel.open(engine.id)
        ar = self.engines.client[engine.id].apply_async(
            serve, channel.inbox(engine.id), channel.outbox, os.getpid(), _run_batch,
            engine.label, hello, engine.id)
        engine.loop = ar
        with self._lock:
            self._loop_of[engine.id] = ar
            self._loop_msgs[engine.id] = {}
        ar.add_done_callback(lambda ar, engine=engine: self._loop_ended(engine, ar))

    def _loop_done(self, msg: int, outcomes: list[Outcome]) -> None:
        """The channel's thread: a message's outcomes came back."""
        with self._lock:
            found = any(m.pop(msg, None) is not None for m in self._loop_msgs.values())
            self._withdrawing.discard(msg)
        if not found:
            return  # its engine was reported lost meanwhile: the jobs were resubmitted
        self._arrived[msg] = time.monotonic()
        report = self._report
        assert report is not None
        for outcome in outcomes:
            report(outcome)

    def _loop_withdrawn(self, msg: int) -> None:
        """The channel's thread: a message was taken back before it started."""
        with self._lock:
            keys = next((m.pop(msg) for m in self._loop_msgs.values() if msg in m), None)
            self._withdrawing.discard(msg)
        report = self._report
        if keys is None or report is None:
            return
        self.withdrawn += 1
        for node, key in keys:
            report(_withdrawn(key, node))

    def _loop_ended(self, engine: _Engine, ar: Any) -> None:
        """ipyparallel's thread: an engine's loop request ended (stopped, interrupted, or the
        engine died): whatever it still held is lost (the scheduler resubmits it)."""
        why = "its task loop ended"
        try:
            ar.get(0)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if self._loop_of.get(engine.id) is not ar:
                return  # a loop of an earlier run (this run's loop holds its own messages)
            del self._loop_of[engine.id]
            held = self._loop_msgs.pop(engine.id, {})
            for msg in held:
                self._withdrawing.discard(msg)
            if engine.id in self._hellos and self._hellos[engine.id] is None:
                self._hellos[engine.id] = False  # it never answered the probe
                self._hello_answered.notify_all()
            lost, orphans = self._offers_of_ended_loop(engine)
        report = self._report
        for keys in held.values():
            for node, key in keys:
                if report is not None:
                    report(_lost(key, node, engine, why))
        if report is not None:
            for offer in lost:
                report(_lost(offer.job.key, offer.job.node_id, engine, why))
            for offer in orphans:
                report(_withdrawn(offer.job.key, offer.job.node_id))
        if engine.loop is ar:
            engine.loop = None

    # ---- offers: the next job to whichever busy loop ends first (first runs) -------------------

    def _offer_targets(self, options: TaskOptions, expected: float, known: bool
                       ) -> list[_Engine]:
        """The engines a job may be offered to: when its duration is unknown (a first run) and
        every engine that could take it is busy with one task of its own, each running a task
        loop and holding the same resources on its host (so that whichever claims it keeps
        within them). At most one offer per such engine is out at a time."""
        if known or expected < SHORT_TASK or self._channel is None:
            return []
        need = self._need(options)
        targets = [e for e in self._engines.values()
                   if e.alive and e.local and e.loop is not None and e.reaches_store
                   and e.id not in self._pending and len(e.jobs) == 1 and e.messages == 1
                   and e.long_held == 1 and e.held == need
                   and (not options.resources or self._custom_fits(e, options))]
        return targets if len(self._offers) < len(targets) else []

    def _offer(self, job: Job, options: TaskOptions, expected: float,
               placed: Callable[[str], None] | None, targets: list[_Engine]) -> None:
        channel = self._channel
        assert channel is not None and self._report is not None
        blob, digest = _function_blob(job.func)
        jobs_blob = _pickle_jobs([(digest, job)])
        self._msg_seq += 1
        self._offer_seq += 1
        offer = _Offer(seq=self._offer_seq, msg=self._msg_seq, job=job, options=options,
                       expected=expected, digest=digest, placed=placed, to=set())
        with self._lock:
            self._offers[offer.seq] = offer
        for engine in targets:
            # An engine learns a function from the message it runs: an offer it loses
            # teaches it nothing, so the function goes with every offer it has not run.
            functions = {} if digest in engine.functions else {digest: blob}
            try:
                channel.offer(engine.id, offer.seq, offer.msg, functions, jobs_blob)
            except Exception:
                continue
            with self._lock:
                offer.to.add(engine.id)
        self.messages_sent += 1
        self.loop_messages += 1
        self.offers_made += 1
        if not offer.to:  # it reached no loop: to the scheduler's queue again
            with self._lock:
                self._offers.pop(offer.seq, None)
            if channel.take_back(offer.seq) is None:
                self._report(_withdrawn(job.key, job.node_id))

    def _loop_claimed(self, seq: int, engine_id: int) -> None:
        """The channel's thread: a loop claimed an offer (heard before the outcomes of the
        message it had just ended)."""
        with self._lock:
            offer = self._offers.get(seq)
            if offer is None or offer.claimed is not None:
                return  # its loop's end already dealt with it
            offer.claimed = engine_id
            self._claims.append(seq)
            msgs = self._loop_msgs.get(engine_id)
            if msgs is not None:
                msgs[offer.msg] = [(offer.job.node_id, offer.job.key)]
                return
        # Its loop ended before this arrived: the job is lost with it.
        engine = self._engines[engine_id]
        if self._report is not None:
            self._report(_lost(offer.job.key, offer.job.node_id, engine, "its task loop ended"))

    def _offers_of_ended_loop(self, engine: _Engine) -> tuple[list[_Offer], list[_Offer]]:
        """(Under the lock.) A loop ended: the offers it claimed without the kernel hearing of
        it are lost with it; offers that no running loop can claim any more are taken back."""
        lost: list[_Offer] = []
        orphans: list[_Offer] = []
        channel = self._channel
        for seq, offer in list(self._offers.items()):
            if offer.claimed is not None:
                continue
            offer.to.discard(engine.id)
            who = claimed_by(channel.dir, seq) if channel is not None else None
            if who == str(engine.id):
                offer.claimed = engine.id
                self._claims.append(seq)
                lost.append(offer)
            elif who is None and not (offer.to & set(self._loop_of)) and channel is not None \
                    and channel.take_back(seq) is None:
                del self._offers[seq]
                orphans.append(offer)
        return lost, orphans

    def _settle_offers(self, place: bool = True) -> None:
        """The scheduler's loop thread: apply the claims heard of (the job now runs on the
        engine that claimed it); with ``place``, an engine that is free takes an offer still
        out back (the oldest first, ahead of anything placed after it)."""
        with self._lock:
            seqs, self._claims = self._claims, []
            claimed = [self._offers.pop(seq) for seq in seqs if seq in self._offers]
        for offer in claimed:
            engine = self._engines[offer.claimed if offer.claimed is not None else -1]
            self._slot = None
            self._reserve(engine, offer.options)
            engine.jobs[offer.job.node_id] = (offer.options, offer.msg, offer.expected)
            engine.queued += offer.expected
            engine.long_held += 1
            engine.ends_at = None
            engine.messages += 1
            engine.functions.add(offer.digest)
            self.offers_claimed += 1
            if offer.placed is not None:
                offer.placed(engine.label)
        if not place or not self._offers or self._channel is None:
            return
        for engine in self._engines.values():
            if not (engine.alive and engine.local and engine.loop is not None
                    and engine.reaches_store and not engine.jobs
                    and engine.id not in self._pending):
                continue
            with self._lock:
                waiting = sorted(self._offers.items())
            for seq, offer in waiting:
                if not (self._custom_fits(engine, offer.options)
                        and self._fits_beside(engine, offer.options)):
                    continue
                if self._channel.take_back(seq) is not None:
                    continue  # a loop claimed it (the kernel hears of it next), or a loop's end
                with self._lock:
                    self._offers.pop(seq, None)
                self._place_now(engine, offer)
                break

    def _place_now(self, engine: _Engine, offer: _Offer) -> None:
        """An offer taken back goes to a free engine as an ordinary message."""
        self._slot = None
        self._reserve(engine, offer.options)
        engine.long_held += 1
        engine.ends_at = None
        if offer.placed is not None:
            offer.placed(engine.label)
        self._pending.setdefault(engine.id, []).append((offer.job, offer.options))
        engine.jobs[offer.job.node_id] = (offer.options, -1, offer.expected)
        engine.queued += offer.expected
        self._send(engine)

    def _steal(self) -> None:
        """An engine that holds nothing (nothing ready fits it) takes back the last message
        queued on a busy engine's loop, if it has not started there."""
        idle = [e for e in self._engines.values()
                if e.alive and not e.jobs and e.id not in self._pending]
        channel = self._channel
        if not idle or channel is None:
            return
        with self._lock:
            wanted = len(idle) - len(self._withdrawing)
            if wanted <= 0:
                return
            queued = [(engine_id, msg) for engine_id, msgs in self._loop_msgs.items()
                      for msg in list(msgs)[1:] if msg not in self._withdrawing]
        for engine_id, msg in reversed(queued):
            if wanted <= 0:
                return
            holder = self._engines[engine_id]
            options = [o for o, m, _e in holder.jobs.values() if m == msg]
            if not any(all(self._custom_fits(e, o) and self._fits_beside(e, o)
                           for o in options) for e in idle):
                continue
            with self._lock:
                self._withdrawing.add(msg)
            channel.withdraw(engine_id, [msg])
            wanted -= 1

    def end_run(self) -> None:
        """The run ended: stop the task loops (their engines answer other requests again)."""
        if self._reach_wait is not None:  # no job was placed: take the probe's answers now
            self._settle_reach()
        with contextlib.suppress(TypeError):  # engines that cannot be weakly referenced
            _PLACED[self.engines] = self._placed
        channel, self._channel = self._channel, None
        for engine in self._engines.values():
            engine.loop = None
        with self._lock:
            self._loop_of.clear()
            self._loop_msgs.clear()
            self._withdrawing.clear()
            # Offers still out (an interrupt): nobody can claim them once the channel's
            # directory is gone; their calls are not done and run again next time.
            self._offers.clear()
            self._claims.clear()
        if channel is not None:
            channel.close()

    def finished(self, outcome: Outcome) -> None:
        """The loop thread took an outcome: free what its job held."""
        self._slot = None
        if self._claims:
            self._settle_offers(place=False)  # a claim is heard of before the outcomes after it
        for engine in self._engines.values():
            entry = engine.jobs.pop(outcome.node_id, None)
            if entry is None:
                continue
            options, msg, expected = entry
            engine.done += 1
            engine.queued = max(0.0, engine.queued - expected) if engine.jobs else 0.0
            if expected >= SHORT_TASK:
                engine.long_held = max(0, engine.long_held - 1)
            if not engine.jobs:
                engine.ends_at = None
            elif engine.ends_at is not None:
                # What it holds now runs from now on (it was queued on the engine).
                engine.ends_at = time.monotonic() + sum(e[2] for e in engine.jobs.values())
            self._release(engine, options)
            if outcome.ok or outcome.error_type not in ("EngineLost", "InputUnusable",
                                                        "Withdrawn"):
                cost = float(outcome.extra.get("cost", outcome.duration))
                count, total, long_calls = self._measured.get(options.name, (0, 0.0, 0))
                self._measured[options.name] = (count + 1, total + cost,
                                                long_calls + (cost >= SHORT_TASK))
            if msg not in (e[1] for e in engine.jobs.values()):
                engine.messages = max(0, engine.messages - 1)
                self._messages.pop(msg, None)
                arrived = self._arrived.pop(msg, None)
                if arrived is not None:
                    self._lag = max(time.monotonic() - arrived, self._lag * LAG_DECAY)
            if outcome.error_type == "EngineLost" and engine.alive:
                engine.alive = False
                engine.functions.clear()
                self._replace(engine)
            if outcome.has_value and isinstance(outcome.value, bytes):
                import cloudpickle

                outcome.value = cloudpickle.loads(outcome.value)
            return

    def engine_table(self) -> list[dict[str, Any]]:
        """One row per engine for people (``%pipeline engines``): id, host, pid, MPI rank,
        state, tasks done, whether it reaches the store."""
        if self._reach_wait is not None:
            self._settle_reach()
        ranks = {info.id: info.mpi_rank for info in self.engines.info()} \
            if self.n_engines else {}
        return [{"id": e.id, "host": e.host, "pid": e.pid, "mpi_rank": ranks.get(e.id),
                 "state": ("dead" if not e.alive else "busy" if e.jobs else "idle"),
                 "tasks_done": e.done, "reaches_store": e.reaches_store}
                for e in sorted(self._engines.values(), key=lambda e: e.id)]

    def death_note(self, message: str) -> str:
        """``message`` (an EngineLost message naming an engine) with how that engine died."""
        for engine in self._engines.values():
            if engine.label in message:
                status = getattr(self.engines, "exit_status", None)
                how = status(engine.pid) if status is not None else None
                return f"{engine.label} {how}" if how else message
        return message

    def _replace(self, engine: _Engine) -> None:
        """An owned cluster keeps its size: start a new engine for a dead one (in the
        background; ``poll`` takes it in when it registers)."""
        if not self.engines.owned or self.replacements >= MAX_REPLACEMENTS:
            return
        self.replacements += 1
        import threading

        def start() -> None:
            try:
                self.engines.add_engines(1)
            except Exception as exc:
                self.replacement_errors.append(f"{type(exc).__name__}: {exc}")

        threading.Thread(target=start, name="nbindustria-replace-engine", daemon=True).start()

    def cancel_all(self) -> None:
        """Interrupt: drop queued batches, abort what ipyparallel can abort."""
        self._pending.clear()
        self.end_run()
        pending = [ar for ar in self._messages.values() if not ar.done()]
        if pending:
            with contextlib.suppress(Exception):
                self.engines.client.abort(pending)
        interrupt = getattr(self.engines, "interrupt_busy", None)
        if interrupt is not None:
            interrupt()


def _placed_last(engines: Engines) -> bool:
    try:
        return _PLACED.get(engines, False)
    except TypeError:  # engines that cannot be weakly referenced
        return False


def _setting_json(variable: str) -> dict[Any, Any]:
    import json

    text = os.environ.get(variable, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise NbindustriaError(f"{variable} must be JSON such as '{{\"*\": {{\"bigdb\": 1}}}}' "
                               f"(got {text!r}: {exc})") from None
    if not isinstance(value, dict):
        raise NbindustriaError(f"{variable} must be a JSON object (got {text!r})")
    return value


def _withdrawn(key: str, node: str) -> Outcome:
    return Outcome(key=key, node_id=node, ok=False, error_type="Withdrawn",
                   error_message="taken back from an engine's queue before it started")


def _lost(key: str, node: str, engine: _Engine, why: str) -> Outcome:
    return Outcome(key=key, node_id=node, ok=False, engine=engine.label, host=engine.host,
                   pid=engine.pid, error_type="EngineLost",
                   error_message=f"{engine.label} was lost: {why}")


def _pickle_jobs(jobs: list[tuple[str, Job]]) -> bytes:
    """cloudpickle of (function digest, job) pairs, without the functions: they travel apart,
    once per engine. The jobs are pickled as they are (no copies); their functions are put
    back before this returns, also when pickling fails."""
    import cloudpickle

    funcs = [job.func for _digest, job in jobs]
    try:
        for _digest, job in jobs:
            job.func = None  # type: ignore[assignment]
        return cloudpickle.dumps(jobs)
    finally:
        for (_digest, job), func in zip(jobs, funcs, strict=True):
            job.func = func


_BLOBS: dict[int, tuple[Any, bytes, str]] = {}
# Per set of engines: directory -> engine id -> whether it reaches it (probed once).
_REACH: weakref.WeakKeyDictionary[Engines, dict[str, dict[int, bool]]] = \
    weakref.WeakKeyDictionary()
# Per set of engines: whether the last run on them placed a job (its next run starts the task
# loops as it starts; see EngineExecutor._start_loops_early).
_PLACED: weakref.WeakKeyDictionary[Engines, bool] = weakref.WeakKeyDictionary()


def _function_blob(func: Any) -> tuple[bytes, str]:
    """cloudpickle of a task's function and its digest, made once per function object and
    run. Functions of user code (a notebook, a script, modules beside them: anything not
    installed) travel by value, since engines may not be able to import them; installed ones
    by reference."""
    import sys

    import cloudpickle

    from .hashing import library_version

    cached = _BLOBS.get(id(func))
    if cached is not None and cached[0] is func:
        return cached[1], cached[2]
    module = sys.modules.get(getattr(func, "__module__", "") or "")
    by_value = (module is not None and module.__name__ not in ("__main__", "__mp_main__")
                and library_version(module.__name__) is None)
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        blob = cloudpickle.dumps(func)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)
    digest = xxhash.xxh3_64_hexdigest(blob)
    _BLOBS[id(func)] = (func, blob, digest)
    return blob, digest


def engine_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
