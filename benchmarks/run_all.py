"""Run every benchmark (each in its own process, one after the other) and print a summary.

    python3 benchmarks/run_all.py              # the real sizes, 5+ repetitions each (a few minutes)
    python3 benchmarks/run_all.py --quick      # smoke run: tiny sizes, seconds
    python3 benchmarks/run_all.py --only hash_array load_array --repeat 9
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
BENCHMARKS = ("cached_rerun", "hash_array", "load_array", "write_entries")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--repeat", type=int, help="repetitions per measure (default: each "
                                              "benchmark's own)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    p.add_argument("--markdown", action="store_true",
                   help="also print the results as Markdown tables (for RESULTS.md)")
    args = p.parse_args()
    results: list[dict] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nbi-bench-all-", dir="/tmp") as tmp:
        for name in args.only or BENCHMARKS:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--json", str(out)]
            if args.quick:
                cmd.append("--quick")
            if args.repeat:
                cmd += ["--repeat", str(args.repeat)]
            print(f"\n$ {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=HERE)
            if proc.returncode != 0 or not out.exists():
                failed.append(name)
                print(f"!! {name} failed (exit {proc.returncode})", flush=True)
                continue
            data = json.loads(out.read_text())
            data["wall"] = time.perf_counter() - t0
            results.append(data)
    print("\n" + "=" * 100)
    print("Summary (headline goals; every ratio line is in each benchmark's output above)")
    for data in results:
        print(f"\n{data['title']}  [{data['wall']:.0f} s, {data['machine']['summary']}]")
        for q in data["ratios"]:
            if q["headline"]:
                print("  " + _ratio_text(q))
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    if args.markdown:
        print("\n" + "\n\n".join(markdown(d) for d in results))
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
