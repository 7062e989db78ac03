"""``theta_z``: holds the coil's theta-z with the push-pull, bias-linearized electrostatic plates.

From each ``daq/frame`` a PID (numba kernel) turns the theta-z error (rad) into a torque (N m);
:func:`kibble.control.electrostatic.thetaz_voltages` turns it into electrode voltages
``bias + u`` and ``bias - u`` (torque = gain x bias x u, linear in u), the same on all three
plates, written to the 16-bit HV amplifier DACs of ``hw/theta_z_hv`` (codes plate0 a, plate0 b,
plate1 a, plate1 b, plate2 a, plate2 b; relay ``[enable]``).

Safety: boots disarmed at 0 V; the HV is allowed only while the pressure reading is below
``pressure_limit_pa`` (``arm`` refused above it, a rise while armed trips and ramps to zero);
voltage limit and slew; stale DAQ frames ramp to zero at once; watchdog on the theta-z RMS.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgspec
import numpy as np

from kibble.bus_schema.messages import DaqFrame
from kibble.control import pid as P
from kibble.control.electrostatic import thetaz_gain_nm_per_v2, thetaz_voltages
from kibble.services.runtime.actuator import ActuatorService, BusDriver, typed_settings
from kibble.services.runtime.dac import Dac
from kibble.services.runtime.params import Param
from kibble.services.runtime.safety import GuardConfig, pressure_interlock


class ThetaZSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Plate geometry, amplifier and limits (defaults: NIST-4, see hil_sim/nist4.toml)."""

    frame_rate_hz: float = 1000.0
    loop_rate_hz: float = 200.0
    """Rate of this loop: it acts on every round(frame_rate_hz / loop_rate_hz)-th frame. The
    coil's pendulum and torsion modes are at 0.5-1.2 Hz (hil_sim/nist4.toml), so 200 Hz is
    over 150 samples per period: the loop is no worse than at 1 kHz, at a fifth of the CPU."""
    device: str = "theta_z_hv"
    n_plates: int = 3
    radius_m: float = 0.25
    gap_m: float = 3.0e-3
    plate_area_m2: float = 2.5e-3
    dac_bits: int = 16
    full_scale_v: float = 1000.0
    limit_v: float = 1000.0
    slew_v_per_s: float = 2000.0
    safe_slew_v_per_s: float = 500.0
    stale_after_s: float = 0.05
    pressure_limit_pa: float = 0.1
    watchdog_rms_rad: float = 1e-3
    watchdog_window_s: float = 2.0


class ThetaZ(ActuatorService):
    name = "theta_z"

    theta_z_ref_rad = Param(0.0, unit="rad", min=-0.01, max=0.01, doc="theta-z held")
    bias_v = Param(500.0, unit="V", min=0.0, max=1000.0, doc="push-pull bias voltage")
    kp_n_m_per_rad = Param(7.9, unit="N m/rad", min=0.0, max=1e4, doc="proportional gain")
    ki_n_m_per_rad_s = Param(2.0, unit="N m/(rad s)", min=0.0, max=1e4, doc="integral gain")
    kd_n_m_s_per_rad = Param(3.5, unit="N m s/rad", min=0.0, max=1e4, doc="derivative gain")
    derivative_filter_s = Param(0.02, unit="s", min=0.0, max=10.0, doc="derivative low-pass")

    def setup(self) -> None:
        super().setup()
        s = self.settings = typed_settings(self.config.settings, ThetaZSettings, self.name)
        self.decimation = self.decimation_for(s.frame_rate_hz, s.loop_rate_hz)
        self.gain = thetaz_gain_nm_per_v2(s.radius_m, s.gap_m, s.plate_area_m2, s.n_plates)
        self.dac = Dac(s.dac_bits, s.full_scale_v)
        self.make_guard(GuardConfig(
            names=("electrode_a_v", "electrode_b_v"), limits=(s.limit_v,) * 2,
            slew_per_s=(s.slew_v_per_s,) * 2, safe_slew_per_s=(s.safe_slew_v_per_s,) * 2,
            frame_period_s=1.0 / s.frame_rate_hz, stale_after_s=s.stale_after_s, hold_s=0.0,
            watch_names=("coil_theta_z_rad",), watchdog_rms=(s.watchdog_rms_rad,),
            watchdog_window_s=s.watchdog_window_s))
        max_torque = self.gain * s.limit_v * s.limit_v / 4
        self.pid_par = P.pid_params(1, dt_s=self.decimation / s.frame_rate_hz, u_min=-max_torque,
                                    u_max=max_torque)
        self._load_gains()
        self.pid_st = P.pid_state(self.pid_par)
        self.io = P.io_block(1, 1)
        self._torque = np.zeros(1)
        self._volts = np.zeros((1, 2))
        self.u_v = 0.0
        self.driver = BusDriver(self, s.device)

    def warm_up(self) -> None:
        P.pid_run(self.pid_par.copy(), self.pid_st.copy(), self.io.copy())
        P.pid_reset(self.pid_par.copy(), self.pid_st.copy())
        thetaz_voltages(np.zeros(1), self.bias_v, self.gain, self.settings.limit_v, 0.0,
                        np.zeros((1, 2)))

    def _load_gains(self) -> None:
        par = self.pid_par
        par[0, P.KP], par[0, P.KI], par[0, P.KD] = self.kp_n_m_per_rad, self.ki_n_m_per_rad_s, self.kd_n_m_s_per_rad
        par[0, P.TF_S] = self.derivative_filter_s

    def on_param_changed(self, name: str, old: Any, new: Any) -> None:
        self._load_gains()

    def on_daq_frame(self, frame: DaqFrame) -> None:
        if not self.new_tick(frame.frame):
            return
        super().on_daq_frame(frame)
        assert self.guard is not None
        if self.guard.state != "armed":
            P.pid_reset(self.pid_par, self.pid_st)
        io = self.io
        io[0, 0, P.IO_R], io[0, 0, P.IO_Y] = self.theta_z_ref_rad, frame.coil_theta_z_rad
        P.pid_run(self.pid_par, self.pid_st, io)
        self._torque[0] = io[0, 0, P.IO_U]
        thetaz_voltages(self._torque, self.bias_v, self.gain, self.settings.limit_v, self.u_v, self._volts)
        self.u_v = 0.5 * float(self._volts[0, 0] - self._volts[0, 1])
        self.drive(frame.frame, self._volts[0])

    def interlock(self, frame: DaqFrame) -> str | None:
        return pressure_interlock(frame.pressure_pa, self.settings.pressure_limit_pa)

    def watch_motion(self, frame: DaqFrame) -> Sequence[float]:
        return (frame.coil_theta_z_rad,)

    def write_outputs(self, frame: int, outputs: np.ndarray) -> None:
        assert self.guard is not None
        a, b = (self.dac.to_code(float(v)) for v in outputs)
        self.driver.write(frame, [a, b] * self.settings.n_plates, [self.guard.live])
