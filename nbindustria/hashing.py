"""Deterministic tokens for values, and digests of the code a task reaches.

A value's token is a typed, canonical byte encoding fed to xxh3-128: ``1``, ``1.0``, ``True`` and
``"1"`` differ; a list and a tuple differ; ``0.0`` and ``-0.0`` differ; sets do not depend on their
iteration order; arrays are hashed by dtype, shape and bytes (large buffers straight from memory,
never copied). Nothing here depends on ``PYTHONHASHSEED`` or on object ids. A value that has no
deterministic content (a lock, a generator, an open file) raises :class:`HashingError` with the
path to it; there is never a random fallback, since a random token is a silent miss forever.

Code digests hash a function's normalized syntax tree (comments, layout and docstrings removed)
plus, transitively, what it reaches: user functions and classes (by code), global and closure
values (by content) and installed libraries (by distribution version).
"""

from __future__ import annotations

import ast
import builtins
import dis
import functools
import importlib.metadata
import inspect
import io
import os
import struct
import sys
import sysconfig
import textwrap
import threading
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .errors import HashingError

#: Bump only with a migration note: changing the encoding changes every user's keys.
ENCODING_VERSION = 1

# Buffers larger than this are hashed on their own and their digest is encoded, so that a 100 MB
# array is read once, straight from its memory, and never copied into the encoding.
_INLINE_BUFFER_LIMIT = 4096

# Buffers of at least two chunks are hashed as a tree: each fixed-size chunk on its own, in
# parallel threads (xxhash releases the GIL), then the chunks' digests. The chunk size is part of
# the encoding (keys must not depend on how many cores hashed them); changing it changes keys.
_TREE_CHUNK = 8 << 20
_TREE_MIN = 2 * _TREE_CHUNK

_pack_len = struct.Struct("<Q").pack
_pack_double = struct.Struct("<d").pack


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """The hex xxh3-128 digest of a buffer."""
    return xxhash.xxh3_128_hexdigest(data)


class Unhashable(HashingError):
    """Raised inside the encoder; re-raised by callers with the full path filled in."""

    def __init__(self, path: str, why: str):
        self.path = path
        self.why = why
        super().__init__(f"{path}: {why}")


# --------------------------------------------------------------------------------------------
# Value encoding
# --------------------------------------------------------------------------------------------

Encoder = Callable[["ValueEncoder", Any, str], None]
_ENCODERS: dict[type, Encoder] = {}
_LAZY: dict[str, Callable[[], None]] = {}
_lazy_done: set[str] = set()


def register(*types_: type) -> Callable[[Encoder], Encoder]:
    """Register an encoder for exact types (subclasses fall back to the generic path)."""

    def decorate(func: Encoder) -> Encoder:
        for tp in types_:
            _ENCODERS[tp] = func
        return func

    return decorate


def register_lazy(toplevel: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register encoders for a heavy library only once a value from it is seen."""

    def decorate(func: Callable[[], None]) -> Callable[[], None]:
        _LAZY[toplevel] = func
        return func

    return decorate


# Types whose instances have no content we could hash: they name a resource, not a value.
_NEVER_HASHABLE: tuple[type, ...] = (
    types.GeneratorType,
    types.CoroutineType,
    types.AsyncGeneratorType,
    types.FrameType,
    types.TracebackType,
    io.IOBase,
)


# Values that are never a task's result by identity: encoded without asking on_handle.
_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, range, slice,
                      type(Ellipsis)})


class ValueEncoder:
    """Encodes values into ``self.buf``; handles become placeholders resolved by the caller.

    ``on_handle(obj) -> bytes | None`` lets the key builder replace task handles (and values whose
    provenance is known) by a token; ``identify(obj) -> bytes | None`` names the same objects
    without side effects (by their call, not their position), so that the elements of a set can
    be put in an order that does not depend on iteration before ``on_handle`` numbers them;
    ``mutable`` tells whether anything encoded could change in place later (then the encoding
    must be recomputed before it is trusted again).
    """

    __slots__ = ("_active", "buf", "code", "identify", "mutable", "on_handle")

    def __init__(self, on_handle: Callable[[Any], bytes | None] | None = None,
                 code: CodeHasher | None = None,
                 identify: Callable[[Any], bytes | None] | None = None):
        self.buf = bytearray()
        self.on_handle = on_handle
        self.identify = identify
        self.mutable = False
        self.code = code
        # Containers being encoded (id -> depth): a back-reference is encoded by the depth of
        # the container it points to, so that cycles through different ancestors differ.
        self._active: dict[int, int] = {}

    # The dispatcher: exact type first (fast), then lazy registration, then the generic path.
    # Values that may stand for a result (a handle, an array a task returned) are offered to
    # ``on_handle`` before any encoder sees them; plain scalars never are.
    def encode(self, value: Any, path: str) -> None:
        tp = type(value)
        encoder = _ENCODERS.get(tp)
        if encoder is not None and (self.on_handle is None or tp in _SCALARS):
            encoder(self, value, path)
            return
        if self.on_handle is not None:
            token = self.on_handle(value)
            if token is not None:
                self.buf += b"H"
                self.buf += token
                return
            if encoder is not None:
                encoder(self, value, path)
                return
        toplevel = tp.__module__.partition(".")[0]
        if toplevel in _LAZY and toplevel not in _lazy_done:
            _lazy_done.add(toplevel)
            _LAZY[toplevel]()
            encoder = _ENCODERS.get(tp)
            if encoder is not None:
                encoder(self, value, path)
                return
        self._encode_generic(value, path)

    def _enter(self, value: Any, path: str) -> bool:
        """Guard against self-referencing containers; returns False on a back-reference."""
        ident = id(value)
        depth = self._active.get(ident)
        if depth is not None:
            self.buf += b"R" + _pack_len(depth)  # a reference cycle: which ancestor, by depth
            return False
        self._active[ident] = len(self._active)
        return True

    def _leave(self, value: Any) -> None:
        self._active.pop(id(value), None)

    def _sub(self, on_handle: Callable[[Any], bytes | None] | None) -> ValueEncoder:
        """An encoder for one element of an unordered container, inside this one."""
        sub = ValueEncoder(on_handle, self._code(), self.identify)
        sub._active = dict(self._active)
        return sub

    def _code(self) -> CodeHasher:
        # One code hasher per encoding: functions are hashed once, and a function reached
        # again through a value it reads (a registry dict of functions) is seen as recursion.
        if self.code is None:
            self.code = CodeHasher()
        return self.code

    def _encode_generic(self, value: Any, path: str) -> None:
        hook = getattr(value, "__nbindustria_token__", None)
        if hook is not None and not isinstance(value, type):
            self.buf += b"U"
            self.encode(_qualname(type(value)), path)
            self.encode(hook(), f"{path}.__nbindustria_token__()")
            return
        if isinstance(value, _NEVER_HASHABLE):
            raise Unhashable(path, f"{type(value).__name__} objects have no deterministic content")
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type,
                              types.MethodType, types.ModuleType, functools.partial)) or \
                _wrapped_function(value) is not None:
            self._encode_code_object(value, path)
            return
        # Subclasses of builtin containers and scalars: their type, then their builtin content.
        for base in (int, float, str, bytes, tuple, list, dict, set, frozenset):
            if isinstance(value, base):
                self.mutable = True
                self.buf += b"X"
                self._encode_class(type(value), path)
                builtin: Any = base  # the builtin type's constructor: its plain content
                _ENCODERS[base](self, builtin(value), path)
                state = getattr(value, "__dict__", None)
                if state:
                    self.encode(state, f"{path}.__dict__")
                return
        self._encode_object(value, path)

    def _encode_code_object(self, value: Any, path: str) -> None:
        self.buf += b"C"
        self.encode(self._code().token_of(value, path), path)

    def _encode_class(self, cls: type, path: str) -> None:
        self.encode(self._code().token_of(cls, path), path)

    def _encode_object(self, value: Any, path: str) -> None:
        """User objects: their class's code, then their state as pickle would see it."""
        self.mutable = True
        if not self._enter(value, path):
            return
        try:
            reduced = value.__reduce_ex__(5)
        except Exception as exc:  # any failure here means "no deterministic content"
            raise Unhashable(path, f"{type(value).__qualname__} objects cannot be hashed "
                                   f"({type(exc).__name__}: {exc})") from None
        if isinstance(reduced, str):  # a global singleton, named by pickle
            self.buf += b"g"
            self.encode(f"{type(value).__module__}.{reduced}", path)
            self._leave(value)
            return
        self.buf += b"O"
        self._encode_class(type(value), path)
        parts = list(reduced) + [None] * (6 - len(reduced))
        constructor_args, state, listitems, dictitems = parts[1], parts[2], parts[3], parts[4]
        # copyreg's default constructor args name the class again: the class is already encoded.
        if parts[0] is not _copyreg_reconstructor():
            self.encode(parts[0], f"{path}.__reduce__()[0]")
            self.encode(constructor_args, f"{path}.__reduce__()[1]")
        if isinstance(state, dict):
            self._encode_state(state, path)
        elif isinstance(state, tuple) and len(state) == 2 and all(
                s is None or isinstance(s, dict) for s in state):
            for part in state:  # (__dict__, __slots__ state)
                self._encode_state(part or {}, path)
        else:
            self.encode(state, f"{path}.__getstate__()")
        if listitems is not None:
            self.encode(list(listitems), f"{path}[:]")
        if dictitems is not None:
            self.encode(dict(dictitems), f"{path}.items()")
        self._leave(value)

    def _encode_state(self, state: dict[Any, Any], path: str) -> None:
        # Attribute order is an accident of construction: sort by name.
        items = sorted(state.items(), key=lambda kv: str(kv[0]))
        self.buf += b"a" + _pack_len(len(items))
        for name, item in items:
            self.encode(name, path)
            self.encode(item, f"{path}.{name}")


@functools.cache
def _copyreg_reconstructor() -> Any:
    import copyreg

    return copyreg._reconstructor  # type: ignore[attr-defined]


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


@register(type(None))
def _enc_none(enc: ValueEncoder, value: None, path: str) -> None:
    enc.buf += b"N"


@register(bool)
def _enc_bool(enc: ValueEncoder, value: bool, path: str) -> None:
    enc.buf += b"T" if value else b"F"


@register(int)
def _enc_int(enc: ValueEncoder, value: int, path: str) -> None:
    text = str(value).encode()
    enc.buf += b"i" + _pack_len(len(text)) + text


@register(float)
def _enc_float(enc: ValueEncoder, value: float, path: str) -> None:
    enc.buf += b"f" + _pack_double(value)  # the bits: 0.0 and -0.0 differ


@register(complex)
def _enc_complex(enc: ValueEncoder, value: complex, path: str) -> None:
    enc.buf += b"c" + _pack_double(value.real) + _pack_double(value.imag)


@register(str)
def _enc_str(enc: ValueEncoder, value: str, path: str) -> None:
    data = value.encode("utf-8", "surrogatepass")
    enc.buf += b"s" + _pack_len(len(data)) + data


def _encode_buffer(enc: ValueEncoder, tag: bytes, data: bytes | bytearray | memoryview) -> None:
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size >= _TREE_MIN:
        enc.buf += tag.upper() + _pack_len(size) + tree_digest(data)
    elif size > _INLINE_BUFFER_LIMIT:
        enc.buf += tag.upper() + _pack_len(size) + xxhash.xxh3_128_digest(data)
    else:
        enc.buf += tag + _pack_len(size) + bytes(data)


def tree_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The xxh3-128 digest of the xxh3-128 digests of a buffer's 8 MiB chunks, in order.

    The chunks are hashed in parallel, so a 100 MB array costs about what one core takes for its
    share. The result depends only on the bytes: the chunk size is fixed, the thread count is not
    part of it.
    """
    view = memoryview(data).cast("B")  # slices of a view copy nothing
    chunks = [view[i:i + _TREE_CHUNK] for i in range(0, view.nbytes, _TREE_CHUNK)]
    digests = [b""] * len(chunks)
    taken = iter(range(len(chunks)))  # each chunk goes to the first thread free to take it

    def hash_chunks() -> None:
        for i in taken:  # (a range iterator hands each index out once, under the GIL)
            digests[i] = xxhash.xxh3_128_digest(chunks[i])

    # The calling thread hashes too, beside one helper per other core: a helper that is slow to
    # start (a busy machine) leaves more chunks to the caller, never a wait for nothing.
    helpers = []
    try:
        pool, workers = _hash_pool()
        helpers = [pool.submit(hash_chunks) for _ in range(min(workers, len(chunks) - 1))]
    except RuntimeError:  # no new threads while the interpreter shuts down: the caller alone
        pass
    hash_chunks()
    for helper in helpers:
        helper.result()
    return xxhash.xxh3_128_digest(b"".join(digests))


_pool: tuple[int, ThreadPoolExecutor, int] | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> tuple[ThreadPoolExecutor, int]:
    """Helper threads for tree hashing (one per core beside the caller's), made on first use in
    each process, and how many.

    Made again in a forked child: the parent's threads do not exist there, and its pool would
    take the work and never do it.
    """
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            helpers = max(1, min(7, (cores or os.cpu_count() or 1) - 1))
            _pool = (os.getpid(), ThreadPoolExecutor(helpers, thread_name_prefix="nbi-hash"),
                     helpers)
        return _pool[1], _pool[2]


@register(bytes)
def _enc_bytes(enc: ValueEncoder, value: bytes, path: str) -> None:
    _encode_buffer(enc, b"b", value)


@register(bytearray)
def _enc_bytearray(enc: ValueEncoder, value: bytearray, path: str) -> None:
    enc.mutable = True
    _encode_buffer(enc, b"y", value)


@register(memoryview)
def _enc_memoryview(enc: ValueEncoder, value: memoryview, path: str) -> None:
    enc.mutable = True
    _encode_buffer(enc, b"m", value.cast("B") if value.c_contiguous else value.tobytes())


@register(tuple)
def _enc_tuple(enc: ValueEncoder, value: tuple[Any, ...], path: str) -> None:
    enc.buf += b"t" + _pack_len(len(value))
    for i, item in enumerate(value):
        enc.encode(item, f"{path}[{i}]")


@register(list)
def _enc_list(enc: ValueEncoder, value: list[Any], path: str) -> None:
    enc.mutable = True
    if not enc._enter(value, path):
        return
    enc.buf += b"l" + _pack_len(len(value))
    for i, item in enumerate(value):
        enc.encode(item, f"{path}[{i}]")
    enc._leave(value)


@register(dict)
def _enc_dict(enc: ValueEncoder, value: dict[Any, Any], path: str) -> None:
    # Insertion order is observable (iteration, json.dumps), so it is part of the value: equal
    # dicts built in another order are a needless miss, never a wrong hit.
    enc.mutable = True
    if not enc._enter(value, path):
        return
    enc.buf += b"d" + _pack_len(len(value))
    for key, item in value.items():
        enc.encode(key, f"{path}.keys()")
        enc.encode(item, f"{path}[{key!r}]")
    enc._leave(value)


def _enc_unordered(enc: ValueEncoder, tag: bytes, value: set[Any] | frozenset[Any],
                   path: str) -> None:
    # Each element is encoded alone and the encodings are sorted: iteration order (which
    # depends on PYTHONHASHSEED for strings, on ids for objects) cannot leak into the token.
    where = f"{path}{{...}}"
    if enc.on_handle is None or enc.identify is None:
        parts = []
        for item in value:
            sub = enc._sub(enc.on_handle)
            sub.encode(item, where)
            enc.mutable |= sub.mutable
            parts.append(bytes(sub.buf))
        parts.sort()
    else:
        # Handles are numbered in the order on_handle meets them: sort the elements first by an
        # encoding that names each handle by its call, then number them in that order.
        probed: list[tuple[bytes, bool, Any]] = []
        for item in value:
            seen: list[bool] = []

            def probe(obj: Any, seen: list[bool] = seen) -> bytes | None:
                token = enc.identify(obj) if enc.identify is not None else None
                if token is not None:
                    seen.append(True)
                return token

            sub = enc._sub(probe)
            sub.encode(item, where)
            enc.mutable |= sub.mutable
            probed.append((bytes(sub.buf), bool(seen), item))
        probed.sort(key=lambda p: p[0])
        parts = []
        for data, has_handles, item in probed:
            if has_handles:
                sub = enc._sub(enc.on_handle)
                sub.encode(item, where)
                data = bytes(sub.buf)
            parts.append(data)
    enc.buf += tag + _pack_len(len(parts))
    for part in parts:
        enc.buf += _pack_len(len(part)) + part


@register(set)
def _enc_set(enc: ValueEncoder, value: set[Any], path: str) -> None:
    enc.mutable = True
    _enc_unordered(enc, b"S", value, path)


@register(frozenset)
def _enc_frozenset(enc: ValueEncoder, value: frozenset[Any], path: str) -> None:
    _enc_unordered(enc, b"Z", value, path)


@register(range)
def _enc_range(enc: ValueEncoder, value: range, path: str) -> None:
    enc.buf += b"r"
    enc.encode((value.start, value.stop, value.step), path)


@register(slice)
def _enc_slice(enc: ValueEncoder, value: slice, path: str) -> None:
    enc.buf += b"_"
    enc.encode((value.start, value.stop, value.step), path)


@register(type(Ellipsis))
def _enc_ellipsis(enc: ValueEncoder, value: Any, path: str) -> None:
    enc.buf += b"E"


@register_lazy("numpy")
def _register_numpy() -> None:
    import numpy as np

    def frozen(array: np.ndarray) -> bool:
        """Whether nothing can change this array's bytes: read-only all the way down to a
        read-only buffer (a mapping opened read-only, bytes). A read-only array that owns its
        memory can be made writable again, and a read-only view of a writable array changes
        with it: both may change in place after a call is recorded."""
        base: Any = array
        while isinstance(base, np.ndarray):
            if base.flags.writeable or base.base is None:
                return False
            base = base.base
        try:
            with memoryview(base) as view:
                return bool(view.readonly)
        except TypeError:
            return False

    @register(np.ndarray)
    def _enc_ndarray(enc: ValueEncoder, value: np.ndarray, path: str) -> None:
        enc.mutable |= not frozen(value)
        enc.buf += b"A"
        enc.encode(value.dtype.str, path)
        enc.encode(value.shape, path)
        if value.dtype.hasobject:
            enc.encode(value.tolist(), f"{path}.tolist()")
            return
        if value.dtype.names is not None or value.dtype.subdtype is not None:
            enc.encode(repr(value.dtype.descr), path)
        data = value if value.flags.c_contiguous else np.ascontiguousarray(value)
        _encode_buffer(enc, b"b", data.reshape(-1).view(np.uint8).data)

    def _enc_scalar(enc: ValueEncoder, value: Any, path: str) -> None:
        enc.buf += b"a"
        enc.encode(value.dtype.str, path)
        enc.buf += _pack_len(value.nbytes) + value.tobytes()

    for scalar_type in set(np.sctypeDict.values()):
        if scalar_type is not np.object_:
            _ENCODERS[scalar_type] = _enc_scalar

    @register(np.dtype, *{type(np.dtype(t)) for t in "?bhilqBHILQefdgFDGSUVmMO"})
    def _enc_dtype(enc: ValueEncoder, value: Any, path: str) -> None:
        enc.buf += b"D"
        enc.encode(value.str, path)
        enc.encode(repr(value.descr), path)


@register_lazy("pandas")
def _register_pandas() -> None:
    import numpy as np
    import pandas as pd

    def _enc_array_like(enc: ValueEncoder, values: Any, path: str) -> None:
        array = np.asarray(values)
        if array.dtype.hasobject:
            enc.encode(list(array.tolist()), path)
        else:
            enc.encode(array, path)

    def _enc_index(enc: ValueEncoder, value: pd.Index, path: str) -> None:
        enc.mutable = True
        enc.buf += b"P"
        enc.encode(type(value).__name__, path)
        enc.encode(str(value.dtype), path)
        enc.encode(list(value.names), f"{path}.names")
        if isinstance(value, pd.MultiIndex):
            for level, codes in zip(value.levels, value.codes, strict=True):
                _enc_index(enc, level, f"{path}.levels")
                enc.encode(np.asarray(codes), f"{path}.codes")
        elif isinstance(value, pd.RangeIndex):
            enc.encode((value.start, value.stop, value.step), path)
        else:
            _enc_array_like(enc, value.to_numpy(), path)

    def _enc_series_values(enc: ValueEncoder, series: pd.Series, path: str) -> None:
        enc.encode(str(series.dtype), path)
        if isinstance(series.dtype, pd.CategoricalDtype):
            _enc_index(enc, series.cat.categories, f"{path}.cat.categories")
            enc.encode(bool(series.cat.ordered), path)
            enc.encode(np.asarray(series.cat.codes), f"{path}.cat.codes")
        else:
            _enc_array_like(enc, series.to_numpy(), path)
            enc.encode(np.asarray(series.isna()), f"{path}.isna()")

    @register(pd.Series)
    def _enc_series(enc: ValueEncoder, value: pd.Series, path: str) -> None:
        enc.mutable = True
        enc.buf += b"Q"
        enc.encode(value.name, f"{path}.name")
        _enc_index(enc, value.index, f"{path}.index")
        _enc_series_values(enc, value, path)

    @register(pd.DataFrame)
    def _enc_frame(enc: ValueEncoder, value: pd.DataFrame, path: str) -> None:
        enc.mutable = True
        enc.buf += b"W" + _pack_len(value.shape[1])
        _enc_index(enc, value.columns, f"{path}.columns")
        _enc_index(enc, value.index, f"{path}.index")
        for i in range(value.shape[1]):
            _enc_series_values(enc, value.iloc[:, i], f"{path}.iloc[:, {i}]")

    for index_type in (pd.Index, pd.RangeIndex, pd.MultiIndex, pd.DatetimeIndex,
                       pd.CategoricalIndex, pd.IntervalIndex, pd.PeriodIndex,
                       pd.TimedeltaIndex):
        _ENCODERS[index_type] = _enc_index
    _register_numpy_if_needed()


def _register_numpy_if_needed() -> None:
    if "numpy" not in _lazy_done:
        _lazy_done.add("numpy")
        _LAZY["numpy"]()


def scalar_encoding(value: Any) -> bytes | None:
    """The encoding of an int, float, str, bool or None, exactly as ValueEncoder writes it,
    without making an encoder (the hot path of recording calls); None for anything else."""
    tp = type(value)
    if tp is int:
        text = str(value).encode()
        return b"i" + _pack_len(len(text)) + text
    if tp is str:
        data = value.encode("utf-8", "surrogatepass")
        return b"s" + _pack_len(len(data)) + data
    if tp is float:
        return b"f" + _pack_double(value)
    if tp is bool:
        return b"T" if value else b"F"
    if value is None:
        return b"N"
    return None


def encode_value(value: Any, path: str = "value", *,
                 on_handle: Callable[[Any], bytes | None] | None = None,
                 code: CodeHasher | None = None) -> ValueEncoder:
    """Encode one value; the encoder's ``buf`` and ``mutable`` are the result."""
    enc = ValueEncoder(on_handle, code)
    enc.encode(value, path)
    return enc


def tokenize(value: Any, path: str = "value", *, code: CodeHasher | None = None) -> str:
    """The hex token of a value: equal values give equal tokens, in any process."""
    return xxhash.xxh3_128_hexdigest(bytes(encode_value(value, path, code=code).buf))


# --------------------------------------------------------------------------------------------
# Code digests
# --------------------------------------------------------------------------------------------


@dataclass
class CodeInfo:
    """A function's code digest, and what went into it (for explaining why a task re-ran).

    ``manifest`` maps a qualified name to ``{"kind", "digest", "source" | "summary" | "version"}``.
    """

    digest: str
    manifest: dict[str, dict[str, str]] = field(default_factory=dict)


_TASK_DECORATOR_NAMES = frozenset({"task"})


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


class _Normalizer(ast.NodeTransformer):
    """Drops what does not change behaviour: docstrings, and @task decorators (options such as
    cpus or retries do not change results; the options that do are keyed separately)."""

    def _strip(self, node: Any) -> Any:
        body = node.body
        if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        if hasattr(node, "decorator_list"):
            node.decorator_list = [d for d in node.decorator_list
                                   if _decorator_name(d) not in _TASK_DECORATOR_NAMES]
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Module = _strip


def normalized_source_digest(source: str) -> str | None:
    """Digest of source text by its syntax tree; None when the text does not parse alone."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    tree = _Normalizer().visit(tree)
    dumped = ast.dump(tree, annotate_fields=False, include_attributes=False)
    return xxhash.xxh3_128_hexdigest(dumped.encode())


def _code_object_digest(code: types.CodeType) -> str:
    """Fallback when no source is available: bytecode, constants and names, without line
    numbers (so moving code does not count) and without the docstring constant."""
    h = xxhash.xxh3_128()

    def feed(co: types.CodeType) -> None:
        h.update(co.co_code)
        h.update(repr((co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars,
                       co.co_argcount, co.co_kwonlyargcount, co.co_flags)).encode())
        for const in co.co_consts:
            if isinstance(const, types.CodeType):
                feed(const)
            else:
                h.update(repr(const).encode())

    feed(code)
    return h.hexdigest()


def _iter_code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _iter_code_objects(const)


@functools.lru_cache(maxsize=4096)
def _referenced_names(code: types.CodeType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(global names loaded, attribute names loaded) by a code object and the code inside it."""
    globals_: set[str] = set()
    attrs: set[str] = set()
    for co in _iter_code_objects(code):
        for ins in dis.get_instructions(co):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"):
                globals_.add(ins.argval)
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR"):
                attrs.add(ins.argval)
    return tuple(sorted(globals_)), tuple(sorted(attrs))


_STDLIB_PATHS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")})
_SITE_PATHS = tuple({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


@functools.cache
def _distributions_of(toplevel: str) -> list[str]:
    """Distributions that provide a top-level module. Most are named like their module: ask for
    that one first (cheap); scanning every installed distribution takes about a second."""
    try:
        dist = importlib.metadata.distribution(toplevel)
        files = dist.files or []
        if any(f.parts and f.parts[0] in (toplevel, f"{toplevel}.py") for f in files):
            return [dist.metadata["Name"] or toplevel]
    except importlib.metadata.PackageNotFoundError:
        pass
    return list(_packages_distributions().get(toplevel, []))


@functools.cache
def library_version(module_name: str) -> str | None:
    """``"dist==version"`` for a module installed from a distribution, ``"python==X.Y"`` for the
    standard library and builtins, None for user code (hashed by its source)."""
    toplevel = module_name.partition(".")[0]
    if toplevel in sys.builtin_module_names or toplevel in sys.stdlib_module_names:
        return f"python=={sys.version_info.major}.{sys.version_info.minor}"
    if toplevel in ("__main__", "__mp_main__", "builtins"):
        return None if toplevel != "builtins" else "python"
    module = sys.modules.get(module_name) or sys.modules.get(toplevel)
    filename = getattr(module, "__file__", None)
    if module is not None and filename is None and not _distributions_of(toplevel):
        return None  # e.g. a namespace made in a notebook
    if filename and filename.startswith(_STDLIB_PATHS) and not filename.startswith(_SITE_PATHS):
        return f"python=={sys.version_info.major}.{sys.version_info.minor}"
    if filename and not filename.startswith(_SITE_PATHS):
        return None  # local or editable-installed source: hash it by its code
    dists = _distributions_of(toplevel)
    if not dists:
        return None
    name = sorted(dists)[0]
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_of(obj: Any) -> str | None:
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return None


class CodeHasher:
    """Digests of functions and classes and what they reach, memoized for one run.

    Memoized by object identity for the duration of one hasher: a run makes a new one, so that
    a global edited between runs is seen.
    """

    def __init__(self) -> None:
        self._memo: dict[int, CodeInfo] = {}
        self._keepalive: list[Any] = []  # ids stay unique while the memo lives
        self._in_progress: set[int] = set()
        # Per info() being computed: the functions still in progress that its digest stood in
        # for by name (recursion). Such a digest is only valid inside theirs: not memoized.
        self._open: list[set[int]] = []
        self._modules: set[int] = set()  # user modules being hashed (module attribute cycles)

    def token_of(self, obj: Any, path: str = "value") -> str:
        """A token for a function, class, method or module used as a *value*."""
        if isinstance(obj, types.ModuleType):
            version = library_version(obj.__name__)
            return f"module:{obj.__name__}:{version or self._module_digest(obj)}"
        if isinstance(obj, functools.partial):
            return "partial:" + tokenize((self.token_of(obj.func, path), obj.args,
                                          obj.keywords), path, code=self)
        if isinstance(obj, types.MethodType):
            return "method:" + self.token_of(obj.__func__, path) + ":" + tokenize(
                obj.__self__, f"{path}.__self__", code=self)
        return self.info(obj, path).digest

    def info(self, obj: Any, path: str = "value") -> CodeInfo:
        target = _unwrap_task(obj)
        ident = id(target)
        known = self._memo.get(ident)
        if known is not None:
            return known
        if ident in self._in_progress:  # recursion (a function that calls itself)
            if self._open:
                self._open[-1].add(ident)
            return CodeInfo("recursive:" + _qualname(target))
        self._in_progress.add(ident)
        self._open.append(set())
        try:
            info = self._compute(target, path)
        finally:
            self._in_progress.discard(ident)
            still_open = self._open.pop()
        recursive = ident in still_open
        still_open.discard(ident)
        if still_open:
            # Mutually recursive with a function higher up, whose code this digest names only
            # by name: valid inside that function's digest, not on its own (a task reaching
            # this one directly must see that function's code), so it is not memoized.
            if self._open:
                self._open[-1] |= still_open
            return info
        if recursive:
            # Part of a recursion: computed again wherever it is reached, so that its digest
            # does not depend on which function of the cycle was hashed first.
            return info
        self._memo[ident] = info
        self._keepalive.append(target)
        return info

    def _compute(self, obj: Any, path: str) -> CodeInfo:
        module = getattr(obj, "__module__", None) or ""
        name = _qualname(obj)
        version = library_version(module) if module else "python"
        if version is not None and module != "__main__":
            return CodeInfo(f"lib:{name}:{version}", {name: {"kind": "library",
                                                             "digest": version,
                                                             "version": version}})
        if isinstance(obj, type):
            return self._class_info(obj, path)
        if isinstance(obj, types.FunctionType):
            return self._function_info(obj, path)
        if isinstance(obj, types.BuiltinFunctionType):
            return CodeInfo(f"builtin:{name}")
        wrapped = _wrapped_function(obj)
        if wrapped is not None:
            # functools.cache, lru_cache, and wrappers like them: the code is the wrapped
            # function's (the wrapper pickles by name, so its state would not show an edit).
            inner = self.info(wrapped, path)
            return CodeInfo(f"wrapped:{_qualname(type(obj))}:{inner.digest}", inner.manifest)
        # A callable object from user code, used as a value: its class and its state.
        return CodeInfo("obj:" + tokenize(obj, path, code=self))

    def _function_info(self, func: types.FunctionType, path: str) -> CodeInfo:
        name = _qualname(func)
        source = _source_of(func)
        body_digest = normalized_source_digest(source) if source is not None else None
        if body_digest is None:
            body_digest = "co:" + _code_object_digest(func.__code__)
        elif func.__code__.co_name == "<lambda>":
            # The source of a lambda is its whole line, which may hold other lambdas: its
            # bytecode tells it apart.
            body_digest += ":" + _code_object_digest(func.__code__)
        manifest: dict[str, dict[str, str]] = {
            name: {"kind": "function", "digest": body_digest, "source": source or ""}}
        h = xxhash.xxh3_128()
        h.update(b"F" + body_digest.encode())
        # Defaults are values: an edited default changes the result.
        h.update(tokenize((func.__defaults__, func.__kwdefaults__),
                          f"{name}.__defaults__", code=self).encode())
        globals_, attrs = _referenced_names(func.__code__)
        reached: list[tuple[str, Any]] = []
        fglobals = func.__globals__
        for gname in globals_:
            if gname in fglobals:
                reached.append((gname, fglobals[gname]))
            elif not hasattr(builtins, gname):
                reached.append((gname, _MISSING))
        if func.__closure__:
            for cname, cell in zip(func.__code__.co_freevars, func.__closure__, strict=True):
                try:
                    reached.append((cname, cell.cell_contents))
                except ValueError:  # an empty cell (defined later in the enclosing scope)
                    reached.append((cname, _MISSING))
        for rname, value in reached:
            token, sub_manifest = self._reached(value, f"{name}:{rname}", attrs)
            h.update(rname.encode() + b"=" + token.encode() + b";")
            manifest.update(sub_manifest)
        return CodeInfo(h.hexdigest(), manifest)

    def _reached(self, value: Any, where: str, attrs: tuple[str, ...],
                 ) -> tuple[str, dict[str, dict[str, str]]]:
        """Token and manifest entries for one name a function reads."""
        if value is _MISSING:
            return "missing", {}
        value = _unwrap_task(value)
        if isinstance(value, types.ModuleType):
            version = library_version(value.__name__)
            if version is not None:
                return f"module:{version}", {}
            # A user module: hash the attributes of it this function uses (and of its
            # submodules, for ``pkg.sub.helper``).
            if id(value) in self._modules:
                return f"usermodule:{value.__name__}:recursive", {}
            parts = []
            manifest: dict[str, dict[str, str]] = {}
            self._modules.add(id(value))
            try:
                for attr in attrs:
                    if attr in vars(value):
                        member = vars(value)[attr]
                        token, sub = self._reached(
                            member, f"{value.__name__}.{attr}",
                            attrs if isinstance(member, types.ModuleType) else ())
                        parts.append(f"{attr}={token}")
                        manifest.update(sub)
            finally:
                self._modules.discard(id(value))
            return "usermodule:" + tokenize(parts), manifest
        if isinstance(value, (types.FunctionType, type)) or _wrapped_function(value) is not None:
            info = self.info(value, where)
            return info.digest, info.manifest
        if isinstance(value, (types.BuiltinFunctionType, types.MethodType, functools.partial)):
            return self.token_of(value, where), {}
        try:
            token = tokenize(value, where, code=self)
        except Unhashable as exc:
            raise HashingError(
                f"the code reads the global {where.rpartition(':')[2]!r}, which cannot be "
                f"hashed: {exc.why} (at {exc.path}). Pass it to the task as an argument with a "
                "hashable value, or give its class a __nbindustria_token__() method."
            ) from None
        return token, {where: {"kind": "value", "digest": token, "summary": summarize(value)}}

    def _class_info(self, cls: type, path: str) -> CodeInfo:
        name = _qualname(cls)
        h = xxhash.xxh3_128()
        h.update(b"K" + cls.__qualname__.encode())
        manifest: dict[str, dict[str, str]] = {}
        for base in cls.__bases__:
            if base is not object:
                h.update(self.info(base, path).digest.encode())
        for attr in sorted(vars(cls)):
            if attr in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__",
                        "__firstlineno__", "__static_attributes__", "__annotations__"):
                continue
            member = vars(cls)[attr]
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                funcs = [f for f in (member.fget, member.fset, member.fdel) if f is not None]
                for func in funcs:
                    sub = self.info(func, path)
                    h.update(attr.encode() + sub.digest.encode())
                    manifest.update(sub.manifest)
                continue
            if isinstance(member, types.FunctionType):
                sub = self.info(member, path)
                h.update(attr.encode() + sub.digest.encode())
                manifest.update(sub.manifest)
            else:
                try:
                    h.update(attr.encode() + tokenize(member, f"{name}.{attr}",
                                                      code=self).encode())
                except HashingError:
                    h.update(attr.encode() + type(member).__qualname__.encode())
        source = _source_of(cls)
        manifest[name] = {"kind": "class", "digest": h.hexdigest(), "source": source or ""}
        return CodeInfo(h.hexdigest(), manifest)

    def _module_digest(self, module: types.ModuleType) -> str:
        source = _source_of(module)
        if source is None:
            return "nosource"
        return normalized_source_digest(source) or digest_bytes(source.encode())


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _wrapped_function(obj: Any) -> types.FunctionType | None:
    """The function a callable wrapper (``functools.cache``, ``lru_cache``, ...) stands for."""
    if isinstance(obj, (types.FunctionType, type)) or not callable(obj):
        return None
    wrapped = getattr(obj, "__wrapped__", None)
    return wrapped if isinstance(wrapped, types.FunctionType) else None


def _unwrap_task(obj: Any) -> Any:
    """A Task object stands for its function (duck-typed: hashing does not import task.py)."""
    func = getattr(obj, "__nbindustria_function__", None)
    return func if func is not None else obj


def summarize(value: Any, limit: int = 60) -> str:
    """A short human-readable description of a value, for labels and explanations."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None and not isinstance(value, (int, float)):
        return f"{type(value).__name__}(shape={tuple(shape)}, dtype={dtype})"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not break a label
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
