"""The ``nbindustria`` command: look into a cache directory, chart its history, keep it tidy.

Every command reads the store's index (SQLite beside the entries: tables ``entries``, ``runs``
and ``timings``); only ``show --value``, ``verify``, ``gc`` and ``clear`` open the entries
themselves (and need the cache's key). Charts are standalone HTML files (plotly, inlined so they
open offline); the path is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import default_cache_dir, parse_engines, write_config
from .errors import NbindustriaError
from .reporting import format_bytes, format_seconds
from .task import parse_memory


class CliError(Exception):
    """A message for the user; exit status 2."""


# ---- opening the cache ---------------------------------------------------------------------


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()


def _index(args: argparse.Namespace) -> Any:
    """The index of an existing cache (no key needed to read metadata)."""
    from .store import INDEX_NAME, MARKER, Index

    path = _cache_dir(args)
    if not (path / MARKER).exists():
        raise CliError(f"no nbindustria cache at {path} (choose one with `nbindustria init`, "
                       "or pass --cache-dir)")
    return Index(path / INDEX_NAME)


def _store(args: argparse.Namespace) -> Any:
    from .store import MARKER, Store

    path = _cache_dir(args)
    if not (path / MARKER).exists():
        raise CliError(f"no nbindustria cache at {path} (choose one with `nbindustria init`, "
                       "or pass --cache-dir)")
    return Store(path)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_figure(fig: Any, args: argparse.Namespace, name: str) -> Path:
    path = Path(args.html) if args.html else _cache_dir(args) / "reports" / f"{name}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True,
                   config={"displaylogo": False})
    return path


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise CliError("charts need plotly: pip install 'nbindustria[dashboard]' "
                       "(or pass --no-plot)") from None
    return go


# ---- commands ------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    path = args.dir
    if path is None:
        default = str(default_cache_dir())
        if sys.stdin.isatty():
            answer = input(f"cache directory [{default}]: ").strip()
            path = answer or default
        else:
            path = default
    cache = Path(path).expanduser().resolve()
    settings = {"cache_dir": str(cache)}
    if args.engines is not None:
        try:
            parse_engines(args.engines)
        except NbindustriaError as exc:
            raise CliError(str(exc)) from None
        settings["engines"] = args.engines
    from .store import Store

    Store(cache).close()  # creates it private (0700) with its key, or checks an existing one
    config = write_config(**settings)
    print(f"cache directory: {cache}")
    print(f"settings written to {config}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    index = _index(args)
    where, params = ("task = ?", (args.task,)) if args.task else ("", ())
    order = {"created": "created DESC", "size": "size DESC", "duration": "duration DESC",
             "hits": "hits DESC"}[args.sort]
    rows = index.query(where, params, order=order, limit=args.limit)
    total = index.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries" +
                          (f" WHERE {where}" if where else ""), params)[0]
    if not rows:
        print("no stored results" + (f" of task {args.task!r}" if args.task else ""))
        return 0
    print(_table([[r.key[:12], r.task, _short(r.label, 50), format_bytes(r.size),
                   format_seconds(r.duration), str(r.hits), _when(r.created)] for r in rows],
                 ["key", "task", "call", "size", "took", "hits", "created"]))
    shown = f"{len(rows)} of {total[0]}" if len(rows) < total[0] else str(total[0])
    print(f"{shown} result(s), {format_bytes(total[1])} in all")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    index = _index(args)
    rows = index.query("key LIKE ?", (args.key + "%",), limit=10)
    if not rows:
        raise CliError(f"no stored result whose key starts with {args.key!r}")
    if len(rows) > 1:
        raise CliError(f"{args.key!r} matches several results: " +
                       ", ".join(r.key[:16] for r in rows) + "; give more of the key")
    row = rows[0]
    for name, value in [("key", row.key), ("task", row.task), ("call", row.label),
                        ("kind", row.kind), ("size", format_bytes(row.size)),
                        ("created", _when(row.created)), ("took", format_seconds(row.duration)),
                        ("cpu", format_seconds(row.cpu)),
                        ("peak memory", format_bytes(row.peak_memory)),
                        ("engine", row.engine or "-"), ("host", row.host or "-"),
                        ("hits", str(row.hits)), ("code digest", row.code_digest)]:
        print(f"{name:12} {value}")
    for title, data in (("arguments", row.args), ("upstream", row.upstream)):
        parsed = json.loads(data or "{}")
        if parsed:
            print(f"{title}:")
            for k, v in parsed.items():
                print(f"  {k} = {v}")
    manifest = index.get_code(row.code_digest) or {}
    for name, entry in manifest.items():
        if entry.get("kind") in ("function", "class") and entry.get("source"):
            print(f"code of {name}:")
            print("    " + entry["source"].rstrip().replace("\n", "\n    "))
    if args.value:
        store = _store(args)
        ok, value = store.try_load(row.key, row.label)
        print("value: " + (_short(repr(value), 2000) if ok else "(unreadable; moved aside)"))
    return 0


def _timing_rows(index: Any, pipeline: str | None, runs: int) -> list[tuple[Any, ...]]:
    where = "WHERE r.pipeline = ?" if pipeline else ""
    params: tuple[Any, ...] = (pipeline,) if pipeline else ()
    return index.execute(
        "SELECT t.run, t.task, t.label, t.duration, t.peak_memory, t.engine FROM timings t "
        f"JOIN (SELECT r.run FROM runs r {where} ORDER BY r.run DESC LIMIT {int(runs)}) "
        "recent ON recent.run = t.run WHERE t.state = 'done' AND t.duration IS NOT NULL",
        params)


def cmd_timings(args: argparse.Namespace) -> int:
    index = _index(args)
    rows = _timing_rows(index, args.pipeline, args.runs)
    if not rows:
        print("no timings yet: they are recorded for tasks that ran (cache hits take no time)")
        return 0
    per_task: dict[str, list[float]] = {}
    for _run, task, _label, duration, _mem, _engine in rows:
        per_task.setdefault(task, []).append(float(duration))
    ordered = sorted(per_task.items(), key=lambda kv: -sum(kv[1]))
    print(_table([[task, str(len(ds)), format_seconds(sum(ds) / len(ds)),
                   format_seconds(max(ds)), format_seconds(sum(ds))] for task, ds in ordered],
                 ["task", "runs", "mean", "max", "total"]))
    n_runs = len({r[0] for r in rows})
    print(f"{len(rows)} executions in {n_runs} run(s)")
    if not args.no_plot:
        go = _plotly()
        fig = go.Figure([go.Box(y=ds, name=task, boxpoints="all") for task, ds in ordered])
        fig.update_layout(title="Task durations (s), last runs", yaxis_title="seconds",
                          showlegend=False, template="plotly_white")
        print(f"chart: {_write_figure(fig, args, 'timings')}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    index = _index(args)
    rows = index.execute("SELECT task, MAX(peak_memory), AVG(peak_memory), COUNT(*) FROM "
                         "entries WHERE peak_memory IS NOT NULL GROUP BY task "
                         "ORDER BY MAX(peak_memory) DESC")
    if not rows:
        print("no memory measurements yet (they are taken for tasks that ran)")
        return 0
    print(_table([[task, format_bytes(peak), format_bytes(mean), str(n)]
                  for task, peak, mean, n in rows], ["task", "peak", "mean peak", "results"]))
    if not args.no_plot:
        go = _plotly()
        fig = go.Figure([go.Bar(x=[r[0] for r in rows], y=[r[1] / 2**20 for r in rows],
                                name="peak"),
                         go.Bar(x=[r[0] for r in rows], y=[r[2] / 2**20 for r in rows],
                                name="mean peak")])
        fig.update_layout(title="Peak memory per task (MiB)", yaxis_title="MiB",
                          barmode="group", template="plotly_white")
        print(f"chart: {_write_figure(fig, args, 'memory')}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import pstats

    folder = _cache_dir(args) / "profiles"
    files = sorted(folder.glob(f"{args.task or ''}*.pstats"))
    if not files:
        print(f"no profiles in {folder}: run with Pipeline(profiling=True) "
              "(or `%pipeline config profiling=true`)")
        return 0
    print(f"{len(files)} profiled call(s)" + (f" of {args.task}" if args.task else ""))
    stats = pstats.Stats(str(files[0]), stream=sys.stdout)
    for extra in files[1:]:
        stats.add(str(extra))
    stats.strip_dirs().sort_stats(args.sort).print_stats(args.top)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = store.index.query(order="created ASC")
    doomed: list[Any] = []
    if args.older_than is not None:
        cutoff = time.time() - args.older_than * 86400
        doomed += [r for r in rows if r.created < cutoff]
    if args.max_size is not None:
        limit = parse_memory(args.max_size, "--max-size") or 0
        gone = {r.key for r in doomed}
        kept = [r for r in rows if r.key not in gone]
        total = sum(r.size for r in kept)
        for row in kept:  # least recently made first
            if total <= limit:
                break
            doomed.append(row)
            total -= row.size
    freed = sum(r.size for r in doomed)
    quarantined = list(store.quarantine_dir.glob("*.nbi"))
    verb = "would delete" if args.dry_run else "deleted"
    if not args.dry_run:
        store.delete(r.key for r in doomed)
        for path in quarantined:  # entries that failed a check, kept aside until now
            path.unlink()
            path.with_suffix(".reason").unlink(missing_ok=True)
    print(f"{verb} {len(doomed)} result(s) ({format_bytes(freed)}) and "
          f"{len(quarantined)} quarantined entr{'y' if len(quarantined) == 1 else 'ies'}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    if not args.tasks and not args.all:
        raise CliError("name the tasks to clear, or pass --all")
    store = _store(args)
    if args.all:
        if not args.yes:
            if not sys.stdin.isatty():
                raise CliError("--all deletes every stored result: add --yes to confirm")
            if input(f"delete every result in {store.path}? [y/N] ").strip().lower() != "y":
                print("nothing deleted")
                return 0
        keys = list(store.keys())
    else:
        keys = [row.key for name in args.tasks
                for row in store.index.query("task IN (?, ?)", (name, f"cell:{name}"))]
    count = store.delete(keys)
    print(f"deleted {count} result(s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.reindex:
        print(f"index rebuilt from the entries: {store.rebuild_index()} result(s)")
    bad = store.verify_all(quarantine=True)
    total = len(list(store.keys())) + len(bad)
    for key, reason in sorted(bad.items()):
        print(f"BAD {key[:16]}: {reason} (moved to {store.quarantine_dir})")
    print(f"{total - len(bad)} of {total} result(s) verified" +
          (f"; {len(bad)} bad" if bad else ""))
    return 1 if bad else 0


# ---- the parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbindustria", description="Look into an nbindustria cache: results, timings, "
        "memory, profiles; verify and tidy it.")
    parser.add_argument("--version", action="version", version=f"nbindustria {__version__}")
    parser.add_argument("--cache-dir", help="the cache directory (default: NBINDUSTRIA_CACHE_DIR,"
                        " else the one chosen with `nbindustria init`)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="choose the cache directory (writes the config file)")
    p.add_argument("dir", nargs="?", help="the cache directory (asked for when omitted)")
    p.add_argument("--engines", help="default engines: a count, 'auto' or a profile name")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("ls", help="list stored results")
    p.add_argument("--task", help="only this task's results")
    p.add_argument("--sort", choices=["created", "size", "duration", "hits"], default="created")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", help="one result: call, arguments, code, timings")
    p.add_argument("key", help="the key, or its first characters")
    p.add_argument("--value", action="store_true", help="load the value and print it")
    p.set_defaults(func=cmd_show)

    for name, func, helptext in (("timings", cmd_timings, "task durations across runs"),
                                 ("memory", cmd_memory, "peak memory per task")):
        p = sub.add_parser(name, help=helptext + " (table and HTML chart)")
        p.add_argument("--html", help="where to write the chart (default: in the cache's "
                       "reports/ folder)")
        p.add_argument("--no-plot", action="store_true", help="the table only")
        if name == "timings":
            p.add_argument("--pipeline", help="only runs of this pipeline")
            p.add_argument("--runs", type=int, default=20, help="how many recent runs")
        p.set_defaults(func=func)

    p = sub.add_parser("profile", help="cProfile statistics of profiled tasks")
    p.add_argument("task", nargs="?", help="only this task")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--sort", default="cumulative", help="pstats sort key")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("gc", help="delete old results to free space")
    p.add_argument("--older-than", type=float, metavar="DAYS")
    p.add_argument("--max-size", metavar="SIZE", help="keep at most this much, e.g. 10GiB")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("clear", help="delete the results of some tasks, or all")
    p.add_argument("tasks", nargs="*", metavar="TASK")
    p.add_argument("--all", action="store_true")
    p.add_argument("--yes", action="store_true", help="do not ask before --all")
    p.set_defaults(func=cmd_clear)

    p = sub.add_parser("verify", help="check every entry (bad ones are moved aside)")
    p.add_argument("--reindex", action="store_true", help="rebuild the index from the entries")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, NbindustriaError) as exc:
        print(f"nbindustria {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
