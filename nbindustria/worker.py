"""What runs where a task runs (the kernel, or an engine): load the inputs, call, measure, stage.

A :class:`Job` is everything one call needs and is small to send: the function, the arguments
with each upstream result replaced by an :class:`Input` (where its entry is and the digest of the
header the kernel checked), and the metadata to write beside the result. :func:`execute` returns
an :class:`Outcome`: the staged entry (written to the store's ``tmp/``, unsigned) and what was
measured, or the error with the traceback as it was where the task ran. Nothing here holds the
cache's key.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import UnpicklableResultError
from .graph import is_walked_container
from .store import BadEntry, SegmentWriter, Staged, stage_value, verify_staged_input


@dataclass(frozen=True)
class Input:
    """Stands for an upstream result inside a job's arguments."""

    key: str
    path: str
    header_digest: str
    label: str
    offset: int = 0  # where its record starts, when the entry is packed in a segment


@dataclass
class Job:
    key: str
    node_id: str
    label: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    meta: dict[str, Any]
    tmp_dir: str | None  # None: the value travels back in the outcome (store not reachable)
    memcheck: bool = False
    fsync: bool = False  # engines on other hosts flush their own writes
    profile: bool = False  # run under cProfile; the stats travel back in outcome.extra
    attempt: int = 1
    has_inputs: bool = True  # False: no upstream result in the arguments (nothing to load)


@dataclass
class Outcome:
    key: str
    node_id: str
    ok: bool
    staged: Staged | None = None
    value: Any = None  # only when the job had no tmp_dir
    has_value: bool = False
    started: float = 0.0
    ended: float = 0.0
    duration: float = 0.0
    cpu: float = 0.0
    peak_memory: int | None = None
    engine: str = "kernel"
    host: str = ""
    pid: int = 0
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    bad_input: tuple[str, str] | None = None  # (key, reason): an input failed its check
    extra: dict[str, Any] = field(default_factory=dict)


Loader = Callable[["Input"], Any]


def engine_loader(item: Input) -> Any:
    return verify_staged_input(item.path, item.header_digest, offset=item.offset)


def substitute(value: Any, replace: Callable[[Any], Any]) -> Any:
    """``value`` with every Input replaced (containers rebuilt; other objects untouched)."""
    if isinstance(value, Input):
        return replace(value)
    if not is_walked_container(value):
        return value
    if isinstance(value, dict):
        return {substitute(k, replace): substitute(v, replace) for k, v in value.items()}
    items = [substitute(v, replace) for v in value]
    if isinstance(value, tuple) and type(value) is not tuple:
        return type(value)._make(items)  # type: ignore[attr-defined]
    return type(value)(items)


class _PeakSampler:
    """Peak resident memory of this process while a task runs.

    With ``memcheck`` a thread samples RSS every few milliseconds (catches short peaks);
    otherwise the peak is the larger of RSS before and after (free, and enough for the charts).
    """

    def __init__(self, memcheck: bool):
        self._memcheck = memcheck
        self.peak = 0
        self._stop: threading.Event | None = None  # only with memcheck (costs a Condition)
        self._thread: threading.Thread | None = None

    _rss = staticmethod(lambda: current_rss())

    def __enter__(self) -> _PeakSampler:
        self.peak = self._rss()
        if self._memcheck:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="nbindustria-memcheck")
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self._rss())


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_process: Any = None
_statm: dict[int, int] = {}  # pid -> open fd of /proc/self/statm (a forked child opens its own)


def current_rss() -> int:
    """Resident memory of this process in bytes (/proc on Linux, read with one ``pread`` of a
    file kept open: ~2 µs; psutil elsewhere)."""
    global _process
    pid = os.getpid()
    try:
        fd = _statm.get(pid)
        if fd is None:
            fd = _statm[pid] = os.open("/proc/self/statm", os.O_RDONLY)
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
    except OSError:
        if _process is None:
            import psutil

            _process = psutil.Process()
        return int(_process.memory_info().rss)


def total_memory() -> int | None:
    """Physical memory of this host in bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except (ImportError, OSError):
        return None


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the task's own frame down (our frames are noise to the user)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def probe_shared_dir(probe: str, token: str) -> bool:
    """True if this engine reads ``token`` back from ``probe`` and can write beside it (the
    kernel wrote ``probe``: cluster.SharedDirProbe). Uses no module globals: cluster.py ships a
    copy of it to engines that may not have nbindustria."""
    import os

    try:
        with open(probe, encoding="utf-8") as f:
            if f.read() != token:
                return False
        mine = f"{probe}.{os.getpid()}"
        with open(mine, "w", encoding="utf-8") as f:
            f.write(token)
        with open(mine, encoding="utf-8") as f:
            ok = f.read() == token
        os.remove(mine)
        return ok
    except OSError:
        return False


def execute(job: Job, loader: Loader = engine_loader, engine: str = "kernel",
            segment: SegmentWriter | None = None) -> Outcome:
    """Run one job and return its outcome; never raises for the task's own errors. A small
    result is staged as a record of ``segment`` (an engine's part file for its batch) or, with
    none, in memory (the kernel); a large one in a file of its own."""
    out = Outcome(key=job.key, node_id=job.node_id, ok=False, engine=engine,
                  host=socket.gethostname(), pid=os.getpid())

    def load(item: Input) -> Any:
        try:
            return loader(item)
        except (BadEntry, FileNotFoundError) as exc:
            raise _InputUnusable(item.key, str(exc) or "missing") from None

    try:
        args = substitute(job.args, load) if job.has_inputs else job.args
        kwargs = substitute(job.kwargs, load) if job.has_inputs else job.kwargs
    except _InputUnusable as bad:
        out.bad_input = (bad.key, bad.reason)
        out.error_type = "InputUnusable"
        out.error_message = f"input {bad.key[:12]} is unusable: {bad.reason}"
        return out

    sampler = _PeakSampler(job.memcheck)
    cpu0 = time.process_time()
    out.started = time.time()
    t0 = time.perf_counter()
    try:
        with sampler:
            if job.profile:
                value = _profiled(job, args, kwargs, out)
            else:
                value = job.func(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        out.duration = time.perf_counter() - t0
        out.ended = time.time()
        out.cpu = time.process_time() - cpu0
        out.error_type = type(exc).__name__
        out.error_message = str(exc)
        out.traceback = _user_traceback(exc)
        return out
    out.duration = time.perf_counter() - t0
    out.ended = time.time()
    out.cpu = time.process_time() - cpu0
    out.peak_memory = sampler.peak

    meta = dict(job.meta)
    meta.update(duration=out.duration, cpu=out.cpu, peak_memory=out.peak_memory,
                engine=engine, host=out.host, created=time.time())
    if job.tmp_dir is None:
        out.value, out.has_value, out.ok = value, True, True
        out.extra["meta"] = meta
        return out
    try:
        out.staged = stage_value(job.tmp_dir, job.key, value, meta, label=job.label,
                                 fsync=job.fsync, segment=segment)
    except UnpicklableResultError as exc:
        out.error_type = "UnpicklableResultError"
        out.error_message = str(exc)
        out.traceback = f"UnpicklableResultError: {exc}\n"
        return out
    except OSError as exc:  # a full disk, a vanished directory: the task failed, nothing stored
        out.error_type = type(exc).__name__
        out.error_message = f"cannot write the result: {exc}"
        out.extra["store_errno"] = exc.errno  # a full disk stops the run (the scheduler)
        out.traceback = "".join(traceback.format_exception_only(type(exc), exc))
        return out
    out.ok = True
    return out


def _profiled(job: Job, args: tuple[Any, ...], kwargs: dict[str, Any], out: Outcome) -> Any:
    import cProfile
    import marshal

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(job.func, *args, **kwargs)
    finally:
        profiler.create_stats()
        out.extra["profile"] = marshal.dumps(getattr(profiler, "stats", {}))


class _InputUnusable(Exception):
    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason


def python_env() -> str:
    """The part of the environment that is in every key: the Python major.minor."""
    return f"python-{sys.version_info.major}.{sys.version_info.minor}"
