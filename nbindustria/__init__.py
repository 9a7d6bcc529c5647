"""nbindustria: cached, parallel task graphs for Jupyter notebooks and scripts.

Mark functions with ``@task``; calling them records a graph; running it executes what is not
cached, in dependency order, on parallel engines, and keeps every result on disk tied to the
exact code and arguments that made it.
"""

from .errors import (
    CorruptEntryWarning,
    CycleError,
    EngineError,
    HashingError,
    MissingCacheKeyError,
    NbindustriaError,
    NbindustriaWarning,
    PipelineError,
    StoreError,
    StoreFullError,
    TaskError,
    UnpicklableResultError,
    UnsafeCacheDirError,
)
from .pipeline import Pipeline, default_pipeline, run
from .task import Handle, Task, task

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped by purpose, as joblib's (STYLE.md)
    # the API
    "Handle",
    "Pipeline",
    "Task",
    "default_pipeline",
    "run",
    "task",
    # errors and warnings
    "CorruptEntryWarning",
    "CycleError",
    "EngineError",
    "HashingError",
    "MissingCacheKeyError",
    "NbindustriaError",
    "NbindustriaWarning",
    "PipelineError",
    "StoreError",
    "StoreFullError",
    "TaskError",
    "UnpicklableResultError",
    "UnsafeCacheDirError",
    "__version__",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext nbindustria``: the magics, the notebook pipeline, one line of status."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    from .magics import unload

    unload(ipython)
