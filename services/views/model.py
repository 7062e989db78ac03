"""The bus as an operator's views see it: one follower shared by the dashboard and the EPICS
server.

:class:`BusView` follows an instrument's tree with :func:`kibble.services.runtime.client.follow` (across
lost brokers; the retained statuses and parameters arrive again on every connection) and keeps,
in memory, what a view shows: every daemon's last status and parameter list, the newest frame
of every ``<service>/frame`` topic, the events (newest last, bounded), and the traces of
:data:`TRACES` averaged into display bins (or, with ``traces=False``, for a view that shows
only the newest frames, no traces, and only the newest frame of each topic decoded per read).
It never waits for a view: the views read this state on their own clocks (the dashboard's
pushes, the EPICS server's updates), so a slow or stopped browser or Channel Access client
cannot hold up the reading of the bus. Requests (``param.set``, commands) go out on a
connection of their own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import aiomqtt
import msgspec
import numpy as np

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.instruments import DAQ_FIELDS
from kibble.bus_schema.messages import Event, ParamList, Status
from kibble.bus_schema.topics import Topics, message_type_for
from kibble.bus_schema.units import unit_of
from kibble.bus_schema.transport import connect_error_text, deliver_directly, make_client
from kibble.services.runtime.client import BusClient, BusError, follow, new_client_id

STALE_AFTER_S = 3.0
"""A daemon whose last status (heartbeat) is older than this is shown stale, as ``kibble
status`` marks it (heartbeats are 1 s by default: two were missed)."""

BIN_HZ = 20.0
"""Display bins per second of the traces (each the mean of the frames whose UTC stamp falls in
it)."""
HISTORY_S = 3600.0
"""How far back the traces go (the dashboard's longest window)."""
READ_EVERY_S = 0.1
"""How often the frames are read off the socket by default (all that arrived since the last
read, in one wake-up; a wake-up per frame would cost several times the frame's own handling):
two display bins (:data:`BIN_HZ`; a bin is placed by its frames' UTC stamps, not by their
arrival), under half the dashboard's push period. At 1 kHz a read takes about 200 frames
(40 kB), well within a socket's receive buffer (Linux's default 128 kB, grown as needed)."""
BAND_HZ = 0.1
"""The band of the band-limited coil z (the null figure's bandwidth, docs/architecture.md
section 7)."""

TRACES: dict[str, tuple[str, ...]] = {
    "daq": ("coil_z_m", "main_coil_current_a", "coil_voltage_v", "coil_x_m", "coil_y_m",
            "coil_theta_x_rad", "coil_theta_y_rad", "coil_theta_z_rad", "counter_mass_current_a",
            "temperature_k", "pressure_pa"),
    "servo": ("error_m", "force_n", "z_ref_m"),
}
"""The traces, by the service whose frame carries them (fields of the DAQ frame, keys of the
servo's loop frame); their units come from :mod:`kibble.bus_schema.units`."""
BAND_LIMITED = ("coil_z_m", "coil_z_0p1hz_m")
"""The DAQ field low-passed at :data:`BAND_HZ`, and the name of the result."""


def band_step(state: list[float], x: float, dt_s: float, f_hz: float = BAND_HZ) -> float:
    """One step of two cascaded first-order low-passes at ``f_hz`` (``state``: their two
    outputs, None-free, updated in place), over ``dt_s`` of the hardware's time (the frames'
    ``sim_time_s``, so it is the same in lockstep and in real time); returns the output."""
    a = 1.0 - math.exp(-2.0 * math.pi * f_hz * dt_s) if dt_s > 0 else 0.0
    state[0] += a * (x - state[0])
    state[1] += a * (state[0] - state[1])
    return state[1]


class Trace:
    """Ring buffers of display bins for a set of columns sharing one time axis (UTC s).

    A bin is the mean of the samples added while their time fell in it; a bin is closed (and
    shown) when the first sample of a later bin arrives. The open bin's samples are kept as
    they came and averaged once, when it closes (a sample costs a list append).
    """

    def __init__(self, columns: tuple[str, ...], bin_hz: float = BIN_HZ,
                 history_s: float = HISTORY_S) -> None:
        self.columns = columns
        self.bin_hz = bin_hz
        self.capacity = int(history_s * bin_hz)
        self.index = np.full(self.capacity, -1, dtype=np.int64)
        """Absolute bin number (``floor(t_utc_s * bin_hz)``) of each slot, -1 where empty."""
        self.data = np.full((len(columns), self.capacity), np.nan)
        self.closed = -1
        """The newest closed bin's absolute number."""
        self._open = -1
        self._samples: list[Sequence[float]] = []

    def add(self, t_utc_s: float, values: Sequence[float]) -> None:
        """One sample of every column at ``t_utc_s``."""
        b = int(t_utc_s * self.bin_hz)
        if b != self._open:
            if b < self._open:
                return  # older than the open bin: the bin is closed for display
            self._close()
            self._open = b
        self._samples.append(values)

    def _close(self) -> None:
        if self._samples:
            slot = self._open % self.capacity
            self.index[slot] = self._open
            self.data[:, slot] = np.mean(self._samples, axis=0)
            self.closed = self._open
            self._samples = []

    def series(self, after: int, k: int) -> tuple[int, list[float], dict[str, list[float | None]]]:
        """The closed bins newer than bin ``after`` averaged in groups of ``k`` bins (group g
        holds bins ``g k .. g k + k - 1``; only whole groups, so the next call continues
        where this one stopped): ``(last bin included, group mid-times in UTC s, {column:
        means, None where no bin of the group had data})``."""
        last = (self.closed + 1) // k * k - 1  # the last bin of the newest complete group
        first = max(after + 1, last - self.capacity + 1)
        first = -(-first // k) * k
        if last < first:
            return after, [], {c: [] for c in self.columns}
        absolute = np.arange(first, last + 1)
        slots = absolute % self.capacity
        valid = self.index[slots] == absolute
        vals = np.where(valid, self.data[:, slots], np.nan).reshape(len(self.columns), -1, k)
        count = valid.reshape(-1, k).sum(axis=1)
        with np.errstate(invalid="ignore"):
            means = np.nansum(vals, axis=2) / np.where(count, count, 1)
        keep = count > 0
        t = ((absolute.reshape(-1, k)[:, 0] + k / 2) / self.bin_hz)[keep]
        cols = {c: [float(v) if math.isfinite(v) else None for v in means[i][keep]]
                for i, c in enumerate(self.columns)}
        return last, t.tolist(), cols


@dataclass
class Seen:
    """A message as the view last received it: the decoded message and the local receipt time."""

    msg: Any
    t_recv_s: float = field(default_factory=time.time)


class BusView:
    """Follows ``kb/<instrument>/...`` (see the module docstring). Use as
    ``async with BusView(url, instrument) as view``.

    ``traces``: build the traces from every frame (the dashboard); False decodes, of each
    read of the frames, only the newest frame of each topic, and builds no traces (the EPICS
    server, which shows the newest values). ``read_every_s``: how often the frames are read
    (:data:`READ_EVERY_S`).
    """

    def __init__(self, url: str, instrument: str, bin_hz: float = BIN_HZ, history_s: float = HISTORY_S,
                 max_events: int = 500, client_id: str | None = None, traces: bool = True,
                 read_every_s: float = READ_EVERY_S) -> None:
        self.url = url
        self.topics = Topics(instrument)
        self.instrument = instrument
        self.client_id = client_id
        self.read_every_s = read_every_s
        self.statuses: dict[str, Seen] = {}
        self.params: dict[str, Seen] = {}
        self.frames: dict[str, Seen] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self.events_seen = 0
        """Events received since the start (the index of the next one)."""
        self.traces = {src: Trace(cols + ((BAND_LIMITED[1],) if src == "daq" else ()), bin_hz, history_s)
                       for src, cols in TRACES.items()} if traces else {}
        self.counters: collections.Counter[str] = collections.Counter()
        """``messages`` received and decoded (or not: ``undecodable``), of them ``frames``,
        ``superseded`` frames (received, not decoded: a newer one of the same topic came in
        the same read; ``traces=False`` only), ``lost`` broker."""
        self.connection = "connecting"
        self.params_version = 0
        """Incremented at every parameter list received."""
        self._band: list[float] | None = None
        self._band_t = 0.0
        self._tasks: list[asyncio.Task] = []
        self._requests: BusClient | None = None
        self._exits = contextlib.AsyncExitStack()

    # ---------------------------------------------------------------- life

    async def __aenter__(self) -> "BusView":
        self._requests = await self._exits.enter_async_context(
            BusClient(self.url, self.instrument, client_id=self.client_id))
        leaves: dict[str, Callable[[str, str, Any], None]] = {
            "status": self._on_status, "params": self._on_params, "event": self._on_event}
        self._tasks = [asyncio.create_task(self._follow(self.topics.all_of(leaf), handler))
                       for leaf, handler in leaves.items()]
        self._tasks.append(asyncio.create_task(self._follow_frames(self.topics.all_of("frame"))))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._exits.aclose()

    def _lost(self, text: str) -> None:
        self.connection = f"lost: {text}"
        self.counters["lost"] += 1

    def _deliver(self, topic: str, payload: bytes, handler: Callable[[str, str, Any], None]) -> None:
        self.connection = "connected"
        self.counters["messages"] += 1
        msg_type = message_type_for(topic)
        try:
            msg = decode(payload, msg_type) if msg_type is not None else None
        except DecodeError:
            self.counters["undecodable"] += 1
            return
        if msg is not None:
            handler(topic.split("/")[2], topic, msg)

    async def _follow(self, pattern: str, handler: Callable[[str, str, Any], None]) -> None:
        async for topic, payload in follow(self.url, self.instrument, pattern, on_lost=self._lost):
            self._deliver(topic, payload, handler)

    async def _follow_frames(self, pattern: str, retry_s: float = 0.5) -> None:
        """The frames (QoS 0, up to two per hardware frame) on the transport's direct receive
        path (:func:`~kibble.bus_schema.transport.deliver_directly`: no queue or task per
        message), read every ``read_every_s``, across lost connections."""
        up = True
        while True:
            client = make_client(self.url, new_client_id("view"))
            deliver_directly(client, _EveryFrame(self) if self.traces else _NewestFrames(self),
                             every_s=self.read_every_s)
            try:
                async with client:
                    await client.subscribe(pattern, qos=0)
                    up = True
                    async for _ in client.messages:  # stays empty; raises when the connection drops
                        pass
            except aiomqtt.MqttError as exc:
                if up:
                    self._lost(connect_error_text(self.url, exc))
                up = False
            await asyncio.sleep(retry_s)

    # ---------------------------------------------------------------- what arrives

    def _on_status(self, service: str, topic: str, msg: Status) -> None:
        self.statuses[service] = Seen(msg)

    def _on_params(self, service: str, topic: str, msg: ParamList) -> None:
        self.params[service] = Seen(msg)
        self.params_version += 1

    def _on_event(self, service: str, topic: str, msg: Event) -> None:
        self.events.append({"i": self.events_seen, "t_utc_s": msg.t_utc_s, "service": msg.service,
                            "kind": msg.kind, "severity": msg.severity, "text": msg.text,
                            "data": finite_only(msgspec.to_builtins(msg.data))})
        self.events_seen += 1

    def _trace(self, service: str, msg: Any) -> None:
        """A frame into the traces (and the count)."""
        self.counters["frames"] += 1
        trace = self.traces.get(service)
        if trace is not None:
            if service == "daq":
                values = [*_DAQ_TRACES(msg), self._band_limited(msg.coil_z_m, msg.sim_time_s)]
            else:
                got = msg.values
                values = [got.get(c, math.nan) for c in TRACES[service]]
            trace.add(msg.t_utc_s, values)

    def _band_limited(self, z: float, t_s: float) -> float:
        if self._band is None or t_s < self._band_t:  # first frame, or a new hardware session
            self._band = [z, z]
        out = band_step(self._band, z, t_s - self._band_t)
        self._band_t = t_s
        return out

    # ---------------------------------------------------------------- what a view asks

    def stale(self, service: str, now_s: float | None = None) -> bool:
        """True if ``service``'s last status is older than :data:`STALE_AFTER_S` while it said
        it was online (its heartbeats stopped without a will)."""
        seen = self.statuses.get(service)
        if seen is None:
            return False
        now_s = time.time() if now_s is None else now_s
        return seen.msg.online and not now_s - seen.msg.t_utc_s <= STALE_AFTER_S

    def param_specs(self, service: str) -> list[Any]:
        """The parameters ``service`` declares (its retained ``params``), [] before it did."""
        seen = self.params.get(service)
        return list(seen.msg.params) if seen is not None else []

    async def request(self, service: str, command: str, args: dict[str, Any] | None = None,
                      timeout_s: float = 5.0) -> dict[str, Any]:
        """Send a command; ``{"ok", "result", "error"}`` of its reply, or of the failure to get
        one (no reply in time, a lost broker), in words."""
        assert self._requests is not None
        try:
            reply = await self._requests.request(service, command, args or {}, timeout_s=timeout_s)
        except (BusError, ValueError) as exc:
            return {"ok": False, "result": {}, "error": str(exc)}
        return {"ok": reply.ok, "result": msgspec.to_builtins(reply.result), "error": reply.error}


_DAQ_TRACES = operator.attrgetter(*TRACES["daq"])


class _EveryFrame:
    """The frames' :class:`~kibble.bus_schema.transport.Receiver` for traces: every frame into
    the traces, and at the end of each read the newest of each service into ``frames``."""

    __slots__ = ("view", "newest")

    def __init__(self, view: BusView) -> None:
        self.view = view
        self.newest: dict[str, Any] = {}

    def message(self, topic: str, payload: bytes) -> None:
        self.view._deliver(topic, payload, self._frame)

    def _frame(self, service: str, topic: str, msg: Any) -> None:
        self.view._trace(service, msg)
        self.newest[service] = msg

    def batch_begin(self) -> None:
        pass

    def batch_end(self) -> None:
        frames = self.view.frames
        for service, msg in self.newest.items():
            frames[service] = Seen(msg)
        self.newest.clear()

    def batch_flushed(self) -> None:
        pass


class _NewestFrames(_EveryFrame):
    """The frames' receiver without traces: of each read, only the newest frame of each topic
    is decoded."""

    __slots__ = ("payloads",)

    def __init__(self, view: BusView) -> None:
        super().__init__(view)
        self.payloads: dict[str, bytes] = {}

    def message(self, topic: str, payload: bytes) -> None:
        payloads = self.payloads
        if topic in payloads:
            self.view.counters["superseded"] += 1
        payloads[topic] = payload

    def _frame(self, service: str, topic: str, msg: Any) -> None:
        self.view.counters["frames"] += 1
        self.newest[service] = msg

    def batch_end(self) -> None:
        for topic, payload in self.payloads.items():
            self.view._deliver(topic, payload, self._frame)
        self.payloads.clear()
        super().batch_end()


def finite_only(value: Any) -> Any:
    """``value`` (builtins) with every non-finite float replaced by None: an event's ``data`` is
    free-form, and JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_only(v) for v in value]
    return value


def unmeasured(instrument: str) -> list[str]:
    """The trace columns ``instrument`` does not measure (its DAQ frame leaves them at their
    defaults: :data:`kibble.bus_schema.instruments.DAQ_FIELDS`); [] for an instrument id that
    is not one of the models (every column shown)."""
    measured = DAQ_FIELDS.get(instrument)
    if measured is None:
        return []
    out = [c for c in TRACES["daq"] if c not in measured]
    if BAND_LIMITED[0] in out:
        out.append(BAND_LIMITED[1])
    return out


def trace_units() -> dict[str, str]:
    """The unit of every trace column (:mod:`kibble.bus_schema.units`)."""
    out = {c: unit_of(c) or "" for cols in TRACES.values() for c in cols}
    out[BAND_LIMITED[1]] = out[BAND_LIMITED[0]]
    return out
