"""A full disk stops a run cleanly: nothing half-written, nothing stored lost, a clear error, and
the next run (with space again) resumes from what was stored.

The disk is real: a 2 MiB tmpfs mounted for the test (root only; the full suite, as CI runs it,
fails rather than skips where it cannot mount). A result too large for a file-size limit
(RLIMIT_FSIZE, any user) fails its own task only.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nbindustria import Pipeline, PipelineError, StoreFullError
from nbindustria.store import Store

TESTS = Path(__file__).parent


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        why = f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
        if os.environ.get("NBINDUSTRIA_FULL_SUITE"):
            pytest.fail(why + " (the full suite needs root, as CI has)")
        pytest.skip(why)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _run_tasks(cache: Path, keys: Path, log: Path) -> tuple[Pipeline, list]:
    pipe = Pipeline(name="full", cache_dir=cache, key_dir=keys, stream=io.StringIO())

    @pipe.task
    def make(i: int) -> np.ndarray:
        with open(log, "a") as out:
            out.write(f"make {i}\n")
        return np.full(40_000, float(i))  # 320 kB: a file of its own

    @pipe.task
    def small(i: int) -> dict[str, int]:
        with open(log, "a") as out:
            out.write(f"small {i}\n")
        return {"i": i}

    return pipe, [make(i) for i in range(10)] + [small(i) for i in range(20)]


def _expected(i: int) -> object:
    return np.full(40_000, float(i)) if i < 10 else {"i": i - 10}


def _same(a: object, b: object) -> bool:
    if isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and bool(np.array_equal(a, b))
    return a == b


def test_full_disk_stops_the_run_and_the_next_run_resumes(small_disk: Path,
                                                          tmp_path: Path) -> None:
    cache, keys, log = small_disk / "cache", tmp_path / "keys", tmp_path / "calls.log"
    pipe, handles = _run_tasks(cache, keys, log)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damaged entry may ever be seen
        with pytest.raises(StoreFullError) as caught:
            pipe.run()
    message = str(caught.value)
    assert str(cache) in message and "the disk is full (No space left on device)" in message
    assert "resumes" in message and "nbindustria gc" in message
    stored = [i for i, h in enumerate(handles) if h.state == "done"]
    assert all(h.state == "added" for i, h in enumerate(handles) if i not in stored)
    for i in stored:  # what counted as done is whole
        assert _same(handles[i].result(), _expected(i))
    assert pipe.store.verify_all(quarantine=False) == {}
    assert not list((cache / "tmp").iterdir())  # staged results were removed: space is back
    pipe.close()
    ran_first = log.read_text().splitlines()

    # Space again: the next run resumes; results stored before are hits, never run again.
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    log.unlink()
    pipe, handles = _run_tasks(cache, keys, log)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = pipe.run()
    assert summary.failed == 0 and summary.ran + summary.cached == 30
    assert summary.cached >= len(stored)
    ran_again = log.read_text().splitlines()
    assert len(ran_again) == summary.ran
    assert len(ran_first) >= len(stored)
    assert all(_same(v, _expected(i)) for i, v in enumerate(pipe.results(handles)))
    assert pipe.store.verify_all(quarantine=False) == {}
    pipe.close()


def test_full_disk_at_the_last_commit(small_disk: Path, tmp_path: Path) -> None:
    """The disk fills after the cache was opened: the run stops with the same clear error
    wherever it first writes (a code manifest to the index, a group commit), and once there is
    space again the next run does all the work."""
    cache, keys = small_disk / "cache", tmp_path / "keys"
    pipe = Pipeline(name="full", cache_dir=cache, key_dir=keys, stream=io.StringIO())
    assert pipe.store.index is not None  # the cache is open; now fill its disk to the brim
    filler = _fill(small_disk)
    square = pipe.task(lambda i: {"i": i, "pad": "x" * 500}, name="square")
    handles = [square(i) for i in range(200)]
    with pytest.raises(StoreFullError, match="the disk is full"):
        pipe.run()
    assert all(h.state == "added" for h in handles)
    filler.unlink()
    summary = pipe.run()
    assert summary.ran == 200 and pipe.results(handles)[7] == {"i": 7, "pad": "x" * 500}
    assert pipe.store.verify_all(quarantine=False) == {}
    pipe.close()


def test_full_disk_at_a_group_commit(small_disk: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Small results wait in memory for their group commit; the disk fills while the tasks run
    (the first one fills it): the commit fails, nothing of the group counts as done, no partial
    segment is left, and the next run (with space) does the work."""
    cache, keys = small_disk / "cache", tmp_path / "keys"
    pipe = Pipeline(name="full", cache_dir=cache, key_dir=keys, stream=io.StringIO())
    commits: list[int] = []
    real_commit = pipe.store.commit

    def counted_commit(staged: list, rows: object = None) -> None:
        commits.append(len(staged))
        real_commit(staged, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(pipe.store, "commit", counted_commit)

    filled: list[bool] = []

    def fill_then_square(i: int) -> dict[str, int]:
        if not filled:  # the first task of the first run
            filled.append(True)
            _fill(small_disk)
        return {"i": i * i}

    square = pipe.task(fill_then_square, name="square")
    handles = [square(i) for i in range(50)]
    with pytest.raises(StoreFullError, match="the disk is full"):
        pipe.run()
    assert commits and all(h.state == "added" for h in handles)
    assert not list((cache / "entries" / "packs").iterdir())  # no partial segment
    assert not list((cache / "tmp").iterdir())
    (small_disk / "filler").unlink()
    assert pipe.run().ran == 50
    assert pipe.results(handles)[7] == {"i": 49}
    assert pipe.store.verify_all(quarantine=False) == {}
    pipe.close()


def test_opening_a_cache_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    cache, keys = small_disk / "cache", tmp_path / "keys"
    _fill(small_disk)
    with pytest.raises(StoreFullError, match="the disk is full") as caught:
        Store(cache, keys)
    assert str(cache) in str(caught.value) and "nbindustria gc" in str(caught.value)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


_TOO_BIG = """if True:
    import io, json, resource, signal, sys
    import numpy as np
    from nbindustria import Pipeline, PipelineError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    cache, keys = sys.argv[1], sys.argv[2]
    pipe = Pipeline(name="big", cache_dir=cache, key_dir=keys, stream=io.StringIO())
    make = pipe.task(lambda n: np.zeros(n), name="make")
    big, small = make(4_000_000), make(1000)  # 32 MB and 8 kB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, hard))
    try:
        pipe.run()
        out = {"raised": None}
    except PipelineError as exc:
        out = {"raised": str(exc)}
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out.update(big=big.state, small=small.state, small_sum=float(small.result().sum()),
               bad=pipe.store.verify_all(quarantine=False))
    print(json.dumps(out))
"""


def test_result_too_large_for_the_file_size_limit_fails_alone(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _TOO_BIG, str(tmp_path / "cache"),
                           str(tmp_path / "keys")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["big"] == "failed" and out["small"] == "done"
    assert "make(4000000)" in out["raised"] and "File too large" in out["raised"]
    assert out["small_sum"] == 0.0 and out["bad"] == {}
    assert PipelineError.__name__ in _TOO_BIG  # (the script reports the run's one failure)
