"""The DAG of one run, built from handles: dependencies, order, cycle check. Pure.

Dependencies are found by walking each node's arguments (lists, tuples, dicts, sets and
frozensets, at any depth) at the moment the run starts, not only when the call was made: a list
that was passed to a task and changed afterwards is seen as it is now. That is also how a cycle can
appear (a handle appended to a list that was an argument of that same call), and why this module
checks for one and names it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .errors import CycleError
from .task import Handle

_CONTAINERS = (list, tuple, set, frozenset, dict)


def is_walked_container(value: Any) -> bool:
    """Containers whose items may be handles: the builtin ones and named tuples (exact types,
    so that the worker can rebuild them with the results in place)."""
    tp = type(value)
    return tp in _CONTAINERS or (isinstance(value, tuple) and hasattr(tp, "_fields"))


def iter_handles(value: Any, _seen: set[int] | None = None) -> Iterator[Handle[Any]]:
    """Every handle inside ``value``, in argument order (containers walked at any depth)."""
    if isinstance(value, Handle):
        yield value
        return
    if is_walked_container(value):
        seen = _seen if _seen is not None else set()
        if id(value) in seen:
            return
        seen.add(id(value))
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict):
            yield from (h for k in value for h in iter_handles(k, seen))
        for item in items:
            yield from iter_handles(item, seen)


_SCALARS = frozenset({int, float, str, bool, bytes, type(None)})


def direct_deps(handle: Handle[Any]) -> list[Handle[Any]]:
    """The distinct handles a call's arguments refer to, in order of first appearance."""
    encoding = handle.encoding
    if encoding is not None and encoding.blob is not None and not encoding.mutable:
        # Encoded when called with no handle in its arguments, and nothing in them can change
        # in place (the same promise that lets the key reuse this encoding): none now either.
        return []
    found: dict[str, Handle[Any]] = {}
    for values in (handle.args, handle.kwargs.values()):
        for arg in values:
            if type(arg) in _SCALARS:  # the common case: nothing to walk
                continue
            if type(arg) is Handle:
                found.setdefault(arg.node_id, arg)
                continue
            for dep in iter_handles(arg):
                found.setdefault(dep.node_id, dep)
    return list(found.values())


class Graph:
    """The nodes needed for some targets, with their edges, in dependency order."""

    def __init__(self, targets: Iterable[Handle[Any]]):
        self.nodes: dict[str, Handle[Any]] = {}
        self.deps: dict[str, list[str]] = {}
        self.dependents: dict[str, list[str]] = {}
        self.order: list[str] = []
        self._build(list(targets))

    def _build(self, targets: list[Handle[Any]]) -> None:
        # Iterative DFS (graphs of 10,000s of nodes must not hit the recursion limit).
        WHITE, GREY, BLACK = 0, 1, 2
        color: dict[str, int] = {}
        for target in targets:
            if color.get(target.node_id) == BLACK:
                continue
            deps = direct_deps(target)
            if not deps:  # a call with no inputs (most calls of wide graphs): nothing to walk
                self._add(target, deps)
                color[target.node_id] = BLACK
                self.order.append(target.node_id)
                continue
            stack: list[tuple[Handle[Any], Iterator[Handle[Any]]]] = []
            path: list[Handle[Any]] = []
            self._enter(target, color, stack, path, GREY, deps)
            while stack:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    path.pop()
                    color[node.node_id] = BLACK
                    self.order.append(node.node_id)
                    continue
                state = color.get(child.node_id, WHITE)
                if state == GREY:
                    start = next(i for i, h in enumerate(path) if h.node_id == child.node_id)
                    cycle = [h.label for h in path[start:]] + [child.label]
                    raise CycleError(cycle)
                if state == WHITE:
                    self._enter(child, color, stack, path, GREY)

    def _enter(self, node: Handle[Any], color: dict[str, int],
               stack: list[tuple[Handle[Any], Iterator[Handle[Any]]]],
               path: list[Handle[Any]], grey: int, deps: list[Handle[Any]] | None = None,
               ) -> None:
        if deps is None:
            deps = direct_deps(node)
        self._add(node, deps)
        color[node.node_id] = grey
        stack.append((node, iter(deps)))
        path.append(node)

    def _add(self, node: Handle[Any], deps: list[Handle[Any]]) -> None:
        node.deps = deps
        self.nodes[node.node_id] = node
        self.deps[node.node_id] = [d.node_id for d in deps]
        for dep in deps:  # (a node nothing depends on has no entry: read with .get)
            self.dependents.setdefault(dep.node_id, []).append(node.node_id)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def downstream(self, node_id: str) -> list[str]:
        """Every node that depends on ``node_id``, directly or not (breadth first)."""
        seen: dict[str, None] = {}
        frontier = list(self.dependents.get(node_id, []))
        while frontier:
            nxt = frontier.pop(0)
            if nxt not in seen:
                seen[nxt] = None
                frontier.extend(self.dependents.get(nxt, []))
        return list(seen)

    def depths(self) -> dict[str, int]:
        """Longest distance from a source, per node (the dashboard's columns)."""
        depth: dict[str, int] = {}
        for node_id in self.order:
            depth[node_id] = 1 + max((depth[d] for d in self.deps[node_id]), default=-1)
        return depth

    def critical_path(self, durations: dict[str, float], default: float = 1.0) -> dict[str, float]:
        """Per node: its expected duration plus the longest chain of work that waits on it.
        The scheduler runs the largest first (longest remaining critical path)."""
        remaining: dict[str, float] = {}
        for node_id in reversed(self.order):
            tail = max((remaining[d] for d in self.dependents.get(node_id, [])), default=0.0)
            remaining[node_id] = durations.get(node_id, default) + tail
        return remaining
