"""The IPython extension: ``%load_ext nbindustria``, ``%%pipeline run``, ``%pipeline ...``, ``%%cache``.

Thin by design: the notebook pipeline is an ordinary :class:`~nbindustria.pipeline.Pipeline` made the
default one (bare ``@task`` calls record into it), ``%%pipeline run`` records the calls a cell makes
and runs them, and ``%%cache`` is :mod:`nbindustria.cellcache`. Loading imports nothing heavy:
engines (ipyparallel), the dashboard (ipywidgets, plotly) and the cell cache load on first use.

Every mistake a user can make here (an unknown option, a run cell that calls no task, a name that
matches no task) is a one-line message, never a traceback from inside the extension.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core import magic_arguments as ma
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, magics_class

from . import __version__
from .config import parse_engines
from .errors import NbindustriaError, PipelineError
from .events import CACHED, DONE, FAILED, FINAL_STATES, RUN_END, RUN_START, SKIPPED, Event
from .graph import iter_handles
from .pipeline import Pipeline, set_default_pipeline
from .task import Handle, pop_pipeline, push_pipeline

_LAST = "__nbindustria_last__"  # holds a run cell's last expression until the run ends
_IPYTHON_NAMES = re.compile(r"^(_+|_\d+|_i+|_i\d+|_ih|_oh|_dh|In|Out|__.*__)$")


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by an interrupt: finished results are stored; the next run resumes."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class CellFailed(NbindustriaError):
    """The code of a ``%%pipeline run`` cell raised (its traceback was shown): nothing ran."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def _shown_plainly(exc: BaseException) -> BaseException:
    """Show an nbindustria error as one message, without frames from inside the extension."""
    if not hasattr(exc, "_render_traceback_"):
        text = f"{type(exc).__name__}: {exc}"
        exc._render_traceback_ = lambda: text.splitlines()  # type: ignore[attr-defined]
    return exc


# --------------------------------------------------------------------------------------------
# Sub-command arguments (IPython's magic_arguments: `--help` shows these docstrings)
# --------------------------------------------------------------------------------------------


@ma.magic_arguments(name="%%pipeline run")
@ma.argument("--engines", metavar="N", help="run on N local engines ('auto': one per core)")
@ma.argument("--profile", metavar="NAME", help="run on the engines of a running ipcluster profile")
@ma.argument("--local", action="store_true", help="run in this kernel, one task at a time")
@ma.argument("--rerun", nargs="+", metavar="NAME", default=[],
             help="run these tasks again even if cached")
@ma.argument("--dryrun", action="store_true", help="say what would run; run nothing")
@ma.argument("--no-dashboard", action="store_true",
             help="a progress bar and the text lines instead of the dashboard")
@ma.argument("--allow-failures", action="store_true",
             help="show failed tasks (dashboard, text) without raising, so that the cells "
                  "after this one still run (e.g. Run All)")
def _run_args() -> None:
    """Run the task calls this cell makes; cached results are reused.

    The cell's code runs first and records calls (nothing runs yet). Then the graph runs, and
    every name the cell bound to a task call (also inside lists, tuples and dicts) holds the
    value.
    """


@ma.magic_arguments(name="%pipeline status")
def _status_args() -> None:
    """The last run: counts, failures, time; the settings; what the notebook has called."""


@ma.magic_arguments(name="%pipeline why")
@ma.argument("name", help="a task name, a call as shown (`fit(alpha=0.1)`), or a cached cell")
def _why_args() -> None:
    """Why a task (or a cached cell) will run, or ran: what changed, as a diff."""


@ma.magic_arguments(name="%pipeline graph")
@ma.argument("--dot", action="store_true", help="print Graphviz DOT instead of text")
def _graph_args() -> None:
    """The notebook's graph: task calls and cached cells, with their inputs."""


@ma.magic_arguments(name="%pipeline clear")
@ma.argument("name", nargs="?", help="a task or cached cell (default: all this notebook used)")
@ma.argument("--all", action="store_true", help="every stored result in the cache directory")
def _clear_args() -> None:
    """Delete stored results, so that they are computed again."""


@ma.magic_arguments(name="%pipeline config")
@ma.argument("settings", nargs="*", metavar="KEY=VALUE",
             help="cache_dir, engines, dashboard, verbose, timeit, memcheck, profiling, dryrun")
def _config_args() -> None:
    """Show the settings, or change them (e.g. `%pipeline config engines=4 memcheck=true`)."""


@ma.magic_arguments(name="%pipeline dashboard")
def _dashboard_args() -> None:
    """Show the dashboard of the last run."""


@ma.magic_arguments(name="%pipeline report")
@ma.argument("path", help="where to write the HTML file")
def _report_args() -> None:
    """Write the dashboard of the last run as one standalone HTML file."""


@ma.magic_arguments(name="%pipeline engines")
@ma.argument("action", nargs="?", default="list", choices=["list", "start", "connect", "stop"])
@ma.argument("profile", nargs="?", help="connect: the ipcluster profile")
@ma.argument("-n", type=int, metavar="N", help="start: how many engines (default: one per core)")
@ma.argument("--mpi", action="store_true", help="start: the engines under mpiexec")
def _engines_args() -> None:
    """List, start, connect to or stop the engines tasks run on."""


_SUBCOMMANDS: dict[str, Callable[[], None]] = {
    "status": _status_args, "why": _why_args, "graph": _graph_args, "clear": _clear_args,
    "config": _config_args, "dashboard": _dashboard_args, "report": _report_args,
    "engines": _engines_args,
}


def _parse(spec: Callable[[], None], line: str) -> Any:
    """Parsed arguments, or None after printing the help (``-h``/``--help``)."""
    if {"-h", "--help"} & set(line.split()):
        print(spec.__doc__)
        return None
    try:
        return ma.parse_argstring(spec, line)
    except UsageError as exc:
        name = getattr(spec, "argcmd_name", "%pipeline")
        raise UsageError(f"{name}: {exc} (see {name} --help)") from None


_BOOL = {"1": True, "true": True, "yes": True, "on": True,
         "0": False, "false": False, "no": False, "off": False}
_CONFIG_KEYS = ("cache_dir", "engines", "dashboard", "verbose", "timeit", "memcheck",
                "profiling", "dryrun")


# --------------------------------------------------------------------------------------------
# The notebook session
# --------------------------------------------------------------------------------------------


class NotebookSession:
    """The extension's state in one IPython shell: the notebook pipeline, the cached cells,
    the settings and the last run."""

    def __init__(self, shell: Any):
        self.shell = shell
        self.pipe = Pipeline(name="notebook")
        # NBINDUSTRIA_DASHBOARD=0: progress bars instead (e.g. headless runs of notebooks).
        self.dashboard = _BOOL.get(os.environ.get("NBINDUSTRIA_DASHBOARD", "1").lower(), True)
        self.last: dict[str, Any] = {}
        # The notebook's engine setting; `%%pipeline run --engines/--profile/--local` overrides
        # it for one run only.
        self.engine_setting: int | str | None = self.pipe.settings.engines
        self._cells: Any = None
        self._magics: NbindustriaMagics | None = None

    @property
    def cells(self) -> Any:
        if self._cells is None:
            from .cellcache import Cells

            self._cells = Cells(self.shell, lambda: self.pipe.store)
            self._cells.verbose = self.pipe.reporter.verbose
        return self._cells

    # ---- loading ---------------------------------------------------------------------------------

    def activate(self) -> None:
        if self._magics is None:
            self._magics = NbindustriaMagics(self.shell, self)
            self.shell.register_magics(self._magics)
            set_default_pipeline(self.pipe)
        self._start_engines_early()

    def deactivate(self) -> None:
        if self._magics is None:
            return
        manager = self.shell.magics_manager
        for kind, names in (("line", ["pipeline"]), ("cell", ["pipeline", "cache"])):
            for name in names:
                manager.magics[kind].pop(name, None)
        manager.registry.pop(type(self._magics).__name__, None)
        self._magics = None
        set_default_pipeline(None)  # bare @task calls get a pipeline of their own again

    def describe_engines(self) -> str:
        setting = self.engine_setting
        if setting is None:
            return "engines: none, tasks run in this kernel (%pipeline config engines=N)"
        if isinstance(setting, int) or setting == "auto":
            return f"engines: {setting} local"
        if setting.startswith("mpi:"):
            return f"engines: {setting[4:]} local under MPI"
        return f"engines: ipcluster profile {setting!r}"

    def status_line(self) -> str:
        return (f"nbindustria {__version__}: cache {self.pipe.settings.cache_dir} · "
                f"{self.describe_engines()}")

    def _start_engines_early(self) -> None:
        """A configured engine count starts in the background, so the first run need not wait."""
        setting = self.engine_setting
        if not (isinstance(setting, int) or setting == "auto"):
            return
        try:
            from . import cluster

            cluster.start_in_background(setting)
        except (ImportError, NbindustriaError) as exc:
            print(f"nbindustria: engines not started ({exc}); tasks will start them when "
                  "they run", file=sys.stderr)

    # ---- %%pipeline run --------------------------------------------------------------------------

    def run_cell(self, line: str, cell: str) -> None:
        args = _parse(_run_args, line)
        if args is None:
            return
        chosen = [o for o in ("engines", "profile", "local") if getattr(args, o)]
        if len(chosen) > 1:
            raise UsageError(f"%%pipeline run: choose one of --engines, --profile, --local "
                             f"(got --{' --'.join(chosen)})")
        if not cell.strip():
            raise UsageError("%%pipeline run: the cell is empty; call tasks in it, e.g. "
                             "`models = [fit(df, alpha=a) for a in (0.1, 0.2)]`")
        shell = self.shell
        source = shell.transform_cell(cell)
        source, has_last = _capture_last_expression(source)
        before = dict(shell.user_ns)
        recorder = _CellRecorder(self.pipe)
        push_pipeline(recorder)
        try:
            result = shell.run_cell(source, store_history=False)
        finally:
            pop_pipeline(recorder)
        last = shell.user_ns.pop(_LAST, None) if has_last else None
        if not result.success:
            raise CellFailed("%%pipeline run: the cell's code raised (above); no task was run")
        calls = list(recorder.calls.values())
        if not calls:
            print("%%pipeline run: the cell called no task, so nothing ran. Decorate functions "
                  "with @task (from nbindustria import task) and call them in this cell "
                  "(tasks of a Pipeline of your own run with its run()).", file=sys.stderr)
            return
        self._check_rerun(args.rerun, calls)
        try:
            self._use_engines(args)
        except NbindustriaError as exc:
            raise _shown_plainly(exc) from None
        failure: PipelineError | None = None
        progress = _Progress(self.pipe.events, self.dashboard and not args.no_dashboard, shell)
        # The dashboard shows every task: the text log keeps only failures and the summary.
        verbose = self.pipe.reporter.verbose
        if progress.is_dashboard:
            self.pipe.reporter.verbose = 0
        try:
            summary = self.pipe.run(*calls, rerun=args.rerun, dryrun=args.dryrun or None)
            self.last = {"summary": summary, "failures": [], "interrupted": False}
        except PipelineError as exc:
            failure = exc
            self.last = {"summary": self.pipe.last_run.summary if self.pipe.last_run else None,
                         "failures": exc.failures, "interrupted": False}
        except KeyboardInterrupt:
            run = self.pipe.last_run
            self.last = {"summary": run.summary if run else None, "failures": [],
                         "interrupted": True}
            done = sum(1 for h in calls if h.done)
            raise RunInterrupted(f"the run was interrupted; {done} finished result(s) are "
                                 "stored, and running the cell again resumes from there"
                                 ) from None
        except ImportError as exc:
            raise UsageError(f"%%pipeline run: engines are not available here ({exc}); run "
                             "with --local, or install nbindustria's engine dependencies"
                             ) from None
        except NbindustriaError as exc:
            raise _shown_plainly(exc) from None
        finally:
            progress.close()
            self.pipe.reporter.verbose = verbose
        if args.dryrun:
            return
        self._bind_results(source, before)
        if last is not None:
            value, _ = _resolve(last, {})
            from IPython.display import display

            display(value)
        if failure is not None:
            if not args.allow_failures:
                raise failure
            print(f"%%pipeline run: {failure}", file=sys.stderr)

    def _check_rerun(self, names: list[str], calls: list[Handle[Any]]) -> None:
        if not names:
            return
        from .graph import Graph

        known = {h.task.name for h in Graph(calls).nodes.values()}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"%%pipeline run --rerun: no task named {', '.join(unknown)} in "
                             f"this cell's graph (its tasks: {', '.join(sorted(known))})")

    def _use_engines(self, args: Any) -> None:
        if args.local:
            setting: int | str | None = None
        elif args.engines:
            text = str(args.engines)
            if not (text.isdigit() or text == "auto"):
                raise UsageError(f"%%pipeline run --engines: expected a count or 'auto' "
                                 f"(got {text!r})")
            setting = parse_engines(text)
        elif args.profile:
            setting = args.profile
        else:
            setting = self.engine_setting
        self.pipe.use_engines(setting)

    def _bind_results(self, source: str, before: dict[str, Any]) -> list[str]:
        """Replace the handles the cell bound (also in lists, tuples, dicts) by their values."""
        ns = self.shell.user_ns
        try:
            mentioned = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        except SyntaxError:
            mentioned = set()
        changed_names = {n for n, v in ns.items() if n not in before or before[n] is not v}
        names = [name for name in sorted((mentioned | changed_names) & set(ns))
                 if not _IPYTHON_NAMES.match(name)]
        # The values come from the store in one bulk load (a cell that binds a list of 10,000
        # results would otherwise open the store 20,000 times).
        self.pipe.results(h for name in names for h in iter_handles(ns[name]) if h.done)
        memo: dict[int, tuple[Any, bool]] = {}
        bound = []
        for name in names:
            value = ns[name]
            labels = _labels_in(value)
            new, changed = _resolve(value, memo)
            if changed:
                ns[name] = new
                bound.append(name)
                if labels:
                    self.cells.note_origin(name, labels, new)
        return bound

    # ---- line magics -------------------------------------------------------------------------

    def status(self, args: Any) -> None:
        print(self.status_line())
        last = self.last
        if not last:
            print("no run yet in this notebook")
        else:
            summary = last.get("summary")
            line = summary.line() if summary is not None else "no summary"
            print(f"last run: {line}" + (" (interrupted)" if last.get("interrupted") and
                                         "interrupted" not in line else ""))
            for failure in last.get("failures", []):
                print(f"  failed: {failure.label}: {failure.exc_type}: {failure.message}")
        handles = self.pipe.handles
        states: dict[str, int] = {}
        for h in handles:
            states[h.state] = states.get(h.state, 0) + 1
        counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
        print(f"task calls: {len(handles)} ({counts}); pending: {len(self.pipe.pending)}")
        if self._cells is not None and self._cells.records:
            cells = ", ".join(f"{r.name} [{r.state}]" for r in self._cells.records.values())
            print(f"cached cells: {cells}")

    def why(self, args: Any) -> None:
        name = args.name
        matches = self.pipe.find(name)
        if not matches and self._cells is not None and name in self._cells.records:
            print(self._cells.why(name))
            return
        if not matches:
            raise UsageError(f"%pipeline why: no task or cached cell named {name!r}"
                             f"{self._known()}")
        for handle in matches[:10]:
            try:
                print(self._why_task(handle))
            except NbindustriaError as exc:
                print(f"{handle.label}: cannot say ({exc})")
        if len(matches) > 10:
            print(f"... and {len(matches) - 10} more calls of {name}")

    def _why_task(self, handle: Handle[Any]) -> Any:
        """The core's explanation; for a call that ran, also what changed since the result it
        replaced (the code diff)."""
        from .explain import diff_manifests

        explanation = self.pipe.why(handle)
        if explanation.status != "ran" or explanation.details or not handle.key:
            return explanation
        index = self.pipe.store.index
        previous = index.query("node = ? AND key != ?", (handle.node_id, handle.key), limit=1)
        current = index.get_many([handle.key]).get(handle.key)
        if previous and current and previous[0].code_digest != current.code_digest:
            reasons, diff = diff_manifests(index.get_code(previous[0].code_digest),
                                           index.get_code(current.code_digest) or {})
            explanation.reasons += [f"since the previous result: {r}" for r in reasons]
            explanation.details += diff
        return explanation

    def _known(self) -> str:
        names = sorted({h.task.name for h in self.pipe.handles})
        if self._cells is not None:
            names += sorted(self._cells.records)
        return f"; known: {', '.join(names)}" if names else "; no task has been called yet"

    def graph(self, args: Any) -> None:
        nodes = notebook_graph(self)
        if args.dot:
            print(_dot(nodes))
            return
        tasks = [n for n in nodes if n["kind"] == "task"]
        cells = [n for n in nodes if n["kind"] == "cell"]
        print(f"notebook graph: {len(tasks)} task call(s), {len(cells)} cached cell(s)")
        for title, group in (("tasks", tasks), ("cached cells", cells)):
            if not group:
                continue
            print(title)
            for node in group:
                deps = f"  <- {', '.join(node['deps'])}" if node["deps"] else ""
                print(f"  [{node['state']}] {node['label']}{deps}")

    def clear(self, args: Any) -> None:
        store = self.pipe.store
        if args.all:
            keys = list(store.keys())
            what = "every result in the cache"
        else:
            if args.name:
                names = [args.name]
            else:
                names = sorted({h.task.name for h in self.pipe.handles})
                if self._cells is not None:
                    names += sorted(self._cells.records)
            tasks = [n for n in names] + [f"cell:{n}" for n in names]
            keys = [row.key for t in tasks for row in store.index.query("task = ?", (t,))]
            known = args.name is None or self.pipe.find(args.name) or keys or (
                self._cells is not None and args.name in self._cells.records)
            if not known:
                raise UsageError(f"%pipeline clear: no task or cached cell named "
                                 f"{args.name!r}{self._known()}")
            what = args.name or "the results of this notebook's tasks and cells"
        count = store.delete(keys)
        for handle in self.pipe.handles:
            if args.all or not args.name or args.name in (handle.task.name, handle.label):
                handle.state = "added"
                handle._forget_value()
        print(f"cleared {what}: {count} stored result(s) deleted")

    def config(self, args: Any) -> None:
        for item in args.settings:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"%pipeline config: expected KEY=VALUE (got {item!r})")
            self._set(key.strip(), value.strip())
        p = self.pipe
        shown = {"cache_dir": str(p.settings.cache_dir), "engines": self.engine_setting,
                 "dashboard": self.dashboard, "verbose": p.reporter.verbose,
                 "timeit": p.timeit, "memcheck": p.memcheck, "profiling": p.profiling,
                 "dryrun": p.dryrun}
        for key in _CONFIG_KEYS:
            print(f"{key:10} = {shown[key]}")

    def _set(self, key: str, value: str) -> None:
        p = self.pipe
        if key not in _CONFIG_KEYS:
            raise UsageError(f"%pipeline config: unknown setting {key!r} "
                             f"(one of {', '.join(_CONFIG_KEYS)})")
        if key == "cache_dir":
            p.close()
            p.settings.cache_dir = Path(value).expanduser()
            for handle in p.handles:
                handle.state = "added"
                handle._forget_value()
        elif key == "engines":
            try:
                self.engine_setting = parse_engines(value)
            except NbindustriaError as exc:
                raise UsageError(f"%pipeline config: {exc}") from None
            p.use_engines(self.engine_setting)
            self._start_engines_early()
        elif key == "verbose":
            if not value.isdigit():
                raise UsageError(f"%pipeline config: 'verbose' must be 0 or 1 (got {value!r})")
            p.reporter.verbose = int(value)
            if self._cells is not None:
                self._cells.verbose = int(value)
        else:
            flag = _BOOL.get(value.lower())
            if flag is None:
                raise UsageError(f"%pipeline config: {key!r} must be true or false "
                                 f"(got {value!r})")
            if key == "dashboard":
                self.dashboard = flag
            elif key in ("timeit", "memcheck"):
                setattr(p, key, flag)
                setattr(p.reporter, key, flag)
            else:
                setattr(p, key, flag)

    def show_dashboard(self, args: Any) -> None:
        if not any(e.kind == RUN_START for e in self.pipe.events.since(0)):
            print("no run yet in this notebook: run a %%pipeline run cell first")
            return
        try:
            from .dashboard import Dashboard

            board = Dashboard(self.pipe.events, live=False)
        except ImportError as exc:
            print(f"the dashboard is not available ({exc}); the last run:")
            self.status(args)
            return
        from IPython.display import display

        display(board.widget)

    def report(self, args: Any) -> None:
        if not any(e.kind == RUN_START for e in self.pipe.events.since(0)):
            raise UsageError("%pipeline report: no run yet in this notebook")
        try:
            from .dashboard import write_report
        except ImportError as exc:
            raise UsageError(f"%pipeline report: needs the dashboard's packages ({exc})"
                             ) from None
        path = write_report(self.pipe.events, args.path)
        print(f"wrote {Path(path).resolve()}")

    def engines(self, args: Any) -> None:
        try:
            self._engines(args)
        except ImportError as exc:
            raise UsageError(f"%pipeline engines: ipyparallel is not available ({exc})") from None
        except NbindustriaError as exc:
            raise _shown_plainly(exc) from None

    def _engines(self, args: Any) -> None:
        p = self.pipe
        if args.action == "start":
            from . import cluster

            n: int | str = args.n if args.n else "auto"
            cluster.start_in_background(n, mpi=args.mpi)
            self.engine_setting = f"mpi:{n}" if args.mpi else n
            p.use_engines(self.engine_setting)
            print(f"starting {n} engine(s){' under MPI' if args.mpi else ''} in the "
                  "background; the next run uses them")
        elif args.action == "connect":
            if not args.profile:
                raise UsageError("%pipeline engines connect: name the ipcluster profile")
            self.engine_setting = args.profile
            p.use_engines(self.engine_setting)
            start = getattr(p.executor, "start", None)
            if start is not None:
                start()  # connect now, so that a wrong profile is said here
            print(f"connected: {p.executor.description}")
        elif args.action == "stop":
            from . import cluster

            cluster.stop_shared()
            self.engine_setting = None
            p.use_engines(None)
            print("engines stopped; tasks run in this kernel")
        else:
            print(self.describe_engines())
            if self.engine_setting is not None:
                p.use_engines(self.engine_setting)
                table = getattr(p.executor, "engine_table", None)
                for row in (table() if table is not None else []):
                    rank = f", MPI rank {row['mpi_rank']}" if row.get("mpi_rank") is not None \
                        else ""
                    print(f"  engine {row['id']}: {row['host']} pid {row['pid']}{rank}, "
                          f"{row['state']}, {row['tasks_done']} task(s) done")

    # ---- %%cache -----------------------------------------------------------------------------

    def cache_cell(self, line: str, cell: str) -> None:
        args = _parse(_cache_args, line)
        if args is None:
            return
        if not cell.strip():
            raise UsageError("%%cache: the cell is empty")
        try:
            ok = self.cells.run(cell, args.name)
        except NbindustriaError as exc:
            raise _shown_plainly(exc) from None
        if not ok:
            raise CellFailed("%%cache: the cell's code raised (above); nothing was stored")


@ma.magic_arguments(name="%%cache")
@ma.argument("--name", help="the cell's name in the graph, `why` and `clear` (default: its "
                            "outputs)")
def _cache_args() -> None:
    """Cache this whole cell: on a hit its outputs come back and its output is shown again.

    Inputs (names it reads) and outputs (names it binds) are found from the code; the key is
    the cell's code, the input values and the code of the functions it calls.
    """


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _CellRecorder:
    """Records a run cell's calls into the notebook pipeline, and remembers which they were."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.calls: dict[str, Handle[Any]] = {}

    def record(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Handle[Any]:
        handle = self.pipe.record(task, args, kwargs)
        self.calls[handle.node_id] = handle
        return handle

    def result_of(self, handle: Handle[Any]) -> Any:
        return self.pipe.result_of(handle)


def _capture_last_expression(source: str) -> tuple[str, bool]:
    """Bind a trailing expression to a name (its value is shown after the run, not the handle
    before it); the text edit keeps every line where it was."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source, False
    if not tree.body or not isinstance(tree.body[-1], ast.Expr) or \
            source.rstrip().endswith(";"):
        return source, False
    node = tree.body[-1]
    lines = source.splitlines(True)
    line = lines[node.lineno - 1]
    offset = len(line.encode()[:node.col_offset].decode())
    lines[node.lineno - 1] = f"{line[:offset]}{_LAST} = {line[offset:]}"
    return "".join(lines), True


def _resolve(value: Any, memo: dict[int, tuple[Any, bool]]) -> tuple[Any, bool]:
    """``value`` with every finished handle replaced by its result (containers rebuilt only
    where something changed)."""
    if isinstance(value, Handle):
        return (value.result(), True) if value.done else (value, False)
    tp = type(value)
    if tp not in (list, tuple, dict, set, frozenset) and not (
            isinstance(value, tuple) and hasattr(tp, "_fields")):
        return value, False
    known = memo.get(id(value))
    if known is not None:
        return known
    memo[id(value)] = (value, False)  # a container that holds itself stays as it is
    if isinstance(value, dict):
        items = [(k, _resolve(v, memo)) for k, v in value.items()]
        changed = any(c for _, (_, c) in items)
        out: Any = {k: v for k, (v, _) in items} if changed else value
    else:
        parts = [_resolve(v, memo) for v in value]
        changed = any(c for _, c in parts)
        if not changed:
            out = value
        elif isinstance(value, tuple) and tp is not tuple:
            out = tp._make(v for v, _ in parts)
        else:
            try:
                out = tp(v for v, _ in parts)
            except TypeError:  # a set of values that cannot be hashed: keep the handles
                out, changed = value, False
    memo[id(value)] = (out, changed)
    return out, changed


def _labels_in(value: Any, depth: int = 0) -> list[str]:
    if isinstance(value, Handle):
        return [value.label]
    if depth > 3 or type(value) not in (list, tuple, dict, set, frozenset):
        return []
    items = value.values() if isinstance(value, dict) else value
    return [label for item in items for label in _labels_in(item, depth + 1)]


def notebook_graph(session: NotebookSession) -> list[dict[str, Any]]:
    """Nodes of the notebook's graph: task calls and cached cells, each with the labels of
    what it reads (upstream calls, values from other calls or cells)."""
    from .graph import direct_deps

    produced: dict[int, tuple[str, ...]] = {}
    if session._cells is not None:
        produced = session._cells.origins_by_identity()
    nodes = []
    for handle in session.pipe.handles:
        deps = [d.label for d in direct_deps(handle)]
        if handle.encoding is not None:  # values passed on with their provenance
            deps += [u.label for u in handle.encoding.handles]
        for value in [*handle.args, *handle.kwargs.values()]:
            deps += [label for label in produced.get(id(value), ())]
        nodes.append({"kind": "task", "label": handle.label, "state": handle.state,
                      "deps": list(dict.fromkeys(d for d in deps if d != handle.label))})
    if session._cells is not None:
        for record in session._cells.records.values():
            nodes.append({"kind": "cell", "label": f"%%cache {record.name}",
                          "state": record.state or "?", "deps": list(record.upstream)})
    return nodes


def _dot(nodes: list[dict[str, Any]]) -> str:
    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["digraph notebook {", "  rankdir=LR;"]
    for node in nodes:
        shape = "box" if node["kind"] == "cell" else "ellipse"
        lines.append(f"  {q(node['label'])} [shape={shape}, tooltip={q(node['state'])}];")
        lines += [f"  {q(dep)} -> {q(node['label'])};" for dep in node["deps"]]
    lines.append("}")
    return "\n".join(lines)


class _Progress:
    """What a run cell shows while it runs: the live dashboard; else (not installed, or
    ``--no-dashboard``) a progress bar widget. The text lines come from the pipeline itself."""

    def __init__(self, events: Any, dashboard: bool, shell: Any):
        self._close: Callable[[], None] | None = None
        self.is_dashboard = False
        if getattr(shell, "kernel", None) is None:
            return  # a terminal: the text lines (and tqdm) are the view
        from IPython.display import display

        if dashboard:
            try:
                from .dashboard import Dashboard

                board = Dashboard(events, start=events.next_index)
            except Exception as exc:  # a view must never stop a run
                print(f"(dashboard unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
            else:
                display(board.widget)
                self.is_dashboard = True

                def finish() -> None:
                    board.refresh()
                    board.close()

                self._close = finish
                return
        try:
            import ipywidgets
        except ImportError:
            return
        self.bar = ipywidgets.IntProgress(value=0, min=0, max=1, description="tasks",
                                          layout=ipywidgets.Layout(width="50%"))
        self.label = ipywidgets.Label("starting")
        self.counts = {"done": 0, "cached": 0, "failed": 0, "skipped": 0}
        display(ipywidgets.HBox([self.bar, self.label]))
        self._close = events.subscribe(self._on_event, packed=True)

    def _on_event(self, event: Event) -> None:
        if event.kind == RUN_START:
            self.bar.max = max(1, int(str(event.info.get("tasks", 1))))
        elif event.kind in FINAL_STATES:
            n = len(event.nodes())  # a packed event counts each of its nodes
            self.counts[{DONE: "done", CACHED: "cached", FAILED: "failed",
                         SKIPPED: "skipped"}[event.kind]] += n
            self.bar.value = min(self.bar.max, self.bar.value + n)
        elif event.kind == RUN_END:
            self.bar.bar_style = "danger" if self.counts["failed"] else "success"
        else:
            return
        c = self.counts
        self.label.value = (f"{self.bar.value}/{self.bar.max}: ran {c['done']}, cached "
                            f"{c['cached']}, failed {c['failed']}, skipped {c['skipped']}")

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


# --------------------------------------------------------------------------------------------
# The magics and the extension's entry points
# --------------------------------------------------------------------------------------------


@magics_class
class NbindustriaMagics(Magics):
    """``%%pipeline run``, ``%pipeline ...`` and ``%%cache``."""

    def __init__(self, shell: Any, session: NotebookSession):
        super().__init__(shell)
        self.session = session

    @line_cell_magic
    def pipeline(self, line: str, cell: str | None = None) -> None:
        """nbindustria's notebook pipeline.

        As a cell magic::

            %%pipeline run [--engines N | --profile NAME | --local] [--rerun NAME ...]
                           [--dryrun] [--no-dashboard]

        As a line magic::

            %pipeline status            the last run: counts, failures, time
            %pipeline why NAME          why a task or cached cell will run, or ran
            %pipeline graph [--dot]     the notebook's graph of tasks and cached cells
            %pipeline clear [NAME] [--all]
            %pipeline config [KEY=VALUE ...]
            %pipeline dashboard         the dashboard of the last run
            %pipeline report PATH       the dashboard as a standalone HTML file
            %pipeline engines [list | start -n N [--mpi] | connect PROFILE | stop]

        Each takes --help.
        """
        sub, _, rest = line.strip().partition(" ")
        session = self.session
        if cell is not None:
            if sub != "run":
                raise UsageError(f"%%pipeline: the cell magic is `%%pipeline run [options]` "
                                 f"(got {line.strip()!r})")
            session.run_cell(rest, cell)
            return
        if sub in ("", "-h", "--help", "help"):
            print(self.pipeline.__doc__)
            return
        if sub == "run":
            raise UsageError("`%%pipeline run` is a cell magic: put it on the first line of a "
                             "cell that calls tasks")
        spec = _SUBCOMMANDS.get(sub)
        if spec is None:
            raise UsageError(f"%pipeline: unknown command {sub!r} (one of "
                             f"{', '.join(['run', *_SUBCOMMANDS])}; see %pipeline --help)")
        args = _parse(spec, rest)
        if args is None:
            return
        handler = {"status": session.status, "why": session.why, "graph": session.graph,
                   "clear": session.clear, "config": session.config,
                   "dashboard": session.show_dashboard, "report": session.report,
                   "engines": session.engines}[sub]
        try:
            handler(args)
        except NbindustriaError as exc:
            raise _shown_plainly(exc) from None

    @cell_magic
    def cache(self, line: str, cell: str) -> None:
        """Cache a whole cell. See ``%%cache --help``."""
        self.session.cache_cell(line, cell)


_session: NotebookSession | None = None


def load(ipython: Any) -> None:
    """Register the magics and make the notebook pipeline the default one; print one line."""
    global _session
    if _session is None or _session.shell is not ipython:
        _session = NotebookSession(ipython)
    _session.activate()
    print(_session.status_line())


def unload(ipython: Any) -> None:
    """Remove the magics; the notebook pipeline (and its handles) stay usable."""
    if _session is not None and _session.shell is ipython:
        _session.deactivate()


def session() -> NotebookSession | None:
    """The extension's state in this kernel (None before ``%load_ext nbindustria``)."""
    return _session
