"""The on-disk cache (nbindustria/store.py): private, signed, checksummed, atomic entries.

Every test here ends with a check that every entry left in the cache verifies (conftest), except
the ones marked ``corrupts``, which damage entries on purpose and check the outcome themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import pickle
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers_tasks import Point
from support import Counter

from nbindustria.errors import (
    CorruptEntryWarning,
    MissingCacheKeyError,
    StoreError,
    UnpicklableResultError,
    UnsafeCacheDirError,
)
from nbindustria.pipeline import Pipeline
from nbindustria.store import (
    _ALIGN,
    _PREAMBLE,
    _SIG_OFFSET,
    INDEX_NAME,
    MAGIC,
    MMAP_THRESHOLD,
    PACK_LIMIT,
    SEGMENT_SUFFIX,
    BadEntry,
    Index,
    SegmentWriter,
    Store,
    _canonical,
    read_header,
    scan_segment,
    stage_value,
    verify_staged_input,
)

KEY = "ab" * 16
OTHER = "cd" * 16


def key_of(i: int) -> str:
    return f"{i:032x}"


def corrupt_warnings(record: Any) -> list[Any]:
    return [w for w in record if issubclass(w.category, CorruptEntryWarning)]


@pytest.fixture
def loaded_entry(store: Store) -> Iterator[Path]:
    store.put(KEY, {"value": list(range(50)), "text": "hello"}, {"label": "v"})
    yield Path(store.locate(KEY)[0])


def segments(store: Store) -> list[Path]:
    return sorted(store.packs_dir.glob(f"*{SEGMENT_SUFFIX}"))


def stored_keys(store: Store) -> list[str]:
    """Every key a record or file on disk holds (whatever the index says)."""
    found = [p.stem for p in store.entries_dir.glob("*/*.nbi")]
    for path in segments(store):
        found += [str(r.header.get("key")) for r in scan_segment(path)]
    return sorted(found)


def region(store: Store, key: str) -> tuple[Path, int, int, bool]:
    """(file, start, end, packed) of an entry's bytes: a whole file, or one record (from its
    magic to its payload's last byte) of a segment."""
    path, offset, packed = store.locate(key)
    if not packed:
        return Path(path), 0, os.path.getsize(path), False
    _sig, _hb, header, payload_offset = read_header(path, offset)
    return Path(path), offset, payload_offset + int(header["length"]), True


def damage_entry(store: Store, key: str, how: str, scratch: Path) -> None:
    """``damage`` an entry where it is: its own file, or its record inside a segment (bytes
    changed in place; a truncation truncates the segment there)."""
    path, start, end, packed = region(store, key)
    if not packed:
        damage(path, how)
        return
    data = bytearray(path.read_bytes())
    record = scratch / "record"
    record.write_bytes(bytes(data[start:end]))
    damage(record, how, same_length=True)
    new = record.read_bytes()
    if len(new) == end - start:
        data[start:end] = new
    else:
        assert len(new) < end - start, how
        data = data[:start + len(new)]
    path.write_bytes(bytes(data))


# ---- values round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    None, 0, -1.5, "text", b"bytes", [1, (2, 3)], {"a": {1, 2}}, Point(1, [2]),
    pd.DataFrame({"a": [1, 2], "b": ["x", None]}),
], ids=lambda v: type(v).__name__)
def test_values_round_trip(store: Store, value: Any) -> None:
    store.put(KEY, value)
    ok, back = store.try_load(KEY)
    assert ok
    if isinstance(value, pd.DataFrame):
        pd.testing.assert_frame_equal(back, value)
    else:
        assert back == value


@pytest.mark.parametrize("array", [
    np.arange(10, dtype=np.int32),
    np.arange(12.0).reshape(3, 4),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(40.0).reshape(5, 8)[::2, ::3],  # not contiguous: stored contiguous
    np.zeros((0, 3)),
    np.array(3.5),
    np.array([1 + 2j, 3j]),
    np.array([True, False]),
    np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
], ids=lambda a: f"{a.dtype}-{a.shape}")
def test_arrays_round_trip_read_only(store: Store, array: np.ndarray) -> None:
    store.put(KEY, array)
    back = store.load(KEY)
    assert isinstance(back, np.ndarray)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert not back.flags.writeable
    path, offset, packed = store.locate(KEY)
    assert packed == (array.nbytes < PACK_LIMIT)
    assert Path(path).read_bytes()[offset:offset + 8] == MAGIC


@pytest.mark.corrupts
@pytest.mark.parametrize("one_read", [True, False], ids=["one read", "header then payload"])
def test_a_record_loads_from_one_read_or_two(store: Store, monkeypatch: pytest.MonkeyPatch,
                                             one_read: bool) -> None:
    """A record of a segment is read at once when it fits the first read, else its header
    and payload are read apart: the same values, the same checks (a flipped byte of the
    payload is found either way)."""
    import nbindustria.store as store_module

    if not one_read:  # every record larger than the first read
        monkeypatch.setattr(store_module, "_RECORD_READ", _PREAMBLE + 8)
    values = {key_of(0): {"a": [1, 2]}, key_of(1): np.arange(7.0), key_of(2): "x" * 60_000}
    store.commit([stage_value(store.entries_dir, k, v, {}) for k, v in values.items()])
    for key, value in values.items():
        back = store.load(key)
        assert store.locate(key)[2]  # a record of a segment
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(back, value)
            assert not back.flags.writeable
        else:
            assert back == value
    path, offset, _ = store.locate(key_of(2))
    data = bytearray(Path(path).read_bytes())
    data[read_header(path, offset)[3] + 59_000] ^= 1  # a byte near the payload's end flipped
    Path(path).write_bytes(bytes(data))
    with pytest.raises(BadEntry, match="digest"):
        store.load(key_of(2))
    assert store.load(key_of(0)) == {"a": [1, 2]}  # its neighbours still load


def _is_mapped(array: np.ndarray) -> bool:
    base: Any = array.base
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "obj", None) if isinstance(base, memoryview) else \
            getattr(base, "base", None)
    return isinstance(base, mmap.mmap)


def test_large_arrays_are_memory_mapped_read_only(store: Store) -> None:
    big = np.arange(MMAP_THRESHOLD // 8 + 1024, dtype=np.float64)
    small = np.arange(MMAP_THRESHOLD // 8 - 1024, dtype=np.float64)
    store.put(KEY, big)
    store.put(OTHER, small)
    loaded_big, loaded_small = store.load(KEY), store.load(OTHER)
    assert _is_mapped(loaded_big)
    assert not _is_mapped(loaded_small)
    for array in (loaded_big, loaded_small):
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0] = 1.0
    with pytest.raises(ValueError):
        loaded_big.flags.writeable = True  # the mapping itself is read-only
    np.testing.assert_array_equal(loaded_big, big)
    # The payload starts on an aligned offset, so the mapped array is aligned.
    assert loaded_big.ctypes.data % _ALIGN == 0
    assert store.load(OTHER, mmap_arrays=True).flags.writeable is False


def test_unpicklable_value_names_the_path(store: Store) -> None:
    import threading

    with pytest.raises(UnpicklableResultError, match=r"fit\(1\).*result\['model'\]\.lock"):
        class Model:
            def __init__(self) -> None:
                self.lock = threading.Lock()

        stage_value(store.entries_dir, KEY, {"ok": 1, "model": Model()}, {}, label="fit(1)")
    assert [p for p in store.entries_dir.rglob("*") if p.is_file()] == []


# ---- a private directory ------------------------------------------------------------------------


def modes(root: Path) -> dict[str, int]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    found["."] = stat.S_IMODE(root.stat().st_mode)
    return found


@pytest.mark.corrupts
def test_entries_0600_directories_0700(pipe: Pipeline, counter: Counter,
                                        key_dir: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        @pipe.task
        def f(x: int) -> Any:
            counter.hit("f")
            return np.arange(x) if x > 1 else {"x": x}

        handles = [f(1), f(300_000)]
        pipe.run()
        # Make the store quarantine one entry, so quarantine files are checked too.
        assert handles[0].key is not None
        damage_entry(pipe.store, handles[0].key, "truncated-by-one", key_dir.parent)
        with pytest.warns(CorruptEntryWarning):
            assert handles[0].result() == {"x": 1}
    finally:
        os.umask(old_umask)
    found = modes(pipe.store.path)
    assert any(name.endswith(".nbi") for name in found)
    assert any(name.endswith(SEGMENT_SUFFIX) for name in found) or \
        any(name.startswith("entries/packs") for name in found)
    assert any(name.startswith("quarantine/") and name.endswith(".reason") for name in found)
    for name, mode in found.items():
        is_dir = (pipe.store.path / name).is_dir()
        assert mode == (0o700 if is_dir else 0o600), (name, oct(mode))
    key_modes = modes(key_dir)
    assert key_modes.pop(".") == 0o700
    assert set(key_modes.values()) == {0o600}


def test_symlinked_cache_dir_is_refused(tmp_path: Path, key_dir: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeCacheDirError, match="symbolic link"):
        Store(link, key_dir)
    assert list(real.iterdir()) == []


def test_cache_dir_writable_by_others_is_refused(tmp_path: Path, key_dir: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeCacheDirError, match=f"chmod 700 {shared}"):
        Store(shared, key_dir)
    shared.chmod(0o770)
    with pytest.raises(UnsafeCacheDirError, match="writable by others"):
        Store(shared, key_dir)


def test_subdirectory_writable_by_others_is_refused(tmp_path: Path, key_dir: Path) -> None:
    Store(tmp_path / "c", key_dir).close()
    (tmp_path / "c" / "entries").chmod(0o777)
    with pytest.raises(UnsafeCacheDirError):
        Store(tmp_path / "c", key_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory owned by another user needs root")
def test_cache_dir_owned_by_another_user_is_refused(tmp_path: Path, key_dir: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafeCacheDirError, match="owned by uid 65534"):
        Store(theirs, key_dir)


def test_key_others_could_read_or_replace_is_refused(store: Store, cache_dir: Path,
                                                     key_dir: Path) -> None:
    store.put(KEY, 1)
    store.close()
    store.key_path.chmod(0o644)
    with pytest.raises(UnsafeCacheDirError, match="chmod 600"):
        Store(cache_dir, key_dir)
    store.key_path.chmod(0o600)
    key_dir.chmod(0o777)
    with pytest.raises(UnsafeCacheDirError, match=r"key directory .* writable by others"):
        Store(cache_dir, key_dir)
    key_dir.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(store.key_path, 65534, 65534)
        with pytest.raises(UnsafeCacheDirError, match="owned by uid 65534"):
            Store(cache_dir, key_dir)
        os.chown(store.key_path, 0, 0)
    Store(cache_dir, key_dir).close()
    store.index = Index(cache_dir / INDEX_NAME)  # for the final check of every entry


def test_missing_key_of_a_non_empty_cache(store: Store, cache_dir: Path, key_dir: Path) -> None:
    store.put(KEY, 1)
    store.close()
    store.key_path.unlink()
    with pytest.raises(MissingCacheKeyError, match="never trusted without their key"):
        Store(cache_dir, key_dir)
    assert KEY in stored_keys(store)  # nothing was deleted or re-keyed
    store.index = Index(cache_dir / INDEX_NAME)  # for the final check of every entry


def test_missing_key_of_an_empty_cache_is_made(cache_dir: Path, key_dir: Path) -> None:
    first = Store(cache_dir, key_dir)
    first.key_path.unlink()
    first.close()
    second = Store(cache_dir, key_dir)
    assert second.key_path.stat().st_size == 32
    second.close()


def test_damaged_key_file(store: Store, cache_dir: Path, key_dir: Path) -> None:
    store.put(KEY, 1)
    store.key_path.write_bytes(b"short")
    with pytest.raises(MissingCacheKeyError, match="damaged"):
        Store(cache_dir, key_dir)
    store.key_path.write_bytes(b"")  # empty: as missing, and the cache has entries
    with pytest.raises(MissingCacheKeyError):
        Store(cache_dir, key_dir)


def test_damaged_marker(store: Store, cache_dir: Path, key_dir: Path) -> None:
    (cache_dir / "nbindustria-cache.json").write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        Store(cache_dir, key_dir)
    (cache_dir / "nbindustria-cache.json").write_text(json.dumps({"cache_id": store.cache_id}))


def test_key_lives_outside_the_cache(store: Store, cache_dir: Path, key_dir: Path) -> None:
    assert store.key_path.parent == key_dir
    assert not str(store.key_path).startswith(str(cache_dir))
    assert store.key_path.name == f"{store.cache_id}.key"


class CreatesAFile:
    """Unpickling this opens (creates) a file: what a planted pickle would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_copied_cache_without_its_key(store: Store, tmp_path: Path) -> None:
    store.put(KEY, 1)
    shutil.copytree(store.path, tmp_path / "copy")
    with pytest.raises(MissingCacheKeyError):
        Store(tmp_path / "copy", tmp_path / "other-keys")


@pytest.mark.corrupts
def test_copied_cache_with_another_key_is_never_unpickled(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "created-by-unpickling"
    store.put(KEY, CreatesAFile(str(marker)))
    store.put(OTHER, np.arange(10))
    assert not marker.exists()
    shutil.copytree(store.path, tmp_path / "copy")
    other_keys = tmp_path / "other-keys"
    other_keys.mkdir(mode=0o700)
    (other_keys / f"{store.cache_id}.key").write_bytes(os.urandom(32))
    (other_keys / f"{store.cache_id}.key").chmod(0o600)
    copy = Store(tmp_path / "copy", other_keys)
    for key in (KEY, OTHER):
        with pytest.warns(CorruptEntryWarning, match="signature") as record:
            assert copy.try_load(key) == (False, None)
        assert len(corrupt_warnings(record)) == 1
    assert not marker.exists()
    assert list(copy.keys()) == []
    assert len(list(copy.quarantine_dir.glob("*.nbi"))) == 2
    copy.close()


# ---- damaged entries ----------------------------------------------------------------------------


def damage(path: Path, how: str, same_length: bool = False) -> None:
    data = bytearray(path.read_bytes())
    sig, header_bytes, header, offset = read_header(path)
    hlen = len(header_bytes)
    if how == "truncated-to-zero":
        data = bytearray()
    elif how == "truncated-in-header":
        data = data[:_PREAMBLE + hlen // 2]
    elif how == "truncated-in-payload":
        data = data[:offset + (len(data) - offset) // 2]
    elif how == "truncated-by-one":
        data = data[:-1]
    elif how == "appended":
        data += b"\0"
    elif how == "flip-magic":
        data[0] ^= 0x01
    elif how == "flip-signature":
        data[_SIG_OFFSET + 5] ^= 0x10
    elif how == "flip-header-length":
        data[_SIG_OFFSET + 32] ^= 0x01
    elif how == "flip-header":
        data[_PREAMBLE + hlen // 2] ^= 0x04
    elif how == "flip-padding":
        data[offset - 1] ^= 0x01
    elif how == "flip-payload-first":
        data[offset] ^= 0x80
    elif how == "flip-payload-last":
        data[-1] ^= 0x01
    elif how == "tampered-header":
        # A header rewritten by someone without the key: the signature cannot follow.
        header["meta"] = {"label": "p" if same_length else "planted"}
        new_header = _canonical(header)
        assert len(new_header) <= hlen + 100
        if same_length:  # JSON may end with spaces: the record keeps its size
            assert len(new_header) <= hlen
            new_header += b" " * (hlen - len(new_header))
        prefix = MAGIC + sig + len(new_header).to_bytes(4, "little") + new_header
        prefix += b"\0" * ((-len(prefix)) % _ALIGN)
        data = bytearray(prefix) + data[offset:]
    elif how == "empty-header":
        empty = MAGIC + sig + (0).to_bytes(4, "little")
        data = bytearray(empty) + (data[len(empty):] if same_length else bytearray())
    else:
        raise AssertionError(how)
    path.write_bytes(bytes(data))


DAMAGE = ["truncated-to-zero", "truncated-in-header", "truncated-in-payload", "truncated-by-one",
          "appended", "flip-magic", "flip-signature", "flip-header-length", "flip-header",
          "flip-padding", "flip-payload-first", "flip-payload-last", "tampered-header",
          "empty-header"]


TRUNCATING = {"truncated-to-zero", "truncated-in-header", "truncated-in-payload",
              "truncated-by-one"}


@pytest.mark.corrupts
@pytest.mark.parametrize("kind", ["pickle", "array", "pickle-own-file", "big-array"])
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_entry_is_one_warning_and_moved_aside(store: Store, how: str, kind: str,
                                                      tmp_path: Path) -> None:
    value: Any = {"pickle": {"a": list(range(100))}, "array": np.arange(100.0),
                  "pickle-own-file": {"a": list(range(100))},
                  "big-array": np.arange(MMAP_THRESHOLD // 4, dtype=np.float64)}[kind]
    pack = False if kind == "pickle-own-file" else None
    # Packed: the damaged record has neighbours in its segment, which must still load (after
    # a truncation, the records before it).
    neighbours = {key_of(1): "before", **({} if how in TRUNCATING else {key_of(2): "after"})}
    staged = [stage_value(store.entries_dir, key_of(1), "before", {}),
              stage_value(store.entries_dir, KEY, value, {"label": "fit(1)"}, pack=pack)]
    if key_of(2) in neighbours:
        staged.append(stage_value(store.entries_dir, key_of(2), "after", {}))
    store.commit(staged)
    path, _start, _end, packed = region(store, KEY)
    assert packed == (kind in ("pickle", "array"))
    if how == "appended" and packed:
        # Bytes after a record's payload belong to no record (its padding, or the next one):
        # the record is intact, and so are its neighbours.
        with open(path, "ab") as f:
            f.write(b"\0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert store.try_load(KEY)[0] and store.verify_all() == {}
            assert all(store.load(k) == v for k, v in neighbours.items())
        return
    damage_entry(store, KEY, how, tmp_path)
    with pytest.warns(CorruptEntryWarning) as record:
        assert store.try_load(KEY, "fit(1)") == (False, None)
    (warning,) = corrupt_warnings(record)
    assert "fit(1)" in str(warning.message)
    assert KEY not in stored_keys(store)  # moved aside, not left where it was
    assert not packed or not path.exists()  # a segment is rewritten, never changed in place
    (moved,) = store.quarantine_dir.glob(f"{KEY}.*.nbi")
    reason = moved.with_suffix(".reason").read_text()
    assert reason.startswith("fit(1)\n")
    if packed and how not in ("truncated-to-zero", "truncated-in-header"):
        flipped = bytes([MAGIC[0] ^ 1]) + MAGIC[1:]
        assert moved.read_bytes()[:8] == (flipped if how == "flip-magic" else MAGIC)
    # A miss now, and no second warning; the other records of the segment are intact.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.try_load(KEY) == (False, None)
        for key, expected in neighbours.items():
            assert store.load(key) == expected
    assert store.verify_all() == {}


@pytest.mark.corrupts
@pytest.mark.parametrize("kind", ["pickle", "array"])
@pytest.mark.parametrize("pack", [True, False], ids=["record", "own-file"])
def test_every_single_byte_flip_is_caught(store: Store, kind: str, pack: bool) -> None:
    value: Any = {"a": [1, 2.5, "x" * 40]} if kind == "pickle" else np.arange(16.0)
    store.commit([stage_value(store.entries_dir, OTHER, "neighbour", {}),
                  stage_value(store.entries_dir, KEY, value, {}, pack=pack)])
    path, start, end, packed = region(store, KEY)
    assert packed == pack
    original = path.read_bytes()
    for i in range(start, end):
        data = bytearray(original)
        data[i] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(BadEntry):
            store.load(KEY)
        assert store.load(OTHER) == "neighbour"
    path.write_bytes(original)
    assert store.verify(KEY) is None


@pytest.mark.corrupts
def test_entry_moved_into_another_place(store: Store) -> None:
    store.put(KEY, "mine", pack=False)
    store.put(OTHER, "theirs", pack=False)
    shutil.copy(store.entry_path(OTHER), store.entry_path(KEY))
    with pytest.raises(BadEntry, match="another entry's place"):
        store.load(KEY)
    with pytest.warns(CorruptEntryWarning):
        assert store.try_load(KEY) == (False, None)
    assert store.load(OTHER) == "theirs"


@pytest.mark.corrupts
def test_record_copied_into_another_place(store: Store) -> None:
    """A signed record of another key, copied over a record of another segment, is a miss."""
    third = "ef" * 16
    store.commit([stage_value(store.entries_dir, KEY, "mine!!", {}),
                  stage_value(store.entries_dir, third, "third", {})])
    store.put(OTHER, "theirs")  # another segment
    mine, m_start, m_end, _ = region(store, KEY)
    theirs, t_start, t_end, _ = region(store, OTHER)
    assert mine != theirs and m_end - m_start == t_end - t_start
    data = bytearray(mine.read_bytes())
    data[m_start:m_end] = theirs.read_bytes()[t_start:t_end]
    mine.write_bytes(bytes(data))
    with pytest.raises(BadEntry, match="another entry's place"):
        store.load(KEY)
    with pytest.warns(CorruptEntryWarning):
        assert store.try_load(KEY) == (False, None)
    assert store.load(OTHER) == "theirs"
    assert store.load(third) == "third"
    assert store.verify_all() == {}


def planted_entry(store: Store, key: str, payload: bytes, signature: bytes) -> None:
    """Write an entry with a payload of our choice and a header that describes it exactly
    (its sha256 and xxh3 match), signed with ``signature``, where the entry of ``key`` is: its
    own file, or its record (the segment is cut there and the planted record appended)."""
    import xxhash

    header = {"format": 1, "key": key, "kind": "pickle", "length": len(payload),
              "xxh3": xxhash.xxh3_128_hexdigest(payload),
              "sha256": hashlib.sha256(payload).hexdigest(), "meta": {"label": "planted"}}
    header_bytes = _canonical(header)
    prefix = MAGIC + signature + len(header_bytes).to_bytes(4, "little") + header_bytes
    prefix += b"\0" * ((-len(prefix)) % _ALIGN)
    path, offset, packed = store.locate(key)
    if packed:
        with open(path, "r+b") as f:
            f.truncate(offset)
            f.seek(offset)
            f.write(prefix + payload)
        return
    store.entry_path(key).parent.mkdir(mode=0o700, exist_ok=True)
    store.entry_path(key).write_bytes(prefix + payload)
    os.chmod(store.entry_path(key), 0o600)


@pytest.mark.corrupts
@pytest.mark.parametrize("pack", [True, False], ids=["record", "own-file"])
@pytest.mark.parametrize("signature", ["zeros", "random", "of-the-real-entry"])
def test_planted_pickle_is_never_unpickled(store: Store, tmp_path: Path, signature: str,
                                           pack: bool) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(CreatesAFile(str(marker)))
    store.put(KEY, "the real value", pack=pack)
    real_sig = read_header(*store.locate(KEY)[:2])[0]
    sig = {"zeros": b"\0" * 32, "random": os.urandom(32), "of-the-real-entry": real_sig}
    planted_entry(store, KEY, evil, sig[signature])
    with pytest.raises(BadEntry, match="signature"):
        store.load(KEY)
    with pytest.warns(CorruptEntryWarning) as record:
        assert store.try_load(KEY) == (False, None)
    assert len(corrupt_warnings(record)) == 1
    assert store.verify_all() == {}
    assert not marker.exists()


@pytest.mark.corrupts
@pytest.mark.parametrize("pack", [True, False], ids=["record", "own-file"])
def test_payload_swapped_under_a_valid_signature(store: Store, tmp_path: Path,
                                                 pack: bool) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(CreatesAFile(str(marker)))
    # A real entry: its signature is valid for its header.
    store.put(KEY, b"x" * (len(evil) + 64), pack=pack)
    path, start, end, _packed = region(store, KEY)
    offset = read_header(path, start)[3]
    data = path.read_bytes()
    real_payload = data[offset:end]
    swapped = evil + b"." * (len(real_payload) - len(evil))  # same length: pickle stops at "."
    path.write_bytes(data[:offset] + swapped + data[end:])
    with pytest.raises(BadEntry, match="digest"):
        store.load(KEY)
    with pytest.warns(CorruptEntryWarning):
        assert store.try_load(KEY) == (False, None)
    assert not marker.exists()


@pytest.mark.corrupts
def test_planted_pickle_through_a_pipeline(pipe: Pipeline, counter: Counter,
                                           tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    @pipe.task
    def value(x: int) -> str:
        counter.hit("value")
        return f"value {x}"

    @pipe.task
    def use(v: str) -> str:
        return v.upper()

    handle = value(1)
    pipe.run()
    assert handle.key is not None
    planted_entry(pipe.store, handle.key, pickle.dumps(CreatesAFile(str(marker))),
                  os.urandom(32))
    top = use(value(1))
    with pytest.warns(CorruptEntryWarning) as record:
        pipe.run()
    assert len(corrupt_warnings(record)) == 1
    assert top.result() == "VALUE 1"
    assert counter["value"] == 2
    assert not marker.exists()


@pytest.mark.corrupts
@pytest.mark.parametrize("how", ["truncated-by-one", "flip-payload-last", "flip-header",
                                 "flip-signature", "truncated-to-zero"])
@pytest.mark.parametrize("shape", ["result", "input"])
@pytest.mark.parametrize("n", [200_000, 1000], ids=["own-file", "record"])
def test_damaged_entry_is_recomputed(pipe: Pipeline, counter: Counter, how: str,
                                     shape: str, n: int, tmp_path: Path) -> None:
    @pipe.task
    def make(n: int) -> np.ndarray:
        counter.hit("make")
        return np.arange(n, dtype=np.float64)

    @pipe.task
    def total(a: np.ndarray) -> float:
        counter.hit("total")
        return float(a.sum())

    made = make(n)
    pipe.run()
    assert made.key is not None
    damage_entry(pipe.store, made.key, how, tmp_path)
    with pytest.warns(CorruptEntryWarning) as record:
        if shape == "result":
            made = make(n)
            pipe.run()
            value = made.result()
            np.testing.assert_array_equal(value, np.arange(float(n)))
        else:
            top = total(make(n))
            pipe.run()
            assert top.result() == float(np.arange(n).sum())
    assert len(corrupt_warnings(record)) == 1
    assert counter["make"] == 2
    assert pipe.store.verify_all(quarantine=False) == {}
    assert len(list(pipe.store.quarantine_dir.glob("*.nbi"))) == 1


@pytest.mark.parametrize("pack", [True, False], ids=["record", "own-file"])
def test_engine_side_check_of_an_input(store: Store, pack: bool) -> None:
    store.commit([stage_value(store.entries_dir, OTHER, "first", {}),
                  stage_value(store.entries_dir, KEY, np.arange(5), {}, pack=pack)])
    path, offset, packed, header_digest, _header, _ = store.verified_record(KEY)
    assert packed == pack and (offset > 0) == pack
    np.testing.assert_array_equal(verify_staged_input(path, header_digest, offset=offset),
                                  np.arange(5))
    with pytest.raises(BadEntry, match="header differs"):
        verify_staged_input(path, "0" * 32, offset=offset)


# ---- commits and the index ------------------------------------------------------------------


@pytest.mark.parametrize("pack", [True, False], ids=["records", "own-files"])
def test_commit_is_grouped(store: Store, monkeypatch: pytest.MonkeyPatch, pack: bool) -> None:
    from nbindustria import store as store_module

    calls: list[str] = []
    fsyncs: list[int] = []
    real, real_fsync = store_module._syncfs, os.fsync
    monkeypatch.setattr(store_module, "_syncfs", lambda p: (calls.append(p), real(p)))
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    staged = [stage_value(store.entries_dir, key_of(i), {"i": i}, {}, pack=pack)
              for i in range(50)]
    store.commit(staged)
    if pack:
        # One segment file for the group: one flush of its data, one of its directory.
        assert (len(calls), len(fsyncs)) == (0, 2)
        assert len(segments(store)) == 1
    else:
        assert len(calls) == 2  # one flush for the data, one for the renames
    assert all(store.load(key_of(i)) == {"i": i} for i in range(50))
    assert list(store.entries_dir.rglob("*.part")) == []


@pytest.mark.parametrize("pack", [True, False], ids=["record", "own-file"])
def test_commit_refuses_a_staged_file_of_another_key(store: Store, pack: bool) -> None:
    staged = stage_value(store.entries_dir, KEY, 1, {}, pack=pack)
    staged.key = OTHER
    with pytest.raises(StoreError, match="does not hold key"):
        store.commit([staged])
    if not pack:
        os.unlink(staged.path)
    assert stored_keys(store) == []


def test_missing_entry_is_a_clean_miss(store: Store) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.try_load(KEY) == (False, None)
    assert store.verify(KEY) == "missing"


def test_index_is_derived_data(cache_dir: Path, key_dir: Path, pipe: Pipeline,
                               counter: Counter) -> None:
    @pipe.task
    def f(x: int) -> int:
        counter.hit("f")
        return x * x

    handles = [f(i) for i in range(5)]
    pipe.run()
    keys = [h.key for h in handles]
    rows_before = {k: r.result_digest for k, r in pipe.store.index.get_many(keys).items()}
    pipe.close()
    for suffix in ("", "-wal", "-shm"):
        path = cache_dir / (INDEX_NAME + suffix)
        if path.exists():
            path.unlink()
    handles = [f(i) for i in range(5)]
    summary = pipe.run()  # the store is opened again, with an empty index
    assert (summary.ran, summary.cached) == (0, 5)
    assert [h.result() for h in handles] == [i * i for i in range(5)]
    assert counter["f"] == 5
    store = pipe.store
    store.index.clear()
    assert store.index.get_many(keys) == {}
    assert store.rebuild_index() == 5
    rows = store.index.get_many(keys)
    assert {k: r.result_digest for k, r in rows.items()} == rows_before
    assert {r.label for r in rows.values()} == {f"f({i})" for i in range(5)}


@pytest.mark.corrupts
@pytest.mark.parametrize("how", ["truncated", "removed"])
def test_hit_whose_entry_then_fails_is_recomputed(pipe: Pipeline, counter: Counter,
                                                  how: str) -> None:
    """``present`` trusts the index (no file is looked at); an entry that turns out bad or
    missing when it is loaded is computed again, as a result and as an input."""
    @pipe.task
    def f() -> bytes:
        counter.hit("f")
        return b"x" * 10_000

    @pipe.task
    def g(data: bytes) -> int:
        counter.hit("g")
        return len(data)

    handle = f()
    pipe.run()
    assert handle.key is not None
    path = Path(pipe.store.locate(handle.key)[0])
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    assert handle.key in pipe.store.present([handle.key])  # the index still says so
    top = g(f())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        summary = pipe.run()
        assert top.result() == 10_000
        assert f().result() == b"x" * 10_000
    assert summary.ran == 2 and counter["f"] == 2 and counter["g"] == 1
    assert len(corrupt_warnings(record)) == 1  # one warning for the one bad entry
    assert pipe.store.verify_all(quarantine=False) == {}


@pytest.mark.corrupts
def test_verify_all_reports_and_quarantines(store: Store, tmp_path: Path) -> None:
    store.commit([stage_value(store.entries_dir, key_of(i), i, {}) for i in range(3)])
    store.put(key_of(3), 3)
    damage_entry(store, key_of(1), "flip-payload-last", tmp_path)
    damage_entry(store, key_of(2), "truncated-in-header", tmp_path)
    assert set(store.verify_all(quarantine=False)) == {key_of(1), key_of(2)}
    bad = store.verify_all()
    assert set(bad) == {key_of(1), key_of(2)}
    assert store.verify_all() == {}
    assert sorted(store.keys()) == [key_of(0), key_of(3)]


def test_text_log_of_a_run(pipe: Pipeline) -> None:
    @pipe.task
    def f() -> int:
        return 1

    f()
    pipe.run()
    assert isinstance(pipe.reporter.stream, io.StringIO)
    assert "Saved result of f() to " + str(pipe.store.entries_dir) in pipe.reporter.stream.getvalue()


# ---- segments -------------------------------------------------------------------------------------


def test_group_commit_packs_small_results_in_one_segment(store: Store) -> None:
    small = {key_of(i): {"i": i, "pad": "x" * (i % 97)} for i in range(300)}
    big = {key_of(1000 + i): np.arange(PACK_LIMIT // 8 + i, dtype=np.float64) for i in range(2)}
    staged = [stage_value(store.entries_dir, k, v, {}) for k, v in {**small, **big}.items()]
    store.commit(staged)
    (segment,) = segments(store)
    assert sorted(p.stem for p in store.entries_dir.glob("*/*.nbi")) == sorted(big)
    records = list(scan_segment(segment))
    assert [r.header["key"] for r in records] == list(small)
    assert all(r.offset % _ALIGN == 0 for r in records)
    rows = store.index.get_many(list(small) + list(big))
    assert {r.segment for k, r in rows.items() if k in small} == {f"packs/{segment.name}"}
    assert {r.segment for k, r in rows.items() if k in big} == {""}
    assert all(store.load(k) == v for k, v in small.items())
    for k, v in big.items():
        np.testing.assert_array_equal(store.load(k), v)
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600


def test_load_many_reads_small_entries_together(store: Store,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    small = {key_of(i): {"i": i, "pad": "x" * (i % 97)} for i in range(200)}
    arrays = {key_of(500 + i): np.arange(10.0 + i) for i in range(3)}
    big = {key_of(1000): np.arange(PACK_LIMIT // 8 + 1, dtype=np.float64)}
    store.commit([stage_value(store.entries_dir, k, v, {})
                  for k, v in {**small, **arrays, **big}.items()])
    store.put(key_of(2000), "another segment")
    opened: list[str] = []
    real_open = open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    values = store.load_many([*small, *arrays, *big, key_of(2000), key_of(9999)])
    monkeypatch.undo()
    # Each segment opened once; the big array (a file of its own) and the unknown key left out.
    assert sorted(opened) == sorted({str(p) for p in segments(store)})
    assert set(values) == {*small, *arrays, key_of(2000)}
    assert all(values[k] == v for k, v in small.items())
    assert values[key_of(2000)] == "another segment"
    for k, v in arrays.items():
        np.testing.assert_array_equal(values[k], v)
        assert not values[k].flags.writeable
    assert store.load_many([]) == {}


@pytest.mark.corrupts
@pytest.mark.parametrize("kind", ["pickle", "array"])
# (Appending or re-writing a header changes a record's size: the planted-record test covers those.)
@pytest.mark.parametrize("how", sorted(set(DAMAGE) - TRUNCATING - {"appended", "tampered-header"}))
def test_load_many_leaves_a_damaged_record_to_try_load(store: Store, how: str, kind: str,
                                                       tmp_path: Path) -> None:
    value: Any = {"a": list(range(100))} if kind == "pickle" else np.arange(100.0)
    store.commit([stage_value(store.entries_dir, OTHER, "neighbour", {}),
                  stage_value(store.entries_dir, KEY, value, {}),
                  stage_value(store.entries_dir, "ef" * 16, "after", {})])
    damage_entry(store, KEY, how, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bulk load never warns nor moves anything aside
        values = store.load_many([OTHER, KEY, "ef" * 16])
    assert values == {OTHER: "neighbour", "ef" * 16: "after"}
    assert not list(store.quarantine_dir.glob("*"))
    with pytest.warns(CorruptEntryWarning):  # the one-by-one load then deals with it
        assert store.try_load(KEY) == (False, None)


@pytest.mark.corrupts
@pytest.mark.parametrize("signature", ["zeros", "random", "of-the-real-entry", "swapped-payload"])
def test_load_many_never_unpickles_a_planted_record(store: Store, tmp_path: Path,
                                                    signature: str) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(CreatesAFile(str(marker)))
    store.put(KEY, b"x" * (len(evil) + 64))
    path, start, end, _packed = region(store, KEY)
    if signature == "swapped-payload":  # a valid signature over a header of other bytes
        offset = read_header(path, start)[3]
        data = path.read_bytes()
        swapped = evil + b"." * (end - offset - len(evil))
        path.write_bytes(data[:offset] + swapped + data[end:])
    else:
        real_sig = read_header(path, start)[0]
        sig = {"zeros": b"\0" * 32, "random": os.urandom(32), "of-the-real-entry": real_sig}
        planted_entry(store, KEY, evil, sig[signature])
    assert store.load_many([KEY, OTHER]) == {}
    assert not marker.exists()


def test_load_many_of_a_segment_gone_meanwhile(store: Store) -> None:
    store.commit([stage_value(store.entries_dir, key_of(i), i, {}) for i in range(3)])
    (segment,) = segments(store)
    segment.unlink()  # rewritten by another process after the index was read, say
    assert store.load_many([key_of(i) for i in range(3)]) == {}


def test_delete_rewrites_the_segment_and_reindex_keeps_it_deleted(store: Store) -> None:
    store.commit([stage_value(store.entries_dir, key_of(i), i, {}) for i in range(5)])
    (first,) = segments(store)
    assert store.delete([key_of(1), key_of(3)]) == 2
    (second,) = segments(store)
    assert first.name.endswith(".0.nbs") and second.name.endswith(".1.nbs")
    assert not first.exists()
    assert stored_keys(store) == [key_of(0), key_of(2), key_of(4)]
    assert [store.load(key_of(i)) for i in (0, 2, 4)] == [0, 2, 4]
    assert store.verify(key_of(1)) == "missing"
    assert store.rebuild_index() == 3
    assert sorted(store.keys()) == [key_of(0), key_of(2), key_of(4)]
    assert store.delete(list(store.keys())) == 3
    assert segments(store) == [] and stored_keys(store) == []
    assert store.rebuild_index() == 0


def test_committing_a_key_again_drops_its_older_copy(store: Store) -> None:
    store.commit([stage_value(store.entries_dir, key_of(i), i, {}) for i in range(3)])
    store.put(key_of(1), "again")
    store.put(key_of(2), np.arange(PACK_LIMIT // 4, dtype=np.float64))  # now a file of its own
    assert stored_keys(store) == [key_of(0), key_of(1), key_of(2)]  # each exactly once
    assert store.load(key_of(1)) == "again"
    store.put(key_of(2), "small again")  # and back into a segment
    assert stored_keys(store) == [key_of(0), key_of(1), key_of(2)]
    assert store.rebuild_index() == 3
    assert [store.load(key_of(i)) for i in range(3)] == [0, "again", "small again"]


def test_an_engines_part_file_committed_in_several_groups(store: Store) -> None:
    writer = SegmentWriter(store.entries_dir)
    staged = [stage_value(store.entries_dir, key_of(i), {"i": i}, {}, segment=writer)
              for i in range(4)]
    big = stage_value(store.entries_dir, key_of(9), np.arange(PACK_LIMIT // 4.0),
                      {}, segment=writer)  # large: a file of its own even on an engine
    writer.close()
    for item in staged:
        item.part_records = writer.count
    assert writer.count == 4 and not big.packed and Path(writer.path).exists()
    assert [s.path for s in staged] == [writer.path] * 4
    assert Path(writer.path).read_bytes()[_SIG_OFFSET:_SIG_OFFSET + 32] == b"\0" * 32
    store.commit([*staged[:2], big])
    assert Path(writer.path).exists()  # two records still wait
    store.discard(staged[2])  # a late duplicate: never committed
    store.commit(staged[3:])
    assert not Path(writer.path).exists()
    assert [store.load(key_of(i)) for i in (0, 1, 3)] == [{"i": 0}, {"i": 1}, {"i": 3}]
    assert store.verify(key_of(2)) == "missing"
    assert stored_keys(store) == sorted([key_of(0), key_of(1), key_of(3), key_of(9)])


def test_present_reads_only_the_index(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [key_of(i) for i in range(2000)]
    for start in range(0, 2000, 500):
        store.commit([stage_value(store.entries_dir, k, k, {}) for k in keys[start:start + 500]])
    store.put(KEY, np.arange(PACK_LIMIT // 4.0))  # a file of its own: known to the index too

    def no_file_access(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"present() looked at a file: {args}")

    with monkeypatch.context() as m:
        for name in ("stat", "lstat", "open", "scandir", "listdir"):
            m.setattr(os, name, no_file_access)
        m.setattr(os.path, "exists", no_file_access)
        found = store.present([*keys, KEY])
    assert sorted(found) == sorted([*keys, KEY])


def test_segment_written_by_another_process_is_found_on_a_miss(cache_dir: Path, key_dir: Path,
                                                               store: Store) -> None:
    other = Store(cache_dir, key_dir)
    # Another writer's segment that its index update never reached (it crashed there).
    other.commit([stage_value(other.entries_dir, key_of(i), i, {}) for i in range(3)])
    other.index.clear()
    other.close()
    assert store.index.get_many([key_of(0)]) == {}
    assert sorted(store.present([key_of(i) for i in range(3)])) == [key_of(i) for i in range(3)]
    assert [store.load(key_of(i)) for i in range(3)] == [0, 1, 2]


def test_a_cache_of_format_1_is_read_as_it_is(cache_dir: Path, key_dir: Path) -> None:
    """Before segments, every result was a file of its own and the index had no location
    columns: such a cache opens, its entries load, and new results go to segments."""
    import sqlite3

    old = Store(cache_dir, key_dir)
    old.commit([stage_value(old.entries_dir, key_of(i), i, {}, pack=False) for i in range(3)])
    old.close()
    db = sqlite3.connect(str(cache_dir / INDEX_NAME))
    db.execute("DROP INDEX entries_segment")
    db.execute("ALTER TABLE entries DROP COLUMN segment")
    db.execute("ALTER TABLE entries DROP COLUMN record_offset")
    db.execute("DROP TABLE segments")
    db.commit()
    db.close()
    store = Store(cache_dir, key_dir)
    try:
        assert sorted(store.present([key_of(i) for i in range(3)])) == [key_of(i) for i in range(3)]
        assert [store.load(key_of(i)) for i in range(3)] == [0, 1, 2]
        store.put(key_of(3), 3)
        assert store.locate(key_of(3))[2] and store.load(key_of(3)) == 3
        assert store.verify_all(quarantine=False) == {}
    finally:
        store.close()


@pytest.mark.parametrize("value", [0, -7, 2**80, 1.5, float("inf"), "text", "é" * 300, b"\x00b",
                                   True, None])
def test_scalars_are_pickled_as_cloudpickle_would(store: Store, value: Any) -> None:
    """Scalars take a shortcut past cloudpickle: the same bytes (so the same result digest)."""
    import cloudpickle

    staged = stage_value(store.entries_dir, KEY, value, {})
    assert staged.payload == cloudpickle.dumps(value, protocol=5)
    store.commit([staged])
    assert store.load(KEY) == value


def test_pipeline_close_checkpoints_on_a_thread_that_the_process_waits_for(
        tmp_path: Path) -> None:
    """``Pipeline.close()`` leaves the index's close (SQLite's checkpoint, 8-12 ms) to a thread
    and returns at once; a process that exits right after still finishes it: the next process
    finds the index whole and checkpointed (no WAL left), and every result."""
    import sqlite3
    import subprocess
    import sys
    import textwrap

    cache, keys = tmp_path / "cache", tmp_path / "keys"
    script = textwrap.dedent(f"""
        import io, threading, time
        import nbindustria.store as store
        from nbindustria import Pipeline

        closed_on = []
        real_close = store.Index._close

        def slow_close(self):  # a slow disk: the process must still wait for it
            time.sleep(0.3)
            closed_on.append(threading.current_thread().name)
            real_close(self)
            print("closed on", closed_on[0], flush=True)

        store.Index._close = slow_close
        pipe = Pipeline(name="t", cache_dir={str(cache)!r}, key_dir={str(keys)!r}, verbose=0,
                        stream=io.StringIO())
        square = pipe.task(lambda i: i * i, name="square")
        handles = [square(i) for i in range(20)]
        assert pipe.run().ran == 20
        pipe.close()
        print("close returned", closed_on, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["close returned []",
                                          "closed on nbindustria-index-close"], done.stdout
    assert not (cache / f"{INDEX_NAME}-wal").exists()  # the last close checkpointed
    conn = sqlite3.connect(cache / INDEX_NAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone() == (20,)
    finally:
        conn.close()
    store = Store(cache, keys)
    try:
        stored = [key for (key,) in store.index.execute("SELECT key FROM entries")]
        assert sorted(store.load(key) for key in stored) == sorted(i * i for i in range(20))
    finally:
        store.close()


def test_a_cache_closed_in_the_background_opens_again_at_once(cache_dir: Path, key_dir: Path,
                                                              counter: Counter) -> None:
    """Opening a cache again in the same process right after ``Pipeline.close()`` waits for
    the background close: every result is found, nothing runs twice."""
    for round_ in range(3):
        pipe = Pipeline(name="t", cache_dir=cache_dir, key_dir=key_dir, verbose=0)

        @pipe.task
        def f(x: int) -> int:
            counter.hit("f")
            return x * x

        handles = [f(i) for i in range(10)]
        summary = pipe.run()
        assert (summary.ran, summary.cached) == ((10, 0) if round_ == 0 else (0, 10))
        assert pipe.results(handles) == [i * i for i in range(10)]
        pipe.close()
    assert counter["f"] == 10
