"""Event records and the bounded, indexed log that every view of a run reads.

The scheduler emits one :class:`Event` per state change of a task (and one at the start and end of
a run). Subscribers (the text log, the progress bar, the dashboard, the run history) either get a
callback per event or pull ``log.since(index)`` at their own pace, as distributed's dashboard does:
a slow view never slows the run.

Packed events. The same change of many nodes in a row (a level's calls queued, a group commit's
results done, tasks placed on engines) may be logged as one *packed* event: an :class:`Event`
whose ``group`` holds, per field, a list with one value per node (``group["node"]`` always);
fields without a list are the same for every node (the event's own). A run of 10,000 tiny tasks
is then a few dozen log entries instead of 30,000 objects to make, lock, and fold. Packing
changes nothing a view shows: ``event.members()`` gives the per-node events, ``log.since()``
and plain subscribers get those; readers that fold columns (the dashboard) ask for the packed
entries (``log.since_packed()``, ``subscribe(..., packed=True)``). A writer adds members with
``log.pack()`` (a row of values each); the open group is logged as one entry (one index) when
anything else is written, when a reader pulls, or at ``log.seal()``, so the log's order is the
order of the writer's calls. A column may be a :class:`LazyColumn`, whose values are made when
a reader first reads them (the calls' labels; what the index recorded of cache hits): a run
nobody watches does not make them.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

# Every kind an event can have, in the order a task usually goes through them.
RUN_START = "run-start"
ADDED = "added"  # a node entered the run's graph (carries deps)
CACHED = "cached"  # resolved from the store: nothing runs
QUEUED = "queued"  # ready: every input is known, waiting for an engine
RUNNING = "running"
DONE = "done"  # ran, and its result is committed to the store
FAILED = "failed"
SKIPPED = "skipped"  # an upstream task failed
RUN_END = "run-end"

TASK_STATES = (ADDED, CACHED, QUEUED, RUNNING, DONE, FAILED, SKIPPED)
FINAL_STATES = frozenset({CACHED, DONE, FAILED, SKIPPED})

_NO_INFO: Mapping[str, object] = MappingProxyType({})
_now = time.time


class Event:
    """One state change. Fields that do not apply to a kind stay at their defaults.

    A plain class with slots and a written-out ``__init__`` rather than a dataclass: a run of
    10,000 cached calls makes 20,000 of these, and the dataclass's default factories (a fresh
    ``info`` dict per event) made each cost about twice as much. ``info`` defaults to a shared
    empty mapping: readers only read it.
    """

    __slots__ = ("cpu", "deps", "duration", "ended", "engine", "error", "group", "index", "info",
                 "key", "kind", "label", "node", "peak_memory", "reason", "size", "started",
                 "task", "time", "traceback")

    def __init__(self, kind: str, node: str = "", task: str = "", label: str = "",
                 time: float | None = None, index: int = -1, deps: tuple[str, ...] = (),
                 key: str = "", engine: str = "", started: float | None = None,
                 ended: float | None = None, duration: float | None = None,
                 cpu: float | None = None, peak_memory: int | None = None,
                 size: int | None = None, reason: str = "", error: str = "",
                 traceback: str = "", info: Mapping[str, object] = _NO_INFO,
                 group: dict[str, Any] | None = None):
        self.kind = kind
        self.node = node  # node id (hex), stable for the same call
        self.task = task  # the task's name, e.g. "fit"
        self.label = label  # the call, e.g. "fit(alpha=0.1)"
        self.time = _now() if time is None else time
        self.index = index  # position in the log, set by EventLog.append
        self.deps = deps  # ADDED: node ids this node depends on
        self.key = key  # the cache key (hex) once known
        self.engine = engine  # where it ran: "kernel" or "engine 3 (host:pid)"
        self.started = started  # DONE/FAILED: wall-clock start and end on the engine
        self.ended = ended
        self.duration = duration  # DONE: wall seconds; CACHED: recorded seconds of the entry
        self.cpu = cpu  # DONE: CPU seconds
        self.peak_memory = peak_memory  # DONE: bytes
        self.size = size  # DONE/CACHED: bytes on disk
        self.reason = reason  # why it ran (DONE) or was skipped (SKIPPED)
        self.error = error  # FAILED: "ExcType: message"
        self.traceback = traceback  # FAILED: the traceback text where it ran
        self.info = info  # RUN_START/RUN_END: run-level facts
        # A packed event: field name -> one value per node, in order (module docstring): a
        # list, or a LazyColumn (a sequence whose values are made when first read).
        self.group = group

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Event)
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable (index), like the dataclass was

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__
                          if name != "kind" and getattr(self, name) != _DEFAULTS[name])
        return f"Event({self.kind!r}, {shown})"

    def __reduce__(self) -> tuple[Any, ...]:
        state = dict(zip(self.__slots__, self._fields(), strict=True))
        state["info"] = dict(self.info)  # a mapping proxy does not pickle: a dict does
        return _event_from_state, (state,)

    def nodes(self) -> list[str]:
        """The node ids this event is about: its members' ids, else its own node (if any)."""
        if self.group is not None:
            return self.group["node"]
        return [self.node] if self.node else []

    def members(self) -> list[Event]:
        """The per-node events a packed event stands for (in order); ``[self]`` otherwise.
        Members share the packed event's kind, time and index."""
        if self.group is None:
            return [self]
        return [self.member(i) for i in range(len(self.group["node"]))]

    def member(self, i: int) -> Event:
        """The ``i``-th member of a packed event, made when asked for."""
        group = self.group
        assert group is not None
        values = {name: getattr(self, name) for name in _SHARED if name not in group}
        values.update((name, column[i]) for name, column in group.items())
        return Event(**values)


_DEFAULTS: dict[str, object] = {
    name: parameter.default
    for name, parameter in inspect.signature(Event.__init__).parameters.items()
    if name not in ("self", "kind")}


def _event_from_state(state: dict[str, Any]) -> Event:
    event = Event.__new__(Event)
    for name, value in state.items():
        setattr(event, name, value)
    return event


_SHARED = tuple(name for name in Event.__slots__ if name != "group")


class LazyColumn(Sequence[Any]):
    """A column of a packed event whose values are made when a view first reads them:
    ``func(item)`` for each item. For values that cost to make and that a run nobody watches
    never reads (the calls' labels: a fully cached run of 10,000 calls with no dashboard and
    no line per task would otherwise format 10,000 labels for nobody). It reads as, compares
    equal to, and pickles as the list of its values."""

    __slots__ = ("_func", "_items", "_values")

    def __init__(self, func: Callable[[Any], Any], items: Sequence[Any]):
        self._func = func
        self._items = items
        self._values: list[Any] | None = None

    def _made(self) -> list[Any]:
        values = self._values
        if values is None:  # (two readers at once make the same list; either one is kept)
            values = self._values = list(map(self._func, self._items))
        return values

    def __getitem__(self, i: Any) -> Any:
        return self._made()[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._made())

    # The list's own (in C), not Sequence's mixins (a Python loop over the values).
    def __contains__(self, value: object) -> bool:
        return value in self._made()

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._made())

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        return self._made().index(value, start, len(self) if stop is None else stop)

    def count(self, value: Any) -> int:
        return self._made().count(value)

    def __eq__(self, other: object) -> bool:
        return self._made() == (other._made() if isinstance(other, LazyColumn) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._made())

    def __reduce__(self) -> tuple[Any, ...]:
        return list, (self._made(),)


Subscriber = Callable[[Event], None]


def unpacked(events: Iterable[Event]) -> Iterator[Event]:
    """Every per-node event of ``events``: packed events are replaced by their members."""
    for event in events:
        if event.group is None:
            yield event
        else:
            yield from event.members()


class EventLog:
    """A thread-safe, bounded log of events with a running index.

    ``since(i)`` returns the events with index >= i still held; a reader that fell behind by more
    than ``maxlen`` entries sees a gap (the index tells it), never a stall of the writer. A packed
    event is one entry (one index).
    """

    def __init__(self, maxlen: int = 200_000):
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._next = 0
        self._lock = threading.Lock()
        # (callback, packed), replaced, never changed in place
        self._subscribers: tuple[tuple[Subscriber, bool], ...] = ()
        self._rows: list[tuple[Any, ...]] | None = None  # the packed event being filled
        self._open_shape: tuple[str, tuple[str, ...]] = ("", ())  # its kind and fields
        self._undelivered: list[Event] = []  # logged, not yet given to the subscribers

    def __len__(self) -> int:
        return len(self._events)

    @property
    def next_index(self) -> int:
        return self._next

    def subscribe(self, callback: Subscriber, packed: bool = False) -> Callable[[], None]:
        """Call ``callback(event)`` for every new event (``packed``: packed events as they are,
        else each of their members); returns a function that unsubscribes. Callbacks run in the
        writer's thread, in log order."""
        entry = (callback, packed)
        self._subscribers = (*self._subscribers, entry)

        def unsubscribe() -> None:
            self._subscribers = tuple(s for s in self._subscribers if s is not entry)

        return unsubscribe

    def append(self, event: Event) -> Event:
        with self._lock:
            self._seal()
            self._log(event)
        self._deliver()
        return event

    def extend(self, events: Iterable[Event]) -> None:
        """Append many events at once (one lock for all; subscribers still see each)."""
        events = list(events)
        with self._lock:
            self._seal()
            for event in events:
                self._log(event)
        self._deliver()

    def pack(self, kind: str, fields: tuple[str, ...], row: tuple[Any, ...]) -> None:
        """Log one node's ``kind`` event as a member of a packed event: ``row`` holds its values
        of ``fields`` (a constant tuple of field names, ``"node"`` among them; ``"time"`` too,
        for members that keep their own time). It joins the open packed event if that has this
        kind and these fields, else starts a new one, which is logged at the next write, pull
        or ``seal()``. One append under the lock: the columns are made when it is logged."""
        with self._lock:
            if self._rows is None or kind != self._open_shape[0] or fields != self._open_shape[1]:
                self._seal()
                self._open_shape = (kind, fields)
                self._rows = []
            self._rows.append(row)
        if self._undelivered:  # a reader logged the open group meanwhile
            self._deliver()

    def seal(self) -> None:
        """Log the packed event being filled now (a writer that wants it seen)."""
        with self._lock:
            self._seal()
        self._deliver()

    def _seal(self) -> None:  # with the lock held
        rows = self._rows
        if rows:
            kind, fields = self._open_shape
            columns = dict(zip(fields, map(list, zip(*rows, strict=True)), strict=True))
            self._log(Event(kind, group=columns))
        self._rows = None

    def _log(self, event: Event) -> None:  # with the lock held
        event.index = self._next
        self._next += 1
        self._events.append(event)
        if self._subscribers:
            self._undelivered.append(event)

    def _deliver(self) -> None:
        """Give the logged events to the subscribers (in the writer's thread, in order)."""
        if not self._undelivered:
            return
        with self._lock:
            events, self._undelivered = self._undelivered, []
        subscribers = self._subscribers
        for event in events:
            members = None
            for callback, packed in subscribers:
                if packed or event.group is None:
                    callback(event)
                else:
                    if members is None:
                        members = event.members()
                    for member in members:
                        callback(member)

    def since_packed(self, index: int = 0) -> list[Event]:
        """The entries with index >= ``index``, packed events as they are (one entry each)."""
        # O(new events), not O(log): a reader polling a long log must not hold the lock (which
        # the run's append takes) while it copies events it has already read.
        with self._lock:
            self._seal()  # what the writer packed so far is seen now
            count = min(self._next - max(index, 0), len(self._events))
            if count <= 0:
                return []
            if count == len(self._events):
                return list(self._events)
            tail = list(itertools.islice(reversed(self._events), count))
        tail.reverse()
        return tail

    def since(self, index: int = 0) -> list[Event]:
        """The events with index >= ``index``, one per node and change (packed events are
        given as their members, which share its index)."""
        return list(unpacked(self.since_packed(index)))

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
            self._rows = None


def latest_states(events: Iterable[Event]) -> dict[str, Event]:
    """The last task event per node: what each node looks like now."""
    states: dict[str, Event] = {}
    for event in unpacked(events):
        if event.node and event.kind in TASK_STATES:
            previous = states.get(event.node)
            if event.kind == ADDED and previous is not None:
                continue  # a node re-added in the same log keeps its state
            states[event.node] = event
    return states


def count_states(events: Iterable[Event]) -> dict[str, int]:
    """Counts of nodes by their current state ('added' counts as waiting)."""
    counts = dict.fromkeys(TASK_STATES, 0)
    for event in latest_states(events).values():
        counts[event.kind] += 1
    return counts
