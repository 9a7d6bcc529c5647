"""What makes a task run again, and what does not, counted by real executions.

Code lives in real files (user modules written to a directory on sys.path, edited and reloaded)
or in notebook-like cells (source registered in linecache), so that the code digests see the
source exactly as they do for a user.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest
from support import ModuleWriter, exec_cell

from nbindustria import hashing
from nbindustria.pipeline import Pipeline

BASE = '''
import functools

from nbindustria import task

LOG = {LOG}
SCALE = 2
OTHER = 1
OFFSET = 0


def _hit(name):
    with open(LOG, "a") as out:
        out.write(name + "\\n")


def make_scaler(k):
    def scaler(x):
        return x * k
    return scaler


scaler = make_scaler(1)


def helper2(x):
    return x + 1


@functools.cache
def memo(x):
    return x * 0


def helper(x, offset=OFFSET):
    return scaler(helper2(x) * SCALE) + offset + memo(x)


def unused(x):
    return x - OTHER


@task
def load(n):
    _hit("load")
    return list(range(n))


@task
def fit(data, k=1):
    _hit("fit")
    return [helper(x) + k for x in data]
'''


def run_base(pipe: Pipeline, mod: Any, k: int = 1) -> Any:
    with pipe:
        handle = mod.fit(mod.load(3), k=k)
    pipe.run()
    return handle


def edited(old: str, new: str, source: str = BASE) -> str:
    assert source.count(old) == 1, old
    return source.replace(old, new)


MUST_RERUN = {
    "body": ("return [helper(x) + k for x in data]", "return [helper(x) - k for x in data]"),
    "helper": ("return scaler(helper2(x) * SCALE) + offset",
               "return scaler(helper2(x) * SCALE) * 1 + offset"),
    "cached-helper": ("return x * 0", "return x * 1"),  # behind functools.cache
    "helper-of-helper": ("    return x + 1\n", "    return x + 2\n"),
    "global-constant": ("SCALE = 2", "SCALE = 3"),
    "closure-value": ("scaler = make_scaler(1)", "scaler = make_scaler(2)"),
    "default-value": ("OFFSET = 0", "OFFSET = 5"),  # only in helper.__defaults__
    "default-in-source": ("def helper(x, offset=OFFSET):", "def helper(x, offset=OFFSET + 1):"),
}

MUST_NOT_RERUN = {
    "comment": ("    _hit(\"fit\")\n", "    _hit(\"fit\")  # count it\n    # and a comment\n"),
    "whitespace": ("def helper2(x):\n    return x + 1\n",
                   "def helper2(x):\n\n    return   x+1\n\n\n"),
    "reformatting": ("return [helper(x) + k for x in data]",
                     "return [\n        helper(x) + k\n        for x in data\n    ]"),
    "docstring": ("def fit(data, k=1):\n", "def fit(data, k=1):\n    \"\"\"Fit it.\"\"\"\n"),
    "helper-docstring": ("def helper2(x):\n", "def helper2(x):\n    '''One more.'''\n"),
    "moved": ("LOG = {LOG}\n", "LOG = {LOG}\n\n\n\ndef first():\n    return 0\n\n\n"),
    "options": ("@task\ndef fit", "@task(cpus=4, retries=2, memory=\"1GiB\", gpus=1)\ndef fit"),
    "unreached-function": ("    return x - OTHER", "    return x + OTHER * 100"),
    "unreached-global": ("OTHER = 1", "OTHER = 2"),
}


@pytest.mark.parametrize("what", sorted(MUST_RERUN))
def test_edit_reruns_exactly_the_task(pipe: Pipeline, modules: ModuleWriter, what: str) -> None:
    mod = modules.load("tasks_rerun", BASE)
    first = run_base(pipe, mod)
    assert (modules.count("load"), modules.count("fit")) == (1, 1)
    mod = modules.load("tasks_rerun", edited(*MUST_RERUN[what]))
    second = run_base(pipe, mod)
    assert second is first  # the same call: one node
    assert (modules.count("load"), modules.count("fit")) == (1, 2)
    assert pipe.last_run is not None
    assert (pipe.last_run.summary.ran, pipe.last_run.summary.cached) == (1, 1)


@pytest.mark.parametrize("what", sorted(MUST_NOT_RERUN))
def test_edit_keeps_the_cache(pipe: Pipeline, modules: ModuleWriter, what: str) -> None:
    mod = modules.load("tasks_keep", BASE)
    first = run_base(pipe, mod)
    value = first.result()
    mod = modules.load("tasks_keep", edited(*MUST_NOT_RERUN[what]))
    second = run_base(pipe, mod)
    assert (modules.count("load"), modules.count("fit")) == (1, 1)
    assert second.state == "cached"
    assert pipe.last_run is not None and pipe.last_run.summary.cached == 2
    assert second.result() == value


def test_reverted_edit_finds_the_old_entries(pipe: Pipeline, modules: ModuleWriter) -> None:
    mod = modules.load("tasks_revert", BASE)
    original = run_base(pipe, mod).result()
    mod = modules.load("tasks_revert", edited("SCALE = 2", "SCALE = 7"))
    assert run_base(pipe, mod).result() != original
    mod = modules.load("tasks_revert", BASE)
    handle = run_base(pipe, mod)
    assert handle.state == "cached"
    assert handle.result() == original
    assert (modules.count("load"), modules.count("fit")) == (1, 2)


def test_global_reassigned_in_place(pipe: Pipeline, modules: ModuleWriter) -> None:
    # As a notebook does: the module's global is rebound, no file edit.
    mod = modules.load("tasks_rebind", BASE)
    run_base(pipe, mod)
    mod.SCALE = 10
    run_base(pipe, mod)
    mod.SCALE = 2
    run_base(pipe, mod)
    assert modules.count("fit") == 2


HELPERS = '''
def inner(x):
    return x + 1


def helper(x):
    return inner(x) * 2
'''

USES_MODULE = '''
import uhelpers
from nbindustria import task

LOG = {LOG}


@task
def fit(x):
    with open(LOG, "a") as out:
        out.write("fit\\n")
    return uhelpers.helper(x)


@task
def other(x):
    with open(LOG, "a") as out:
        out.write("other\\n")
    return x
'''

USES_NAME = USES_MODULE.replace("import uhelpers\n", "from uhelpers import helper\n").replace(
    "uhelpers.helper(x)", "helper(x)")


@pytest.mark.parametrize("style", ["module-attribute", "imported-name"])
@pytest.mark.parametrize("edit", ["helper", "helper-of-helper", "comment"])
def test_edit_in_a_user_module(pipe: Pipeline, modules: ModuleWriter, style: str,
                               edit: str) -> None:
    modules.load("uhelpers", HELPERS)
    source = USES_MODULE if style == "module-attribute" else USES_NAME
    mod = modules.load(f"uses_{style.replace('-', '_')}", source)
    with pipe:
        handles = [mod.fit(1), mod.other(1)]
    pipe.run()
    assert handles[0].result() == 4
    change = {"helper": ("inner(x) * 2", "inner(x) * 3"),
              "helper-of-helper": ("x + 1", "x + 10"),
              "comment": ("def inner(x):\n", "def inner(x):  # the inner one\n")}[edit]
    modules.load("uhelpers", edited(*change, source=HELPERS))
    if style == "imported-name":
        # The user re-runs the cell (or module) that imported the name.
        mod = modules.load(f"uses_{style.replace('-', '_')}")
    with pipe:
        handles = [mod.fit(1), mod.other(1)]
    pipe.run()
    expected = {"helper": 6, "helper-of-helper": 22, "comment": 4}[edit]
    assert handles[0].result() == expected
    assert modules.count("fit") == (1 if edit == "comment" else 2)
    assert modules.count("other") == 1


def test_edit_in_a_user_submodule(pipe: Pipeline, modules: ModuleWriter) -> None:
    modules.write("upkg/__init__", "from . import sub\n")
    modules.write("upkg/sub", "def helper(x):\n    return x * 2\n")
    mod = modules.load("uses_pkg", '''
import upkg
from nbindustria import task

LOG = {LOG}


@task
def fit(x):
    with open(LOG, "a") as out:
        out.write("fit\\n")
    return upkg.sub.helper(x)
''')
    modules.names.extend(["upkg", "upkg.sub"])
    with pipe:
        handle = mod.fit(2)
    pipe.run()
    modules.write("upkg/sub", "def helper(x):\n    return x * 5\n")
    importlib.reload(importlib.import_module("upkg.sub"))
    with pipe:
        handle = mod.fit(2)
    pipe.run()
    assert handle.result() == 10
    assert modules.count("fit") == 2


def test_upstream_result_change_and_same_bytes(pipe: Pipeline, modules: ModuleWriter) -> None:
    mod = modules.load("tasks_up", BASE)
    run_base(pipe, mod)
    # load's code changes but it returns the same value: load runs, fit stays cached.
    mod = modules.load("tasks_up", edited("return list(range(n))", "return list(range(0, n))"))
    handle = run_base(pipe, mod)
    assert (modules.count("load"), modules.count("fit")) == (2, 1)
    assert handle.state == "cached"
    # Now load returns something else: fit runs too.
    mod = modules.load("tasks_up", edited("return list(range(n))", "return list(range(1, n))"))
    handle = run_base(pipe, mod)
    assert (modules.count("load"), modules.count("fit")) == (3, 2)
    assert handle.state == "done"


def test_changed_argument_runs_a_new_call(pipe: Pipeline, modules: ModuleWriter) -> None:
    mod = modules.load("tasks_arg", BASE)
    one = run_base(pipe, mod, k=1)
    two = run_base(pipe, mod, k=2)
    assert one is not two and one.node_id != two.node_id
    assert modules.count("fit") == 2
    run_base(pipe, mod, k=1)
    assert modules.count("fit") == 2  # still there: a change never deletes entries


CELL = '''
@pipe.task
def square(x):
    with open(LOG, "a") as out:
        out.write("square\\n")
    return x * x
'''


def test_redefining_the_same_function_keeps_the_cache(pipe: Pipeline, counter: Any) -> None:
    ns: dict[str, object] = {"pipe": pipe, "LOG": counter.path}
    exec_cell(CELL, ns)
    first_func = ns["square"]
    handle = ns["square"](3)  # type: ignore[operator]
    pipe.run()
    exec_cell(CELL, ns)  # the cell is executed again: a new function object
    assert ns["square"] is not first_func
    again = ns["square"](3)  # type: ignore[operator]
    assert again is handle
    pipe.run()
    assert again.state == "cached" and again.result() == 9
    exec_cell("\n\n\n" + CELL.replace("x * x", "x * x  # same"), ns)  # moved, commented
    pipe.run(ns["square"](3))  # type: ignore[operator]
    assert counter["square"] == 1
    exec_cell(CELL.replace("x * x", "x ** 2"), ns)
    pipe.run(ns["square"](3))  # type: ignore[operator]
    assert counter["square"] == 2


def test_closure_value_in_a_cell(pipe: Pipeline, counter: Any) -> None:
    ns: dict[str, object] = {"pipe": pipe, "LOG": counter.path}
    source = '''
    def make(k):
        @pipe.task
        def scaled(x):
            with open(LOG, "a") as out:
                out.write("scaled\\n")
            return x * k
        return scaled
    '''
    exec_cell(source, ns)
    for k in (2, 2, 3, 2):
        handle = ns["make"](k)(5)  # type: ignore[operator]
        pipe.run(handle)
        assert handle.result() == 5 * k
    assert counter["scaled"] == 2


LIBRARY = '''
import numpy as np
from nbindustria import task

LOG = {LOG}


@task
def total(n):
    with open(LOG, "a") as out:
        out.write("total\\n")
    return float(np.sum(np.arange(n)))


@task
def plain(n):
    with open(LOG, "a") as out:
        out.write("plain\\n")
    return n + 1
'''


def test_library_version_change(pipe: Pipeline, modules: ModuleWriter,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mod = modules.load("tasks_lib", LIBRARY)
    with pipe:
        handles = [mod.total(10), mod.plain(10)]
    pipe.run()
    key_before = handles[0].key
    real_version = importlib.metadata.version

    def fake_version(name: str) -> str:
        return "999.0" if name == "numpy" else real_version(name)

    try:
        monkeypatch.setattr(importlib.metadata, "version", fake_version)
        hashing.library_version.cache_clear()
        assert hashing.library_version("numpy") == "numpy==999.0"
        with pipe:
            handles = [mod.total(10), mod.plain(10)]
        pipe.run()
        assert handles[0].key != key_before
        assert (modules.count("total"), modules.count("plain")) == (2, 1)
        assert handles[1].state == "cached"
    finally:
        monkeypatch.undo()
        hashing.library_version.cache_clear()
    with pipe:
        handles = [mod.total(10), mod.plain(10)]
    pipe.run()
    assert handles[0].key == key_before and handles[0].state == "cached"


def test_declared_version(pipe: Pipeline, modules: ModuleWriter) -> None:
    source = BASE.replace("@task\ndef fit", "@task(version=\"1\")\ndef fit")
    mod = modules.load("tasks_version", source)
    run_base(pipe, mod)
    mod = modules.load("tasks_version", edited("SCALE = 2", "SCALE = 3", source))
    run_base(pipe, mod)  # the user declared the version: refactor freely
    assert modules.count("fit") == 1
    mod = modules.load("tasks_version", source.replace('version="1"', 'version="2"'))
    run_base(pipe, mod)
    assert modules.count("fit") == 2


def test_one_function_under_two_declared_versions(pipe: Pipeline, modules: ModuleWriter) -> None:
    """Two tasks that wrap the same function with different versions keep their own keys in
    one run: the code digest is looked up per function *and* version (it was a wrong hit)."""
    mod = modules.load("tasks_two_versions", BASE)
    v1 = pipe.task(version="1")(mod.fit.func)
    v2 = pipe.task(version="2")(mod.fit.func)
    v1([2.0])
    pipe.run()
    assert modules.count("fit") == 1
    first, second = v1([1.0]), v2([2.0])  # v2 of [2.0] never ran: it must not hit v1's entry
    pipe.run()
    assert first.state == second.state == "done"
    assert modules.count("fit") == 3
