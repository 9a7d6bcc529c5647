"""The on-disk cache: atomic, checksummed, signed entries, and the index that describes them.

Layout of a cache directory (0700, files 0600)::

    nbindustria-cache.json      format and cache id (the id names the key file, which lives elsewhere)
    entries/ab/abcdef....nbi    one file per result
    tmp/                        entries being written (by the kernel or by engines)
    quarantine/                 entries that failed a check, moved aside with the reason
    index.sqlite                derived metadata (rebuildable from the entries)

An entry file is ``MAGIC | signature (32) | header length (4) | header JSON | padding | payload``.
The header holds the key, the payload's kind, length and digests, and the task's metadata; the
payload starts at a 64-byte boundary so that arrays can be memory-mapped in place.

Who writes what: whoever ran the task (the kernel, or an engine that can reach the directory)
*stages* the entry in ``tmp/`` with an empty signature slot; only the kernel holds the key, so only
the kernel *commits*: it signs the header (HMAC-SHA256 over magic, key and header, and the header
holds the payload's SHA-256 for pickles, whose loading can run code), flushes, renames into place
and flushes again. Commits are grouped: one ``syncfs`` covers many entries, so durability does not
cost throughput. A reader checks the signature before anything else and the payload's digest
before handing any value out; a bad entry is moved aside and reported as a miss, never unpickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import hmac
import json
import mmap
import os
import secrets
import sqlite3
import stat
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from .errors import (
    CorruptEntryWarning,
    MissingCacheKeyError,
    StoreError,
    UnpicklableResultError,
    UnsafeCacheDirError,
)

MAGIC = b"NBIENTR1"
_SIG_OFFSET = len(MAGIC)
_SIG_LEN = 32
_LEN_OFFSET = _SIG_OFFSET + _SIG_LEN
_PREAMBLE = _LEN_OFFSET + 4
_ALIGN = 64
_HEADER_LIMIT = 16 << 20  # a header larger than this is damage, not data
_EMPTY_SIG = b"\0" * _SIG_LEN
_pack_u32 = struct.Struct("<I").pack
_unpack_u32 = struct.Struct("<I").unpack

MARKER = "nbindustria-cache.json"
INDEX_NAME = "index.sqlite"
FORMAT_VERSION = 1
# Arrays at least this large come back memory-mapped (read-only): loading runs at memory speed.
MMAP_THRESHOLD = 1 << 20
_CHUNK = 16 << 20


class BadEntry(Exception):
    """An entry failed a check. Internal: callers turn it into a warning and a miss."""


@dataclass
class Staged:
    """An entry written to ``tmp/`` and waiting for the kernel to sign and commit it."""

    key: str
    path: str
    header: dict[str, Any]
    size: int  # payload bytes

    @property
    def result_digest(self) -> str:
        return str(self.header["xxh3"])


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


# --------------------------------------------------------------------------------------------
# Writing (no key needed: this part runs on engines too)
# --------------------------------------------------------------------------------------------


def _is_plain_array(value: Any) -> bool:
    np = _numpy_if_loaded()
    return (np is not None and isinstance(value, np.ndarray) and not value.dtype.hasobject
            and value.dtype.names is None)


def _numpy_if_loaded() -> Any:
    import sys

    return sys.modules.get("numpy")


def find_unpicklable(value: Any, path: str = "result", depth: int = 0) -> str | None:
    """The path to the first part of ``value`` that cannot be pickled, or None."""
    import cloudpickle

    try:
        cloudpickle.dumps(value, protocol=5)
        return None
    except Exception:  # any pickling failure means "look deeper"
        pass
    if depth > 20:
        return path
    children: Iterable[tuple[str, Any]] = ()
    if isinstance(value, dict):
        children = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif hasattr(value, "__dict__"):
        children = ((f"{path}.{k}", v) for k, v in vars(value).items())
    for child_path, child in children:
        found = find_unpicklable(child, child_path, depth + 1)
        if found is not None:
            return found
    return path


def serialize(value: Any, label: str) -> tuple[str, dict[str, Any], list[Any]]:
    """(kind, header fields, payload chunks) for a value; arrays are not copied."""
    if _is_plain_array(value):
        np = _numpy_if_loaded()
        array = value if (value.flags.c_contiguous or value.flags.f_contiguous) else \
            np.ascontiguousarray(value)
        order = "C" if array.flags.c_contiguous else "F"
        raw = memoryview(array.reshape(-1, order="A").view(np.uint8)) if array.size else \
            memoryview(b"")
        fields = {"dtype": array.dtype.str, "shape": list(array.shape), "order": order,
                  "array_type": type(value).__name__}
        return "ndarray", fields, [raw]
    import cloudpickle

    try:
        data = cloudpickle.dumps(value, protocol=5)
    except Exception as exc:  # report every pickling failure the same way
        where = find_unpicklable(value) or "result"
        raise UnpicklableResultError(
            f"{label} returned a value that cannot be stored: {where} "
            f"({type(exc).__name__}: {exc}). Return plain data (arrays, frames, dicts) instead."
        ) from None
    return "pickle", {"sha256": hashlib.sha256(data).hexdigest()}, [data]


def stage_value(entries_dir: str | os.PathLike[str], key: str, value: Any, meta: dict[str, Any],
                *, label: str = "task", fsync: bool = False) -> Staged:
    """Write ``value`` to a new hidden file beside its entry's final place, unsigned.

    Staging in the entry's own shard directory keeps the final rename inside one directory and
    spreads file-system churn over the shards (a single staging directory that sees thousands of
    files renamed out of it becomes slow to create files in). Raises UnpicklableResultError.
    """
    kind, fields, chunks = serialize(value, label)
    hasher = xxhash.xxh3_128()
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
    header = {"format": FORMAT_VERSION, "key": key, "kind": kind, "length": size,
              "xxh3": hasher.hexdigest(), **fields, "meta": meta}
    header_bytes = _canonical(header)
    prefix = MAGIC + _EMPTY_SIG + _pack_u32(len(header_bytes)) + header_bytes
    prefix += b"\0" * (_align(len(prefix)) - len(prefix))
    shard = os.path.join(os.fspath(entries_dir), key[:2])
    path = os.path.join(shard, f".{key}.{uuid.uuid4().hex}.part")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        os.makedirs(shard, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as out:
            out.write(prefix)
            for chunk in chunks:
                view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else chunk
                for start in range(0, len(view), _CHUNK):
                    out.write(view[start:start + _CHUNK])
            if fsync:
                os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return Staged(key=key, path=path, header=header, size=size)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike[str]) -> tuple[bytes, bytes, dict[str, Any], int]:
    """(signature, header bytes, header, payload offset); raises BadEntry."""
    try:
        with open(path, "rb") as f:
            pre = f.read(_PREAMBLE)
            if len(pre) < _PREAMBLE or pre[:_SIG_OFFSET] != MAGIC:
                raise BadEntry("not an nbindustria entry (bad magic or truncated)")
            (hlen,) = _unpack_u32(pre[_LEN_OFFSET:_PREAMBLE])
            if hlen > _HEADER_LIMIT:
                raise BadEntry("header length is implausible")
            header_bytes = f.read(hlen)
            # The padding up to the payload is covered by no digest: it must be zeros.
            padding = f.read(_align(_PREAMBLE + hlen) - _PREAMBLE - hlen)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BadEntry(f"cannot read: {exc}") from None
    if len(header_bytes) != hlen:
        raise BadEntry("truncated header")
    if padding.strip(b"\0") or len(padding) != _align(_PREAMBLE + hlen) - _PREAMBLE - hlen:
        raise BadEntry("damaged padding after the header")
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise BadEntry("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BadEntry("header is not an object")
    return pre[_SIG_OFFSET:_LEN_OFFSET], header_bytes, header, _align(_PREAMBLE + hlen)


def header_digest(header_bytes: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(header_bytes)


def load_payload(path: str | os.PathLike[str], header: dict[str, Any], offset: int,
                 *, mmap_arrays: bool | None = None) -> Any:
    """Check the payload against the (already trusted) header and return the value."""
    length = int(header["length"])
    try:
        file_size = os.stat(path).st_size
    except OSError as exc:
        raise BadEntry(f"cannot stat: {exc}") from None
    if file_size != offset + length:
        raise BadEntry(f"size is {file_size} bytes, the header says {offset + length}")
    if header["kind"] == "ndarray":
        return _load_array(path, header, offset, length, mmap_arrays)
    if header["kind"] != "pickle":
        raise BadEntry(f"unknown payload kind {header['kind']!r}")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise BadEntry("truncated payload")
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), str(header.get("sha256"))):
        raise BadEntry("payload digest does not match (damaged or altered)")
    import cloudpickle

    return cloudpickle.loads(data)


def _load_array(path: str | os.PathLike[str], header: dict[str, Any], offset: int, length: int,
                mmap_arrays: bool | None) -> Any:
    import numpy as np

    dtype = np.dtype(header["dtype"])
    shape = tuple(int(n) for n in header["shape"])
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != length:
        raise BadEntry("array shape and dtype do not match the payload length")
    use_mmap = length >= MMAP_THRESHOLD if mmap_arrays is None else mmap_arrays
    if length == 0:
        array = np.empty(shape, dtype=dtype, order=header.get("order", "C"))
        array.flags.writeable = False
        return array
    with open(path, "rb") as f:
        if use_mmap:
            buffer: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            f.seek(offset)
            buffer = f.read(length)
            offset = 0
            if len(buffer) != length:
                raise BadEntry("truncated payload")
    # One pass over the (mapped) bytes checks them; the array is then a view of the same pages.
    view = memoryview(buffer)[offset:offset + length]
    if xxhash.xxh3_128_hexdigest(view) != header["xxh3"]:
        raise BadEntry("payload digest does not match (damaged or altered)")
    array = np.ndarray(shape, dtype=dtype, buffer=view, order=header.get("order", "C"))
    array.flags.writeable = False
    return array


def verify_staged_input(path: str, expected_header_digest: str, *,
                        mmap_arrays: bool | None = None) -> Any:
    """Load an entry on an engine: the kernel vouches for the header (it checked the signature)
    by its digest; the payload is checked against the header. No key needed."""
    _sig, header_bytes, header, offset = read_header(path)
    if not hmac.compare_digest(header_digest(header_bytes), expected_header_digest):
        raise BadEntry("header differs from the one the kernel verified")
    return load_payload(path, header, offset, mmap_arrays=mmap_arrays)


# --------------------------------------------------------------------------------------------
# The cache directory, its key, and commits
# --------------------------------------------------------------------------------------------


def _check_private_dir(path: Path, what: str = "cache directory") -> None:
    """Refuse directories that others could plant entries (or keys) in."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheDirError(
            f"the {what} {path} is a symbolic link; nbindustria refuses it so that "
            f"nobody can redirect your cache. Use the real path ({os.path.realpath(path)}) "
            "instead.")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheDirError(f"the {what} {path} exists and is not a directory")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise UnsafeCacheDirError(
            f"the {what} {path} is owned by uid {st.st_uid}, not by you "
            f"(uid {os.geteuid()}); use a directory of your own (NBINDUSTRIA_CACHE_DIR, "
            "NBINDUSTRIA_KEY_DIR).")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheDirError(
            f"the {what} {path} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):o}); fix it with: chmod 700 {path}")


def _check_key_file(path: Path) -> None:
    """A key that others can read or replace signs nothing: refuse it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeCacheDirError(f"the key file {path} is not a regular file (a symbolic "
                                  "link?); nbindustria refuses it")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise UnsafeCacheDirError(f"the key file {path} is owned by uid {st.st_uid}, not by "
                                  f"you (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise UnsafeCacheDirError(
            f"the key file {path} can be read or written by others (mode "
            f"{stat.S_IMODE(st.st_mode):o}); fix it with: chmod 600 {path}")


def _make_private_dir(path: Path, what: str = "cache directory") -> None:
    _check_private_dir(path, what)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(os.stat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)


_libc: Any = None


def _syncfs(path: str) -> None:
    """Flush everything written on the file system that holds ``path`` (one call for a group)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc and hasattr(_libc, "syncfs") and _libc.syncfs(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class IndexRow:
    key: str
    node: str
    task: str
    label: str
    kind: str
    size: int
    result_digest: str
    header_digest: str
    created: float
    duration: float | None
    cpu: float | None
    peak_memory: int | None
    engine: str
    host: str
    hits: int
    code_digest: str
    args: str  # JSON: {param: summary}
    arg_digests: str  # JSON: {param: digest}
    upstream: str  # JSON: {param path: upstream result digest}


_COLUMNS = [f for f in IndexRow.__dataclass_fields__]


class Index:
    """SQLite metadata beside the entries. Derived data: ``rebuild`` makes it again from them."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.RLock()
        self._hits_lock = threading.Lock()
        self._pending_hits: list[str] = []
        self._hits_writer: threading.Thread | None = None
        self._conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30,
                                     isolation_level=None)
        os.chmod(path, 0o600)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, node TEXT, task TEXT,"
                " label TEXT, kind TEXT, size INTEGER, result_digest TEXT, header_digest TEXT,"
                " created REAL, duration REAL, cpu REAL, peak_memory INTEGER, engine TEXT,"
                " host TEXT, hits INTEGER DEFAULT 0, code_digest TEXT, args TEXT,"
                " arg_digests TEXT, upstream TEXT)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS entries_node ON entries(node)")
            self._conn.execute("CREATE INDEX IF NOT EXISTS entries_task ON entries(task)")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS code (digest TEXT PRIMARY KEY, manifest TEXT)")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS runs (run INTEGER PRIMARY KEY AUTOINCREMENT,"
                " pipeline TEXT, started REAL, ended REAL, engines TEXT, ran INTEGER,"
                " cached INTEGER, failed INTEGER, skipped INTEGER)")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS timings (run INTEGER, key TEXT, task TEXT,"
                " label TEXT, state TEXT, engine TEXT, started REAL, ended REAL,"
                " duration REAL, cpu REAL, peak_memory INTEGER)")
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)

    def close(self) -> None:
        self.flush_hits()
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def put(self, rows: Iterable[IndexRow]) -> None:
        placeholders = ",".join("?" * len(_COLUMNS))
        with self.transaction() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO entries ({','.join(_COLUMNS)}) VALUES ({placeholders})",
                [tuple(getattr(r, c) for c in _COLUMNS) for r in rows])

    def get_many(self, keys: list[str]) -> dict[str, IndexRow]:
        found: dict[str, IndexRow] = {}
        with self._lock:
            for start in range(0, len(keys), 900):
                chunk = keys[start:start + 900]
                cursor = self._conn.execute(
                    f"SELECT {','.join(_COLUMNS)} FROM entries WHERE key IN "
                    f"({','.join('?' * len(chunk))})", chunk)
                for row in cursor:
                    found[row[0]] = IndexRow(*row)
        return found

    def query(self, where: str = "", params: tuple[Any, ...] = (),
              order: str = "created DESC", limit: int | None = None) -> list[IndexRow]:
        self.flush_hits()
        sql = f"SELECT {','.join(_COLUMNS)} FROM entries"
        if where:
            sql += f" WHERE {where}"
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            return [IndexRow(*row) for row in self._conn.execute(sql, params)]

    def delete(self, keys: Iterable[str]) -> None:
        with self.transaction() as conn:
            conn.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])

    def add_hits(self, keys: Iterable[str]) -> None:
        """Count a cache hit for each key, in the background.

        Hit counts are statistics (``nbindustria ls``); updating 10,000 rows costs a fully
        cached re-run more than finding its results did, so a thread writes them while the
        user goes on. Queries (``query``, ``execute``) and closing wait for them first.
        """
        with self._hits_lock:
            self._pending_hits.extend(keys)
            if self._hits_writer is None:
                self._hits_writer = threading.Thread(target=self._write_hits,
                                                     name="nbindustria-hits")
                self._hits_writer.start()  # not a daemon: the interpreter waits for it

    def _write_hits(self) -> None:
        while True:
            with self._hits_lock:
                keys, self._pending_hits = self._pending_hits, []
                if not keys:
                    self._hits_writer = None
                    return
            # Statistics: never fail a run for them.
            with contextlib.suppress(sqlite3.Error), self.transaction() as conn:
                for start in range(0, len(keys), 900):  # a statement per chunk, not per key
                    chunk = keys[start:start + 900]
                    conn.execute("UPDATE entries SET hits = hits + 1 WHERE key IN "
                                 f"({','.join('?' * len(chunk))})", chunk)

    def flush_hits(self) -> None:
        """Wait until every counted hit is in the index."""
        writer = self._hits_writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()

    def put_code(self, digest: str, manifest: dict[str, Any]) -> None:
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO code (digest, manifest) VALUES (?, ?)",
                               (digest, json.dumps(manifest)))

    def get_code(self, digest: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT manifest FROM code WHERE digest = ?",
                                     (digest,)).fetchone()
        return json.loads(row[0]) if row else None

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self.flush_hits()
        with self._lock:
            return list(self._conn.execute(sql, params))

    def clear(self) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM entries")


class Store:
    """A cache directory: create or open it safely, then load, stage and commit entries."""

    def __init__(self, path: str | os.PathLike[str], key_dir: str | os.PathLike[str] | None = None):
        from .config import key_dir as default_key_dir

        self.path = Path(os.path.abspath(os.fspath(path)))
        self.entries_dir = self.path / "entries"
        self.tmp_dir = self.path / "tmp"
        self.quarantine_dir = self.path / "quarantine"
        self._entries_prefix = f"{self.entries_dir}{os.sep}"
        self._crash_at = os.environ.get("NBINDUSTRIA_TEST_CRASH_AT", "")
        _make_private_dir(self.path)
        for sub in (self.entries_dir, self.tmp_dir, self.quarantine_dir):
            _make_private_dir(sub)
        self.cache_id = self._read_or_create_marker()
        self._key = self._load_or_create_key(Path(key_dir) if key_dir else default_key_dir())
        self.index = Index(self.path / INDEX_NAME)
        self._verified_headers: dict[str, tuple[str, dict[str, Any], int]] = {}
        self._clean_tmp()

    # ---- set-up ------------------------------------------------------------------------------

    def _read_or_create_marker(self) -> str:
        marker = self.path / MARKER
        try:
            data = json.loads(marker.read_text())
            return str(data["cache_id"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, OSError) as exc:
            raise StoreError(f"{marker} is damaged ({exc}); it names this cache's key. "
                             "Restore it, or use a new cache directory.") from None
        cache_id = uuid.uuid4().hex
        _atomic_write(marker, json.dumps({"format": FORMAT_VERSION, "cache_id": cache_id,
                                          "created": time.time()}).encode())
        return cache_id

    def _has_entries(self) -> bool:
        return any(True for _ in self.entries_dir.glob("*/*.nbi"))

    def _load_or_create_key(self, key_dir: Path) -> bytes:
        key_path = key_dir / f"{self.cache_id}.key"
        self.key_path = key_path
        _check_private_dir(key_dir, "key directory")
        _check_key_file(key_path)
        try:
            key = key_path.read_bytes()
        except FileNotFoundError:
            key = b""
        if key:
            if len(key) != 32:
                raise MissingCacheKeyError(f"the key file {key_path} is damaged "
                                           f"({len(key)} bytes, expected 32)")
            return key
        if self._has_entries():
            raise MissingCacheKeyError(
                f"the cache {self.path} has entries but its signing key {key_path} is missing "
                "(was the cache copied from another machine or user?). Entries are never "
                "trusted without their key. Copy the key file there if you made this cache, or "
                f"start afresh: move {self.path} away or choose another NBINDUSTRIA_CACHE_DIR.")
        _make_private_dir(key_dir, "key directory")
        key = secrets.token_bytes(32)
        tmp = key_dir / f".{self.cache_id}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, key_path)  # fails if another process made the key first: use theirs
        except FileExistsError:
            key = key_path.read_bytes()
        finally:
            os.unlink(tmp)
        _fsync_dir(str(key_dir))
        return key

    def _clean_tmp(self, older_than: float = 24 * 3600) -> None:
        """Remove staged files left by crashed writers (old enough that nobody writes them)."""
        now = time.time()
        for directory in (self.tmp_dir, *self.entries_dir.glob("??")):
            for entry in os.scandir(directory):
                if not entry.name.endswith(".part"):
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > older_than:
                        os.unlink(entry.path)

    def close(self) -> None:
        self.index.close()

    # ---- paths and signatures -----------------------------------------------------------------

    def entry_path(self, key: str) -> Path:
        return self.entries_dir / key[:2] / f"{key}.nbi"

    def entry_file(self, key: str) -> str:
        """``entry_path`` as a string, built without pathlib (hot path: cache lookups)."""
        return f"{self._entries_prefix}{key[:2]}/{key}.nbi"

    def _sign(self, header_bytes: bytes) -> bytes:
        return hmac.new(self._key, MAGIC + header_bytes, hashlib.sha256).digest()

    def _crash(self, point: str) -> None:
        # Crash tests kill the writer at each step of a commit (see tests/test_store_crash.py).
        if self._crash_at == point:
            os._exit(99)

    # ---- commit ------------------------------------------------------------------------------

    def commit(self, staged: list[Staged], rows: list[IndexRow] | None = None) -> None:
        """Sign, flush, rename into place, flush again, then index. After this returns, every
        entry is durable and whole. ``rows`` (one per staged entry) go to the index."""
        if not staged:
            return
        signed: list[tuple[Staged, str]] = []
        for item in staged:
            with open(item.path, "r+b") as f:
                pre = f.read(_PREAMBLE)
                (hlen,) = _unpack_u32(pre[_LEN_OFFSET:_PREAMBLE])
                header_bytes = f.read(hlen)
                if json.loads(header_bytes).get("key") != item.key:
                    raise StoreError(f"staged file {item.path} does not hold key {item.key}")
                f.seek(_SIG_OFFSET)
                f.write(self._sign(header_bytes))
            signed.append((item, header_digest(header_bytes)))
            self._crash("after-sign-one")
        self._crash("after-sign")
        _syncfs(str(self.entries_dir))
        self._crash("after-sync-data")
        shards = set()
        for n, (item, _) in enumerate(signed):
            final = self.entry_file(item.key)
            shard = os.path.dirname(final)
            if shard not in shards:
                os.makedirs(shard, mode=0o700, exist_ok=True)
                shards.add(shard)
            os.replace(item.path, final)
            if n == 0:
                self._crash("after-first-rename")
        self._crash("after-rename")
        _syncfs(str(self.entries_dir))
        self._crash("after-sync-rename")
        if rows is not None:
            by_key = {item.key: hd for item, hd in signed}
            for row in rows:
                row.header_digest = by_key.get(row.key, row.header_digest)
            self.index.put(rows)
        for item, hd in signed:
            self._verified_headers[item.key] = (hd, item.header, 0)

    def put(self, key: str, value: Any, meta: dict[str, Any] | None = None,
            row: IndexRow | None = None) -> Staged:
        """Stage and commit one value (convenience for tests and the CLI)."""
        staged = stage_value(self.entries_dir, key, value, meta or {})
        self.commit([staged], [row] if row else None)
        return staged

    # ---- reading -----------------------------------------------------------------------------

    def verified_header(self, key: str) -> tuple[str, dict[str, Any], int]:
        """(header digest, header, payload offset) after checking the signature; raises
        BadEntry (or FileNotFoundError when there is no entry)."""
        path = self.entry_file(key)
        sig, header_bytes, header, offset = read_header(path)
        if not hmac.compare_digest(sig, self._sign(header_bytes)):
            raise BadEntry("signature does not verify (not made with this cache's key, or "
                           "altered)")
        if header.get("key") != key:
            raise BadEntry(f"the entry holds key {header.get('key')!r}, not {key!r} "
                           "(a file moved into another entry's place)")
        return header_digest(header_bytes), header, offset

    def load(self, key: str, *, mmap_arrays: bool | None = None) -> Any:
        """The value of an entry, checked; raises BadEntry or FileNotFoundError."""
        _hd, header, offset = self.verified_header(key)
        return load_payload(self.entry_file(key), header, offset, mmap_arrays=mmap_arrays)

    def try_load(self, key: str, label: str = "", *,
                 mmap_arrays: bool | None = None) -> tuple[bool, Any]:
        """(True, value), or (False, None) after one warning and moving a bad entry aside."""
        try:
            return True, self.load(key, mmap_arrays=mmap_arrays)
        except FileNotFoundError:
            self.index.delete([key])
            return False, None
        except BadEntry as exc:
            self.reject(key, str(exc), label)
            return False, None

    def reject(self, key: str, reason: str, label: str = "") -> None:
        """Warn once, move a bad entry to quarantine/ with its reason, forget it in the index."""
        what = f"{label} ({key[:12]})" if label else key
        warnings.warn(f"cache entry of {what} is unusable: {reason}; it was moved to "
                      f"{self.quarantine_dir} and will be computed again",
                      CorruptEntryWarning, stacklevel=3)
        src = self.entry_path(key)
        dest = self.quarantine_dir / f"{key}.{int(time.time() * 1000)}.nbi"
        with contextlib.suppress(FileNotFoundError):
            os.replace(src, dest)
            fd = os.open(dest.with_suffix(".reason"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:  # private, like every file of the cache
                out.write(f"{label}\n{reason}\n")
        self.index.delete([key])
        self._verified_headers.pop(key, None)

    def present(self, keys: list[str]) -> dict[str, IndexRow]:
        """Index rows of the keys whose entry file is there with the size the index recorded.

        The index is derived data: an entry the index does not know (a crash between rename
        and index update) is found by its file, checked, and indexed again.
        """
        rows = self.index.get_many(keys)
        found: dict[str, IndexRow] = {}
        missing_rows: list[str] = []
        for key in keys:
            row = rows.get(key)
            try:
                st_size = os.stat(self.entry_file(key)).st_size
            except FileNotFoundError:
                if row is not None:
                    missing_rows.append(key)
                continue
            if row is None:
                recovered = self._reindex_one(key)
                if recovered is not None:
                    found[key] = recovered
                continue
            if st_size < row.size:
                self.reject(key, f"file is {st_size} bytes, smaller than its payload", row.label)
                continue
            found[key] = row
        if missing_rows:
            self.index.delete(missing_rows)
        return found

    def _reindex_one(self, key: str) -> IndexRow | None:
        try:
            hd, header, _offset = self.verified_header(key)
        except FileNotFoundError:
            return None
        except BadEntry as exc:
            self.reject(key, str(exc))
            return None
        row = row_from_header(key, hd, header)
        self.index.put([row])
        return row

    def keys(self) -> Iterator[str]:
        for path in self.entries_dir.glob("*/*.nbi"):
            yield path.stem

    def verify(self, key: str) -> str | None:
        """None if the entry is whole and signed, else the reason it is not."""
        try:
            self.load(key, mmap_arrays=True)
        except FileNotFoundError:
            return "missing"
        except BadEntry as exc:
            return str(exc)
        return None

    def verify_all(self, *, quarantine: bool = True) -> dict[str, str]:
        """Check every entry; returns {key: reason} of the bad ones (moved aside if asked)."""
        bad: dict[str, str] = {}
        for key in list(self.keys()):
            reason = self.verify(key)
            if reason is not None:
                bad[key] = reason
                if quarantine:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", CorruptEntryWarning)
                        self.reject(key, reason)
        return bad

    def rebuild_index(self) -> int:
        """Make the index again from the entries (it is derived data). Returns the count."""
        self.index.clear()
        rows = []
        for key in list(self.keys()):
            row = self._reindex_one_quiet(key)
            if row is not None:
                rows.append(row)
        self.index.put(rows)
        return len(rows)

    def _reindex_one_quiet(self, key: str) -> IndexRow | None:
        try:
            hd, header, _ = self.verified_header(key)
        except (FileNotFoundError, BadEntry):
            return None
        return row_from_header(key, hd, header)

    def delete(self, keys: Iterable[str]) -> int:
        count = 0
        keys = list(keys)
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.entry_path(key))
                count += 1
            self._verified_headers.pop(key, None)
        self.index.delete(keys)
        return count


def row_from_header(key: str, hd: str, header: dict[str, Any]) -> IndexRow:
    meta = header.get("meta") or {}
    return IndexRow(
        key=key, node=str(meta.get("node", "")), task=str(meta.get("task", "")),
        label=str(meta.get("label", "")), kind=str(header.get("kind", "")),
        size=int(header.get("length", 0)), result_digest=str(header.get("xxh3", "")),
        header_digest=hd, created=float(meta.get("created", 0.0)),
        duration=meta.get("duration"), cpu=meta.get("cpu"), peak_memory=meta.get("peak_memory"),
        engine=str(meta.get("engine", "")), host=str(meta.get("host", "")), hits=0,
        code_digest=str(meta.get("code_digest", "")), args=json.dumps(meta.get("args", {})),
        arg_digests=json.dumps(meta.get("arg_digests", {})),
        upstream=json.dumps(meta.get("upstream", {})))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    _fsync_dir(str(path.parent))
