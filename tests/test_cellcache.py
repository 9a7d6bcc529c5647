"""``%%cache``: what a cell reads and binds (from its syntax tree), and the cache in a real kernel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_magics import Kernel, kernel_env

from nbindustria.cellcache import _default_name, analyze


def io(source: str) -> tuple[list[str], list[str]]:
    a = analyze(source)
    assert not a.problems, a.problems
    return sorted(a.inputs), sorted(a.outputs)


# ---- detection (pure) ----------------------------------------------------------------------


def test_augmented_assignment_reads_then_binds() -> None:
    assert io("total += x\n") == (["total", "x"], ["total"])
    assert io("total = 0\ntotal += x\n") == (["x"], ["total"])


def test_name_read_then_rebound_is_an_input_and_an_output() -> None:
    assert io("y = y * 2\nz = y + w\n") == (["w", "y"], ["y", "z"])
    assert io("a = 1\nb = a\n") == ([], ["a", "b"])  # bound before read: not an input


def test_imports_bind_names_and_are_keyed_as_modules() -> None:
    a = analyze("import numpy as np\nimport os.path\nfrom math import sqrt as s\nr = np.sqrt(s(q))")
    assert sorted(a.inputs) == ["q"]
    assert sorted(a.outputs) == ["np", "os", "r", "s"]
    assert a.modules == {"numpy", "os.path", "math"}
    assert a.imported == {"np", "os", "s"}


def test_del_needs_the_name_and_makes_it_an_output() -> None:
    a = analyze("del old\n")
    assert "old" in a.inputs and a.deletes == {"old"} and "old" in a.outputs
    assert io("tmp = 1\ndel tmp\n")[1] == ["tmp"]


def test_loops_may_run_zero_times() -> None:
    inputs, outputs = io("for i in range(n):\n    acc = acc + i\nlast = i\n")
    # acc is read; i and acc are bound only if the loop runs, so what was there counts too
    assert inputs == ["acc", "i", "n", "range"] and outputs == ["acc", "i", "last"]
    inputs, outputs = io("while cond:\n    found = step()\n")
    assert "found" in inputs and outputs == ["found"]


def test_branches_bind_for_sure_only_on_every_path() -> None:
    assert "out" not in io("if flag:\n    out = 1\nelse:\n    out = 2\nprint(out)")[0]
    assert "out" in io("if flag:\n    out = 1\nprint(out)")[0]
    assert "v" in io("try:\n    v = f()\nexcept ValueError:\n    pass\n")[0]


def test_comprehensions_have_their_own_scope() -> None:
    inputs, outputs = io("sq = [v * k for v in vals if v > lim]\n"
                         "d = {a: b for a, b in pairs}\n")
    assert inputs == ["k", "lim", "pairs", "vals"] and outputs == ["d", "sq"]
    inputs, outputs = io("w = [(t := f(v)) for v in vals]\n")  # the walrus binds out here
    assert "t" in outputs and "v" not in outputs


def test_attribute_and_subscript_assignment_read_the_object() -> None:
    inputs, outputs = io("obj.attr = 3\nd[key] = val\nlst.append(4)\n")
    assert inputs == ["d", "key", "lst", "obj", "val"] and outputs == []


def test_functions_read_globals_where_they_are_defined() -> None:
    a = analyze("def f(a, b=dflt):\n    c = a + K\n    return helper(c)\nres = f(1)\n")
    assert sorted(a.inputs) == ["K", "dflt", "helper"]
    assert sorted(a.outputs) == ["f", "res"] and a.defined == {"f"}
    lam = analyze("sq = lambda v: v * scale\n")
    assert lam.inputs == {"scale"} and lam.defined == {"sq"}


def test_methods_do_not_see_the_class_body() -> None:
    a = analyze("class A(Base):\n    x = 1\n    def m(self):\n        return x\n")
    assert sorted(a.inputs) == ["Base", "x"]  # m's x is the module's x


def test_global_statement_in_a_function_binds_the_module_name() -> None:
    a = analyze("def g():\n    global G\n    G = G + 1\ng()\n")
    assert "G" in a.inputs and "G" in a.outputs


def test_with_and_match() -> None:
    inputs, outputs = io("with open(path) as fh:\n    text = fh.read()\n")
    assert inputs == ["open", "path", "text"] and outputs == ["fh", "text"]  # the body may stop
    inputs, outputs = io("match point:\n    case (px, 0):\n        kind = 'x'\n")
    assert "point" in inputs and {"px", "kind"} <= set(outputs)


@pytest.mark.parametrize(("source", "problem"), [
    ("from os import *\n", "import *"),
    ("exec('x = 1')\n", "exec()"),
    ("globals()['x'] = 1\n", "globals()"),
    ("get_ipython().run_line_magic('time', 'x = 1')\n", "runs a magic"),
    ("print(_)\n", "output history"),
    ("y = Out[3]\n", "output history"),
])
def test_cells_that_hide_their_reads_or_writes_are_not_cached(source: str, problem: str) -> None:
    assert any(problem in p for p in analyze(source).problems)


def test_shell_escapes_and_throwaway_underscore_are_fine() -> None:
    assert io("files = get_ipython().getoutput('ls')\n") == (["get_ipython"], ["files"])
    assert io("for _ in range(3):\n    n = 1\n")[1] == ["n"]


def test_default_name_is_the_first_values_the_cell_makes() -> None:
    a = analyze("import numpy as np\ndef f():\n    pass\ndata = 1\nstats = 2\nmore = 3\n")
    assert _default_name(a, "") == "data,stats,..."


# ---- in a kernel -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    k = Kernel(kernel_env(tmp_path_factory.mktemp("cells")))
    k.ok("%load_ext nbindustria\n%pipeline config dashboard=false\nimport numpy as np")
    yield k
    k.close()


def hit(text: str, name: str) -> bool:
    return f"[Cache hit!] %%cache {name}:" in text


def stored(text: str, name: str) -> bool:
    return f"[Cached] %%cache {name}:" in text


@pytest.mark.notebook
def test_hit_restores_outputs_deletions_imports_functions_and_replays(kernel: Kernel) -> None:
    k = kernel
    cell = """
        %%cache --name prep
        import math as m
        print("computing")
        values = [m.sqrt(i) for i in range(n)]
        def scaled(v):
            return v * FACTOR
        del gone
        values[-1]
        """
    k.ok("n = 5\nFACTOR = 2\ngone = 'x'")
    first = k.ok(cell)
    assert stored(first.stdout, "prep") and "computing" in first.stdout
    assert "first run" in first.stdout
    k.ok("del values, scaled, m\ngone = 'x'")
    again = k.ok(cell)
    assert hit(again.stdout, "prep") and "computing" in again.stdout  # replayed
    assert again.displays[-1]["text/plain"] == "2.0"
    check = k.ok("print(values[-1], m.pi > 3, 'gone' in dir(), scaled(1))")
    assert check.stdout.split() == ["2.0", "True", "False", "2"]
    # the function was defined again from the cell: it reads the live namespace
    assert k.ok("FACTOR = 10\nprint(scaled(1))").stdout.strip() == "10"
    src = k.ok("import inspect\nprint(inspect.getsource(scaled))").stdout
    assert "return v * FACTOR" in src


@pytest.mark.notebook
def test_changed_input_or_called_code_misses_and_why_says_so(kernel: Kernel) -> None:
    k = kernel
    k.ok("def weight(v):\n    return v + 1\nsize = 3")
    cell = "%%cache --name weigh\nweights = [weight(v) for v in range(size)]\nprint(weights)"
    assert stored(k.ok(cell).stdout, "weigh")
    assert hit(k.ok(cell).stdout, "weigh")
    k.ok("size = 4")
    why = k.ok("%pipeline why weigh").stdout
    assert "will run" in why and "argument size changed: 3 -> 4" in why
    changed = k.ok(cell)
    assert stored(changed.stdout, "weigh") and "input changed: size" in changed.stdout
    k.ok("def weight(v):\n    # a comment only\n    return v + 1")
    assert hit(k.ok(cell).stdout, "weigh")
    k.ok("def weight(v):\n    return v + 2")
    why = k.ok("%pipeline why weigh").stdout
    assert "code of __main__.weight changed" in why and "+    return v + 2" in why
    assert stored(k.ok(cell).stdout, "weigh")


@pytest.mark.notebook
def test_inputs_the_cell_mutates_are_restored_too(kernel: Kernel) -> None:
    k = kernel
    k.ok("class Box:\n    pass\nbox = Box()\nlog = []\ntable = {}")
    cell = ("%%cache --name mutate\nlog.append('ran')\nbox.size = len(log)\n"
            "table['k'] = 1\ncount = len(log)")
    assert stored(k.ok(cell).stdout, "mutate")
    k.ok("log = []\nbox = Box()\ntable = {}")
    assert hit(k.ok(cell).stdout, "mutate")
    shown = k.ok("print(log, box.size, table, count)").stdout
    assert shown.strip() == "['ran'] 1 {'k': 1} 1"


@pytest.mark.notebook
def test_cells_that_cannot_be_cached_still_run_with_a_warning(kernel: Kernel) -> None:
    k = kernel
    k.ok("import threading\nlock = threading.Lock()")
    cell = "%%cache --name locked\nwith lock:\n    z = 2\nprint('z is', z)"
    ran = k.ok(cell)
    assert "z is 2" in ran.stdout and "CellCacheWarning" in ran.stderr
    assert "'lock' cannot be hashed" in ran.stderr
    magic = k.ok("%%cache --name timed\n%time w = 1")
    assert "runs a magic" in magic.stderr and k.ok("print(w)").stdout.strip() == "1"
    failing = k.run("%%cache --name broken\nraise ValueError('no')")
    assert [e["ename"] for e in failing.errors] == ["ValueError", "CellFailed"]
    assert "%%cache broken" not in k.ok("%pipeline graph").stdout.split("cached cells")[0]


@pytest.mark.notebook
def test_graph_has_edges_from_tasks_and_cells(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    k.ok("from nbindustria import task\n@task\ndef source(n):\n    return list(range(n))")
    k.ok("%%pipeline run\nsrc = source(4)")
    k.ok("%%cache --name doubled\ndoubled = [2 * v for v in src]")
    k.ok("%%cache --name total\ntotal = sum(doubled)")
    graph = k.ok("%pipeline graph").stdout
    assert "%%cache doubled  <- source(4)" in graph
    assert "%%cache total  <- %%cache doubled" in graph
    dot = k.ok("%pipeline graph --dot").stdout
    assert '"%%cache doubled" -> "%%cache total";' in dot
    cleared = k.ok("%pipeline clear total").stdout
    assert "1 stored result(s) deleted" in cleared
    assert stored(k.ok("%%cache --name total\ntotal = sum(doubled)").stdout, "total")
