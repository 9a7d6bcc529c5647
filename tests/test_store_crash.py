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


def helper_env(**extra: str) -> dict[str, str]:
    """The environment of a helper process: it imports this checkout's nbindustria too."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


PACKED = [i for i in range(N) if i % 3 != 2]  # the helper packs these; the others have a file


@pytest.mark.parametrize("how", ["kernel", "engine"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_during_commit(tmp_path: Path, point: str, how: str) -> None:
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    proc = subprocess.run([sys.executable, HELPER, "commit", str(cache), str(keys), str(N), how],
                          env=helper_env(NBINDUSTRIA_TEST_CRASH_AT=point),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 99, proc.stderr
    assert "staged" in proc.stdout and "committed" not in proc.stdout
    counts = check_cache(cache, keys, N)
    # The segment is renamed first: once it is in place (even if the index never heard of
    # it), all its records are there; the files of their own follow one by one.
    expected_whole = {"after-sign-one": 0, "after-sign": 0, "after-sync-data": 0,
                      "after-first-rename": len(PACKED), "after-rename": N,
                      "after-sync-rename": N}[point]
    assert counts == {"whole": expected_whole, "miss": N - expected_whole}


@pytest.mark.parametrize("how", ["kernel", "engine"])
def test_commit_without_a_crash(tmp_path: Path, how: str) -> None:
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    proc = subprocess.run([sys.executable, HELPER, "commit", str(cache), str(keys), str(N), how],
                          env=helper_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # The engine's part file is gone once its records are committed; one segment holds them.
    assert [p.name for p in (cache / "entries" / "packs").iterdir()
            if not p.name.endswith(".nbs")] == []
    assert len(list((cache / "entries" / "packs").glob("*.nbs"))) == 1
    assert check_cache(cache, keys, N) == {"whole": N, "miss": 0}
    # check_cache committed every key again: the first segment's copies were dropped.
    assert sorted(p.name.split(".")[1] for p in (cache / "entries" / "packs").glob("*.nbs")) \
        == ["0"] * N  # put() packs every one of these small values


@pytest.mark.parametrize("point", ["", "compact-after-rename"])
def test_crash_while_deleting_from_a_segment(tmp_path: Path, point: str) -> None:
    """Deleting records rewrites their segment; a crash between the new file's rename and the
    index update leaves the rewrite done: the deleted entries never come back, not even when
    the index is rebuilt, and the other records load."""
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    proc = subprocess.run([sys.executable, HELPER, "commit", str(cache), str(keys), str(N),
                           "delete"], env=helper_env(NBINDUSTRIA_TEST_CRASH_AT=point),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == (99 if point else 0), proc.stderr
    assert "staged" in proc.stdout
    deleted = {commit_key(1), commit_key(3)}
    for rebuild in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            store = Store(cache, keys)
            try:
                if rebuild:
                    assert store.rebuild_index() == N - len(deleted)
                assert set(store.keys()) == {commit_key(i) for i in range(N)} - deleted
                for i in range(N):
                    ok, value = store.try_load(commit_key(i))
                    assert ok == (commit_key(i) not in deleted), i
                    assert not ok or equal(value, commit_value(i))
                assert store.verify_all(quarantine=False) == {}
                # One generation of the segment is left, and it holds only what is live.
                (segment,) = (cache / "entries" / "packs").glob("*.nbs")
                assert segment.name.endswith(".1.nbs")
            finally:
                store.close()


def _partial_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "entries").rglob("*.part")] + \
        [p for p in (cache / "tmp").glob("*") if p.is_file()]


@pytest.mark.slow
def test_kill_while_writing_a_large_array(tmp_path: Path) -> None:
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    megabytes = 200
    total = megabytes << 20
    env = helper_env()
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
