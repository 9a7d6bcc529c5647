"""A writer that dies at any step of a commit leaves whole, verified entries or none.

A subprocess commits a group of entries and exits (``os._exit(99)``, no clean-up) at one step of
``Store.commit``; another is killed with SIGKILL while it writes a large array. Then this process
opens the cache: every key loads with its exact value or is a clean miss (no warning: warnings
are errors here), and ``verify_all`` finds nothing bad.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_tasks import commit_key, commit_value

from nbindustria.store import Store

TESTS = Path(__file__).parent
HELPER = str(TESTS / "helpers_tasks.py")
N = 5

CRASH_POINTS = ["after-sign-one", "after-sign", "after-sync-data", "after-first-rename",
                "after-rename", "after-sync-rename"]


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and bool(np.array_equal(a, b)))
    return bool(a == b)


def check_cache(cache: Path, keys: Path, n: int) -> dict[str, int]:
    """Every key whole or a clean miss; returns how many of each."""
    counts = {"whole": 0, "miss": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged entry would warn: that is a failure here
        store = Store(cache, keys)
        try:
            present = store.present([commit_key(i) for i in range(n)])
            for i in range(n):
                ok, value = store.try_load(commit_key(i))
                if ok:
                    assert equal(value, commit_value(i)), i
                    assert commit_key(i) in present
                    counts["whole"] += 1
                else:
                    assert value is None
                    assert commit_key(i) not in present
                    counts["miss"] += 1
            assert store.verify_all(quarantine=False) == {}
            assert list(store.quarantine_dir.iterdir()) == []
            # The cache goes on working: commit again over whatever the crash left.
            for i in range(n):
                store.put(commit_key(i), commit_value(i))
            assert all(equal(store.load(commit_key(i)), commit_value(i)) for i in range(n))
            assert store.verify_all(quarantine=False) == {}
        finally:
            store.close()
    return counts


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_during_commit(tmp_path: Path, point: str) -> None:
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    env = dict(os.environ, NBINDUSTRIA_TEST_CRASH_AT=point, PYTHONPATH=str(TESTS))
    proc = subprocess.run([sys.executable, HELPER, "commit", str(cache), str(keys), str(N)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 99, proc.stderr
    assert "staged" in proc.stdout and "committed" not in proc.stdout
    counts = check_cache(cache, keys, N)
    expected_whole = {"after-sign-one": 0, "after-sign": 0, "after-sync-data": 0,
                      "after-first-rename": 1, "after-rename": N, "after-sync-rename": N}[point]
    assert counts == {"whole": expected_whole, "miss": N - expected_whole}


def test_commit_without_a_crash(tmp_path: Path) -> None:
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    proc = subprocess.run([sys.executable, HELPER, "commit", str(cache), str(keys), str(N)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert check_cache(cache, keys, N) == {"whole": N, "miss": 0}


def _partial_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "entries").rglob("*.part")] + \
        [p for p in (cache / "tmp").glob("*") if p.is_file()]


@pytest.mark.slow
def test_kill_while_writing_a_large_array(tmp_path: Path) -> None:
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    megabytes = 200
    total = megabytes << 20
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    proc = subprocess.Popen([sys.executable, HELPER, "big", str(cache), str(keys),
                             str(megabytes)], env=env, stdout=subprocess.PIPE, text=True)
    killed_at = None
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            for part in _partial_files(cache):
                try:
                    size = part.stat().st_size
                except FileNotFoundError:  # renamed into place meanwhile
                    continue
                if 0 < size < total // 2:
                    killed_at = size
                    proc.send_signal(signal.SIGKILL)
                    break
            if killed_at is not None:
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert killed_at is not None, "the writer finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    leftovers = _partial_files(cache)
    assert leftovers, "the half-written file is left for clean-up, never renamed into place"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = Store(cache, keys)
        try:
            assert equal(store.load(commit_key(0)), commit_value(0))  # the earlier entry
            assert store.try_load(commit_key(1)) == (False, None)  # the big one: a clean miss
            assert store.present([commit_key(1)]) == {}
            assert store.verify_all(quarantine=False) == {}
            assert sorted(store.keys()) == [commit_key(0)]
            # Staged files of crashed writers are removed once they are old.
            for path in leftovers:
                os.utime(path, (time.time() - 2 * 86400,) * 2)
            store._clean_tmp()
            assert _partial_files(cache) == []
        finally:
            store.close()
