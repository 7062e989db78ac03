"""``daq``: raw hardware sensor frames (``hw/sensors``) to ``daq/frame`` in SI units.

NIST-4 (``kind = "nist4"``): the three main-coil interferometers (fringe count + phase,
``(N + phase/2pi) lambda/2``) are fused into z, theta-x, theta-y at the optical centre (Abbe
weights, :func:`kibble.control.geometry.ifo_fusion_matrix`); the fourth interferometer is the
counter-mass; the two beam-translation PSDs give x, y, theta-z (the optical lever's theta-x,
theta-y are redundant with the interferometers and are not used); velocities are the frame
differences through a first-order low-pass of ``velocity_filter_s``; the DVM reading gets the
PJVS voltage added back; the source monitors are divided by their transimpedance.

EFB (``kind = "efb"``): one interferometer gives z; the capacitance bridge and the DVM (the
applied high voltage) are passed on.

The conversions per instrument are the strategies of :mod:`kibble.services.daemons.daq_core`, which the
instrument's definition (:mod:`kibble.services.instruments`) chooses; this daemon keeps the
frame clock, the velocities, the origin and the publishing.

Command ``zero``: the present pose becomes the origin (the weighing position), so the servo's
null is ``coil_z_m = 0``; ``unzero`` clears it. The offsets persist as parameters.

Frame tags are checked (:class:`~kibble.bus_schema.realtime.FrameClock`): a sensor frame whose
tag goes back within its session or jumps further than the clock allows is rejected (counted,
an event) and publishes nothing; a new hardware session starts the velocities afresh. A frame
whose values are beyond the plausibility limits of ``DaqFrame`` (positions beyond the stops,
velocities, currents, voltages beyond the hardware) is dropped the same way, before anyone acts
on it: the loops downstream see a missing frame.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec

from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import Command, DaqFrame, HwSensorFrame
from kibble.bus_schema.realtime import FrameClock, saturating_add
from kibble.services.runtime.actuator import typed_settings
from kibble.services.instruments import instrument
from kibble.services.runtime.params import Param
from kibble.services.runtime.service import Service, command

ZERO_FIELDS = ("coil_x_m", "coil_y_m", "coil_z_m", "coil_theta_x_rad", "coil_theta_y_rad",
               "coil_theta_z_rad")
_ZERO_KEYS = tuple(f"zero_{name}" for name in ZERO_FIELDS)
"""The parameter names of the origin, per :data:`ZERO_FIELDS` entry."""


class DaqSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Sensor geometry and scaling (configuration; defaults are NIST-4's, see nist4.toml)."""

    kind: str = "nist4"
    """The instrument (:mod:`kibble.services.instruments`): its sensor conversions."""
    frame_rate_hz: float = 1000.0
    wavelength_m: float = 532.0e-9
    ifo_angles_deg: list[float] = msgspec.field(default_factory=lambda: [0.0, 120.0, 240.0])
    ifo_radius_m: float = 0.25
    optical_centre_x_m: float = 0.0
    optical_centre_y_m: float = 0.0
    psd_retro_angles_deg: list[float] = msgspec.field(default_factory=lambda: [60.0, 180.0])
    psd_radius_m: float = 0.25
    psd_gain_v_per_m: float = 1000.0
    psd_lever_arm_m: float = 0.5
    main_monitor_v_per_a: float = 500.0
    cm_monitor_v_per_a: float = 200.0
    std_resistor_ohm: float = 100.0


class Daq(Service):
    name = "daq"

    pjvs_voltage_v = Param(0.0, unit="V", min=-20.0, max=20.0,
                           doc="PJVS reference voltage subtracted in hardware, added back to the DVM reading")
    velocity_filter_s = Param(0.01, unit="s", min=0.0, max=10.0,
                              doc="time constant of the velocity low-pass (0: raw frame differences)")
    # the origin lies within the stops, so that no zeroed reading passes the DaqFrame limits
    zero_coil_x_m = Param(0.0, unit="m", min=-0.05, max=0.05, doc="origin of x (set by zero)")
    zero_coil_y_m = Param(0.0, unit="m", min=-0.05, max=0.05, doc="origin of y (set by zero)")
    zero_coil_z_m = Param(0.0, unit="m", min=-0.05, max=0.05, doc="origin of z, the weighing position (set by zero)")
    zero_coil_theta_x_rad = Param(0.0, unit="rad", min=-0.05, max=0.05, doc="origin of theta-x (set by zero)")
    zero_coil_theta_y_rad = Param(0.0, unit="rad", min=-0.05, max=0.05, doc="origin of theta-y (set by zero)")
    zero_coil_theta_z_rad = Param(0.0, unit="rad", min=-0.05, max=0.05, doc="origin of theta-z (set by zero)")

    def setup(self) -> None:
        s = self.settings = typed_settings(self.config.settings, DaqSettings, self.name)
        self.dt_s = 1.0 / s.frame_rate_hz
        self.sensors = instrument(s.kind).sensor_map(s)
        """The instrument's conversions (:mod:`kibble.services.daemons.daq_core`)."""
        # lists of floats: a frame handles six numbers, plain floats cost a fraction of what
        # 6-element arrays do
        self.pose: list[float] = [0.0] * 6
        """Last raw pose (x, y, z, theta_x, theta_y, theta_z) before zeroing."""
        self.vel: list[float] = [0.0] * 6
        self._last_pose: list[float] | None = None
        """The pose of the last frame published (None: none yet)."""
        self._pose_frame: int | None = None
        """Its frame (None: not of the present numbering of the frames)."""
        self.cm_z_m = 0.0
        self.clock = FrameClock(self.dt_s, realtime=self.config.clock == "realtime")
        self.subscribe(self.topics.hw("sensors"), HwSensorFrame, self.on_sensors)
        self.frame_clock(self.topics.hw("sensors"), self.dt_s)

    def _check(self, hw: HwSensorFrame) -> str | None:
        need = {"fringe_count": self.sensors.n_fringe, "fringe_phase_rad": self.sensors.n_fringe,
                "psd_v": self.sensors.n_psd}
        for field, n in need.items():
            if len(getattr(hw, field)) < n:
                return f"{field} has {len(getattr(hw, field))} channels, {self.settings.kind} needs {n}"
        return None

    _fast: tuple | None = None
    """Constants of the frame path, built at the first frame (:meth:`_frame_constants`)."""

    def _frame_constants(self) -> tuple:
        """The per-frame constants."""
        sensors = self.sensors
        self._fast = (sensors.convert, sensors.n_fringe, sensors.n_psd, 0.5 * self.settings.wavelength_m,
                      2 * math.pi, self.topics.hw("sensors"), self.topics.frame(self.name), self.params.values)
        return self._fast

    def on_sensors(self, hw: HwSensorFrame) -> None:
        fast = self._fast or self._frame_constants()
        convert, n_fringe, n_psd, half, two_pi, t_sensors, t_frame, values = fast
        fc, fph = hw.fringe_count, hw.fringe_phase_rad
        if len(fc) < n_fringe or len(fph) < n_fringe or len(hw.psd_v) < n_psd:
            problem = self._check(hw)
            if problem is not None:
                self.reject(t_sensors, problem)
                return
        clock = self.clock
        why = clock.advance(hw.frame, hw.session, hw.t_mono_s, time.monotonic())
        if why is not None:
            self.reject(t_sensors, why)
            return
        if clock.step == 0:  # a new numbering of the frames: no velocity across it
            self.event("frame_clock", clock.note, data={"frame": hw.frame, "session": hw.session})
            self._pose_frame = None
        if len(fph) >= len(fc):
            disp = [(c + ph / two_pi) * half for c, ph in zip(fc, fph)]
        else:  # (as before: runs into the missing phase)
            disp = [(fc[i] + fph[i] / two_pi) * half for i in range(len(fc))]
        pose, cm_z, dvm, i_main, i_cm, cap = convert(hw, disp, self.pose, self.cm_z_m, values)
        gap = 0 if self._pose_frame is None else hw.frame - self._pose_frame
        v = self._velocity(pose, gap)
        p = [x - values[key] for x, key in zip(pose, _ZERO_KEYS)]
        out = DaqFrame(
            frame=hw.frame, sim_time_s=hw.sim_time_s, coil_x_m=p[0], coil_y_m=p[1],
            coil_z_m=p[2], coil_theta_x_rad=p[3], coil_theta_y_rad=p[4], coil_theta_z_rad=p[5],
            coil_vx_m_per_s=v[0], coil_vy_m_per_s=v[1], coil_vz_m_per_s=v[2], coil_wx_rad_per_s=v[3],
            coil_wy_rad_per_s=v[4], coil_wz_rad_per_s=v[5], counter_mass_z_m=float(cm_z),
            coil_voltage_v=dvm, main_coil_current_a=i_main, counter_mass_current_a=i_cm,
            capacitance_f=cap, temperature_k=hw.temperature_k, pressure_pa=hw.pressure_pa,
            session=hw.session)
        payload = encode(self.stamp(out))
        try:  # the limits every reader of the frame checks, checked here first (~0.7 us)
            decode(payload, DaqFrame)
        except DecodeError as exc:  # dropped like a missing frame: nothing of it is kept
            self.reject(t_sensors, f"implausible: {exc}")
            return
        self.pose, self.vel, self.cm_z_m = pose, v, cm_z
        self._last_pose = pose
        self._pose_frame = hw.frame
        if gap > 1:
            self.counters["frames_missed"] = saturating_add(self.counters.get("frames_missed", 0), gap - 1)
        self.publish_bytes(t_frame, payload)
        self.counters["frames_out"] += 1
        self.loop_timer.tick(time.monotonic())
        if self.state != "running":
            self.set_state("running")

    def _velocity(self, pose: list[float], gap: int) -> list[float]:
        """The velocities with ``pose``, ``gap`` frames after the last pose kept (0: none to
        difference with, the velocities stay)."""
        if self._last_pose is None or gap <= 0:
            return self.vel
        h = gap * self.dt_s
        tau = self.velocity_filter_s
        alpha = 1.0 if tau <= 0 else min(1.0, gap * self.dt_s / (tau + gap * self.dt_s))
        # (pose - last) / h is the raw velocity; vel += alpha (raw - vel), per DOF
        return [v + alpha * ((x - x0) / h - v) for x, x0, v in zip(pose, self._last_pose, self.vel)]

    @command("zero")
    def cmd_zero(self, cmd: Command) -> dict[str, Any]:
        """Make the present pose the origin (the weighing position)."""
        if self._last_pose is None:
            raise ValueError("no sensor frame received yet: nothing to zero on")
        changed = {}
        for i, name in enumerate(ZERO_FIELDS):
            change = self.params.set(f"zero_{name}", float(self.pose[i]), cmd.client_id or "?", cmd.t_utc_s)
            self._apply_change(change)
            changed[name] = float(self.pose[i])
        return {"origin": changed}

    @command("unzero")
    def cmd_unzero(self, cmd: Command) -> dict[str, Any]:
        for name in ZERO_FIELDS:
            self._apply_change(self.params.set(f"zero_{name}", 0.0, cmd.client_id or "?", cmd.t_utc_s))
        return {"origin": dict.fromkeys(ZERO_FIELDS, 0.0)}

    def status_detail(self) -> dict[str, Any]:
        return {"frame": self.clock.frame, "session": self.clock.session,
                "coil_z_m": float(self.pose[2] - self.zero_coil_z_m)}
