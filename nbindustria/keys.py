"""One identity and one key per call.

A call is encoded once, parameter by parameter (bound to the signature, defaults applied, so
``fit(1)`` and ``fit(x=1)`` are the same call), with each handle in the arguments written as a
placeholder. Then:

* the **node id** (which call is this) hashes ``["Node", task identity, arguments]`` with each
  placeholder filled by the upstream's node id. It is stable across code edits, so ``why`` can
  find the previous result of the same call.
* the **key** (which result is this) hashes ``["Key", format, task identity, code digest,
  arguments, environment]`` with each placeholder filled by the upstream's *result digest*: an
  upstream that re-runs to identical bytes leaves its dependents cached.

Options that do not change results (cpus, memory, retries, engines) are never part of either.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from .errors import HashingError
from .graph import iter_handles
from .hashing import ENCODING_VERSION, CodeHasher, Unhashable, ValueEncoder, scalar_encoding
from .task import Handle, ResultRef, Task

_pack_u32 = struct.Struct("<I").pack
KEY_FORMAT = f"nbindustria-key-{ENCODING_VERSION}".encode()

ProvenanceLookup = Callable[[Any], "ResultRef | None"]
Upstream = Handle[Any] | ResultRef


@dataclass(slots=True)
class CallEncoding:
    """A call's arguments, encoded with placeholders for upstream results."""

    params: list[tuple[str, bytes, Sequence[Upstream]]]  # (name, bytes, handles in that param)
    handles: Sequence[Upstream]  # every placeholder, in order (never changed once made)
    mutable: bool  # something in the arguments could change in place: encode again before use
    # With no placeholders, the bytes that node id and key hash after their prefixes: the
    # parameters framed as ``_filled`` frames them (one buffer, hashed in one call).
    blob: bytes | None = None


_NO_FAST_PATH = (None, None)
# For a parameter or a call without handles: a tuple, so that a parameter's (name, bytes,
# handles) holds nothing the cyclic GC tracks and is untracked at its first collection (10,000
# recorded calls would otherwise keep 10,000 more objects for every full collection to walk).
_NO_HANDLES: tuple[Upstream, ...] = ()


def _fast_params(task: Task[Any, Any]) -> tuple[tuple[str, ...] | None, dict[str, Any] | None]:
    """(parameter names, defaults) when every parameter is plain positional-or-keyword, so that
    binding is a zip; (None, None) otherwise. Cached on the task (its function never changes)."""
    cached = task.__dict__.get("_nbi_fast_params")
    if cached is None:
        import inspect

        params = list(task.signature.parameters.values())
        if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            cached = (tuple(p.name for p in params),
                      {p.name: p.default for p in params if p.default is not p.empty})
        else:
            cached = _NO_FAST_PATH
        task.__dict__["_nbi_fast_params"] = cached
    return cached


def bind(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments by parameter name, defaults applied. Raises a clear TypeError when the call
    does not fit the function (naming the task)."""
    names, defaults = _fast_params(task)
    if names is not None and not kwargs and len(args) == len(names):
        # Every parameter given by position (lengths equal: zip's strict check, which costs
        # more than the whole dict here, has nothing to find).
        return dict(zip(names, args))  # noqa: B905
    if names is not None and defaults is not None and len(args) <= len(names):
        # The common case, without inspect's general machinery (the same result, in the
        # signature's order); anything unusual takes the general path for its error message.
        bound = dict(zip(names, args, strict=False))
        rest = names[len(args):]
        if all(k in rest for k in kwargs):
            for name in rest:
                if name in kwargs:
                    bound[name] = kwargs[name]
                elif name in defaults:
                    bound[name] = defaults[name]
                else:
                    break
            else:
                return bound
    try:
        bound = task.signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{task.name}(): {exc}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def encode_call(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                code: CodeHasher | None = None,
                provenance: ProvenanceLookup | None = None) -> CallEncoding:
    arguments = bind(task, args, kwargs)
    fast = _simple_call(arguments)
    if fast is not None:
        return fast
    params: list[tuple[str, bytes, Sequence[Upstream]]] = []
    all_handles: list[Upstream] = []
    mutable = False
    for name, value in arguments.items():
        scalar = scalar_encoding(value)
        if scalar is not None:  # most arguments: no encoder, no handles, nothing mutable
            params.append((name, scalar, _NO_HANDLES))
            continue
        found: list[Upstream] = []

        def on_handle(obj: Any, found: list[Upstream] = found) -> bytes | None:
            handle = _upstream(obj, provenance)
            if handle is None:
                return None
            found.append(handle)
            return _pack_u32(len(found) - 1)

        enc = ValueEncoder(on_handle, code, lambda obj: _identify(obj, provenance))
        try:
            enc.encode(value, f"{task.name}({name}=...)")
        except Unhashable as exc:
            raise HashingError(
                f"cannot hash the argument {exc.path} of task {task.name!r}: {exc.why}. Pass a "
                "value with deterministic content (numbers, strings, arrays, frames, plain "
                "objects), or give its class a __nbindustria_token__() method."
            ) from None
        _check_reachable(task, name, value, found)
        mutable |= enc.mutable
        params.append((name, bytes(enc.buf), found))
        all_handles.extend(found)
    blob = None if all_handles else b"".join(_frame(n, d) for n, d, _ in params)
    return CallEncoding(params, all_handles, mutable, blob)


# What the general encoder writes for an argument that is a handle itself: a placeholder for
# the first (and only) upstream of that parameter.
_LONE_HANDLE = b"H" + _pack_u32(0)


def _simple_call(arguments: dict[str, Any]) -> CallEncoding | None:
    """The encoding of a call whose arguments are all scalars or handles (the hot path of
    recording many small calls), or None. The same bytes as the general path."""
    params: list[tuple[str, bytes, Sequence[Upstream]]] = []
    handles: Sequence[Upstream] = _NO_HANDLES
    blob = b""  # the frames as _filled makes them, while there is no placeholder
    for name, value in arguments.items():
        scalar = scalar_encoding(value)
        if scalar is not None:
            params.append((name, scalar, _NO_HANDLES))
            head = _name_heads.get(name)
            if head is None:
                head = _name_heads[name] = name.encode() + b"\0"
            blob += head + _pack_u32(len(scalar)) + scalar  # _frame(name, scalar)
        elif type(value) is Handle:
            params.append((name, _LONE_HANDLE, [value]))
            handles = [*handles, value]
        else:
            return None
    if handles:
        return CallEncoding(params, handles, False)
    # The shared empty tuple: fewer objects per recorded call for the cyclic GC to track
    # (recording 10,000 calls is otherwise largely garbage-collector time).
    return CallEncoding(params, _NO_HANDLES, False, blob)


# A parameter's name as its frame starts (per name: a program has few).
_name_heads: dict[str, bytes] = {}


def _frame(name: str, data: bytes) -> bytes:
    return name.encode() + b"\0" + _pack_u32(len(data)) + data


def _check_reachable(task: Task[Any, Any], name: str, value: Any, found: list[Upstream]) -> None:
    """Handles are dependencies only where the graph walks (builtin containers, named tuples):
    one inside another object would be neither waited for nor replaced by its value."""
    handles = [h for h in found if isinstance(h, Handle)]
    if not handles:
        return
    walked = {id(h) for h in iter_handles(value)}
    for handle in handles:
        if id(handle) not in walked:
            raise HashingError(
                f"the argument {name} of task {task.name!r} holds the result of "
                f"{handle.label} inside an object of another kind than a list, tuple, dict or "
                "set: results are found (and waited for) only in those. Pass the result as an "
                "argument of its own, or in one of those containers.")


def _upstream(obj: Any, provenance: ProvenanceLookup | None) -> Upstream | None:
    if isinstance(obj, Handle):
        return obj
    return provenance(obj) if provenance is not None else None


def _identify(obj: Any, provenance: ProvenanceLookup | None) -> bytes | None:
    """An upstream named by its call (and a provenance by its result too), without numbering
    it: sets of handles are ordered by this, whatever their iteration order."""
    handle = _upstream(obj, provenance)
    if handle is None:
        return None
    if isinstance(handle, ResultRef):
        return b"r" + handle.node_id.encode() + (handle.digest or "").encode()
    return b"h" + handle.node_id.encode()


def _filled(encoding: CallEncoding, token: Callable[[Upstream], str]) -> bytes:
    """The parameters framed, each placeholder filled by its upstream's token."""
    if encoding.blob is not None:
        return encoding.blob
    parts = []
    for name, data, handles in encoding.params:
        parts.append(_frame(name, data))
        parts.extend(token(handle).encode() for handle in handles)
    return b"".join(parts)


_hexdigest = xxhash.xxh3_128_hexdigest


def _node_token(handle: Upstream) -> str:
    return handle.node_id


def node_id(task: Task[Any, Any], encoding: CallEncoding) -> str:
    # One buffer hashed at once: the same digest as streaming the parts (xxh3 is a stream hash).
    prefix = task.__dict__.get("_nbi_node_prefix")
    if prefix is None:
        prefix = task.__dict__["_nbi_node_prefix"] = b"Node\0" + task.identity.encode() + b"\0"
    return _hexdigest(prefix + _filled(encoding, _node_token))


def _result_digest(handle: Upstream) -> str:
    if handle.digest is None:
        raise RuntimeError(f"key of a call whose input {handle.label} has no result yet")
    return handle.digest


def key_prefix(task: Task[Any, Any], code_digest: str, env: str) -> bytes:
    """What every key of this task's code in this environment starts with (see cache_key)."""
    return (KEY_FORMAT + b"\0" + task.identity.encode() + b"\0" + code_digest.encode() + b"\0"
            + env.encode() + b"\0")


def cache_key(task: Task[Any, Any], code_digest: str, encoding: CallEncoding, env: str,
              prefix: bytes | None = None) -> str:
    """``prefix`` is ``key_prefix(task, code_digest, env)``, when the caller keeps it."""
    if prefix is None:
        prefix = key_prefix(task, code_digest, env)
    return _hexdigest(prefix + _filled(encoding, _result_digest))


def arg_digests(encoding: CallEncoding) -> dict[str, str]:
    """Per parameter, a digest of its value with upstream results filled in (for ``why``)."""
    out = {}
    for name, data, handles in encoding.params:
        h = xxhash.xxh3_128(data)
        for handle in handles:
            h.update((handle.digest or "?").encode())
        out[name] = h.hexdigest()
    return out


def code_digest_of(task: Task[Any, Any], code: CodeHasher) -> tuple[str, dict[str, Any]]:
    """The digest that stands for a task's code, and the manifest behind it."""
    if task.options.version is not None:
        return f"version:{task.options.version}", {}
    info = code.info(task.func, task.name)
    return info.digest, info.manifest
