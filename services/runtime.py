"""The service runtime every daemon stands on.

A service is a subclass of :class:`Service` that declares its parameters as
:class:`~kibble.services.params.Param` attributes, registers its subscriptions in
:meth:`Service.setup`, and handles decoded messages in plain (synchronous) methods. The runtime
does the I/O:

- configuration from TOML plus CLI overrides (:func:`load_config`);
- connect with reconnect and exponential back-off; a lost broker is noticed by the reader (socket
  closed) or by the 2 s keepalive, and :meth:`Service.on_disconnect` runs at once;
- a last will that marks the service ``offline`` and a retained ``online`` status, a 1 Hz
  heartbeat with counters and loop-timing statistics, and a session number that increases at
  every start (a restart is visible on the bus);
- ``param.set``, ``param.get``, ``param.list``, ``param.revert`` over ``cmd`` with replies,
  audit events and a state file, plus the service's own commands (:func:`command`);
- invalid messages dropped, counted and reported on ``event`` (rate-limited);
- a graceful stop on SIGINT/SIGTERM (:meth:`Service.on_stop`, then an ``offline`` status).

Messages are handled one at a time on one event loop, so a parameter change always lands
between two frames; a service that needs a bumpless change does it in
:meth:`Service.on_param_changed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import signal
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, ClassVar, TypeVar

import aiomqtt

from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import (
    Command, Event, Message, ParamList, Reply, Severity, State, Status,
)
from kibble.bus_schema.topics import Topics, check_name
from kibble.bus_schema.transport import (
    DEFAULT_BROKER, connect_error_text, deliver_directly, make_client, parse_broker_url, publish_now,
    with_options,
)
from kibble.services.params import Change, ParamError, ParamRegistry, declared_params

M = TypeVar("M", bound=Message)
log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    env = os.environ.get("KIBBLE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "kibble"


@dataclass
class ServiceConfig:
    """Where a service runs and how: broker, instrument, state directory, initial values.

    ``params`` are initial parameter values (validated, from the TOML file); a value tuned live
    and saved in the state file wins over them unless ``restore`` is False. ``param_overrides``
    (``--param`` on the command line) win over both. ``settings`` holds service-specific
    configuration that is not live-tunable (device ranges, channel maps).
    """

    instrument: str = "nist4"
    broker: str = DEFAULT_BROKER
    state_dir: Path = field(default_factory=default_state_dir)
    heartbeat_s: float = 1.0
    restore: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    param_overrides: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    client_id: str = ""
    event_burst: int = 5
    """Events of one kind allowed in a burst before rate limiting."""
    event_rate_per_s: float = 1.0
    """Sustained events of one kind per second once the burst is spent."""
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0
    broker_user: str | None = None
    """Broker identity (``kibble-<service>`` in deploy/); the URL's own user wins."""
    broker_password_file: str | None = None
    """File whose first line is the password (mode 0600; never the password in the TOML)."""
    broker_ca_file: str | None = None
    broker_cert_file: str | None = None
    broker_key_file: str | None = None
    """TLS (``mqtts://``): CA of the broker's certificate, optional client certificate and key."""

    def __post_init__(self) -> None:
        check_name("instrument id", self.instrument)
        # the broker_* keys join the URL (see kibble.bus_schema.transport, "Broker URLs")
        self.broker = with_options(self.broker, self.broker_user, self.broker_password_file,
                                   self.broker_ca_file, self.broker_cert_file, self.broker_key_file)
        parse_broker_url(self.broker)
        self.state_dir = Path(self.state_dir)
        if not (0.05 <= self.heartbeat_s <= 60):
            raise ValueError(f"heartbeat_s must be within 0.05..60 s, got {self.heartbeat_s}")


_CONFIG_KEYS = {"instrument", "broker", "state_dir", "heartbeat_s", "restore", "event_burst",
                "event_rate_per_s", "reconnect_min_s", "reconnect_max_s", "broker_user",
                "broker_password_file", "broker_ca_file", "broker_cert_file", "broker_key_file"}


def load_config(service: str, path: Path | str | None = None, **overrides: Any) -> ServiceConfig:
    """Build a :class:`ServiceConfig` from a TOML file and overrides (CLI flags win).

    The file holds common keys at the top level and per-service tables::

        instrument = "nist4"
        broker = "mqtt://127.0.0.1:1883"
        [services.damping]
        heartbeat_s = 1.0
        [services.damping.params]
        gain_x_n_s_m = 2.0
        [services.damping.settings]
        dac_bits = 16

    Unknown keys raise ``ValueError`` naming the key and the file. ``params=`` among the
    overrides become :attr:`ServiceConfig.param_overrides` (they win over the state file).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read configuration {path}: {exc}") from None
    merged: dict[str, Any] = {k: v for k, v in data.items() if k != "services"}
    section = data.get("services", {}).get(service, {})
    merged.update(section)
    unknown = set(merged) - _CONFIG_KEYS - {"params", "settings"}
    if unknown:
        raise ValueError(f"unknown configuration key(s) {sorted(unknown)} in {path} "
                         f"(known: {sorted(_CONFIG_KEYS | {'params', 'settings'})})")
    params = dict(merged.pop("params", {}))
    settings = dict(merged.pop("settings", {}))
    param_overrides = dict(overrides.pop("params", None) or {})
    settings.update(overrides.pop("settings", None) or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return ServiceConfig(params=params, param_overrides=param_overrides, settings=settings,
                         **merged)


def command(name: str) -> Callable[[Callable], Callable]:
    """Mark a method as the handler of bus command ``name``.

    The handler takes the :class:`Command` and returns a dict (the reply's ``result``), sync or
    async; raising ``ValueError`` sends an error reply with its text.
    """
    def mark(fn: Callable) -> Callable:
        fn.__kibble_command__ = name
        return fn
    return mark


class RateLimiter:
    """Token bucket per key: ``burst`` at once, then ``rate_per_s``; counts what it drops."""

    def __init__(self, burst: int, rate_per_s: float) -> None:
        self.burst = burst
        self.rate_per_s = rate_per_s
        self._tokens: dict[str, tuple[float, float]] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._tokens.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)
        if tokens >= 1.0:
            self._tokens[key] = (tokens - 1.0, now)
            return True
        self._tokens[key] = (tokens, now)
        self.suppressed[key] = self.suppressed.get(key, 0) + 1
        return False


class LoopTimer:
    """Frame-period statistics over one heartbeat interval (telemetry, not logs).

    ``tick(t_s)`` once per frame with a monotonic time; ``snapshot()`` returns mean, standard
    deviation (jitter) and maximum of the period since the last snapshot. A period longer
    than ``overrun_factor`` times the nominal period counts as an overrun.
    """

    def __init__(self, nominal_period_s: float = 0.0, overrun_factor: float = 1.5) -> None:
        self.nominal_period_s = nominal_period_s
        self.overrun_factor = overrun_factor
        self.overruns = 0
        self._last: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self._max = 0.0

    def tick(self, t_s: float) -> None:
        if self._last is not None:
            period = t_s - self._last
            self._n += 1
            self._sum += period
            self._sumsq += period * period
            self._max = max(self._max, period)
            if self.nominal_period_s > 0 and period > self.overrun_factor * self.nominal_period_s:
                self.overruns += 1
        self._last = t_s

    def snapshot(self) -> tuple[float, float, float]:
        if self._n == 0:
            return 0.0, 0.0, 0.0
        mean = self._sum / self._n
        var = max(0.0, self._sumsq / self._n - mean * mean)
        out = (mean, math.sqrt(var), self._max)
        self._reset()
        return out


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT wildcard match: ``+`` is one level, a final ``#`` the parent and every level below."""
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


Handler = Callable[[Any], Any]


class Service:
    """Base of every daemon. Subclasses set ``name``, declare Params, and override hooks.

    Hooks (all optional): :meth:`setup` (register subscriptions), :meth:`on_connected`,
    :meth:`on_disconnect` (broker lost: actuators go safe), :meth:`background` (a coroutine run
    while connected), :meth:`on_param_changed`, :meth:`status_detail`, :meth:`on_stop`.
    """

    name: ClassVar[str] = "service"

    def __init__(self, config: ServiceConfig | None = None) -> None:
        self.config = config or ServiceConfig()
        check_name("service name", self.name)
        self.topics = Topics(self.config.instrument)
        self.client_id = self.config.client_id or f"kibble-{self.config.instrument}-{self.name}-{os.getpid()}"
        state_path = self.config.state_dir / self.config.instrument / f"{self.name}.json"
        self.params = ParamRegistry(declared_params(type(self)), self.name, state_path)
        self.params.apply_overrides(self.config.params)
        self._restore_warnings = self.params.load(restore_values=self.config.restore)
        self.params.apply_overrides(self.config.param_overrides)
        self.params.session += 1
        self.params.save()
        self.session = self.params.session
        self.state: State = "idle"
        self.counters: dict[str, int] = {
            "frames_in": 0, "frames_out": 0, "rejected": 0, "late": 0, "handler_errors": 0,
            "publish_failed": 0, "events_suppressed": 0, "reconnects": 0, "commands": 0}
        self.loop_timer = LoopTimer()
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._local_sink: Callable[[str, bytes, int, bool], None] | None = None
        self._subs: dict[str, tuple[type[Message], Handler, bool]] = {}
        self._raw_subs: dict[str, Callable[[str, bytes], Any]] = {}
        self._handler_tasks: set[asyncio.Task] = set()
        self._seq = 0
        self._heartbeats = 0
        self._t_start = time.monotonic()
        self._stop = asyncio.Event()
        self._limiter = RateLimiter(self.config.event_burst, self.config.event_rate_per_s)
        self._commands: dict[str, Callable] = {
            "param.set": self._cmd_param_set, "param.get": self._cmd_param_get,
            "param.list": self._cmd_param_list, "param.revert": self._cmd_param_revert}
        for _, method in inspect.getmembers(self, predicate=inspect.ismethod):
            cmd_name = getattr(method, "__kibble_command__", None)
            if cmd_name:
                self._commands[cmd_name] = method
        self.subscribe(self.topics.cmd(self.name), Command, self._on_command, is_frame=False)
        self.setup()

    # ------------------------------------------------------------------ hooks

    def setup(self) -> None:
        """Register subscriptions with :meth:`subscribe`."""

    async def on_connected(self) -> None:
        """Called after every (re)connection, once subscriptions are in place."""

    async def on_disconnect(self) -> None:
        """Called as soon as the broker is lost (counts as stale input)."""

    async def background(self) -> None:
        """A coroutine run while connected (cancelled on disconnect)."""
        await asyncio.Event().wait()

    def on_param_changed(self, name: str, old: Any, new: Any) -> None:
        """Called between frames after a parameter changed (apply it bumplessly here)."""

    def status_detail(self) -> dict[str, Any]:
        """Service-specific telemetry for the heartbeat (scalars only)."""
        return {}

    async def on_stop(self) -> None:
        """Called on a graceful stop, while still connected: go to the safe state."""

    # ------------------------------------------------------------------ API for subclasses

    def subscribe(self, topic: str, msg_type: type[M], handler: Callable[[M], Any],
                  is_frame: bool = True) -> None:
        """Deliver messages on ``topic`` (exact topic) decoded as ``msg_type`` to ``handler``."""
        self._subs[topic] = (msg_type, handler, is_frame)

    def subscribe_raw(self, pattern: str, handler: Callable[[str, bytes], Any]) -> None:
        """Deliver every message whose topic matches the MQTT ``pattern`` (``+``, ``#``) to
        ``handler(topic, payload)``, undecoded and synchronously, before any typed handler of
        the same topic. Subscribed at QoS 1; an exact :meth:`subscribe` topic that the pattern
        covers is not subscribed again (the broker would deliver it twice)."""
        self._raw_subs[pattern] = handler

    def stamp(self, msg: M) -> M:
        """Fill a message's header: next sequence number, monotonic and UTC time."""
        self._seq += 1
        msg.seq = self._seq
        msg.t_mono_s = time.monotonic()
        msg.t_utc_s = time.time()
        return msg

    def publish(self, topic: str, msg: Message, qos: int = 0, retain: bool = False) -> bool:
        """Stamp and publish now (no await). False, and counted, when not connected."""
        return self.publish_bytes(topic, encode(self.stamp(msg)), qos, retain)

    def publish_bytes(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish an already encoded payload now (no await); False, and counted, when not
        connected."""
        if self._local_sink is not None:
            self._local_sink(topic, payload, qos, retain)
            return True
        if self._client is None:
            self.counters["publish_failed"] += 1
            return False
        ok = publish_now(self._client, topic, payload, qos, retain)
        if not ok:
            self.counters["publish_failed"] += 1
        return ok

    def event(self, kind: str, text: str, severity: Severity = "info",
              data: dict[str, Any] | None = None, rate_limited: bool = True) -> None:
        """Publish an event on ``<service>/event`` (rate-limited per kind) and log it."""
        level = {"info": logging.INFO, "warning": logging.WARNING, "alarm": logging.ERROR}[severity]
        now = time.monotonic()
        if rate_limited and not self._limiter.allow(kind, now):
            self.counters["events_suppressed"] += 1
            return
        log.log(level, "%s: %s: %s", self.name, kind, text)
        payload = dict(data or {})
        dropped = self._limiter.suppressed.pop(kind, 0)
        if dropped:
            payload["suppressed_since_last"] = dropped
        self.publish(self.topics.event(self.name),
                     Event(service=self.name, kind=kind, severity=severity, text=text, data=payload),
                     qos=1)

    def set_state(self, state: State) -> None:
        if state != self.state:
            old, self.state = self.state, state
            self.event("state", f"{old} -> {state}", data={"old": old, "new": state})
            self.publish_status()

    def stop(self) -> None:
        """Ask the service to stop gracefully (as SIGTERM does)."""
        self._stop.set()

    def attach_local(self, sink: Callable[[str, bytes, int, bool], None]) -> list[str]:
        """Run without a broker: every publish goes to ``sink(topic, payload, qos, retain)``.

        For the in-process closed loop (:mod:`kibble.services.inprocess`), which delivers
        messages with :meth:`dispatch`. Returns the topics this service subscribes to.
        """
        self._local_sink = sink
        return list(self._subs)

    # ------------------------------------------------------------------ status and params

    def status(self, online: bool = True) -> Status:
        mean, jitter, peak = self.loop_timer.snapshot()
        detail = {k: v for k, v in self.status_detail().items()
                  if v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))}
        return Status(service=self.name, state=self.state if online else "offline", online=online,
                      session=self.session, client_id=self.client_id, heartbeat=self._heartbeats,
                      uptime_s=time.monotonic() - self._t_start, counters=dict(self.counters),
                      loop_period_mean_s=mean, loop_period_jitter_s=jitter, loop_period_max_s=peak,
                      loop_overruns=self.loop_timer.overruns, detail=detail)

    def publish_status(self) -> None:
        self.publish(self.topics.status(self.name), self.status(), qos=1, retain=True)

    def publish_params(self) -> None:
        self.publish(self.topics.params(self.name),
                     ParamList(service=self.name, params=self.params.list()), qos=1, retain=True)

    def _apply_change(self, change: Change) -> None:
        self.on_param_changed(change.name, change.old, change.new)
        self.event("audit", f"{change.name}: {change.old!r} -> {change.new!r} by {change.client_id}",
                   data={"param": change.name, "old": change.old, "new": change.new,
                         "client_id": change.client_id, "t_utc_s": change.t_utc_s},
                   rate_limited=False)
        self.publish_params()

    def _cmd_param_set(self, cmd: Command) -> dict[str, Any]:
        if "name" not in cmd.args or "value" not in cmd.args:
            raise ParamError("param.set needs args 'name' and 'value'")
        change = self.params.set(str(cmd.args["name"]), cmd.args["value"], cmd.client_id or "?",
                                 time.time())
        self._apply_change(change)
        return {"name": change.name, "old": change.old, "value": change.new}

    def _cmd_param_get(self, cmd: Command) -> dict[str, Any]:
        name = str(cmd.args.get("name", ""))
        spec = self.params.spec(name)
        return {"name": name, "value": self.params.values[name], "unit": spec.unit}

    def _cmd_param_list(self, cmd: Command) -> dict[str, Any]:
        return {"params": [{"name": p.name, "value": p.value, "unit": p.unit, "min": p.min,
                            "max": p.max, "type": p.type, "doc": p.doc} for p in self.params.list()]}

    def _cmd_param_revert(self, cmd: Command) -> dict[str, Any]:
        change = self.params.revert(cmd.client_id or "?", time.time())
        self._apply_change(change)
        return {"name": change.name, "old": change.old, "value": change.new}

    # ------------------------------------------------------------------ dispatch

    def reject(self, topic: str, reason: str) -> None:
        """Count and report a message that was dropped."""
        self.counters["rejected"] += 1
        self.event("rejected", f"dropped message on {topic}: {reason}", severity="warning",
                   data={"topic": topic, "reason": reason})

    async def _on_command(self, cmd: Command) -> None:
        self.counters["commands"] += 1
        handler = self._commands.get(cmd.command)
        reply = Reply(id=cmd.id, ok=False, service=self.name)
        if handler is None:
            reply.error = (f"unknown command {cmd.command!r}; this service knows "
                           f"{', '.join(sorted(self._commands))}")
        else:
            try:
                result = handler(cmd)
                if inspect.isawaitable(result):
                    result = await result
                reply.ok, reply.result = True, result or {}
            except (ValueError, TypeError) as exc:
                reply.error = str(exc)
        if not reply.ok:
            self.event("command_rejected", f"{cmd.command} from {cmd.client_id or '?'}: {reply.error}",
                       severity="warning", data={"command": cmd.command, "error": reply.error})
        self.publish(cmd.reply_to or self.topics.reply(self.name), reply, qos=1)

    def dispatch_now(self, topic: str, payload: bytes) -> Awaitable[None] | None:
        """Decode one message and call its handler at once; never raises for bad input.

        Returns the still-to-be-awaited work of an ``async`` handler (handler errors inside
        it are caught and reported too), or None when the handler was synchronous.
        """
        if self._raw_subs:
            self._dispatch_raw(topic, payload)
        entry = self._subs.get(topic)
        if entry is None:
            return None
        msg_type, handler, is_frame = entry
        try:
            msg = decode(payload, msg_type)
        except DecodeError as exc:
            self.reject(topic, str(exc))
            return None
        if is_frame:
            self.counters["frames_in"] += 1
        try:
            result = handler(msg)
        except Exception as exc:  # a handler bug must not stop the daemon: count, report, go on
            self._handler_failed(topic, exc)
            return None
        if result is not None and inspect.isawaitable(result):  # frame handlers return None
            return self._finish_handler(topic, result)
        return None

    def _dispatch_raw(self, topic: str, payload: bytes) -> None:
        for pattern, handler in self._raw_subs.items():
            if topic_matches(pattern, topic):
                try:
                    handler(topic, payload)
                except Exception as exc:
                    self._handler_failed(topic, exc)

    async def dispatch(self, topic: str, payload: bytes) -> None:
        """:meth:`dispatch_now`, then await an ``async`` handler to its end."""
        pending = self.dispatch_now(topic, payload)
        if pending is not None:
            await pending

    async def _finish_handler(self, topic: str, awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except Exception as exc:
            self._handler_failed(topic, exc)

    def _handler_failed(self, topic: str, exc: Exception) -> None:
        self.counters["handler_errors"] += 1
        log.error("%s: handler for %s failed", self.name, topic, exc_info=exc)
        self.event("handler_error", f"{type(exc).__name__} handling {topic}: {exc}",
                   severity="alarm", data={"topic": topic})

    def _on_bus_message(self, topic: str, payload: bytes) -> None:
        """Called from the socket-readable callback for every message (no queue, no task)."""
        pending = self.dispatch_now(topic, payload)
        if pending is not None:
            task = asyncio.get_running_loop().create_task(pending)
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_tasks.discard)

    # ------------------------------------------------------------------ run loop

    async def run(self, install_signal_handlers: bool = True) -> None:
        """Connect, serve, reconnect with back-off until stopped; then stop gracefully."""
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        for warning in self._restore_warnings:
            log.warning("%s: %s", self.name, warning)
        backoff = self.config.reconnect_min_s
        first = True
        while not self._stop.is_set():
            if not first:
                self.counters["reconnects"] += 1
            first = False
            connected_at = None
            try:
                # Stamped now, so the will carries this session's last connect time.
                will = aiomqtt.Will(self.topics.status(self.name),
                                    encode(self.stamp(self.status(online=False))), qos=1, retain=True)
                client = make_client(self.config.broker, self.client_id, will=will)
                deliver_directly(client, self._on_bus_message)
                async with client:
                    connected_at = time.monotonic()
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                log.warning("%s: %s", self.name, connect_error_text(self.config.broker, exc))
            finally:
                self._client = None
                self.connected.clear()
            if self._stop.is_set():
                break
            await self.on_disconnect()
            if connected_at is not None and time.monotonic() - connected_at > 5.0:
                backoff = self.config.reconnect_min_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(self.config.reconnect_max_s, backoff * 2)
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _serve(self, client: aiomqtt.Client) -> None:
        self._client = client
        for pattern in self._raw_subs:
            await client.subscribe(pattern, qos=1)
        for topic in self._subs:
            if any(topic_matches(pattern, topic) for pattern in self._raw_subs):
                continue
            await client.subscribe(topic, qos=1 if topic.endswith("/cmd") else 0)
        self.publish_params()
        self.publish_status()
        for warning in self._restore_warnings:
            self.event("restore", warning, severity="warning")
        self._restore_warnings = []
        self.connected.set()
        await self.on_connected()
        tasks = [asyncio.create_task(self._watch_connection(client)), asyncio.create_task(self._heartbeat()),
                 asyncio.create_task(self.background()), asyncio.create_task(self._stop.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._handler_tasks:  # commands in progress finish (their replies may go out)
                await asyncio.wait(list(self._handler_tasks), timeout=5.0)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        if self._stop.is_set():
            self.state = "stopping"
            await self.on_stop()
            self.state = "offline"
            self.publish(self.topics.status(self.name), self.status(online=False), qos=1, retain=True)

    async def _watch_connection(self, client: aiomqtt.Client) -> None:
        """Return (by raising ``MqttError``) when the connection drops.

        Messages do not come through ``client.messages`` (see :func:`deliver_directly`); its
        iterator stays empty and raises as soon as aiomqtt sees the connection close.
        """
        async for message in client.messages:
            raise RuntimeError(f"unexpected message on {message.topic} through aiomqtt's queue")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            self._heartbeats += 1
            self.publish_status()
