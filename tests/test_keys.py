"""Node ids and cache keys of calls (nbindustria/keys.py), and golden digests pinned here.

If a golden digest below changes, every user's cache is invalidated: that needs a deliberate
decision (bump ``ENCODING_VERSION`` with a migration note), never a refactor's side effect.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers_tasks import Point
from support import exec_cell

from nbindustria.hashing import ENCODING_VERSION, CodeHasher, tokenize
from nbindustria.keys import (
    arg_digests,
    bind,
    cache_key,
    code_digest_of,
    encode_call,
    node_id,
)
from nbindustria.task import Handle, Task, TaskOptions

GOLDEN_SOURCE = '''
def fit(data, alpha=0.1, *, tags=()):
    """Fit a model (the docstring does not count)."""
    scale = 2  # neither does this comment
    return [x * alpha * scale for x in data], tags
'''


def golden_task(**options: Any) -> Task[Any, Any]:
    ns = exec_cell(GOLDEN_SOURCE, module_name="golden")
    return Task(ns["fit"], TaskOptions(name="fit", **options))  # type: ignore[arg-type]


def upstream(task: Task[Any, Any], nid: str, digest: str | None) -> Handle[Any]:
    handle: Handle[Any] = Handle(task, (), {}, nid, None)  # type: ignore[arg-type]
    handle.digest = digest
    return handle


def golden_values() -> dict[str, Any]:
    return {
        "none": None, "true": True, "false": False, "zero": 0, "one": 1, "minus": -1,
        "big": 2**100, "float": 1.0, "negzero": -0.0, "inf": float("inf"),
        "complex": complex(1, 2), "empty": "", "text": "héllo wörld", "bytes": b"\x00\xff",
        "bigbytes": bytes(range(256)) * 20, "list": [1, "a"], "tuple": (1, "a"),
        "dict": {"b": 1, "a": [2.5]}, "set": {"x", "y", "z"}, "frozenset": frozenset({1, 2}),
        "range": range(5), "slice": slice(1, None, 2),
        "array": np.arange(6, dtype="<i8").reshape(2, 3),
        "farray": np.linspace(0.0, 1.0, 1000).reshape(10, 100).T,
        "np_scalar": np.float32(1.5),
        # 17.6 MB: hashed as a tree of 8 MiB chunks (hashing._TREE_CHUNK)
        "treearray": np.arange(2_200_000, dtype="<f8"),
        "frame": pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "c": [0.5, None]}),
        "series": pd.Series([1.5, None], name="s"),
    }


# Value tokens do not depend on the Python version.
GOLDEN_TOKENS = {
    "none": "626d368fe0e74b4f1a038927df1311d6",
    "true": "1d33c0bd3511c80d20948828081ddcb4",
    "false": "ccebad3393972e4a79bf233aa9bae29f",
    "zero": "c4b0e8711462b30061bbe43dc27d4be9",
    "one": "35a7977e072ba88f8ca561550b4c1966",
    "minus": "06aca6afad22d9db4fdc8ca029616897",
    "big": "54204413613a80e43824db35f86fda00",
    "float": "dfb9c18a60c46aba610be337e70fece0",
    "negzero": "f6b43928ce5e5192820ab6b29963bd6b",
    "inf": "7a8db524dbae2e094b793d59b1f88687",
    "complex": "18241665f5512a88f22cbdad161e5be9",
    "empty": "85fefc6f12f345b396720846b631026c",
    "text": "4dfa3adbc3907100db15e94178485793",
    "bytes": "24251eb20df7680b752b6c4fb861d3de",
    "bigbytes": "32ff5be790dd4ed07ae8d12f0f819d02",
    "list": "df757576a61877e6ab77c9ab9f7859bb",
    "tuple": "4fc4e9c4be93a2212c088f89aa885552",
    "dict": "c9fae0abbfc8258156ad43a34326262b",
    "set": "7fc08f2b5b817669dc1cb71ddc2aaa0c",
    "frozenset": "e5d6af3909285524c58b2ede5328d61a",
    "range": "f3b049ced2c7bb51f26f35bd00cf6b7c",
    "slice": "33bfdf2de938db2f27a2797ef4517d50",
    "array": "3c7a9c7bc630b2e33a325b324c18e435",
    "farray": "d11b8f167875ba1510e669ad33eab1b5",
    "np_scalar": "f4db7728fa6fa6996a124ed440273a53",
    "treearray": "7e0ef2112d25de0018ee976fd5b8f1f0",
    "frame": "b403194ebf803ed46525e4433e843175",
    "series": "b1ffc829528d2f53533f445bb3ccf35e",
}

# Keys of calls with a fixed code digest and environment: independent of the Python version.
GOLDEN_CALL_KEYS = {
    "node": "eff861f830015f2cd1aa9ec3f948efcd",
    "key": "39902261f3564d8fb90f444e8b605730",
    "node_default": "9dc2b6e4b5f1a8c8be29fb2da346cd04",
    "key_default": "ccc17b2f656634866f813216a1d0cffe",
}

# Code digests hash the syntax tree, whose form belongs to the Python version (and the key has
# the version in it anyway): pinned per version.
GOLDEN_CODE = {
    (3, 11): {"fit": "80cd56dabeff8acb59caa52b203ea6eb", "point": "a94b45419c51268d19f51cd9c98295ab"},
}


def test_encoding_version() -> None:
    assert ENCODING_VERSION == 1


@pytest.mark.parametrize("name", sorted(GOLDEN_TOKENS))
def test_golden_tokens(name: str) -> None:
    assert tokenize(golden_values()[name]) == GOLDEN_TOKENS[name]


def golden_call_keys() -> dict[str, str]:
    fit = golden_task()
    up = upstream(fit, "ab" * 16, "cd" * 16)
    enc = encode_call(fit, ([up, 3.0],), {"alpha": 0.5, "tags": ("x",)})
    enc_default = encode_call(fit, ([1, 2],), {})
    code, env = "0123456789abcdef" * 2, "python-3.11"
    return {"node": node_id(fit, enc), "key": cache_key(fit, code, enc, env),
            "node_default": node_id(fit, enc_default),
            "key_default": cache_key(fit, code, enc_default, env)}


def test_golden_call_keys() -> None:
    assert golden_call_keys() == GOLDEN_CALL_KEYS


def golden_code() -> dict[str, str]:
    return {"fit": code_digest_of(golden_task(), CodeHasher())[0],
            "point": tokenize(Point(1, 2))}


def test_golden_code_digests() -> None:
    version = sys.version_info[:2]
    if version not in GOLDEN_CODE:  # code digests hash syntax trees, which differ by version
        message = (f"no golden code digests for Python {version}: add them (print "
                   "golden_code()) after checking that nothing else changed")
        if os.environ.get("NBINDUSTRIA_FULL_SUITE"):  # CI's Python must be pinned
            pytest.fail(message)
        pytest.skip(message)
    assert golden_code() == GOLDEN_CODE[version]


# ---- one node per call -----------------------------------------------------------------------


def test_positional_keyword_and_default_are_one_node() -> None:
    ns = exec_cell("def f(x=1, y=2):\n    return x + y\n")
    f = Task(ns["f"], TaskOptions(name="f"))  # type: ignore[arg-type]
    ids = {node_id(f, encode_call(f, args, kwargs)) for args, kwargs in [
        ((1,), {}), ((), {"x": 1}), ((), {}), ((1, 2), {}), ((), {"y": 2, "x": 1})]}
    assert len(ids) == 1
    assert node_id(f, encode_call(f, (2,), {})) not in ids


def test_bind_names_the_task_on_a_bad_call() -> None:
    ns = exec_cell("def f(x):\n    return x\n")
    f = Task(ns["f"], TaskOptions(name="f"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^f\(\): "):
        bind(f, (1, 2), {})


def test_options_that_do_not_change_results_are_not_keyed() -> None:
    plain = golden_task()
    tuned = golden_task(cpus=4, memory=2**30, gpus=1, retries=3, resources={"disk": 2},
                        rerun=True)
    enc = encode_call(plain, ([1, 2],), {})
    code = CodeHasher()
    assert code_digest_of(plain, code) == code_digest_of(tuned, CodeHasher())
    digest = code_digest_of(plain, code)[0]
    assert cache_key(plain, digest, enc, "e") == cache_key(tuned, digest, enc, "e")
    assert node_id(plain, enc) == node_id(tuned, enc)


def test_declared_version_replaces_the_code_digest() -> None:
    v1, v2 = golden_task(version="1"), golden_task(version="2")
    assert code_digest_of(v1, CodeHasher())[0] == "version:1"
    assert code_digest_of(v2, CodeHasher())[0] == "version:2"


def test_key_depends_on_code_arguments_environment_and_upstream_digests() -> None:
    fit = golden_task()
    up = upstream(fit, "ab" * 16, "cd" * 16)
    enc = encode_call(fit, ([up],), {})
    base = cache_key(fit, "c1", enc, "e1")
    assert cache_key(fit, "c2", enc, "e1") != base
    assert cache_key(fit, "c1", enc, "e2") != base
    assert cache_key(fit, "c1", encode_call(fit, ([up],), {"alpha": 0.2}), "e1") != base
    node = node_id(fit, enc)
    up.digest = "ef" * 16  # the upstream re-ran to other bytes
    assert cache_key(fit, "c1", enc, "e1") != base
    assert node_id(fit, enc) == node  # the same call
    up.digest = "cd" * 16  # ...or to the same bytes: dependents stay cached
    assert cache_key(fit, "c1", enc, "e1") == base


def test_argument_boundaries_are_keyed() -> None:
    ns = exec_cell("def f(a, b):\n    return a, b\n")
    f = Task(ns["f"], TaskOptions(name="f"))  # type: ignore[arg-type]
    first = node_id(f, encode_call(f, ("ab", "c"), {}))
    assert node_id(f, encode_call(f, ("a", "bc"), {})) != first
    assert node_id(f, encode_call(f, ("c", "ab"), {})) != first


def test_handles_in_containers_are_placeholders_in_order() -> None:
    fit = golden_task()
    a = upstream(fit, "aa" * 16, "11" * 16)
    b = upstream(fit, "bb" * 16, "22" * 16)
    ab = encode_call(fit, ([a, b],), {})
    ba = encode_call(fit, ([b, a],), {})
    assert ab.handles == [a, b]
    assert node_id(fit, ab) != node_id(fit, ba)
    assert cache_key(fit, "c", ab, "e") != cache_key(fit, "c", ba, "e")
    nested = encode_call(fit, ({"k": (a, [b])},), {})
    assert nested.handles == [a, b]
    assert arg_digests(ab) != arg_digests(ba)


def test_sets_of_handles_do_not_depend_on_iteration_order() -> None:
    fit = golden_task()
    keys = set()
    nodes = set()
    for trial in range(20):
        # New handle objects each time: their ids (and so set order) differ.
        hs = [upstream(fit, f"{i:02d}" * 16, f"{9 - i:02d}" * 16) for i in range(6)]
        order = hs[trial % 6:] + hs[:trial % 6]
        enc = encode_call(fit, (set(order),), {})
        nodes.add(node_id(fit, enc))
        keys.add(cache_key(fit, "c", enc, "e"))
    assert len(nodes) == 1 and len(keys) == 1


@pytest.mark.parametrize("args, kwargs", [
    ((1,), {"tags": 0}), ((1.5, "x"), {"tags": None}), ((None,), {"tags": True}),
    (("UP",), {"tags": 1}), (("UP", "UP2"), {"tags": ""}), (("UP", 2), {"tags": "UP2"}),
    ((-0.0,), {"tags": 2**70}), ((b"raw", "UP"), {"tags": "UP2"}), (("UP",), {}),
])
def test_fast_encoding_of_simple_calls_is_the_general_encoding(
        args: tuple[Any, ...], kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls whose arguments are scalars or handles take a shortcut; it must write exactly
    the bytes of the general encoder (node ids and keys of every user depend on it)."""
    import nbindustria.keys as keys

    fit = golden_task()
    ups = {"UP": upstream(fit, "a" * 32, "d" * 32), "UP2": upstream(fit, "b" * 32, "e" * 32)}
    args = tuple(ups.get(a, a) if isinstance(a, str) else a for a in args)
    kwargs = {k: ups.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}

    def digests() -> tuple[str, str, dict[str, str]]:
        enc = encode_call(fit, args, kwargs)
        return node_id(fit, enc), cache_key(fit, "code", enc, "py"), arg_digests(enc)

    fast = digests()
    monkeypatch.setattr(keys, "_simple_call", lambda arguments: None)
    assert digests() == fast
