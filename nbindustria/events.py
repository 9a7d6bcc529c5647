"""Event records and the bounded, indexed log that every view of a run reads.

The scheduler emits one :class:`Event` per state change of a task (and one at the start and end of
a run). Subscribers (the text log, the progress bar, the dashboard, the run history) either get a
callback per event or pull ``log.since(index)`` at their own pace, as distributed's dashboard does:
a slow view never slows the run.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
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

    __slots__ = ("cpu", "deps", "duration", "ended", "engine", "error", "index", "info", "key",
                 "kind", "label", "node", "peak_memory", "reason", "size", "started", "task",
                 "time", "traceback")

    def __init__(self, kind: str, node: str = "", task: str = "", label: str = "",
                 time: float | None = None, index: int = -1, deps: tuple[str, ...] = (),
                 key: str = "", engine: str = "", started: float | None = None,
                 ended: float | None = None, duration: float | None = None,
                 cpu: float | None = None, peak_memory: int | None = None,
                 size: int | None = None, reason: str = "", error: str = "",
                 traceback: str = "", info: Mapping[str, object] = _NO_INFO):
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


_DEFAULTS: dict[str, object] = {
    name: parameter.default
    for name, parameter in inspect.signature(Event.__init__).parameters.items()
    if name not in ("self", "kind")}


def _event_from_state(state: dict[str, Any]) -> Event:
    event = Event.__new__(Event)
    for name, value in state.items():
        setattr(event, name, value)
    return event


Subscriber = Callable[[Event], None]


class EventLog:
    """A thread-safe, bounded log of events with a running index.

    ``since(i)`` returns the events with index >= i still held; a reader that fell behind by more
    than ``maxlen`` events sees a gap (the index tells it), never a stall of the writer.
    """

    def __init__(self, maxlen: int = 200_000):
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._next = 0
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()  # replaced, never changed in place

    def __len__(self) -> int:
        return len(self._events)

    @property
    def next_index(self) -> int:
        return self._next

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every new event; returns a function that unsubscribes."""
        self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    def append(self, event: Event) -> Event:
        with self._lock:
            event.index = self._next
            self._next += 1
            self._events.append(event)
        for callback in self._subscribers:
            callback(event)
        return event

    def extend(self, events: Iterable[Event]) -> None:
        """Append many events at once (one lock for all; subscribers still see each)."""
        events = list(events)
        with self._lock:
            for index, event in enumerate(events, self._next):
                event.index = index
            self._next += len(events)
            self._events.extend(events)
        subscribers = self._subscribers
        for event in events:
            for callback in subscribers:
                callback(event)

    def since(self, index: int = 0) -> list[Event]:
        # O(new events), not O(log): a reader polling a long log must not hold the lock (which
        # the run's append takes) while it copies events it has already read.
        with self._lock:
            count = min(self._next - max(index, 0), len(self._events))
            if count <= 0:
                return []
            if count == len(self._events):
                return list(self._events)
            tail = list(itertools.islice(reversed(self._events), count))
        tail.reverse()
        return tail

    def clear(self) -> None:
        with self._lock:
            self._events.clear()


def latest_states(events: Iterable[Event]) -> dict[str, Event]:
    """The last task event per node: what each node looks like now."""
    states: dict[str, Event] = {}
    for event in events:
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
