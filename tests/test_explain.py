"""``Pipeline.why``: why a task will run, or ran (nbindustria/explain.py)."""

from __future__ import annotations

from typing import Any

import pytest
from support import Counter, ModuleWriter, exec_cell, flip_last_payload_byte

from nbindustria.errors import CorruptEntryWarning
from nbindustria.explain import diff_manifests
from nbindustria.pipeline import Pipeline

CELL = '''
@pipe.task
def double(x):
    with open(LOG, "a") as out:
        out.write("double\\n")
    return x * {k}


@pipe.task
def inc(y):
    return y + 1


@pipe.task(rerun=True)
def fresh(x):
    return x
'''


@pytest.fixture
def cell(pipe: Pipeline, counter: Counter) -> Any:
    ns: dict[str, Any] = {"pipe": pipe, "LOG": counter.path}

    def define(k: int = 2) -> dict[str, Any]:
        exec_cell(CELL.format(k=k), ns)
        return ns

    return define


def test_never_run(pipe: Pipeline, cell: Any) -> None:
    ns = cell()
    why = pipe.why(ns["double"](1))
    assert why.status == "will run"
    assert why.reasons == ["double has never run (no stored result)"]
    assert str(why).startswith("double(1): will run\n  - double has never run")
    downstream = pipe.why(ns["inc"](ns["double"](1)))
    assert downstream.reasons == ["an input has no result yet, so it runs first"]


def test_cached_and_ran(pipe: Pipeline, cell: Any) -> None:
    ns = cell()
    handle = ns["double"](1)
    pipe.run()
    why = pipe.why(handle)
    assert why.status == "ran"
    assert "it ran in the last run: never run with these arguments" in why.reasons
    handle = ns["double"](1)
    pipe.run()
    why = pipe.why(handle)
    assert why.status == "cached"
    assert why.reasons[0].startswith("cache hit: computed ")


def test_code_changed_with_a_diff(pipe: Pipeline, cell: Any, counter: Counter) -> None:
    ns = cell(k=2)
    pipe.run(ns["double"](1))
    ns = cell(k=3)
    why = pipe.why(ns["double"](1))
    assert why.status == "will run"
    assert "code of __cell__.double changed" in why.reasons
    assert "-    return x * 2" in why.details
    assert "+    return x * 3" in why.details
    assert any(line.startswith("--- __cell__.double (before)") for line in why.details)
    text = str(why)
    assert "-    return x * 2\n+    return x * 3" in text
    assert counter["double"] == 1  # why() runs nothing


def test_helper_and_global_changes_are_named(pipe: Pipeline, modules: ModuleWriter) -> None:
    source = '''
from nbindustria import task

LIMIT = 10


def clip(x):
    return min(x, LIMIT)


@task
def fit(x):
    return clip(x)
'''
    mod = modules.load("why_mod", source)
    with pipe:
        pipe.run(mod.fit(50))
    mod = modules.load("why_mod", source.replace("LIMIT = 10", "LIMIT = 20"))
    with pipe:
        why = pipe.why(mod.fit(50))
    assert why.reasons[0] == "value of why_mod.clip:LIMIT changed: 10 -> 20"
    mod = modules.load("why_mod", source.replace("min(x, LIMIT)", "max(x, LIMIT)"))
    with pipe:
        why = pipe.why(mod.fit(50))
    assert "code of why_mod.clip changed" in why.reasons
    assert "-    return min(x, LIMIT)" in why.details
    assert "+    return max(x, LIMIT)" in why.details


def test_argument_changed_names_old_and_new(pipe: Pipeline, cell: Any) -> None:
    ns = cell()
    pipe.run(ns["double"](1))
    why = pipe.why(ns["double"](2))
    assert why.status == "will run"
    assert "never run with these arguments" in why.reasons
    assert "argument x: 1 -> 2 (closest stored call: double(1))" in why.reasons


def test_upstream_result_changed(pipe: Pipeline, cell: Any) -> None:
    ns = cell(k=2)
    pipe.run(ns["inc"](ns["double"](1)))
    ns = cell(k=3)
    up = ns["double"](1)
    pipe.run(up)  # the input ran again, to another value
    why = pipe.why(ns["inc"](up))
    assert why.status == "will run"
    assert "the result of an input changed: y=double(1)" in why.reasons


def test_forced_by_rerun(pipe: Pipeline, cell: Any) -> None:
    ns = cell()
    handle = ns["fresh"](1)
    assert pipe.why(handle).reasons == ["forced by rerun"]
    pipe.run(handle)
    assert pipe.why(handle).reasons == ["forced by rerun"]


@pytest.mark.corrupts
def test_unreadable_entry(pipe: Pipeline, cell: Any) -> None:
    ns = cell()
    up = ns["double"](1)
    pipe.run(up)
    assert up.key is not None
    flip_last_payload_byte(pipe.store, up.key)
    top = ns["inc"](up)
    with pytest.warns(CorruptEntryWarning):
        pipe.run(top)
    assert up.reason == "its cache entry was unreadable"
    assert "it ran in the last run: its cache entry was unreadable" in pipe.why(up).reasons


def test_diff_manifests_reports_each_kind() -> None:
    old = {"m.f": {"kind": "function", "digest": "1", "source": "def f():\n    return 1\n"},
           "m.f:K": {"kind": "value", "digest": "a", "summary": "1"},
           "np.mean": {"kind": "library", "digest": "numpy==1", "version": "numpy==1"},
           "m.gone": {"kind": "function", "digest": "x", "source": ""}}
    new = {"m.f": {"kind": "function", "digest": "2", "source": "def f():\n    return 2\n"},
           "m.f:K": {"kind": "value", "digest": "b", "summary": "2"},
           "np.mean": {"kind": "library", "digest": "numpy==2", "version": "numpy==2"},
           "m.new": {"kind": "function", "digest": "y", "source": ""}}
    reasons, details = diff_manifests(old, new)
    assert "code of m.f changed" in reasons
    assert "value of m.f:K changed: 1 -> 2" in reasons
    assert "np.mean: numpy==1 -> numpy==2" in reasons
    assert "it no longer reaches m.gone" in reasons
    assert "it now reaches m.new" in reasons
    assert "-    return 1" in details and "+    return 2" in details
    assert diff_manifests(None, new)[0] == ["its code changed (the earlier code was not recorded)"]
