"""``@task``, :class:`Task` and :class:`Handle`: recording calls. Nothing runs here.

Calling a task returns a :class:`Handle`, a promise of a result. The same task called with the same
arguments gives the same handle (one node of the graph). Handles passed as arguments, also inside
lists, tuples, dicts and sets, become the graph's edges.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from .errors import NbindustriaError

P = ParamSpec("P")
R = TypeVar("R")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}


def parse_memory(value: int | str | None, what: str = "memory") -> int | None:
    """Bytes from ``4GiB``, ``500MB``, ``1.5 GB`` or an int; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise NbindustriaError(f"'{what}' must be bytes or a size like '4GiB' (got {value!r})")
    if isinstance(value, int):
        if value < 0:
            raise NbindustriaError(f"'{what}' must not be negative (got {value!r})")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise NbindustriaError(f"'{what}' must be bytes or a size like '4GiB' (got {value!r})")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class TaskOptions:
    """Options of a task. Only ``version`` changes keys: the rest say how and where to run."""

    name: str
    rerun: bool = False
    version: str | None = None
    cpus: float = 1
    memory: int | None = None
    gpus: float = 0
    resources: Mapping[str, float] = field(default_factory=dict)
    retries: int = 0

    def __post_init__(self) -> None:
        for attr in ("cpus", "gpus"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise NbindustriaError(
                    f"task {self.name!r}: '{attr}' must be a non-negative number (got {value!r})")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise NbindustriaError(
                f"task {self.name!r}: 'retries' must be a non-negative int (got {self.retries!r})")
        if not isinstance(self.resources, Mapping) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                for k, v in self.resources.items()):
            raise NbindustriaError(
                f"task {self.name!r}: 'resources' must map names to non-negative amounts "
                f"(got {self.resources!r})")
        if self.version is not None and not isinstance(self.version, str):
            raise NbindustriaError(
                f"task {self.name!r}: 'version' must be a string (got {self.version!r})")


class Recorder(Protocol):
    """What a task records its calls into (a Pipeline)."""

    def record(self, task: Task[Any, Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Handle[Any]: ...

    def result_of(self, handle: Handle[Any]) -> Any: ...


# The pipeline a bare @task records into: the innermost active one (a %%pipeline run cell, a
# `with pipe:` block), else the default pipeline, made on first use by the factory that
# pipeline.py installs (task.py does not import it: data flows one way).
_active: list[Recorder] = []
_default_factory: Callable[[], Recorder] | None = None


def active_pipeline() -> Recorder:
    if _active:
        return _active[-1]
    if _default_factory is None:
        raise NbindustriaError("no pipeline is available: import nbindustria first")
    return _default_factory()


def push_pipeline(pipe: Recorder) -> None:
    _active.append(pipe)


def pop_pipeline(pipe: Recorder) -> None:
    if _active and _active[-1] is pipe:
        _active.pop()
    elif pipe in _active:
        _active.remove(pipe)


class Task(Generic[P, R]):
    """A function whose calls are recorded as graph nodes and whose results are cached."""

    def __init__(self, func: Callable[P, R], options: TaskOptions,
                 pipeline: Recorder | None = None):
        if not callable(func):
            raise NbindustriaError(f"@task must decorate a function (got {func!r})")
        self.func = func
        self.options = options
        self.pipeline = pipeline
        functools.update_wrapper(self, func)  # name, docstring, signature for help() and IDEs
        self.name = options.name  # (an attribute, not a property: read several times per call)
        self.identity = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
        self._signature: Any = None

    @property
    def __nbindustria_function__(self) -> Callable[P, R]:
        # Hashing sees the function, not this wrapper (duck-typed: hashing does not import us).
        return self.func

    @property
    def signature(self) -> Any:
        if self._signature is None:
            import inspect

            self._signature = inspect.signature(self.func)
        return self._signature

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Handle[R]:
        pipe = self.pipeline if self.pipeline is not None else active_pipeline()
        return pipe.record(self, args, kwargs)

    def call_now(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the plain function now, uncached (for debugging)."""
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class Handle(Generic[R]):
    """The promise of one task call's result: a node of the graph.

    ``result()`` returns the value, loading it from the store (and running what it needs first
    if the pipeline has not run it yet). The scheduler fills ``key``, ``state`` and ``digest``.
    """

    __slots__ = ("__weakref__", "_label", "_value", "_value_key", "args", "deps", "digest",
                 "encoding", "error", "key", "kwargs", "node_id", "pipeline", "reason", "state",
                 "task")

    def __init__(self, task: Task[Any, R], args: tuple[Any, ...], kwargs: dict[str, Any],
                 node_id: str, pipeline: Recorder):
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.node_id = node_id
        self.pipeline = pipeline
        self.deps: Sequence[Handle[Any]] = ()  # set by the graph of a run
        self.encoding: Any = None  # argument encoding cached at call time, if immutable
        self.key: str | None = None
        self.digest: str | None = None  # the result's digest once resolved
        self.state = "added"
        self.reason = ""
        self.error: Any = None
        self._label: str | None = None
        self._value: Any = _UNSET
        self._value_key: str | None = None  # the key the kept value was loaded from

    @property
    def label(self) -> str:
        """The call as ndustria prints it: ``fit(df, alpha=0.1)``."""
        if self._label is None:
            # Stands for this call inside its own arguments while they are shown (a list that
            # was passed to this call and then got its handle: the cycle the graph reports).
            self._label = f"{self.task.name}(...)"
            self._label = call_label(self.task.name, self.args, self.kwargs)
        return self._label

    def result(self) -> R:
        """The value: loaded from the store once, then kept while the call's key stays."""
        if not self._kept:
            # A value is only ever the one of the current key: a later run may have resolved
            # this call to another entry (an edit, or an edit reverted: a cache hit).
            self._value = _UNSET
            self._keep(self.pipeline.result_of(self))
        return self._value

    @property
    def done(self) -> bool:
        return self.state in ("done", "cached")

    def _forget_value(self) -> None:
        self._value = _UNSET

    @property
    def _kept(self) -> bool:
        """Whether ``result()`` would return a value held here, without loading it."""
        return self._value is not _UNSET and self._value_key == self.key and self.done

    def _keep(self, value: Any) -> None:
        """Hold a value loaded for the current key (by a bulk load: ``Pipeline.results``)."""
        self._value, self._value_key = value, self.key

    def __repr__(self) -> str:
        return f"<Handle {self.label} [{self.state}]>"


class ResultRef:
    """A value that came out of a task, as it was when it was handed out: the provenance of an
    argument. It stands in the key for the value (no rehash) and never changes: if the task
    runs again later, this still names the result the value came from."""

    __slots__ = ("digest", "key", "label", "node_id", "state")

    def __init__(self, handle: Handle[Any]):
        self.node_id = handle.node_id
        self.digest = handle.digest
        self.key = handle.key
        self.label = handle.label
        self.state = "done"

    def __repr__(self) -> str:
        return f"<result of {self.label}>"


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def short_repr(value: Any, limit: int = 40) -> str:
    """A short form of an argument for labels: handles by their label, containers of handles
    by their first items."""
    if isinstance(value, Handle):
        return value.label
    if isinstance(value, (list, tuple, dict)) and value and _holds_handles(value):
        items = list(value.items()) if isinstance(value, dict) else list(value)
        shown = [f"{k!r}: {short_repr(v, limit)}" if isinstance(value, dict) else
                 short_repr(v, limit) for v in items[:3] for k, v in ([v] if isinstance(
                     value, dict) else [(None, v)])]
        inner = ", ".join(shown) + (", ..." if len(items) > 3 else "")
        open_, close = "{}" if isinstance(value, dict) else "[]" if isinstance(value, list) \
            else "()"
        return f"{open_}{inner}{close}"
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and not isinstance(value, (int, float, str)):
        return f"<{type(value).__name__} {shape}>"  # arrays, frames: never their many-line repr
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not break a label
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _holds_handles(value: Any, _seen: set[int] | None = None) -> bool:
    seen = _seen if _seen is not None else set()
    if id(value) in seen:  # a container that holds itself
        return False
    seen.add(id(value))
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, Handle) or (isinstance(v, (list, tuple, dict)) and
                                         _holds_handles(v, seen)) for v in items)


# Scalars whose repr is their label as it is (when short): the common call needs no more.
_PLAIN_REPR = frozenset({int, float, bool, type(None)})


def call_label(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    if not kwargs:  # the common call (numbers by position): one plain loop, ~3x cheaper
        parts = []
        for arg in args:
            if type(arg) not in _PLAIN_REPR:
                break
            text = repr(arg)
            if len(text) > 40:
                break
            parts.append(text)
        else:
            return f"{name}({', '.join(parts)})"
    parts = [short_repr(a) for a in args]
    parts += [f"{k}={short_repr(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def _make_options(func: Callable[..., Any], name: str | None, **options: Any) -> TaskOptions:
    return TaskOptions(name=name or str(getattr(func, "__name__", "task")),
                       memory=parse_memory(options.pop("memory", None)),
                       resources=dict(options.pop("resources", None) or {}), **options)


@overload
def task(func: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(*, name: str | None = None, rerun: bool = False, version: str | None = None,
         cpus: float = 1, memory: int | str | None = None, gpus: float = 0,
         resources: Mapping[str, float] | None = None, retries: int = 0,
         ) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(func: Callable[P, R] | None = None, /, *, name: str | None = None, rerun: bool = False,
         version: str | None = None, cpus: float = 1, memory: int | str | None = None,
         gpus: float = 0, resources: Mapping[str, float] | None = None, retries: int = 0,
         ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Make a function a cached task, bare (``@task``) or with options (``@task(cpus=2)``).

    Parameters
    ----------
    name : str, optional
        The name shown in logs and the dashboard (default: the function's name).
    rerun : bool
        Run this task every time, even when a cached result exists.
    version : str, optional
        Declare the code's version yourself: the key then uses it instead of the code's digest
        (refactor freely; bump it when results change).
    cpus, memory, gpus, resources
        What one call needs; the scheduler places it on an engine that has it free.
        ``memory`` takes bytes or a size such as ``"4GiB"``.
    retries : int
        How many times to run a call again after it raised.
    """
    return _decorate(func, None, name=name, rerun=rerun, version=version, cpus=cpus,
                     memory=memory, gpus=gpus, resources=resources, retries=retries)


def _decorate(func: Callable[P, R] | None, pipeline: Recorder | None, *, name: str | None,
              **options: Any) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    def wrap(f: Callable[P, R]) -> Task[P, R]:
        if isinstance(f, Task):
            f = f.func
        return Task(f, _make_options(f, name, **options), pipeline)

    if func is not None:
        return wrap(func)
    return wrap

