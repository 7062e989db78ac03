"""``hv_source``: the EFB's high voltage, servo setpoint (V) to a 24-bit DAC into a +-1000 V amplifier.

Input ``servo/setpoint``:

=================  ======  =====================================================================
``hv_voltage_v``   V       value: electrode voltage (sign = polarity; F = kappa (V - V_s)^2
                           either way)
``hv_to_main``     switch  optional: True = amplifier on the main electrodes (weighing), False =
                           on the auxiliary electrode (gradient mode); keeps its last state when
                           absent; switched only at zero output (below)
``z_ref_m``        m       optional value: where the servo holds the link (the watchdog's
                           centre); keeps its last value (0 at boot: the weighing position) when
                           absent; a setpoint with ``|z_ref_m| > travel_limit_m`` is rejected
=================  ======  =====================================================================

Output device ``hw/hv``: codes ``[code]``, relays ``[to_main, enable]``. ``enable`` is closed only
while armed (and open once the output has ramped to zero when safe or tripped).

Relay interlock: ``to_main`` never switches under voltage. A setpoint asking for the other
electrode makes the output ramp to zero at the armed slew; the relay switches in the frame the
output is zero, and the setpoints' voltage is applied from the next frame on (at 20 kV/s the
servo's 100 V on the main electrodes are gone in 5 ms).

Safety: boots disarmed at 0 V; voltage limit and slew; the HV is allowed only while the
pressure reading is below ``pressure_limit_pa`` (corona region): ``arm`` is refused above it,
and a rise above it while armed trips (ramp to zero, event, reset needed); stale setpoints ramp
to zero at once (no hold: a held HV is not safe); the watchdog trips on the linkage's motion.

Watchdog: two RMS over ``watchdog_window_s``, (1) of the link's deviation from the servo's
reference ``z - z_ref`` (limit ``watchdog_z_rms_m``, 100 um: the loop has lost the link) and
(2) of ``z`` itself (limit ``travel_limit_m``: the link is heading for its stops, whatever the
servo asks). With the reference at the weighing position (force mode) (1) is the RMS of z about
the null, the watchdog this service always had; that alone trips on any deliberate excursion
beyond ~100 um however well the loop holds the link: a gradient sweep (seed 000: +-1 mm) slewed
to -1 mm tripped it at z = -0.11 mm with the link within 1 um of its reference. A step of the
reference (e.g. ``z_ref_m`` set in force mode) trips (1) within a few frames, before the link
has moved: the electrodes only pull, so the loop cannot brake a link it has launched faster
than the preload does, and a 0.1 mm step overshot by 0.5 mm into the stops.
"""

from __future__ import annotations

from typing import Sequence

import msgspec
import numpy as np

from kibble.bus_schema.messages import DaqFrame, Setpoint
from kibble.services.runtime.actuator import ActuatorService, BusDriver, typed_settings
from kibble.services.runtime.dac import Dac
from kibble.services.runtime.safety import GuardConfig, pressure_interlock


class HvSourceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    frame_rate_hz: float = 1000.0
    device: str = "hv"
    dac_bits: int = 24
    full_scale_v: float = 1000.0
    limit_v: float = 1000.0
    slew_v_per_s: float = 20000.0
    safe_slew_v_per_s: float = 500.0
    stale_after_s: float = 0.05
    pressure_limit_pa: float = 0.1
    """HV only below this pressure (Pa): the Paschen/corona region starts above ~0.1 Pa."""
    watchdog_z_rms_m: float = 1.0e-4
    """RMS of the link's deviation from the servo's reference that trips (m)."""
    travel_limit_m: float = 1.25e-3
    """RMS of the link's position (about the weighing position) that trips, and the farthest
    reference accepted (m): the gradient sweep needs +-1 mm, the simulated stops are at +-1.5 mm."""
    watchdog_window_s: float = 1.0


class HvSource(ActuatorService):
    name = "hv_source"

    def setup(self) -> None:
        super().setup()
        s = self.settings = typed_settings(self.config.settings, HvSourceSettings, self.name)
        self.dac = Dac(s.dac_bits, s.full_scale_v)
        self.make_guard(GuardConfig(
            names=("hv_voltage_v",), limits=(s.limit_v,), slew_per_s=(s.slew_v_per_s,),
            safe_slew_per_s=(s.safe_slew_v_per_s,), frame_period_s=1.0 / s.frame_rate_hz,
            stale_after_s=s.stale_after_s, hold_s=0.0, watch_names=("coil_z_error_m", "coil_z_m"),
            watchdog_rms=(s.watchdog_z_rms_m, s.travel_limit_m), watchdog_window_s=s.watchdog_window_s))
        self.to_main = True
        """The relay as applied: True = the amplifier drives the main electrodes."""
        self.to_main_wanted = True
        """The relay as the setpoints ask for it (applied at zero output)."""
        self.z_ref_m = 0.0
        self.driver = BusDriver(self, s.device)
        self.subscribe(self.topics.setpoint("servo"), Setpoint, self.on_setpoint)

    def on_setpoint(self, sp: Setpoint) -> None:
        topic = self.topics.setpoint("servo")
        if "hv_voltage_v" not in sp.values:
            self.reject(topic, "setpoint lacks hv_voltage_v")
            return
        if "hv_to_main" in sp.values:
            self.reject(topic, "hv_to_main is a switch: send it in the setpoint's switches as "
                               "true or false, not as a value")
            return
        z_ref = sp.values.get("z_ref_m")
        if z_ref is not None and not abs(z_ref) <= self.settings.travel_limit_m:
            self.reject(topic, f"z_ref_m {z_ref:.6g} m is beyond the travel limit "
                               f"+-{self.settings.travel_limit_m:.6g} m")
            return
        want = sp.switches.get("hv_to_main", self.to_main_wanted)
        request = sp.values["hv_voltage_v"]
        if want != self.to_main:
            request = 0.0  # the relay switches only once the output has ramped to zero

        def taken() -> None:
            self.to_main_wanted = want
            if z_ref is not None:
                self.z_ref_m = z_ref
        self.drive(sp.frame, [request], taken)

    def interlock(self, frame: DaqFrame) -> str | None:
        return pressure_interlock(frame.pressure_pa, self.settings.pressure_limit_pa)

    def watch_motion(self, frame: DaqFrame) -> Sequence[float]:
        return (frame.coil_z_m - self.z_ref_m, frame.coil_z_m)

    def write_outputs(self, frame: int, outputs: np.ndarray) -> None:
        assert self.guard is not None
        v = float(outputs[0])
        if self.to_main_wanted != self.to_main and v == 0.0:
            self.to_main = self.to_main_wanted
        self.driver.write(frame, [self.dac.to_code(v)], [self.to_main, self.guard.live])
