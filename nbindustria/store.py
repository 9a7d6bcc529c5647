"""The on-disk cache: atomic, checksummed, signed entries, and the index that describes them.

Layout of a cache directory (0700, files 0600)::

    nbindustria-cache.json      format and cache id (the id names the key file, which lives elsewhere)
    entries/packs/<id>.<g>.nbs  segments: the small results of one commit group, as records
    entries/ab/abcdef....nbi    a result of its own (payload of PACK_LIMIT = 64 KiB or more)
    tmp/                        values staged by other tools
    quarantine/                 entries that failed a check, moved (or copied) aside with the reason
    index.sqlite                derived metadata (rebuildable from the entries), with each entry's
                                location: segment and record offset, or '' for a file of its own

An entry is ``MAGIC | signature (32) | header length (4) | header JSON | padding | payload``.
The header holds the key, the payload's kind, length and digests, and the task's metadata; the
payload starts at a 64-byte boundary so that arrays can be memory-mapped in place. A segment is a
sequence of such entries ("records"), each starting at a 64-byte boundary: one file created and
flushed per commit group instead of one per result, which is what makes durable writes cheap
(creating a file costs 0.5 - 1 ms on a plain disk). Large results keep a file of their own so that
they can be memory-mapped and so that rewriting a segment stays cheap.

Who writes what: whoever ran the task stages its result, unsigned: the kernel in memory (small)
or in a hidden file beside its final place (large); an engine that can reach the directory in one
part file per batch (``entries/packs/.*.part``, small results as records) or a file of its own.
Only the kernel holds the key, so only the kernel *commits*: it signs each header (HMAC-SHA256
over magic and header; the header holds the key, and the payload's SHA-256 for pickles, whose
loading can run code), writes the group's records into a new segment (copying an engine's records
out of its part file), flushes, renames into place, flushes again, and indexes the group (entries
and segment in one transaction). A crash before the rename leaves nothing; after it, a segment the
index does not know is scanned and indexed when the store opens (or on a miss).

Segments are never changed in place. Deleting (``delete``, a bad record moved aside, an older
copy of a key committed again) writes generation g+1 of the segment with the records the index
still places there, flushes and renames it, moves the index to it, then removes generation g; a
crash in between is repaired on open (the newest generation is indexed, older ones removed), so
a deleted record never comes back. A reader checks the signature and the key before anything
else, and the payload's length and digest before handing any value out; a bad entry is moved
aside and reported as a miss, never unpickled. ``present`` reads only the index: an entry that
turns out missing or bad when loaded is a miss then, and the scheduler runs its task again.

Format 2 (segments). A cache of format 1 (one file per result) is read as it is: its files are
entries of their own; its index gains the location columns.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import hmac
import json
import mmap
import operator
import os
import pickle
import secrets
import sqlite3
import stat
import struct
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from .errors import (
    CorruptEntryWarning,
    MissingCacheKeyError,
    StoreError,
    StoreFullError,
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
# 2: small results are records packed in segment files (entries/packs/*.nbs). Caches of format 1
# (one file per result) are read as they are: their files are standalone entries of format 2.
FORMAT_VERSION = 2
# Arrays at least this large come back memory-mapped (read-only): loading runs at memory speed.
MMAP_THRESHOLD = 1 << 20
# Payloads below this go into the commit group's segment; larger ones get a file of their own
# (so that arrays can be memory-mapped, and rewriting a segment stays cheap).
PACK_LIMIT = 64 << 10
# What one read of a record takes: a packed payload and a header of a usual size.
_RECORD_READ = PACK_LIMIT + (16 << 10)
PACKS = "packs"
SEGMENT_SUFFIX = ".nbs"
_CHUNK = 16 << 20


class BadEntry(Exception):
    """An entry failed a check. Internal: callers turn it into a warning and a miss."""


@dataclass
class Staged:
    """A result waiting for the kernel to sign and commit it.

    Where it waits: in memory (``payload``; the kernel staged it and writes it into the commit's
    segment), as an unsigned record at ``offset`` of an engine's segment part file (``path``,
    ``packed``), or as a whole unsigned entry file (``path``; large payloads).
    """

    key: str
    path: str
    header: dict[str, Any]
    size: int  # payload bytes
    header_bytes: bytes = b""
    offset: int = 0
    packed: bool = False
    payload: bytes | None = None  # in memory: kernel only, never sent between processes
    part_records: int = 0  # records in the engine's part file (set when the batch ends)

    @property
    def result_digest(self) -> str:
        return str(self.header["xxh3"])


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


# The header is signed as the bytes it is: no canonical order is needed (sorting costs a tenth of
# staging a small entry).
_encode_header = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _prefix(header_bytes: bytes, signature: bytes = _EMPTY_SIG) -> bytes:
    prefix = MAGIC + signature + _pack_u32(len(header_bytes)) + header_bytes
    return prefix + b"\0" * (_align(len(prefix)) - len(prefix))


def _record(header_bytes: bytes, signature: bytes, payload: bytes) -> bytes:
    """One record of a segment: an entry, followed by zeros up to the next 64-byte boundary."""
    data = _prefix(header_bytes, signature) + payload
    return data + b"\0" * (_align(len(data)) - len(data))


# --------------------------------------------------------------------------------------------
# Writing (no key needed: this part runs on engines too)
# --------------------------------------------------------------------------------------------


def _is_plain_array(value: Any) -> bool:
    np = _numpy_if_loaded()
    return (np is not None and isinstance(value, np.ndarray) and not value.dtype.hasobject
            and value.dtype.names is None)


def _numpy_if_loaded() -> Any:
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


_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})


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
    if type(value) in _SCALARS:  # the same bytes as cloudpickle's, without its set-up
        data = pickle.dumps(value, protocol=5)
        return "pickle", {"sha256": hashlib.sha256(data).hexdigest()}, [data]
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


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = os.pwrite(fd, view[:_CHUNK], offset)
        view = view[written:]
        offset += written


class SegmentWriter:
    """An engine's part file for one batch of jobs: its small results as unsigned records, one
    after the other. The kernel copies the records it commits into its own segment (signing
    them) and removes the part once every record in it was committed or discarded."""

    def __init__(self, entries_dir: str | os.PathLike[str]):
        self.directory = os.path.join(os.fspath(entries_dir), PACKS)
        self.path = os.path.join(self.directory, f".{secrets.token_hex(12)}.part")
        self._fd: int | None = None
        self._end = 0
        self.count = 0

    def append(self, header_bytes: bytes, payload: bytes) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        offset = self._end
        record = _record(header_bytes, _EMPTY_SIG, payload)
        _pwrite_all(self._fd, record, offset)  # a failed write is overwritten by the next one
        self._end = offset + len(record)
        self.count += 1
        return offset

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def stage_value(entries_dir: str | os.PathLike[str], key: str, value: Any, meta: dict[str, Any],
                *, label: str = "task", fsync: bool = False, segment: SegmentWriter | None = None,
                pack: bool | None = None) -> Staged:
    """Serialize ``value`` and stage it, unsigned: a small payload (below PACK_LIMIT; ``pack``
    forces the choice) in memory or, on an engine, as a record of the batch's ``segment``;
    a large one in a new hidden file beside its entry's final place.

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
    header_bytes = _encode_header(header).encode()
    if (size < PACK_LIMIT) if pack is None else pack:
        # A copy: the value may be changed in place before the commit writes it.
        payload = b"".join(bytes(c) if not isinstance(c, bytes) else c for c in chunks)
        if segment is not None:
            offset = segment.append(header_bytes, payload)
            return Staged(key, segment.path, header, size, header_bytes, offset, packed=True)
        return Staged(key, "", header, size, header_bytes, packed=True, payload=payload)
    prefix = _prefix(header_bytes)
    shard = os.path.join(os.fspath(entries_dir), key[:2])
    path = os.path.join(shard, f".{key}.{secrets.token_hex(8)}.part")
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
    return Staged(key=key, path=path, header=header, size=size, header_bytes=header_bytes)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _parse_preamble(pre: bytes) -> int:
    if len(pre) < _PREAMBLE or pre[:_SIG_OFFSET] != MAGIC:
        raise BadEntry("not an nbindustria entry (bad magic or truncated)")
    (hlen,) = _unpack_u32(pre[_LEN_OFFSET:_PREAMBLE])
    if hlen > _HEADER_LIMIT:
        raise BadEntry("header length is implausible")
    return int(hlen)


def _parse_header(header_bytes: bytes, hlen: int, padding: bytes, pad_len: int
                  ) -> dict[str, Any]:
    if len(header_bytes) != hlen:
        raise BadEntry("truncated header")
    # The padding up to the payload is covered by no digest: it must be zeros.
    if len(padding) != pad_len or padding.strip(b"\0"):
        raise BadEntry("damaged padding after the header")
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise BadEntry("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BadEntry("header is not an object")
    return header


def read_header(path: str | os.PathLike[str], offset: int = 0
                ) -> tuple[bytes, bytes, dict[str, Any], int]:
    """(signature, header bytes, header, payload offset) of the entry (or record) at
    ``offset``; raises BadEntry, or FileNotFoundError when there is no such file."""
    try:
        with open(path, "rb") as f:
            if offset:
                f.seek(offset)
            pre = f.read(_PREAMBLE)
            hlen = _parse_preamble(pre)
            pad_len = _align(_PREAMBLE + hlen) - _PREAMBLE - hlen
            rest = f.read(hlen + pad_len)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BadEntry(f"cannot read: {exc}") from None
    header = _parse_header(rest[:hlen], hlen, rest[hlen:], pad_len)
    return pre[_SIG_OFFSET:_LEN_OFFSET], rest[:hlen], header, offset + _PREAMBLE + hlen + pad_len


def header_digest(header_bytes: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(header_bytes)


def _length_and_kind(header: dict[str, Any]) -> tuple[int, str]:
    try:
        return int(header["length"]), str(header["kind"])
    except (KeyError, TypeError, ValueError):
        raise BadEntry("header lacks the payload's length or kind") from None


def load_payload(path: str | os.PathLike[str], header: dict[str, Any], offset: int,
                 *, mmap_arrays: bool | None = None, packed: bool = False) -> Any:
    """Check the payload against the (already trusted) header and return the value. A packed
    record is one of several in its segment: the file holds at least its payload."""
    length, kind = _length_and_kind(header)
    if not packed:
        try:
            file_size = os.stat(path).st_size
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise BadEntry(f"cannot stat: {exc}") from None
        if file_size != offset + length:
            raise BadEntry(f"size is {file_size} bytes, the header says {offset + length}")
    if kind == "ndarray":
        return _load_array(path, header, offset, length, mmap_arrays)
    if kind != "pickle":
        raise BadEntry(f"unknown payload kind {kind!r}")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return _unpickled(data, header, length)


def _unpickled(data: bytes, header: dict[str, Any], length: int) -> Any:
    """The value of a pickle payload, after checking its length and digest against the
    (trusted) header."""
    if len(data) != length:
        raise BadEntry("truncated payload")
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), str(header.get("sha256"))):
        raise BadEntry("payload digest does not match (damaged or altered)")
    import cloudpickle

    return cloudpickle.loads(data)


def _array_layout(header: dict[str, Any], length: int) -> tuple[Any, tuple[int, ...]]:
    """(dtype, shape) of an array payload, checked against its length."""
    import numpy as np

    dtype = np.dtype(header["dtype"])
    shape = tuple(int(n) for n in header["shape"])
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != length:
        raise BadEntry("array shape and dtype do not match the payload length")
    return dtype, shape


def _checked_array(view: Any, header: dict[str, Any], dtype: Any,
                   shape: tuple[int, ...]) -> Any:
    """A read-only array over ``view`` (the payload's bytes), after checking their digest."""
    import numpy as np

    # One pass over the (mapped) bytes checks them; the array is then a view of the same pages.
    if xxhash.xxh3_128_hexdigest(view) != header["xxh3"]:
        raise BadEntry("payload digest does not match (damaged or altered)")
    array = np.ndarray(shape, dtype=dtype, buffer=view, order=header.get("order", "C"))
    array.flags.writeable = False
    return array


def _load_array(path: str | os.PathLike[str], header: dict[str, Any], offset: int, length: int,
                mmap_arrays: bool | None) -> Any:
    import numpy as np

    dtype, shape = _array_layout(header, length)
    use_mmap = length >= MMAP_THRESHOLD if mmap_arrays is None else mmap_arrays
    if length == 0:
        array = np.empty(shape, dtype=dtype, order=header.get("order", "C"))
        array.flags.writeable = False
        return array
    with open(path, "rb") as f:
        if use_mmap:
            buffer: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if len(buffer) < offset + length:
                raise BadEntry("truncated payload")
        else:
            f.seek(offset)
            buffer = f.read(length)
            offset = 0
            if len(buffer) != length:
                raise BadEntry("truncated payload")
    return _checked_array(memoryview(buffer)[offset:offset + length], header, dtype, shape)


def record_header(buffer: Any, offset: int) -> tuple[bytes, bytes, dict[str, Any], int]:
    """``read_header`` for a record of a segment held in memory (bytes or a read-only mmap)."""
    pre = buffer[offset:offset + _PREAMBLE]
    hlen = _parse_preamble(pre)
    start = offset + _PREAMBLE
    pad_len = _align(_PREAMBLE + hlen) - _PREAMBLE - hlen
    rest = buffer[start:start + hlen + pad_len]
    header = _parse_header(rest[:hlen], hlen, rest[hlen:], pad_len)
    return pre[_SIG_OFFSET:_LEN_OFFSET], rest[:hlen], header, start + hlen + pad_len


def record_payload(buffer: Any, header: dict[str, Any], offset: int) -> Any:
    """``load_payload`` for a record of a segment held in memory, whose header the caller has
    verified. Arrays come back as read-only copies, as small arrays do from ``load_payload``."""
    length, kind = _length_and_kind(header)
    data = buffer[offset:offset + length]
    if kind == "pickle":
        return _unpickled(data, header, length)
    if kind == "ndarray" and length:
        dtype, shape = _array_layout(header, length)
        if len(data) != length:
            raise BadEntry("truncated payload")
        return _checked_array(data, header, dtype, shape)
    raise BadEntry(f"a {kind!r} payload of {length} bytes is read from its file")


def verify_staged_input(path: str, expected_header_digest: str, *, offset: int = 0,
                        mmap_arrays: bool | None = None) -> Any:
    """Load an entry (or a record of a segment, at ``offset``) on an engine: the kernel vouches
    for the header (it checked the signature) by its digest; the payload is checked against the
    header. No key needed."""
    _sig, header_bytes, header, payload_offset = read_header(path, offset)
    if not hmac.compare_digest(header_digest(header_bytes), expected_header_digest):
        raise BadEntry("header differs from the one the kernel verified")
    return load_payload(path, header, payload_offset, mmap_arrays=mmap_arrays,
                        packed=path.endswith(SEGMENT_SUFFIX))


@dataclass
class Record:
    """A record found by scanning a segment (its checks are the caller's)."""

    offset: int
    signature: bytes
    header_bytes: bytes
    header: dict[str, Any]
    end: int  # just after its payload


def scan_segment(path: str | os.PathLike[str]) -> Iterator[Record]:
    """The records of a segment, in order. After damage (a bad magic or header), the scan looks
    for the next record at the following 64-byte boundaries: records are aligned, so one bad
    record does not hide the ones after it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            pos = 0
            while pos + _PREAMBLE <= size:
                try:
                    signature, header_bytes, header, payload = record_header(data, pos)
                    end = payload + int(header["length"])
                    if end > size or int(header["length"]) < 0:
                        raise BadEntry("truncated")
                except (BadEntry, KeyError, TypeError, ValueError):
                    pos += _ALIGN
                    continue
                yield Record(pos, signature, header_bytes, header, end)
                pos = _align(end)


def _segment_id(name: str) -> tuple[str, int] | None:
    """``<id>.<generation>.nbs`` -> (id, generation); None for other names."""
    parts = name.split(".")
    if len(parts) != 3 or "." + parts[2] != SEGMENT_SUFFIX or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


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


class Presence(NamedTuple):
    """What a cache lookup (``Store.present``) reads of an entry's index row: enough to resolve
    a hit (its dependents' keys need the result's digest). Each further column would cost
    about 1k instructions per key (a lookup of these two: ~13k): what a view shows of a hit
    (duration, size, ...) is read when it asks (:meth:`Index.details`), the whole row with
    ``Index.get_many`` and ``Index.query``."""

    key: str
    result_digest: str


# What a view shows of a cache hit, read when it asks (Index.details).
ENTRY_DETAILS = ("duration", "size", "engine", "peak_memory", "cpu")
_PRESENCE = ",".join(Presence._fields)
# A row as a Presence, made in C (Presence._make is a Python function: a call per row).
_presence_of_row = functools.partial(tuple.__new__, Presence)
# The covering index of lookups, as every cache since format 2 has it (changing it would leave
# old caches with another index under the same name).
_LOOKUP_INDEX = "key,size,result_digest,created,duration,cpu,peak_memory,engine,code_digest"


@dataclass
class IndexRow:
    """An entry's whole index row."""

    key: str
    size: int
    result_digest: str
    created: float
    duration: float | None
    cpu: float | None
    peak_memory: int | None
    engine: str
    code_digest: str
    label: str
    node: str
    task: str
    kind: str
    header_digest: str
    host: str
    hits: int
    args: str  # JSON: {param: summary}
    arg_digests: str  # JSON: {param: digest}
    upstream: str  # JSON: {param path: upstream result digest}
    segment: str = ""  # "packs/<name>.nbs" for a record of a segment, "" for a file of its own
    record_offset: int = 0  # where the record starts in its segment

    def presence(self) -> Presence:
        return Presence._make(getattr(self, name) for name in Presence._fields)


_COLUMNS = [f for f in IndexRow.__dataclass_fields__]
_row_values = operator.attrgetter(*_COLUMNS)


# Less free space than this, after a write failed, is a full disk (SQLite reports one as an I/O
# error when it cannot even grow its journal).
_FULL_BELOW = 1 << 20


def disk_full(path: str | os.PathLike[str]) -> bool:
    """Whether the disk holding ``path`` is (nearly) full, for its user."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _FULL_BELOW


def disk_error(path: str | os.PathLike[str], doing: str, exc: BaseException) -> StoreError:
    """The error to raise when the cache cannot be written: StoreFullError, with what to do,
    when its disk is full."""
    code = getattr(exc, "errno", None)
    what = os.strerror(code) if isinstance(code, int) else str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or disk_full(path):
        return StoreFullError(f"{doing}: the disk is full ({what}). Free space on it "
                              "(`nbindustria gc --max-size SIZE` deletes the oldest results), "
                              "then run again.")
    return StoreError(f"{doing}: {what}")


def _in_chunks(conn: sqlite3.Connection, sql: str, keys: list[str],
               size: int = 900) -> Iterator[sqlite3.Cursor]:
    """The cursors of ``sql`` (which ends in "IN ") for ``keys``, a chunk of them each (SQLite
    bounds the parameters of a statement). The caller reads the rows (in C where it can)."""
    for start in range(0, len(keys), size):
        chunk = keys[start:start + size]
        yield conn.execute(f"{sql}({','.join('?' * len(chunk))})", chunk)


# Indexes being closed on a thread (Index.close(wait=False)), by path.
_CLOSING: dict[str, list[threading.Thread]] = {}
_CLOSING_LOCK = threading.Lock()


def wait_closed(path: str | os.PathLike[str]) -> None:
    """Wait until every index at ``path`` that this process is closing in the background is
    closed."""
    with _CLOSING_LOCK:
        threads = list(_CLOSING.get(os.path.abspath(path), ()))
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join()


class Index:
    """SQLite metadata beside the entries. Derived data: ``rebuild`` makes it again from them."""

    def __init__(self, path: Path):
        self.path = path
        # An index of this path still being closed by this process (close(wait=False)) is
        # closed first, so that its last steps (the checkpoint, removing the WAL) never overlap
        # this connection's start in the same process.
        wait_closed(path)
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
                " arg_digests TEXT, upstream TEXT, segment TEXT DEFAULT '',"
                " record_offset INTEGER DEFAULT 0)")
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(entries)")}
            for column, kind in (("segment", "TEXT DEFAULT ''"),
                                 ("record_offset", "INTEGER DEFAULT 0")):
                if column not in columns:  # an index made before segments (format 1)
                    self._conn.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")
            self._conn.execute("CREATE INDEX IF NOT EXISTS entries_node ON entries(node)")
            self._conn.execute(
                "CREATE INDEX IF NOT EXISTS entries_segment ON entries(segment)")
            # A covering index for lookups: ``present`` reads only this B-tree.
            self._conn.execute(
                f"CREATE INDEX IF NOT EXISTS entries_lookup ON entries({_LOOKUP_INDEX})")
            # The segment files whose records the index holds (any other one on disk is
            # scanned and indexed: a crash came between its rename and the index update).
            self._conn.execute("CREATE TABLE IF NOT EXISTS segments (name TEXT PRIMARY KEY)")
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

    def close(self, wait: bool = True) -> None:
        """Close the connection. ``wait=False`` closes it on a thread and returns at once:
        closing the last connection checkpoints the WAL into the database file and flushes it
        (8-12 ms), which the caller need not wait for. What the index holds is derived data
        (entries are durable before they are indexed, ``Store.commit``, and a segment the index
        lost is indexed again on open), and every transaction is in the WAL already: the thread
        is not a daemon, so the interpreter finishes the close before it exits; a process that
        dies first leaves the WAL, which the next opener replays. Opening the same index again
        in this process waits for the close (:func:`wait_closed`)."""
        # At interpreter exit (atexit) a new thread would no longer be waited for: close here.
        if wait or not threading.main_thread().is_alive():
            self._close()
            return
        thread = threading.Thread(target=self._close, name="nbindustria-index-close")
        with _CLOSING_LOCK:
            _CLOSING.setdefault(os.path.abspath(self.path), []).append(thread)
        thread.start()  # not a daemon: the interpreter waits for it

    def _close(self) -> None:
        try:
            self.flush_hits()
            with self._lock:
                self._conn.close()
        finally:
            with _CLOSING_LOCK:
                threads = _CLOSING.get(os.path.abspath(self.path), [])
                if threading.current_thread() in threads:
                    threads.remove(threading.current_thread())
                    if not threads:
                        del _CLOSING[os.path.abspath(self.path)]

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

    def put(self, rows: Iterable[IndexRow], segments: Iterable[str] = ()) -> None:
        """Index entries, and the segments that hold them (in the same transaction)."""
        placeholders = ",".join("?" * len(_COLUMNS))
        with self.transaction() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO entries ({','.join(_COLUMNS)}) VALUES ({placeholders})",
                map(_row_values, rows))
            conn.executemany("INSERT OR IGNORE INTO segments (name) VALUES (?)",
                             [(name,) for name in segments])

    def present(self, keys: list[str]) -> dict[str, Presence]:
        """The lookup part of the rows of ``keys`` that are indexed."""
        found: dict[str, Presence] = {}
        make = _presence_of_row
        # In index order: neighbouring lookups share the B-tree's pages (~15% less per key).
        keys = sorted(keys)
        with self._lock:
            for cursor in _in_chunks(self._conn, f"SELECT {_PRESENCE} FROM entries INDEXED BY "
                                     "entries_lookup WHERE key IN ", keys, 4096):
                for row in map(make, cursor):
                    found[row.key] = row
        return found

    def details(self, keys: list[str]) -> dict[str, tuple[Any, ...]]:
        """The ENTRY_DETAILS of the keys that are indexed (a view of a run reads them for its
        cache hits, maybe after the pipeline was closed: then from the index file, read-only)."""
        sql = f"SELECT key,{','.join(ENTRY_DETAILS)} FROM entries WHERE key IN "
        found: dict[str, tuple[Any, ...]] = {}
        with self._lock:
            try:
                conn, own = self._conn, False
                conn.execute("SELECT 1")
            except sqlite3.ProgrammingError:  # closed
                try:
                    conn, own = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True), True
                except sqlite3.OperationalError:  # the cache was deleted since: nothing known
                    return found
            try:
                for cursor in _in_chunks(conn, sql, keys):
                    for row in cursor:
                        found[row[0]] = row[1:]
            finally:
                if own:
                    conn.close()
        return found

    def get_many(self, keys: list[str]) -> dict[str, IndexRow]:
        found: dict[str, IndexRow] = {}
        with self._lock:
            for cursor in _in_chunks(self._conn, f"SELECT {','.join(_COLUMNS)} FROM entries "
                                     "WHERE key IN ", keys):
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
            conn.execute("DELETE FROM segments")

    def location(self, key: str) -> tuple[str, int] | None:
        """(segment, record offset) of an entry ("" for a file of its own), or None."""
        with self._lock:
            row = self._conn.execute("SELECT segment, record_offset FROM entries WHERE key = ?",
                                     (key,)).fetchone()
        return (str(row[0] or ""), int(row[1] or 0)) if row else None

    def locations(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        found: dict[str, tuple[str, int]] = {}
        with self._lock:
            for cursor in _in_chunks(self._conn, "SELECT key, segment, record_offset FROM "
                                     "entries WHERE key IN ", keys):
                for key, segment, offset in cursor:
                    found[key] = (str(segment or ""), int(offset or 0))
        return found

    def in_segment(self, segment: str) -> dict[str, int]:
        """{key: record offset} of the entries the index places in ``segment``."""
        with self._lock:
            return {str(k): int(o) for k, o in self._conn.execute(
                "SELECT key, record_offset FROM entries WHERE segment = ?", (segment,))}

    def segment_names(self) -> set[str]:
        with self._lock:
            return {str(r[0]) for r in self._conn.execute("SELECT name FROM segments")}

    def packed_keys(self) -> list[str]:
        with self._lock:
            return [str(r[0]) for r in self._conn.execute(
                "SELECT key FROM entries WHERE segment != ''")]


class Store:
    """A cache directory: create or open it safely, then load, stage and commit entries."""

    def __init__(self, path: str | os.PathLike[str], key_dir: str | os.PathLike[str] | None = None):
        from .config import key_dir as default_key_dir

        self.path = Path(os.path.abspath(os.fspath(path)))
        self.entries_dir = self.path / "entries"
        self.tmp_dir = self.path / "tmp"
        self.quarantine_dir = self.path / "quarantine"
        self.packs_dir = self.entries_dir / PACKS
        self._entries_prefix = f"{self.entries_dir}{os.sep}"
        self._crash_at = os.environ.get("NBINDUSTRIA_TEST_CRASH_AT", "")
        try:
            _make_private_dir(self.path)
            for sub in (self.entries_dir, self.packs_dir, self.tmp_dir, self.quarantine_dir):
                _make_private_dir(sub)
            self.cache_id = self._read_or_create_marker()
            self._key = self._load_or_create_key(Path(key_dir) if key_dir else default_key_dir())
            self.index = Index(self.path / INDEX_NAME)
        except StoreError:
            raise
        except (OSError, sqlite3.OperationalError) as exc:  # a full disk, above all
            raise disk_error(self.path, f"cannot open the cache {self.path}", exc) from exc
        # Engines' part files: how many of their records still wait to be committed or dropped.
        self._parts: dict[str, int] = {}
        self._packs_seen = -1  # mtime of packs/ when its segments were last matched with the index
        self._clean_tmp()
        self._recover_segments()

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
        return any(True for _ in self.entries_dir.glob("*/*.nbi")) or any(
            True for _ in self.entries_dir.glob(f"{PACKS}/*{SEGMENT_SUFFIX}"))

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
        for directory in (self.tmp_dir, self.packs_dir, *self.entries_dir.glob("??")):
            for entry in os.scandir(directory):
                if not entry.name.endswith(".part"):
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > older_than:
                        os.unlink(entry.path)

    def close(self, wait: bool = True) -> None:
        """Close the index (``wait=False``: in the background, see :meth:`Index.close`)."""
        self.index.close(wait)

    # ---- paths and signatures -----------------------------------------------------------------

    def entry_path(self, key: str) -> Path:
        """The file an entry has when it is not packed in a segment (see ``locate``)."""
        return self.entries_dir / key[:2] / f"{key}.nbi"

    def entry_file(self, key: str) -> str:
        """``entry_path`` as a string, built without pathlib (hot path: cache lookups)."""
        return f"{self._entries_prefix}{key[:2]}/{key}.nbi"

    def segment_file(self, segment: str) -> str:
        """The path of a segment named as the index names it (``packs/<id>.<gen>.nbs``)."""
        return f"{self._entries_prefix}{segment}"

    def locate(self, key: str) -> tuple[str, int, bool]:
        """(file, record offset, packed): where the entry of ``key`` is, as the index says. A key
        the index does not know is looked for in a file of its own."""
        where = self.index.location(key)
        if where is None or not where[0]:
            return self.entry_file(key), 0, False
        return self.segment_file(where[0]), where[1], True

    def _sign(self, header_bytes: bytes) -> bytes:
        return hmac.new(self._key, MAGIC + header_bytes, hashlib.sha256).digest()

    def _crash(self, point: str) -> None:
        # Crash tests kill the writer at each step of a commit (see tests/test_store_crash.py).
        if self._crash_at == point:
            os._exit(99)

    def _packs_mtime(self) -> int:
        try:
            return os.stat(self.packs_dir).st_mtime_ns
        except FileNotFoundError:
            return -1

    # ---- commit ------------------------------------------------------------------------------

    def commit(self, staged: list[Staged], rows: list[IndexRow] | None = None) -> None:
        """Sign, flush, rename into place, flush again, then index. After this returns, every
        entry is durable and whole.

        The small results of the group become the records of one new segment file, signed as
        they are written (one file created and flushed for the whole group); large ones are
        files of their own, signed in place. ``rows`` (one per staged entry; made from the
        headers when None) go to the index, with each entry's location. An older copy of a key
        committed again is removed afterwards (its segment is rewritten without it).
        """
        if not staged:
            return
        own = [item for item in staged if not item.packed]
        packed = [item for item in staged if item.packed]
        seen_before = self._packs_mtime()
        digests: dict[str, str] = {}
        for item in own:
            with open(item.path, "r+b") as f:
                pre = f.read(_PREAMBLE)
                (hlen,) = _unpack_u32(pre[_LEN_OFFSET:_PREAMBLE])
                header_bytes = f.read(hlen)
                if json.loads(header_bytes).get("key") != item.key:
                    raise StoreError(f"staged file {item.path} does not hold key {item.key}")
                f.seek(_SIG_OFFSET)
                f.write(self._sign(header_bytes))
            digests[item.key] = header_digest(header_bytes)
            self._crash("after-sign-one")
        segment, part, fd = "", "", -1
        offsets: dict[str, int] = {}
        try:
            if packed:
                records: list[bytes] = []
                end = 0
                parts: dict[str, int] = {}
                try:
                    for item in packed:
                        header_bytes, payload = self._staged_record(item, parts)
                        records.append(_record(header_bytes, self._sign(header_bytes), payload))
                        offsets[item.key] = end
                        end += len(records[-1])
                        digests[item.key] = header_digest(header_bytes)
                        self._crash("after-sign-one")
                finally:
                    for part_fd in parts.values():
                        os.close(part_fd)
                name = f"{secrets.token_hex(16)}.0{SEGMENT_SUFFIX}"
                segment = f"{PACKS}/{name}"
                part = f"{self.packs_dir}{os.sep}.{name}.part"
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                _pwrite_all(fd, b"".join(records), 0)
            self._crash("after-sign")
            if own:
                _syncfs(str(self.entries_dir))
            else:
                os.fsync(fd)
            self._crash("after-sync-data")
            renamed = 0
            if packed:
                os.replace(part, self.segment_file(segment))
                part = ""
                renamed += 1
                self._crash("after-first-rename")
            shards = set()
            for item in own:
                final = self.entry_file(item.key)
                shard = os.path.dirname(final)
                if shard not in shards:
                    os.makedirs(shard, mode=0o700, exist_ok=True)
                    shards.add(shard)
                os.replace(item.path, final)
                renamed += 1
                if renamed == 1:
                    self._crash("after-first-rename")
        finally:
            if fd >= 0:
                os.close(fd)
            if part:
                with contextlib.suppress(OSError):
                    os.unlink(part)
        self._crash("after-rename")
        if own:
            _syncfs(str(self.entries_dir))
        else:
            _fsync_dir(str(self.packs_dir))
        self._crash("after-sync-rename")
        if seen_before == self._packs_seen:
            self._packs_seen = self._packs_mtime()  # our own segment: nothing to recover
        if rows is None:
            rows = [row_from_header(item.key, "", item.header) for item in staged]
        for row in rows:
            row.header_digest = digests.get(row.key, row.header_digest)
            if row.key in offsets:
                row.segment, row.record_offset = segment, offsets[row.key]
            else:
                row.segment, row.record_offset = "", 0
        before = self.index.locations([item.key for item in staged])
        self.index.put(rows, segments=[segment] if segment else [])
        for item in packed:
            if item.payload is None:
                self._release_part(item.path, item.part_records)
        self._drop_older_copies(before, {row.key: row.segment for row in rows})

    def _staged_record(self, item: Staged, parts: dict[str, int]) -> tuple[bytes, bytes]:
        """(header bytes, payload) of a packed result, read from the engine's part file if
        it was staged there (the bytes there must be exactly what the engine reported)."""
        if item.header.get("key") != item.key:
            raise StoreError(f"staged result {item.path or '(in memory)'} does not hold key "
                             f"{item.key}")
        if item.payload is not None:
            return item.header_bytes, item.payload
        fd = parts.get(item.path)
        if fd is None:
            fd = parts[item.path] = os.open(item.path, os.O_RDONLY)
        hlen = len(item.header_bytes)
        start = _align(_PREAMBLE + hlen)
        data = os.pread(fd, start + item.size, item.offset)
        if (len(data) != start + item.size or data[:_SIG_OFFSET] != MAGIC
                or data[_LEN_OFFSET:_PREAMBLE] != _pack_u32(hlen)
                or data[_PREAMBLE:_PREAMBLE + hlen] != item.header_bytes):
            raise StoreError(f"staged record of {item.key} in {item.path} (offset "
                             f"{item.offset}) does not hold key {item.key} as staged")
        return item.header_bytes, data[start:]

    def _release_part(self, path: str, records: int) -> None:
        """One record of an engine's part file is committed or dropped; the part goes when
        none is left."""
        left = self._parts.get(path, records) - 1
        if left > 0:
            self._parts[path] = left
            return
        self._parts.pop(path, None)
        with contextlib.suppress(OSError):
            os.unlink(path)

    def discard(self, item: Staged) -> None:
        """A staged result that will not be committed (a late or duplicate reply)."""
        if not item.packed:
            with contextlib.suppress(OSError):
                os.unlink(item.path)
        elif item.payload is None:
            self._release_part(item.path, item.part_records)

    def _drop_older_copies(self, before: dict[str, tuple[str, int]],
                           now: dict[str, str]) -> None:
        """Keys committed again: remove the copy where each was before (a segment keeps only
        the records the index places in it), so that no older copy can come back."""
        stale: set[str] = set()
        for key, (old, _offset) in before.items():
            new = now.get(key)
            if new is None or old == new:
                continue
            if old:
                stale.add(old)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.entry_file(key))
        if stale:
            self._compact(stale)

    def put(self, key: str, value: Any, meta: dict[str, Any] | None = None,
            row: IndexRow | None = None, *, pack: bool | None = None) -> Staged:
        """Stage and commit one value (convenience for tests and the CLI)."""
        staged = stage_value(self.entries_dir, key, value, meta or {}, pack=pack)
        self.commit([staged], [row] if row else None)
        return staged

    # ---- segments: rewriting, recovering ----------------------------------------------------

    def _compact(self, segments: Iterable[str], drop: Iterable[str] = ()) -> int:
        """Rewrite each segment with only the records the index places in it, less ``drop``.

        Segments are never changed in place: the rewrite is generation n+1 of the segment,
        flushed and renamed into place before the index moves to it; the old file is removed
        after. After a crash in between, ``_recover_segments`` indexes the new generation and
        removes the old one, so a dropped record never comes back. A segment with nothing left
        is removed (and the removal flushed) before the index forgets it. Returns how many
        records of ``drop`` were removed.
        """
        drop = set(drop)
        removed = 0
        seen_before = self._packs_mtime()
        for segment in sorted(set(segments)):
            ident = _segment_id(os.path.basename(segment))
            if ident is None:
                continue
            live = self.index.in_segment(segment)
            removed += sum(1 for key in live if key in drop)
            keep = sorted(((o, k) for k, o in live.items() if k not in drop))
            path = self.segment_file(segment)
            data = b""
            if keep:
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    keep = []
            records: list[bytes] = []
            moved: list[tuple[str, int, str, str]] = []
            end = 0
            new_segment = f"{PACKS}/{ident[0]}.{ident[1] + 1}{SEGMENT_SUFFIX}"
            for offset, key in keep:
                record = _record_bytes(data, offset)
                if record is None:
                    self._quarantine_bytes(key, data[offset:offset + _PREAMBLE + 4096],
                                           "unreadable when its segment was rewritten", "")
                    continue
                records.append(record)
                moved.append((new_segment, end, key, segment))
                end += len(record)
            if not records:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                _fsync_dir(str(self.packs_dir))
                with self.index.transaction() as conn:
                    conn.execute("DELETE FROM entries WHERE segment = ?", (segment,))
                    conn.execute("DELETE FROM segments WHERE name = ?", (segment,))
                continue
            part = f"{self.packs_dir}{os.sep}.{ident[0]}.{ident[1] + 1}.part"
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _pwrite_all(fd, b"".join(records), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(part, self.segment_file(new_segment))
            _fsync_dir(str(self.packs_dir))
            self._crash("compact-after-rename")
            with self.index.transaction() as conn:
                conn.executemany("UPDATE entries SET segment = ?, record_offset = ? "
                                 "WHERE key = ? AND segment = ?", moved)
                conn.execute("DELETE FROM entries WHERE segment = ?", (segment,))
                conn.execute("DELETE FROM segments WHERE name = ?", (segment,))
                conn.execute("INSERT OR IGNORE INTO segments (name) VALUES (?)",
                             (new_segment,))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if seen_before == self._packs_seen:
            self._packs_seen = self._packs_mtime()
        return removed

    def _current_segments(self) -> tuple[set[str], list[str]]:
        """(the newest generation of each segment on disk, older generations left behind)."""
        try:
            names = os.listdir(self.packs_dir)
        except FileNotFoundError:
            return set(), []
        latest: dict[str, tuple[int, str]] = {}
        obsolete: list[str] = []
        for name in names:
            ident = _segment_id(name)
            if ident is None:
                continue
            previous = latest.get(ident[0])
            if previous is None or ident[1] > previous[0]:
                if previous is not None:
                    obsolete.append(f"{PACKS}/{previous[1]}")
                latest[ident[0]] = (ident[1], name)
            else:
                obsolete.append(f"{PACKS}/{name}")
        return {f"{PACKS}/{name}" for _gen, name in latest.values()}, obsolete

    def _recover_segments(self) -> None:
        """Match the segment files with the index: index a segment it does not know (a crash
        came between its rename and the index update, or another process is committing it:
        indexing it twice is harmless), remove older generations a rewrite left behind, and
        forget segments that are gone."""
        self._packs_seen = self._packs_mtime()
        current, obsolete = self._current_segments()
        known = self.index.segment_names()
        stale: set[str] = set()
        for segment in sorted(current - known):
            stale |= self._index_segment(segment)
        gone = (known - current) | set(obsolete)
        if gone:
            with self.index.transaction() as conn:
                for segment in gone:
                    conn.execute("DELETE FROM entries WHERE segment = ?", (segment,))
                    conn.execute("DELETE FROM segments WHERE name = ?", (segment,))
        for segment in obsolete:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.segment_file(segment))
        if stale:
            self._compact(stale)

    def _signed_records(self, segment: str) -> list[IndexRow]:
        """Index rows of the records of a segment whose signature and key hold (others are
        never trusted: ``verify_all`` reports them)."""
        rows = []
        try:
            records = list(scan_segment(self.segment_file(segment)))
        except FileNotFoundError:
            return []
        for rec in records:
            key = rec.header.get("key")
            if not isinstance(key, str) or not hmac.compare_digest(
                    rec.signature, self._sign(rec.header_bytes)):
                continue
            rows.append(row_from_header(key, header_digest(rec.header_bytes), rec.header,
                                        segment, rec.offset))
        return rows

    def _index_segment(self, segment: str) -> set[str]:
        """Index a segment's records; a key also stored elsewhere keeps its newest copy.
        Returns the segments that now hold copies to drop."""
        rows = self._signed_records(segment)
        existing = self.index.get_many([r.key for r in rows])
        winners, stale = [], set()
        for row in rows:
            old = existing.get(row.key)
            if old is not None and old.segment != segment and old.created > row.created:
                stale.add(segment)
                continue
            if old is not None and old.segment and old.segment != segment:
                stale.add(old.segment)
            winners.append(row)
        self.index.put(winners, segments=[segment])
        return stale

    # ---- reading -----------------------------------------------------------------------------

    def verified_record(self, key: str, where: tuple[str, int, bool] | None = None
                        ) -> tuple[str, int, bool, str, dict[str, Any], int]:
        """(file, record offset, packed, header digest, header, payload offset) after checking
        the signature and the key; raises BadEntry (or FileNotFoundError: no such entry).
        ``where``: what ``locate(key)`` says, when the caller has asked it already."""
        path, offset, packed = where if where is not None else self.locate(key)
        sig, header_bytes, header, payload_offset = read_header(path, offset)
        self._check_signed(key, sig, header_bytes, header)
        return path, offset, packed, header_digest(header_bytes), header, payload_offset

    def _check_signed(self, key: str, sig: bytes, header_bytes: bytes,
                      header: dict[str, Any]) -> None:
        if not hmac.compare_digest(sig, self._sign(header_bytes)):
            raise BadEntry("signature does not verify (not made with this cache's key, or "
                           "altered)")
        if header.get("key") != key:
            raise BadEntry(f"the entry holds key {header.get('key')!r}, not {key!r} "
                           "(a file moved into another entry's place)")

    def verified_header(self, key: str) -> tuple[str, dict[str, Any], int]:
        """(header digest, header, payload offset) after checking the signature; raises
        BadEntry (or FileNotFoundError when there is no entry)."""
        _path, _offset, _packed, hd, header, payload_offset = self.verified_record(key)
        return hd, header, payload_offset

    def load(self, key: str, *, mmap_arrays: bool | None = None) -> Any:
        """The value of an entry, checked; raises BadEntry or FileNotFoundError."""
        for attempt in (0, 1):
            try:
                where = path, offset, packed = self.locate(key)
                if packed:
                    read = self._read_record(key, path, offset)
                    if read is not None:
                        return read[0]
                _path, _off, _packed, _hd, header, payload_offset = self.verified_record(
                    key, where)
                return load_payload(path, header, payload_offset, mmap_arrays=mmap_arrays,
                                    packed=packed)
            except FileNotFoundError:
                # Another process may have rewritten the segment meanwhile: look again once.
                if attempt or self.index.location(key) is None:
                    raise
        raise AssertionError("unreachable")

    def _read_record(self, key: str, path: str, offset: int) -> tuple[Any] | None:
        """(the value,) of the record of a segment at ``offset``, checked as ``load`` checks it,
        from one read of the file (its header and payload are read apart otherwise: two opens);
        None when the record is larger than that read (``load`` then reads it in two steps)."""
        with open(path, "rb") as f:
            buffer = os.pread(f.fileno(), _RECORD_READ, offset)
        if len(buffer) < _PREAMBLE:
            return None
        hlen = _parse_preamble(buffer[:_PREAMBLE])
        if _align(_PREAMBLE + hlen) > len(buffer):
            return None
        sig, header_bytes, header, payload_offset = record_header(buffer, 0)
        self._check_signed(key, sig, header_bytes, header)
        length, kind = _length_and_kind(header)
        if payload_offset + length > len(buffer) or (kind == "ndarray" and not length):
            return None  # (an empty array has no payload to read: load_payload makes it)
        return (record_payload(buffer, header, payload_offset),)

    def load_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of many small entries at once, checked as ``load`` checks one: one index
        query for all, and each segment file mapped once instead of opened twice per entry.

        Only records of segments are loaded here; a key whose entry is a file of its own, or
        that fails any check (a segment rewritten meanwhile, a bad record), is left out, for
        ``try_load`` to load, or to move aside if it is really bad. Nothing is rejected here.
        """
        by_segment: dict[str, list[tuple[str, int]]] = {}
        for key, (segment, offset) in self.index.locations(list(keys)).items():
            if segment:
                by_segment.setdefault(segment, []).append((key, offset))
        values: dict[str, Any] = {}
        for segment, records in by_segment.items():
            try:
                with open(self.segment_file(segment), "rb") as f:
                    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # gone (rewritten since), or empty: one by one
                continue
            with buffer:  # slices of an mmap are copies: nothing refers to it after this
                for key, offset in records:
                    try:
                        sig, header_bytes, header, payload = record_header(buffer, offset)
                        self._check_signed(key, sig, header_bytes, header)
                        values[key] = record_payload(buffer, header, payload)
                    except BadEntry:
                        continue
        return values

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
        """Warn once, move a bad entry to quarantine/ with its reason, forget it in the index.
        A record of a segment is copied there, and its segment rewritten without it: the other
        records of the segment stay as they are."""
        what = f"{label} ({key[:12]})" if label else key
        warnings.warn(f"cache entry of {what} is unusable: {reason}; it was moved to "
                      f"{self.quarantine_dir} and will be computed again",
                      CorruptEntryWarning, stacklevel=3)
        path, offset, packed = self.locate(key)
        if not packed:
            dest = self._quarantine_name(key)
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, dest)
                self._write_reason(dest, label, reason)
        else:
            segment = path[len(self._entries_prefix):]
            found = self._record_as_found(path, segment, offset)
            if found is not None:  # nothing to keep when the whole segment is gone
                self._quarantine_bytes(key, found, reason, label)
            self._compact([segment], drop=[key])
        self.index.delete([key])

    def _quarantine_name(self, key: str) -> Path:
        return self.quarantine_dir / f"{key}.{int(time.time() * 1000)}.nbi"

    @staticmethod
    def _write_reason(dest: Path, label: str, reason: str) -> None:
        fd = os.open(dest.with_suffix(".reason"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:  # private, like every file of the cache
            out.write(f"{label}\n{reason}\n")

    def _quarantine_bytes(self, key: str, data: bytes, reason: str, label: str) -> None:
        dest = self._quarantine_name(key)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        self._write_reason(dest, label, reason)

    def _record_as_found(self, path: str, segment: str, offset: int) -> bytes | None:
        """A record's bytes as far as they can be told apart: to its payload's end if its
        header can be read, else up to the next record the index knows (or the end). None
        when the segment itself is gone."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        record = _record_bytes(data, offset)
        if record is not None:
            return record
        later = [o for o in self.index.in_segment(segment).values() if o > offset]
        return data[offset:min(later) if later else len(data)]

    def present(self, keys: list[str]) -> dict[str, Presence]:
        """What the index says of the keys that have an entry (see :class:`Presence`).

        For a key the index knows, only the index is read (no file is opened or stat-ed): an
        entry that turns out missing or damaged when it is loaded is a miss then, and its task
        runs again (the scheduler and ``Pipeline.result_of`` do that). A key the index does not
        know is looked for on disk: in a segment the index has not seen (a crash came between
        its rename and the index update, or another process wrote it), or in a file of its own.
        """
        found = self.index.present(keys)
        if len(found) >= len(keys):
            return found
        missing = [key for key in keys if key not in found]
        if missing and self._packs_mtime() != self._packs_seen:
            self._recover_segments()
            found.update(self.index.present(missing))
            missing = [key for key in missing if key not in found]
        if len(missing) > 256:  # listing the shards is cheaper than a stat per key
            files = {name[:-4] for shard in self.entries_dir.glob("??")
                     for name in os.listdir(shard) if name.endswith(".nbi")}
            missing = [key for key in missing if key in files]
        for key in missing:
            if os.path.exists(self.entry_file(key)):
                recovered = self._reindex_one(key)
                if recovered is not None:
                    found[key] = recovered.presence()
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

    def _own_file_keys(self) -> list[str]:
        return [path.stem for path in self.entries_dir.glob("*/*.nbi")]

    def keys(self) -> Iterator[str]:
        """Every stored key: files of their own, and the records of segments (which the index
        holds for every segment it has seen; unseen ones are indexed when the store opens)."""
        seen: set[str] = set()
        for key in self._own_file_keys() + self.index.packed_keys():
            if key not in seen:
                seen.add(key)
                yield key

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
        """Check every entry; returns {key: reason} of the bad ones (moved aside if asked).
        Records of a segment that the index does not place there are reported too if their
        signature fails (``segment@offset`` when not even their key can be read), and dropped
        when ``quarantine``."""
        self._recover_segments()
        bad: dict[str, str] = {}
        for key in list(self.keys()):
            reason = self.verify(key)
            if reason is not None:
                bad[key] = reason
                if quarantine:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", CorruptEntryWarning)
                        self.reject(key, reason)
        untracked: set[str] = set()
        for segment in sorted(self.index.segment_names()):
            indexed = set(self.index.in_segment(segment).values())
            try:
                records = list(scan_segment(self.segment_file(segment)))
            except FileNotFoundError:
                continue
            for rec in records:
                if rec.offset in indexed:
                    continue
                untracked.add(segment)  # an older copy or damage: not reachable either way
                if not hmac.compare_digest(rec.signature, self._sign(rec.header_bytes)):
                    name = rec.header.get("key")
                    label = name if isinstance(name, str) else f"{segment}@{rec.offset}"
                    bad[label] = "signature does not verify (not made with this cache's key, " \
                                 "or altered)"
                    if quarantine:
                        self._quarantine_bytes(str(label).replace("/", "_"),
                                               _record_bytes_at(self.segment_file(segment),
                                                                rec.offset, rec.end),
                                               bad[label], "")
        if quarantine and untracked:
            self._compact(untracked)
        return bad

    def rebuild_index(self) -> int:
        """Make the index again from the entries (it is derived data). Returns the count.
        A key stored twice (a crash came before its older copy was dropped) keeps its newest
        copy; the older one is dropped."""
        current, obsolete = self._current_segments()
        for segment in obsolete:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.segment_file(segment))
        self.index.clear()
        rows: dict[str, IndexRow] = {}
        for key in self._own_file_keys():
            row = self._reindex_one_quiet(key)
            if row is not None:
                rows[key] = row
        stale: set[str] = set()
        for segment in sorted(current):
            for row in self._signed_records(segment):
                old = rows.get(row.key)
                if old is not None and old.created > row.created:
                    stale.add(segment)
                    continue
                if old is not None:
                    if old.segment:
                        stale.add(old.segment)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.entry_file(row.key))
                rows[row.key] = row
        self.index.put(list(rows.values()), segments=sorted(current))
        self._packs_seen = self._packs_mtime()
        if stale:
            self._compact(stale)
        return len(rows)

    def _reindex_one_quiet(self, key: str) -> IndexRow | None:
        try:
            hd, header, _ = self.verified_header(key)
        except (FileNotFoundError, BadEntry):
            return None
        return row_from_header(key, hd, header)

    def delete(self, keys: Iterable[str]) -> int:
        """Delete entries: a file of its own is removed; a segment is rewritten without the
        deleted records (or removed when nothing is left in it)."""
        keys = list(keys)
        locations = self.index.locations(keys)
        by_segment: dict[str, set[str]] = {}
        count = 0
        for key in keys:
            segment = locations.get(key, ("", 0))[0]
            if segment:
                by_segment.setdefault(segment, set()).add(key)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.entry_path(key))
                count += 1
        for segment, drop in by_segment.items():
            count += self._compact([segment], drop)
        self.index.delete(keys)
        return count


def _record_bytes(data: bytes, offset: int) -> bytes | None:
    """The bytes of the record at ``offset`` of a segment's contents, padding included; None if
    its preamble or header cannot be read, or its payload runs past the end."""
    try:
        hlen = _parse_preamble(data[offset:offset + _PREAMBLE])
        start = offset + _PREAMBLE
        header = json.loads(data[start:start + hlen])
        end = _align(start + hlen) + int(header["length"])
    except (BadEntry, ValueError, KeyError, TypeError):
        return None
    if end > len(data):
        return None
    record = data[offset:_align(end)]
    return record + b"\0" * (_align(end) - offset - len(record))


def _record_bytes_at(path: str, offset: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(end - offset)


def row_from_header(key: str, hd: str, header: dict[str, Any], segment: str = "",
                    record_offset: int = 0) -> IndexRow:
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
        upstream=json.dumps(meta.get("upstream", {})), segment=segment,
        record_offset=record_offset)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(str(path.parent))
