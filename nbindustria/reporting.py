"""The text interface of a run: ndustria-style lines, a progress bar, a one-line summary.

It is one more subscriber of the event log (of its packed events: see events.py); the dashboard is
another.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from .events import (
    ADDED,
    CACHED,
    DONE,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUN_END,
    RUN_START,
    RUNNING,
    SKIPPED,
    Event,
)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


class TextReporter:
    """Prints what happens to each task, as ndustria did, plus a progress bar on a terminal.

    ``verbose``: 0 prints only the summary and failures; 1 (default) every task line.
    ``timeit`` adds durations to the lines and the slowest tasks to the summary; ``memcheck``
    adds peak memory.
    """

    def __init__(self, stream: TextIO | None = None, *, verbose: int = 1, timeit: bool = True,
                 memcheck: bool = False, progress: bool | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.verbose = verbose
        self.timeit = timeit
        self.memcheck = memcheck
        isatty = getattr(self.stream, "isatty", None)
        self.progress = progress if progress is not None else bool(isatty and isatty())
        self._bar: Any = None
        self._durations: list[tuple[float, str]] = []

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")

    def __call__(self, event: Event) -> None:
        kind = event.kind
        if kind == RUN_START:
            self._durations.clear()
            info = event.info
            if self.verbose:
                self._write(f"--- {info.get('pipeline')}: starting a run with "
                            f"{info.get('tasks')} tasks on {info.get('engines')} ---")
            if self.progress:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=int(str(info.get("tasks", 0))), unit="task",
                                 file=sys.stderr, leave=False, dynamic_ncols=True)
            return
        if kind == RUN_END:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._summary(event)
            return
        if kind in FINAL_STATES and self._bar is not None:
            self._bar.update(len(event.nodes()))
        if event.group is not None:  # a packed event (events.py): a line per node, as ever
            if kind == CACHED and self.verbose and self._bar is None:
                # A level of hits (a fully cached run is made of these): one write, from the
                # label column, rather than an event per member and a write per line.
                self.stream.write("".join([f"[Cache hit!] {label} can be skipped\n"
                                           for label in event.group["label"]]))
                return
            if kind == FAILED or (self.verbose and kind not in (ADDED, RUNNING)):
                for member in event.members():
                    self._line(member)
            return
        self._line(event)

    def _line(self, event: Event) -> None:
        """The line of one node's event (ndustria's wording)."""
        kind = event.kind
        if kind == FAILED:
            self._write(f"[Failed] {event.label}: {event.error}")
            return
        if not self.verbose:
            return
        if kind == CACHED:
            self._write(f"[Cache hit!] {event.label} can be skipped")
        elif kind == QUEUED:
            self._write(f"[Added Task] {event.label}" + (f"  ({event.reason})"
                                                          if event.reason else ""))
        elif kind == DONE:
            extra = []
            if self.timeit and event.duration is not None:
                extra.append(format_seconds(event.duration))
                self._durations.append((event.duration, event.label))
            if self.memcheck and event.peak_memory is not None:
                extra.append(f"peak {format_bytes(event.peak_memory)}")
            if event.engine and event.engine != "kernel":
                extra.append(event.engine)
            where = event.info.get("path", "")
            self._write(f"Saved result of {event.label}" + (f" to {where}" if where else "") +
                        (f" ({', '.join(extra)})" if extra else ""))
        elif kind == SKIPPED:
            self._write(f"[Skipped] {event.label}: {event.reason}")
        # ADDED and RUNNING print nothing: the queued, cached and saved lines say more.

    def _summary(self, event: Event) -> None:
        info = event.info
        if info.get("dryrun"):
            return
        line = (f"--- ran {info.get('ran')}, cached {info.get('cached')}, failed "
                f"{info.get('failed')}, skipped {info.get('skipped')} in "
                f"{format_seconds(float(str(info.get('wall', 0.0))))}")
        if info.get("interrupted"):
            line += " (interrupted: finished results are kept)"
        self._write(line + " ---")
        if self.timeit and self.verbose and len(self._durations) > 1:
            slowest = sorted(self._durations, reverse=True)[:5]
            self._write("slowest: " + "; ".join(f"{label} {format_seconds(d)}"
                                                for d, label in slowest))
