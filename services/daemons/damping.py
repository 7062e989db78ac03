"""``damping``: velocity damping of the coil's x, y, theta-x, theta-y through six mini coils.

From each ``daq/frame`` the generalized damping forces ``F_x = -c_x v_x``, ``F_y = -c_y v_y``,
``tau_x = -c_tx w_x``, ``tau_y = -c_ty w_y`` go through the constrained pseudo-inverse of the
coil actuation matrix (:func:`kibble.control.geometry.damping_pinv`: pure motions, zero z force,
zero theta-z torque) to six coil currents, then to the 16-bit DACs of ``hw/damping`` (codes in
coil order set0 v, set0 h, set1 v, set1 h, set2 v, set2 h; relay ``[enable]``).

Commands: ``open`` (relays open, outputs zero, as during a velocity sweep), ``close``, plus
``arm``/``disarm``/``reset`` of every actuator. Safety: boots disarmed at zero; current limit
and slew per coil; stale DAQ frames hold the currents for ``hold_s``, then ramp them to zero;
the watchdog trips on the RMS of x, y, theta-x, theta-y. The loop runs at ``loop_rate_hz``
(every n-th frame), each command answering its n frames.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgspec
import numpy as np

from kibble.bus_schema.messages import Command, DaqFrame
from kibble.control.geometry import damping_force_matrix, damping_pinv
from kibble.services.runtime.actuator import ActuatorService, BusDriver, typed_settings
from kibble.services.runtime.dac import Dac
from kibble.services.runtime.params import Param
from kibble.services.runtime.service import command
from kibble.services.runtime.safety import GuardConfig

COILS = ("set0_v_a", "set0_h_a", "set1_v_a", "set1_h_a", "set2_v_a", "set2_h_a")


class DampingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Coil geometry, DAC and limits (defaults: NIST-4, see hil_sim/nist4.toml)."""

    frame_rate_hz: float = 1000.0
    loop_rate_hz: float = 200.0
    """Rate of this loop: it acts on every round(frame_rate_hz / loop_rate_hz)-th frame. The
    coil's pendulum and torsion modes are at 0.5-1.2 Hz (hil_sim/nist4.toml), so 200 Hz is
    over 150 samples per period: the loop is no worse than at 1 kHz, at a fifth of the CPU."""
    device: str = "damping"
    angles_deg: list[float] = msgspec.field(default_factory=lambda: [30.0, 150.0, 270.0])
    radius_m: float = 0.217
    kv_n_per_a: float = 0.1
    kh_n_per_a: float = 0.1
    dac_bits: int = 16
    dac_full_scale_v: float = 10.0
    driver_a_per_v: float = 0.005
    limit_a: float = 0.045
    slew_a_per_s: float = 20.0
    safe_slew_a_per_s: float = 1.0
    stale_after_s: float = 0.05
    hold_s: float = 0.25
    """A stale input holds the coil currents this long before they go to zero (a damping
    current held for a moment is harmless; a hiccup of the DAQ must not disarm the damping)."""
    watchdog_xy_rms_m: float = 1e-3
    watchdog_tilt_rms_rad: float = 1e-3
    watchdog_window_s: float = 2.0


class Damping(ActuatorService):
    name = "damping"

    gain_x_n_s_per_m = Param(22.6, unit="N s/m", min=0.0, max=1000.0, doc="x velocity damping")
    gain_y_n_s_per_m = Param(24.5, unit="N s/m", min=0.0, max=1000.0, doc="y velocity damping")
    gain_theta_x_n_m_s_per_rad = Param(1.7, unit="N m s/rad", min=0.0, max=100.0, doc="theta-x rate damping")
    gain_theta_y_n_m_s_per_rad = Param(1.9, unit="N m s/rad", min=0.0, max=100.0, doc="theta-y rate damping")

    def setup(self) -> None:
        super().setup()
        s = self.settings = typed_settings(self.config.settings, DampingSettings, self.name)
        self.decimation = self.decimation_for(s.frame_rate_hz, s.loop_rate_hz)
        self.B = damping_force_matrix(np.radians(s.angles_deg), s.radius_m, s.kv_n_per_a, s.kh_n_per_a)
        self.D = damping_pinv(self.B)
        self.dac = Dac(s.dac_bits, s.dac_full_scale_v * s.driver_a_per_v)
        n = len(COILS)
        self.make_guard(GuardConfig(
            names=COILS, limits=(s.limit_a,) * n, slew_per_s=(s.slew_a_per_s,) * n,
            safe_slew_per_s=(s.safe_slew_a_per_s,) * n, frame_period_s=1.0 / s.frame_rate_hz,
            stale_after_s=s.stale_after_s, hold_s=s.hold_s,
            watch_names=("coil_x_m", "coil_y_m", "coil_theta_x_rad", "coil_theta_y_rad"),
            watchdog_rms=(s.watchdog_xy_rms_m,) * 2 + (s.watchdog_tilt_rms_rad,) * 2,
            watchdog_window_s=s.watchdog_window_s))
        self.relays_closed = True
        self.generalized = np.zeros(4)
        self.driver = BusDriver(self, s.device)

    def on_daq_frame(self, frame: DaqFrame) -> None:
        if not self.new_tick(frame.frame):
            return
        super().on_daq_frame(frame)
        g = self.generalized
        g[0] = -self.gain_x_n_s_per_m * frame.coil_vx_m_per_s
        g[1] = -self.gain_y_n_s_per_m * frame.coil_vy_m_per_s
        g[2] = -self.gain_theta_x_n_m_s_per_rad * frame.coil_wx_rad_per_s
        g[3] = -self.gain_theta_y_n_m_s_per_rad * frame.coil_wy_rad_per_s
        currents = self.D @ g if self.relays_closed else np.zeros(len(COILS))
        limit = self.settings.limit_a
        self.drive(frame.frame, np.clip(currents, -limit, limit))

    def watch_motion(self, frame: DaqFrame) -> Sequence[float]:
        return (frame.coil_x_m, frame.coil_y_m, frame.coil_theta_x_rad, frame.coil_theta_y_rad)

    def write_outputs(self, frame: int, outputs: np.ndarray) -> None:
        self.driver.write(frame, [self.dac.to_code(float(i)) for i in outputs], [self.relays_closed])

    @command("open")
    def cmd_open(self, cmd: Command) -> dict[str, Any]:
        """Open the coil relays and zero the outputs (velocity sweeps)."""
        self.relays_closed = False
        self.event("relays", f"damping relays opened by {cmd.client_id or '?'}", data={"closed": False})
        return {"relays_closed": False}

    @command("close")
    def cmd_close(self, cmd: Command) -> dict[str, Any]:
        self.relays_closed = True
        self.event("relays", f"damping relays closed by {cmd.client_id or '?'}", data={"closed": True})
        return {"relays_closed": True}

    def status_detail(self) -> dict[str, Any]:
        detail = super().status_detail()
        detail["relays_closed"] = self.relays_closed
        return detail
