"""The service runtime every daemon stands on.

A service is a subclass of :class:`Service` that declares its parameters as
:class:`~kibble.services.runtime.params.Param` attributes, registers its subscriptions in
:meth:`Service.setup`, and handles decoded messages in plain (synchronous) methods. The
connection life cycle is the :class:`~kibble.bus_schema.node.BusNode`'s (reconnect with
back-off, last will, retained status, heartbeat, rate-limited events, commands with checked
reply topics, an ``offline`` status on any exit); on top of it the runtime adds:

- configuration from TOML plus CLI overrides (:func:`load_config`);
- a session number that increases at every start (a restart is visible on the bus), counters
  and frame timing in every status;
- ``param.set``, ``param.get``, ``param.list``, ``param.revert`` over ``cmd`` with replies,
  audit events and a state file, plus the service's own commands (:func:`command`);
- typed subscriptions: invalid messages dropped, counted and reported on ``event``
  (rate-limited); of a frame topic only the newest frame of a receive batch is acted on;
- a graceful stop on SIGINT/SIGTERM (:meth:`Service.on_stop`, then an ``offline`` status).

Messages are handled one at a time on one event loop, so a parameter change always lands
between two frames; a service that needs a bumpless change does it in
:meth:`Service.on_param_changed`.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import inspect
import logging
import math
import os
import signal
import termios
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, ClassVar, Coroutine, Iterable, TypeVar

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import Command, Message, ParamList, State, Status, Timing
from kibble.bus_schema.node import BusNode, CommandHandler
from kibble.bus_schema.realtime import FrameIntake, FrameTiming, LoopTimer, saturating_add
from kibble.bus_schema.topics import check_name, topic_matches
from kibble.bus_schema.transport import DEFAULT_BROKER, Receiver, parse_broker_url, with_options
from kibble.services.runtime.params import Change, ParamError, ParamRegistry, declared_params
from kibble.bus_schema.process import ProcessSettings, apply_process_settings, process_settings

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
    clock: str = "realtime"
    """The hardware's clock: ``realtime`` (real hardware, or the simulator on the wall clock)
    or ``lockstep`` (the simulator waits for the actuators: wall-clock age means nothing, so
    the age limit below is not applied; every timeout counts frames)."""
    max_frame_age_frames: float = 20.0
    """In ``realtime``, a frame older than this many frame periods when it is acted on is too
    old: an actuator treats it as missing input (hold, then safe; one event)."""
    process: ProcessSettings = field(default_factory=lambda: ProcessSettings())
    """CPU affinity and scheduling of the daemon's process (``[services.NAME.process]``)."""
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
        if self.clock not in ("realtime", "lockstep"):
            raise ValueError(f"clock must be realtime or lockstep, got {self.clock!r}")
        if not (1.0 <= self.max_frame_age_frames <= 1e6):
            raise ValueError(f"max_frame_age_frames must be within 1..1e6, got {self.max_frame_age_frames}")
        if isinstance(self.process, dict):
            self.process = process_settings(self.process)


_CONFIG_KEYS = {"instrument", "broker", "state_dir", "heartbeat_s", "restore", "event_burst",
                "event_rate_per_s", "reconnect_min_s", "reconnect_max_s", "clock",
                "max_frame_age_frames", "process", "broker_user", "broker_password_file",
                "broker_ca_file", "broker_cert_file", "broker_key_file"}


def load_config(service: str, path: Path | str | None = None, **overrides: Any) -> ServiceConfig:
    """Build a :class:`ServiceConfig` from a TOML file and overrides (CLI flags win).

    The file holds common keys at the top level and per-service tables::

        instrument = "nist4"
        broker = "mqtt://127.0.0.1:1883"
        [services.damping]
        heartbeat_s = 1.0
        [services.damping.params]
        gain_x_n_s_per_m = 2.0
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
    process = dict(merged.pop("process", {}))
    process.update(overrides.pop("process", None) or {})
    param_overrides = dict(overrides.pop("params", None) or {})
    settings.update(overrides.pop("settings", None) or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return ServiceConfig(params=params, param_overrides=param_overrides, settings=settings,
                         process=process_settings(process), **merged)


def command(name: str) -> Callable[[Callable], Callable]:
    """Mark a method as the handler of bus command ``name``.

    The handler takes the :class:`Command` and returns a dict (the reply's ``result``), sync or
    async; raising ``ValueError`` sends an error reply with its text.
    """
    def mark(fn: Callable) -> Callable:
        fn.__kibble_command__ = name  # type: ignore[attr-defined]  # our marker on the function
        return fn
    return mark


Handler = Callable[[Any], Any]


class Service(BusNode[CommandHandler]):
    """Base of every daemon. Subclasses set ``name``, declare Params, and override hooks.

    Hooks (all optional): :meth:`setup` (register subscriptions), :meth:`on_connected`,
    :meth:`on_disconnect` (broker lost: actuators go safe), :meth:`background` (a coroutine run
    while connected), :meth:`on_param_changed`, :meth:`status_detail`, :meth:`on_stop`,
    :meth:`warm_up`.
    """

    name: ClassVar[str] = "service"

    def __init__(self, config: ServiceConfig | None = None) -> None:
        self.config = config or ServiceConfig()
        check_name("service name", self.name)
        super().__init__(
            self.config.instrument, self.config.broker,
            self.config.client_id or f"kibble-{self.config.instrument}-{self.name}-{os.getpid()}",
            heartbeat_s=self.config.heartbeat_s, reconnect_min_s=self.config.reconnect_min_s,
            reconnect_max_s=self.config.reconnect_max_s, event_burst=self.config.event_burst,
            event_rate_per_s=self.config.event_rate_per_s)
        state_path = self.config.state_dir / self.config.instrument / f"{self.name}.json"
        self.params = ParamRegistry(declared_params(type(self)), self.name, state_path)
        self.params.apply_overrides(self.config.params)
        self._restore_warnings = self.params.load(restore_values=self.config.restore)
        self.params.apply_overrides(self.config.param_overrides)
        self.params.session += 1
        self.params.save()
        self.session = self.params.session
        self.state: State = "idle"
        self.counters.update({"frames_in": 0, "frames_out": 0, "frames_skipped": 0, "late": 0,
                              "overruns": 0, "too_old": 0})
        self.loop_timer = LoopTimer()
        self.frame_period_s = 1e-3
        """The loop's frame period (s); set with :meth:`frame_clock`."""
        self.timing = FrameTiming(self.frame_period_s)
        self.intake = FrameIntake()
        self._clock_topic: str | None = None
        self._clock_seen = False
        self._batch_messages = 0
        self._batch_skipped_at = 0
        self.frame_age_s = 0.0
        """Age of the frame being handled (receive time minus its publisher's stamp, s)."""
        self._local_sink: Callable[[str, bytes, int, bool], None] | None = None
        self._subs: dict[str, tuple[type[Message], Handler, bool]] = {}
        self._newest_only: set[str] = set()
        self._local_out: dict[str, list[Service]] = {}
        """Topics this daemon publishes that daemons of the same process take in process."""
        self._local_in: set[str] = set()
        """Topics this daemon takes in process from a daemon of the same process (not
        subscribed at the broker)."""
        self._raw_subs: dict[str, Callable[[str, bytes], Any]] = {}
        self._last_timing = Timing()
        self._own_process = True
        self.commands.update({
            "param.set": self._cmd_param_set, "param.get": self._cmd_param_get,
            "param.list": self._cmd_param_list, "param.revert": self._cmd_param_revert})
        for _, method in inspect.getmembers(self, predicate=inspect.ismethod):
            cmd_name = getattr(method, "__kibble_command__", None)
            if cmd_name:
                self.commands[cmd_name] = method
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

    def warm_up(self) -> None:
        """Called once before the first connection: run every compiled kernel of the frame
        path once on scratch data. A numba kernel's first call in a process costs ~0.4 s
        (loading it from the cache); made in the loop (the servo's first force-mode frame),
        that stalls every daemon of the process and sends the actuators safe."""

    def on_param_changed(self, name: str, old: Any, new: Any) -> None:
        """Called between frames after a parameter changed (apply it bumplessly here)."""

    def status_detail(self) -> dict[str, Any]:
        """Service-specific telemetry for the heartbeat (scalars only)."""
        return {}

    async def on_stop(self) -> None:
        """Called on a graceful stop, while still connected: go to the safe state."""

    # ------------------------------------------------------------------ API for subclasses

    def subscribe(self, topic: str, msg_type: type[M], handler: Callable[[M], Any],
                  is_frame: bool = True, newest_only: bool = True) -> None:
        """Deliver messages on ``topic`` (exact topic) decoded as ``msg_type`` to ``handler``.

        ``is_frame``: a periodic frame (counted, its age measured). A frame topic is
        ``newest_only`` unless told otherwise: of the frames one socket read brings, only the
        newest is delivered (the skipped ones are counted), as a control loop wants; a consumer
        that needs every frame (a measurement window, a benchmark) passes False.
        Commands and replies (``is_frame=False``) are always delivered, in order.
        """
        self._subs[topic] = (msg_type, handler, is_frame)
        if is_frame and newest_only:
            self._newest_only.add(topic)
        else:
            self._newest_only.discard(topic)

    def subscribe_raw(self, pattern: str, handler: Callable[[str, bytes], Any]) -> None:
        """Deliver every message whose topic matches the MQTT ``pattern`` (``+``, ``#``) to
        ``handler(topic, payload)``, undecoded and synchronously, before any typed handler of
        the same topic. Subscribed at QoS 1; an exact :meth:`subscribe` topic that the pattern
        covers is not subscribed again (the broker would deliver it twice)."""
        self._raw_subs[pattern] = handler

    def frame_clock(self, topic: str, period_s: float) -> None:
        """Declare the loop's clock: frames on ``topic`` (one of the :meth:`subscribe` frame
        topics) every ``period_s``. CPU per frame is counted from one clock frame to the next;
        the frame-age limit is ``max_frame_age_frames`` of this period."""
        if not period_s > 0:
            raise ValueError(f"frame period must be > 0 s, got {period_s!r}")
        self._clock_topic = topic
        self.frame_period_s = period_s
        self.timing = FrameTiming(period_s)

    @property
    def max_frame_age_s(self) -> float:
        """The frame-age limit (s): ``max_frame_age_frames`` periods in realtime, none in
        lockstep."""
        if self.config.clock == "lockstep":
            return math.inf
        return self.config.max_frame_age_frames * self.frame_period_s

    @property
    def frame_too_old(self) -> bool:
        """Whether the frame being handled is older than the age limit (realtime only)."""
        return self.frame_age_s > self.max_frame_age_s

    def publish_bytes(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish an already encoded payload now (no await); False, and counted, when not
        connected. Daemons of this process that take ``topic`` in process get it at once."""
        if self._local_sink is not None:
            self._local_sink(topic, payload, qos, retain)
            return True
        peers = self._local_out.get(topic)
        if peers:
            for peer in peers:
                peer.deliver_local(topic, payload)
        return super().publish_bytes(topic, payload, qos, retain)

    def deliver_local(self, topic: str, payload: bytes) -> None:
        """A frame from a daemon of the same process (:func:`run_together`): handled at once,
        as a batch of its own (timed as this daemon's, not the publisher's)."""
        self.batch_begin()
        self.message(topic, payload)
        self.batch_end()
        self.batch_flushed()

    def set_state(self, state: State) -> None:
        if state != self.state:
            old, self.state = self.state, state
            self.event("state", f"{old} -> {state}", data={"old": old, "new": state})
            self.publish_status()

    def attach_local(self, sink: Callable[[str, bytes, int, bool], None]) -> list[str]:
        """Run without a broker: every publish goes to ``sink(topic, payload, qos, retain)``.

        For the in-process closed loop (:mod:`kibble.services.harness.inprocess`), which delivers
        messages with :meth:`dispatch`. Returns the topics this service subscribes to.
        """
        self._local_sink = sink
        return [self._t_cmd, *self._subs]

    # ------------------------------------------------------------------ status and params

    def status(self, online: bool = True, interval: bool = False) -> Status:
        """The status now; ``interval``: also close the timing interval (the heartbeat's)."""
        counters = self.counters
        counters["frames_skipped"] = self.intake.skipped
        counters["late"], counters["overruns"] = self.timing.late, self.timing.overruns
        detail = {k: v for k, v in self.status_detail().items()
                  if v is None or isinstance(v, (bool, str)) or (isinstance(v, int) and abs(v) <= 2**63 - 1)
                  or (isinstance(v, float) and math.isfinite(v))}
        status = Status(service=self.name, state=self.state if online else "offline",
                        online=online, session=self.session, client_id=self.client_id,
                        heartbeat=self.heartbeats, uptime_s=time.monotonic() - self.t_start_s,
                        counters={k: saturating_add(v, 0) for k, v in counters.items()},
                        loop_overruns=self.timing.overruns, detail=detail)
        if interval:
            status.loop_period_mean_s, status.loop_period_jitter_s, status.loop_period_max_s = \
                self.loop_timer.snapshot()
            status.timing = self.timing.snapshot(self._rx_backlog_bytes())
            self._last_timing = status.timing
        else:
            status.timing = self._last_timing
        return status

    def _rx_backlog_bytes(self) -> int:
        """Bytes waiting in the socket's receive buffer (0 when unknown)."""
        client = self._client
        sock = getattr(getattr(client, "_client", None), "_sock", None) if client else None
        if sock is None:
            return 0
        try:
            buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return int.from_bytes(buf, "little", signed=True)

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

    def dispatch_now(self, topic: str, payload: bytes) -> Awaitable[None] | None:
        """Decode one message and call its handler at once; never raises for bad input.

        Returns the still-to-be-awaited work of an ``async`` handler (handler errors inside
        it are caught and reported too), or None when the handler was synchronous.
        """
        if self._raw_subs:
            self._dispatch_raw(topic, payload)
        return self._dispatch_typed(topic, payload)[1]

    def _dispatch_typed(self, topic: str, payload: bytes) -> tuple[bool, Awaitable[None] | None]:
        """(whether it was taken: it decoded and its handler did not :meth:`reject` it, the
        pending work of an async handler)."""
        if topic == self._t_cmd:  # after the frames of this batch, as they arrived first
            return True, self._command_later(payload)
        entry = self._subs.get(topic)
        if entry is None:
            return False, None
        msg_type, handler, is_frame = entry
        try:
            msg = decode(payload, msg_type)
        except DecodeError as exc:
            self.reject(topic, str(exc))
            return False, None
        if is_frame:
            self.counters["frames_in"] += 1
            now = time.monotonic()
            self.frame_age_s = now - msg.t_mono_s
            self.timing.acted(msg.t_mono_s, now)
            if topic == self._clock_topic:
                self._clock_seen = True
        rejected = self.counters["rejected"]
        try:
            result = handler(msg)
        except Exception as exc:  # a handler bug must not stop the daemon: count, report, go on
            self.handler_failed(topic, exc)
            return True, None
        if result is not None and inspect.isawaitable(result):  # frame handlers return None
            return True, result
        # a frame its handler refused (a setpoint beyond the limits, a sensor frame short of
        # channels) is as bad as one that did not decode: of a conflated batch, the frame
        # before it is acted on instead, so a refused newest frame cannot hide a good one
        return self.counters["rejected"] == rejected, None

    async def _command_later(self, payload: bytes) -> None:
        pending = self.command_received(payload)
        if pending is not None:
            await pending

    def _dispatch_raw(self, topic: str, payload: bytes) -> None:
        for pattern, handler in self._raw_subs.items():
            if topic_matches(pattern, topic):
                try:
                    handler(topic, payload)
                except Exception as exc:
                    self.handler_failed(topic, exc)

    async def dispatch(self, topic: str, payload: bytes) -> None:
        """:meth:`dispatch_now`, then await an ``async`` handler to its end."""
        pending = self.dispatch_now(topic, payload)
        if pending is not None:
            await pending

    # The runtime is the transport's Receiver (bus_schema.transport.deliver_directly): frames
    # are held per batch and only the newest of each topic is acted on, at the batch's end.

    def message(self, topic: str, payload: bytes) -> None:
        """Every message, from the socket-readable callback (no queue, no task)."""
        self._batch_messages += 1
        if self._raw_subs:
            self._dispatch_raw(topic, payload)
        if not self.intake.offer(topic, payload):
            self._dispatch_entry(topic, payload)

    def batch_begin(self) -> None:
        self._batch_messages = 0
        self._batch_skipped_at = self.intake.skipped
        self.timing.batch_begin()

    def batch_end(self) -> None:
        for topic, payloads in self.intake.take():
            for i in range(len(payloads) - 1, -1, -1):  # newest first; older ones only if it is bad
                if self._dispatch_entry(topic, payloads[i]):
                    self.intake.skip(i)
                    break

    def batch_flushed(self) -> None:
        self.timing.batch_end(self._batch_messages, self.intake.skipped - self._batch_skipped_at)
        if self._clock_seen:
            self._clock_seen = False
            self.timing.frame_done()

    def _dispatch_entry(self, topic: str, payload: bytes) -> bool:
        """Dispatch one message; False if it was rejected (it did not decode, or its handler
        refused it)."""
        decoded, pending = self._dispatch_typed(topic, payload)
        if pending is not None:
            self.spawn(pending, topic)
        return decoded

    # ------------------------------------------------------------------ the node's hooks

    def subscriptions(self) -> Iterable[tuple[str, int]]:
        self.intake.frame_topics = frozenset(self._newest_only)
        subs = [(pattern, 1) for pattern in self._raw_subs]
        for topic in self._subs:
            if topic in self._local_in or any(topic_matches(pattern, topic) for pattern in self._raw_subs):
                continue
            subs.append((topic, 1 if topic.endswith("/cmd") else 0))
        return subs

    def receiver(self) -> Receiver:
        return self

    def prepare(self) -> None:
        for warning in self._restore_warnings:
            log.warning("%s: %s", self.name, warning)
        self.warm_up()
        if self._own_process:  # standalone: the process is ours (a group sets it up once)
            prepare_process(self.config.process, self.name)

    def announce(self) -> None:
        self.publish_params()
        self.publish_status()
        for warning in self._restore_warnings:
            self.event("restore", warning, severity="warning")
        self._restore_warnings = []

    def serve_tasks(self) -> list[Coroutine[Any, Any, Any]]:
        return [self.background()]

    async def stopping(self) -> None:
        self.state = "stopping"
        await self.on_stop()

    async def run(self, install_signal_handlers: bool = True) -> None:
        """Connect, serve, reconnect with back-off until stopped; then stop gracefully.
        ``install_signal_handlers``: the process is this daemon's alone (its process settings
        are applied; a group of daemons sets them once, :func:`run_together`)."""
        self._own_process = install_signal_handlers
        await super().run(install_signal_handlers)


# ---------------------------------------------------------------------------- process, groups

LOCAL_LEAVES = ("frame", "setpoint")
"""The data-flow topics (``kb/<inst>/<service>/<leaf>``) that daemons of one process pass to
each other in process; commands, replies and status always go through the broker."""


def prepare_process(settings: ProcessSettings, who: str) -> None:
    """Once per process, before connecting: CPU affinity and scheduling (``ValueError`` if the
    system refuses), then freeze what start-up built out of the garbage collector's reach, so
    that its collections stay short and never scan the long-lived objects in the loop."""
    for line in apply_process_settings(settings):
        log.info("%s: process %s", who, line)
    gc.collect()
    gc.freeze()


def link_local(services: list[Service]) -> list[str]:
    """Let daemons of one process pass their frames and setpoints to each other directly.

    A topic ``kb/<inst>/<publisher>/<leaf>`` (leaf in :data:`LOCAL_LEAVES`) that another daemon
    of the group subscribes to is delivered to it in process, in the same call as the publish
    (the publisher's message still goes to the broker for everyone else), and that daemon no
    longer subscribes to it at the broker. Returns the links, ``"servo/setpoint -> current_source"``.
    """
    names = [svc.name for svc in services]
    if len(set(names)) != len(names):
        raise ValueError(f"a daemon may run only once per process: {', '.join(names)}")
    instruments = {svc.config.instrument for svc in services}
    if len(instruments) > 1:
        raise ValueError(f"daemons of one process must serve one instrument, got {sorted(instruments)}")
    links = []
    for pub in services:
        for leaf in LOCAL_LEAVES:
            topic = f"kb/{pub.config.instrument}/{pub.name}/{leaf}"
            for sub in services:
                if sub is not pub and topic in sub._subs and not sub._raw_subs:
                    pub._local_out.setdefault(topic, []).append(sub)
                    sub._local_in.add(topic)
                    links.append(f"{pub.name}/{leaf} -> {sub.name}")
    return links


async def run_together(services: list[Service]) -> None:
    """Run several daemons in this process on one event loop (``kibble service a,b,c``).

    Each keeps its own connection, status, last will, commands and parameters; their frames to
    each other pass in process (:func:`link_local`). SIGINT/SIGTERM stop them all. The process
    settings are the first daemon's.
    """
    if not services:
        raise ValueError("no daemons to run")
    for line in link_local(services):
        log.info("in process: %s", line)
    prepare_process(services[0].config.process, ",".join(s.name for s in services))
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for svc in services:
            svc.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_all)
    try:
        tasks = [asyncio.create_task(svc.run(install_signal_handlers=False)) for svc in services]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if (exc := task.exception()) is not None:  # one failed: stop the others cleanly, then raise
                stop_all()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise exc
        await asyncio.gather(*tasks)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
