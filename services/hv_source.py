"""``hv_source``: the EFB's high voltage, servo setpoint (V) to a 24-bit DAC into a +-1000 V amplifier.

Input ``servo/setpoint`` values:

=================  =====  ======================================================================
``hv_voltage_v``   V      electrode voltage (sign = polarity; F = kappa (V - V_s)^2 either way)
``hv_to_main``     0/1    optional: 1 = amplifier on the main electrodes (weighing), 0 = on the
                          auxiliary electrode (gradient mode); keeps its last state when absent
=================  =====  ======================================================================

Output device ``hw/hv``: codes ``[code]``, relays ``[to_main, enable]``. ``enable`` is closed only
while armed (and open once the output has ramped to zero when safe or tripped).

Safety: boots disarmed at 0 V; voltage limit and slew; the HV is allowed only while the
pressure reading is below ``pressure_limit_pa`` (corona region): ``arm`` is refused above it,
and a rise above it while armed trips (ramp to zero, event, reset needed); stale setpoints ramp
to zero at once (no hold: a held HV is not safe); the watchdog trips on the linkage's z RMS.
"""

from __future__ import annotations

from typing import Sequence

import msgspec
import numpy as np

from kibble.bus_schema.messages import DaqFrame, Setpoint
from kibble.services.actuator import ActuatorService, BusDriver, typed_settings
from kibble.services.dac import Dac
from kibble.services.safety import GuardConfig, pressure_interlock


class HvSourceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    frame_rate_hz: float = 1000.0
    device: str = "hv"
    dac_bits: int = 24
    full_scale_v: float = 1000.0
    limit_v: float = 1000.0
    slew_v_s: float = 20000.0
    safe_slew_v_s: float = 500.0
    stale_after_s: float = 0.05
    pressure_limit_pa: float = 0.1
    """HV only below this pressure (Pa): the Paschen/corona region starts above ~0.1 Pa."""
    watchdog_z_rms_m: float = 1.0e-4
    watchdog_window_s: float = 1.0


class HvSource(ActuatorService):
    name = "hv_source"

    def setup(self) -> None:
        super().setup()
        s = self.settings = typed_settings(self.config.settings, HvSourceSettings, self.name)
        self.dac = Dac(s.dac_bits, s.full_scale_v)
        self.make_guard(GuardConfig(
            names=("hv_voltage_v",), limits=(s.limit_v,), slew_per_s=(s.slew_v_s,),
            safe_slew_per_s=(s.safe_slew_v_s,), frame_period_s=1.0 / s.frame_rate_hz,
            stale_after_s=s.stale_after_s, hold_s=0.0, watch_names=("coil_z_m",),
            watchdog_rms=(s.watchdog_z_rms_m,), watchdog_window_s=s.watchdog_window_s))
        self.to_main = True
        self.driver = BusDriver(self, s.device)
        self.subscribe(self.topics.setpoint("servo"), Setpoint, self.on_setpoint)

    def on_setpoint(self, sp: Setpoint) -> None:
        topic = self.topics.setpoint("servo")
        if "hv_voltage_v" not in sp.values:
            self.reject(topic, "setpoint lacks hv_voltage_v")
            return
        to_main = sp.values.get("hv_to_main")
        if to_main is not None:
            if to_main not in (0.0, 1.0):
                self.reject(topic, f"hv_to_main must be 0 or 1, got {to_main}")
                return
            self.to_main = to_main == 1.0
        self.drive(sp.frame, [sp.values["hv_voltage_v"]])

    def interlock(self, frame: DaqFrame) -> str | None:
        return pressure_interlock(frame.pressure_pa, self.settings.pressure_limit_pa)

    def watch_motion(self, frame: DaqFrame) -> Sequence[float]:
        return (frame.coil_z_m,)

    def write_outputs(self, frame: int, outputs: np.ndarray) -> None:
        assert self.guard is not None
        self.driver.write(frame, [self.dac.to_code(float(outputs[0]))], [self.to_main, self.guard.live])
