"""The DAG from handles (nbindustria/graph.py): edges from arguments at any depth, dependency
order, cycles named in order."""

from __future__ import annotations

import collections
import itertools
from typing import Any

import pytest

from nbindustria.errors import CycleError
from nbindustria.graph import Graph, direct_deps, iter_handles
from nbindustria.pipeline import Pipeline
from nbindustria.task import Handle


def tasks(pipe: Pipeline) -> Any:
    @pipe.task
    def leaf(i: int) -> int:
        return i

    @pipe.task
    def node(*inputs: Any, **named: Any) -> int:
        return 0

    return leaf, node


def test_handles_nested_in_any_container(pipe: Pipeline) -> None:
    leaf, node = tasks(pipe)
    a, b, c, d, e, f = (leaf(i) for i in range(6))
    Pair = collections.namedtuple("Pair", "x y")
    arg = {"list": [a, (b, [c])], "set": {d}, "frozen": frozenset({e}), e: "as a key",
           "named": Pair(f, 1)}
    target = node(arg, extra=[a])
    assert {h.node_id for h in direct_deps(target)} == {h.node_id for h in (a, b, c, d, e, f)}
    assert len(direct_deps(target)) == 6  # a appears twice, counted once
    assert list(iter_handles([a, [b]])) == [a, b]


def test_arguments_changed_after_the_call_are_walked_again(pipe: Pipeline) -> None:
    """A call recorded with only scalars has no inputs without walking; anything that could
    change in place (a list, a tuple holding one, a named tuple, an object) is walked when the
    graph is made, so a handle put in it after the call is an input."""
    leaf, node = tasks(pipe)
    a = leaf(1)
    Pair = collections.namedtuple("Pair", "x y")
    scalars = node(1, 2.5, "s", None, named=True)
    late_list: list[Any] = []
    late_nested = (1, [])
    late_named = Pair([], 0)
    calls = [node(late_list), node(late_nested), node(named=late_named)]
    late_list.append(a)
    late_nested[1].append(a)
    late_named.x.append(a)
    assert direct_deps(scalars) == []
    assert [direct_deps(c) for c in calls] == [[a], [a], [a]]
    graph = Graph([scalars, *calls])
    assert graph.deps[scalars.node_id] == []
    assert all(graph.deps[c.node_id] == [a.node_id] for c in calls)
    assert graph.dependents[a.node_id] == [c.node_id for c in calls]


def test_order_is_topological(pipe: Pipeline) -> None:
    leaf, node = tasks(pipe)
    a, b = leaf(1), leaf(2)
    mid = node(a, b)
    top = node(mid, a, named=b)
    graph = Graph([top])
    position = {nid: i for i, nid in enumerate(graph.order)}
    for nid, deps in graph.deps.items():
        for dep in deps:
            assert position[dep] < position[nid]
    assert graph.order[-1] == top.node_id
    assert len(graph) == 4
    assert set(graph.downstream(a.node_id)) == {mid.node_id, top.node_id}
    assert graph.depths() == {a.node_id: 0, b.node_id: 0, mid.node_id: 1, top.node_id: 2}
    remaining = graph.critical_path({a.node_id: 5.0}, default=1.0)
    assert remaining[a.node_id] == 7.0
    assert remaining[top.node_id] == 1.0


def test_only_what_targets_need(pipe: Pipeline) -> None:
    leaf, node = tasks(pipe)
    a, b = leaf(1), leaf(2)
    top = node(a)
    graph = Graph([top])
    assert b.node_id not in graph
    assert a.node_id in graph


def test_deep_chain_needs_no_recursion(pipe: Pipeline) -> None:
    leaf, node = tasks(pipe)
    handle: Handle[Any] = leaf(0)
    for _ in range(3000):
        handle = node(handle)
    graph = Graph([handle])
    assert len(graph) == 3001
    assert graph.order[0] != handle.node_id and graph.order[-1] == handle.node_id


def test_self_cycle_is_named(pipe: Pipeline) -> None:
    _leaf, node = tasks(pipe)
    inputs: list[Any] = []
    h = node(inputs)
    inputs.append(h)  # the list was an argument of this very call
    with pytest.raises(CycleError) as info:
        Graph([h])
    assert info.value.cycle == [h.label, h.label]
    assert "node(" in str(info.value)


def test_longer_cycle_is_named_in_order(pipe: Pipeline) -> None:
    leaf, node = tasks(pipe)
    inputs: list[Any] = [leaf(0)]
    first = node(inputs)
    second = node(first, 2)
    third = node(second, 3)
    inputs.append(third)
    with pytest.raises(CycleError) as info:
        Graph([third])
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1]
    labels = {first.node_id: first.label, second.node_id: second.label,
              third.node_id: third.label}
    # Each element depends on the next one: the cycle reads in dependency order.
    by_label = {v: k for k, v in labels.items()}
    ids = [by_label[label] for label in cycle]
    graph_deps = {h.node_id: {d.node_id for d in direct_deps(h)} for h in (first, second, third)}
    for here, there in itertools.pairwise(ids):
        assert there in graph_deps[here]
    assert sorted(set(ids)) == sorted(labels)
    assert " -> ".join(cycle) in str(info.value)


def test_cycle_through_a_dict_value(pipe: Pipeline) -> None:
    _leaf, node = tasks(pipe)
    config: dict[str, Any] = {}
    h = node(config=config)
    config["self"] = [h]
    with pytest.raises(CycleError):
        Graph([h])


def test_run_reports_the_cycle_before_running_anything(pipe: Pipeline, counter: Any) -> None:
    @pipe.task
    def step(xs: Any) -> int:
        counter.hit("step")
        return len(xs)

    inputs: list[Any] = []
    free = step([1])
    h = step(inputs)
    inputs.append(h)
    with pytest.raises(CycleError, match="step"):
        pipe.run(free, h)
    assert counter.total() == 0
