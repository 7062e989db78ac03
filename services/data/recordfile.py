"""The run file: an append-only, length-prefixed record of raw bus messages (no bus here).

Format (version 1; every integer little-endian)::

    header   8 bytes  magic  b"\\x89KBRUN\\r\\n"   (binary, and mangled by a text-mode copy)
             4 bytes  uint32 format version (1)
             4 bytes  uint32 n, the length of the metadata
             4 bytes  uint32 CRC-32 of the metadata
             n bytes  metadata: a MessagePack map (run_id, instrument, created_utc_s, ...)
    record   4 bytes  uint32 n, the length of the body (1 .. 256 MiB)
             4 bytes  uint32 CRC-32 (zlib.crc32) of the body
             n bytes  body: a MessagePack array [t_recv_s (float, UTC s), topic (str),
                      payload (bin: the message bytes exactly as received)]
    record   ...

A record is complete when its 8-byte prefix, its whole body and a matching CRC are there. A
writer killed in the middle of a write leaves at most one incomplete record at the end: the
reader yields every record before it and reports the tail (:attr:`RunReader.tail`: its offset,
its size and why it was rejected) instead of raising. The same holds for a tail of zeros (a
file system that extended the file before a power cut): a body length of 0 is never valid.

Flush policy of :class:`RunWriter`: records are collected in memory and handed to the operating
system (``os.write``) by :meth:`RunWriter.flush`, which :meth:`RunWriter.append` calls itself
once ``flush_interval_s`` (default 0.2 s) has passed since the last one or ``max_buffer_bytes``
are pending; an idle writer is flushed by its owner's timer (the recorder daemon runs one).
Data handed to the OS survives the death of the process (SIGKILL, a crash): such a crash loses
at most the records of the last ``flush_interval_s``. :meth:`RunWriter.sync` (``os.fsync``)
makes them survive a crash of the machine too; the recorder calls it every second from a
worker thread, and :meth:`RunWriter.close` always does.

Run documents (bluesky's event model: ``start``, ``descriptor``, ``event``, ``stop``) travel on
``kb/<instrument>/sequencer/run`` as a MessagePack map ``{"name": NAME, "doc": {...}}``
(:func:`encode_document`); the ``start`` document carries ``config_hash``, the SHA-256 of the
configuration (:func:`config_hash`, the one the sequencer's plans use).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import msgspec

MAGIC = b"\x89KBRUN\r\n"
FORMAT_VERSION = 1
SUFFIX = ".kbrun"
MAX_RECORD_BYTES = 256 * 1024 * 1024
"""Largest body a reader accepts: a larger length prefix is taken as corruption."""
RUN_DOCUMENT_LEAF = ("sequencer", "run")
"""Run documents are published on ``kb/<instrument>/sequencer/run``."""

_PREFIX = struct.Struct("<II")          # body length, CRC-32 of the body
_HEADER = struct.Struct("<8sIII")       # magic, version, metadata length, metadata CRC
_encoder = msgspec.msgpack.Encoder()
_body_decoder = msgspec.msgpack.Decoder(tuple[float, str, bytes])


class RunFileError(ValueError):
    """Not a run file, an unsupported format version, or a damaged header."""


class Record(NamedTuple):
    t_s: float
    """Time of receipt (UTC, s since the epoch)."""
    topic: str
    payload: bytes
    """The message bytes exactly as they came off the bus."""
    offset: int
    """Offset of the record's prefix in the file."""


class Tail(NamedTuple):
    """The part of a file the reader did not accept (a torn or damaged last record)."""

    offset: int
    """Where the rejected bytes start (the end of the last good record)."""
    size: int
    """How many bytes were ignored (from ``offset`` to the end of the file)."""
    reason: str


def encode_record(topic: str, payload: bytes, t_s: float) -> bytes:
    """One record, prefix included."""
    body = _encoder.encode((float(t_s), topic, bytes(payload)))
    return _PREFIX.pack(len(body), zlib.crc32(body)) + body


class RunWriter:
    """Writes one run file; a context manager (closing flushes and fsyncs).

    ``path`` must not exist (``FileExistsError``): a run file is never overwritten or reopened.
    ``metadata`` (MessagePack-able) goes into the header. The header is on disk (fsynced) when
    the constructor returns.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
                 flush_interval_s: float = 0.2, max_buffer_bytes: int = 1 << 20) -> None:
        if not (0.0 < flush_interval_s <= 1.0):
            raise ValueError(f"flush_interval_s must be within (0, 1] s, got {flush_interval_s}")
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self.max_buffer_bytes = max_buffer_bytes
        self.metadata = {"format_version": FORMAT_VERSION, "created_utc_s": time.time(),
                         **dict(metadata or {})}
        meta = _encoder.encode(self.metadata)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o644)
        self._buf = bytearray(_HEADER.pack(MAGIC, FORMAT_VERSION, len(meta), zlib.crc32(meta)) + meta)
        self.records = 0
        """Records appended (flushed or not)."""
        self.bytes_written = 0
        """Bytes handed to the operating system, header included."""
        self.last_flush_mono_s = time.monotonic()
        self.closed = False
        try:
            self.flush()
            self.sync()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    @property
    def pending_bytes(self) -> int:
        """Bytes appended but not yet handed to the operating system."""
        return len(self._buf)

    def append(self, topic: str, payload: bytes, t_s: float | None = None) -> None:
        """Add one message (``t_s``: time of receipt, UTC; default now); flushes when due."""
        if self.closed:
            raise ValueError(f"run file {self.path} is closed")
        self._buf += encode_record(topic, payload, time.time() if t_s is None else t_s)
        self.records += 1
        if (len(self._buf) >= self.max_buffer_bytes
                or time.monotonic() - self.last_flush_mono_s >= self.flush_interval_s):
            self.flush()

    def flush(self) -> None:
        """Hand every pending byte to the operating system (survives a SIGKILL from now on)."""
        view = memoryview(self._buf)
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        finally:
            view.release()
            del self._buf[:done]
            self.bytes_written += done
        self.last_flush_mono_s = time.monotonic()

    def sync(self) -> None:
        """Flush, then ``os.fsync``: on the disk (survives a crash of the machine)."""
        self.flush()
        os.fsync(self._fd)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.sync()
        finally:
            self.closed = True
            os.close(self._fd)


class RunReader:
    """Iterates over the records of a run file; never raises for a torn or damaged tail.

    The header is read at once (``RunFileError`` if it is not a run file). After the iteration
    :attr:`tail` is None for a clean file, else a :class:`Tail` saying which bytes were ignored.
    Reading stops at the first bad record: nothing after a damaged record is trusted.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tail: Tail | None = None
        self.records = 0
        self.end = 0
        """Offset after the last good record."""
        with open(self.path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < 8 or head[:8] != MAGIC:
                raise RunFileError(f"{self.path} is not a kibble run file (bad magic)")
            if len(head) < _HEADER.size:
                raise RunFileError(f"{self.path}: truncated header")
            _, self.version, n, crc = _HEADER.unpack(head)
            if self.version != FORMAT_VERSION:
                raise RunFileError(f"{self.path}: format version {self.version}, this software "
                                   f"reads version {FORMAT_VERSION}")
            meta = f.read(n)
            if len(meta) < n or zlib.crc32(meta) != crc:
                raise RunFileError(f"{self.path}: truncated or damaged header")
            try:
                self.metadata: dict[str, Any] = msgspec.msgpack.decode(meta)
            except msgspec.DecodeError as exc:
                raise RunFileError(f"{self.path}: damaged header: {exc}") from None
        self.data_start = _HEADER.size + n

    def __iter__(self) -> Iterator[Record]:
        self.tail, self.records = None, 0
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(self.data_start)
            offset = self.data_start
            while offset < size:
                reason = None
                prefix = f.read(_PREFIX.size)
                if len(prefix) < _PREFIX.size:
                    reason = "incomplete length prefix"
                else:
                    n, crc = _PREFIX.unpack(prefix)
                    if n == 0 or n > MAX_RECORD_BYTES:
                        reason = f"invalid record length {n}"
                    else:
                        body = f.read(n)
                        if len(body) < n:
                            reason = f"incomplete record ({len(body)} of {n} bytes)"
                        elif zlib.crc32(body) != crc:
                            reason = "CRC mismatch"
                        else:
                            try:
                                t_s, topic, payload = _body_decoder.decode(body)
                            except msgspec.DecodeError as exc:
                                reason = f"undecodable record: {exc}"
                if reason is not None:
                    self.tail = Tail(offset, size - offset, reason)
                    break
                self.records += 1
                yield Record(t_s, topic, payload, offset)
                offset += _PREFIX.size + n
            self.end = offset if self.tail is None else self.tail.offset


def read_run(path: str | os.PathLike) -> RunReader:
    """A :class:`RunReader` (iterate it for the records; then look at ``.tail``)."""
    return RunReader(path)


# ------------------------------------------------------------------------------ run documents


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a configuration: JSON with sorted keys (the same configuration, the same hash)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def run_document_topic(instrument: str) -> str:
    return f"kb/{instrument}/{RUN_DOCUMENT_LEAF[0]}/{RUN_DOCUMENT_LEAF[1]}"


def encode_document(name: str, doc: Mapping[str, Any]) -> bytes:
    """A run document as it travels on the bus: MessagePack ``{"name": name, "doc": doc}``."""
    if name not in ("start", "descriptor", "event", "stop"):
        raise ValueError(f"unknown run document {name!r} (start, descriptor, event, stop)")
    return _encoder.encode({"name": name, "doc": dict(doc)})


def decode_document(payload: bytes) -> tuple[str, dict[str, Any]]:
    """``(name, doc)`` of an :func:`encode_document` payload (also accepts ``[name, doc]``);
    ``ValueError`` for anything else."""
    try:
        data = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a run document: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("name"), str) and isinstance(data.get("doc"), dict):
        return data["name"], data["doc"]
    if isinstance(data, list) and len(data) == 2 and isinstance(data[0], str) and isinstance(data[1], dict):
        return data[0], data[1]
    raise ValueError("not a run document (want {'name': ..., 'doc': {...}})")


def start_document(config: Mapping[str, Any], plan_name: str = "", **metadata: Any) -> dict[str, Any]:
    """A bluesky-style ``start`` document: uid, time, plan name, the configuration and its hash."""
    return {"uid": str(uuid.uuid4()), "time": time.time(), "plan_name": plan_name,
            "config_hash": config_hash(config), "configuration": dict(config), **metadata}


def write_start_document(writer: RunWriter, instrument: str, config: Mapping[str, Any],
                         plan_name: str = "", t_s: float | None = None, **metadata: Any) -> dict[str, Any]:
    """Append a ``start`` document (as if received on the run-document topic); returns it."""
    doc = start_document(config, plan_name, **metadata)
    writer.append(run_document_topic(instrument), encode_document("start", doc), t_s)
    return doc
