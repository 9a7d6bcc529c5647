"""Run every benchmark (each in its own process, one after the other) and print a summary.

Every ``bench_*.py`` here is run: first the four of issue 2 (cached re-run, hashing, loading,
writing), then the others in name order.

    python3 benchmarks/run_all.py              # the real sizes, 5+ repetitions each (long)
    python3 benchmarks/run_all.py --quick      # smoke run: tiny sizes, seconds
    python3 benchmarks/run_all.py --only hash_array load_array --repeat 9
    python3 benchmarks/run_all.py --core       # only the four benchmarks of issue 2
    python3 benchmarks/run_all.py --markdown   # also print the tables in RESULTS.md's format

Exits 0 when every benchmark ran (whether or not its goals are met), 1 if one failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORE = ("cached_rerun", "hash_array", "load_array", "write_entries")  # issue 2's goals
BENCHMARKS = CORE + tuple(sorted(
    p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py")
    if p.stem.removeprefix("bench_") not in CORE))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--repeat", type=int, help="repetitions per measure (default: each "
                                              "benchmark's own)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    p.add_argument("--core", action="store_true",
                   help=f"run only the benchmarks of issue 2 ({', '.join(CORE)})")
    p.add_argument("--markdown", action="store_true",
                   help="also print the results as Markdown tables (for RESULTS.md)")
    args = p.parse_args()
    results: list[dict] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nbi-bench-all-", dir="/tmp") as tmp:
        for name in args.only or (CORE if args.core else BENCHMARKS):
            script = HERE / f"bench_{name}.py"
            out = Path(tmp) / f"{name}.json"
            # Scripts built on _bench.parser write JSON; others are summarized from their
            # "ratio:" lines.
            takes_json = "--json" in script.read_text() or "parser(" in script.read_text()
            cmd = [sys.executable, str(script)] + (["--json", str(out)] if takes_json else [])
            if args.quick:
                cmd.append("--quick")
            if args.repeat:
                cmd += ["--repeat", str(args.repeat)]
            print(f"\n$ {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            lines = []
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line.rstrip("\n"))
            code = proc.wait()
            if code != 0:
                failed.append(name)
                print(f"!! {name} failed (exit {code})", flush=True)
                continue
            if out.exists():
                data = json.loads(out.read_text())
            else:
                data = {"title": name, "machine": {"summary": "see its output"}, "rows": [],
                        "ratios": [], "notes": [], "quick": args.quick, "repeat": args.repeat,
                        "ratio_lines": [ln for ln in lines if ln.startswith("ratio")]}
            data["wall"] = time.perf_counter() - t0
            results.append(data)
    print("\n" + "=" * 100)
    print("Summary (headline goals; every ratio line is in each benchmark's output above)")
    for data in results:
        print(f"\n{data['title']}  [{data['wall']:.0f} s, {data['machine']['summary']}]")
        for q in data["ratios"]:
            if q["headline"]:
                print("  " + _ratio_text(q))
        for line in data.get("ratio_lines", []):
            print("  " + line)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    if args.markdown:
        print("\n" + "\n\n".join(markdown(d) for d in results if d["rows"]))
    return 1 if failed else 0


def _ratio_text(q: dict) -> str:
    sys.path.insert(0, str(HERE))
    from _bench import ratio_text

    return ratio_text(q)


def markdown(data: dict) -> str:
    """One benchmark's results as a Markdown section."""
    from _bench import _digits, fmt_time

    lines = [f"### {data['title']}", "",
             f"{data['machine']['summary']}; medians of {data['repeat']} repetitions"
             + (" (--quick: meaningless sizes)" if data["quick"] else ""), "",
             "| measure | median | min .. max | cpu | rate |", "|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        spread = (f"{fmt_time(r['min'])} .. {fmt_time(r['max'])}" if r["min"] is not None
                  else "")
        cpu = fmt_time(r["cpu"]) if r.get("cpu") is not None else ""
        rate = f"{r['value']:,.{_digits(r['value'])}f} {r['metric']}"
        measure = ("↳ " if r["measure"].startswith(" ") else "") + r["measure"].strip()
        lines.append(f"| {measure} | {fmt_time(r['seconds'])} | {spread} | {cpu} "
                     f"| {rate} |")
    lines += ["", "| ratio | measured | goal | met? |", "|---|---:|---:|---|"]
    for q in data["ratios"]:
        value = f"{q['value']:.{_digits(q['value'])}f}{q['unit']}"
        sign = "<=" if q.get("at_most") else ">="
        goal = f"{sign} {q['goal']:g}{q['unit']}" if q["goal"] is not None else "(context)"
        met = "" if q["met"] is None else ("**yes**" if q["met"] else "**no**")
        lines.append(f"| {q['text']} | {value} | {goal} | {met} |")
    for n in data["notes"]:
        lines.append(f"\nNote: {n}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
