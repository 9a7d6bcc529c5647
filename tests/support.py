"""Helpers shared by the core tests (imported as `support`: a module named conftest would clash
with tests/browser/conftest.py when the whole suite runs)."""

from __future__ import annotations

import importlib
import linecache
import os
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any


class Counter:
    """Counts real executions: a task calls ``hit(name)``, which appends a line to a file.

    Its only state is the file's path, so a task that reads a Counter global keeps its key.
    """

    def __init__(self, path: Path):
        self.path = str(path)

    def hit(self, name: str) -> None:
        with open(self.path, "a") as out:
            out.write(name + "\n")

    def __getitem__(self, name: str) -> int:
        try:
            with open(self.path) as f:
                return sum(1 for line in f if line.rstrip("\n") == name)
        except FileNotFoundError:
            return 0

    def total(self) -> int:
        try:
            with open(self.path) as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0


class ModuleWriter:
    """Writes user modules into a directory on sys.path, imports them, edits and reloads them.

    ``inspect.getsource`` reads the real file, as it does for a user's own modules.
    """

    def __init__(self, root: Path, log: Path):
        self.root = root
        self.log = str(log)
        self.names: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(root))

    def write(self, name: str, source: str) -> Path:
        path = self.root / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(source).replace("{LOG}", repr(self.log))
        old_mtime = path.stat().st_mtime if path.exists() else 0.0
        path.write_text(text)
        # A distinct mtime: linecache and the import system see every edit.
        mtime = max(time.time(), old_mtime + 1.0)
        os.utime(path, (mtime, mtime))
        linecache.checkcache(str(path))
        importlib.invalidate_caches()
        return path

    def load(self, name: str, source: str | None = None) -> ModuleType:
        """(Re)write ``name`` if source is given, then import it, or reload it if imported."""
        if source is not None:
            self.write(name, source)
        if name in sys.modules:
            module = importlib.reload(sys.modules[name])
        else:
            module = importlib.import_module(name)
            self.names.append(name)
        return module

    def count(self, name: str) -> int:
        return Counter(Path(self.log))[name]

    def close(self) -> None:
        for name in self.names:
            sys.modules.pop(name, None)
        while str(self.root) in sys.path:
            sys.path.remove(str(self.root))


_cells = 0  # numbers the fake cells: each gets a file name of its own


def exec_cell(source: str, namespace: dict[str, object] | None = None,
              module_name: str = "__cell__") -> dict[str, object]:
    """Run source as a notebook cell does: under a fresh fake file name registered in
    linecache (so inspect.getsource finds it), in a namespace that may be shared."""
    global _cells
    _cells += 1
    text = textwrap.dedent(source)
    filename = f"<cell-{_cells}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    ns: dict[str, object] = namespace if namespace is not None else {}
    ns.setdefault("__name__", module_name)
    exec(compile(text, filename, "exec"), ns)
    return ns


def flip_last_payload_byte(store: Any, key: str) -> None:
    """Damage an entry where it is stored (its own file, or its record in a segment)."""
    from nbindustria.store import read_header

    path, offset, _packed = store.locate(key)
    _sig, _hb, header, payload_offset = read_header(path, offset)
    data = bytearray(Path(path).read_bytes())
    data[payload_offset + int(header["length"]) - 1] ^= 0xFF
    Path(path).write_bytes(bytes(data))
