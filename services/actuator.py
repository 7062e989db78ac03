"""Base of the actuator daemons (current_source, damping, theta_z): safety on the frame clock.

An :class:`ActuatorService` owns an :class:`~kibble.services.safety.ActuatorGuard` and one or
more hardware devices behind an :class:`ActuatorDriver`. The runtime delivers:

- the hardware sensor frame ``hw/sensors`` as the *frame clock*: frame k of the hardware (the
  simulator's lockstep or realtime clock). When the service's own input has gone stale, the
  clock alone drives the guard (hold, then ramp to zero) and answers frame k, so a dead
  upstream service never leaves an actuator at its last value and never stalls a lockstep run;
- ``daq/frame``: the coil motion for the excess-motion watchdog and the readings of the
  interlocks (pressure for HV), and the input of the services that control from it;
- the subclass's own input, which calls :meth:`ActuatorService.drive`.

Commands: ``arm`` (refused while an interlock holds), ``disarm``, ``reset`` (clear a trip),
plus the runtime's ``param.*``. An interlock that engages while armed trips the guard.
Every guard transition is published as an event and in the status ``detail``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol, Sequence

import msgspec
import numpy as np

from kibble.bus_schema.messages import Command, DaqFrame, HwActuatorCommand, HwSensorFrame
from kibble.services.runtime import Service, ServiceConfig, command
from kibble.services.safety import ActuatorGuard, GuardConfig


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
    """Validate a service's ``[settings]`` table into ``kind``; ``ValueError`` saying what is wrong."""
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
        self.decimation = 1
        """The loop acts on every n-th frame (its own rate: frame rate / n); set before
        :meth:`make_guard`."""
        self.stale_ticks = 1
        self.interlock_reason: str | None = None
        self.last_frame = -1
        self.last_tick = -1
        self.last_input_tick = -1
        self.last_input_frame = -1
        self._control_tick = -1
        self._too_old = False
        super().__init__(config)

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
        self.subscribe(self.topics.frame("daq"), DaqFrame, self.on_daq_frame)

    def on_clock(self, sensors: HwSensorFrame) -> None:
        """Hardware frame k: if our input is stale, the guard alone sets (and answers) frame k."""
        self.last_frame = max(self.last_frame, sensors.frame)
        tick = sensors.frame // self.decimation
        if tick <= self.last_tick:
            return
        if tick - self.last_input_tick > self.stale_ticks:
            self._apply(sensors.frame)

    def new_tick(self, frame: int) -> bool:
        """Whether the control path should act on ``frame``: True once per loop period (every
        frame, undecimated). Consumes the period: a second call for it says False."""
        tick = frame // self.decimation
        if tick <= self._control_tick:
            return False
        self._control_tick = tick
        return True

    def on_daq_frame(self, frame: DaqFrame) -> None:
        """Watchdog and interlocks, once per loop period; subclasses that control from the
        DAQ frame act only when :meth:`new_tick` said so (check it before calling this)."""
        assert self.guard is not None
        reason = self.guard.observe(self.watch_motion(frame))
        self.interlock_reason = self.interlock(frame)
        if reason is None and self.interlock_reason is not None and self.guard.state == "armed":
            reason = f"interlock: {self.interlock_reason}"
            self.guard.trip(reason)
        if reason is not None:
            self.event("trip", f"tripped: {reason}; ramping to safe, reset to clear",
                       severity="alarm", data={"reason": reason, "frame": frame.frame},
                       rate_limited=False)
            self.set_state("tripped")

    def drive(self, frame: int, request: Sequence[float] | None) -> None:
        """A fresh request for ``frame`` (None: the input arrived but asks for nothing new).

        In realtime, an input older than the age limit when it arrives is not taken: the loop
        cannot keep up, and the guard then holds and goes safe exactly as for missing input."""
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
        tick = frame // self.decimation
        if request is not None:
            try:
                self.guard.request(tick, request)
            except ValueError as exc:
                self.reject(f"{self.name} request", str(exc))
                return
        self.last_input_tick = max(self.last_input_tick, tick)
        self.last_input_frame = max(self.last_input_frame, frame)
        self._apply(frame)

    def _apply(self, frame: int) -> None:
        assert self.guard is not None
        was_stale = self.guard.stale
        before = self.guard.state
        self.last_tick = max(self.last_tick, frame // self.decimation)
        outputs = self.guard.output(frame // self.decimation)
        if self.guard.stale and not was_stale:
            self.event("stale", f"input stale at frame {frame}: holding, then ramping to zero",
                       severity="warning", data={"frame": frame})
        if self.guard.state != before:
            self.event("safe", f"{before} -> {self.guard.state} at frame {frame} (stale input)",
                       severity="alarm", data={"frame": frame})
        self.set_state(self._state_name())
        self.write_outputs(frame, outputs)
        self.loop_timer.tick(time.monotonic())

    def _state_name(self) -> str:
        assert self.guard is not None
        return self.guard.state

    async def on_connected(self) -> None:
        """Say hello to the hardware (frame -1, the present outputs: zero at boot); this also
        registers the devices with a lockstep simulator."""
        assert self.guard is not None
        self.write_outputs(-1, self.guard.out.copy())

    async def on_disconnect(self) -> None:
        """A lost broker is stale input: disarm (the outputs ramp down at the next frames)."""
        if self.guard is not None and self.guard.state == "armed":
            self.guard.disarm()

    async def on_stop(self) -> None:
        if self.guard is not None:
            self.guard.disarm()
            self._apply(self.last_frame)

    def status_detail(self) -> dict[str, Any]:
        g = self.guard
        if g is None:
            return {}
        detail: dict[str, Any] = {"guard": g.state, "stale": g.stale, "trip_reason": g.trip_reason,
                                  "frame": self.last_frame, "decimation": self.decimation}
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
        if self.last_frame // self.decimation - self.last_input_tick > self.stale_ticks:
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
