"""``recorder``: every message of the instrument, raw, into an append-only run file.

Subscribes to ``kb/<instrument>/#`` (QoS 1, so status, params, events, commands and the run
documents on ``sequencer/run`` arrive reliably; frames come at the QoS they were published
with) and, while a run is open, appends each message's bytes exactly as received, with the time
of receipt, to ``<data_dir>/<run_id>.kbrun`` (format: :mod:`kibble.services.data.recordfile`).

The raw hardware topics ``kb/<instrument>/hw/...`` (sensor frames and DAC codes at the frame
rate) are left out unless the setting ``record_hw = true``: the DAQ frames carry the same
information in SI units. MQTT has no "all but" pattern, so the broker still sends them here;
they are dropped at once and counted (``hw_skipped``).

Commands (besides ``param.*``):

- ``start run_id=ID [config_hash=HEX]``: open a new run file (``ID``: letters, digits, ``_``,
  ``-``, ``.``) and write into it first the latest ``params`` and ``status`` message of every
  service (with their time of receipt; only messages that decode as such, from the service
  their topic names, so garbage on ``servo/params`` does not replace the servo's parameters),
  so the run records the set-up it started from; refused while a run is open or when the file
  already exists.
- ``stop``: flush, fsync and close the run file; replies with the counts.

A lost broker connection during a run is recorded as a gap: on reconnecting, the recorder
publishes an event of kind ``gap`` (``data``: ``run_id``, ``from_utc_s``, the receipt of the
last message before the loss, ``lost_utc_s``, when the loss was noticed, ``to_utc_s``, when it
was subscribed again, or the receipt of the first message if one came in before that), which
comes back to it from the broker and into the file like any message; nothing of the bus between
``from_utc_s`` and ``to_utc_s`` is in the file.
:func:`recorded_gaps` lists them.

Flush policy: records reach the operating system at least every ``flush_interval_s`` (0.2 s;
by the writer itself while messages arrive, by a timer of this daemon when idle), so a killed
recorder (SIGKILL, a crash) loses at most that much; they are fsynced (on a worker thread, the
event loop never waits for the disk) every ``fsync_interval_s`` (1 s) and at ``stop``, which
bounds what a crash of the machine loses. The status detail says which run is open, records
and bytes written, and the age of the last flush.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import msgspec

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import Command, Event, ParamList, Status
from kibble.bus_schema.topics import Topics
from kibble.services.data.recordfile import SUFFIX, RunWriter, read_run
from kibble.services.runtime.service import Service, command

_RUN_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")


class RecorderSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where runs go and what is recorded (configuration, not live-tunable)."""

    data_dir: str = ""
    """Directory of the run files; default ``<state_dir>/<instrument>/runs``."""
    record_hw: bool = False
    """Also record the raw ``hw/`` topics (frame-rate DAC codes and sensor counts)."""
    flush_interval_s: float = 0.2
    """Records are handed to the OS at least this often (what a SIGKILL can lose), <= 1 s."""
    fsync_interval_s: float = 1.0
    """Records are fsynced this often (what a machine crash can lose); 0: only at stop."""


class Recorder(Service):
    name = "recorder"

    def setup(self) -> None:
        try:
            s = self.settings = msgspec.convert(self.config.settings, RecorderSettings)
        except msgspec.ValidationError as exc:
            raise ValueError(f"recorder settings: {exc}") from None
        if not (0.0 < s.flush_interval_s <= 1.0):
            raise ValueError(f"recorder settings: flush_interval_s must be within (0, 1] s, "
                             f"got {s.flush_interval_s}")
        if s.fsync_interval_s < 0:
            raise ValueError(f"recorder settings: fsync_interval_s must be >= 0, got {s.fsync_interval_s}")
        self.data_dir = (Path(s.data_dir) if s.data_dir
                         else self.config.state_dir / self.config.instrument / "runs")
        self.writer: RunWriter | None = None
        self.run_id = ""
        self.hw_prefix = f"{self.topics.prefix}/hw/"
        self.counters.update({"hw_skipped": 0, "write_errors": 0, "runs": 0})
        self._last_fsync_mono_s = time.monotonic()
        self._fsync: asyncio.Task | None = None
        self.latest: dict[str, tuple[float, bytes]] = {}
        """The last ``params`` and ``status`` message of every service (retained ones included):
        a new run starts with them, so it says how the instrument was set up."""
        self._last_rx_utc_s = time.time()
        self._gap: list[float] | None = None
        """From a lost connection during a run to the gap's event: the receipt of the last
        message, when the loss was noticed, then the receipt of the first message after it if
        one comes before the subscriptions are all in place (a retained one)."""
        self.subscribe_raw(f"{self.topics.prefix}/#", self.on_message)

    # ------------------------------------------------------------------ recording

    def on_message(self, topic: str, payload: bytes) -> None:
        t_s = self._last_rx_utc_s = time.time()
        if self._gap is not None and len(self._gap) == 2:
            self._gap.append(t_s)
        if topic.endswith(("/params", "/status")) and self._describes_a_service(topic, payload):
            self.latest[topic] = (t_s, payload)
        writer = self.writer
        if writer is None:
            return
        if not self.settings.record_hw and topic.startswith(self.hw_prefix):
            self.counters["hw_skipped"] += 1
            return
        self.counters["frames_in"] += 1
        try:
            writer.append(topic, payload, t_s)
        except OSError as exc:
            self._write_failed(exc)

    def _describes_a_service(self, topic: str, payload: bytes) -> bool:
        """Whether a ``<service>/params`` or ``<service>/status`` message is one a run may
        start with: it decodes, and names the service of its topic."""
        service, _, leaf = topic[len(self.topics.prefix) + 1:].partition("/")
        try:
            named = decode(payload, ParamList).service if leaf == "params" else decode(payload, Status).service
        except DecodeError:
            return False
        return named == service

    def _write_failed(self, exc: OSError) -> None:
        """A full or failing disk: close what can be closed and say so loudly."""
        self.counters["write_errors"] += 1
        writer, run_id = self.writer, self.run_id
        self.writer, self.run_id = None, ""
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
        self.event("write_failed", f"run {run_id}: {exc}; recording stopped", severity="alarm",
                   data={"run_id": run_id, "path": str(writer.path) if writer else ""},
                   rate_limited=False)
        self.set_state("idle")

    def flush(self) -> None:
        if self.writer is not None:
            try:
                self.writer.flush()
            except OSError as exc:
                self._write_failed(exc)

    async def _sync(self, writer: RunWriter) -> None:
        """fsync on a worker thread, through a duplicate descriptor (the run may close meanwhile)."""
        fd = os.dup(writer.fileno())
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            if writer is self.writer:
                self._write_failed(exc)
        finally:
            os.close(fd)

    async def background(self) -> None:
        """The flush timer: every ``flush_interval_s`` (and an fsync every ``fsync_interval_s``)."""
        s = self.settings
        while True:
            await asyncio.sleep(s.flush_interval_s / 2)
            writer = self.writer
            if writer is None:
                continue
            if writer.pending_bytes and time.monotonic() - writer.last_flush_mono_s >= s.flush_interval_s / 2:
                self.flush()
            if (s.fsync_interval_s > 0 and self.writer is writer
                    and time.monotonic() - self._last_fsync_mono_s >= s.fsync_interval_s
                    and (self._fsync is None or self._fsync.done())):
                self._last_fsync_mono_s = time.monotonic()
                self._fsync = asyncio.create_task(self._sync(writer))

    async def on_disconnect(self) -> None:
        """Called after every failed attempt too: the gap starts at the first."""
        self.flush()
        if self.writer is not None and self._gap is None:
            self._gap = [self._last_rx_utc_s, time.time()]

    async def on_connected(self) -> None:
        """Subscribed again: the gap's event (it ends now, or at the first message received
        since the connection came back)."""
        gap, self._gap = self._gap, None
        if gap is None or self.writer is None:
            return
        from_s, lost_s, to_s = gap if len(gap) == 3 else (*gap, time.time())
        self.event("gap", f"run {self.run_id}: nothing recorded for {to_s - from_s:.1f} s (the "
                   "broker connection was lost)", severity="warning",
                   data={"run_id": self.run_id, "from_utc_s": from_s, "lost_utc_s": lost_s,
                         "to_utc_s": to_s}, rate_limited=False)

    async def on_stop(self) -> None:
        if self.writer is not None:
            self._close_run("recorder stopped")

    def _close_run(self, why: str) -> dict[str, Any]:
        writer, run_id = self.writer, self.run_id
        assert writer is not None
        self.writer, self.run_id = None, ""
        try:
            writer.close()
        except OSError as exc:
            self.counters["write_errors"] += 1
            self.event("write_failed", f"run {run_id}: closing: {exc}", severity="alarm",
                       data={"run_id": run_id}, rate_limited=False)
        result = {"run_id": run_id, "path": str(writer.path), "records": writer.records,
                  "bytes": writer.bytes_written}
        self.event("run_closed", f"run {run_id}: {writer.records} records, "
                   f"{writer.bytes_written} bytes ({why})", data=result, rate_limited=False)
        self.set_state("idle")
        return result

    # ------------------------------------------------------------------ commands

    @command("start")
    def cmd_start(self, cmd: Command) -> dict[str, Any]:
        """Open ``<data_dir>/<run_id>.kbrun`` and record into it."""
        run_id = str(cmd.args.get("run_id", ""))
        if not _RUN_ID.match(run_id):
            raise ValueError(f"start needs run_id=ID (1-128 letters, digits, '_', '-', '.'), got {run_id!r}")
        if self.writer is not None:
            raise ValueError(f"run {self.run_id!r} is being recorded; stop it first")
        config_hash = str(cmd.args.get("config_hash", ""))
        path = self.data_dir / f"{run_id}{SUFFIX}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        metadata = {"run_id": run_id, "instrument": self.config.instrument, "config_hash": config_hash,
                    "recorder_session": self.session, "client_id": cmd.client_id,
                    "record_hw": self.settings.record_hw}
        try:
            self.writer = RunWriter(path, metadata, flush_interval_s=self.settings.flush_interval_s)
        except FileExistsError:
            raise ValueError(f"run {run_id!r} exists already ({path}); pick another run id") from None
        except OSError as exc:
            raise ValueError(f"cannot create {path}: {exc}") from None
        self.run_id = run_id
        try:
            for topic, (t_s, payload) in sorted(self.latest.items()):
                self.writer.append(topic, payload, t_s)
        except OSError as exc:
            self._write_failed(exc)
            raise ValueError(f"cannot write to {path}: {exc}") from None
        self.counters["runs"] += 1
        self._last_fsync_mono_s = time.monotonic()
        self.event("run_opened", f"run {run_id} -> {path}", data={"run_id": run_id, "path": str(path),
                   "config_hash": config_hash}, rate_limited=False)
        self.set_state("running")
        return {"run_id": run_id, "path": str(path)}

    @command("stop")
    def cmd_stop(self, cmd: Command) -> dict[str, Any]:
        """Flush, fsync and close the run file."""
        if self.writer is None:
            raise ValueError("no run is being recorded")
        return self._close_run(f"stop by {cmd.client_id or '?'}")

    def status_detail(self) -> dict[str, Any]:
        w = self.writer
        return {"run_id": self.run_id, "data_dir": str(self.data_dir),
                "records": w.records if w else 0, "bytes": w.bytes_written if w else 0,
                "pending_bytes": w.pending_bytes if w else 0,
                "last_flush_age_s": time.monotonic() - w.last_flush_mono_s if w else 0.0,
                "record_hw": self.settings.record_hw}


def recorded_gaps(path: str | os.PathLike) -> list[tuple[float, float]]:
    """The gaps a run file records, ``(from_utc_s, to_utc_s)`` each, in order (see the module
    docstring)."""
    reader = read_run(path)
    topic = Topics(reader.metadata["instrument"]).event(Recorder.name)
    gaps = []
    for record in reader:
        if record.topic != topic:
            continue
        try:
            event = decode(record.payload, Event)
        except DecodeError:
            continue
        if event.kind == "gap":
            gaps.append((float(event.data["from_utc_s"]), float(event.data["to_utc_s"])))
    return gaps
