"""``Pipeline``: records task calls, runs them, and hands results back.

This is where the modules meet: calls are recorded (task, keys), a run builds the graph and the
scheduler executes it against the store on an executor (this process, or engines), and the
events feed the text log and the dashboard.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, ParamSpec, TextIO, TypeVar, overload

from .config import Settings
from .errors import NbindustriaError, StoreError
from .events import EventLog
from .explain import Explanation, explain
from .hashing import CodeHasher
from .keys import arg_digests, cache_key, code_digest_of, encode_call, node_id
from .reporting import TextReporter
from .scheduler import Executor, LocalExecutor, Run, RunSummary
from .store import Store
from .task import Handle, ResultRef, Task, _decorate, pop_pipeline, push_pipeline
from .worker import python_env

P = ParamSpec("P")
R = TypeVar("R")


def _default_name() -> str:
    if "ipykernel" in sys.modules or hasattr(sys, "ps1"):
        return "notebook"
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
    return Path(path).stem or "pipeline"


class Pipeline:
    """A cached task graph.

    Parameters
    ----------
    name : str, optional
        Shown in logs and the dashboard; defaults to the script's name (``notebook`` in Jupyter).
    cache_dir : path, optional
        Where results are stored (default: ``NBINDUSTRIA_CACHE_DIR``, the directory chosen with
        ``nbindustria init``, else the user cache directory).
    engines : None, int, "auto" or str
        ``None`` runs tasks in this process; a count (or ``"auto"``, one per core) starts local
        ipyparallel engines once and reuses them; any other string names an ipyparallel profile
        of running engines (``ipcluster start --profile NAME``, MPI included).
    dryrun : bool
        Plan and report what would run; run nothing.
    timeit : bool
        Show each task's time and the slowest tasks.
    memcheck : bool
        Sample memory during each task to catch short peaks (else: before/after).
    profiling : bool
        Profile each task that runs with cProfile; stats are saved beside the cache.
    verbose : int
        1 prints a line per task (ndustria style); 0 only failures and the summary.
    """

    def __init__(self, name: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 engines: int | str | None = None, dryrun: bool = False, timeit: bool = True,
                 memcheck: bool = False, profiling: bool = False, *, verbose: int = 1,
                 key_dir: str | os.PathLike[str] | None = None, stream: TextIO | None = None):
        self.name = name or _default_name()
        self.settings = Settings.resolve(cache_dir, engines)
        self.dryrun = dryrun
        self.timeit = timeit
        self.memcheck = memcheck
        self.profiling = profiling
        self._key_dir = key_dir
        self.events = EventLog()
        self.reporter = TextReporter(stream, verbose=verbose, timeit=timeit, memcheck=memcheck)
        self.events.subscribe(self.reporter, packed=True)  # it prints a line per node
        self._store: Store | None = None
        self._executor: Executor | None = None
        self._nodes: dict[str, Handle[Any]] = {}
        self._recorded: dict[str, Handle[Any]] = {}
        self._provenance: dict[int, tuple[Any, ResultRef]] = {}
        self._runs = 0
        self.last_run: Run | None = None

    def __repr__(self) -> str:
        return (f"<Pipeline {self.name!r} cache_dir={str(self.settings.cache_dir)!r} "
                f"engines={self.settings.engines!r}>")

    # ---- set-up --------------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.settings.cache_dir, self._key_dir)
        return self._store

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = self._make_executor(self.settings.engines)
        return self._executor

    def _make_executor(self, engines: int | str | None) -> Executor:
        if engines is None:
            return LocalExecutor()
        return _EnginesOnDemand(engines)

    def use_engines(self, engines: int | str | None) -> None:
        """Switch where tasks run (None: this process)."""
        from .config import parse_engines

        setting = parse_engines(engines)
        if setting != self.settings.engines or self._executor is None:
            self.settings.engines = setting
            self._executor = None

    def close(self) -> None:
        """Close the cache. Everything stored is already durable: the index's last steps
        (SQLite's checkpoint) finish on a thread, which the interpreter waits for at exit."""
        if self._store is not None:
            self._store.close(wait=False)
            self._store = None

    def __enter__(self) -> Pipeline:
        push_pipeline(self)
        return self

    def __exit__(self, *exc: object) -> None:
        pop_pipeline(self)

    # ---- recording -----------------------------------------------------------------------------

    @overload
    def task(self, func: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, /, *, name: str | None = None, rerun: bool = False, version: str | None = None,
             cpus: float = 1, memory: int | str | None = None, gpus: float = 0,
             resources: Mapping[str, float] | None = None, retries: int = 0,
             ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, func: Callable[P, R] | None = None, /, *, name: str | None = None,
             rerun: bool = False, version: str | None = None, cpus: float = 1,
             memory: int | str | None = None, gpus: float = 0,
             resources: Mapping[str, float] | None = None, retries: int = 0,
             ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Like :func:`nbindustria.task`, recording into this pipeline."""
        return _decorate(func, self, name=name, rerun=rerun, version=version, cpus=cpus,
                         memory=memory, gpus=gpus, resources=resources, retries=retries)

    def record(self, task: Task[Any, Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Handle[Any]:
        """Called by a task call: the node for this call (the same one for the same call)."""
        encoding = encode_call(task, args, kwargs, provenance=self.provenance_of)
        nid = node_id(task, encoding)
        handle = self._nodes.get(nid)
        if handle is not None and handle.encoding is not None and handle.encoding.mutable:
            now = self._node_id_now(handle)
            if now != nid:
                # Its arguments were changed in place since it was recorded (a list passed to
                # it): it is another call now, filed under what it is; this call is new.
                del self._nodes[nid]
                pending = self._recorded.pop(nid, None)
                if now is not None:
                    handle.node_id = now
                    self._nodes.setdefault(now, handle)
                    if pending is not None:
                        self._recorded.setdefault(now, handle)
                handle = None
        if handle is None:
            handle = Handle(task, args, kwargs, nid, self)
            self._nodes[nid] = handle
        else:
            # The same call again (a re-executed cell): it runs the task as defined now, so
            # its earlier resolution no longer counts (code or globals may have changed): the
            # next run or result() decides again.
            handle.task = task
            if handle.state in ("done", "cached", "failed", "skipped"):
                handle.state = "added"
        handle.encoding = encoding
        self._recorded[nid] = handle
        return handle

    def _node_id_now(self, handle: Handle[Any]) -> str | None:
        """The node id of a recorded call as its arguments are now (None: unhashable now)."""
        try:
            return node_id(handle.task, encode_call(handle.task, handle.args, handle.kwargs,
                                                    provenance=self.provenance_of))
        except TypeError:  # HashingError included
            return None

    @property
    def handles(self) -> list[Handle[Any]]:
        """Every call this pipeline knows."""
        return list(self._nodes.values())

    @property
    def pending(self) -> list[Handle[Any]]:
        """Calls recorded since the last run."""
        return list(self._recorded.values())

    def find(self, name: str) -> list[Handle[Any]]:
        """Calls whose task name or label is ``name``."""
        return [h for h in self._nodes.values() if name in (h.task.name, h.label)]

    # ---- provenance ----------------------------------------------------------------------------

    def provenance_of(self, value: Any) -> ResultRef | None:
        """The result a value came from, if the value provably has not changed since."""
        entry = self._provenance.get(id(value))
        if entry is None or entry[0] is not value:
            return None
        return entry[1]

    def _remember(self, value: Any, handle: Handle[Any]) -> None:
        # Only values that cannot change in place are trusted by identity: arrays handed back
        # read-only (their memory is a read-only mapping: the flag cannot be set back) and
        # immutable scalars. Anything else is hashed again by content when passed to a task.
        np = sys.modules.get("numpy")
        if np is not None and isinstance(value, np.ndarray) and not value.flags.writeable:
            base = value
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            if isinstance(base, np.ndarray) and base.flags.owndata:
                return  # owns writable memory somewhere: not provably frozen
            self._provenance[id(value)] = (value, ResultRef(handle))

    # ---- running -------------------------------------------------------------------------------

    def run(self, *handles: Handle[Any], rerun: Iterable[str] = (),
            dryrun: bool | None = None) -> RunSummary:
        """Run the calls recorded since the last run (or only what ``handles`` need).

        Cached results are reused; failures of some tasks do not stop independent ones; at the
        end a :class:`~nbindustria.errors.PipelineError` names every failure.
        """
        targets = list(handles) if handles else list(self._recorded.values())
        for target in targets:
            if not isinstance(target, Handle):
                raise NbindustriaError(
                    f"run() takes handles returned by task calls (got {target!r})")
        if not targets:
            self.reporter._write(f"--- {self.name}: nothing to run (no task was called) ---")
            return RunSummary()
        self._runs += 1
        run = Run(store=self.store, events=self.events, executor=self.executor,
                  pipeline_name=self.name, rerun=rerun,
                  dryrun=self.dryrun if dryrun is None else dryrun, memcheck=self.memcheck,
                  provenance=self.provenance_of, run_number=self._runs,
                  profile_dir=str(self.store.path / "profiles") if self.profiling else None)
        self.last_run = run
        try:
            summary = run.execute(targets)
        finally:
            # Finished calls are no longer pending (all of them, or those that were asked for).
            for handle in (targets if handles else list(self._recorded.values())):
                if handle.state in ("done", "cached"):
                    self._recorded.pop(handle.node_id, None)
        if summary.dryrun:
            self.reporter._write(summary.line())
        return summary

    def result_of(self, handle: Handle[Any]) -> Any:
        """Load a call's value from the store, running what it needs first if necessary."""
        if handle.state not in ("done", "cached") or handle.key is None:
            self.run(handle)
        assert handle.key is not None
        ok, value = self.store.try_load(handle.key, handle.label)
        if not ok:  # the entry went bad: it was moved aside; compute it again
            handle.state = "added"
            self.run(handle)
            ok, value = self.store.try_load(handle.key, handle.label)
            if not ok:
                raise StoreError(f"the result of {handle.label} could not be stored and read "
                                 "back; check the disk and the cache directory")
        self._remember(value, handle)
        return value

    def results(self, handles: Iterable[Handle[Any]]) -> list[Any]:
        """The values of many calls, in order: ``[h.result() for h in handles]``, loaded
        together (one index query; each segment file read once), with the same checks.

        Calls that have not run are run first, all in one run.
        """
        handles = list(handles)
        pending = [h for h in handles if h.pipeline is self and not h.done]
        if pending:
            self.run(*pending)
        wanted = {h.key: h for h in handles
                  if h.pipeline is self and h.done and h.key is not None and not h._kept}
        if len(wanted) > 1:  # one value loads as fast on its own
            for key, value in self.store.load_many(wanted).items():
                wanted[key]._keep(value)
                self._remember(value, wanted[key])
        # What the bulk load left out (a file of its own, a damaged or moved record) loads
        # one by one, which moves a bad entry aside and runs its task again.
        return [h.result() for h in handles]

    def why(self, handle: Handle[Any]) -> Explanation:
        """Why this call will run, or ran: never run; code changed (with a diff); an argument
        changed; an input's result changed; forced by rerun; its entry was unreadable."""
        code = CodeHasher()
        key = self._peek_key(handle, code, {})
        code_digest, manifest = code_digest_of(handle.task, code)
        encoding = encode_call(handle.task, handle.args, handle.kwargs, code, self.provenance_of)
        upstream_known = all(u.digest is not None for u in encoding.handles)
        digests = arg_digests(encoding) if upstream_known else None
        from .hashing import summarize
        from .keys import bind

        bound = bind(handle.task, handle.args, handle.kwargs)
        summaries = {n: (v.label if isinstance(v, Handle) else summarize(v))
                     for n, v in bound.items()}
        upstream_params = {name for name, _, hs in encoding.params if hs}
        forced = handle.task.options.rerun
        return explain(self.store, label=handle.label, task=handle.task.name,
                       node_id=handle.node_id, key=key, code_digest=code_digest,
                       manifest=manifest, arg_digests=digests, arg_summaries=summaries,
                       upstream_params=upstream_params, env=python_env(), forced=forced,
                       last_reason=handle.reason, state=handle.state)

    def _peek_key(self, handle: Handle[Any], code: CodeHasher,
                  memo: dict[str, str | None]) -> str | None:
        """The key this call would have now, looking inputs up in the store without running
        anything (None if an input would have to run first)."""
        if handle.node_id in memo:
            return memo[handle.node_id]
        from .graph import direct_deps

        saved: list[tuple[Handle[Any], str | None]] = []
        key: str | None = None
        try:
            for dep in direct_deps(handle):
                dep_key = self._peek_key(dep, code, memo)
                if dep_key is None:
                    memo[handle.node_id] = None
                    return None
                row = self.store.present([dep_key]).get(dep_key)
                if row is None:
                    memo[handle.node_id] = None
                    return None
                saved.append((dep, dep.digest))
                dep.digest = row.result_digest
            code_digest, _ = code_digest_of(handle.task, code)
            encoding = encode_call(handle.task, handle.args, handle.kwargs, code,
                                   self.provenance_of)
            key = cache_key(handle.task, code_digest, encoding, python_env())
        finally:
            for dep, digest in saved:
                dep.digest = digest
        memo[handle.node_id] = key
        return key


    def dashboard(self, start: Literal["last", "next"] | int = "last") -> Any:
        """The dashboard of this pipeline's runs, as a widget to display: ``start="last"`` shows
        the last (or current) run, ``"next"`` follows the next run live."""
        from .dashboard import Dashboard

        return Dashboard(self.events, start=start)

    def report(self, path: str | os.PathLike[str], title: str | None = None) -> Path:
        """Write the dashboard of the last run as one standalone HTML file (plotly inlined:
        it opens with no network)."""
        from .dashboard import write_report

        return Path(write_report(self.events, Path(path), title=title or self.name))


class _EnginesOnDemand:
    """The engine executor, made (engines started or connected) only when a task must run: a
    run whose results are all cached needs no engines, so it starts none."""

    def __init__(self, setting: int | str):
        self.setting = setting
        self._real: Any = None
        self._store: Store | None = None
        self._checks: list[tuple[Any, str]] = []

    @property
    def real(self) -> Any:
        if self._real is None:
            from .dispatch import EngineExecutor

            real = EngineExecutor.from_setting(self.setting)
            for options, label in self._checks:
                real.check_fits(options, label)
            if self._store is not None:
                real.store_dir_for_jobs(self._store)
            self._real = real
        return self._real

    @property
    def started(self) -> bool:
        return self._real is not None

    @property
    def description(self) -> str:
        if self._real is not None:
            return str(self._real.description)
        if isinstance(self.setting, int) or self.setting == "auto":
            return f"{self.setting} local engines (started when a task must run)"
        return f"the engines of profile {self.setting!r} (connected when a task must run)"

    @property
    def n_engines(self) -> int:
        return int(self._real.n_engines) if self._real is not None else 0

    @property
    def memory_limit(self) -> int | None:
        return self._real.memory_limit if self._real is not None else None

    def check_fits(self, options: Any, label: str) -> None:
        if self._real is not None:
            self._real.check_fits(options, label)
        else:
            self._checks.append((options, label))

    def store_dir_for_jobs(self, store: Store) -> str | None:
        self._store = store
        self._checks.clear()
        if self._real is not None:
            return str(self._real.store_dir_for_jobs(store))
        return str(store.entries_dir)

    def free_slot_for(self, options: Any, expected: float = 1.0) -> bool:
        return bool(self.real.free_slot_for(options, expected))

    def submit(self, job: Any, options: Any, report: Any, expected: float = 1.0,
               placed: Any = None) -> None:
        self.real.submit(job, options, report, expected, placed)

    def flush(self) -> None:
        if self._real is not None:
            self._real.flush()

    def finished(self, outcome: Any) -> None:
        if self._real is not None:
            self._real.finished(outcome)

    def cancel_all(self) -> None:
        if self._real is not None:
            self._real.cancel_all()

    def end_run(self) -> None:
        if self._real is not None:
            self._real.end_run()

    def poll(self) -> None:
        if self._real is not None:
            self._real.poll()

    def start(self) -> Any:
        """Start or connect the engines now (``%pipeline engines connect``, a warm-up)."""
        return self.real

    def engine_table(self) -> list[dict[str, Any]]:
        return list(self.real.engine_table())

    def death_note(self, message: str) -> str:
        return str(self.real.death_note(message)) if self._real is not None else message

    def next_free_in(self) -> float | None:
        free_in = self._real.next_free_in() if self._real is not None else None
        return None if free_in is None else float(free_in)

    def engine_cannot_reach_store(self, engine_label: str) -> bool:
        return bool(self._real.engine_cannot_reach_store(engine_label)) \
            if self._real is not None else False


_default: Pipeline | None = None


def default_pipeline() -> Pipeline:
    """The pipeline that bare ``@task`` functions record into (made on first use)."""
    global _default
    if _default is None:
        _default = Pipeline()
    return _default


def set_default_pipeline(pipe: Pipeline | None) -> None:
    global _default
    _default = pipe


def run(*handles: Handle[Any], **options: Any) -> RunSummary:
    """Run the default pipeline (see :meth:`Pipeline.run`)."""
    return default_pipeline().run(*handles, **options)


# Bare @task functions record into the active pipeline, else the default one.
from . import task as _task_module  # noqa: E402 - after the definitions it refers to

_task_module._default_factory = default_pipeline
