"""``kibble epics``: the bus as EPICS Channel Access process variables (a caproto server), for
the tools a lab already runs (Phoebus/CS-Studio screens, the Archiver Appliance, pyDM,
bluesky/ophyd).

PV names are ``<prefix><instrument>:<service>:<name>`` (prefix ``KB:`` by default):

- every parameter a daemon declares on its retained ``params`` topic, under its own name, with
  its unit (EGU), range (control and display limits) and doc (``<pv>.DESC``, the first 40
  characters; ``<pv>.EGU`` too): a put goes through ``param.set`` and a refused value is a put
  error carrying the daemon's reason; the value follows the retained parameters (and so every
  change, from anyone);
- each daemon's status: ``STATE`` (an enum of the daemon states; alarm severity MAJOR when
  tripped, MINOR when its heartbeats stopped (stale), INVALID when offline), ``ONLINE``,
  ``SESSION``, ``HEARTBEAT_AGE`` (s), ``CPU_US`` and ``FRAME_AGE_MS`` (p99 of the last
  interval), ``TRIP_REASON``, and every counter in upper case (``FRAMES_IN``, ``REJECTED``, ...);
- the chosen frame fields as ``<prefix><instrument>:<service>:frame:<field>``
  (``daq:frame:coil_z_m``, ``servo:frame:error_m``, ...; a field may share a parameter's name,
  as the servo's ``z_ref_m`` does) at ``rate_hz``, each stamped with its frame's UTC time;
- commands: ``servo:MODE`` (an enum: a put asks the servo for that mode; it reads back the
  servo's mode) and, for every actuator daemon, ``ARM``, ``DISARM`` and ``RESET`` (a put of 1
  sends the command); a refusal is a put error with the reason.

The server's PVs are written by one updater task from the :class:`~kibble.services.views.model.
BusView`'s state, never from the bus reader, so a Channel Access client that stops reading
cannot hold up the bus (caproto drops a circuit's backlog beyond its limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any, Awaitable, Callable, get_args

from caproto import AlarmSeverity, AlarmStatus, ChannelDouble, ChannelEnum, ChannelInteger, ChannelString
from caproto.asyncio.server import Context

from kibble.bus_schema.messages import State
from kibble.bus_schema.units import unit_of
from kibble.services.views import DEFAULT_FIELDS, DEFAULT_RATE_HZ
from kibble.services.views.model import BusView, unmeasured

STATES = get_args(State)
MODES = ("idle", "force", "velocity", "erase", "gradient", "hold")
"""The servo's modes as ``servo:MODE`` offers them (a mode the instrument's servo does not
have is refused by it, as a put error)."""
ACTUATOR_COMMANDS = ("ARM", "DISARM", "RESET")
DESC_CHARS = 40
"""An EPICS record's DESC holds 40 characters."""
STATUS_EVERY_S = 0.5
"""How often the status PVs are brought up to date (s)."""

Put = Callable[[Any], Awaitable[Any]]


class _Requesting:
    """A channel whose put is a request on the bus: ``on_put(value)`` returns the value to
    hold or raises with the reason (a put error at the client)."""

    def __init__(self, *args: Any, on_put: Put, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_put = on_put

    async def verify_value(self, data: Any) -> Any:
        return await self._on_put(data)


class RequestDouble(_Requesting, ChannelDouble):
    pass


class RequestInteger(_Requesting, ChannelInteger):
    pass


class RequestEnum(_Requesting, ChannelEnum):
    pass


class RequestString(_Requesting, ChannelString):
    pass


def split_fields(text: str) -> tuple[tuple[str, str], ...]:
    """``SERVICE.FIELD,...`` to ``((service, field), ...)``; ``ValueError`` naming a bad word."""
    out = []
    for word in (w.strip() for w in text.split(",")):
        service, dot, name = word.partition(".")
        if not word or not dot or not service or not name:
            raise ValueError(f"--fields: {word!r} is not SERVICE.FIELD (e.g. daq.coil_z_m)")
        out.append((service, name))
    return tuple(out)


def severity_of(state: str, online: bool, stale: bool) -> tuple[AlarmSeverity, AlarmStatus]:
    """The EPICS alarm of a daemon's state: offline INVALID, stale MINOR, tripped MAJOR."""
    if not online:
        return AlarmSeverity.INVALID_ALARM, AlarmStatus.COMM
    if stale:
        return AlarmSeverity.MINOR_ALARM, AlarmStatus.TIMEOUT
    if state == "tripped":
        return AlarmSeverity.MAJOR_ALARM, AlarmStatus.STATE
    return AlarmSeverity.NO_ALARM, AlarmStatus.NO_ALARM


class EpicsMirror:
    """The PVs of one instrument (see the module docstring), kept in :attr:`pvdb`, which the
    caproto server reads at every search: PVs appear as the daemons declare them."""

    def __init__(self, view: BusView, prefix: str = "KB:",
                 fields: tuple[tuple[str, str], ...] | None = None,
                 rate_hz: float = DEFAULT_RATE_HZ) -> None:
        if not 0.1 <= rate_hz <= 1000.0:
            raise ValueError(f"--rate {rate_hz} Hz outside 0.1..1000 Hz")
        self.view = view
        self.base = f"{prefix}{view.instrument}:"
        if fields is None:  # the defaults this instrument measures
            skip = set(unmeasured(view.instrument))
            fields = tuple(f for f in split_fields(",".join(DEFAULT_FIELDS))
                           if not (f[0] == "daq" and f[1] in skip))
        self.fields = fields
        self.rate_hz = rate_hz
        self.pvdb: dict[str, Any] = {}
        self._params: dict[tuple[str, str], Any] = {}
        self._params_version = -1
        self._frame_t: dict[str, float] = {}
        self._status: dict[str, dict[str, Any]] = {}
        self._status_t = 0.0
        for service, name in self.fields:
            self.pvdb[self.frame_name(service, name)] = ChannelDouble(value=0.0, units=unit_of(name) or "",
                                                                      precision=6)

    def name(self, service: str, leaf: str) -> str:
        return f"{self.base}{service}:{leaf}"

    def frame_name(self, service: str, field: str) -> str:
        return f"{self.base}{service}:frame:{field}"

    # ---------------------------------------------------------------- puts

    async def _request(self, service: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
        reply = await self.view.request(service, command, args)
        if not reply["ok"]:
            raise ValueError(f"{service} refused {command}: {reply['error']}")
        return reply["result"]

    def _param_put(self, service: str, spec: Any) -> Put:
        async def put(value: Any) -> Any:
            if spec.type == "bool":
                value = value in ("true", 1, True)
            elif spec.type == "int":
                value = int(value)
            elif spec.type == "float":
                value = float(value)
            result = await self._request(service, "param.set", {"name": spec.name, "value": value})
            got = result.get("value", value)
            return str(got).lower() if spec.type == "bool" else got
        return put

    def _mode_put(self) -> Put:
        async def put(value: Any) -> Any:
            await self._request("servo", "mode", {"mode": str(value)})
            return value
        return put

    def _button_put(self, service: str, command: str) -> Put:
        async def put(value: Any) -> Any:
            if int(value):
                await self._request(service, command, {})
            return 0
        return put

    # ---------------------------------------------------------------- PVs from the bus

    def _param_channel(self, service: str, spec: Any) -> Any:
        put = self._param_put(service, spec)
        doc = spec.doc[:DESC_CHARS]
        limits: dict[str, Any] = {}
        if spec.type in ("float", "int") and spec.min is not None and spec.max is not None:
            conv = float if spec.type == "float" else int
            lo, hi = conv(spec.min), conv(spec.max)
            limits = {"lower_ctrl_limit": lo, "upper_ctrl_limit": hi, "lower_disp_limit": lo,
                      "upper_disp_limit": hi}
        if spec.type == "float":
            value = float(spec.value) if spec.value is not None else math.nan
            return RequestDouble(on_put=put, value=value, units=spec.unit, precision=6, **limits), doc
        if spec.type == "int":
            return RequestInteger(on_put=put, value=int(spec.value or 0), units=spec.unit, **limits), doc
        if spec.type == "bool":
            return RequestEnum(on_put=put, value=str(bool(spec.value)).lower(),
                               enum_strings=["false", "true"]), doc
        if spec.choices:
            return RequestEnum(on_put=put, value=str(spec.value), enum_strings=list(spec.choices)), doc
        return RequestString(on_put=put, value=str(spec.value or "")), doc

    async def _update_params(self) -> None:
        for service in sorted(self.view.params):
            for spec in self.view.param_specs(service):
                key = (service, spec.name)
                chan = self._params.get(key)
                if chan is None:
                    chan, doc = self._param_channel(service, spec)
                    pv = self.name(service, spec.name)
                    self.pvdb[pv] = self._params[key] = chan
                    self.pvdb[f"{pv}.DESC"] = ChannelString(value=doc)
                    self.pvdb[f"{pv}.EGU"] = ChannelString(value=spec.unit)
                    continue
                value = str(spec.value).lower() if spec.type == "bool" else spec.value
                if value is not None and value != chan.value:
                    await chan.write(value, verify_value=False)

    def _status_channels(self, service: str) -> dict[str, Any]:
        chans = self._status.get(service)
        if chans is None:
            chans = {"STATE": ChannelEnum(value="offline", enum_strings=list(STATES)),
                     "ONLINE": ChannelEnum(value="false", enum_strings=["false", "true"]),
                     "SESSION": ChannelInteger(value=0), "HEARTBEAT_AGE": ChannelDouble(value=0.0, units="s",
                                                                                      precision=2),
                     "CPU_US": ChannelDouble(value=0.0, units="us", precision=1),
                     "FRAME_AGE_MS": ChannelDouble(value=0.0, units="ms", precision=3),
                     "TRIP_REASON": ChannelString(value="")}
            if service == "servo":
                chans["MODE"] = RequestEnum(on_put=self._mode_put(), value="idle", enum_strings=list(MODES))
            self._status[service] = chans
            for leaf, chan in chans.items():
                self.pvdb[self.name(service, leaf)] = chan
        return chans

    async def _update_statuses(self, now: float) -> None:
        for service, seen in list(self.view.statuses.items()):
            s = seen.msg
            chans = self._status_channels(service)
            stale = self.view.stale(service, now)
            severity, status = severity_of(s.state, s.online, stale)
            if "guard" in s.detail and "ARM" not in chans:  # an actuator daemon
                for command in ACTUATOR_COMMANDS:
                    chan = RequestInteger(on_put=self._button_put(service, command.lower()), value=0)
                    chans[command] = self.pvdb[self.name(service, command)] = chan
            values: dict[str, Any] = {
                "STATE": s.state, "ONLINE": str(s.online).lower(), "SESSION": s.session,
                "HEARTBEAT_AGE": now - s.t_utc_s if s.t_utc_s else 0.0, "CPU_US": s.timing.cpu_us_p99,
                "FRAME_AGE_MS": s.timing.age_ms_p99, "TRIP_REASON": str(s.detail.get("trip_reason") or "")[:DESC_CHARS]}
            if "MODE" in chans and s.detail.get("mode") in MODES:
                values["MODE"] = s.detail["mode"]
            for counter, count in s.counters.items():
                leaf = counter.upper()
                if leaf not in chans:
                    chans[leaf] = self.pvdb[self.name(service, leaf)] = ChannelInteger(value=0)
                values[leaf] = count
            for leaf, value in values.items():
                chan = chans[leaf]
                alarm = {"severity": severity, "status": status} if leaf == "STATE" else {}
                if value != chan.value or (alarm and chan.alarm.severity != severity):
                    await chan.write(value, verify_value=False, timestamp=s.t_utc_s or now, **alarm)

    async def _update_frames(self) -> None:
        for service, name in self.fields:
            seen = self.view.frames.get(service)
            if seen is None or seen.msg.t_utc_s == self._frame_t.get(f"{service}.{name}"):
                continue
            msg = seen.msg
            value = getattr(msg, "values", {}).get(name) if hasattr(msg, "values") else getattr(msg, name, None)
            if value is None:
                continue
            self._frame_t[f"{service}.{name}"] = msg.t_utc_s
            await self.pvdb[self.frame_name(service, name)].write(float(value), verify_value=False,
                                                            timestamp=msg.t_utc_s)

    async def updater(self) -> None:
        """Bring the PVs up to date: frame fields every ``1 / rate_hz``, statuses every
        :data:`STATUS_EVERY_S`, parameters when a list arrived."""
        period = 1.0 / self.rate_hz
        due = time.monotonic()
        while True:
            now = time.time()
            if self.view.params_version != self._params_version:
                self._params_version = self.view.params_version
                await self._update_params()
            if now - self._status_t >= STATUS_EVERY_S:
                self._status_t = now
                await self._update_statuses(now)
            await self._update_frames()
            # on a schedule, not a sleep after the work: a late wake-up (a view runs on what
            # CPU the daemons leave) must not lower the rate; more than a period late, the
            # schedule starts again from now rather than catching up in a burst
            due += period
            late = time.monotonic() - due
            if late > period:
                due += late
            await asyncio.sleep(max(0.0, -late))


async def serve(url: str, instrument: str, prefix: str = "KB:",
                fields: tuple[tuple[str, str], ...] | None = None, rate_hz: float = DEFAULT_RATE_HZ,
                ready=None) -> None:
    """Run the Channel Access server until cancelled (its port and interfaces from the EPICS
    environment: ``EPICS_CA_SERVER_PORT``, ``EPICS_CAS_INTF_ADDR_LIST``, ...); ``ready(base)``
    once it runs (``base``: ``<prefix><instrument>:``)."""
    # the frames are read twice per update of their PVs, so that every update finds a newer
    # frame (reading once per update on a clock of its own, it would beat against the
    # updates and skip some), and at least every 0.05 s (a slow rate must not leave seconds
    # of frames in the socket)
    async with BusView(url, instrument, traces=False, read_every_s=min(0.5 / rate_hz, 0.05)) as view:
        mirror = EpicsMirror(view, prefix, fields, rate_hz)
        ctx = Context(mirror.pvdb)
        server = asyncio.create_task(ctx.run())
        updater = asyncio.create_task(mirror.updater())
        try:
            if ready is not None:
                ready(mirror.base)
            await asyncio.gather(server, updater)
        finally:
            for task in (server, updater):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
