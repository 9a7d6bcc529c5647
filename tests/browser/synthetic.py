"""A synthetic run, as the scheduler would record it: ~60 tasks on 2 engines, one failing.

Used by tests/test_dashboard.py and by the browser test's notebook until the core's Pipeline can
run a real one. The graph is a small data-mining pipeline::

    load -> clean x6 -> features x12 -> fit x24 -> evaluate x12 -> summary x4 -> report

``load`` and ``clean`` are cache hits, ``fit`` number 5 fails, so one ``evaluate``, one ``summary``
and ``report`` are skipped. Times are simulated (list scheduling on the engines) and deterministic.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import threading
import time
from collections.abc import Iterable

from nbindustria.events import (
    ADDED,
    CACHED,
    DONE,
    FAILED,
    QUEUED,
    RUN_END,
    RUN_START,
    RUNNING,
    SKIPPED,
    Event,
    EventLog,
)

FAILING = "fit(features=features[5], alpha=0.3)"
ERROR = "ValueError: alpha=0.3 diverged: loss is nan after 12 iterations"
TRACEBACK = """Traceback (most recent call last):
  File "/opt/nbindustria/worker.py", line 88, in run_task
    value = function(*args, **kwargs)
  File "<ipython-input-4-2f1c>", line 14, in fit
    model = train(df, alpha=alpha, max_iter=200)
  File "<ipython-input-3-98ab>", line 31, in train
    raise ValueError(f"alpha={alpha} diverged: loss is nan after {i} iterations")
ValueError: alpha=0.3 diverged: loss is nan after 12 iterations
"""


def _node_id(label: str) -> str:
    return hashlib.blake2b(label.encode(), digest_size=8).hexdigest()


def _graph() -> list[tuple[str, str, list[str]]]:
    """(task, label, dep labels) in dependency order."""
    nodes: list[tuple[str, str, list[str]]] = [("load", 'load(path="data/sales.parquet")', [])]
    clean = [f"clean(df=load, region={r})" for r in range(6)]
    nodes += [("clean", label, [nodes[0][1]]) for label in clean]
    features = [f"features(df=clean[{i % 6}], window={7 * (1 + i // 6)})" for i in range(12)]
    nodes += [("features", label, [clean[i % 6]]) for i, label in enumerate(features)]
    fits = [f"fit(features=features[{i // 2}], alpha={(0.1, 0.3)[i % 2]})" for i in range(24)]
    nodes += [("fit", label, [features[i // 2]]) for i, label in enumerate(fits)]
    evaluate = [f"evaluate(models=fit[{2 * m}:{2 * m + 2}])" for m in range(12)]
    nodes += [("evaluate", e, [fits[2 * m], fits[2 * m + 1]]) for m, e in enumerate(evaluate)]
    summary = [f"summary(scores=evaluate[{3 * s}:{3 * s + 3}])" for s in range(4)]
    nodes += [("summary", label, evaluate[3 * s : 3 * s + 3]) for s, label in enumerate(summary)]
    nodes.append(("report", "report(summaries=summary[0:4])", summary))
    return nodes


def synthetic_events(
    n_engines: int = 2, seed: int = 7, start: float | None = None, all_cached: bool = False
) -> list[Event]:
    """The events of one run, in the order the scheduler would emit them.

    ``all_cached``: the second run of the same pipeline, where every task that succeeded before
    is a cache hit (the failed one runs and fails again; what depends on it is skipped again).
    """
    rng = random.Random(seed)
    nodes = _graph()
    ids = {label: _node_id(label) for _, label, _ in nodes}
    base = {"load": 2.0, "clean": 0.6, "features": 1.2, "fit": 2.4, "evaluate": 0.5,
            "summary": 0.3, "report": 0.2}
    mem = {"load": 900, "clean": 320, "features": 450, "fit": 1400, "evaluate": 260,
           "summary": 120, "report": 90}
    t0 = start if start is not None else time.time()  # the run starts now (times run ahead)
    events: list[Event] = [Event(RUN_START, time=t0, info={
        "pipeline": "sales-forecast", "engines": f"local cluster, {n_engines} engines",
        "n_engines": n_engines, "run": 2 if all_cached else 1,
        "memory_limit": 4 * 1024**3})]
    for task, label, deps in nodes:
        events.append(Event(ADDED, node=ids[label], task=task, label=label, time=t0 + 0.01,
                            deps=tuple(ids[d] for d in deps)))
    state: dict[str, str] = {}
    finish: dict[str, float] = {}
    engines = [(t0 + 0.05, e) for e in range(n_engines)]  # (free at, engine number)
    heapq.heapify(engines)
    timed: list[Event] = []
    for task, label, deps in nodes:
        node = ids[label]
        key = hashlib.sha256(label.encode()).hexdigest()[:32]
        ready = max([finish[ids[d]] for d in deps], default=t0 + 0.05)
        recorded = round(base[task] * rng.uniform(0.6, 1.5), 3)
        if any(state[ids[d]] in (FAILED, SKIPPED) for d in deps):
            state[node] = SKIPPED
            failed_dep = next(d for d in deps if state[ids[d]] in (FAILED, SKIPPED))
            timed.append(Event(SKIPPED, node=node, task=task, label=label, time=ready,
                               reason=f"upstream task {failed_dep} did not finish"))
            finish[node] = ready
            continue
        if task in ("load", "clean") or (all_cached and label != FAILING):
            state[node] = CACHED
            timed.append(Event(CACHED, node=node, task=task, label=label, time=ready + 0.002,
                               duration=recorded, key=key, size=int(mem[task] * 2**20 * 0.3)))
            finish[node] = ready + 0.002
            continue
        free, engine = heapq.heappop(engines)
        began = max(free, ready)
        duration = recorded
        ended = began + duration
        heapq.heappush(engines, (ended + 0.01, engine))
        where = f"engine {engine} (worker-{engine % 2}.lab:{4100 + engine})"
        timed.append(Event(QUEUED, node=node, task=task, label=label, time=ready))
        timed.append(Event(RUNNING, node=node, task=task, label=label, time=began,
                           engine=where))
        peak = int(mem[task] * 2**20 * rng.uniform(0.7, 1.3))
        if label == FAILING:
            state[node] = FAILED
            ended = began + duration * 0.4
            timed.append(Event(FAILED, node=node, task=task, label=label, time=ended,
                               engine=where, started=began, ended=ended,
                               duration=ended - began, cpu=(ended - began) * 0.95,
                               peak_memory=peak, error=ERROR, traceback=TRACEBACK, key=key))
        else:
            state[node] = DONE
            reason = "never run" if not all_cached else "code of fit changed"
            if task == "fit" and not all_cached:
                reason = "code of fit changed"
            timed.append(Event(DONE, node=node, task=task, label=label, time=ended,
                               engine=where, started=began, ended=ended, duration=duration,
                               cpu=duration * rng.uniform(0.8, 0.99), peak_memory=peak,
                               size=int(peak * 0.2), key=key, reason=reason))
        finish[node] = ended
    timed.sort(key=lambda e: e.time)
    events += timed
    end = max(e.time for e in events) + 0.05
    counts: dict[str, int] = {}
    for kind in state.values():
        counts[kind] = counts.get(kind, 0) + 1
    events.append(Event(RUN_END, time=end, info={**counts, "wall_time": end - t0}))
    return events


def synthetic_log(**options: object) -> EventLog:
    """An EventLog holding one finished synthetic run."""
    log = EventLog()
    log.extend(synthetic_events(**options))  # type: ignore[arg-type]
    return log


def replay(log: EventLog, events: Iterable[Event], seconds: float = 2.0) -> None:
    """Append ``events`` to ``log`` paced over ``seconds`` of real time, as a live run would.

    The events keep their own (simulated) times: only the pace of appending is compressed.
    """
    events = list(events)
    if not events:
        return
    first, last = events[0].time, events[-1].time
    scale = seconds / max(last - first, 1e-9)
    began = time.monotonic()
    for event in events:
        pause = began + (event.time - first) * scale - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        log.append(event)


def replay_in_thread(
    log: EventLog, events: Iterable[Event], seconds: float = 2.0
) -> threading.Thread:
    """:func:`replay` in a daemon thread (a run that goes on while the kernel is idle)."""
    thread = threading.Thread(target=replay, args=(log, list(events), seconds), daemon=True)
    thread.start()
    return thread
