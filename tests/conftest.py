"""Fixtures that isolate every test: its own cache dir, key dir and config file, no default
pipeline left over from another test, and a check after each store test that every entry in
the cache still verifies (unless the test damages entries on purpose: ``@pytest.mark.corrupts``).
"""

from __future__ import annotations

import importlib
import io
import linecache
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

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


class Counter:
    """Counts real executions: a task calls ``hit(name)``, which appends a line to a file.

    Its only state is the file's path, so a task that reads a Counter global keeps its key.
    """

    def __init__(self, path: Path):
        self.path = str(path)

    def hit(self, name: str) -> None:
        with open(self.path, "a") as out:
            out.write(name + "\n")

    def __getitem__(self, name: str) -> int:
        try:
            with open(self.path) as f:
                return sum(1 for line in f if line.rstrip("\n") == name)
        except FileNotFoundError:
            return 0

    def total(self) -> int:
        try:
            with open(self.path) as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0


@pytest.fixture
def counter(tmp_path: Path) -> Counter:
    return Counter(tmp_path / "executions.log")


class ModuleWriter:
    """Writes user modules into a directory on sys.path, imports them, edits and reloads them.

    ``inspect.getsource`` reads the real file, as it does for a user's own modules.
    """

    def __init__(self, root: Path, log: Path):
        self.root = root
        self.log = str(log)
        self.names: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(root))

    def write(self, name: str, source: str) -> Path:
        path = self.root / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(source).replace("{LOG}", repr(self.log))
        old_mtime = path.stat().st_mtime if path.exists() else 0.0
        path.write_text(text)
        # A distinct mtime: linecache and the import system see every edit.
        mtime = max(time.time(), old_mtime + 1.0)
        os.utime(path, (mtime, mtime))
        linecache.checkcache(str(path))
        importlib.invalidate_caches()
        return path

    def load(self, name: str, source: str | None = None) -> ModuleType:
        """(Re)write ``name`` if source is given, then import it, or reload it if imported."""
        if source is not None:
            self.write(name, source)
        if name in sys.modules:
            module = importlib.reload(sys.modules[name])
        else:
            module = importlib.import_module(name)
            self.names.append(name)
        return module

    def count(self, name: str) -> int:
        return Counter(Path(self.log))[name]

    def close(self) -> None:
        for name in self.names:
            sys.modules.pop(name, None)
        while str(self.root) in sys.path:
            sys.path.remove(str(self.root))


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[ModuleWriter]:
    """Write, import and edit user modules; ``{LOG}`` in a source is the execution log."""
    writer = ModuleWriter(tmp_path / "usermods", tmp_path / "module-executions.log")
    yield writer
    writer.close()


_cells = 0


def exec_cell(source: str, namespace: dict[str, object] | None = None,
              module_name: str = "__cell__") -> dict[str, object]:
    """Run source as a notebook cell does: under a fresh fake file name registered in
    linecache (so inspect.getsource finds it), in a namespace that may be shared."""
    global _cells
    _cells += 1
    text = textwrap.dedent(source)
    filename = f"<cell-{_cells}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    ns: dict[str, object] = namespace if namespace is not None else {}
    ns.setdefault("__name__", module_name)
    exec(compile(text, filename, "exec"), ns)
    return ns


Runner = Callable[..., object]
