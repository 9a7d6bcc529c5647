"""Pipeline end to end, in this process: recording, running, caching, failures, bad input."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import Counter, exec_cell

from nbindustria import (
    CycleError,
    HashingError,
    NbindustriaError,
    PipelineError,
    TaskError,
    default_pipeline,
    task,
)
from nbindustria.hashing import tokenize
from nbindustria.pipeline import Pipeline


def test_calls_record_and_nothing_runs(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def add(a: int, b: int = 1) -> int:
        """Add two numbers."""
        counter.hit("add")
        return a + b

    assert add.__doc__ == "Add two numbers."
    assert add.__name__ == "add"
    handle = add(1, b=2)
    assert counter.total() == 0
    assert handle.state == "added"
    assert handle.label == "add(1, b=2)"
    summary = pipe.run()
    assert (summary.ran, summary.cached, summary.failed, summary.skipped) == (1, 0, 0, 0)
    assert handle.result() == 3
    assert counter["add"] == 1


def test_same_call_is_one_node(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def f(x: int = 1) -> int:
        counter.hit("f")
        return x

    a, b, c = f(1), f(x=1), f()
    assert a is b is c
    pipe.run()
    assert counter["f"] == 1


def test_second_run_is_all_cache_hits(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def load(n: int) -> list[int]:
        counter.hit("load")
        return list(range(n))

    @pipe.task
    def fit(data: list[int], alpha: float = 0.1) -> float:
        counter.hit("fit")
        return sum(data) * alpha

    def cell() -> list[Any]:
        df = load(10)
        return [fit(df, alpha=a) for a in (0.1, 0.2, 0.5)]

    models = cell()
    pipe.run()
    assert [m.result() for m in models] == pytest.approx([4.5, 9.0, 22.5])
    models = cell()
    summary = pipe.run()
    assert (summary.ran, summary.cached) == (0, 4)
    assert (counter["load"], counter["fit"]) == (1, 3)
    log = pipe.reporter.stream.getvalue()  # type: ignore[attr-defined]
    assert "[Added Task] fit(load(10), alpha=0.1)" in log
    assert "[Cache hit!] fit(load(10), alpha=0.5) can be skipped" in log
    assert "Saved result of load(10)" in log
    assert "ran 0, cached 4, failed 0, skipped 0" in log


def test_results_flow_into_arguments_in_containers(pipe: Pipeline) -> None:
    @pipe.task
    def num(i: int) -> int:
        return i * 10

    @pipe.task
    def collect(items: Any) -> Any:
        return items

    handles = [num(i) for i in range(3)]
    target = collect({"list": [handles[0], (handles[1],)], "set": {handles[2]},
                      "plain": 5})
    pipe.run()
    assert target.result() == {"list": [0, (10,)], "set": {20}, "plain": 5}


def test_argument_changed_in_place_after_the_call(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def total(xs: list[int]) -> int:
        counter.hit("total")
        return sum(xs)

    xs = [1]
    mutated = total(xs)
    xs.append(2)  # the list is read as it is when the run starts
    fresh = total([1])  # the call that `mutated` no longer is
    assert fresh is not mutated
    pipe.run()
    assert (mutated.result(), fresh.result()) == (3, 1)
    assert total([1, 2]).result() == 3  # the same value: a cache hit
    assert counter["total"] == 2


@pytest.mark.parametrize("make", ["read-only view of a writable array",
                                  "read-only array that owns its memory"])
def test_read_only_array_changed_after_the_call(pipe: Pipeline, counter: Counter,
                                                cache_dir: Path, key_dir: Path,
                                                make: str) -> None:
    """A read-only flag does not freeze an array: its writable base can change it, and an
    array that owns its memory can be made writable again. The run must see the bytes as they
    are when it starts, never hit the entry of the bytes as they were at the call."""
    def first(a: Any) -> float:
        counter.hit("first")
        return float(a[0])

    pipe.task(first)(np.zeros(4))
    pipe.run()  # the entry of zeros is in the cache
    later = Pipeline(name="later", cache_dir=cache_dir, key_dir=key_dir, stream=io.StringIO())
    base = np.zeros(4)
    if make.startswith("read-only view"):
        arg = base[:]
        arg.flags.writeable = False
        handle = later.task(first)(arg)
        base[0] = 7.0  # changes the view through its base
    else:
        arg = base
        arg.flags.writeable = False
        handle = later.task(first)(arg)
        arg.flags.writeable = True
        arg[0] = 7.0
    later.run()
    assert handle.result() == 7.0
    assert counter["first"] == 2
    later.close()


def test_run_only_what_the_handles_need(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def f(x: int) -> int:
        counter.hit(f"f{x}")
        return x

    a, b = f(1), f(2)
    pipe.run(a)
    assert (counter["f1"], counter["f2"]) == (1, 0)
    assert b.result() == 2  # result() runs what it needs
    assert counter["f2"] == 1


def test_module_level_task_uses_the_default_pipeline(tmp_path: Path) -> None:
    @task
    def triple(x: int) -> int:
        return 3 * x

    handle = triple(2)
    assert handle.pipeline is default_pipeline()
    assert default_pipeline().settings.cache_dir == tmp_path / "cache"
    default_pipeline().reporter.stream = io.StringIO()
    assert handle.result() == 6
    default_pipeline().close()


def test_with_pipeline_records_bare_tasks_into_it(pipe: Pipeline) -> None:
    @task
    def one() -> int:
        return 1

    with pipe:
        handle = one()
    assert handle.pipeline is pipe


def test_memory_and_options_are_checked() -> None:
    with pytest.raises(NbindustriaError, match="memory"):
        task(memory="lots")(lambda: 1)
    with pytest.raises(NbindustriaError, match="retries"):
        task(retries=-1)(lambda: 1)
    with pytest.raises(NbindustriaError, match="cpus"):
        task(cpus="two")(lambda: 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        task(colour="red")(lambda: 1)  # type: ignore[call-overload]
    assert task(memory="4GiB")(lambda: 1).options.memory == 4 * 2**30


def test_bad_call_signature_names_the_task(pipe: Pipeline) -> None:
    @pipe.task
    def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"f\(\)"):
        f(1, 2)  # type: ignore[call-arg]


# ---- bad input ------------------------------------------------------------------------------


class Model:
    def __init__(self) -> None:
        self.weights = [1.0, 2.0]
        self.lock = threading.Lock()


def test_unhashable_argument_fails_at_the_call(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def prepare(x: int) -> int:
        counter.hit("prepare")
        return x

    @pipe.task
    def fit(data: Any, cfg: Any) -> int:
        counter.hit("fit")
        return 1

    data = prepare(1)
    with pytest.raises(HashingError) as info:
        fit(data, cfg={"model": Model()})
    message = str(info.value)
    assert "fit(cfg=...)['model'].lock" in message
    assert "'fit'" in message
    assert counter.total() == 0  # raised before anything ran
    assert len(pipe.pending) == 1  # the bad call was not recorded


def test_generator_argument(pipe: Pipeline) -> None:
    @pipe.task
    def total(xs: Any) -> int:
        return sum(xs)

    with pytest.raises(HashingError, match=r"total\(xs=\.\.\.\).*generator"):
        total(x for x in range(3))


def test_result_inside_an_object_is_refused(pipe: Pipeline) -> None:
    @dataclasses.dataclass
    class Config:
        alpha: Any

    @pipe.task
    def up(x: int) -> int:
        return x

    @pipe.task
    def down(cfg: Config) -> Any:
        return cfg.alpha

    with pytest.raises(HashingError, match=r"argument cfg of task 'down' holds the result of "
                                           r"up\(1\)"):
        down(Config(up(1)))
    assert down(Config(1)) is not None
    named = collections.namedtuple("named", "alpha")
    handle = down(named(up(2)))  # named tuples are walked
    pipe.run()
    assert handle.result() == 2


def test_argument_that_becomes_unhashable_after_the_call(pipe: Pipeline,
                                                         counter: Counter) -> None:
    @pipe.task
    def f(cfg: Any) -> int:
        counter.hit("f")
        return 1

    @pipe.task
    def g(x: int) -> int:
        counter.hit("g")
        return x

    cfg: dict[str, Any] = {}
    bad = f(cfg)
    g(bad)
    good = g(5)
    cfg["lock"] = threading.Lock()  # mutated after the call: read again at run time
    with pytest.raises(PipelineError) as info:
        pipe.run()
    assert [f.label for f in info.value.failures] == [bad.label]
    assert "f(cfg=...)['lock']" in str(info.value)
    assert counter["f"] == 0 and counter["g"] == 1
    assert good.result() == 5


def test_unpicklable_result(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def make(x: int) -> Any:
        counter.hit("make")
        return {"rows": [1, 2], "handle": [0, threading.Lock()]}

    @pipe.task
    def use(value: Any) -> int:
        counter.hit("use")
        return 1

    made = make(1)
    used = use(made)
    with pytest.raises(PipelineError) as info:
        pipe.run()
    (failure,) = info.value.failures
    assert failure.exc_type == "UnpicklableResultError"
    assert "make(1)" in failure.message and "result['handle'][1]" in failure.message
    assert (made.state, used.state) == ("failed", "skipped")
    assert counter["use"] == 0
    assert made.key is not None and not pipe.store.entry_path(made.key).exists()
    assert list(pipe.store.keys()) == []
    assert list(pipe.store.entries_dir.rglob("*.part")) == []


def test_cycle_is_named_and_nothing_runs(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def f(xs: Any) -> int:
        counter.hit("f")
        return 0

    inputs: list[Any] = []
    h = f(inputs)
    inputs.append(h)
    with pytest.raises(CycleError) as info:
        pipe.run()
    assert info.value.cycle == [h.label, h.label]
    assert counter.total() == 0


def test_engines_setting_that_is_not_available(tmp_path: Path) -> None:
    with pytest.raises(NbindustriaError):
        Pipeline(cache_dir=tmp_path / "c", engines=True)  # type: ignore[arg-type]


# ---- failures stay local ------------------------------------------------------------------------


def make_graph(pipe: Pipeline, counter: Counter, broken: Path) -> Any:
    # Whether source(0) fails is outside the code (a file), as a flaky input would be.
    broken_path = str(broken)

    @pipe.task
    def source(i: int) -> int:
        counter.hit(f"source{i}")
        if i == 0 and os.path.exists(broken_path):
            raise ValueError("source 0 is broken")
        return i

    @pipe.task
    def double(x: int) -> int:
        counter.hit("double")
        return 2 * x

    @pipe.task
    def combine(*xs: int) -> int:
        counter.hit("combine")
        return sum(xs)

    s0, s1, s2 = source(0), source(1), source(2)
    bad_branch = double(s0)
    good = [double(s1), double(s2)]
    return {"top": combine(bad_branch, *good), "bad": bad_branch, "good": good,
            "other_failure": None}


def test_failure_skips_dependents_and_others_finish(pipe: Pipeline, counter: Counter,
                                                   tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    graph = make_graph(pipe, counter, broken)
    with pytest.raises(PipelineError) as info:
        pipe.run()
    error = info.value
    assert [f.label for f in error.failures] == ["source(0)"]
    assert isinstance(error.failures[0], TaskError)
    assert "ValueError: source 0 is broken" in str(error)
    assert "raise ValueError" in error.failures[0].traceback_text  # the task's own traceback
    assert error.skipped == 2
    assert graph["bad"].state == "skipped" and graph["top"].state == "skipped"
    assert [g.state for g in graph["good"]] == ["done", "done"]
    assert pipe.store.present([g.key for g in graph["good"]]).keys() == {
        g.key for g in graph["good"]}
    assert (counter["source1"], counter["source2"], counter["double"]) == (1, 1, 2)

    # Fixed: running again resumes; done work stays done.
    broken.unlink()
    graph = make_graph(pipe, counter, broken)
    summary = pipe.run()
    assert graph["top"].result() == 6
    assert (counter["source0"], counter["source1"], counter["source2"]) == (2, 1, 1)
    assert counter["double"] == 3 and counter["combine"] == 1
    assert (summary.ran, summary.cached) == (3, 4)


def test_every_failure_is_named(pipe: Pipeline) -> None:
    @pipe.task
    def fails(i: int) -> int:
        raise RuntimeError(f"failure number {i}")

    for i in range(3):
        fails(i)
    with pytest.raises(PipelineError) as info:
        pipe.run()
    text = str(info.value)
    assert "3 task(s) failed" in text
    for i in range(3):
        assert f"--- fails({i}) ---" in text
        assert f"RuntimeError: failure number {i}" in text
    assert info.value._render_traceback_()[0].startswith("3 task(s) failed")


def test_retries_run_a_flaky_task_again(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task(retries=1)
    def flaky(x: int) -> int:
        counter.hit("flaky")
        if counter["flaky"] == 1:
            raise ConnectionError("first attempt fails")
        return x

    @pipe.task(retries=1)
    def broken(x: int) -> int:
        counter.hit("broken")
        raise ConnectionError("always")

    ok = flaky(7)
    broken(1)
    with pytest.raises(PipelineError) as info:
        pipe.run()
    assert ok.state == "done" and ok.result() == 7
    assert counter["flaky"] == 2
    assert counter["broken"] == 2  # one retry, then it counts as failed
    assert [f.label for f in info.value.failures] == ["broken(1)"]


def test_without_retries_a_failure_is_final(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def once(x: int) -> int:
        counter.hit("once")
        raise ConnectionError("no")

    once(1)
    with pytest.raises(PipelineError):
        pipe.run()
    assert counter["once"] == 1


# ---- rerun and dryrun -----------------------------------------------------------------------------


def test_rerun_option_runs_every_time(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task(rerun=True)
    def always(x: int) -> int:
        counter.hit("always")
        return x

    @pipe.task
    def after(x: int) -> int:
        counter.hit("after")
        return x + 1

    for _ in range(3):
        handle = after(always(1))
        pipe.run()
    assert counter["always"] == 3
    assert counter["after"] == 1  # same bytes upstream: cached
    assert handle.result() == 2


def test_rerun_by_name_at_run_time(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def f(x: int) -> int:
        counter.hit("f")
        return x

    f(1)
    pipe.run()
    f(1)
    pipe.run(rerun=["f"])
    f(1)
    pipe.run()
    assert counter["f"] == 2


def test_dryrun_runs_nothing_and_reports(pipe: Pipeline, counter: Counter,
                                         tmp_path: Path) -> None:
    @pipe.task
    def a(x: int) -> int:
        counter.hit("a")
        return x

    @pipe.task
    def b(x: int) -> int:
        counter.hit("b")
        return x

    a(1)
    pipe.run()
    top = b(a(1))
    other = a(2)
    summary = pipe.run(dryrun=True)
    assert counter.total() == 1
    assert summary.dryrun and summary.cached == 1
    assert sorted(summary.would_run) == sorted([top.label, other.label])
    assert "dry run: 2 to run, 1 cached" in pipe.reporter.stream.getvalue()  # type: ignore
    assert len(list(pipe.store.keys())) == 1

    dry = Pipeline(cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys", dryrun=True,
                   stream=io.StringIO())

    @dry.task
    def c(x: int) -> int:
        counter.hit("c")
        return x

    c(1)
    assert dry.run().would_run == ["c(1)"]
    assert counter["c"] == 0
    dry.close()


# ---- values and handles ---------------------------------------------------------------------------


def test_value_follows_the_current_key(pipe: Pipeline, counter: Counter) -> None:
    ns: dict[str, object] = {"pipe": pipe, "LOG": counter.path}
    cell = '''
    @pipe.task
    def f(x):
        with open(LOG, "a") as out:
            out.write("f\\n")
        return x * {k}
    '''
    exec_cell(cell.format(k=2), ns)
    handle = ns["f"](5)  # type: ignore[operator]
    assert handle.result() == 10
    exec_cell(cell.format(k=3), ns)
    assert ns["f"](5) is handle  # type: ignore[operator]
    assert handle.result() == 15  # called again after the edit: decided again
    exec_cell(cell.format(k=2), ns)
    ns["f"](5)  # type: ignore[operator]
    pipe.run()
    assert handle.state == "cached"
    assert handle.result() == 10
    assert counter["f"] == 2


def test_arrays_come_back_read_only_and_keep_provenance(pipe: Pipeline,
                                                         counter: Counter) -> None:
    tokenize(np.arange(3))  # array encoders are registered: provenance still comes first

    @pipe.task
    def make(n: int) -> np.ndarray:
        counter.hit("make")
        return np.arange(n, dtype=np.float64)

    @pipe.task
    def total(a: np.ndarray) -> float:
        counter.hit("total")
        return float(a.sum())

    big = make(300_000)
    pipe.run()
    array = big.result()
    assert isinstance(array, np.ndarray) and not array.flags.writeable
    with pytest.raises(ValueError):
        array[0] = 1.0
    first = total(array)  # a value that came out of a task: its provenance is the key
    assert total(big) is first  # the value and its handle are the same argument
    pipe.run()
    assert first.result() == float(np.arange(300_000).sum())
    assert counter["total"] == 1
    copy = total(np.array(array))  # a writable copy has no provenance: hashed by content
    assert copy is not first
    pipe.run()
    assert copy.result() == first.result()
    assert counter["total"] == 2


def test_results_of_many_calls_load_together(pipe: Pipeline, counter: Counter,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    @pipe.task
    def square(i: int) -> dict[str, int]:
        counter.hit("square")
        return {"i": i, "sq": i * i}

    @pipe.task
    def ramp(n: int) -> np.ndarray:
        counter.hit("ramp")
        return np.arange(float(n))

    handles = [square(i) for i in range(50)]
    pipe.run()
    later = square(50)  # not run yet: results() runs it first
    big = ramp(300_000)  # a file of its own: loaded one by one
    one_by_one: list[str] = []
    real_load = pipe.store.load

    def counting_load(key: str, **kwargs: Any) -> Any:
        one_by_one.append(key)
        return real_load(key, **kwargs)

    monkeypatch.setattr(pipe.store, "load", counting_load)
    values = pipe.results([*handles, later, big, handles[0]])
    assert values[:51] == [{"i": i, "sq": i * i} for i in range(51)]
    np.testing.assert_array_equal(values[51], np.arange(300_000.0))
    assert values[52] is values[0]
    assert one_by_one == [big.key]  # every small value came from the bulk load
    assert handles[7].result() is values[7]  # kept: no second load
    assert one_by_one == [big.key]
    assert counter["square"] == 51 and counter["ramp"] == 1
    # A value of an array argument loaded in bulk keeps its provenance like one from result().
    assert pipe.provenance_of(values[51]) is not None


def test_results_recompute_a_damaged_entry(pipe: Pipeline, counter: Counter) -> None:
    @pipe.task
    def square(i: int) -> int:
        counter.hit("square")
        return i * i

    handles = [square(i) for i in range(5)]
    pipe.run()
    assert handles[2].key is not None
    path, offset, packed = pipe.store.locate(handles[2].key)
    assert packed
    with open(path, "r+b") as f:  # one bit of the record's signature
        f.seek(offset + 10)
        byte = f.read(1)
        f.seek(offset + 10)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.warns(UserWarning, match="unusable"):
        assert pipe.results(handles) == [0, 1, 4, 9, 16]
    assert counter["square"] == 6  # the damaged one ran again, and only it


def test_reasons_of_many_calls_to_run(pipe: Pipeline) -> None:
    """The reason each call runs is read from the index in bulk once many calls run; it is
    the same as read one by one."""
    def f(x: int) -> int:
        return x + 1

    first = [pipe.task(f)(i) for i in range(30)]
    pipe.run()
    assert {h.reason for h in first} == {"never run with these arguments"}

    def f(x: int) -> int:  # type: ignore[no-redef]  # the same task, edited
        return x + 2

    again = [pipe.task(f)(i) for i in range(30)] + [pipe.task(f)(100 + i) for i in range(20)]
    queries: list[str] = []
    real_execute = pipe.store.index.execute

    def counting(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        queries.append(sql)
        return real_execute(sql, params)

    pipe.store.index.execute = counting  # type: ignore[method-assign]
    pipe.run()
    pipe.store.index.execute = real_execute  # type: ignore[method-assign]
    # One level of 50 calls to run: their past rows in one query, not one per call.
    assert sum("arg_digests FROM entries" in q for q in queries) == 1, queries
    assert all(h.reason.startswith("code of ") and h.reason.endswith("f changed")
               for h in again[:30]), {h.reason for h in again[:30]}
    assert [h.reason for h in again[30:]] == ["never run with these arguments"] * 20
    assert [h.result() for h in again[:3]] == [2, 3, 4]


def test_index_rows_hold_the_same_json_as_json_dumps() -> None:
    from nbindustria.scheduler import _flat_json

    for mapping in ({}, {"a": "b"}, {"x": 'é"\\\n', "y": "1"}, {"n": 1, "f": [1.5]}):
        assert _flat_json(mapping) == json.dumps(mapping)


def test_results_run_in_process_are_committed_in_bounded_groups(pipe: Pipeline) -> None:
    """In-process results wait in memory for their group commit: a group closes at
    COMMIT_BYTES, so 24 MiB of small results make at least two segment files."""
    from nbindustria.scheduler import COMMIT_BYTES

    @pipe.task
    def blob(i: int) -> bytes:
        return bytes([i % 256]) * (40 << 10)

    handles = [blob(i) for i in range(600)]
    assert COMMIT_BYTES < 600 * (40 << 10)
    pipe.run()
    segments = {pipe.store.locate(h.key or "")[0] for h in handles}
    assert 2 <= len(segments) <= 4
    assert all(pipe.store.locate(h.key or "")[2] for h in handles)  # all packed
    assert handles[300].result() == bytes([300 % 256]) * (40 << 10)


def test_a_run_hands_the_garbage_collector_back_as_it_found_it(pipe: Pipeline) -> None:
    """Runs pause the collector while resolving and keep older objects out of its full passes;
    afterwards it is enabled and nothing stays frozen (also after a failure), and a process
    that froze objects itself keeps them frozen."""
    import gc

    @pipe.task
    def boom(i: int) -> int:
        assert gc.isenabled()  # user code runs with the collector on
        if i == 2:
            raise ValueError("no")
        return i

    for i in range(3):
        boom(i)
    with pytest.raises(PipelineError):
        pipe.run()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        pipe.run(boom(5))
        assert gc.get_freeze_count() > 0  # (frozen objects may die by refcount meanwhile)
    finally:
        gc.unfreeze()
