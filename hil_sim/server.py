"""The HIL simulator on the MQTT bus: :class:`SimServer` (``kibble sim``).

The simulator is the hardware. It subscribes only to the ``hw/<device>`` actuator topics
(:class:`~kibble.bus_schema.messages.HwActuatorCommand`: DAC codes and relay states) and to its
control topic ``sim/cmd``; it publishes only raw sensor frames on ``hw/sensors``
(:class:`~kibble.bus_schema.messages.HwSensorFrame`), the ground truth on ``sim/truth``
(:class:`~kibble.bus_schema.messages.SimTruth`), events on ``sim/event``, replies, and a retained
status on ``sim/status`` (last will: offline). The device and channel tables are in
``hil_sim/README.md``, in :mod:`kibble.bus_schema.instruments` (the bus contract) and in
:mod:`kibble.hil_sim.devices` (with the simulator's DAC widths); the mapping of each plant to them
in :mod:`kibble.hil_sim.adapter`.

Clocks (``clock``):

- ``realtime``: frame k is integrated and published at ``t0 + k / rate_hz`` on the monotonic
  clock (drift-free schedule); the plant integrates the commands last received (zero-order
  hold), as hardware does. ``t0`` is when every device of ``expect`` has said hello: the plant
  does not run (an EFB link falls ~0.1 mm in 5 s unheld) while the daemons are still starting.
  Within a receive batch only the newest command per device is applied.
- ``lockstep``: the simulator publishes frame k and integrates frame k + 1 only when every
  registered device has answered with a command tagged ``frame == k``, or when
  ``lockstep_timeout_s`` of wall time has passed (a miss per missing device; after
  ``drop_after_misses`` consecutive misses the device is unregistered until it speaks again).
  Same seed, same parameters and the same commands give bit-identical frames.

A lockstep device is registered by its first command (any frame tag, ``-1`` for "hello") or by
the ``register`` control command; frame 0 is published once every device of ``expect`` (and at
least one device) is registered. The event-driven ``mass_lift`` device is never waited for.

A command that does not decode, names another device than its topic, has the wrong number of
codes or relays, or a code outside its DAC range is rejected: the last good command stays held,
``rejected`` is counted and an event of kind ``rejected`` goes out on ``sim/event``
(rate-limited). A rejected command whose device and frame tag could be read still counts as the
device's lockstep answer (the loop goes on with the held command).

Timing of the frames: frame k holds the commands answered for frame k - 1 over one frame
period and is sampled at its end, ``sim_time_s = (k + 1) / rate_hz`` in lockstep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any, Callable, Coroutine, Mapping, Sequence

import aiomqtt
from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import (
    Command, HwActuatorCommand, Message, Reply, SimTruth, State, Status, Timing,
)
from kibble.bus_schema.node import BusNode
from kibble.bus_schema.realtime import FrameIntake, FrameTiming, LoopTimer, saturating_add
from kibble.bus_schema.transport import DEFAULT_BROKER, corked, publish_now

from .adapter import PLANT_COMMANDS, PLANTS, CommandArgs, adapter_for
from .clock import LatencyTracker, LockstepGate, RealtimeSchedule
from .devices import DeviceSpec
from .errors import ActuatorError, PlantError
from .params import frame_overrides

__all__ = ["SimServer", "CLOCKS", "SERVICE_NAME", "REALTIME_TRUTH_HZ"]

SERVICE_NAME = "sim"
"""The simulator's name on the bus: ``kb/<inst>/sim/{cmd,reply,event,status,truth}``."""
REALTIME_TRUTH_HZ = 100.0
"""Default rate of ``sim/truth`` on the realtime clock: enough for a 0.1 Hz null figure, and
no daemon pays for it (the tests and benchmarks that read it do)."""
CLOCKS = ("realtime", "lockstep")


class _SimReceiver:
    """The simulator's side of :func:`~kibble.bus_schema.transport.deliver_directly`.

    In realtime each receive batch is conflated to the newest command per device (the hardware
    holds the last command it got, so the older ones of a batch would be overwritten unseen
    anyway); in lockstep every command is an answer and is handled in order.
    """

    __slots__ = ("sim", "intake", "messages", "skipped_at")

    def __init__(self, sim: "SimServer") -> None:
        self.sim = sim
        self.intake = sim.intake
        self.messages = 0
        self.skipped_at = 0

    def message(self, topic: str, payload: bytes) -> None:
        self.messages += 1
        if self.sim.clock == "realtime" and self.intake.offer(topic, payload):
            return
        self.sim._on_message(topic, payload)

    def batch_begin(self) -> None:
        self.messages = 0
        self.skipped_at = self.intake.skipped
        self.sim.timing.batch_begin()

    def batch_end(self) -> None:
        for topic, payloads in self.intake.take():
            for i in range(len(payloads) - 1, -1, -1):  # newest first; older ones only if it is bad
                if self.sim._on_message(topic, payloads[i]):
                    self.intake.skip(i)
                    break

    def batch_flushed(self) -> None:
        self.sim.timing.batch_end(self.messages, self.intake.skipped - self.skipped_at)


class SimServer(BusNode[Callable[[CommandArgs], dict[str, Any]]]):
    """The HIL simulator as a bus participant (a :class:`~kibble.bus_schema.node.BusNode`).

    ::

        sim = SimServer("nist4", "lockstep", rate_hz=1000, seed=1, broker_url=url,
                        instrument="nist4", expect=("main_source",))
        task = asyncio.create_task(sim.run(install_signal_handlers=False))
        await sim.connected.wait()
        ...
        sim.stop(); await task

    ``params``: plant parameter overrides (``{dotted.name: value}``, see
    :func:`load_overrides_file`); ``rate_hz`` sets ``sim.frame_rate_hz``. ``expect``: lockstep
    devices that must be registered before frame 0. ``truth_every``: publish ``sim/truth``
    every n-th frame (0: never; None: every frame in lockstep, at most :data:`REALTIME_TRUTH_HZ`
    in realtime). ``max_frames``: stop after publishing that many frames (and,
    in lockstep, collecting the answers to the last one); 0 runs until :meth:`stop`.
    """

    name = SERVICE_NAME

    def __init__(self, model: str = "nist4", clock: str = "lockstep", rate_hz: float = 1000.0,
                 seed: int = 0, params: Mapping[str, Any] | None = None,
                 broker_url: str = DEFAULT_BROKER, instrument: str = "nist4",
                 expect: Sequence[str] = (), lockstep_timeout_s: float = 1.0,
                 drop_after_misses: int = 3, truth_every: int | None = None, max_frames: int = 0,
                 heartbeat_s: float = 1.0, client_id: str | None = None,
                 reconnect_min_s: float = 0.1, reconnect_max_s: float = 5.0,
                 noise: str = "published") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r}; one of {', '.join(CLOCKS)}")
        if truth_every is None:
            truth_every = 1 if clock == "lockstep" else max(1, int(round(rate_hz / REALTIME_TRUTH_HZ)))
        overrides = frame_overrides(model, rate_hz, params)
        super().__init__(instrument, broker_url, client_id or f"kibble-{instrument}-sim-{os.getpid()}",
                         heartbeat_s=heartbeat_s, reconnect_min_s=reconnect_min_s,
                         reconnect_max_s=reconnect_max_s)
        if not lockstep_timeout_s > 0:
            raise ValueError(f"lockstep timeout must be > 0 s, got {lockstep_timeout_s!r}")
        for name, value in (("drop_after_misses", drop_after_misses), ("truth_every", truth_every),
                            ("max_frames", max_frames)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.model = model
        self.clock = clock
        self.rate_hz = float(rate_hz)
        self.seed = seed
        self.plant = PLANTS[model](overrides, seed=seed, noise=noise)
        self.adapter = adapter_for(self.plant)
        self.devices = self.adapter.devices
        for device in expect:
            spec = self.devices.get(device)
            if spec is None or not spec.lockstep:
                known = ", ".join(d for d, s in self.devices.items() if s.lockstep)
                raise ValueError(f"cannot expect device {device!r}: the {model} lockstep devices "
                                 f"are {known}")
        self.expect = frozenset(expect)
        self.lockstep_timeout_s = float(lockstep_timeout_s)
        self.truth_every = truth_every
        self.max_frames = max_frames

        self.t_sensors = self.topics.hw("sensors")
        self.t_truth = self.topics.sim("truth")
        self._device_topics = {self.topics.hw(name): spec for name, spec in self.devices.items()}

        self.frame = -1
        """Index of the last published sensor frame (-1: none yet)."""
        self.paused = False
        self.gate = LockstepGate(drop_after=drop_after_misses)
        self.latency = LatencyTracker()
        self.schedule = RealtimeSchedule(1.0 / self.rate_hz)
        self.timing = FrameTiming(1.0 / self.rate_hz)
        """CPU per frame (receiving the commands and integrating, publishing the frame) and
        the age of the commands applied."""
        self.intake = FrameIntake(self._device_topics)
        self._seen: set[str] = set()
        """Realtime: the devices heard from (their hello or any command)."""
        self._connected_devices = asyncio.Event()
        """Realtime: set once every device of ``expect`` has been heard from (at once when
        ``expect`` is empty), when frame 0 goes out."""
        if not self.expect:
            self._connected_devices.set()
        self.counters.update({"frames_out": 0, "frames_in": 0, "misses": 0, "dropped": 0,
                              "stale_tags": 0, "late": 0, "slips": 0, "plant_errors": 0})
        self._resume = asyncio.Event()
        self._resume.set()
        self._started = False
        self._gate_open = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_ok = dataclasses.replace(self.adapter.held)
        self._frame_seq = 0
        self._truth_seq = 0
        self.session = int(time.time())
        self.loop_timer = LoopTimer()
        """Period of the published sensor frames."""
        self._last_timing = Timing()
        self._rate_mark = (time.monotonic(), 0)
        self._steps_per_s = 0.0
        self.commands.update({
            "register": self._cmd_register, "unregister": self._cmd_unregister,
            "pause": self._cmd_pause, "resume": self._cmd_resume, "stats": self._cmd_stats,
            **{name: getattr(self.adapter, name) for name in PLANT_COMMANDS}})

    # ------------------------------------------------------------------ the node's hooks

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(topic, 0) for topic in self._device_topics]

    def receiver(self) -> _SimReceiver:
        return _SimReceiver(self)

    async def on_connected(self) -> None:
        if self.clock == "lockstep":
            if self._started and self._gate_open:
                self._arm_timer(self.frame)  # the frame may have been lost with the connection
            else:
                self._lockstep_next()

    def serve_tasks(self) -> list[Coroutine[Any, Any, Any]]:
        return [self._realtime()] if self.clock == "realtime" else []

    async def on_disconnect(self) -> None:
        self._cancel_timer()

    async def stopping(self) -> None:
        self._cancel_timer()

    def call_command(self, handler: Callable[[CommandArgs], dict[str, Any]], cmd: Command) -> dict[str, Any]:
        args = CommandArgs(cmd.command, cmd.args)
        result = handler(args)
        args.check_unused()
        return {"frame": self.frame, **result}

    def command_done(self, cmd: Command, reply: Reply) -> None:
        if reply.ok and cmd.command != "stats":
            self.event("control", f"{cmd.command} {dict(cmd.args)} from {cmd.client_id or '?'} "
                                  f"after frame {self.frame}",
                       data={"command": cmd.command, "frame": self.frame})
        super().command_done(cmd, reply)

    def _on_message(self, topic: str, payload: bytes) -> bool:
        """Every incoming message, from the socket-readable callback through
        :class:`_SimReceiver`: the ``hw/<device>`` commands and ``sim/cmd``. True if it was a
        device command that was applied. A bug met here is reported (``handler_error``) and
        the simulator goes on."""
        try:
            spec = self._device_topics.get(topic)
            if spec is not None:
                return self._on_hw(spec, topic, payload)
            if topic == self._t_cmd:
                self.command_received(payload)
        except Exception as exc:
            self.handler_failed(topic, exc)
        return False

    # ------------------------------------------------------------------ publishing

    def _stamp(self, msg: Message, seq: int) -> bytes:
        msg.seq = seq
        msg.t_mono_s = time.monotonic()
        msg.t_utc_s = time.time()
        return encode(msg)

    # ------------------------------------------------------------------ stepping

    def _step_and_publish(self) -> bool:
        """Integrate one frame with the held commands and publish it; False if the plant
        refused (the simulation is then paused)."""
        adapter = self.adapter
        k = self.frame + 1
        want_truth = self.truth_every and k % self.truth_every == 0
        try:
            block = adapter.run_held(1, record_truth=bool(want_truth))
        except ActuatorError as exc:
            # the device checks mirror the plant's; should one differ, fall back to the last
            # command set the plant accepted and say so
            self._reject_held(exc)
            block = adapter.run_held(1, record_truth=bool(want_truth))
        except PlantError as exc:
            self.counters["plant_errors"] += 1
            self.event("plant_error", f"frame {k}: {exc}; simulation paused", severity="alarm",
                       data={"frame": k})
            self._set_paused(True)
            return False
        self._last_ok = dataclasses.replace(adapter.held)
        self.frame = k
        client = self._client
        if client is None:
            self._publish_frame(k, block, want_truth, None)
        else:
            with corked(client):  # sensors and truth leave in one write
                self._publish_frame(k, block, want_truth, client)
        return True

    def _publish_frame(self, k: int, block: Any, want_truth: Any,
                       client: aiomqtt.Client | None) -> None:
        adapter = self.adapter
        self._frame_seq += 1
        msg = adapter.sensor_frame(k, block.sensors[0].tolist())
        payload = self._stamp(msg, self._frame_seq)
        t_pub = msg.t_mono_s
        if client is None or not publish_now(client, self.t_sensors, payload):
            self.counters["publish_failed"] += 1
        self.latency.published(k, t_pub)
        self.counters["frames_out"] += 1
        self.loop_timer.tick(t_pub)
        if want_truth:
            row = block.truth[0]
            values = {name: float(row[i]) + off for name, i, off in adapter.truth_columns}
            self._truth_seq += 1
            truth = SimTruth(frame=k, sim_time_s=msg.sim_time_s, model=self.model, values=values)
            if client is None or not publish_now(client, self.t_truth, self._stamp(truth, self._truth_seq)):
                self.counters["publish_failed"] += 1

    def _reject_held(self, exc: ActuatorError) -> None:
        self.counters["rejected"] += 1
        self.event("rejected", f"plant refused the held commands ({exc}); reverted to the last "
                               "accepted set", severity="warning",
                   data={"channel": exc.channel, "reason": str(exc), "frame": self.frame})
        self.adapter.held = dataclasses.replace(self._last_ok)

    # ---- realtime

    async def _realtime(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._started:  # the plant starts when the devices of ``expect`` are connected
            await self._connected_devices.wait()
            self._started = True
            self.event("started", f"realtime clock started with {sorted(self._seen)}",
                       data={"devices": sorted(self._seen)})
        sched = self.schedule
        sched.start(loop.time())
        while True:
            if self.paused:
                await self._resume.wait()
                sched.start(loop.time())
            delay = sched.deadline_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.paused:
                continue
            sched.frame_started(loop.time())
            self.counters["late"], self.counters["slips"] = sched.late, sched.slips
            self.timing.batch_begin()
            stepped = self._step_and_publish()
            self.timing.batch_end(0, 0)
            if not stepped:
                continue
            self.timing.frame_done()
            if self.max_frames and self.counters["frames_out"] >= self.max_frames:
                self._stop.set()
                return

    # ---- lockstep

    def _lockstep_next(self) -> None:
        """Publish the next lockstep frame if allowed (started, not paused, someone to wait for)."""
        if self.clock != "lockstep" or self._client is None:
            return
        if not self._started:
            if not self.gate.registered or not self.expect <= self.gate.registered:
                return
            self._started = True
            self.event("started", f"lockstep started with {sorted(self.gate.registered)}",
                       data={"devices": sorted(self.gate.registered)})
        self._gate_open = False
        if self.paused or not self.gate.registered:
            return
        if self.max_frames and self.counters["frames_out"] >= self.max_frames:
            self._stop.set()
            return
        if not self._step_and_publish():
            return
        self.timing.frame_done()
        self.gate.open(self.frame)
        self._gate_open = True
        self._arm_timer(self.frame)

    def _arm_timer(self, frame: int) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(
            self.lockstep_timeout_s, self._on_timeout, frame)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self, frame: int) -> None:
        self._timer = None
        if not self._gate_open or self.gate.frame != frame:
            return
        missed, dropped = self.gate.timeout()
        self.counters["misses"] += len(missed)
        self.counters["dropped"] += len(dropped)
        self.event("miss", f"frame {frame}: no answer within {self.lockstep_timeout_s} s from "
                           f"{', '.join(missed)}", severity="warning",
                   data={"frame": frame, "devices": missed})
        for device in dropped:
            self.event("dropped", f"{device} unregistered after {self.gate.drop_after} "
                                  "consecutive misses (its next command registers it again)",
                       severity="warning", data={"device": device, "frame": frame})
        self._lockstep_next()

    # ------------------------------------------------------------------ hardware commands

    def _reject(self, device: str, topic: str, reason: str, frame: int | None) -> None:
        self.reject(topic, reason, data={"device": device, "frame": -1 if frame is None else frame,
                                         "sim_frame": self.frame})

    def _on_hw(self, spec: DeviceSpec, topic: str, payload: bytes) -> bool:
        """One device command; True if applied."""
        t_rx = time.monotonic()
        try:
            msg = decode(payload, HwActuatorCommand)
        except DecodeError as exc:
            self._reject(spec.name, topic, str(exc), None)
            return False
        if msg.device != spec.name:
            self._reject(spec.name, topic, f"payload names device {msg.device!r}, topic is "
                                           f"{spec.name!r}", msg.frame)
            return False
        self.timing.acted(msg.t_mono_s, t_rx)
        reason = spec.check(msg.codes, msg.relays)
        if reason is None:
            self.adapter.apply(spec.name, msg.codes, msg.relays)
            self.counters["frames_in"] += 1
        else:
            self._reject(spec.name, topic, reason, msg.frame)
        self.latency.answered(spec.name, msg.frame, t_rx)
        if self.clock != "lockstep" or not spec.lockstep:
            if spec.lockstep and spec.name not in self._seen:
                self._seen.add(spec.name)
                if self.expect <= self._seen:
                    self._connected_devices.set()
            return reason is None
        if 0 <= msg.frame < self.frame:
            self.counters["stale_tags"] += 1
        if self.gate.register(spec.name):
            self.event("registered", f"{spec.name} registered (lockstep waits for it from frame "
                                     f"{self.frame + 1})", data={"device": spec.name})
            if not self._started or not self._gate_open:
                self._lockstep_next()
        elif self._gate_open and self.gate.answer(spec.name, msg.frame, msg.hold_frames):
            self._cancel_timer()
            self._lockstep_next()
        return reason is None

    # ------------------------------------------------------------------ control commands

    def _lockstep_devices(self, args: CommandArgs, name: str) -> list[str]:
        devices = args.names(name)
        for device in devices:
            spec = self.devices.get(device)
            if spec is None or not spec.lockstep:
                known = ", ".join(d for d, s in self.devices.items() if s.lockstep)
                raise ValueError(f"{args.command}: {device!r} is not a lockstep device of the "
                                 f"{self.model} model ({known})")
        return devices

    def _cmd_register(self, args: CommandArgs) -> dict[str, Any]:
        devices = self._lockstep_devices(args, "devices")
        new = [d for d in devices if self.gate.register(d)]
        if self.clock == "lockstep" and new and (not self._started or not self._gate_open):
            self._lockstep_next()
        return {"registered": sorted(self.gate.registered), "new": new}

    def _cmd_unregister(self, args: CommandArgs) -> dict[str, Any]:
        devices = self._lockstep_devices(args, "devices")
        gone = [d for d in devices if self.gate.unregister(d)]
        if self._gate_open and self.gate.complete:
            self._cancel_timer()
            self._lockstep_next()
        return {"registered": sorted(self.gate.registered), "removed": gone}

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if paused:
            self._resume.clear()
        else:
            self._resume.set()

    def _cmd_pause(self, args: CommandArgs) -> dict[str, Any]:
        self._set_paused(True)
        return {"paused": True}

    def _cmd_resume(self, args: CommandArgs) -> dict[str, Any]:
        self._set_paused(False)
        if self.clock == "lockstep" and not self._gate_open:
            self._lockstep_next()
        return {"paused": False}

    def _cmd_stats(self, args: CommandArgs) -> dict[str, Any]:
        reset = args.get("reset", bool, False)
        lat = {d: self.latency.summary(d).as_dict() for d in self.latency.devices()}
        total = self.latency.summary()
        result = {
            "model": self.model, "clock": self.clock, "rate_hz": self.rate_hz,
            "sim_time_s": (self.frame + 1) / self.rate_hz, "paused": self.paused,
            "registered": sorted(self.gate.registered), "counters": dict(self.counters),
            "misses_by_device": dict(self.gate.misses), "latency": lat,
            "latency_p50_ms": total.p50_ms, "latency_p99_ms": total.p99_ms,
            "latency_n": total.n, "steps_per_s": self._steps_per_s,
            "held": self.adapter.held_table()}
        if reset:
            self.latency.reset()
        return result

    # ------------------------------------------------------------------ status

    def status(self, online: bool = True, interval: bool = False) -> Status:
        mean, jitter, peak = self.loop_timer.snapshot() if interval else (0.0, 0.0, 0.0)
        now = time.monotonic()
        if interval:
            self._last_timing = self.timing.snapshot()
            t_mark, f_mark = self._rate_mark
            if now > t_mark:
                self._steps_per_s = (self.counters["frames_out"] - f_mark) / (now - t_mark)
            self._rate_mark = (now, self.counters["frames_out"])
        lat = self.latency.summary()
        state: State
        if not online:
            state = "offline"
        elif self.paused or (self.clock == "lockstep" and not self._gate_open):
            state = "idle"
        else:
            state = "running"
        self.counters["commands_skipped"] = self.intake.skipped
        return Status(
            service=SERVICE_NAME, state=state, online=online, session=self.session,
            client_id=self.client_id, heartbeat=self.heartbeats,
            uptime_s=now - self.t_start_s,
            counters={k: saturating_add(v, 0) for k, v in self.counters.items()},
            loop_period_mean_s=mean, loop_period_jitter_s=jitter, loop_period_max_s=peak,
            loop_overruns=self.timing.overruns, timing=self._last_timing if online else Timing(),
            detail={"model": self.model, "clock": self.clock, "rate_hz": self.rate_hz,
                    "seed": self.seed, "frame": self.frame, "paused": self.paused,
                    "registered": ",".join(sorted(self.gate.registered)),
                    "steps_per_s": self._steps_per_s, "latency_p50_ms": lat.p50_ms,
                    "latency_p99_ms": lat.p99_ms, "latency_n": lat.n})
