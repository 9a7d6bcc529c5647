"""The run loop: resolve what is cached, run the rest in dependency order, commit, report.

State. One thread, the one that calls :meth:`Run.execute`, owns and changes all of it:

* per node, ``handle.state``: ``added`` (waiting for inputs), ``queued``, ``running``, ``done``,
  ``cached``, ``failed`` or ``skipped``; ``handle.key`` once its inputs' digests are known and
  ``handle.digest`` (the result's digest) once it is done or cached;
* ``waiting[node]``: how many inputs are not resolved yet;
* the ready heap, ordered by priority;
* ``staged``: results written by workers and waiting for a group commit.

Executors run jobs wherever they run them and report each outcome by putting it on
``self.outcomes`` (a queue); nothing else touches the state. A synchronous executor puts the
outcome before ``submit`` returns, which keeps the same code path for in-process runs.

Policy.

* Cache hits are resolved in the kernel, in batches by level, before anything is dispatched:
  a node's key needs its inputs' result digests, so a node whose input must run is resolved when
  that input is done (it may then still be a hit: an input that re-ran to the same bytes).
* Ready nodes run longest remaining critical path first, using each task's recorded duration
  from earlier runs where there is one.
* A result counts as done only once it is committed (signed, flushed, renamed, flushed).
  Commits are grouped: as soon as nothing else is ready to run (someone waits on these
  results), or 4096 results (or 16 MiB of results staged in memory) are waiting, or the oldest
  waited 0.2 s (checked between dispatches: in-process, a long queue of tiny tasks makes groups
  of 4096). The small results of a group become one segment file: one file created and two
  flushes per group (see store.py). While tasks run on engines and others wait to be sent, a
  commit (which holds this thread while the disk flushes) is put off so that commits take at
  most a tenth of the loop's time, and, when the engines' work has recorded durations, until
  no engine is expected to need its next task during it; never beyond 2 s.
* A failure marks everything downstream skipped; independent work goes on; the run ends with one
  PipelineError that holds every failure. ``retries`` re-runs a call that raised.
* An input whose entry fails its check is moved aside and its task runs again first.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import heapq
import json
import operator
import os
import queue
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import HashingError, PipelineError, StoreError, TaskError
from .events import (
    ADDED,
    CACHED,
    DONE,
    FAILED,
    QUEUED,
    RUN_END,
    RUN_START,
    RUNNING,
    SKIPPED,
    Event,
    EventLog,
    LazyColumn,
)
from .graph import Graph, is_walked_container
from .hashing import CodeHasher, summarize
from .keys import (
    CallEncoding,
    ProvenanceLookup,
    Upstream,
    arg_digests,
    cache_key,
    code_digest_of,
    encode_call,
    key_prefix,
)
from .store import (
    ENTRY_DETAILS,
    BadEntry,
    Index,
    IndexRow,
    Presence,
    Staged,
    Store,
    disk_error,
)
from .task import Handle, Task, TaskOptions
from .worker import Input, Job, Outcome, execute, python_env

# A group commit writes one segment file and flushes it once: larger groups cost less per
# result. Results staged in memory (the kernel's own) are bounded by COMMIT_BYTES.
COMMIT_BATCH = 4096
COMMIT_BYTES = 16 << 20
MAX_ENGINE_DEATHS = 3
COMMIT_DELAY = 0.2
COMMIT_DELAY_MAX = 2.0  # s: the longest a result waits for its commit while others run
COMMIT_SHARE = 0.1  # with engines busy, commits take at most this share of the loop's time
FINAL = frozenset({"done", "cached", "failed", "skipped"})
# A call's label, for a packed event's label column made only when a view reads it.
_label_of = operator.attrgetter("label")
# The fields of packed events (events.py), in the order of the values the scheduler gives.
_QUEUED_FIELDS = ("node", "task", "label", "key", "time", "reason")
_RUNNING_FIELDS = ("node", "task", "label", "key", "time", "engine", "started")
_DONE_COLUMNS = ("node", "task", "label", "key", "engine", "started", "ended", "duration", "cpu",
                 "peak_memory", "size", "reason", "info")


class Executor(Protocol):
    """Where jobs run. ``submit`` must eventually call ``report(outcome)`` exactly once per job
    (from any thread); the scheduler's loop is the only consumer."""

    @property
    def description(self) -> str: ...

    @property
    def n_engines(self) -> int: ...

    def check_fits(self, options: TaskOptions, label: str) -> None: ...

    def free_slot_for(self, options: TaskOptions, expected: float = 1.0) -> bool: ...

    def submit(self, job: Job, options: TaskOptions, report: Callable[[Outcome], None],
               expected: float = 1.0, placed: Callable[[str], None] | None = None,
               ) -> None: ...

    @property
    def memory_limit(self) -> int | None: ...

    def flush(self) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...

    def store_dir_for_jobs(self, store: Store) -> str | None: ...

    def cancel_all(self) -> None: ...

    def poll(self) -> None: ...


class LocalExecutor:
    """Runs each job in this process, in the scheduler's thread, one at a time."""

    description = "this process"
    n_engines = 0

    def __init__(self) -> None:
        self._store: Store | None = None
        self._running = False

    def check_fits(self, options: TaskOptions, label: str) -> None:
        return None  # the kernel runs one task at a time: anything fits

    def free_slot_for(self, options: TaskOptions, expected: float = 1.0) -> bool:
        return not self._running

    def store_dir_for_jobs(self, store: Store) -> str | None:
        self._store = store
        return str(store.entries_dir)

    def _load(self, item: Input) -> Any:
        assert self._store is not None
        return self._store.load(item.key)  # checks the signature too: this is the kernel

    @property
    def memory_limit(self) -> int | None:
        from .worker import total_memory

        return total_memory()

    def submit(self, job: Job, options: TaskOptions, report: Callable[[Outcome], None],
               expected: float = 1.0, placed: Callable[[str], None] | None = None) -> None:
        if placed is not None:
            placed("kernel")
        self._running = True
        try:
            report(execute(job, self._load, engine="kernel"))
        finally:
            self._running = False

    def cancel_all(self) -> None:
        return None

    def poll(self) -> None:
        return None

    def flush(self) -> None:
        return None

    def finished(self, outcome: Outcome) -> None:
        return None


@dataclass
class RunSummary:
    ran: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    wall: float = 0.0
    interrupted: bool = False
    dryrun: bool = False
    would_run: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.dryrun:
            return (f"dry run: {len(self.would_run)} to run, {self.cached} cached "
                    f"(nothing was run)")
        text = (f"ran {self.ran}, cached {self.cached}, failed {self.failed}, "
                f"skipped {self.skipped} in {self.wall:.2f} s")
        return text + (" (interrupted)" if self.interrupted else "")


class Run:
    """One execution of a graph. Use once."""

    def __init__(self, *, store: Store, events: EventLog, executor: Executor,
                 pipeline_name: str, rerun: Iterable[str] = (), dryrun: bool = False,
                 memcheck: bool = False, provenance: ProvenanceLookup | None = None,
                 run_number: int = 0, profile_dir: str | None = None):
        self.store = store
        self.events = events
        self.executor = executor
        self.pipeline_name = pipeline_name
        self.rerun_names = set(rerun)
        self.dryrun = dryrun
        self.memcheck = memcheck
        self.provenance = provenance
        self.run_number = run_number
        self.profile_dir = profile_dir
        self.env = python_env()
        self.code = CodeHasher()
        self.summary = RunSummary(dryrun=dryrun)
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        self.failures: list[TaskError] = []
        self._code_digests: dict[tuple[int, str | None], tuple[str, dict[str, Any]]] = {}
        self._key_prefixes: dict[tuple[int, str | None], bytes] = {}
        self._encodings: dict[str, CallEncoding] = {}
        self._ready: list[tuple[float, int, str]] = []
        self._seq = 0
        self._staged: list[tuple[Staged, Handle[Any], Outcome]] = []
        self._store_failed = False  # a commit failed: the disk is full, or the cache is gone
        self._staged_since = 0.0
        self._staged_bytes = 0
        self._commit_cost = 0.05  # seconds a group commit holds the loop (moving average)
        self._previous: dict[str, tuple[str, str, str] | None] = {}
        self._previous_lookups = 0
        self._in_flight: dict[str, Handle[Any]] = {}
        self._attempts: dict[str, int] = {}
        self._hits: list[str] = []
        self._timings: list[tuple[Any, ...]] = []
        self._unreadable: set[str] = set()
        self._deaths: dict[str, list[str]] = {}
        self._last_engine: dict[str, str] = {}
        self._expected_cache: dict[str, float] | None = None
        self._priority_cache: dict[str, float] | None = None

    # ---- events --------------------------------------------------------------------------------

    def _emit(self, kind: str, handle: Handle[Any] | None = None, **fields: Any) -> None:
        if handle is not None:
            self.events.append(Event(kind, node=handle.node_id, task=handle.task.name,
                                     label=handle.label, key=handle.key or "", **fields))
        else:
            self.events.append(Event(kind, **fields))

    # ---- keys -----------------------------------------------------------------------------------

    def _code_of(self, task: Task[Any, Any]) -> tuple[str, dict[str, Any]]:
        # Per function *and* declared version: two tasks may wrap one function with different
        # versions, and each must keep its own key.
        found = self._code_digests.get((id(task.func), task.options.version))
        if found is None:
            found = code_digest_of(task, self.code)
            self._code_digests[(id(task.func), task.options.version)] = found
            if found[1]:
                self.store.index.put_code(found[0], found[1])
        return found

    def _key_prefix_of(self, task: Task[Any, Any]) -> bytes:
        prefix = self._key_prefixes.get((id(task.func), task.options.version))
        if prefix is None:
            code_digest, _ = self._code_of(task)
            prefix = key_prefix(task, code_digest, self.env)
            self._key_prefixes[(id(task.func), task.options.version)] = prefix
        return prefix

    def _encoding_of(self, handle: Handle[Any]) -> CallEncoding:
        enc = self._encodings.get(handle.node_id)
        if enc is None:
            cached = handle.encoding
            # An encoding made when the call was recorded is reused only if nothing in it
            # could have changed in place since; otherwise the arguments are read again now.
            if cached is not None and not cached.mutable:
                enc = cached
            else:
                enc = encode_call(handle.task, handle.args, handle.kwargs, self.code,
                                  self.provenance)
            self._encodings[handle.node_id] = enc
        return enc

    # ---- the loop -------------------------------------------------------------------------------

    def execute(self, targets: list[Handle[Any]]) -> RunSummary:
        with _older_objects_frozen():
            return self._execute(targets)

    def _execute(self, targets: list[Handle[Any]]) -> RunSummary:
        t0 = time.perf_counter()
        with _gc_paused():
            self._start(targets)
        try:
            with _gc_paused():
                # Everything that is cached is resolved here, before anything runs: for a run
                # with nothing to do, this is the whole run.
                self._resolve([n for n in self.graph.order if self.waiting[n] == 0])
            if not self.dryrun:
                self._loop()
        except KeyboardInterrupt:
            self.summary.interrupted = True
            self.executor.cancel_all()
            self._drain_finished()
            raise
        except (StoreError, sqlite3.OperationalError) as exc:
            # Results cannot be stored (a full disk): stop. Results that already arrived are
            # still committed if they fit (below); nothing else counts as done.
            self.executor.cancel_all()
            self._drain_finished()
            if isinstance(exc, StoreError):
                raise
            raise self._cannot_store(exc) from exc
        finally:
            try:
                end_run = getattr(self.executor, "end_run", None)
                if end_run is not None:  # engines' task loops end (dispatch.py)
                    end_run()
                self._commit_the_rest()
            finally:
                self._finish(t0)
        if self.failures:
            raise PipelineError(self.failures, skipped=self.summary.skipped)
        return self.summary

    def _start(self, targets: list[Handle[Any]]) -> None:
        self.graph = graph = Graph(targets)
        fits_checked: set[int] = set()
        for handle in graph.nodes.values():
            # A new run decides again (also for calls a dry run or an interrupt left queued).
            handle.state = "added"
            handle.reason = ""
            handle.error = None
            options = handle.task.options
            if id(options) not in fits_checked:  # once per task, not once per call
                fits_checked.add(id(options))
                self.executor.check_fits(options, f"task {handle.task.name!r}")
        self._emit(RUN_START, info={"pipeline": self.pipeline_name, "tasks": len(graph),
                                    "engines": self.executor.description,
                                    "n_engines": self.executor.n_engines,
                                    "memory_limit": self.executor.memory_limit,
                                    "run": self.run_number, "dryrun": self.dryrun})
        deps, order = graph.deps, graph.order
        handles = [graph.nodes[n] for n in order]
        # Every node of the graph as one packed event (events.py): one log entry, not 10,000.
        self.events.append(Event(ADDED, group={
            "node": list(order), "task": [h.task.name for h in handles],
            "label": LazyColumn(_label_of, handles), "deps": [tuple(deps[n]) for n in order]}))
        self._priority_cache = None  # made when a task must run
        self.waiting = {n: len(deps[n]) for n in graph.order}
        self._tmp_dir = self.executor.store_dir_for_jobs(self.store)

    @property
    def _priorities(self) -> dict[str, float]:
        # Only a run with work to do needs them: an all-hit run never asks the index for past
        # durations.
        if self._priority_cache is None:
            self._priority_cache = self._priorities_for(self.graph)
        return self._priority_cache

    @property
    def expected(self) -> dict[str, float]:
        if self._expected_cache is None:
            self._priorities_for(self.graph)
        assert self._expected_cache is not None
        return self._expected_cache

    def _priorities_for(self, graph: Graph) -> dict[str, float]:
        """Longest remaining critical path, from recorded durations (per call, else per task
        name, else one second)."""
        names = sorted({h.task.name for h in graph.nodes.values()})
        per_task: dict[str, float] = {}
        if names:
            rows = self.store.index.execute(
                f"SELECT task, AVG(duration) FROM entries WHERE duration IS NOT NULL AND task IN "
                f"({','.join('?' * len(names))}) GROUP BY task", tuple(names))
            per_task = {task: float(avg) for task, avg in rows}
        per_node: dict[str, float] = {}
        ids = list(graph.nodes)
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            for node, duration in self.store.index.execute(
                    f"SELECT node, duration FROM entries WHERE duration IS NOT NULL AND node IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY created", tuple(chunk)):
                per_node[node] = float(duration)
        durations = {n: per_node.get(n, per_task.get(h.task.name, 1.0))
                     for n, h in graph.nodes.items()}
        self._expected_cache = durations
        return graph.critical_path(durations)

    def _resolve(self, frontier: list[str]) -> None:
        """Compute keys of nodes whose inputs are all known, and look them up in batches. Hits
        unblock their dependents, which are resolved in the next round (level by level)."""
        nodes, dependents = self.graph.nodes, self.graph.dependents
        while frontier:
            keyed, forced = self._keys_of([nodes[n] for n in frontier])
            present = self.store.present(
                [h.key for h in keyed if h.node_id not in forced and h.key is not None])
            misses = [h.node_id for h in keyed
                      if h.node_id in forced or h.key not in present]
            if len(misses) > 1:  # why each must run: their past rows in one query, not one each
                self._read_previous([n for n in misses if n not in self._previous])
            next_frontier: list[str] = []
            hits: list[tuple[Handle[Any], Presence]] = []
            for handle in keyed:
                row = None if handle.node_id in forced else present.get(handle.key or "")
                if row is not None:
                    hits.append((handle, row))
                    if handle.node_id in dependents:  # (most calls of a wide graph: none)
                        next_frontier.extend(self._unblock(handle))
                elif self.dryrun:
                    handle.state = "queued"
                    handle.reason = self._reason(handle)
                    self.summary.would_run.append(handle.label)
                    self._emit(QUEUED, handle, reason=handle.reason)
                    self._dry_mark_downstream(handle)
                else:
                    self._enqueue(handle)
            if hits:  # a level's hits as one packed event (before its dependents' events)
                self.events.append(self._mark_cached(hits))
            frontier = next_frontier

    def _keys_of(self, handles: list[Handle[Any]]) -> tuple[list[Handle[Any]], set[str]]:
        """Compute the keys of a level's calls; returns the calls that have one (a call whose
        arguments cannot be hashed fails here), and the ids of those forced to run."""
        keyed: list[Handle[Any]] = []
        forced: set[str] = set()
        per_task: dict[int, tuple[bytes, bool]] = {}  # id(task) -> (key prefix, forced)
        for handle in handles:
            task = handle.task
            of_task = per_task.get(id(task))
            if of_task is None:
                of_task = per_task[id(task)] = (self._key_prefix_of(task), self._forced(handle))
            encoding = handle.encoding  # reused as _encoding_of would, without its calls
            try:
                if encoding is None or encoding.mutable:
                    encoding = self._encoding_of(handle)
                handle.key = cache_key(task, "", encoding, self.env, prefix=of_task[0])
            except (HashingError, TypeError) as exc:
                self._fail_now(handle, exc)
                continue
            keyed.append(handle)
            if of_task[1]:
                forced.add(handle.node_id)
        return keyed, forced

    def _forced(self, handle: Handle[Any]) -> bool:
        return handle.task.options.rerun or handle.task.name in self.rerun_names

    def _mark_cached(self, hits: list[tuple[Handle[Any], Presence]]) -> Event:
        """Resolve calls from their entries; returns their packed CACHED event, to be logged."""
        for handle, row in hits:
            handle.state = "cached"
            handle.digest = row.result_digest
            handle.reason = "cache hit"
        self.summary.cached += len(hits)
        keys = [row.key for _, row in hits]
        self._hits.extend(keys)
        return Event(CACHED, group={
            "node": [h.node_id for h, _ in hits], "task": [h.task.name for h, _ in hits],
            "label": LazyColumn(_label_of, [h for h, _ in hits]), "key": keys,
            **_details_when_read(self.store.index, keys)})

    def _unblock(self, handle: Handle[Any]) -> list[str]:
        ready = []
        for dep_id in self.graph.dependents.get(handle.node_id, ()):
            self.waiting[dep_id] -= 1
            if self.waiting[dep_id] == 0 and self.graph.nodes[dep_id].state == "added":
                ready.append(dep_id)
        return ready

    def _dry_mark_downstream(self, handle: Handle[Any]) -> None:
        for node_id in self.graph.downstream(handle.node_id):
            dep = self.graph.nodes[node_id]
            if dep.state == "added":
                dep.state = "queued"
                dep.reason = f"an input will run first ({handle.label})"
                self.summary.would_run.append(dep.label)
                self._emit(QUEUED, dep, reason=dep.reason)

    def _enqueue(self, handle: Handle[Any]) -> None:
        handle.state = "queued"
        handle.reason = handle.reason or self._reason(handle)
        self._seq += 1
        heapq.heappush(self._ready, (-self._priorities.get(handle.node_id, 0.0), self._seq,
                                     handle.node_id))
        # Packed: a level's calls queued together are one entry of the log (events.py).
        self.events.pack(QUEUED, _QUEUED_FIELDS, (handle.node_id, handle.task.name, handle.label,
                                                  handle.key or "", time.time(), handle.reason))

    def _reason(self, handle: Handle[Any]) -> str:
        """A one-line reason (the full explanation with diffs is ``Pipeline.why``)."""
        if self._forced(handle):
            return "forced by rerun"
        if handle.key in self._unreadable:
            return "its cache entry was unreadable"
        code_digest, _ = self._code_of(handle.task)
        previous = self._previous_result(handle.node_id)
        if previous is None:
            return "never run with these arguments"
        previous_key, previous_code, previous_args = previous
        if previous_code != code_digest:
            return f"code of {handle.task.name} changed"
        digests = arg_digests(self._encoding_of(handle))
        old = json.loads(previous_args or "{}")
        changed = [name for name, d in digests.items() if old.get(name) != d]
        if changed:
            return "input changed: " + ", ".join(changed)
        return "environment changed" if previous_key != handle.key else "entry missing"

    def _previous_result(self, node_id: str) -> tuple[str, str, str] | None:
        """(key, code digest, argument digests) of the latest stored result of a call. The
        misses of a level are read together when it is resolved; others (one miss at a time,
        as along a chain) a few one by one, then the rows of every call not resolved yet at
        once (one query per 900 calls instead of one per call)."""
        if node_id in self._previous:
            return self._previous[node_id]
        self._previous_lookups += 1
        wanted = [node_id]
        if self._previous_lookups > 8:
            wanted += [n for n, h in self.graph.nodes.items()
                       if h.state not in FINAL and n not in self._previous and n != node_id]
        self._read_previous(wanted)
        return self._previous[node_id]

    def _read_previous(self, wanted: list[str]) -> None:
        """Fill ``_previous`` for these calls (None: never stored)."""
        for start in range(0, len(wanted), 900):
            chunk = wanted[start:start + 900]
            for n in chunk:
                self._previous[n] = None
            # Oldest first: the latest row of each call is the one left in the dict.
            for node, key, code, args in self.store.index.execute(
                    "SELECT node, key, code_digest, arg_digests FROM entries WHERE node IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY created", tuple(chunk)):
                self._previous[node] = (key, code, args)

    def _loop(self) -> None:
        while True:
            # Engines that just became free get their next task before a group commit holds
            # this thread (a commit waits for the disk).
            self._dispatch()
            if self._group_due():
                self._commit_timed()
                continue
            if not self._in_flight and not self._ready and self.outcomes.empty():
                break
            timeout = 0.05
            if self._staged:
                due_in = self._staged_since + COMMIT_DELAY - time.monotonic()
                # A commit that is due but put off (an engine about to need the loop): look
                # again soon, without spinning.
                timeout = min(timeout, due_in) if due_in > 0 else 0.01
            try:
                outcome = self.outcomes.get(timeout=timeout)
            except queue.Empty:
                self.executor.poll()
                continue
            self._handle(outcome)
            self._take_outcomes()  # everything that is already there, before deciding anything

    def _group_due(self) -> bool:
        """Whether the staged results should be committed now (see the module docstring)."""
        if not self._staged:
            return False
        if (not self._ready or len(self._staged) >= COMMIT_BATCH
                or self._staged_bytes >= COMMIT_BYTES):
            return True  # someone waits for these results, or enough of them are waiting
        waited = time.monotonic() - self._staged_since
        if self.executor.n_engines == 0:  # in this process: a commit holds up no engine
            return waited >= COMMIT_DELAY
        if waited >= COMMIT_DELAY_MAX:
            return True
        if waited < max(COMMIT_DELAY, self._commit_cost / COMMIT_SHARE):
            return False
        next_free_in = getattr(self.executor, "next_free_in", None)
        free_in = next_free_in() if next_free_in is not None else None
        return free_in is None or free_in > self._commit_cost

    def _commit_timed(self) -> None:
        started = time.perf_counter()
        self._commit()
        self._commit_cost = 0.7 * self._commit_cost + 0.3 * (time.perf_counter() - started)

    def _take_outcomes(self) -> None:
        while True:
            try:
                self._handle(self.outcomes.get_nowait())
            except queue.Empty:
                return

    def _dispatch(self) -> None:
        deferred: list[tuple[float, int, str]] = []
        while self._ready:
            item = heapq.heappop(self._ready)
            handle = self.graph.nodes[item[2]]
            if not self.executor.free_slot_for(handle.task.options,
                                               self.expected.get(handle.node_id, 1.0)):
                deferred.append(item)
                # Something else may fit where this one does not (resources); look a little
                # further, but not through the whole queue every time.
                if len(deferred) >= 16:
                    break
                continue
            self._submit(handle)
            if self.outcomes.qsize() >= 256:
                # In-process jobs finish inside submit: take their results now, and stop to
                # commit once a group is full, so that staged results stay bounded.
                self._take_outcomes()
                if len(self._staged) >= COMMIT_BATCH or self._staged_bytes >= COMMIT_BYTES:
                    break
        for item in deferred:
            heapq.heappush(self._ready, item)
        self.executor.flush()

    def _submit(self, handle: Handle[Any]) -> None:
        try:
            job = self._job_for(handle)
        except _RetryInputs as retry:
            # An input's entry went bad since it was resolved: run that input again first.
            for dep, reason in retry.bad:
                if dep.key is not None:
                    self.store.reject(dep.key, reason, dep.label)
                self._requeue_upstream(dep)
            handle.state = "added"
            self.waiting[handle.node_id] = sum(
                1 for d in self.graph.deps[handle.node_id]
                if self.graph.nodes[d].state not in ("done", "cached"))
            return
        handle.state = "running"
        self._in_flight[handle.node_id] = handle

        def placed(engine: str) -> None:  # called by the executor once it chose where
            # Packed with the tasks placed before and after it, until a reader pulls or
            # anything else is logged: a task that runs long is seen running at the next pull.
            now = time.time()
            self.events.pack(RUNNING, _RUNNING_FIELDS, (handle.node_id, handle.task.name,
                                                        handle.label, handle.key or "", now,
                                                        engine, now))

        self.executor.submit(job, handle.task.options, self.outcomes.put,
                             self.expected.get(handle.node_id, 1.0), placed)

    def _input(self, dep: Upstream) -> Input:
        assert dep.key is not None
        path, offset, _packed, header_digest, _header, _payload = \
            self.store.verified_record(dep.key)
        return Input(dep.key, path, header_digest, dep.label, offset)

    def _job_for(self, handle: Handle[Any]) -> Job:
        inputs: dict[int, Input] = {}
        bad: list[tuple[Upstream, str]] = []
        encoding = self._encoding_of(handle)
        for dep in encoding.handles:
            if id(dep) in inputs:
                continue
            try:
                inputs[id(dep)] = self._input(dep)
            except (FileNotFoundError, BadEntry) as exc:
                bad.append((dep, str(exc) or "missing"))
        if bad:
            raise _RetryInputs(bad)

        def to_input(value: Any) -> Any:
            if isinstance(value, Handle):
                return inputs[id(value)]
            if self.provenance is not None:
                origin = self.provenance(value)
                if origin is not None and id(origin) in inputs:
                    return inputs[id(origin)]
            return value

        if inputs or any(map(is_walked_container, handle.args)) or any(
                map(is_walked_container, handle.kwargs.values())):
            args = tuple(_replace_handles(a, to_input) for a in handle.args)
            kwargs = {k: _replace_handles(v, to_input) for k, v in handle.kwargs.items()}
        else:  # scalars only, no inputs: nothing to replace or copy
            args, kwargs = tuple(handle.args), dict(handle.kwargs)
        code_digest, _ = self._code_of(handle.task)
        encoding = self._encoding_of(handle)
        meta = {
            "node": handle.node_id, "task": handle.task.name, "label": handle.label,
            "code_digest": code_digest, "env": self.env,
            "args": _param_summaries(handle),
            "arg_digests": arg_digests(encoding),
            "upstream": {dep.label: dep.digest for dep in encoding.handles},
            "pipeline": self.pipeline_name,
        }
        self._attempts[handle.node_id] = self._attempts.get(handle.node_id, 0) + 1
        assert handle.key is not None
        return Job(key=handle.key, node_id=handle.node_id, label=handle.label,
                   func=handle.task.func, args=args, kwargs=kwargs, meta=meta,
                   tmp_dir=self._tmp_dir, memcheck=self.memcheck,
                   profile=self.profile_dir is not None,
                   attempt=self._attempts[handle.node_id], has_inputs=bool(inputs))

    def _handle(self, outcome: Outcome) -> None:
        self.executor.finished(outcome)
        handle = self._in_flight.pop(outcome.node_id, None)
        if handle is None or handle.key != outcome.key or handle.state != "running":
            # A late or duplicate result (a resubmitted task whose first engine answered after
            # all): harmless, its staged result is simply not committed.
            if outcome.staged is not None:
                self.store.discard(outcome.staged)
            return
        if outcome.ok:
            staged = outcome.staged
            if staged is None:  # the engine could not reach the store: the kernel stages
                from .store import stage_value

                staged = stage_value(self.store.entries_dir, handle.key, outcome.value,
                                     outcome.extra.get("meta", {}), label=handle.label)
                outcome.value = None
            if not self._staged:
                self._staged_since = time.monotonic()
            if staged.payload is not None:
                self._staged_bytes += len(staged.payload)
            self._staged.append((staged, handle, outcome))
            return
        if outcome.extra.get("store_errno") in (errno.ENOSPC, errno.EDQUOT):
            handle.state = "added"  # not the task's fault: it runs again next time
            code = outcome.extra["store_errno"]
            raise self._cannot_store(OSError(code, os.strerror(code)))
        if outcome.error_type == "Withdrawn":
            # Taken back from an engine's queue before it started (an idle engine takes it):
            # not an attempt.
            self._attempts[handle.node_id] -= 1
            self._requeue(handle, handle.reason)
            return
        if outcome.bad_input is not None:
            self._last_engine[handle.node_id] = outcome.engine
            self._redo_input(handle, *outcome.bad_input)
            return
        if outcome.error_type == "EngineLost":
            # Only the task that was running is charged; it goes to another engine, up to
            # MAX_ENGINE_DEATHS times.
            deaths = self._deaths.setdefault(handle.node_id, [])
            deaths.append(outcome.error_message)
            self._attempts[handle.node_id] -= 1
            if len(deaths) < MAX_ENGINE_DEATHS:
                handle.state = "queued"
                handle.reason = f"resubmitted: {outcome.error_message}"
                self._seq += 1
                heapq.heappush(self._ready, (-self._priorities.get(handle.node_id, 0.0),
                                             self._seq, handle.node_id))
                return
            note = getattr(self.executor, "death_note", None)
            if note is not None:
                deaths = [note(d) for d in deaths]
            outcome.error_message = (f"{len(deaths)} engines died while running it: "
                                     + "; ".join(deaths))
            outcome.traceback = "EngineLost: " + outcome.error_message + "\n"
        if (outcome.error_type not in ("UnpicklableResultError", "EngineLost")
                and self._attempts.get(handle.node_id, 0) <= handle.task.options.retries):
            handle.state = "queued"
            handle.reason = f"retry {self._attempts[handle.node_id]} after " \
                            f"{outcome.error_type}"
            self._seq += 1
            heapq.heappush(self._ready, (-self._priorities.get(handle.node_id, 0.0),
                                         self._seq, handle.node_id))
            return
        self._fail(handle, outcome)

    def _redo_input(self, handle: Handle[Any], bad_key: str, reason: str) -> None:
        """An input failed its check where the task ran: move it aside, run it again, then
        this task."""
        upstream = next((d for d in self._encoding_of(handle).handles if d.key == bad_key), None)
        if self.store.verify(bad_key) is None:
            # The entry is whole here: the engine could not read it (it does not share the
            # cache directory after all). Never move a good entry aside: send the inputs to
            # that engine by value from now on, and run the task again.
            stop_sharing = getattr(self.executor, "engine_cannot_reach_store", None)
            if stop_sharing is not None and stop_sharing(outcome_engine(handle, self)):
                self._requeue(handle, f"inputs sent by value: {reason}")
                return
        self.store.reject(bad_key, reason, upstream.label if upstream else "")
        handle.state = "added"
        if upstream is None:
            self._fail(handle, Outcome(handle.key or "", handle.node_id, False,
                                       error_type="InputUnusable", error_message=reason))
            return
        self._requeue_upstream(upstream)
        self.waiting[handle.node_id] = sum(
            1 for d in self.graph.deps[handle.node_id]
            if self.graph.nodes[d].state not in ("done", "cached"))

    def _requeue(self, handle: Handle[Any], reason: str) -> None:
        handle.state = "queued"
        handle.reason = reason
        self._seq += 1
        heapq.heappush(self._ready, (-self._priorities.get(handle.node_id, 0.0), self._seq,
                                     handle.node_id))

    def _requeue_upstream(self, upstream: Upstream) -> None:
        self._unreadable.add(upstream.key or "")
        if not isinstance(upstream, Handle):
            return  # a value handed out earlier: its call is not part of this run
        if upstream.state in ("done", "cached"):
            if upstream.state == "cached":
                self.summary.cached -= 1
            else:
                self.summary.ran -= 1
            for dep_id in self.graph.dependents.get(upstream.node_id, []):
                self.waiting[dep_id] += 1
            upstream.state = "added"
            upstream.digest = None
            upstream.reason = "its cache entry was unreadable"
            self._enqueue(upstream)

    def _fail(self, handle: Handle[Any], outcome: Outcome) -> None:
        handle.state = "failed"
        error = TaskError(handle.label, outcome.error_type, outcome.error_message,
                          outcome.traceback or f"{outcome.error_type}: {outcome.error_message}",
                          engine=outcome.engine if outcome.engine != "kernel" else None)
        handle.error = error
        self.failures.append(error)
        self.summary.failed += 1
        self._timings.append((handle.key, handle.task.name, handle.label, "failed",
                              outcome.engine, outcome.started, outcome.ended,
                              outcome.duration, outcome.cpu, outcome.peak_memory))
        self._emit(FAILED, handle, engine=outcome.engine, started=outcome.started,
                   ended=outcome.ended, duration=outcome.duration,
                   error=f"{outcome.error_type}: {outcome.error_message}",
                   traceback=error.traceback_text)
        self._skip_downstream(handle)

    def _fail_now(self, handle: Handle[Any], exc: Exception) -> None:
        """A call that cannot even be keyed (an unhashable argument, a bad signature)."""
        self._fail(handle, Outcome(handle.key or "", handle.node_id, False,
                                   error_type=type(exc).__name__, error_message=str(exc),
                                   traceback=f"{type(exc).__name__}: {exc}\n"))

    def _skip_downstream(self, handle: Handle[Any]) -> None:
        for node_id in self.graph.downstream(handle.node_id):
            dep = self.graph.nodes[node_id]
            if dep.state not in FINAL:
                if dep.state == "queued":
                    self._ready = [r for r in self._ready if r[2] != node_id]
                    heapq.heapify(self._ready)
                dep.state = "skipped"
                dep.reason = f"{handle.label} failed"
                self.summary.skipped += 1
                self._emit(SKIPPED, dep, reason=dep.reason)

    def _commit(self) -> None:
        if not self._staged:
            return
        batch, self._staged = self._staged, []
        self._staged_bytes = 0
        rows = []
        for staged, handle, outcome in batch:
            code_digest, _ = self._code_of(handle.task)
            meta = staged.header.get("meta", {})
            rows.append(IndexRow(
                key=staged.key, node=handle.node_id, task=handle.task.name, label=handle.label,
                kind=str(staged.header["kind"]), size=staged.size,
                result_digest=staged.result_digest, header_digest="", created=time.time(),
                duration=outcome.duration, cpu=outcome.cpu, peak_memory=outcome.peak_memory,
                engine=outcome.engine, host=outcome.host, hits=0, code_digest=code_digest,
                args=_flat_json(meta.get("args", {})),
                arg_digests=_flat_json(meta.get("arg_digests", {})),
                upstream=_flat_json(meta.get("upstream", {}))))
        try:
            self.store.commit([s for s, _, _ in batch], rows)
        except StoreError:
            raise  # not the disk: a staged file that is not what it claims
        except (OSError, sqlite3.OperationalError) as exc:
            # Nothing of the group counts as done: what reached the disk before the failure
            # is found again by the next run (the store recovers entries it has not indexed).
            for staged, handle, _ in batch:
                handle.state = "added"
                self.store.discard(staged)
            raise self._cannot_store(exc) from exc
        ready: list[str] = []
        # The group's results as one packed DONE event (events.py): a column per field.
        done: dict[str, list[Any]] = {name: [] for name in _DONE_COLUMNS}
        for (staged, handle, outcome), row in zip(batch, rows, strict=True):
            if self.profile_dir is not None and "profile" in outcome.extra:
                _save_profile(self.profile_dir, handle, outcome.extra["profile"])
            handle.state = "done"
            handle.digest = staged.result_digest
            handle._forget_value()
            self.summary.ran += 1
            self._timings.append((handle.key, handle.task.name, handle.label, "done",
                                  outcome.engine, outcome.started, outcome.ended,
                                  outcome.duration, outcome.cpu, outcome.peak_memory))
            for name, value in zip(_DONE_COLUMNS, (
                    handle.node_id, handle.task.name, handle.label, handle.key or "",
                    outcome.engine, outcome.started, outcome.ended, outcome.duration,
                    outcome.cpu, outcome.peak_memory, staged.size, handle.reason,
                    {"path": self.store.segment_file(row.segment) if row.segment
                     else self.store.entry_file(staged.key)}), strict=True):
                done[name].append(value)
            ready.extend(self._unblock(handle))
        self.events.append(Event(DONE, group=done))
        self._resolve(ready)

    def _commit_the_rest(self) -> None:
        """The last group commit of a run (also of one stopped by an error)."""
        failed_before = self._store_failed
        try:
            self._commit()
        except StoreError:
            if not failed_before:
                raise
            # The run is already stopping for this reason: its error says it once.

    def _cannot_store(self, exc: BaseException) -> StoreError:
        """The error that stops a run whose results cannot be written."""
        self._store_failed = True
        error = disk_error(self.store.path, f"cannot store results in {self.store.path}", exc)
        error.args = (f"{error} The results stored before are kept, and the next run "
                      "resumes from them.",)
        return error

    def _drain_finished(self) -> None:
        """After an interrupt: keep every result that already arrived."""
        while True:
            try:
                outcome = self.outcomes.get_nowait()
            except queue.Empty:
                break
            handle = self._in_flight.get(outcome.node_id)
            if handle is not None and outcome.ok and outcome.staged is not None:
                self._in_flight.pop(outcome.node_id)
                self._staged.append((outcome.staged, handle, outcome))
        for handle in self._in_flight.values():
            handle.state = "added"

    def _finish(self, t0: float) -> None:
        self.summary.wall = time.perf_counter() - t0
        try:
            if self._hits:
                self.store.index.add_hits(self._hits)
            if not self.dryrun:
                try:
                    self._record_history()
                except (OSError, sqlite3.OperationalError) as exc:
                    if not self._store_failed:  # else the run's error already says why
                        raise self._cannot_store(exc) from exc
        finally:
            self._emit(RUN_END, info={"pipeline": self.pipeline_name, "ran": self.summary.ran,
                                      "cached": self.summary.cached,
                                      "failed": self.summary.failed,
                                      "skipped": self.summary.skipped,
                                      "wall": self.summary.wall,
                                      "interrupted": self.summary.interrupted,
                                      "dryrun": self.dryrun})

    def _record_history(self) -> None:
        index = self.store.index
        with index.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (pipeline, started, ended, engines, ran, cached, failed, "
                "skipped) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self.pipeline_name, time.time() - self.summary.wall, time.time(),
                 self.executor.description, self.summary.ran, self.summary.cached,
                 self.summary.failed, self.summary.skipped))
            run_id = cursor.lastrowid
            conn.executemany("INSERT INTO timings VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             [(run_id, *t) for t in self._timings])


def _details_when_read(index: Index, keys: list[str]) -> dict[str, LazyColumn]:
    """Columns of what the index recorded of these cache hits (ENTRY_DETAILS: duration, size,
    engine, ...) for their packed event, read from the index, all at once, when a view first
    reads one: a fully cached run that nobody watches reads only keys and digests."""
    rows: dict[str, tuple[Any, ...]] | None = None
    missing = (None,) * len(ENTRY_DETAILS)  # (an entry deleted since)

    def row_of(key: str) -> tuple[Any, ...]:
        nonlocal rows
        if rows is None:
            rows = index.details(keys)
        return rows.get(key, missing)

    def column(i: int) -> LazyColumn:
        return LazyColumn(lambda key: row_of(key)[i], keys)

    return {name: column(i) for i, name in enumerate(ENTRY_DETAILS)}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector out of the run's bookkeeping.

    Resolving a graph of 10,000 calls allocates tens of thousands of small, long-lived objects
    (handles, keys, events) and makes no cyclic garbage; the collector would traverse them over
    and over (it was 40% of the time of a fully cached re-run). No task runs while it is paused.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Keep the objects that existed before the run out of the collector's full passes.

    A kernel holds many objects (the notebook's data, earlier runs' handles); every full
    collection during a run would traverse all of them again, although only the run's own
    objects can become garbage that matters now. New garbage is still collected; the frozen
    objects are handed back to the collector when the run ends. A process that froze objects
    itself keeps its own arrangement.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def outcome_engine(handle: Handle[Any], run: Run) -> str:
    return run._last_engine.get(handle.node_id, "")


class _RetryInputs(Exception):
    def __init__(self, bad: list[tuple[Upstream, str]]):
        self.bad = bad


def _replace_handles(value: Any, replace: Callable[[Any], Any]) -> Any:
    from .graph import is_walked_container

    replaced = replace(value)
    if replaced is not value:
        return replaced
    if not is_walked_container(value):
        return value
    if isinstance(value, dict):
        return {_replace_handles(k, replace): _replace_handles(v, replace)
                for k, v in value.items()}
    items = [_replace_handles(v, replace) for v in value]
    if isinstance(value, tuple) and type(value) is not tuple:
        return type(value)._make(items)  # type: ignore[attr-defined]
    return type(value)(items)


_json_str = json.encoder.encode_basestring_ascii


def _flat_json(mapping: dict[str, Any]) -> str:
    """``json.dumps`` of a dict of strings, without setting up an encoder per call (three per
    result committed)."""
    if all(type(k) is str and type(v) is str for k, v in mapping.items()):
        return "{" + ", ".join(f"{_json_str(k)}: {_json_str(v)}" for k, v in mapping.items()) + "}"
    return json.dumps(mapping)


def _param_summaries(handle: Handle[Any]) -> dict[str, str]:
    """Short descriptions of each argument, stored with the result (for why and the CLI)."""
    from .keys import bind

    try:
        bound = bind(handle.task, handle.args, handle.kwargs)
    except TypeError:
        return {}
    return {name: value.label if isinstance(value, Handle) else summarize(value)
            for name, value in bound.items()}


def _save_profile(profile_dir: str, handle: Handle[Any], stats: bytes) -> None:
    """cProfile statistics of one task, readable with pstats (``nbindustria profile``)."""
    import os
    import re

    os.makedirs(profile_dir, mode=0o700, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", handle.task.name)
    path = os.path.join(profile_dir, f"{name}-{(handle.key or '')[:16]}.pstats")
    with open(path, "wb") as out:
        out.write(stats)
