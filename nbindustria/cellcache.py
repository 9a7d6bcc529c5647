"""``%%cache``: a whole notebook cell as a cached computation.

A cell's **inputs** are the names it may read before it binds them, found from its syntax tree
(reads inside functions and lambdas it defines count where they are defined); its **outputs** are
the names it may bind or delete at top level. A name the cell binds only on some paths (in a
branch, a loop, a ``try``) is an input too: whether the cell binds it depends on what was there.

The key hashes ``["Cell", code, inputs, environment]``: the cell's normalized code (comments and
layout do not count), each input's value by content (functions and classes by their code and what
they reach, modules by version or source), and the Python version. Nothing is trusted by
identity: an input that was mutated in place since is hashed again, and an input the cell itself
mutates (``lst.append``, ``df.loc[...] = ``) is found by hashing it again afterwards and stored as
an output too.

On a hit, the outputs come back into the namespace (functions and classes the cell defines are
defined again from its code, so that they see the live namespace) and what the cell displayed
(stdout, stderr, rich outputs, plots) is shown again, in order, without running it.

A cell that cannot be cached safely (it runs magics or ``exec``, imports ``*``, reads ``_``, has an
input that cannot be hashed, or an output that cannot be stored) runs as a plain cell, and a
:class:`CellCacheWarning` says why.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
import socket
import sys
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .errors import HashingError, NbindustriaWarning, UnpicklableResultError
from .hashing import CodeHasher, Unhashable, encode_value, normalized_source_digest, summarize

CELL_FORMAT = 1


class CellCacheWarning(NbindustriaWarning):
    """A ``%%cache`` cell ran without its cache (and why), or an output could not be stored."""


# --------------------------------------------------------------------------------------------
# What a cell reads and binds (pure: a syntax tree in, names out)
# --------------------------------------------------------------------------------------------

_DYNAMIC_CALLS = {"exec": "exec()", "eval": "eval()", "globals": "globals()",
                  "locals": "locals()", "vars": "vars()", "__import__": "__import__()"}
_MAGIC_CALLS = {"run_line_magic", "run_cell_magic", "magic", "run_cell"}
# IPython's output history: reading it makes a cell depend on what ran before it.
_HISTORY = re.compile(r"^(_+|_\d+|_i+|_i\d+|_ih|_oh|_dh|In|Out)$")


@dataclass
class CellAnalysis:
    """What a cell's code may read and bind at top level."""

    reads: set[str] = field(default_factory=set)  # may be read before the cell binds them
    binds: set[str] = field(default_factory=set)  # may be bound or deleted at top level
    definite: set[str] = field(default_factory=set)  # bound on every path through the cell
    deletes: set[str] = field(default_factory=set)
    definitions: list[int] = field(default_factory=list)  # top-level def/class/lambda statements
    defined: set[str] = field(default_factory=set)  # names those statements bind
    modules: set[str] = field(default_factory=set)  # modules the cell imports
    imported: set[str] = field(default_factory=set)  # names import statements bind
    order: list[str] = field(default_factory=list)  # bound names, in order of first binding
    problems: list[str] = field(default_factory=list)  # why it cannot be cached safely

    @property
    def inputs(self) -> set[str]:
        """Names whose value before the cell can change what it does: what it reads, and what
        it binds only on some paths."""
        maybe = {n for n in self.binds - self.definite if not _HISTORY.match(n)}
        return self.reads | maybe

    @property
    def outputs(self) -> set[str]:
        return {n for n in self.binds if not _HISTORY.match(n)}


def analyze(source: str) -> CellAnalysis:
    """Inputs and outputs of a cell of plain Python (IPython syntax already transformed).

    Raises SyntaxError if the code does not parse.
    """
    tree = ast.parse(source)
    result = CellAnalysis()
    flow = _Flow(result)
    flow.block(tree.body, top=True)
    result.definite = set(flow.bound)
    for name in sorted(result.reads):
        if _HISTORY.match(name):
            result.problems.append(f"it reads IPython's output history ({name})")
    return result


def _target_names(target: ast.expr) -> Iterable[ast.expr]:
    """Name, Attribute and Subscript targets inside an assignment target (tuples unpacked)."""
    if isinstance(target, (ast.Tuple, ast.List)):
        for elt in target.elts:
            yield from _target_names(elt)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)
    else:
        yield target


class _Flow:
    """Walks top-level statements in order, keeping the names bound on every path so far."""

    def __init__(self, result: CellAnalysis):
        self.r = result
        self.bound: set[str] = set()

    # -- names ---------------------------------------------------------------------------------

    def read(self, name: str) -> None:
        if name not in self.bound:
            self.r.reads.add(name)

    def bind(self, name: str) -> None:
        if name not in self.r.binds:
            self.r.order.append(name)
        self.r.binds.add(name)
        self.bound.add(name)

    def bind_target(self, target: ast.expr) -> None:
        for node in _target_names(target):
            if isinstance(node, ast.Name):
                self.bind(node.id)
            else:  # obj.attr = ..., obj[i] = ...: reads obj (and the index)
                self.expr(node)

    # -- expressions ---------------------------------------------------------------------------

    def expr(self, node: ast.AST | None) -> None:
        if node is None:
            return
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                self.read(node.id)
            return
        if isinstance(node, ast.NamedExpr):
            self.expr(node.value)
            self.bind(node.target.id)
            return
        if isinstance(node, ast.Lambda):
            self._arguments(node.args)
            self._free(_Scope.of_lambda(node))
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            self.expr(node.generators[0].iter)  # evaluated in this scope
            scope = _Scope.of_comprehension(node)
            self._free(scope)
            for name in scope.walrus:  # `(y := ...)` in a comprehension binds out here
                self.r.binds.add(name)
            return
        if isinstance(node, ast.Call):
            self._check_call(node)
        for child in ast.iter_child_nodes(node):
            self.expr(child)

    def _check_call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _DYNAMIC_CALLS and not (
                func.id == "vars" and node.args):
            self.r.problems.append(f"it calls {_DYNAMIC_CALLS[func.id]}, which can read or "
                                   "bind names the code does not show")
        if (isinstance(func, ast.Attribute) and func.attr in _MAGIC_CALLS
                and isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name)
                and func.value.func.id == "get_ipython"):
            self.r.problems.append("it runs a magic, whose reads and writes are not visible "
                                   "in the code")

    def _arguments(self, args: ast.arguments) -> None:
        for default in [*args.defaults, *args.kw_defaults]:
            self.expr(default)

    def _free(self, scope: _Scope) -> None:
        for name in sorted(scope.free):
            self.read(name)
        for name in scope.global_binds:
            self.r.binds.add(name)
        for problem in scope.problems:
            self.r.problems.append(problem)

    # -- statements ----------------------------------------------------------------------------

    def block(self, body: list[ast.stmt], top: bool = False) -> None:
        for index, stmt in enumerate(body):
            self.stmt(stmt)
            if top and _is_definition(stmt):
                self.r.definitions.append(index)
                self.r.defined |= _defined_names(stmt)

    def branch(self, body: list[ast.stmt]) -> set[str]:
        """Walk a block that may not run (or not to its end); returns what it would bind."""
        saved = set(self.bound)
        self.block(body)
        after = self.bound
        self.bound = saved
        return after

    def stmt(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Assign):
            self.expr(node.value)
            for target in node.targets:
                self.bind_target(target)
        elif isinstance(node, ast.AugAssign):
            if isinstance(node.target, ast.Name):
                self.read(node.target.id)
            self.expr(node.value)
            self.bind_target(node.target)
        elif isinstance(node, ast.AnnAssign):
            self.expr(node.annotation)
            if node.value is not None:
                self.expr(node.value)
                self.bind_target(node.target)
            elif not isinstance(node.target, ast.Name):
                self.expr(node.target)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.expr(node.iter)
            saved = set(self.bound)
            self.bind_target(node.target)
            self.block(node.body)
            self.block(node.orelse)
            self.bound = saved  # the loop may run zero times
        elif isinstance(node, ast.While):
            self.expr(node.test)
            self.branch(node.body)
            self.branch(node.orelse)
        elif isinstance(node, ast.If):
            self.expr(node.test)
            then = self.branch(node.body)
            other = self.branch(node.orelse)
            self.bound |= then & other
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                self.expr(item.context_expr)
                if item.optional_vars is not None:
                    self.bind_target(item.optional_vars)
            saved = set(self.bound)
            self.block(node.body)
            self.bound = saved  # a context manager may swallow an exception half-way
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            self.branch(node.body)  # type: ignore[attr-defined]
            for handler in node.handlers:  # type: ignore[attr-defined]
                self.expr(handler.type)
                saved = set(self.bound)
                if handler.name:
                    self.bind(handler.name)  # and deleted again at the end of the handler
                    self.r.deletes.add(handler.name)
                self.block(handler.body)
                self.bound = saved
            self.branch(node.orelse)  # type: ignore[attr-defined]
            self.block(node.finalbody)  # type: ignore[attr-defined]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                self.expr(decorator)
            self._arguments(node.args)
            self._annotations(node)
            self._free(_Scope.of_function(node))
            self.bind(node.name)
        elif isinstance(node, ast.ClassDef):
            for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
                self.expr(expr)
            self._free(_Scope.of_class(node))
            self.bind(node.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                self.r.modules.add(alias.name)
                self.bind(alias.asname or alias.name.partition(".")[0])
                self.r.imported.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                self.r.problems.append("it uses a relative import")
            if node.module:
                self.r.modules.add(node.module)
            for alias in node.names:
                if alias.name == "*":
                    self.r.problems.append(f"`from {node.module} import *` binds names the "
                                           "code does not show")
                else:
                    self.bind(alias.asname or alias.name)
                    self.r.imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                for sub in _target_names(target):
                    if isinstance(sub, ast.Name):
                        self.read(sub.id)  # `del x` needs x: whether it exists matters
                        self.r.binds.add(sub.id)
                        self.r.deletes.add(sub.id)
                        self.bound.discard(sub.id)
                    else:
                        self.expr(sub)
        elif isinstance(node, ast.Match):
            self.expr(node.subject)
            for case in node.cases:
                saved = set(self.bound)
                for pattern in ast.walk(case.pattern):
                    name = getattr(pattern, "name", None) or getattr(pattern, "rest", None)
                    if isinstance(name, str):
                        self.bind(name)
                    if isinstance(pattern, ast.MatchValue):
                        self.expr(pattern.value)
                    elif isinstance(pattern, ast.MatchClass):
                        self.expr(pattern.cls)
                self.expr(case.guard)
                self.block(case.body)
                self.bound = saved
        else:  # Expr, Return, Raise, Assert, Pass, Break, Continue, Global, Nonlocal
            for child in ast.iter_child_nodes(node):  # (Global and Nonlocal have none)
                self.expr(child)

    def _annotations(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None:
                self.expr(arg.annotation)
        self.expr(node.returns)


def _is_definition(stmt: ast.stmt) -> bool:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    return (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Lambda)
            and all(isinstance(t, ast.Name) for t in stmt.targets))


def _defined_names(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.Assign):
        return {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    return {stmt.name}  # type: ignore[attr-defined]


@dataclass
class _Scope:
    """A nested scope (function, lambda, class body, comprehension): the names it reads from
    outside (free), the module names it binds through ``global``, and walrus targets that bind
    in the enclosing scope (comprehensions)."""

    free: set[str] = field(default_factory=set)
    global_binds: set[str] = field(default_factory=set)
    walrus: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of_function(cls, node: ast.FunctionDef | ast.AsyncFunctionDef) -> _Scope:
        return cls._analyze(_params(node.args), node.body)

    @classmethod
    def of_lambda(cls, node: ast.Lambda) -> _Scope:
        return cls._analyze(_params(node.args), [ast.Expr(node.body)])

    @classmethod
    def of_class(cls, node: ast.ClassDef) -> _Scope:
        # Methods do not see the class body's names: theirs resolve to the module.
        return cls._analyze(set(), node.body, see_through=True)

    @classmethod
    def of_comprehension(cls, node: ast.expr) -> _Scope:
        gens: list[ast.comprehension] = node.generators  # type: ignore[attr-defined]
        local: set[str] = set()
        parts: list[ast.AST] = []
        for i, gen in enumerate(gens):
            local |= {n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
            if i:
                parts.append(gen.iter)
            parts.extend(gen.ifs)
        if isinstance(node, ast.DictComp):
            parts += [node.key, node.value]
        else:
            parts.append(node.elt)  # type: ignore[attr-defined]
        scope = cls._analyze(local, [ast.Expr(p) for p in parts])  # type: ignore[arg-type]
        walrus = {n.target.id for p in parts for n in ast.walk(p) if isinstance(n, ast.NamedExpr)}
        scope.walrus = walrus
        scope.free -= walrus
        return scope

    @classmethod
    def _analyze(cls, params: set[str], body: list[ast.stmt],
                 see_through: bool = False) -> _Scope:
        scope = cls()
        declared_global: set[str] = set()
        local = set(params)
        loads: set[str] = set()
        nested: list[_Scope] = []

        def visit(node: ast.AST) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                local.add(node.name)
                decos: list[ast.expr | None] = [*node.decorator_list]
                if isinstance(node, ast.ClassDef):
                    decos += [*node.bases, *(k.value for k in node.keywords)]
                    nested.append(_Scope.of_class(node))
                else:
                    decos += [*node.args.defaults, *node.args.kw_defaults]
                    nested.append(_Scope.of_function(node))
                for d in decos:
                    if d is not None:
                        visit(d)
                return
            if isinstance(node, ast.Lambda):
                for d in [*node.args.defaults, *node.args.kw_defaults]:
                    if d is not None:
                        visit(d)
                nested.append(_Scope.of_lambda(node))
                return
            if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
                visit(node.generators[0].iter)
                inner = _Scope.of_comprehension(node)
                local.update(inner.walrus)
                nested.append(inner)
                return
            if isinstance(node, (ast.Global, ast.Nonlocal)):
                if isinstance(node, ast.Global):
                    declared_global.update(node.names)
                return
            if isinstance(node, ast.Name):
                (loads if isinstance(node.ctx, ast.Load) else local).add(node.id)
                return
            if isinstance(node, ast.NamedExpr):
                local.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if alias.name != "*":
                        local.add(alias.asname or alias.name.partition(".")[0])
            elif isinstance(node, ast.ExceptHandler) and node.name:
                local.add(node.name)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("exec", "eval", "globals"):
                scope.problems.append(f"a function it defines calls {node.func.id}()")
            elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
                local.add(node.name)
            elif isinstance(node, ast.MatchMapping) and node.rest:
                local.add(node.rest)
            for child in ast.iter_child_nodes(node):
                visit(child)

        for stmt in body:
            visit(stmt)
        local -= declared_global
        scope.global_binds = declared_global
        free = loads - local
        for inner in nested:
            free |= inner.free if see_through else inner.free - local
            scope.global_binds |= inner.global_binds
            scope.problems += inner.problems
        scope.free = free | declared_global  # a global it assigns may also be read first
        return scope


def _params(args: ast.arguments) -> set[str]:
    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
    return names


# --------------------------------------------------------------------------------------------
# Tokens of inputs
# --------------------------------------------------------------------------------------------


class _NoToken(Exception):
    def __init__(self, name: str, why: str):
        self.name = name
        self.why = why


def _on_handle(obj: Any) -> bytes | None:
    from .task import Handle

    if not isinstance(obj, Handle):
        return None
    if obj.done and obj.key and obj.digest:
        return f"{obj.key}:{obj.digest}".encode()
    raise Unhashable(obj.label, "a task handle whose result is not ready (run it first)")


def input_token(name: str, value: Any, code: CodeHasher) -> tuple[str, bool]:
    """(token, may change in place) of one input's value."""
    from .task import Task

    try:
        if isinstance(value, Task):
            return "task:" + code.info(value.func, name).digest, False
        if isinstance(value, types.ModuleType):
            return "module:" + code.token_of(value, name), False
        enc = encode_value(value, name, on_handle=_on_handle, code=code)
    except (HashingError, TypeError, ValueError, RecursionError) as exc:
        why = exc.why if isinstance(exc, Unhashable) else str(exc)
        raise _NoToken(name, why) from None
    return xxhash.xxh3_128_hexdigest(bytes(enc.buf)), enc.mutable


def module_token(name: str, code: CodeHasher) -> str:
    """A module a cell imports: its version, or its source if it is the user's own."""
    module = sys.modules.get(name)
    if module is not None:
        return code.token_of(module, name)
    import importlib.util

    from .hashing import library_version

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "missing"
    version = library_version(name)
    if version is not None:
        return version
    origin = spec.origin
    if origin and origin.endswith(".py"):
        try:
            with open(origin, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            return "unreadable:" + origin
        return normalized_source_digest(text) or xxhash.xxh3_128_hexdigest(text.encode())
    return f"origin:{origin}"


def _is_code(value: Any) -> bool:
    from .task import Task

    return isinstance(value, (types.FunctionType, type, Task, types.ModuleType))


# --------------------------------------------------------------------------------------------
# Recording what a cell shows
# --------------------------------------------------------------------------------------------

_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class _Tee:
    """Writes to a stream and records what was written."""

    def __init__(self, stream: Any, name: str, items: list[tuple[Any, ...]]):
        self._stream = stream
        self._name = name
        self._items = items

    def write(self, text: str) -> int:
        if text:
            if self._items and self._items[-1][:2] == ("stream", self._name):
                self._items[-1] = ("stream", self._name, self._items[-1][2] + text)
            else:
                self._items.append(("stream", self._name, text))
        return int(self._stream.write(text) or 0)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._stream, attr)


class OutputRecorder:
    """Shows what a cell outputs as usual, and records it (streams and rich displays, in order)
    so that a cache hit can show it again."""

    def __init__(self, shell: Any):
        self.shell = shell
        self.items: list[tuple[Any, ...]] = []

    def __enter__(self) -> OutputRecorder:
        self._streams = sys.stdout, sys.stderr
        sys.stdout = _Tee(sys.stdout, "stdout", self.items)
        sys.stderr = _Tee(sys.stderr, "stderr", self.items)
        pub = self.shell.display_pub
        original = pub.publish
        items = self.items

        def publish(data: Any = None, metadata: Any = None, *args: Any, **kwargs: Any) -> Any:
            transient = kwargs.get("transient") or {}
            if kwargs.get("update"):
                shown_id = transient.get("display_id")
                for i, item in enumerate(items):  # keep the last state of an updated display
                    if item[0] == "display" and item[3] == shown_id:
                        items[i] = ("display", data, metadata or {}, shown_id)
            else:
                items.append(("display", data, metadata or {}, transient.get("display_id")))
            return original(data, metadata, *args, **kwargs)

        pub.publish = publish
        self._pub = pub
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._streams
        self._pub.__dict__.pop("publish", None)

    def add_result(self, value: Any) -> None:
        """The value of the cell's last expression (shown as Out[n]), as a rich display."""
        data, metadata = self.shell.display_formatter.format(value)
        if data:
            self.items.append(("display", data, metadata or {}, None))

    def records(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for item in self.items:
            if item[0] == "display":
                data = dict(item[1] or {})
                if _WIDGET_MIME in data and len(data) > 1:
                    del data[_WIDGET_MIME]  # the widget's model is gone; its text stays
                out.append(("display", data, dict(item[2] or {})))
            else:
                out.append(item[:3])
        return out


def replay(records: Iterable[tuple[Any, ...]]) -> None:
    """Show recorded outputs again."""
    from IPython.display import publish_display_data

    for record in records:
        if record[0] == "stream":
            stream = sys.stderr if record[1] == "stderr" else sys.stdout
            stream.write(record[2])
            stream.flush()
        elif record[0] == "display":
            publish_display_data(data=record[1], metadata=record[2])


# --------------------------------------------------------------------------------------------
# The cells of a notebook
# --------------------------------------------------------------------------------------------


@dataclass
class CellRecord:
    """A cached cell as the notebook's graph shows it."""

    name: str
    source: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)  # labels of cells and tasks it reads
    state: str = ""  # "cached" (a hit), "ran", "uncached" (ran without the cache), "failed"
    key: str = ""
    reason: str = ""
    node: str = ""


class _Origin:
    """Which cells or task calls produced the value a name holds (weakly, where the type
    allows: the graph must not keep old values alive)."""

    __slots__ = ("ident", "labels", "ref", "type")

    def __init__(self, labels: tuple[str, ...], value: Any):
        self.labels = labels
        self.ident = id(value)
        self.type = type(value)
        try:
            self.ref: Callable[[], Any] | None = weakref.ref(value)
        except TypeError:
            self.ref = None

    def holds(self, value: Any) -> bool:
        if self.ref is not None:
            return self.ref() is value
        return id(value) == self.ident and type(value) is self.type


def cell_node(name: str) -> str:
    return xxhash.xxh3_128_hexdigest(b"CellNode\0" + name.encode())


def _python_env() -> str:
    return f"python-{sys.version_info.major}.{sys.version_info.minor}"


class Cells:
    """Runs ``%%cache`` cells against a store and keeps the graph of cells."""

    def __init__(self, shell: Any, store: Callable[[], Any]):
        self.shell = shell
        self._store = store
        self.records: dict[str, CellRecord] = {}
        self.origins: dict[str, _Origin] = {}
        self.verbose = 1

    # ---- where values came from ----------------------------------------------------------------

    def note_origin(self, name: str, labels: str | Iterable[str], value: Any) -> None:
        """``name`` now holds ``value``, made by ``labels`` (a cell, or task calls)."""
        found = (labels,) if isinstance(labels, str) else tuple(dict.fromkeys(labels))
        self.origins[name] = _Origin(found, value)

    def origin_of(self, name: str, value: Any) -> tuple[str, ...]:
        origin = self.origins.get(name)
        return origin.labels if origin is not None and origin.holds(value) else ()

    def origins_by_identity(self) -> dict[int, tuple[str, ...]]:
        """id(value) -> producers, for values still held by the names they were bound to."""
        ns = self.shell.user_ns
        return {id(ns[n]): o.labels for n, o in self.origins.items()
                if n in ns and o.holds(ns[n])}

    # ---- the key ---------------------------------------------------------------------------------

    def _ns_inputs(self, analysis: CellAnalysis) -> tuple[dict[str, Any], list[str]]:
        """The inputs present in the namespace, and those absent (neither there nor builtin)."""
        ns = self.shell.user_ns
        hidden = getattr(self.shell, "user_ns_hidden", {})
        present: dict[str, Any] = {}
        absent: list[str] = []
        for name in sorted(analysis.inputs):
            if name in ns:
                value = ns[name]
                if name in hidden and hidden[name] is value:
                    continue  # IPython's own names (get_ipython, exit, ...)
                present[name] = value
            elif not hasattr(builtins, name):
                absent.append(name)
        return present, absent

    def compute_key(self, source: str, analysis: CellAnalysis, name: str,
                    ) -> tuple[str, dict[str, Any]]:
        """The cell's key and what went into it (for the index and ``why``). Raises _NoToken."""
        code = CodeHasher()
        cell_digest = normalized_source_digest(source) or xxhash.xxh3_128_hexdigest(
            source.encode())
        present, absent = self._ns_inputs(analysis)
        code_parts: list[str] = [cell_digest]
        manifest: dict[str, Any] = {f"cell {name}": {"kind": "function", "digest": cell_digest,
                                                     "source": source}}
        data: dict[str, str] = {}
        mutable: dict[str, bool] = {}
        summaries: dict[str, str] = {}
        for input_name, value in present.items():
            token, changes = input_token(input_name, value, code)
            if _is_code(value):
                code_parts.append(f"{input_name}={token}")
                from .task import Task

                func = value.func if isinstance(value, Task) else value
                if isinstance(func, (types.FunctionType, type)):
                    manifest.update(code.info(func, input_name).manifest)
            else:
                data[input_name] = token
                mutable[input_name] = changes
                summaries[input_name] = summarize(value)
        for input_name in absent:
            data[input_name] = "absent"
            summaries[input_name] = "(not defined)"
        for module in sorted(analysis.modules):
            code_parts.append(f"import {module}={module_token(module, code)}")
        code_digest = xxhash.xxh3_128_hexdigest("\n".join(code_parts).encode())
        h = xxhash.xxh3_128(f"Cell\0{CELL_FORMAT}\0{code_digest}\0{_python_env()}\0".encode())
        for input_name in sorted(data):
            h.update(f"{input_name}={data[input_name]};".encode())
        info = {"code_digest": code_digest, "manifest": manifest, "arg_digests": data,
                "args": summaries, "mutable": mutable, "present": present}
        return h.hexdigest(), info

    # ---- running a cell ------------------------------------------------------------------------

    def run(self, raw_cell: str, name: str | None = None) -> bool:
        """Run a ``%%cache`` cell: restore it on a hit, else run it and store it. Returns
        False if the cell's own code raised."""
        shell = self.shell
        source = shell.transform_cell(raw_cell)
        try:
            analysis = analyze(source)
        except SyntaxError:
            return bool(shell.run_cell(raw_cell, store_history=False).success)
        name = name or _default_name(analysis, source)
        record = self.records.setdefault(name, CellRecord(name))
        record.source = source
        record.node = cell_node(name)
        record.outputs = sorted(analysis.outputs)
        record.inputs = sorted(analysis.inputs)
        if analysis.problems:
            return self._run_uncached(raw_cell, record, analysis.problems[0])
        try:
            key, info = self.compute_key(source, analysis, name)
        except _NoToken as exc:
            return self._run_uncached(raw_cell, record,
                                      f"its input {exc.name!r} cannot be hashed: {exc.why}")
        record.key = key
        label = f"%%cache {name}"
        record.upstream = sorted({o for n, v in info["present"].items()
                                  for o in self.origin_of(n, v) if o != label})
        store = self._store()
        if store.present([key]):
            ok, payload = store.try_load(key, f"%%cache {name}")
            if ok and isinstance(payload, dict) and payload.get("format") == CELL_FORMAT:
                self._restore(payload, source, analysis, record, store, key)
                return True
        return self._run_and_store(raw_cell, source, analysis, record, key, info, store)

    def _run_uncached(self, raw_cell: str, record: CellRecord, why: str) -> bool:
        _warn(record.name, f"{why}; the cell runs without its cache")
        record.state = "uncached"
        record.reason = why
        result = self.shell.run_cell(raw_cell, store_history=False)
        return bool(result.success)

    def _restore(self, payload: dict[str, Any], source: str, analysis: CellAnalysis,
                 record: CellRecord, store: Any, key: str) -> None:
        ns = self.shell.user_ns
        ns.update(payload["values"])
        for gone in payload["deleted"]:
            ns.pop(gone, None)
        if payload["defs"]:
            self._define_again(source, analysis)
        replay(payload["outputs"])
        for out_name in [*payload["values"], *payload["defs"]]:
            if out_name in ns:
                self.note_origin(out_name, f"%%cache {record.name}", ns[out_name])
        record.state = "cached"
        record.reason = "cache hit"
        if self.verbose:
            row = store.index.get_many([key]).get(key)
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.created)) if row else "?"
            took = f"{row.duration:.2f} s" if row and row.duration is not None else "?"
            restored = ", ".join(sorted([*payload["values"], *payload["defs"]])) or "nothing"
            print(f"[Cache hit!] %%cache {record.name}: restored {restored} "
                  f"(ran {when}, took {took})")

    def _define_again(self, source: str, analysis: CellAnalysis) -> None:
        """Run the cell's def/class statements again, under the cell's code registered like any
        cell, so that the functions see the live namespace and inspect.getsource works."""
        tree = ast.parse(source)
        module = ast.Module(body=[tree.body[i] for i in analysis.definitions], type_ignores=[])
        filename = self.shell.compile.cache(source)
        exec(compile(module, filename, "exec"), self.shell.user_ns)  # the user's own cell, again

    def _run_and_store(self, raw_cell: str, source: str, analysis: CellAnalysis,
                       record: CellRecord, key: str, info: dict[str, Any], store: Any) -> bool:
        shell = self.shell
        ns = shell.user_ns
        before = dict(ns)
        started = time.time()
        t0 = time.perf_counter()
        with OutputRecorder(shell) as recorder:
            result = shell.run_cell(raw_cell, store_history=False)
        duration = time.perf_counter() - t0
        if not result.success:
            record.state = "failed"
            record.reason = "the cell raised"
            return False
        if result.result is not None:
            recorder.add_result(result.result)
        values: dict[str, Any] = {}
        deleted: list[str] = []
        defs: list[str] = []
        for out_name in sorted(analysis.outputs):
            if out_name not in ns:
                if out_name in before or out_name in analysis.deletes:
                    deleted.append(out_name)
                continue
            value = ns[out_name]
            if out_name in analysis.defined and _defined_here(value):
                defs.append(out_name)
            else:
                values[out_name] = value
        # Inputs the cell changed in place are outputs too (their state after the cell).
        code = CodeHasher()
        for in_name, value in info["present"].items():
            if (info["mutable"].get(in_name) and in_name not in values and ns.get(in_name)
                    is value):
                try:
                    token, _ = input_token(in_name, value, code)
                except _NoToken:
                    token = ""
                if token != info["arg_digests"].get(in_name):
                    values[in_name] = value
        payload = {"format": CELL_FORMAT, "values": values, "deleted": deleted, "defs": defs,
                   "outputs": recorder.records()}
        label = f"%%cache {record.name}"
        for out_name in [*values, *defs]:
            self.note_origin(out_name, label, ns[out_name])
        reason = _miss_reason(store, record.node, info)
        stored = self._store_payload(store, key, payload, record, info, duration, started)
        record.state = "ran"
        record.reason = reason if stored else f"{reason} (not stored)"
        if self.verbose and stored:
            shown = ", ".join(sorted([*values, *defs])) or "nothing"
            print(f"[Cached] %%cache {record.name}: stored {shown} ({duration:.2f} s; {reason})")
        return True

    def _store_payload(self, store: Any, key: str, payload: dict[str, Any], record: CellRecord,
                       info: dict[str, Any], duration: float, started: float) -> bool:
        from .store import IndexRow, find_unpicklable, stage_value

        label = f"%%cache {record.name}"
        meta = {"node": record.node, "task": f"cell:{record.name}", "label": label,
                "code_digest": info["code_digest"], "args": info["args"],
                "arg_digests": info["arg_digests"], "upstream": {}, "env": _python_env(),
                "duration": duration, "created": started, "engine": "kernel"}
        try:
            staged = stage_value(store.tmp_dir, key, payload, meta, label=label)
        except UnpicklableResultError:
            bad = [n for n, v in payload["values"].items() if find_unpicklable(v, n)]
            names = ", ".join(repr(n) for n in bad) or "its displayed output"
            _warn(record.name, f"{names} cannot be stored (not picklable), so this cell is "
                  "not cached and runs every time; keep such objects out of cached cells")
            return False
        row = IndexRow(
            key=key, node=record.node, task=f"cell:{record.name}", label=label,
            kind=str(staged.header["kind"]), size=staged.size,
            result_digest=staged.result_digest, header_digest="", created=started,
            duration=duration, cpu=None, peak_memory=None, engine="kernel",
            host=socket.gethostname(), hits=0, code_digest=info["code_digest"],
            args=json.dumps(info["args"]), arg_digests=json.dumps(info["arg_digests"]),
            upstream=json.dumps({}))
        store.index.put_code(info["code_digest"], info["manifest"])
        store.commit([staged], [row])
        return True

    # ---- why --------------------------------------------------------------------------------

    def why(self, name: str) -> Any:
        """Why the cell would run now (or is a hit), from the namespace as it is now."""
        from .explain import Explanation, explain

        record = self.records[name]
        if not record.source:
            return Explanation(f"%%cache {name}", record.state or "unknown", [record.reason])
        analysis = analyze(record.source)
        if analysis.problems:
            return Explanation(f"%%cache {name}", "runs without its cache", analysis.problems)
        try:
            key, info = self.compute_key(record.source, analysis, name)
        except _NoToken as exc:
            return Explanation(f"%%cache {name}", "runs without its cache",
                               [f"its input {exc.name!r} cannot be hashed: {exc.why}"])
        return explain(self._store(), label=f"%%cache {name}", task=f"cell:{name}",
                       node_id=record.node, key=key, code_digest=info["code_digest"],
                       manifest=info["manifest"], arg_digests=info["arg_digests"],
                       arg_summaries=info["args"], upstream_params=set(), env=_python_env(),
                       forced=False, last_reason=record.reason,
                       state="done" if record.state == "ran" else "cached")


def _miss_reason(store: Any, node: str, info: dict[str, Any]) -> str:
    """Why a cell ran: compared with the last stored run of the same cell."""
    rows = store.index.query("node = ?", (node,), limit=1)
    if not rows:
        return "first run"
    previous = rows[0]
    if previous.code_digest != info["code_digest"]:
        return "its code, or code it calls, changed"
    old = json.loads(previous.arg_digests or "{}")
    new = info["arg_digests"]
    changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
    return f"input changed: {', '.join(changed)}" if changed else "its stored result was gone"


def _defined_here(value: Any) -> bool:
    """A function or class defined in the notebook (re-defined from the cell on a hit)."""
    from .task import Task

    if isinstance(value, Task):
        value = value.func
    return isinstance(value, (types.FunctionType, type)) and \
        getattr(value, "__module__", None) == "__main__"


def _default_name(analysis: CellAnalysis, source: str) -> str:
    """The first two values the cell makes (not imports or definitions), e.g. ``data,stats``."""
    outputs = analysis.outputs
    ordered = [n for n in analysis.order if n in outputs and n not in analysis.deletes]
    values = [n for n in ordered if n not in analysis.imported and n not in analysis.defined]
    names = values or ordered
    if names:
        return ",".join(names[:2]) + (",..." if len(names) > 2 else "")
    return "cell-" + xxhash.xxh3_64_hexdigest(source.encode())[:8]


def _warn(name: str, message: str) -> None:
    """A CellCacheWarning that names the cell (not a line inside nbindustria)."""
    warnings.warn_explicit(f"%%cache {name}: {message}", CellCacheWarning,
                           filename=f"<%%cache {name}>", lineno=1)
