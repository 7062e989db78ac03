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
    """The simulator's (or a bus-attached rack's) device: ``HwActuatorCommand`` on ``hw/<device>``."""

    def __init__(self, service: Service, device: str) -> None:
        self.service = service
        self.device = device
        self.topic = service.topics.hw(device)

    def write(self, frame: int, codes: Sequence[int], relays: Sequence[bool]) -> None:
        self.service.publish(self.topic, HwActuatorCommand(
            frame=frame, device=self.device, codes=list(codes), relays=list(relays)))
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
        self.stale_frames = 1
        self.interlock_reason: str | None = None
        self.last_frame = -1
        self.last_input_frame = -1
        super().__init__(config)

    # ---------------------------------------------------------------- subclass interface

    def make_guard(self, config: GuardConfig) -> None:
        self.guard = ActuatorGuard(config)
        self.stale_frames = max(1, int(round(config.stale_after_s / config.frame_period_s)))
        """Frames without a fresh input after which the clock alone drives the guard."""

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
        if sensors.frame - self.last_input_frame > self.stale_frames:
            self._apply(sensors.frame)

    def on_daq_frame(self, frame: DaqFrame) -> None:
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
        """A fresh request for ``frame`` (None: the input arrived but asks for nothing new)."""
        assert self.guard is not None
        if request is not None:
            try:
                self.guard.request(frame, request)
            except ValueError as exc:
                self.reject(f"{self.name} request", str(exc))
                return
        self.last_input_frame = max(self.last_input_frame, frame)
        self._apply(frame)

    def _apply(self, frame: int) -> None:
        assert self.guard is not None
        was_stale = self.guard.stale
        before = self.guard.state
        outputs = self.guard.output(frame)
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
                                  "frame": self.last_frame}
        for name, value in zip(g.config.names, g.out):
            detail[name] = float(value)
        return detail

    # ---------------------------------------------------------------- commands

    @command("arm")
    def cmd_arm(self, cmd: Command) -> dict[str, Any]:
        assert self.guard is not None
        if self.interlock_reason is not None:
            raise ValueError(f"arm refused: {self.interlock_reason}")
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
