"""Why a task will run, or ran: what changed in its code, its arguments or its inputs.

The explanation compares the call as it is now with the most recent stored result of the same
call (same task, same arguments by identity), or, for a call never run, with the closest stored
call of the same task. Code changes are shown per function or value the task reaches, with a
unified diff of the source.
"""

from __future__ import annotations

import datetime
import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from .store import IndexRow, Store


@dataclass
class Explanation:
    """``str()`` gives the readable form; ``reasons`` the one-line causes."""

    label: str
    status: str  # "cached", "will run", "ran", "failed", "skipped"
    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.label}: {self.status}"]
        lines += [f"  - {reason}" for reason in self.reasons]
        if self.details:
            lines.append("")
            lines += self.details
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        return f"```text\n{self}\n```"


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def diff_manifests(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[list[str],
                                                                             list[str]]:
    """(reasons, diff lines) between two code manifests."""
    if old is None:
        return ["its code changed (the earlier code was not recorded)"], []
    reasons: list[str] = []
    details: list[str] = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if before is None:
            reasons.append(f"it now reaches {name}")
            continue
        if after is None:
            reasons.append(f"it no longer reaches {name}")
            continue
        if before.get("digest") == after.get("digest"):
            continue
        kind = after.get("kind")
        if kind in ("function", "class"):
            reasons.append(f"code of {name} changed")
            diff = difflib.unified_diff(
                str(before.get("source", "")).splitlines(), str(after.get("source", "")).splitlines(),
                fromfile=f"{name} (before)", tofile=f"{name} (now)", lineterm="")
            details.extend(diff)
        elif kind == "value":
            reasons.append(f"value of {name} changed: {before.get('summary')} -> "
                           f"{after.get('summary')}")
        elif kind == "library":
            reasons.append(f"{name}: {before.get('version')} -> {after.get('version')}")
        else:
            reasons.append(f"{name} changed")
    return reasons or ["its code changed"], details


def explain(store: Store, *, label: str, task: str, node_id: str, key: str | None,
            code_digest: str, manifest: dict[str, Any], arg_digests: dict[str, str] | None,
            arg_summaries: dict[str, str], upstream_params: set[str], env: str,
            forced: bool, last_reason: str, state: str) -> Explanation:
    """Build the explanation. ``key`` is None when an input has no result yet."""
    if state in ("failed", "skipped"):
        return Explanation(label, state, [last_reason] if last_reason else [])
    if key is None:
        return Explanation(label, "will run", ["an input has no result yet, so it runs first"])
    # present() indexes an entry it finds on disk only: its whole row is then in the index.
    row = store.index.get_many([key]).get(key) if store.present([key]) else None
    if row is not None and not forced:
        reasons = [f"cache hit: computed {_when(row.created)} in "
                   f"{row.duration if row.duration is not None else 0:.3g} s"]
        if state == "done" and last_reason:
            status = "ran"
            reasons.insert(0, f"it ran in the last run: {last_reason}")
        else:
            status = "cached"
        return Explanation(label, status, reasons)
    if forced:
        return Explanation(label, "will run", ["forced by rerun"])
    previous = store.index.query("node = ?", (node_id,), limit=1)
    if previous:
        return _compare(store, label, previous[0], code_digest, manifest, arg_digests,
                        arg_summaries, upstream_params, env)
    others = store.index.query("task = ?", (task,), limit=200)
    if not others:
        return Explanation(label, "will run", [f"{task} has never run (no stored result)"])
    # The closest earlier call: most arguments with the same digest.
    def overlap(row: IndexRow) -> int:
        old = json.loads(row.arg_digests or "{}")
        return sum(1 for k, v in (arg_digests or {}).items() if old.get(k) == v)

    closest = max(others, key=overlap)
    reasons = ["never run with these arguments"]
    old_digests = json.loads(closest.arg_digests or "{}")
    old_summaries = json.loads(closest.args or "{}")
    for name, digest in (arg_digests or {}).items():
        if old_digests.get(name) != digest:
            reasons.append(f"argument {name}: {old_summaries.get(name, '?')} -> "
                           f"{arg_summaries.get(name, '?')} (closest stored call: "
                           f"{closest.label})")
    return Explanation(label, "will run", reasons)


def _compare(store: Store, label: str, previous: IndexRow, code_digest: str,
             manifest: dict[str, Any], arg_digests: dict[str, str] | None,
             arg_summaries: dict[str, str], upstream_params: set[str], env: str) -> Explanation:
    reasons: list[str] = []
    details: list[str] = []
    if previous.code_digest != code_digest:
        if code_digest.startswith("version:") or previous.code_digest.startswith("version:"):
            reasons.append(f"declared version changed: {previous.code_digest} -> {code_digest}")
        else:
            more, diff = diff_manifests(store.index.get_code(previous.code_digest), manifest)
            reasons += more
            details += diff
    old_digests = json.loads(previous.arg_digests or "{}")
    old_summaries = json.loads(previous.args or "{}")
    for name, digest in (arg_digests or {}).items():
        if old_digests.get(name) == digest:
            continue
        if name in upstream_params:
            reasons.append(f"the result of an input changed: {name}={arg_summaries.get(name)}")
        else:
            reasons.append(f"argument {name} changed: {old_summaries.get(name, '?')} -> "
                           f"{arg_summaries.get(name, '?')}")
    if not reasons:
        reasons.append(f"the environment changed ({env}) or the stored entry is gone")
    reasons.append(f"previous result: {_when(previous.created)}")
    return Explanation(label, "will run", reasons, details)
