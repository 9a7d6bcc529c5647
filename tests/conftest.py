"""Fixtures that isolate every test: its own cache dir, key dir and config file, no default
pipeline left over from another test, and a check after each store test that every entry in
the cache still verifies (unless the test damages entries on purpose: ``@pytest.mark.corrupts``).
"""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from support import Counter, ModuleWriter

from nbindustria.pipeline import Pipeline, set_default_pipeline
from nbindustria.store import Store

TESTS = Path(__file__).parent
# The module (the package's ``task`` attribute is the decorator).
task_module = importlib.import_module("nbindustria.task")


# Hypothesis tests share the autouse isolation fixture (a fresh cache per test function is
# right for them too) and some start interpreters: no deadline.
settings.register_profile(
    "nbindustria", deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("nbindustria")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "corrupts: the test damages cache entries on purpose (no final verify)")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own cache dir, key dir and config file (none of the user's)."""
    monkeypatch.setenv("NBINDUSTRIA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NBINDUSTRIA_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("NBINDUSTRIA_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.delenv("NBINDUSTRIA_ENGINES", raising=False)
    monkeypatch.delenv("NBINDUSTRIA_TEST_CRASH_AT", raising=False)
    # Source edits within one second must not be hidden by stale bytecode.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    set_default_pipeline(None)
    active = list(task_module._active)
    yield
    task_module._active[:] = active
    set_default_pipeline(None)


def _check_entries(request: pytest.FixtureRequest, store: Store) -> None:
    if request.node.get_closest_marker("corrupts") is None:
        assert store.verify_all(quarantine=False) == {}


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def pipe(request: pytest.FixtureRequest, cache_dir: Path, key_dir: Path) -> Iterator[Pipeline]:
    """A pipeline on the test's own cache; its text log goes to ``pipe.reporter.stream``."""
    p = Pipeline(name="test", cache_dir=cache_dir, key_dir=key_dir, stream=io.StringIO())
    yield p
    if p._store is not None:
        _check_entries(request, p.store)
    p.close()


@pytest.fixture
def store(request: pytest.FixtureRequest, cache_dir: Path, key_dir: Path) -> Iterator[Store]:
    s = Store(cache_dir, key_dir)
    yield s
    _check_entries(request, s)
    s.close()


@pytest.fixture
def counter(tmp_path: Path) -> Counter:
    return Counter(tmp_path / "executions.log")


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[ModuleWriter]:
    """Write, import and edit user modules; ``{LOG}`` in a source is the execution log."""
    writer = ModuleWriter(tmp_path / "usermods", tmp_path / "module-executions.log")
    yield writer
    writer.close()




Runner = Callable[..., object]
