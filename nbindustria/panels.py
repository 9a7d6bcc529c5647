"""Pure functions from run events to the data every dashboard panel draws.

Nothing here imports a widget library: the live widget (``dashboard.py`` + ``js/dashboard.js``), the
standalone HTML report and the tests all read the same plain, JSON-ready dicts and lists.

The functions take either an iterable of :class:`~nbindustria.events.Event` or a :class:`RunView`,
the incremental accumulator the live dashboard keeps so that each refresh only reads the events that
are new since the last one (a run of 10,000 tasks is ~40,000 events; re-reading them three times a
second would cost the run time). A view shows one run: a ``run-start`` event starts it afresh, so a
log holding several runs shows the last one.

Panels
------
- :func:`header`: run facts, counts by state, overall and per-task-name progress.
- :func:`graph`: nodes and edges laid out by dependency depth; the nodes of a task name with more
  than ``threshold`` nodes collapse into one group node (expandable by name).
- :func:`details`: what a click on a node shows (arguments, key, engine, times, memory, why, error).
- :func:`timeline`: one bar per executed task, one row per engine (distributed's ``rectangles``).
- :func:`memory`: peak memory per executed task, and each engine's memory over time (a line per
  engine through the peaks of the tasks it ran), with the engines' memory limit.
- :func:`cache_stats`: hits vs runs per task name and the time the hits saved.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from .events import (
    ADDED,
    CACHED,
    DONE,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUN_END,
    RUN_START,
    RUNNING,
    SKIPPED,
    TASK_STATES,
    Event,
)

__all__ = [
    "STATE_COLORS",
    "STATE_LABELS",
    "RunView",
    "cache_stats",
    "details",
    "format_bytes",
    "format_duration",
    "graph",
    "header",
    "memory",
    "run_view",
    "short_args",
    "short_label",
    "task_color",
    "timeline",
]

# What a state looks like, everywhere (graph nodes, progress bars, charts). Mid-tone colours read on
# light and dark backgrounds alike.
STATE_COLORS: dict[str, str] = {
    ADDED: "#9aa3ae",
    QUEUED: "#b39ddb",
    RUNNING: "#3b82f6",
    DONE: "#22a06b",
    CACHED: "#14a3b8",
    FAILED: "#e5484d",
    SKIPPED: "#e0a526",
}
STATE_LABELS: dict[str, str] = {
    ADDED: "waiting",
    QUEUED: "queued",
    RUNNING: "running",
    DONE: "done",
    CACHED: "cached",
    FAILED: "failed",
    SKIPPED: "skipped",
}
# The order states are listed and stacked in: finished work first, then what is still to come.
STATE_ORDER: tuple[str, ...] = (DONE, CACHED, FAILED, SKIPPED, RUNNING, QUEUED, ADDED)

GROUP_THRESHOLD = 40  # a task name with more nodes than this is drawn as one group node
MAX_NODES = 400  # more visible nodes than this: group more names, largest first
MAX_MEMBERS = 1000  # members sent along with group nodes, so that a group expands without the kernel
MAX_ROWS = 12  # a depth column with more nodes wraps into several sub-columns
GROUP_PREFIX = "group:"
# Bounds on what the charts carry, whatever the size of the run (the view keeps them up to date
# event by event, so that a refresh costs the same at 100 or 100,000 tasks).
MAX_BARS = 1500  # more executed tasks than this: the timeline shows merged segments, not bars
MAX_SEGMENTS = 2000  # at most this many timeline segments (bars closer than a gap merge)
TASK_POINTS = 400  # peak-memory points kept per task name (an even sample, and the highest)
ENGINE_POINTS = 500  # memory points kept per engine (the highest of each stretch of time)
RUNNING_PER_ROW = 8  # running bars drawn per engine row (the longest running first)
_TASK_KINDS = frozenset(TASK_STATES)


# Task colours: mid-tones that read on light and dark backgrounds. A name hashes to one of the
# first ten (Tableau 10, its red swapped for indigo: red means "failed" here); when two names of a
# run meet on one colour, the later one takes the next free colour, the last ten included.
PALETTE: tuple[str, ...] = (
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#9c755f", "#ff9da7",
    "#7b6fd0", "#bab0ac",
    "#a0cbe8", "#ffbe7d", "#8cd17d", "#d4a6c8", "#f1ce63", "#86bcb6", "#d7b5a6", "#fabfd2",
    "#79706e", "#b6992d",
)
HASHED_COLORS = 10


def _color_slot(name: str) -> int:
    # Python's hash() of a string is salted per process: a digest gives the same slot everywhere.
    digest = hashlib.blake2b(name.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % HASHED_COLORS


def task_color(name: str) -> str:
    """The colour of a task name: the same in every process and every session."""
    return PALETTE[_color_slot(name)]


def _run_color(name: str, taken: set[str]) -> str:
    """``task_color(name)``, unless another task name of the run has it already: then the next
    free colour of the palette, so that the names of one run stay apart."""
    slot = _color_slot(name)
    if len(taken) >= len(PALETTE):
        return PALETTE[slot]
    while PALETTE[slot] in taken:
        slot = (slot + 1) % len(PALETTE)
    return PALETTE[slot]


def format_duration(seconds: float | None) -> str:
    """``42 µs``, ``4.2 ms``, ``0.42 s``, ``12.3 s``, ``4 min 05 s``, ``2 h 07 min``; an em
    dash when unknown."""
    if seconds is None:
        return "—"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs" if seconds > 0 else "0 s"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(size: float | None) -> str:
    """``512 B``, ``1.5 KiB``, ``12.3 MiB``, ``2.00 GiB``; an em dash when unknown."""
    if size is None:
        return "—"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def engine_short(engine: str) -> str:
    """``"engine 3 (host:pid)"`` -> ``"engine 3"``: the timeline's row label."""
    return engine.split(" (", 1)[0] if engine else "?"


def short_args(label: str) -> str:
    """The arguments of a call label without keyword names: ``fit(df=d, alpha=0.1)`` ->
    ``d, 0.1``; what a small node shows next to its task name."""
    return short_label(_arguments(label)) if "(" in label else ""


def short_label(label: str) -> str:
    """A call label without keyword names, for a small node: ``fit(df=d, alpha=0.1)`` ->
    ``fit(d, 0.1)``."""
    return re.sub(r"(?:(?<=[(,])|^)(\s*)[A-Za-z_]\w*=(?!=)", r"\1", label)


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class EvenSample:
    """At most ``limit`` items of a stream, evenly spread: every k-th item, k doubling when the
    sample is full (O(1) per item), plus the item with the highest ``value``."""

    __slots__ = ("count", "items", "limit", "stride", "top")

    def __init__(self, limit: int) -> None:
        self.items: list[Any] = []
        self.limit = limit
        self.stride = 1
        self.count = 0
        self.top: tuple[float, Any] | None = None

    def add(self, item: Any, value: float) -> None:
        if self.count % self.stride == 0:
            self.items.append(item)
            if len(self.items) > self.limit:
                del self.items[1::2]
                self.stride *= 2
        self.count += 1
        if self.top is None or value > self.top[0]:
            self.top = (value, item)

    def add_many(self, items: list[Any], values: Sequence[float]) -> None:
        """``add`` of each item in turn, a stretch of items at a time."""
        n, start = len(items), 0
        while start < n:
            first = start + (-self.count) % self.stride  # the next index the stride takes
            room = self.limit + 1 - len(self.items)  # appends until the sample overflows
            picked = items[first:n:self.stride][:room]
            self.items.extend(picked)
            end = n
            if len(self.items) > self.limit:  # it overflowed at the last one picked
                end = first + (len(picked) - 1) * self.stride + 1
                del self.items[1::2]
                self.stride *= 2
            self.count += end - start
            start = end
        if values:
            top = max(values)
            if self.top is None or top > self.top[0]:
                self.top = (top, items[values.index(top)])

    def sample(self) -> list[Any]:
        if self.top is None or any(item is self.top[1] for item in self.items):
            return list(self.items)
        return [*self.items, self.top[1]]


class Envelope:
    """A time series of at most ``limit`` points: each kept point is the highest of a stretch of
    ``width`` consecutive samples, ``width`` doubling when full (so a peak is never lost)."""

    __slots__ = ("filled", "limit", "pending", "points", "width")

    def __init__(self, limit: int) -> None:
        self.points: list[tuple[float, float]] = []
        self.limit = limit
        self.width = 1
        self.pending: tuple[float, float] | None = None  # the highest of the stretch being filled
        self.filled = 0

    def add(self, time: float, value: float) -> None:
        if self.pending is None or value > self.pending[1]:
            self.pending = (time, value)
        self.filled += 1
        if self.filled < self.width:
            return
        self.points.append(self.pending)
        self.pending, self.filled = None, 0
        self._bound()

    def _bound(self) -> None:
        if len(self.points) > self.limit:
            pairs = zip(self.points[0::2], self.points[1::2], strict=False)
            merged = [a if a[1] >= b[1] else b for a, b in pairs]
            if len(self.points) % 2:
                merged.append(self.points[-1])
            self.points = merged
            self.width *= 2

    def add_many(self, times: list[float], values: Sequence[float]) -> None:
        """``add`` of each sample in turn, a stretch at a time (whole stretches of a long
        series in one numpy pass each time the width changes)."""
        n, start = len(values), 0
        while start < n:
            width = self.width
            whole = min((n - start) // width, self.limit + 1 - len(self.points))
            if not self.filled and whole >= 64:
                import numpy as np  # the dashboard's dependency; only a large run comes here

                block = np.asarray(values[start:start + whole * width], dtype=float)
                picked = (start + np.arange(whole) * width
                          + block.reshape(whole, width).argmax(axis=1)).tolist()
                self.points += zip([times[i] for i in picked], [values[i] for i in picked],
                                   strict=True)
                start += whole * width
                self._bound()
                continue
            end = min(n, start + self.width - self.filled)
            stretch = values[start:end]
            top = max(stretch)
            if self.pending is None or top > self.pending[1]:
                self.pending = (times[start + stretch.index(top)], top)
            self.filled += end - start
            start = end
            if self.filled == self.width:
                self.filled -= 1  # add() completes the stretch with its last sample
                self.add(*self.pending)

    def series(self) -> list[tuple[float, float]]:
        return self.points + ([self.pending] if self.pending is not None else [])


class Segments:
    """Executed tasks as merged segments per (engine, task name): what the timeline draws when
    too many tasks ran to draw a bar each. Bars closer than ``gap``, or than a 4,000th of the
    time so far (less than a pixel on any screen), merge; when there are more than ``limit``
    segments the gap doubles (at least 1/limit of the span) and they merge again, so the count
    stays bounded at O(1) amortized cost per bar."""

    __slots__ = ("count", "first", "gap", "last", "limit", "rows")

    def __init__(self, limit: int) -> None:
        self.rows: dict[tuple[str, str], list[list[float]]] = {}
        self.limit = limit
        self.gap = 0.0
        self.count = 0
        self.first = float("inf")
        self.last = float("-inf")

    def add(self, engine: str, task: str, start: float, end: float) -> None:
        if start < self.first:
            self.first = start
        if end > self.last:
            self.last = end
        row = self.rows.get((engine, task))
        if row is None:
            row = self.rows[engine, task] = []
        if row and start - row[-1][1] <= max(self.gap, (self.last - self.first) / 4000):
            row[-1][0] = min(row[-1][0], start)
            row[-1][1] = max(row[-1][1], end)
        else:
            row.append([start, end])
            self.count += 1
        span = self.last - self.first
        while self.count > self.limit and self.gap < span:
            self.gap = max(2 * self.gap, span / self.limit)
            self._merge()

    def add_many(self, engine: str, task: str, starts: list[float], ends: list[float]) -> None:
        """Many bars of one engine and task name: merged among themselves in one sorted pass
        (numpy), then as ``add`` merges a bar with the row's last segment."""
        if len(starts) < 64:
            for start, end in zip(starts, ends, strict=True):
                self.add(engine, task, start, end)
            return
        import numpy as np  # the dashboard's dependency; only a large run comes here

        begin, finish = np.asarray(starts, dtype=float), np.asarray(ends, dtype=float)
        self.first = min(self.first, float(begin.min()))
        self.last = max(self.last, float(finish.max()))
        gap = max(self.gap, (self.last - self.first) / 4000)
        order = np.argsort(begin, kind="stable")
        begin, finish = begin[order], finish[order]
        reach = np.maximum.accumulate(finish)
        breaks = np.flatnonzero(np.concatenate(([True], begin[1:] - reach[:-1] > gap)))
        merged = [[a, b] for a, b in zip(begin[breaks].tolist(),
                                          np.maximum.reduceat(finish, breaks).tolist(),
                                          strict=True)]
        row = self.rows.setdefault((engine, task), [])
        if row and merged[0][0] - row[-1][1] <= gap:
            head = merged.pop(0)
            row[-1][0] = min(row[-1][0], head[0])
            row[-1][1] = max(row[-1][1], head[1])
        row.extend(merged)
        self.count += len(merged)
        span = self.last - self.first
        while self.count > self.limit and self.gap < span:
            self.gap = max(2 * self.gap, span / self.limit)
            self._merge()

    def _merge(self) -> None:
        self.count = 0
        for key, row in self.rows.items():
            merged: list[list[float]] = []
            for start, end in sorted(row):
                if merged and start - merged[-1][1] <= self.gap:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            self.rows[key] = merged
            self.count += len(merged)


def _tally(values: list[str]) -> dict[str, int]:
    """How often each value occurs (in order of first appearance), as ``collections.Counter``
    would say; a list of one value (a large run's usual packed event) is counted in C."""
    if values and values.count(values[0]) == len(values):
        return {values[0]: len(values)}
    return collections.Counter(values)


def _merge(groups: dict[Any, list[int]], key: Any, indices: list[int]) -> None:
    """Add ``indices`` (ascending) to the group ``key`` (kept ascending; never changed in
    place: one list may start several groups)."""
    held = groups.get(key)
    groups[key] = indices if held is None else sorted(held + indices)


def _values_at(indices: list[int], *columns: list[Any]) -> list[list[Any]]:
    """The values at ``indices`` (ascending, at least one) of each column, picked out in C."""
    first, last = indices[0], indices[-1]
    if last - first + 1 == len(indices):  # a stretch: sliced
        return [column[first:last + 1] for column in columns]
    pick = operator.itemgetter(*indices)
    return [list(pick(column)) for column in columns]


def _measured(indices: list[int], peaks: list[int | None]) -> tuple[list[int], list[int]]:
    """The attempts among ``indices`` whose peak memory is known, and those peaks."""
    values = _values_at(indices, peaks)[0] if indices else []
    if None in values:
        known = list(map(operator.is_not, values, itertools.repeat(None)))
        indices, values = list(itertools.compress(indices, known)), list(
            itertools.compress(values, known))
    return indices, values


class _Later:
    """A mapping (node id -> what a panel may ask of it) whose writes wait until it is read.

    A large run's packed events set thousands of nodes at a time (their last event, last
    start, outcome, attempts), while what reads these (a node's record: its details, a running
    bar) asks for a few nodes, or none: grouped nodes are not drawn. Each write is kept as it
    came and the writes are applied in order, each in C, when the mapping is next read: the
    same mapping, and never more work than writing at once."""

    __slots__ = ("_data", "_writes")

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self._writes: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def later(self, write: Callable[..., Any], *args: Any) -> None:
        """``write(mapping, *args)`` when the mapping is next read (``args`` are kept as they
        are: not to be changed meanwhile)."""
        self._writes.append((write, args))

    def settled(self) -> Any:
        if self._writes:
            writes, self._writes = self._writes, []
            for write, args in writes:
                write(self._data, *args)
        return self._data


def _put(mapping: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    """Every key of ``keys`` to ``value``."""
    mapping.update(zip(keys, itertools.repeat(value)))


class Bars:
    """The executed attempts (DONE or FAILED) of a run, in the order they finished, as columns:
    a list per field, so that 10,000 attempts are not 10,000 objects for the garbage collector
    to count and traverse while the run goes on."""

    __slots__ = ("ended", "engine", "node", "peak", "started", "state", "task")
    FIELDS = ("node", "task", "engine", "started", "ended", "state", "peak")  # (labels: the view's)

    def __init__(self) -> None:
        self.node: list[str] = []
        self.task: list[str] = []
        self.engine: list[str] = []  # the full engine text, "kernel" if unknown
        self.started: list[float] = []
        self.ended: list[float] = []
        self.state: list[str] = []
        self.peak: list[int | None] = []  # peak memory, bytes

    def __len__(self) -> int:
        return len(self.node)

    def extend(self, **columns: list[Any]) -> None:
        for name in self.FIELDS:
            getattr(self, name).extend(columns[name])

    def rows(self, start: int = 0) -> Iterable[tuple[Any, ...]]:
        """(node, task, engine, started, ended, state, peak) per attempt from ``start``."""
        return zip(*(getattr(self, name)[start:] for name in self.FIELDS), strict=True)


@dataclass(slots=True)
class NodeRecord:
    """What the dashboard knows about one node of the run, from its events so far.

    What the final event says (times, memory, why, the error) is read from that event,
    ``outcome``, rather than copied: a run makes thousands of these, so fields are few."""

    id: str
    task: str
    label: str
    seq: int  # order in which the node entered the run
    deps: tuple[str, ...] = ()
    state: str = ADDED
    key: str = ""
    engine: str = ""
    running_at: float | None = None
    started: float | None = None  # an executed attempt's start and end (DONE/FAILED)
    ended: float | None = None
    attempts: int = 0
    outcome: Event | None = None  # the last DONE, FAILED, CACHED or SKIPPED event

    def _said(self, *kinds: str) -> Event | None:
        outcome = self.outcome
        return outcome if outcome is not None and outcome.kind in kinds else None

    @property
    def duration(self) -> float | None:
        """Wall seconds of the executed attempt, or the recorded seconds of a cache hit."""
        outcome = self._said(DONE, FAILED, CACHED)
        if outcome is None:
            return None
        if outcome.duration is not None or outcome.kind == CACHED:
            return outcome.duration
        return None if self.ended is None or self.started is None else self.ended - self.started

    @property
    def cpu(self) -> float | None:
        outcome = self._said(DONE, FAILED)
        return outcome.cpu if outcome is not None else None

    @property
    def peak_memory(self) -> int | None:
        outcome = self._said(DONE, FAILED)
        return outcome.peak_memory if outcome is not None else None

    @property
    def size(self) -> int | None:
        outcome = self._said(DONE, CACHED)
        return outcome.size if outcome is not None else None

    @property
    def reason(self) -> str:
        outcome = self._said(DONE, CACHED, SKIPPED)
        return outcome.reason if outcome is not None else ""

    @property
    def error(self) -> str:
        outcome = self._said(FAILED)
        return outcome.error if outcome is not None else ""

    @property
    def traceback(self) -> str:
        outcome = self._said(FAILED)
        return outcome.traceback if outcome is not None else ""


@dataclass(slots=True)
class TaskStats:
    """Counts per state and cache figures of one task name."""

    name: str
    rank: int  # order of first appearance: the order task names are listed and laid out in
    color: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TASK_STATES, 0))
    hits: int = 0
    runs: int = 0
    failures: int = 0
    saved: float = 0.0  # recorded seconds of the cache hits
    wall: float = 0.0  # seconds spent running (done and failed attempts)
    peak: int = 0  # the largest peak memory of its executed nodes, bytes


def positions(items: list[str], item: str) -> list[int]:
    """Where ``item`` is in ``items`` (searched in C: a batch holds few run-level events)."""
    found: list[int] = []
    with contextlib.suppress(ValueError):
        while True:
            found.append(items.index(item, found[-1] + 1 if found else 0))
    return found


def _pick(events: list[Event], kinds: list[str], kind: str) -> list[Event]:
    """The events of one kind (``kinds``: the kind of each event), picked in C."""
    return list(itertools.compress(events, map(kind.__eq__, kinds)))


class RunView:
    """Incremental state of one run, fed with events in log order (``update``).

    Every panel function reads it. It is not thread-safe: one reader (the dashboard's refresh
    thread, or a caller of the panel functions) feeds and reads it.

    The view is columnar: a dict per fact, keyed by node id, filled a batch at a time with C-level
    dict and list operations (a run of 10,000 short tasks is 40,000 events, and an object per
    node costs more than everything else the dashboard does). :meth:`record` gathers one node's
    facts into a :class:`NodeRecord`, for the nodes the panels draw.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.info: dict[str, Any] = {}
        self.end_info: dict[str, Any] = {}
        self.started: float | None = None  # RUN_START time
        self.ended: float | None = None  # RUN_END time
        self.first_time: float | None = None  # earliest event time (a log without RUN_START)
        self.last_time: float | None = None
        # Per node, in the order nodes entered the run: its task name, call label, deps, order.
        self.task_of: dict[str, str] = {}
        self.label_of: dict[str, str] = {}
        self.deps_of: dict[str, tuple[str, ...]] = {}  # only nodes with dependencies
        self.seq_of: dict[str, int] = {}
        # Per node, from its events so far: state, last task event, last RUNNING event, last
        # outcome (DONE, FAILED, CACHED or SKIPPED), starts. A packed event (events.py) stands
        # for each of its nodes here; ``field`` reads a node's value from it.
        self.state: dict[str, str] = {}
        # (Read through the properties below: their writes wait until then.)
        self._last_event = _Later({})
        self._last_start = _Later({})
        self._outcome = _Later({})
        self._attempts = _Later(collections.Counter())
        self.tasks: dict[str, TaskStats] = {}
        self.counts: dict[str, int] = dict.fromkeys(TASK_STATES, 0)
        self.bars = Bars()  # the executed attempts
        # What the charts draw, kept bounded as events arrive (see MAX_BARS and friends).
        self.engines_seen: set[str] = set()  # engines that ran or run a task of this run
        # The running nodes, in the order they (last) started: node id -> the engine its RUNNING
        # event names ("" while not placed). Header and timeline read engines from it.
        self.running: dict[str, str] = {}
        self.segments = Segments(MAX_SEGMENTS)
        self.task_points: dict[str, EvenSample] = {}
        self.engine_memory: dict[str, Envelope] = {}
        self._charted = 0  # bars already in the structures above
        self._rows: dict[str, str] = {}  # engine text -> its row label
        self.version = 0  # bumped by every event that changes what a panel shows
        self.structure_version = 0  # bumped when nodes or edges change (the layout's cache key)
        self._layout_cache: tuple[Any, ...] | None = None
        self._depth = _Later({})  # (read through depths())
        self._missing: set[str] = set()  # dependencies named before they were added
        self._depths_stale = False
        self._details_cache: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        # Per packed event held above (by id, the event kept alive with it): node -> position.
        self._positions: dict[int, tuple[Event, dict[str, int]]] = {}

    @property
    def last_event(self) -> dict[str, Event]:
        """Each node's last task event."""
        return cast("dict[str, Event]", self._last_event.settled())

    @property
    def last_start(self) -> dict[str, Event]:
        """Each node's last RUNNING event."""
        return cast("dict[str, Event]", self._last_start.settled())

    @property
    def outcome(self) -> dict[str, Event]:
        """Each node's last outcome: DONE, FAILED, CACHED or SKIPPED."""
        return cast("dict[str, Event]", self._outcome.settled())

    @property
    def attempts(self) -> collections.Counter[str]:
        """How many times each node started running."""
        return cast("collections.Counter[str]", self._attempts.settled())

    @property
    def nodes(self) -> Mapping[str, NodeRecord]:
        """Every node of the run (in the order they entered it) by id: a read-only mapping
        whose :class:`NodeRecord` values are made when read."""
        return _Nodes(self)

    def engine(self, node_id: str) -> str:
        """Where the node runs or ran (a cache hit: where its result was made), "" if unknown."""
        return self._first(node_id, "engine", (self.last_event, self.last_start, self.outcome))

    def key(self, node_id: str) -> str:
        return self._first(node_id, "key", (self.last_event, self.outcome, self.last_start))

    def field(self, event: Event, node_id: str, name: str) -> Any:
        """Field ``name`` of ``node_id``'s event: ``event`` itself, or its member for that node
        if ``event`` is packed."""
        group = event.group
        column = group.get(name) if group is not None else None
        if column is None:
            return getattr(event, name)
        held = self._positions.get(id(event))
        if held is None or held[0] is not event:
            held = self._positions[id(event)] = (event, dict(zip(group["node"], itertools.count())))  # type: ignore[index]
        return column[held[1][node_id]]

    def member(self, event: Event, node_id: str) -> Event:
        """``node_id``'s own event: ``event``, or its member for that node if packed."""
        if event.group is None:
            return event
        self.field(event, node_id, "node")  # its positions, made once
        return event.member(self._positions[id(event)][1][node_id])

    def _first(self, node_id: str, name: str, sources: tuple[Mapping[str, Event], ...]) -> str:
        """The first non-empty ``name`` field of the node's events in ``sources``, in order."""
        for events in sources:
            event = events.get(node_id)
            if event is not None:
                value = self.field(event, node_id, name)
                if value:
                    return str(value)
        return ""

    def running_at(self, node_id: str) -> float | None:
        start = self.last_start.get(node_id)
        if start is None:
            return None
        started = self.field(start, node_id, "started")
        return started if started is not None else start.time

    def span(self, event: Event) -> tuple[float, float]:
        """(start, end) of the executed attempt a DONE or FAILED event reports."""
        ended = event.ended if event.ended is not None else event.time
        began = event.started if event.started is not None else self.running_at(event.node)
        if began is None:
            began = ended if event.duration is None else ended - event.duration
        return began, ended

    def record(self, node_id: str) -> NodeRecord:
        """Everything the view knows about one node (made on demand: details, running bars)."""
        outcome = self.outcome.get(node_id)
        if outcome is not None:
            outcome = self.member(outcome, node_id)
        started = ended = None
        if outcome is not None and outcome.kind in (DONE, FAILED):
            started, ended = self.span(outcome)
        return NodeRecord(node_id, self.task_of[node_id], self.label_of[node_id],
                          self.seq_of[node_id], self.deps_of.get(node_id, ()),
                          self.state[node_id],
                          self.key(node_id), self.engine(node_id),
                          self.running_at(node_id), started, ended,
                          self.attempts.get(node_id, 0), outcome)

    # -- feeding -----------------------------------------------------------------------------

    def update(self, events: Iterable[Event], kinds: list[str] | None = None) -> bool:
        """Fold events (in log order) into the view; True if anything a panel shows changed.

        A batch is folded in bulk: what the panels show of a node depends on its last event in
        the batch, on how often it started running and on its outcomes. The events are read in
        two comprehensions (a run's events are too many to stay in the CPU's caches: each pass
        over them costs a cache miss per event), their kinds picked out with C-level filters
        over the list of kinds, and the rest works on the nodes that changed. Run-level events
        split a batch.
        """
        before = self.version
        batch = events if isinstance(events, list) else list(events)
        if kinds is None:  # (a caller that has them: the kind of each event)
            kinds = [e.kind for e in batch]
        if RUN_START in kinds or RUN_END in kinds:
            begin = 0
            for i in sorted(positions(kinds, RUN_START) + positions(kinds, RUN_END)):
                self._fold(batch[begin:i], kinds[begin:i])
                self._apply_run(batch[i])
                begin = i + 1
            self._fold(batch[begin:], kinds[begin:])
        elif batch:
            self._fold(batch, kinds)
        return self.version != before

    def _apply_run(self, event: Event) -> None:
        if event.kind == RUN_START:
            self.reset()
            self.info = dict(event.info)
            self.started = event.time
            self.first_time = self.last_time = event.time
            self.structure_version += 1
        else:
            self.ended = event.time
            self.end_info = dict(event.info)
        self.version += 1

    def _fold(self, batch: list[Event], kinds: list[str]) -> None:
        """Fold a batch of task events (no run-level ones) into the view."""
        packed = [i for i, e in enumerate(batch) if e.group is not None]
        # Tasks placed and finished within one batch (a packed RUNNING event, then a packed
        # DONE or FAILED one: the kernel's tasks between two pulls) need not pass through the
        # running state: their outcome sets it.
        outcomes = [i for i in packed if kinds[i] in (DONE, FAILED)]
        begin = 0
        for i in packed:  # folded from their columns, between the plain events around them
            if i < begin:  # (a QUEUED event folded with the ADDED one before it)
                continue
            self._fold_plain(batch[begin:i], kinds[begin:i])
            ended = queued = None
            if kinds[i] == RUNNING and outcomes and outcomes[-1] > i:
                ended = set(itertools.chain.from_iterable(
                    batch[j].nodes() for j in outcomes if j > i))
            elif kinds[i] == ADDED and i + 1 < len(batch) and kinds[i + 1] == QUEUED:
                queued = batch[i + 1]  # (a run's nodes, added then queued at once)
            begin = i + (2 if self._fold_packed(batch[i], ended, queued) else 1)
        self._fold_plain(batch[begin:], kinds[begin:])

    def _fold_plain(self, batch: list[Event], kinds: list[str]) -> None:
        """Fold a batch of plain (not packed) task events."""
        if not batch:
            return
        if not set(kinds) <= _TASK_KINDS:  # no panel shows these
            batch = [e for e in batch if e.kind in _TASK_KINDS]
            self._fold_plain(batch, [e.kind for e in batch])
            return
        last = {e.node: e for e in batch}  # each node's last event in the batch
        if "" in last:  # task events without a node: nothing to show them on
            batch = [e for e in batch if e.node]
            self._fold_plain(batch, [e.kind for e in batch])
            return
        finals = list(last.values())
        new = [e.kind for e in finals]
        adds = _pick(batch, kinds, ADDED) if ADDED in kinds else []
        # Times run forward along the log (and along each node's events).
        low = min([batch[0].time, *[e.time for e in adds]])
        high = max([e.time for e in finals])
        if self.first_time is None or low < self.first_time:
            self.first_time = low
        if self.last_time is None or high > self.last_time:
            self.last_time = high
        if adds:
            self._add_nodes(adds)
            if len(adds) == len(batch):
                return
            if ADDED in new:  # a re-added node keeps its state
                batch = [e for e in batch if e.kind != ADDED]
                self._fold_plain(batch, [e.kind for e in batch])
                return
        outcomes = list(itertools.compress(batch, map(FINAL_STATES.__contains__, kinds)))
        if [e for e in outcomes if last[e.node] is not e]:
            # A node with two outcomes in one batch (it ran again): each outcome is a bar of
            # the timeline, so this (rare) batch is folded event by event.
            for event in batch:
                self._fold_plain([event], [event.kind])
            return
        if not last.keys() <= self.task_of.keys():  # a log without the nodes' ADDED events
            self._add_nodes([e for e in finals if e.node not in self.task_of])
        runs = _pick(batch, kinds, RUNNING) if RUNNING in kinds else []
        keys = list(last)
        engines_seen = self.engines_seen
        if runs:
            run_ids = [e.node for e in runs]
            self._attempts.later(collections.Counter.update, run_ids)
            self._last_start.later(dict.update, dict(zip(run_ids, runs, strict=True)))
            engines_seen.update({e.engine for e in runs})
        # (A cache hit's engine made its result in an earlier run: not one of this run's.)
        engines_seen.update({e.engine for e in outcomes if e.kind != CACHED})
        engines_seen.discard("")
        self._last_event.later(dict.update, last)
        # Counts: each changed node leaves its old state for its new one; running nodes are
        # kept in the order they (last) started.
        self._change_states(keys, new)
        if RUNNING in new:
            self.running.update([(e.node, e.engine) for e in runs if last[e.node] is e])
        if outcomes:
            self._outcome.later(dict.update,
                                dict(zip([e.node for e in outcomes], outcomes, strict=True)))
            self._outcomes(outcomes)
        self.version += 1

    def _fold_packed(self, event: Event, ended: set[str] | None = None,
                     queued: Event | None = None) -> bool:
        """Fold a packed event (events.py) from its columns: as its members one by one.
        ``ended``: nodes whose outcome comes later in the same batch (for RUNNING); ``queued``:
        the event after an ADDED one, if QUEUED. Returns whether that was folded too (a run's
        new nodes queued at once start in the queued state: one pass over them fewer)."""
        kind, group = event.kind, event.group
        assert group is not None
        nodes = group["node"]
        if kind not in _TASK_KINDS or not nodes:
            return False
        n = len(nodes)

        def column(name: str) -> list[Any]:
            found = group.get(name)
            return found if found is not None else [getattr(event, name)] * n

        self._times(event)
        if kind == ADDED:  # (a re-added node keeps its state)
            both = queued is not None and queued.group is not None \
                and queued.group["node"] == nodes
            if not self._add_columns(nodes, column("task"), column("label"), column("deps"),
                                     queued=both) or queued is None:
                return False
            self._times(queued)
            self._last_event.later(_put, nodes, queued)
            self.version += 1
            return True
        # Every step below is one C-level pass over the columns (a packed event of a large run
        # holds thousands of nodes): no Python code runs per node.
        distinct = set(nodes)
        keys = nodes
        if len(distinct) < n:  # a node named twice (taken back from an engine, placed again)
            if kind in FINAL_STATES:
                # Two outcomes of one node: each is a bar; folded member by member.
                for member in event.members():
                    self._fold([member], [kind])
                return False
            keys = list(dict.fromkeys(nodes))
        try:  # the nodes' states before this event (read once: _change_states takes them)
            before = list(map(self.state.__getitem__, nodes))
        except KeyError:  # a log without the nodes' ADDED events
            new = [i for i, node_id in enumerate(nodes) if node_id not in self.task_of]
            tasks, labels = column("task"), column("label")
            self._add_columns([nodes[i] for i in new], [tasks[i] for i in new],
                              [labels[i] for i in new], [()] * len(new))
            before = list(map(self.state.__getitem__, nodes))
        if kind == RUNNING:
            engines = column("engine")
            self._attempts.later(collections.Counter.update, nodes)
            self.engines_seen.update(engines)
            self.engines_seen.discard("")
            self._last_start.later(_put, nodes, event)
            if ended and keys is nodes:
                going = list(map(ended.__contains__, nodes))
                if True in going:  # only what their start tells: attempts, start, engine
                    staying = list(map(operator.not_, going))
                    nodes = keys = list(itertools.compress(nodes, staying))
                    engines = list(itertools.compress(engines, staying))
                    before = list(itertools.compress(before, staying))
            self._change_states(keys, kind, before if keys is nodes else None)
            if keys is nodes:
                self.running.update(zip(nodes, engines, strict=True))
            else:  # in the order each last started, with that start's engine
                at = sorted(dict(zip(nodes, range(n), strict=True)).values())
                self.running.update([(nodes[i], engines[i]) for i in at])
        else:
            self._change_states(keys, kind, before if keys is nodes else None)
        if kind in (DONE, FAILED, SKIPPED):
            self.engines_seen.update(column("engine"))
            self.engines_seen.discard("")
        self._last_event.later(_put, keys, event)
        if kind in FINAL_STATES:
            self._outcome.later(_put, keys, event)
            if kind in (DONE, FAILED):
                starts, ends = column("started"), column("ended")
                if None in starts or None in ends:
                    spans = [self.span(self.member(event, node)) for node in nodes]
                    starts, ends = [a for a, _ in spans], [b for _, b in spans]
                self._executed(nodes, [kind] * n, starts, ends, column("duration"),
                               column("peak_memory"), column("engine"))
            elif kind == CACHED:
                self._hits(nodes, column("duration"))
        self.version += 1
        return False

    def _times(self, event: Event) -> None:
        """The view's first and last times, from a packed event. Members may carry their own
        times; they run forward along the log, as the plain events' do (the nodes' ADDED
        events aside)."""
        times = event.group.get("time") if event.group is not None else None
        if not times:
            times = [event.time]
        low, high = (min(times), max(times)) if event.kind == ADDED else (times[0], times[-1])
        if self.first_time is None or low < self.first_time:
            self.first_time = low
        if self.last_time is None or high > self.last_time:
            self.last_time = high

    def _change_states(self, keys: list[str], new: list[str] | str,
                       old: list[str] | None = None) -> None:
        """Nodes ``keys`` (each once) move to states ``new`` (one per node, or one for all):
        counts, states, running nodes. ``old``: their states now, if the caller has them."""
        state, counts, tasks = self.state, self.counts, self.tasks
        if old is None:
            old = list(map(state.__getitem__, keys))
        old_counts = _tally(old)
        if isinstance(new, str):
            new_counts = {new: len(keys)}
            state.update(zip(keys, itertools.repeat(new), strict=False))
        else:
            new_counts = _tally(new)
            state.update(zip(keys, new, strict=True))
        for kind, n in old_counts.items():
            counts[kind] -= n
        for kind, n in new_counts.items():
            counts[kind] += n
        if len(tasks) == 1:  # the usual case of a large run: one task name
            task_counts = next(iter(tasks.values())).counts
            for kind, n in old_counts.items():
                task_counts[kind] -= n
            for kind, n in new_counts.items():
                task_counts[kind] += n
        else:
            names = list(map(self.task_of.__getitem__, keys))
            for (name, kind), n in collections.Counter(zip(names, old, strict=True)).items():
                tasks[name].counts[kind] -= n
            news = itertools.repeat(new) if isinstance(new, str) else new
            for (name, kind), n in collections.Counter(zip(names, news, strict=False)).items():
                tasks[name].counts[kind] += n
        if RUNNING in old_counts:  # (the caller adds the nodes that start now)
            # Popped in C, not in a Python loop: a group commit ends thousands at once.
            ending = keys if old_counts[RUNNING] == len(keys) else itertools.compress(
                keys, map(RUNNING.__eq__, old))
            collections.deque(map(self.running.pop, ending), maxlen=0)

    def _outcomes(self, events: list[Event]) -> None:
        """Figures per task name and the timeline's bars, from new outcomes (in log order)."""
        executed = [e for e in events if e.kind in (DONE, FAILED)]
        if executed:
            given_ends = [e.ended for e in executed]
            given_starts = [e.started for e in executed]
            if None in given_starts or None in given_ends:
                spans = [self.span(e) for e in executed]
                starts, ends = [a for a, _ in spans], [b for _, b in spans]
            else:
                starts = cast("list[float]", given_starts)
                ends = cast("list[float]", given_ends)
            self._executed([e.node for e in executed], [e.kind for e in executed], starts, ends,
                           [e.duration for e in executed], [e.peak_memory for e in executed],
                           [e.engine for e in executed])
        cached = [e for e in events if e.kind == CACHED]
        if cached:
            self._hits([e.node for e in cached], [e.duration for e in cached])

    def _hits(self, ids: list[str], durations: list[float | None]) -> None:
        tasks, task_of = self.tasks, self.task_of
        for node_id, duration in zip(ids, durations, strict=True):
            stats = tasks[task_of[node_id]]
            stats.hits += 1
            stats.saved += duration or 0.0

    def _executed(self, ids: list[str], kinds: list[str], starts: list[float],
                  ends: list[float], durations: list[float | None], peaks: list[int | None],
                  engines: list[str]) -> None:
        """Executed attempts (DONE or FAILED), as columns: bars, figures per task name."""
        tasks, task_of = self.tasks, self.task_of
        walls = [w if w is not None else b - a
                 for w, a, b in zip(durations, starts, ends, strict=True)] \
            if None in durations else cast("list[float]", durations)
        if len(tasks) == 1:  # one task name (a large run's usual case)
            names = [next(iter(tasks))] * len(ids)
        else:
            names = list(map(task_of.__getitem__, ids))
        if "" in engines:
            engines = [e or self.engine(n) or "kernel"
                       for e, n in zip(engines, ids, strict=True)]
        # The charts' structures take them in when they are drawn (fold_bars).
        self.bars.extend(node=ids, task=names, engine=engines, started=starts, ended=ends,
                         state=kinds, peak=peaks)
        groups: dict[str, tuple[list[str], list[float], list[int | None]]] = {}
        if names.count(names[0]) == len(names):  # one task name (a large run's usual case)
            groups[names[0]] = (kinds, walls, peaks)
        else:
            for name, kind, wall, peak in zip(names, kinds, walls, peaks, strict=True):
                group = groups.setdefault(name, ([], [], []))
                group[0].append(kind)
                group[1].append(wall)
                group[2].append(peak)
        for name, (group_kinds, group_walls, group_peaks) in groups.items():
            stats = tasks[name]
            done = group_kinds.count(DONE)
            stats.runs += done
            stats.failures += len(group_kinds) - done
            stats.wall = sum(group_walls, stats.wall)
            measured = cast("list[int]", list(filter(functools.partial(operator.is_not, None),
                                                      group_peaks)))
            if measured and max(measured) > stats.peak:
                stats.peak = max(measured)

    def _add_nodes(self, events: list[Event]) -> None:
        """New nodes, from their first events (ADDED ones carry their dependencies)."""
        if events:
            self._add_columns([e.node for e in events], [e.task for e in events],
                              [e.label for e in events],
                              [e.deps if e.kind == ADDED else () for e in events])

    def _add_columns(self, ids: Sequence[str], names: Sequence[str], labels: Sequence[str],
                     deps: Sequence[tuple[str, ...]], queued: bool = False) -> bool:
        """New nodes: their ids, task names, labels and dependencies (nodes known already, or
        named twice, keep what they first came with). ``queued``: they are queued at once, and
        start in that state if all are new and named once; returns whether they did."""
        task_of = self.task_of
        keep: list[int] | None = None
        if task_of and not task_of.keys().isdisjoint(ids):
            keep = [i for i, node_id in enumerate(ids) if node_id not in task_of]
        if len(set(ids)) != len(ids):  # added twice: the first counts
            firsts = {node_id: i for i, node_id in reversed(list(enumerate(ids)))}
            keep = sorted(set(firsts.values()).intersection(range(len(ids)) if keep is None
                                                            else keep))
        if keep is not None:
            ids, names = [ids[i] for i in keep], [names[i] for i in keep]
            labels, deps = [labels[i] for i in keep], [deps[i] for i in keep]
        if not ids:
            return False
        initial = QUEUED if queued and keep is None else ADDED
        ids, deps = list(ids), list(deps)
        names = [name or "?" for name in names] if "" in names else list(names)
        per_name = _tally(names)  # (in order of first appearance)
        for name in per_name:
            if name not in self.tasks:
                taken = {stats.color for stats in self.tasks.values()}
                self.tasks[name] = TaskStats(name=name, rank=len(self.tasks),
                                             color=_run_color(name, taken))
        task_of.update(zip(ids, names, strict=True))
        if "" in labels:
            labels = [label or name for label, name in zip(labels, names, strict=True)]
        self.label_of.update(zip(ids, labels, strict=True))
        if any(deps):  # kept for the nodes that have some (many runs are flat)
            self.deps_of.update([(i, d) for i, d in zip(ids, deps, strict=True) if d])
        first = len(self.seq_of)
        self.seq_of.update(zip(ids, range(first, first + len(ids)), strict=True))
        self.state.update(zip(ids, itertools.repeat(initial), strict=False))
        self.counts[initial] += len(ids)
        for name, n in per_name.items():
            self.tasks[name].counts[initial] += n
        # Depths as nodes arrive (the scheduler adds them in dependency order): a dependency
        # that is not known yet, or a node that earlier ones named as one, means a recompute.
        missing = self._missing
        if any(deps):
            depth_of = self._depth.settled()
            for node_id, node_deps in zip(ids, deps, strict=True):
                depth = 0
                for dep in node_deps:
                    known = depth_of.get(dep)
                    if known is None:
                        missing.add(dep)
                    elif known >= depth:
                        depth = known + 1
                depth_of[node_id] = depth
        else:  # (written when read: a graph without dependencies never reads them)
            self._depth.later(_put, ids, 0)
        if missing and not missing.isdisjoint(ids):
            self._depths_stale = True
        self.version += 1
        self.structure_version += 1
        return initial == QUEUED

    def fold_bars(self) -> None:
        """Bring the charts' bounded structures (timeline segments, memory samples) up to date
        with the executed attempts: once per chart refresh, for the attempts new since the last,
        grouped by engine and task name (a large run has few of each)."""
        bars, first = self.bars, self._charted
        count = len(bars)
        if first == count:
            return
        self._charted = count
        engines, tasks = bars.engine[first:], bars.task[first:]
        rows = self._rows
        for engine in set(engines) - rows.keys():
            rows[engine] = engine_short(engine)
        # Bar indices per engine and task name (a large run has few of each: one Python pass
        # over the new attempts), then merged, in the order the attempts ended, per timeline
        # row and task name (segments), per task name (memory points) and per row (the
        # engine's memory line, which must run forward in time), each group's columns picked
        # out in C.
        one_task = tasks.count(tasks[0]) == len(tasks)  # a large run's usual case
        by_key: dict[Any, list[int]] = {}
        for i, key in enumerate(engines if one_task else zip(engines, tasks, strict=True), first):
            members = by_key.get(key)
            if members is None:
                members = by_key[key] = []
            members.append(i)
        by_segment: dict[tuple[str, str], list[int]] = {}
        by_task: dict[str, list[int]] = {}
        by_row: dict[str, list[int]] = {}
        for key, indices in by_key.items():
            engine, task = (key, tasks[0]) if one_task else key
            row = rows[engine]
            _merge(by_segment, (row, task), indices)
            _merge(by_row, row, indices)
            if not one_task:
                _merge(by_task, task, indices)
        if one_task:
            by_task[tasks[0]] = list(range(first, count))
        for (row, task), indices in by_segment.items():
            self.segments.add_many(row, task, *_values_at(indices, bars.started, bars.ended))
        # (A few groups: a sample or envelope made and dropped costs nothing.)
        for task, indices in by_task.items():
            indices, peaks = _measured(indices, bars.peak)
            if indices:  # bar indices
                self.task_points.setdefault(task, EvenSample(TASK_POINTS)).add_many(indices, peaks)
        for row, indices in by_row.items():
            # The peak is the engine process's resident memory while the task ran: samples of
            # that engine's memory over time.
            indices, peaks = _measured(indices, bars.peak)
            if indices:
                self.engine_memory.setdefault(row, Envelope(ENGINE_POINTS)).add_many(
                    _values_at(indices, bars.ended)[0], peaks)

    # -- derived facts -----------------------------------------------------------------------

    @property
    def t0(self) -> float | None:
        """The time the timeline counts from: the run's start, else its first event."""
        return self.started if self.started is not None else self.first_time

    def depths(self) -> dict[str, int]:
        """Dependency depth per node: 0 without (known) deps, else one more than its deepest dep."""
        if not self._depths_stale:
            return cast("dict[str, int]", self._depth.settled())
        depth: dict[str, int] = {}
        nodes = self.task_of
        for start in nodes:
            if start in depth:
                continue
            # Iterative DFS: a long chain must not hit the recursion limit.
            stack: list[tuple[str, bool]] = [(start, False)]
            on_path: set[str] = set()
            while stack:
                current, expanded = stack.pop()
                if current in depth:
                    continue
                deps = [d for d in self.deps_of.get(current, ()) if d in nodes]
                if expanded:
                    on_path.discard(current)
                    depth[current] = 1 + max((depth.get(d, -1) for d in deps), default=-1)
                    continue
                on_path.add(current)
                stack.append((current, True))
                # A dep already on the path would be a cycle; the graph module rejects those, so
                # here it is just not followed (its depth counts as unknown).
                stack.extend((d, False) for d in deps if d not in depth and d not in on_path)
        self._depth, self._depths_stale = _Later(depth), False
        self._missing = {d for d in self._missing if d not in nodes}
        return depth


class _Nodes(Mapping[str, NodeRecord]):
    """``RunView.nodes``: the view's nodes as records, made on access."""

    __slots__ = ("_view",)

    def __init__(self, view: RunView) -> None:
        self._view = view

    def __getitem__(self, node_id: str) -> NodeRecord:
        if node_id not in self._view.task_of:
            raise KeyError(node_id)
        return self._view.record(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._view.task_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._view.task_of)

    def __len__(self) -> int:
        return len(self._view.task_of)


def run_view(source: RunView | Iterable[Event]) -> RunView:
    """A :class:`RunView` of ``source`` (returned as is if it already is one)."""
    if isinstance(source, RunView):
        return source
    view = RunView()
    view.update(source)
    return view


def _finished(counts: dict[str, int]) -> int:
    return sum(counts[state] for state in FINAL_STATES)


def _ordered_counts(counts: dict[str, int]) -> dict[str, int]:
    return {state: counts.get(state, 0) for state in STATE_ORDER}


# -- header ------------------------------------------------------------------------------------


def header(source: RunView | Iterable[Event], now: float | None = None) -> dict[str, Any]:
    """Run facts, counts by state, overall progress and progress per task name.

    ``now`` is the wall-clock time the elapsed time of a running run is measured to (pass it in
    tests; by default the last event's time, so that the result depends only on the events).
    """
    view = run_view(source)
    total = len(view.task_of)
    finished = _finished(view.counts)
    if view.ended is not None:
        if view.end_info.get("interrupted"):
            status = "interrupted"
        else:
            status = "failed" if view.counts[FAILED] else "finished"
    elif view.started is not None or total:
        status = "running"
    else:
        status = "waiting"
    t0 = view.t0
    end = view.ended if view.ended is not None else (now if now is not None else view.last_time)
    elapsed = max(0.0, end - t0) if t0 is not None and end is not None else 0.0
    wall = view.end_info.get("wall_time", view.end_info.get("wall"))
    if isinstance(wall, int | float) and view.ended is not None:
        elapsed = float(wall)
    info = view.info
    n_engines = info.get("n_engines")
    # Busy engines, not running tasks: an engine may hold several (the kernel's own executor
    # holds a whole group until it commits); a task not placed yet counts as one.
    busy_engines = set(view.running.values())  # (in C: the kernel may hold thousands)
    unplaced = operator.countOf(view.running.values(), "")
    busy_engines.discard("")
    seen = len(view.engines_seen)
    if not (isinstance(n_engines, int) and n_engines > 0):
        # Engines started on demand are not known when the run starts: count those seen.
        n_engines = seen or None
    tasks = [
        {
            "name": stats.name,
            "color": stats.color,
            "total": sum(stats.counts.values()),
            "finished": _finished(stats.counts),
            "counts": _ordered_counts(stats.counts),
        }
        for stats in sorted(view.tasks.values(), key=lambda s: s.rank)
    ]
    return {
        "pipeline": str(info.get("pipeline", "") or "pipeline"),
        "run": info.get("run"),
        "engines": str(info.get("engines", "") or ""),
        "n_engines": max(n_engines, seen) if isinstance(n_engines, int) else None,
        "dryrun": bool(info.get("dryrun")),
        "busy": len(busy_engines) + unplaced,
        "status": status,
        "started": t0,
        "ended": view.ended,
        "elapsed": elapsed,
        "total": total,
        "finished": finished,
        "progress": finished / total if total else 0.0,
        "counts": _ordered_counts(view.counts),
        "tasks": tasks,
        "colors": dict(STATE_COLORS),
        "labels": dict(STATE_LABELS),
    }


# -- graph -------------------------------------------------------------------------------------


def _group_state(counts: dict[str, int]) -> str:
    """One colour for a group: alarm first, then what is under way, then how it finished."""
    if counts.get(FAILED):
        return FAILED
    for state in (RUNNING, QUEUED, ADDED, SKIPPED, DONE):
        if counts.get(state):
            return state
    return CACHED


def _choose_groups(
    view: RunView, threshold: int, max_nodes: int, expanded: frozenset[str]
) -> set[str]:
    """Task names drawn as one group node each."""
    sizes = {name: sum(stats.counts.values()) for name, stats in view.tasks.items()}
    grouped = {name for name, size in sizes.items() if size > threshold and name not in expanded}
    visible = sum(1 if name in grouped else size for name, size in sizes.items())
    # Still too many nodes to draw: collapse the largest remaining names (expanded ones last).
    for name in sorted(sizes, key=lambda n: (n in expanded, -sizes[n], view.tasks[n].rank)):
        if visible <= max_nodes:
            break
        if name in grouped or sizes[name] < 2:
            continue
        grouped.add(name)
        visible -= sizes[name] - 1
    return grouped


def layout_positions(
    items: Sequence[tuple[str, int, int, int]], max_rows: int = MAX_ROWS
) -> dict[str, tuple[int, int]]:
    """(col, row) for ``(id, depth, rank, seq)`` items: x by depth, y by order within the depth.

    Within a depth, nodes are ordered by task name (first appearance) then by the order they were
    added; a depth with more than ``max_rows`` nodes wraps into sub-columns so that a wide level
    stays on screen. ``js/dashboard.js`` lays out an expanded group with this same rule.
    """
    by_depth: dict[int, list[tuple[int, int, str]]] = {}
    for node_id, depth, rank, seq in items:
        by_depth.setdefault(depth, []).append((rank, seq, node_id))
    positions: dict[str, tuple[int, int]] = {}
    col = 0
    for depth in sorted(by_depth):
        column = sorted(by_depth[depth])
        for index, (_, _, node_id) in enumerate(column):
            positions[node_id] = (col + index // max_rows, index % max_rows)
        col += (len(column) - 1) // max_rows + 1
    return positions


class _Flat(dict[str, int]):
    """The depths of a graph without dependencies: 0 for every node, without an entry each."""

    def __missing__(self, key: str) -> int:
        return 0


_FLAT = _Flat()


def _structure(
    view: RunView, threshold: int, max_nodes: int, max_members: int, expanded: frozenset[str]
) -> dict[str, Any]:
    """The state-independent part of the graph (groups, edges, layout), cached per structure."""
    cache_key = (view.structure_version, threshold, max_nodes, max_members, expanded)
    if view._layout_cache is not None and view._layout_cache[0] == cache_key:
        return view._layout_cache[1]
    task_of, deps_of, seq_of = view.task_of, view.deps_of, view.seq_of
    depths = view.depths() if deps_of else _FLAT
    grouped = _choose_groups(view, threshold, max_nodes, expanded)
    # Node ids per group, and the visible nodes, picked out in C (a pass per grouped name: there
    # are few), not by a Python loop over every node of a large run.
    members: dict[str, list[str]] = {
        name: list(itertools.compress(task_of, map(name.__eq__, task_of.values())))
        for name in grouped}
    if grouped:
        visible = list(itertools.compress(
            task_of, map(operator.not_, map(grouped.__contains__, task_of.values()))))
    else:
        visible = list(task_of)
    # Members travel with their group (so the front end can expand it without a round trip to a
    # kernel that may be busy running the pipeline), smallest groups first, within a budget.
    expandable: set[str] = set()
    budget = max_members
    for name in sorted(grouped, key=lambda n: (len(members[n]), view.tasks[n].rank)):
        if len(members[name]) <= budget:
            expandable.add(name)
            budget -= len(members[name])

    # (A node's group is its task name when that is grouped: no map of every node to its group.)
    def resolve(node_id: str) -> str:
        """The finest id the front end knows for a node: itself, or its group when not sent."""
        name = task_of.get(node_id)
        if name is None or name not in grouped or name in expandable:
            return node_id
        return GROUP_PREFIX + name

    def shown(node_id: str) -> str:
        """The node drawn for ``node_id`` in this view: itself, or its (collapsed) group."""
        name = task_of.get(node_id)
        return node_id if name is None or name not in grouped else GROUP_PREFIX + name

    nodes = task_of
    # Deps only for the nodes the front end gets (a group too large to send has none): a run
    # of 10,000 tasks would otherwise make 10,000 lists at every change of its structure.
    sent = [*visible, *(n for name in expandable for n in members[name])]
    deps = {n: list(dict.fromkeys(resolve(d) for d in deps_of.get(n, ()) if d in nodes))
            for n in sent}
    edges: dict[tuple[str, str], None] = {}  # a dict keeps insertion order and drops duplicates
    for node_id, node_deps in deps_of.items():
        if not node_deps:
            continue
        target = shown(node_id)
        for dep in node_deps:
            if dep in nodes:
                source = shown(dep)
                if source != target:
                    edges[(source, target)] = None
    items = [(n, depths[n], view.tasks[task_of[n]].rank, seq_of[n]) for n in visible]
    group_info: dict[str, dict[str, Any]] = {}
    for name in grouped:
        group = members[name]
        # (A graph without dependencies: every node at depth 0. The nodes came in the order of
        # their seq.)
        depth = min(map(depths.__getitem__, group)) if deps_of else 0
        seq = seq_of[group[0]]
        group_info[name] = {"depth": depth, "seq": seq}
        items.append((GROUP_PREFIX + name, depth, view.tasks[name].rank, seq))
    positions = layout_positions(items)
    structure = {
        "visible": visible,
        "members": members,
        "expandable": expandable,
        "group_info": group_info,
        "deps": deps,
        "depths": depths,
        "edges": [list(edge) for edge in edges],
        "positions": positions,
    }
    view._layout_cache = (cache_key, structure)
    return structure


def graph(
    source: RunView | Iterable[Event],
    expanded: Iterable[str] = (),
    threshold: int = GROUP_THRESHOLD,
    max_nodes: int = MAX_NODES,
    max_members: int = MAX_MEMBERS,
) -> dict[str, Any]:
    """Nodes and edges of the run's graph, laid out by dependency depth.

    Each node: ``id, task, label, state, depth, rank, seq, col, row, deps, group``; ``col``/``row``
    come from :func:`layout_positions` (x = depth, y = order within the depth). The nodes of a task
    name with more than ``threshold`` nodes (unless the name is in ``expanded``) are one group node
    ``"group:<name>"`` with ``count``, ``counts`` by state and, while they fit in ``max_members``,
    its ``members`` (same fields but ``col``/``row``), so a front end can expand it by itself.
    ``deps`` name the finest node the data holds (a member, or a group whose members are not sent);
    ``edges`` are ``[source, target]`` pairs between drawn nodes, without duplicates.
    """
    view = run_view(source)
    expanded_set = frozenset(expanded)
    s = _structure(view, threshold, max_nodes, max_members, expanded_set)
    depths, deps, positions = s["depths"], s["deps"], s["positions"]

    task_of, label_of, state = view.task_of, view.label_of, view.state

    def node_data(node_id: str) -> dict[str, Any]:
        label = label_of[node_id]
        return {
            "id": node_id,
            "task": task_of[node_id],
            "label": label,
            "short": short_label(label),
            "args": short_args(label),
            "state": state[node_id],
            "depth": depths[node_id],
            "rank": view.tasks[task_of[node_id]].rank,
            "seq": view.seq_of[node_id],
            "deps": deps[node_id],
            "group": False,
        }

    nodes = []
    for node_id in s["visible"]:
        data = node_data(node_id)
        data["col"], data["row"] = positions[node_id]
        nodes.append(data)
    for name, group in s["members"].items():
        stats = view.tasks[name]
        group_id = GROUP_PREFIX + name
        col, row = positions[group_id]
        counts = _ordered_counts(stats.counts)
        nodes.append({
            "id": group_id,
            "task": name,
            "label": f"{name} \u00d7{len(group)}",
            "short": name,
            "args": "",
            "state": _group_state(counts),
            "depth": s["group_info"][name]["depth"],
            "rank": stats.rank,
            "seq": s["group_info"][name]["seq"],
            "deps": [],
            "group": True,
            "count": len(group),
            "counts": counts,
            "col": col,
            "row": row,
            "members": [node_data(n) for n in group] if name in s["expandable"] else None,
        })
    columns = 1 + max((p[0] for p in positions.values()), default=-1)
    rows = 1 + max((p[1] for p in positions.values()), default=-1)
    return {
        "nodes": nodes,
        "edges": s["edges"],
        "columns": columns,
        "rows": rows,
        "max_rows": MAX_ROWS,
        "threshold": threshold,
        "grouped": sorted(s["members"], key=lambda n: view.tasks[n].rank),
        "colors": {name: stats.color for name, stats in view.tasks.items()},
        "state_colors": dict(STATE_COLORS),
    }


# -- details -----------------------------------------------------------------------------------


def _arguments(label: str) -> str:
    """The argument part of a call label: ``fit(alpha=0.1)`` -> ``alpha=0.1``."""
    open_at = label.find("(")
    if open_at < 0 or not label.endswith(")"):
        return ""
    return label[open_at + 1 : -1]


def node_details(view: RunView, node: NodeRecord) -> dict[str, Any]:
    """What a click on ``node`` shows: ``rows`` of (field, text), ``why``, ``error``, ``traceback``."""
    rows: list[list[str]] = [["Task", node.task]]
    arguments = _arguments(node.label)
    if arguments:
        rows.append(["Arguments", arguments])
    rows.append(["State", STATE_LABELS.get(node.state, node.state)])
    if node.key:
        rows.append(["Key", node.key])
    if node.engine:
        # A cache hit's engine is where the stored result was made, in an earlier run.
        rows.append(["Made on" if node.state == CACHED else "Engine", engine_short(node.engine)])
        host = node.engine.partition(" (")[2].rstrip(")")
        if host:
            rows.append(["Host", host])
    t0 = view.t0
    if node.state == CACHED:
        rows.append(["Recorded time", format_duration(node.duration)])
    elif node.started is not None and node.ended is not None:
        if t0 is not None:
            rows.append(["Ran", f"+{node.started - t0:.2f} s → +{node.ended - t0:.2f} s"])
        rows.append(["Wall time", format_duration(node.duration)])
        if node.cpu is not None:
            rows.append(["CPU time", format_duration(node.cpu)])
    elif node.running_at is not None and node.state == RUNNING and t0 is not None:
        rows.append(["Running since", f"+{node.running_at - t0:.2f} s"])
    if node.peak_memory is not None:
        rows.append(["Peak memory", format_bytes(node.peak_memory)])
    if node.size is not None:
        rows.append(["Stored size", format_bytes(node.size)])
    if node.attempts > 1:
        rows.append(["Attempts", str(node.attempts)])
    if node.state == CACHED:
        why = "Cache hit: the stored result was reused, nothing ran."
        if node.duration is not None:
            why += f" Saved {format_duration(node.duration)}."
    elif node.state == DONE:
        why = f"Ran: {node.reason}." if node.reason else "Ran."
    elif node.state == SKIPPED:
        why = f"Skipped: {node.reason}." if node.reason else "Skipped: an upstream task failed."
    elif node.state == FAILED:
        why = f"Failed: {node.error}" if node.error else "Failed."
    else:
        why = ""
    return {
        "id": node.id,
        "label": node.label,
        "task": node.task,
        "state": node.state,
        "rows": rows,
        "why": why,
        "error": node.error,
        "traceback": node.traceback,
        "group": False,
    }


def group_details(view: RunView, name: str) -> dict[str, Any]:
    """What a click on a group node shows: its size, counts and totals."""
    stats = view.tasks[name]
    total = sum(stats.counts.values())
    rows = [["Task", name], ["Nodes", str(total)]]
    rows += [
        [STATE_LABELS[state].capitalize(), str(count)]
        for state, count in _ordered_counts(stats.counts).items()
        if count
    ]
    if stats.runs or stats.failures:
        rows.append(["Time running", format_duration(stats.wall)])
        rows.append(["Mean wall time", format_duration(stats.wall / (stats.runs + stats.failures))])
    if stats.hits:
        rows.append(["Time saved by cache", format_duration(stats.saved)])
    if stats.peak:
        rows.append(["Largest peak memory", format_bytes(stats.peak)])
    return {
        "id": GROUP_PREFIX + name,
        "label": f"{name} \u00d7{total}",
        "task": name,
        "state": _group_state(stats.counts),
        "rows": rows,
        "why": f"{total} calls of {name}, drawn as one node. Click it to show them one by one.",
        "error": "",
        "traceback": "",
        "group": True,
    }


def details(
    source: RunView | Iterable[Event], node_ids: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Details per node id (``group:<name>`` for a group), for ``node_ids`` or every node."""
    view = run_view(source)
    if node_ids is None:
        node_ids = list(view.task_of) + [GROUP_PREFIX + name for name in view.tasks]
    result: dict[str, dict[str, Any]] = {}
    for node_id in node_ids:
        if node_id.startswith(GROUP_PREFIX) and node_id[len(GROUP_PREFIX) :] in view.tasks:
            result[node_id] = group_details(view, node_id[len(GROUP_PREFIX) :])
        elif node_id in view.state:
            # A node's details change only with its state: reuse them between refreshes.
            stamp = (view.state[node_id], view.attempts.get(node_id, 0), view.t0)
            cached = view._details_cache.get(node_id)
            if cached is None or cached[0] != stamp:
                cached = (stamp, node_details(view, view.record(node_id)))
                view._details_cache[node_id] = cached
            result[node_id] = cached[1]
    return result


def graph_node_ids(graph_data: dict[str, Any]) -> list[str]:
    """Every node id a :func:`graph` result can draw (drawn nodes, and members of groups)."""
    ids: list[str] = []
    for node in graph_data["nodes"]:
        ids.append(node["id"])
        ids.extend(member["id"] for member in node.get("members") or ())
    return ids


# -- charts ------------------------------------------------------------------------------------


def timeline(source: RunView | Iterable[Event], now: float | None = None) -> dict[str, Any]:
    """One rectangle per executed task attempt, one row per engine.

    ``bars``: ``node, task, label, engine (row label), host (the full engine text), start, end,
    duration, state, color`` with times in seconds since the run started; ``count`` executed
    attempts in all. Past ``MAX_BARS`` attempts, ``bars`` is empty and ``segments`` (``task,
    engine, start, end, color``; at most ``MAX_SEGMENTS``) hold the same time, merged per engine
    and task name. ``running``: the tasks still running, ending at ``now`` (default: the last
    event's time).
    """
    view = run_view(source)
    view.fold_bars()
    t0 = view.t0 or 0.0
    count = len(view.bars)
    bars: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    if count <= MAX_BARS:
        label_of = view.label_of
        for node_id, task, engine, started, ended, state, _ in view.bars.rows():
            label = label_of[node_id]
            bars.append({
                "node": node_id,
                "task": task,
                "label": label,
                "engine": engine_short(engine),
                "host": engine,
                "start": started - t0,
                "end": ended - t0,
                "duration": ended - started,
                "state": state,
                "color": view.tasks[task].color,
            })
    else:
        for (engine, task), spans in view.segments.rows.items():
            color = view.tasks[task].color
            segments.extend({"task": task, "engine": engine, "start": a - t0, "end": b - t0,
                             "color": color} for a, b in spans)
    end = now if now is not None else (view.last_time or t0)
    running: list[dict[str, Any]] = []
    per_row: dict[str, int] = {}
    rows = view._rows
    # A bar needs its row: the engine, once the scheduler knows where the task runs. An engine
    # that took many tasks at once (the kernel's own executor, before a group commit) shows
    # its first few: the rest would only stack on the same row. Picked per engine in C (the
    # kernel may hold thousands), then in the order they started.
    engines_running = view.running.values()
    placed = [engine for engine in dict.fromkeys(engines_running) if engine]
    picked: list[str] = []
    for engine in placed:
        picked += itertools.islice(itertools.compress(
            view.running, map(engine.__eq__, engines_running)), RUNNING_PER_ROW)
    if len(placed) > 1:  # several engines: in the order they started
        order = {node_id: i for i, node_id in enumerate(view.running)}
        picked.sort(key=order.__getitem__)
    for node_id in picked:
        engine = view.running[node_id]
        row = rows.get(engine)
        if row is None:
            row = rows[engine] = engine_short(engine)
        shown = per_row.get(row, 0)
        if shown >= RUNNING_PER_ROW:
            continue
        running_at = view.running_at(node_id)
        if running_at is not None:
            per_row[row] = shown + 1
            task = view.task_of[node_id]
            running.append({
                "node": node_id,
                "task": task,
                "label": view.label_of[node_id],
                "engine": row,
                "host": engine,
                "start": running_at - t0,
                "end": max(end, running_at) - t0,
                "duration": max(end, running_at) - running_at,
                "state": RUNNING,
                "color": view.tasks[task].color,
            })
    engines = {engine for engine, _ in view.segments.rows} | {b["engine"] for b in running}
    return {"t0": t0, "engines": sorted(engines, key=_natural_key), "count": count,
            "bars": bars, "segments": segments, "running": running}


def memory(source: RunView | Iterable[Event]) -> dict[str, Any]:
    """Peak memory per executed task, and each engine's memory over time.

    ``points``: ``node, task, label, engine, end, peak_memory, color`` (``end`` in seconds since
    the run started), at most ``TASK_POINTS`` per task name (an even sample that keeps the
    highest); ``count``: the tasks with a known peak. ``engines``: per engine (row label, in
    natural order) ``{"engine", "t", "memory"}``, the peak resident memory of the engine
    process at the end of each task it ran (at most ``ENGINE_POINTS``, each the highest of its
    stretch of time). ``limit``: the engines' memory limit in bytes, if known.
    """
    view = run_view(source)
    view.fold_bars()
    t0 = view.t0 or 0.0
    points = []
    for name, sample in view.task_points.items():
        color = view.tasks[name].color
        bars = view.bars
        for i in sample.sample():
            node_id, task, engine = bars.node[i], bars.task[i], bars.engine[i]
            label = view.label_of[node_id]
            ended, peak = bars.ended[i], bars.peak[i]
            points.append({
                "node": node_id,
                "task": task,
                "label": label,
                "engine": engine_short(engine),
                "end": ended - t0,
                "peak_memory": peak,
                "color": color,
            })
    engines = []
    for engine in sorted(view.engine_memory, key=_natural_key):
        series = view.engine_memory[engine].series()
        engines.append({"engine": engine, "t": [t - t0 for t, _ in series],
                        "memory": [m for _, m in series]})
    limit = view.info.get("memory_limit")
    return {"points": points, "count": sum(s.count for s in view.task_points.values()),
            "engines": engines, "limit": limit if isinstance(limit, int | float) else None}


def cache_stats(source: RunView | Iterable[Event]) -> dict[str, Any]:
    """Hits vs runs per task name, and the time the hits saved.

    ``tasks``: ``name, color, hits, runs, failed, saved`` (``saved``: the sum of the recorded
    durations of the hits, in seconds), in order of first appearance; and the ``total`` of each.
    """
    view = run_view(source)
    tasks: list[dict[str, Any]] = [
        {
            "name": s.name,
            "color": s.color,
            "hits": s.hits,
            "runs": s.runs,
            "failed": s.failures,
            "saved": s.saved,
        }
        for s in sorted(view.tasks.values(), key=lambda s: s.rank)
    ]
    total = {
        "hits": sum(t["hits"] for t in tasks),
        "runs": sum(t["runs"] for t in tasks),
        "failed": sum(t["failed"] for t in tasks),
        "saved": sum(t["saved"] for t in tasks),
    }
    return {"tasks": tasks, "total": total}
