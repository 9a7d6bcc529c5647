"""Tokens of values and digests of code (nbindustria/hashing.py).

Equal values give equal tokens, in any process and under any PYTHONHASHSEED; different values give
different tokens; a value without deterministic content is an error naming the path to it.
"""

from __future__ import annotations

import collections
import copy
import enum
import functools
import io
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xxhash
from helpers_tasks import Point, Slotted, double
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import exec_cell

from nbindustria import hashing
from nbindustria.errors import HashingError
from nbindustria.hashing import (
    CodeHasher,
    Unhashable,
    encode_value,
    normalized_source_digest,
    tokenize,
    tree_digest,
)

TESTS = Path(__file__).parent


# ---- typed and canonical ------------------------------------------------------------------------


def test_numbers_of_different_types_differ() -> None:
    tokens = {tokenize(v) for v in (1, 1.0, True, "1", b"1", 1 + 0j, np.int64(1), np.float64(1))}
    assert len(tokens) == 8


def test_zero_and_negative_zero_differ() -> None:
    assert tokenize(0.0) != tokenize(-0.0)
    assert tokenize([0.0]) != tokenize([-0.0])
    assert tokenize(np.array([0.0])) != tokenize(np.array([-0.0]))


def test_nan_is_stable() -> None:
    assert tokenize(float("nan")) == tokenize(float("nan"))
    assert tokenize(math.inf) != tokenize(-math.inf)


def test_list_and_tuple_differ() -> None:
    assert tokenize([1, 2]) != tokenize((1, 2))
    assert tokenize([]) != tokenize(())
    assert tokenize([[1]]) != tokenize([(1,)])


def test_container_boundaries_are_encoded() -> None:
    assert tokenize(["ab", "c"]) != tokenize(["a", "bc"])
    assert tokenize([[1, 2], [3]]) != tokenize([[1], [2, 3]])
    assert tokenize({"a": "b"}) != tokenize({"ab": ""})
    assert tokenize(b"\x00" * 5000) != tokenize(b"\x00" * 5001)


def test_sets_do_not_depend_on_iteration_order() -> None:
    words = [f"word{i}" for i in range(200)]
    forward, backward = set(words), set(reversed(words))
    assert tokenize(forward) == tokenize(backward)
    assert tokenize(frozenset(words)) == tokenize(frozenset(reversed(words)))
    assert tokenize(set(words)) != tokenize(frozenset(words))
    assert tokenize({1, 2}) != tokenize({1, 3})


def test_dicts_keep_their_order() -> None:
    # Iteration order is observable, so it is part of the value (a needless miss at worst).
    assert tokenize({"a": 1, "b": 2}) == tokenize({"a": 1, "b": 2})
    assert tokenize({"a": 1, "b": 2}) != tokenize({"b": 2, "a": 1})
    assert tokenize({1: "a"}) != tokenize({1.0: "a"})


def test_self_referencing_containers() -> None:
    a: list[Any] = [1]
    a.append(a)
    b: list[Any] = [1]
    b.append(b)
    assert tokenize(a) == tokenize(b)
    # Cycles through different ancestors are different values.
    outer: list[Any] = [None, 1]
    inner: list[Any] = [outer, 2]
    outer[0] = inner
    outer2: list[Any] = [None, 1]
    inner2: list[Any] = [None, 2]
    inner2[0] = inner2
    outer2[0] = inner2
    assert tokenize(outer) != tokenize(outer2)


def test_back_references_through_a_set() -> None:
    class Node:
        def __init__(self) -> None:
            self.children: set[Node] = set()
            self.parent: Node | None = None

        def __hash__(self) -> int:
            return 1

    parent, child = Node(), Node()
    child.parent = parent
    parent.children.add(child)
    assert tokenize(parent) == tokenize(copy.deepcopy(parent))


def test_ranges_slices_and_enums() -> None:
    assert tokenize(range(3)) != tokenize(range(4))
    assert tokenize(range(3)) != tokenize([0, 1, 2])
    assert tokenize(slice(1, 2)) != tokenize(slice(1, 3))

    class Color(enum.Enum):
        RED = 1
        GREEN = 2

    assert tokenize(Color.RED) == tokenize(Color.RED)
    assert tokenize(Color.RED) != tokenize(Color.GREEN)


def test_subclasses_of_builtins_carry_their_type() -> None:
    Pair = collections.namedtuple("Pair", "a b")
    assert tokenize(Pair(1, 2)) != tokenize((1, 2))
    assert tokenize(Pair(1, 2)) == tokenize(Pair(1, 2))
    assert tokenize(collections.OrderedDict(a=1)) != tokenize({"a": 1})


# ---- numpy ------------------------------------------------------------------------------------


def test_arrays_by_dtype_shape_and_bytes() -> None:
    a = np.arange(12, dtype=np.int64)
    assert tokenize(a) == tokenize(a.copy())
    assert tokenize(a) != tokenize(a.astype(np.int32))
    assert tokenize(a) != tokenize(a.reshape(3, 4))  # same bytes, another shape
    assert tokenize(a.reshape(3, 4)) != tokenize(a.reshape(4, 3))
    assert tokenize(a.view(np.float64)) != tokenize(a)  # same bytes, another dtype
    b = a.copy()
    b[5] += 1
    assert tokenize(a) != tokenize(b)


def test_non_contiguous_arrays_by_value() -> None:
    m = np.arange(20.0).reshape(4, 5)
    transposed = m.T
    assert not transposed.flags.c_contiguous
    assert tokenize(transposed) == tokenize(np.ascontiguousarray(transposed))
    assert tokenize(transposed) != tokenize(m)
    strided = np.arange(100.0)[::3]
    assert tokenize(strided) == tokenize(strided.copy())
    assert tokenize(strided) != tokenize(np.arange(100.0)[::4])


def test_large_arrays_are_hashed_without_copying_into_the_encoding() -> None:
    big = np.zeros(1 << 20)
    enc = encode_value(big)
    assert len(enc.buf) < 200
    other = big.copy()
    other[-1] = 1.0
    assert tokenize(big) != tokenize(other)


def test_tree_hash_sees_every_chunk_and_not_the_thread_count() -> None:
    chunk = hashing._TREE_CHUNK
    big = np.random.default_rng(3).integers(0, 255, 2 * chunk + 5, dtype=np.uint8)
    # The tree by hand: each 8 MiB chunk's xxh3-128 digest, then the digest of those, in order.
    view = memoryview(big).cast("B")
    by_hand = xxhash.xxh3_128_digest(b"".join(
        xxhash.xxh3_128_digest(view[i:i + chunk]) for i in range(0, len(view), chunk)))
    assert tree_digest(big) == by_hand
    assert tree_digest(bytes(big)) == by_hand
    token = tokenize(big)
    for where in (0, chunk - 1, chunk, 2 * chunk + 4):  # a byte in each chunk and at the seams
        changed = big.copy()
        changed[where] ^= 1
        assert tokenize(changed) != token, where
    swapped = np.concatenate([big[chunk:2 * chunk], big[:chunk], big[2 * chunk:]])
    assert tokenize(swapped) != token  # chunk digests are combined in order
    # Arrays of the same bytes but another dtype or shape still differ.
    assert tokenize(big.view(np.int8)) != token
    assert tokenize(big[:-1]) != token
    assert tokenize(bytearray(big.tobytes())) != tokenize(big.tobytes())


def test_tree_hash_in_a_forked_child() -> None:
    # The hashing threads of the parent do not exist in a forked child (multiprocessing's fork,
    # an engine forked by a launcher): the child must make its own, not wait on the parent's.
    big = np.ones(3 * hashing._TREE_CHUNK // 8)
    parent = tokenize(big)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its token and leave without running the parent's cleanup
        try:
            os.write(write, tokenize(big).encode())
        finally:
            os._exit(0)
    os.close(write)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(os.read(read, 1024)), daemon=True)
    reader.start()
    reader.join(30)
    hung = reader.is_alive()
    if hung:
        os.kill(pid, signal.SIGKILL)  # its end of the pipe closes: the read returns
        reader.join(10)
    os.waitpid(pid, 0)
    os.close(read)
    assert not hung, "the forked child hung while hashing"
    assert out[0].decode() == parent


def test_tree_hash_while_the_interpreter_exits() -> None:
    # atexit hooks (a pipeline closed at exit, say) run after the thread pools are shut down:
    # hashing a big value there must still work, serially, and give the same token.
    script = """if True:
        import atexit, numpy as np
        from nbindustria.hashing import tokenize
        a = np.arange(3 * (8 << 20) // 8, dtype=np.float64)
        first = tokenize(a)
        atexit.register(lambda: print("same token at exit:", tokenize(a) == first))
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "same token at exit: True", done.stderr


def test_numpy_scalars_and_structured_arrays() -> None:
    assert tokenize(np.float32(1.5)) != tokenize(np.float64(1.5))
    assert tokenize(np.int8(3)) == tokenize(np.int8(3))
    rec = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    rec2 = np.zeros(3, dtype=[("a", "<i4"), ("c", "<f8")])
    assert tokenize(rec) != tokenize(rec2)
    objs = np.array([1, "a", None], dtype=object)
    assert tokenize(objs) == tokenize(objs.copy())
    assert tokenize(np.dtype("f8")) != tokenize(np.dtype("f4"))


@settings(max_examples=60)
@given(hnp.arrays(dtype=hnp.scalar_dtypes(), shape=hnp.array_shapes(min_dims=0, max_dims=3)))
def test_array_property_equal_copies_equal_tokens(array: np.ndarray) -> None:
    assert tokenize(array) == tokenize(array.copy())
    assert tokenize(array) == tokenize(np.array(array, order="F"))
    if array.ndim >= 2:
        assert tokenize(array.T) == tokenize(np.ascontiguousarray(array.T))
    if array.size > 1 and array.ndim == 1:
        assert tokenize(array) != tokenize(array.reshape(1, -1))


# ---- pandas -----------------------------------------------------------------------------------


def frame() -> pd.DataFrame:
    return pd.DataFrame({"a": [1, 2, 3], "b": [0.5, None, 2.5], "c": ["x", "y", None]},
                        index=pd.Index([10, 20, 30], name="id"))


def test_frames_by_schema_and_data() -> None:
    df = frame()
    assert tokenize(df) == tokenize(frame())
    assert tokenize(df) == tokenize(pickle.loads(pickle.dumps(df)))
    changed = frame()
    changed.loc[20, "a"] = 5
    assert tokenize(df) != tokenize(changed)
    assert tokenize(df) != tokenize(df.rename(columns={"a": "A"}))
    assert tokenize(df) != tokenize(df.astype({"a": "int32"}))
    assert tokenize(df) != tokenize(df.set_axis([10, 20, 31]))
    assert tokenize(df) != tokenize(df[["b", "a", "c"]])
    assert tokenize(df) != tokenize(df.rename_axis("key"))
    # NaN in a float column vs a value: both visible.
    assert tokenize(pd.DataFrame({"x": [np.nan]})) != tokenize(pd.DataFrame({"x": [0.0]}))


def test_series_and_categoricals() -> None:
    s = pd.Series([1.0, 2.0], name="s")
    assert tokenize(s) == tokenize(pd.Series([1.0, 2.0], name="s"))
    assert tokenize(s) != tokenize(s.rename("t"))
    assert tokenize(s) != tokenize(s.to_frame())
    cat = pd.Series(["a", "b", "a"], dtype="category")
    assert tokenize(cat) == tokenize(pd.Series(["a", "b", "a"], dtype="category"))
    assert tokenize(cat) != tokenize(pd.Series(["a", "b", "a"]))
    assert tokenize(cat) != tokenize(cat.cat.reorder_categories(["b", "a"]))
    multi = pd.DataFrame({"v": [1, 2]},
                         index=pd.MultiIndex.from_tuples([("a", 1), ("b", 2)]))
    assert tokenize(multi) != tokenize(multi.swaplevel())


# ---- user objects -----------------------------------------------------------------------------


def test_user_objects_by_class_and_state() -> None:
    assert tokenize(Point(1, 2)) == tokenize(Point(1, 2))
    assert tokenize(Point(1, 2)) != tokenize(Point(2, 1))
    assert tokenize(Point(1, 2)) != tokenize(Point(1.0, 2))
    assert tokenize(Slotted(1, [2])) == tokenize(Slotted(1, [2]))
    assert tokenize(Slotted(1, [2])) != tokenize(Slotted(1, [3]))

    # Attribute order is an accident of construction.
    p, q = Point(1, 2), Point.__new__(Point)
    q.y, q.x = 2, 1
    assert tokenize(p) == tokenize(q)


def test_user_objects_by_class_code() -> None:
    source = """
    class Thing:
        def __init__(self, v):
            self.v = v

        def scale(self):
            return self.v * {factor}
    """
    one = exec_cell(source.format(factor=2))["Thing"]
    same = exec_cell(source.format(factor=2).replace("self.v = v", "self.v = v  # kept"))["Thing"]
    other = exec_cell(source.format(factor=3))["Thing"]
    assert tokenize(one(1)) == tokenize(same(1))  # type: ignore[operator]
    assert tokenize(one(1)) != tokenize(other(1))  # type: ignore[operator]


def test_token_hook_for_user_types() -> None:
    class Conn:
        def __init__(self, url: str):
            self.url = url
            self.lock = threading.Lock()

        def __nbindustria_token__(self) -> str:
            return self.url

    assert tokenize(Conn("a")) == tokenize(Conn("a"))
    assert tokenize(Conn("a")) != tokenize(Conn("b"))


def test_functions_as_values_by_code() -> None:
    assert tokenize(double) == tokenize(double)
    assert tokenize(functools.partial(double)) != tokenize(double)
    assert tokenize(functools.partial(pow, 2)) != tokenize(functools.partial(pow, 3))
    assert tokenize(len) == tokenize(len)
    assert tokenize(math) == tokenize(math)


# ---- values that cannot be hashed ----------------------------------------------------------------


class Model:
    def __init__(self) -> None:
        self.weights = [1, 2]
        self.lock = threading.Lock()


@pytest.mark.parametrize("value, where", [
    (threading.Lock(), "value"),
    ((i for i in range(3)), "value"),
    ({"model": Model()}, "value['model'].lock"),
    ([1, [2, threading.RLock()]], "value[1][1]"),
    (io.BytesIO(b"x"), "value"),
])
def test_unhashable_values_name_the_path(value: Any, where: str) -> None:
    with pytest.raises(HashingError) as info:
        tokenize(value)
    assert isinstance(info.value, Unhashable)
    assert info.value.path == where


def test_open_file_is_unhashable(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f, pytest.raises(HashingError):
        tokenize({"out": f})


# ---- code -------------------------------------------------------------------------------------


def test_normalized_source_ignores_layout_comments_and_docstrings() -> None:
    base = normalized_source_digest("def f(x):\n    return x * 2\n")
    assert base is not None
    same = [
        "def f(x):\n    # double it\n    return x * 2  # twice\n",
        "def f(x):\n\n\n    return (x *\n            2)\n",
        'def f(x):\n    """Double."""\n    return x * 2\n',
        "    def f(x):\n        return x*2\n",
        "@task(cpus=4, retries=2)\ndef f(x):\n    return x * 2\n",
        "@pipe.task\ndef f(x):\n    return x * 2\n",
    ]
    for text in same:
        assert normalized_source_digest(text) == base, text
    different = [
        "def f(x):\n    return x * 3\n",
        "def f(y):\n    return y * 2\n",
        "def f(x):\n    return 2 * x\n",
        "def f(x):\n    x = x\n    return x * 2\n",
        "@functools.cache\ndef f(x):\n    return x * 2\n",
        "def f(x):\n    return x * 2.0\n",
    ]
    for text in different:
        assert normalized_source_digest(text) != base, text


def test_code_digest_reaches_helpers_globals_closures_defaults() -> None:
    ns = exec_cell("""
    SCALE = 2
    def helper2(x):
        return x + 1
    def helper(x):
        return helper2(x) * SCALE
    def f(x, k=3):
        return helper(x) + k
    """)
    digest = CodeHasher().info(ns["f"]).digest
    assert CodeHasher().info(ns["f"]).digest == digest
    ns["SCALE"] = 3
    assert CodeHasher().info(ns["f"]).digest != digest
    ns["SCALE"] = 2
    assert CodeHasher().info(ns["f"]).digest == digest
    exec_cell("def helper2(x):\n    return x + 2\n", ns)
    assert CodeHasher().info(ns["f"]).digest != digest
    exec_cell("def helper2(x):\n    # back again\n    return x + 1\n", ns)
    assert CodeHasher().info(ns["f"]).digest == digest
    ns["f"].__defaults__ = (4,)  # type: ignore[attr-defined]
    assert CodeHasher().info(ns["f"]).digest != digest


def test_code_manifest_names_what_was_reached() -> None:
    ns = exec_cell("""
    LIMIT = 10
    def helper(x):
        return min(x, LIMIT)
    def f(x):
        return helper(x)
    """)
    manifest = CodeHasher().info(ns["f"]).manifest
    assert {"__cell__.f", "__cell__.helper", "__cell__.helper:LIMIT"} <= set(manifest)
    assert manifest["__cell__.helper:LIMIT"]["summary"] == "10"
    assert "return min(x, LIMIT)" in manifest["__cell__.helper"]["source"]


def test_mutual_recursion_never_hides_an_edit() -> None:
    source = """
    def a(n):
        return 0 if n <= 0 else b(n - 1) + {inc}
    def b(n):
        return 0 if n <= 0 else a(n - 1) + 1
    """
    before = exec_cell(source.format(inc=1))
    after = exec_cell(source.format(inc=2))
    for first in ("a", "b"):
        h1, h2 = CodeHasher(), CodeHasher()
        # Hash a first (b is then met inside a's recursion), then b on its own.
        h1.info(before[first])
        h2.info(after[first])
        assert h1.info(before["b"]).digest != h2.info(after["b"]).digest
        assert h1.info(before["a"]).digest != h2.info(after["a"]).digest
    # ...and a digest does not depend on what was hashed before it (no needless miss).
    for name in ("a", "b"):
        warm = CodeHasher()
        warm.info(before["a" if name == "b" else "b"])
        assert warm.info(before[name]).digest == CodeHasher().info(before[name]).digest
    fib = exec_cell("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n")
    assert CodeHasher().info(fib["fib"]).digest == CodeHasher().info(fib["fib"]).digest


def test_registry_of_functions_that_reads_itself() -> None:
    ns = exec_cell("""
    def f(x):
        return HANDLERS["g"](x)
    def g(x):
        return x + 1
    HANDLERS = {"f": f, "g": g}
    """)
    digest = CodeHasher().info(ns["f"]).digest
    exec_cell("def g(x):\n    return x + 2\n", ns)
    ns["HANDLERS"]["g"] = ns["g"]  # type: ignore[index]
    assert CodeHasher().info(ns["f"]).digest != digest


def test_cached_helpers_by_their_code() -> None:
    source = """
    import functools

    @functools.lru_cache(maxsize=None)
    def helper(x):
        return x + {k}

    def f(x):
        return helper(x)
    """
    one, same, other = (exec_cell(source.format(k=k)) for k in (1, 1, 2))
    assert CodeHasher().info(one["f"]).digest == CodeHasher().info(same["f"]).digest
    assert CodeHasher().info(one["f"]).digest != CodeHasher().info(other["f"]).digest
    assert tokenize(one["helper"]) != tokenize(other["helper"])  # as an argument too


def test_lambdas_on_one_line_differ() -> None:
    ns = exec_cell("a, b = (lambda x: x + 1), (lambda x: x + 2)\n")
    assert CodeHasher().info(ns["a"]).digest != CodeHasher().info(ns["b"]).digest
    again = exec_cell("a, b = (lambda x: x + 1), (lambda x: x + 2)\n")
    assert CodeHasher().info(ns["a"]).digest == CodeHasher().info(again["a"]).digest


def test_unhashable_global_names_the_global() -> None:
    ns = exec_cell("""
    import threading
    GUARD = threading.Lock()
    def f(x):
        with GUARD:
            return x
    """)
    with pytest.raises(HashingError, match="GUARD"):
        CodeHasher().info(ns["f"])


def test_library_functions_by_version_not_source() -> None:
    info = CodeHasher().info(np.mean)
    assert info.digest.startswith("lib:numpy.mean:numpy==")
    assert CodeHasher().info(os.path.join).digest.startswith("lib:")


# ---- properties -------------------------------------------------------------------------------

# A fixed alphabet (with non-ASCII, astral and NUL characters) keeps Hypothesis from building
# its Unicode tables, which costs seconds per process.
texts = st.text(alphabet="ab\x00 é\u00ff\u4e2d\U0001f600", max_size=8)
leaves = (st.none() | st.booleans() | st.integers() | st.integers(-3, 3)
          | st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 1.0, 1])
          | texts | st.binary(max_size=8))
hashables = st.recursive(leaves, lambda inner: st.tuples(inner, inner) | st.frozensets(inner,
                         max_size=4), max_leaves=8)
values = st.recursive(
    leaves | hashables,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(texts | st.integers(), inner, max_size=4)
                   | st.sets(hashables, max_size=4) | st.frozensets(hashables, max_size=4)),
    max_leaves=20)


def canon(value: Any) -> Any:
    """What nbindustria promises to tell apart: types, float bits, order except in sets."""
    if value is None or isinstance(value, bool):
        return (type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, (str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(canon(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((canon(k), canon(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, frozenset(canon(v) for v in value))
    raise AssertionError(f"unexpected {value!r}")


def rebuilt(value: Any) -> Any:
    """An equal value built afresh, sets filled in another order."""
    if isinstance(value, list):
        return [rebuilt(v) for v in value]
    if isinstance(value, tuple):
        return tuple(rebuilt(v) for v in value)
    if isinstance(value, dict):
        return {rebuilt(k): rebuilt(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        items = [rebuilt(v) for v in value][::-1]
        return type(value)(items)
    if isinstance(value, (str, bytes)):
        return type(value)(value[:0]) + value  # a new object where the type allows
    return value


@settings(max_examples=150)
@given(values)
def test_property_equal_values_give_equal_tokens(value: Any) -> None:
    assert tokenize(value) == tokenize(rebuilt(value))
    assert tokenize(value) == tokenize(pickle.loads(pickle.dumps(value)))


@settings(max_examples=150)
@given(values, values)
def test_property_different_values_give_different_tokens(a: Any, b: Any) -> None:
    assert (tokenize(a) == tokenize(b)) == (canon(a) == canon(b))


@settings(max_examples=100)
@given(st.lists(values, min_size=1, max_size=5), st.data())
def test_property_one_changed_leaf_changes_the_token(items: list[Any], data: st.DataObject
                                                     ) -> None:
    i = data.draw(st.integers(0, len(items) - 1))
    replacement = data.draw(values)
    changed = [*items[:i], replacement, *items[i + 1:]]
    assert (tokenize(items) == tokenize(changed)) == (canon(items) == canon(changed))


# ---- determinism across interpreters -------------------------------------------------------------


class TokenServer:
    """A fresh interpreter under a given PYTHONHASHSEED that tokenizes pickled values."""

    def __init__(self, seed: str):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(TESTS))
        self.proc = subprocess.Popen([sys.executable, str(TESTS / "helpers_tasks.py"), "tokens"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     text=False)

    def token(self, value: Any) -> str:
        data = pickle.dumps(value)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers() -> Any:
    started = [TokenServer(seed) for seed in ("0", "1", "random")]
    yield started
    for server in started:
        server.close()


def fixed_values() -> list[Any]:
    words = {f"w{i}" for i in range(100)}
    return [
        words,
        frozenset(words),
        {"b": {"x", "y", "z"}, "a": [1, 2.5, None]},
        {frozenset({"p", "q"}): 1, ("t", 1): {"s", "u"}},
        frame(),
        pd.Series(["a", "b"], dtype="category"),
        Point({"k1", "k2", "k3"}, [Point(1, 2)]),
        Slotted(np.arange(10), {"z", "y"}),
        np.arange(30.0).reshape(5, 6).T,
        double,
    ]


@pytest.mark.slow
def test_tokens_agree_across_interpreters_and_hash_seeds(servers: list[TokenServer]) -> None:
    for value in fixed_values():
        here = tokenize(value)
        there = [server.token(value) for server in servers]
        assert there == [here] * len(servers), value


@pytest.mark.slow
@settings(max_examples=60)
@given(values)
def test_property_tokens_agree_across_hash_seeds(servers: list[TokenServer], value: Any) -> None:
    here = tokenize(value)
    assert [server.token(value) for server in servers] == [here] * len(servers)
