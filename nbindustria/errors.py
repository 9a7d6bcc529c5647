"""One exception hierarchy for nbindustria, rooted on builtin bases.

Every error a user can see says what was expected and what came, and names the task (and the
argument path) it is about. Errors raised on engines carry the engine's traceback text and show it
in notebooks the way IPython shows a local one (``_render_traceback_``).
"""

from __future__ import annotations

from collections.abc import Sequence


class NbindustriaError(Exception):
    """Base class of every error raised by nbindustria."""


class NbindustriaWarning(UserWarning):
    """Base class of every warning issued by nbindustria."""


class CorruptEntryWarning(NbindustriaWarning):
    """A cache entry failed its length, digest or signature check: it is treated as a miss."""


class HashingError(NbindustriaError, TypeError):
    """A value (an argument, a global a task reads) cannot be hashed deterministically."""


class UnpicklableResultError(NbindustriaError, TypeError):
    """A task returned a value that cannot be stored."""


class CycleError(NbindustriaError, ValueError):
    """The task graph has a cycle; ``cycle`` lists the labels in order, first repeated last."""

    def __init__(self, cycle: Sequence[str]):
        self.cycle = list(cycle)
        super().__init__("the task graph has a cycle: " + " -> ".join(self.cycle))


class StoreError(NbindustriaError, OSError):
    """The cache directory or its key cannot be used as it is."""


class UnsafeCacheDirError(StoreError, PermissionError):
    """The cache directory is a symlink, owned by another user, or writable by others."""


class MissingCacheKeyError(StoreError):
    """A non-empty cache directory whose signing key is missing: never silently re-keyed."""


class StoreFullError(StoreError):
    """Results cannot be stored: the disk holding the cache directory is full (or over quota).
    The run stops; what was stored before is kept, and the next run resumes from it."""


class EngineError(NbindustriaError, RuntimeError):
    """Engines cannot be started, reached, or kept alive."""


class TaskError(NbindustriaError):
    """One task failed. ``traceback_text`` is the traceback where it ran (kernel or engine)."""

    def __init__(self, label: str, exc_type: str, message: str, traceback_text: str,
                 engine: str | None = None):
        self.label = label
        self.exc_type = exc_type
        self.message = message
        self.traceback_text = traceback_text
        self.engine = engine
        where = f" on {engine}" if engine else ""
        super().__init__(f"{label} failed{where}: {exc_type}: {message}")

    def _render_traceback_(self) -> list[str]:
        # IPython calls this to show the error: show where it really happened.
        return [*self.traceback_text.rstrip().splitlines(), f"(in task {self.label})"]


class PipelineError(NbindustriaError):
    """A run ended with failed tasks. ``failures`` holds one TaskError per failed task."""

    def __init__(self, failures: Sequence[TaskError], skipped: int = 0):
        self.failures = list(failures)
        self.skipped = skipped
        names = ", ".join(f.label for f in self.failures)
        more = f"; {skipped} dependent task(s) skipped" if skipped else ""
        super().__init__(f"{len(self.failures)} task(s) failed: {names}{more}")

    def __str__(self) -> str:
        parts = [self.args[0]]
        for failure in self.failures:
            parts.append(f"\n--- {failure.label} ---\n{failure.traceback_text.rstrip()}")
        return "\n".join(parts)

    def _render_traceback_(self) -> list[str]:
        return str(self).splitlines()
