"""Importable helpers for tests that need a fresh interpreter.

``python helpers_tasks.py tokens``: reads pickled values (length-prefixed) on stdin and writes one
token per value on stdout: a token server, so that Hypothesis can compare tokens made under other
``PYTHONHASHSEED`` values without starting a process per example.

``python helpers_tasks.py commit CACHE KEYS N``: commits N small entries in one group (the crash
tests set ``NBINDUSTRIA_TEST_CRASH_AT`` so that it dies at one step of the commit).

``python helpers_tasks.py big CACHE KEYS MB``: stages and commits one large array (the test kills
it with SIGKILL while it writes).
"""

from __future__ import annotations

import pickle
import struct
import sys
from typing import Any


class Point:
    """A plain user object: hashed by its class's code and its state."""

    def __init__(self, x: Any, y: Any):
        self.x = x
        self.y = y

    def norm(self) -> Any:
        return (self.x**2 + self.y**2) ** 0.5

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a: Any, b: Any):
        self.a = a
        self.b = b


def double(x: Any) -> Any:
    return x * 2


def commit_value(i: int) -> Any:
    """The value the crash tests commit under key number ``i`` (exactly reproducible)."""
    if i % 2:
        import numpy as np

        return np.arange(1000 * (i + 1), dtype=np.float64) * (i + 0.5)
    return {"i": i, "text": "x" * (100 * i), "items": list(range(i * 10))}


def commit_key(i: int) -> str:
    return f"{i:02d}" + "c0ffee" * 5


def _token_server() -> None:
    from nbindustria.hashing import tokenize

    stdin, stdout = sys.stdin.buffer, sys.stdout
    while True:
        head = stdin.read(8)
        if len(head) < 8:
            return
        (size,) = struct.unpack("<Q", head)
        value = pickle.loads(stdin.read(size))
        try:
            token = tokenize(value)
        except Exception as exc:  # reported to the test, which fails on it
            token = f"error: {type(exc).__name__}: {exc}"
        stdout.write(token + "\n")
        stdout.flush()


def _commit(cache: str, keys: str, n: int, how: str = "kernel") -> None:
    """Commit ``n`` entries in one group: every third one in a file of its own, the others as
    records of the group's segment, staged in memory (``kernel``) or in an engine's part file
    (``engine``). ``delete``: commit them all, then delete keys 1 and 3 (a segment rewrite)."""
    from nbindustria.store import SegmentWriter, Store, stage_value

    store = Store(cache, keys)
    writer = SegmentWriter(store.entries_dir) if how == "engine" else None
    staged = [stage_value(store.entries_dir, commit_key(i), commit_value(i), {"label": f"v{i}"},
                          label=f"v{i}", pack=False if i % 3 == 2 else None, segment=writer)
              for i in range(n)]
    if writer is not None:
        writer.close()
        for item in staged:
            item.part_records = writer.count
    if how == "delete":
        store.commit(staged)
        print("staged", flush=True)
        store.delete([commit_key(1), commit_key(3)])
        print("committed", flush=True)
        return
    print("staged", flush=True)
    store.commit(staged)
    print("committed", flush=True)


def _big(cache: str, keys: str, megabytes: int) -> None:
    import numpy as np

    from nbindustria.store import Store, stage_value

    store = Store(cache, keys)
    store.put(commit_key(0), commit_value(0))  # a good entry that must survive the kill
    array = np.arange(megabytes * (1 << 20) // 8, dtype=np.float64)
    print("writing", flush=True)
    staged = stage_value(store.entries_dir, commit_key(1), array, {"label": "big"}, label="big")
    store.commit([staged])
    print("committed", flush=True)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "tokens":
        _token_server()
    elif command == "commit":
        _commit(sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])
    elif command == "big":
        _big(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {command!r}")
