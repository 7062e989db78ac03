"""Base of the actuator daemons (current_source, damping, theta_z): safety on the frame clock.

An :class:`ActuatorService` owns an :class:`~kibble.services.runtime.safety.ActuatorGuard` and one or
more hardware devices behind an :class:`ActuatorDriver`. The runtime delivers:

- the hardware sensor frame ``hw/sensors`` as the *frame clock*: frame k of the hardware (the
  simulator's lockstep or realtime clock). When the service's own input has gone stale, the
  clock alone drives the guard (hold, then ramp to zero) and answers frame k, so a dead
  upstream service never leaves an actuator at its last value; in lockstep, once a frame has
  waited :data:`LOCKSTEP_ANSWER_S` of wall time for its input, it and the frames after it are
  answered from the clock until input comes, so a dead upstream never stalls a lockstep run;
- ``daq/frame``: the coil motion for the excess-motion watchdog and the readings of the
  interlocks (pressure for HV), and the input of the services that control from it;
- the subclass's own input, which calls :meth:`ActuatorService.drive`.

Frame tags are checked, not trusted (:class:`~kibble.bus_schema.realtime.FrameClock`): a
clock frame that goes back within its session or jumps further than the clock allows, a DAQ
frame that does not advance, an input that leads the clock by more than the clock may lag its
own stream: each is rejected (counted, an event) and moves neither the stale clock nor the
watchdog; an input a little ahead counts as of the clock. The guard runs
on the clock's own count, which no tag can stop or rush; a new hardware session (a simulator
restart) continues it. In realtime a frame clock that stops (no frame accepted for
``stale_after_s`` of wall time, whatever the tags said) is stale input: the guard then runs on
the wall clock (hold, then ramp to zero) until frames come again.

Commands: ``arm`` (refused while an interlock holds), ``disarm``, ``reset`` (clear a trip),
plus the runtime's ``param.*``. An interlock that engages while armed trips the guard.
Every guard transition is published as an event and in the status ``detail``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any, Callable, Protocol, Sequence

import msgspec
import numpy as np

from kibble.bus_schema.messages import Command, DaqFrame, HwActuatorCommand, HwSensorFrame
from kibble.bus_schema.realtime import SLACK_FRAMES, FrameClock
from kibble.bus_schema.units import renamed_to
from kibble.services.runtime.service import Service, ServiceConfig, command
from kibble.services.runtime.safety import ActuatorGuard, GuardConfig, GuardState

HELLO_AFTER_S = 1.0
"""With no hardware frame for this long (wall clock), the actuator says hello again (frame -1,
its present outputs): a lockstep simulator that restarted knows only the devices that speak to
it, and waits for them before its first frame."""
LOCKSTEP_ANSWER_S = 0.6
"""Lockstep: a frame that has waited this long (wall clock) for its input, with no input in
that time, finds the upstream silent: it and every frame after it until input comes are
answered from the clock, as frames of stale input are. A live but slow upstream (a servo
restarted under load took over 0.2 s for its first frame) keeps the simulator waiting for it,
as it should; a dead one costs the run no miss: this is inside the simulator's lockstep timeout
(1 s by default) with the watch's period (a quarter of it) to spare. The one wall-clock time of
an actuator in lockstep: what the guard does with the frames still counts frames."""


class ActuatorDriver(Protocol):
    """Writes one frame of raw outputs to one hardware device."""

    def write(self, frame: int, codes: Sequence[int], relays: Sequence[bool]) -> None: ...


class BusDriver:
    """The simulator's (or a bus-attached rack's) device: ``HwActuatorCommand`` on ``hw/<device>``.

    A command written at frame k of a loop decimated by n answers the frames up to the end of
    its loop period (``hold_frames``), so a lockstep simulator does not wait for the frames in
    between.
    """

    def __init__(self, service: "ActuatorService", device: str) -> None:
        self.service = service
        self.device = device
        self.topic = service.topics.hw(device)

    def write(self, frame: int, codes: Sequence[int], relays: Sequence[bool]) -> None:
        n = self.service.decimation
        hold = n - frame % n if frame >= 0 else 1
        self.service.publish(self.topic, HwActuatorCommand(
            frame=frame, device=self.device, codes=list(codes), relays=list(relays),
            hold_frames=hold))
        self.service.counters["frames_out"] += 1


def typed_settings(settings: dict[str, Any], kind: type[msgspec.Struct], service: str) -> Any:
    """Validate a service's ``[settings]`` table into ``kind``; ``ValueError`` saying what is wrong
    (a setting under a name since renamed: its new name)."""
    fields = {f.name for f in msgspec.structs.fields(kind)}
    for name in settings:
        new = renamed_to(name)
        if name not in fields and new in fields:
            raise ValueError(f"{service} settings: {name!r} is called {new!r} now")
    try:
        return msgspec.convert(settings, kind)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{service} settings: {exc}") from None


class ActuatorService(Service):
    """Frame clock, watchdog and guard plumbing; subclasses implement :meth:`write_outputs`.

    Subclasses build their guard with :meth:`make_guard` in ``setup`` (after calling this
    class's ``setup``), call :meth:`drive` with each fresh request, and implement
    :meth:`watch_motion` (the watched DOF of a DAQ frame) and :meth:`write_outputs` (guarded
    outputs to the devices).
    """

    name = "actuator"

    def __init__(self, config: ServiceConfig | None = None) -> None:
        self.guard: ActuatorGuard | None = None
        self.clock = FrameClock(1e-3, realtime=True)
        """The hardware frame clock (:meth:`make_guard` sets its period). Ticks (loop periods)
        below are counted on its local count, ``(tag + clock.offset) // decimation``."""
        self.decimation = 1
        """The loop acts on every n-th frame (its own rate: frame rate / n); set before
        :meth:`make_guard`."""
        self.stale_ticks = 1
        self.interlock_reason: str | None = None
        self.last_tick = -1
        """The last tick answered."""
        self.last_input_tick = -1
        self.last_input_frame = -1
        self._control_tick = -1
        self._daq_local = -1
        """Local count of the last DAQ frame taken (the watchdog's clock)."""
        self._daq_frame = -1
        self._input_t_s = -math.inf
        """When the last input was taken (monotonic s)."""
        self._upstream_silent = False
        """Lockstep: no input for :data:`LOCKSTEP_ANSWER_S`: the clock answers every frame
        without its input (set by :meth:`watch_clock`, cleared by the next input)."""
        self._too_old = False
        self._clock_stopped = False
        self._hello_t_s = -math.inf
        """When the last hello went out (monotonic s)."""
        self._lockstep = False
        super().__init__(config)

    @property
    def last_frame(self) -> int:
        """The tag of the last hardware frame accepted (-1: none yet)."""
        return self.clock.frame

    # ---------------------------------------------------------------- subclass interface

    @staticmethod
    def decimation_for(frame_rate_hz: float, loop_rate_hz: float) -> int:
        """Frames per loop period for a loop meant to run at ``loop_rate_hz`` (at least 1)."""
        if not (frame_rate_hz > 0 and loop_rate_hz > 0):
            raise ValueError(f"rates must be > 0, got frame {frame_rate_hz} Hz, loop {loop_rate_hz} Hz")
        return max(1, int(round(frame_rate_hz / loop_rate_hz)))

    def make_guard(self, config: GuardConfig) -> None:
        """Build the guard; ``config.frame_period_s`` is the frame period, and the guard runs
        once per loop period (``decimation`` frames)."""
        self.frame_clock(self.topics.hw("sensors"), config.frame_period_s)
        self._lockstep = self.config.clock == "lockstep"
        self.clock = FrameClock(config.frame_period_s, realtime=not self._lockstep,
                                lockstep_device=True, slack_frames=SLACK_FRAMES * self.decimation,
                                align=self.decimation)
        config = dataclasses.replace(config, frame_period_s=config.frame_period_s * self.decimation)
        self.guard = ActuatorGuard(config)
        self.stale_ticks = max(1, int(round(config.stale_after_s / config.frame_period_s)))
        """Loop periods without a fresh input after which the clock alone drives the guard."""

    def watch_motion(self, frame: DaqFrame) -> Sequence[float]:
        """The watched DOF of a DAQ frame, in the guard's ``watch_names`` order."""
        return ()

    def interlock(self, frame: DaqFrame) -> str | None:
        """Why the outputs must not be live now (e.g. pressure too high for HV), or None."""
        return None

    def write_outputs(self, frame: int, outputs: np.ndarray) -> None:
        """Convert guarded physical outputs to codes and write them to the devices."""
        raise NotImplementedError

    # ---------------------------------------------------------------- runtime wiring

    def setup(self) -> None:
        self.subscribe(self.topics.hw("sensors"), HwSensorFrame, self.on_clock)
        self.subscribe(self.topics.frame("daq"), DaqFrame, self.take_daq_frame)

    def on_clock(self, sensors: HwSensorFrame) -> None:
        """Hardware frame k: if our input is stale (or, in lockstep, silent), the guard alone
        sets (and answers) frame k."""
        clock = self.clock
        why = clock.advance(sensors.frame, sensors.session, sensors.t_mono_s, time.monotonic())
        if why is not None:
            self.reject(self.topics.hw("sensors"), why)
            return
        self._clock_stopped = False
        if clock.step == 0:
            self.event("frame_clock", clock.note, data={"frame": clock.frame,
                                                        "session": clock.session})
        tick = clock.local // self.decimation
        if tick <= self.last_tick:
            return
        if tick - self.last_input_tick > self.stale_ticks or self._upstream_silent:
            self._apply(sensors.frame, tick)

    def new_tick(self, frame: int) -> bool:
        """Whether the control path should act on ``frame``: True once per loop period (every
        frame, undecimated). Consumes the period: a second call for it says False."""
        clock = self.clock
        local = frame + clock.offset
        if local // self.decimation <= self._control_tick:
            return False
        self._control_tick = clock.cap(local) // self.decimation
        return True

    def take_daq_frame(self, frame: DaqFrame) -> None:
        """A DAQ frame from the bus: taken (:meth:`on_daq_frame`) only if its tag advances and
        does not lead the hardware clock, so that no tag moves the watchdog's clock."""
        clock = self.clock
        why = clock.check_input(frame.frame)
        local = frame.frame + clock.offset
        if why is None and local <= self._daq_local:
            why = f"frame {frame.frame} is not after the last DAQ frame taken ({self._daq_frame})"
        if why is not None:
            self.reject(self.topics.frame("daq"), why)
            return
        self._daq_local, self._daq_frame = clock.cap(local), frame.frame
        self.on_daq_frame(frame)

    def on_daq_frame(self, frame: DaqFrame) -> None:
        """Watchdog and interlocks, once per loop period; subclasses that control from the
        DAQ frame act only when :meth:`new_tick` said so (check it before calling this)."""
        assert self.guard is not None
        reason = self.guard.observe(self.watch_motion(frame))
        self.interlock_reason = self.interlock(frame)
        if reason is None and self.interlock_reason is not None and self.guard.state == "armed":
            reason = f"interlock: {self.interlock_reason}"
            self.guard.trip(reason)
        if reason is not None:  # the retained status first: whoever hears of the trip finds it
            self.set_state("tripped")
            self.event("trip", f"tripped: {reason}; ramping to safe, reset to clear",
                       severity="alarm", data={"reason": reason, "frame": frame.frame},
                       rate_limited=False)

    def drive(self, frame: int, request: Sequence[float] | np.ndarray | None,
              taken: Callable[[], None] | None = None) -> None:
        """A fresh request for ``frame`` (None: the input arrived but asks for nothing new).
        ``taken`` commits what else the input asks for (a relay, a reference); it is called
        once the input is accepted, before the outputs are written, so a refused input changes
        nothing.

        In realtime, an input older than the age limit when it arrives is not taken: the loop
        cannot keep up, and the guard then holds and goes safe exactly as for missing input.
        An input tagged far ahead of the hardware clock, or older than the last one taken, is
        rejected, and one a little ahead counts as of the clock (plus the slack): no tag makes
        the input look fresh for longer than it is."""
        assert self.guard is not None
        if self.frame_too_old:
            self.counters["too_old"] += 1
            if not self._too_old:
                self._too_old = True
                self.event("too_old", f"input for frame {frame} is {self.frame_age_s * 1e3:.1f} ms "
                           f"old (limit {self.max_frame_age_s * 1e3:.1f} ms): not applied; this "
                           "daemon cannot keep up with the frame rate", severity="alarm",
                           data={"frame": frame, "age_s": self.frame_age_s})
            return
        self._too_old = False
        clock = self.clock
        why = clock.check_input(frame)
        local = frame + clock.offset
        if why is None and local // self.decimation < self.last_input_tick:
            why = f"frame {frame} is older than the last input taken (frame {self.last_input_frame})"
        if why is not None:
            self.reject(f"{self.name} input", why)
            return
        tick = clock.cap(local) // self.decimation  # fresh as of the clock at the latest
        if request is not None:
            try:
                self.guard.request(tick, request)
            except ValueError as exc:
                self.reject(f"{self.name} request", str(exc))
                return
        self.last_input_tick = tick
        self.last_input_frame = frame
        self._input_t_s = time.monotonic()
        self._upstream_silent = False
        if taken is not None:
            taken()
        self._apply(frame, tick)

    def _apply(self, frame: int, tick: int, since: int | None = None) -> None:
        """The guard's outputs for ``tick`` (after those of the ticks from ``since``, when the
        wall clock ran it alone), written tagged ``frame``."""
        assert self.guard is not None
        guard = self.guard
        was_stale = guard.stale
        before = guard.state
        if tick > self.last_tick:
            self.last_tick = tick
        if since is not None:
            for t in range(since, tick):
                guard.output(t)
        outputs = guard.output(tick)
        self.set_state(self._state_name())  # before the events: they find the status already new
        if guard.stale and not was_stale:
            self.event("stale", f"input stale at frame {frame}: holding, then ramping to zero",
                       severity="warning", data={"frame": frame})
        if guard.state != before:
            self.event("safe", f"{before} -> {guard.state} at frame {frame} (stale input)",
                       severity="alarm", data={"frame": frame})
        self.write_outputs(frame, outputs)
        self.loop_timer.tick(time.monotonic())

    def watch_clock(self, now_s: float) -> None:
        """The clock's wall-clock side (run every few milliseconds while connected).

        Lockstep: a frame that has waited :data:`LOCKSTEP_ANSWER_S` for its input is answered
        from the clock, and so is every frame after it until input comes (not before the first
        input: an upstream that is starting is waited for, as the simulator waits). Realtime:
        when no frame has been accepted for ``stale_after_s``, the clock's count runs on the
        wall clock and the guard with it (the input goes stale, is held, then ramped to zero),
        until frames come again."""
        clock, guard = self.clock, self.guard
        if clock.frame < 0 or guard is None:
            return
        n = self.decimation
        if self._lockstep:
            tick = clock.local // n
            if (tick <= self.last_tick or self.last_input_tick < 0
                    or now_s - max(self._input_t_s, clock.t_s) <= LOCKSTEP_ANSWER_S):
                return  # (before the first input the upstream is starting, not silent)
            if not self._upstream_silent:
                self._upstream_silent = True
                self.event("upstream_silent", f"frame {clock.frame} waited "
                           f"{LOCKSTEP_ANSWER_S * 1e3:.0f} ms for its input (the last for frame "
                           f"{self.last_input_frame}): answering the hardware clock alone until "
                           "input comes", severity="warning", data={"frame": clock.frame})
            self._apply(clock.frame, tick)
            return
        silent_s = now_s - clock.t_s
        if silent_s <= guard.config.stale_after_s:
            return
        if not self._clock_stopped:
            self._clock_stopped = True
            self.event("clock_stopped", f"no hardware frame accepted for {silent_s * 1e3:.0f} ms "
                       f"after frame {clock.frame}: running the guard on the wall clock",
                       severity="warning", data={"frame": clock.frame, "silent_s": silent_s})
        target = clock.frame + clock.offset + n * int(silent_s / guard.config.frame_period_s)
        if target > clock.local:
            clock.stall(target - clock.local)
            if target // n > self.last_tick and guard.live:  # (safe at zero: nothing to write)
                self._apply(clock.frame, target // n, since=self.last_tick + 1)

    async def background(self) -> None:
        assert self.guard is not None
        period_s = LOCKSTEP_ANSWER_S / 4 if self._lockstep else self.guard.config.stale_after_s / 2
        while True:
            await asyncio.sleep(period_s)
            now_s = time.monotonic()
            self.watch_clock(now_s)
            if now_s - max(self.clock.t_s, self._hello_t_s) > HELLO_AFTER_S:
                self._hello(now_s)

    def _hello(self, now_s: float) -> None:
        assert self.guard is not None
        self._hello_t_s = now_s
        self.write_outputs(-1, self.guard.out.copy())

    def _state_name(self) -> GuardState:
        assert self.guard is not None
        return self.guard.state

    async def on_connected(self) -> None:
        """Say hello to the hardware (frame -1, the present outputs: zero at boot); this also
        registers the devices with a lockstep simulator. Its frames went on while we were away:
        the next one may be far ahead."""
        self.clock.rejoin()
        self._hello(time.monotonic())

    async def on_disconnect(self) -> None:
        """A lost broker is stale input: disarm (the outputs ramp down at the next frames); the
        state says so at once, so the status published on reconnecting is the guard's."""
        if self.guard is not None and self.guard.state == "armed":
            self.guard.disarm()
            self.set_state(self._state_name())

    async def on_stop(self) -> None:
        if self.guard is not None:
            self.guard.disarm()
            self._apply(self.last_frame, max(self.last_tick, self.clock.local // self.decimation))

    def status_detail(self) -> dict[str, Any]:
        g = self.guard
        if g is None:
            return {}
        detail: dict[str, Any] = {"guard": g.state, "stale": g.stale, "trip_reason": g.trip_reason,
                                  "frame": self.last_frame, "session": self.clock.session,
                                  "decimation": self.decimation}
        for name, value in zip(g.config.names, g.out):
            detail[name] = float(value)
        return detail

    # ---------------------------------------------------------------- commands

    @command("arm")
    def cmd_arm(self, cmd: Command) -> dict[str, Any]:
        assert self.guard is not None
        if self.interlock_reason is not None:
            raise ValueError(f"arm refused: {self.interlock_reason}")
        if self.last_input_tick < 0:
            raise ValueError("arm refused: no input received yet (armed now, the outputs would "
                             "go safe at once); arm once the frames flow")
        if self.clock.local // self.decimation - self.last_input_tick > self.stale_ticks:
            raise ValueError(f"arm refused: no fresh input (last at frame {self.last_input_frame}, "
                             f"the hardware is at frame {self.last_frame}): armed now, the outputs "
                             "would go safe at once")
        self.guard.arm()
        self.set_state("armed")
        return {"state": self.guard.state}

    @command("disarm")
    def cmd_disarm(self, cmd: Command) -> dict[str, Any]:
        assert self.guard is not None
        self.guard.disarm()
        self.set_state(self._state_name())
        return {"state": self.guard.state}

    @command("reset")
    def cmd_reset(self, cmd: Command) -> dict[str, Any]:
        assert self.guard is not None
        self.guard.reset()
        self.set_state(self._state_name())
        return {"state": self.guard.state}
