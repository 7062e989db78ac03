"""``current_source``: servo setpoints (A) to the coarse + fine DAC codes of the two sources.

Input ``servo/setpoint`` (:class:`~kibble.bus_schema.messages.Setpoint`), values:

==========================  =====  ===========================================================
``main_coil_current_a``     A      main-coil source current (force mode)
``counter_mass_current_a``  A      counter-mass motor source current (velocity mode, parking)
``main_coil_connected``     0/1    switchbox: 1 = source drives the main coil (force mode),
                                   0 = coil open, the DVM reads its voltage (velocity mode)
==========================  =====  ===========================================================

Both currents are required in every setpoint; the switchbox keeps its last state when absent.
Output devices (``hw/<device>``, :class:`HwActuatorCommand`): ``main_source`` codes
``[coarse, fine]``, relays ``[force_mode]``; ``cm_source`` codes ``[coarse, fine]``, relays
``[enable]``. Readback: the source monitors arrive in ``daq/frame``; the applied values are in
the status detail.

Safety: boots disarmed at zero; limits and slew per source; a setpoint older than
``stale_after_s`` (frame clock) holds the current for ``hold_s``, then ramps it to zero at
``safe_slew_a_s``; the watchdog trips on the coil's vertical-velocity RMS. Out-of-range or
non-finite setpoints are rejected with an event and the last good one stays in force.
"""

from __future__ import annotations

from typing import Sequence

import msgspec
import numpy as np

from kibble.bus_schema.messages import DaqFrame, Setpoint
from kibble.services.actuator import ActuatorService, BusDriver, typed_settings
from kibble.services.dac import CoarseFineDac
from kibble.services.safety import GuardConfig

CURRENTS = ("main_coil_current_a", "counter_mass_current_a")


class CurrentSourceSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Hardware description and safety limits (configuration, not live-tunable)."""

    frame_rate_hz: float = 1000.0
    main_device: str = "main_source"
    cm_device: str = "cm_source"
    main_full_scale_a: float = 0.02
    main_coarse_bits: int = 16
    main_fine_bits: int = 16
    main_fine_span_lsb: float = 4.0
    cm_full_scale_a: float = 0.05
    cm_coarse_bits: int = 16
    cm_fine_bits: int = 16
    cm_fine_span_lsb: float = 4.0
    main_limit_a: float = 0.015
    """Largest main-coil current accepted (A): 1 kg needs 6.9 mA, the auxiliary mass 3.5 mA."""
    cm_limit_a: float = 0.045
    main_slew_a_s: float = 0.1
    cm_slew_a_s: float = 0.2
    safe_slew_a_s: float = 0.005
    """Ramp to zero when going safe (A/s): 7 mA in 1.4 s, slow enough for the 6 H coil."""
    stale_after_s: float = 0.05
    hold_s: float = 1.0
    watchdog_vz_rms_m_s: float = 0.005
    """Coil vertical-velocity RMS that trips (m/s); a sweep runs at 1 mm/s."""
    watchdog_window_s: float = 1.0


class CurrentSource(ActuatorService):
    name = "current_source"

    def setup(self) -> None:
        super().setup()
        s = self.settings = typed_settings(self.config.settings, CurrentSourceSettings, self.name)
        self.main_dac = CoarseFineDac(s.main_full_scale_a, s.main_coarse_bits, s.main_fine_bits,
                                      s.main_fine_span_lsb)
        self.cm_dac = CoarseFineDac(s.cm_full_scale_a, s.cm_coarse_bits, s.cm_fine_bits,
                                    s.cm_fine_span_lsb)
        self.make_guard(GuardConfig(
            names=CURRENTS, limits=(s.main_limit_a, s.cm_limit_a),
            slew_per_s=(s.main_slew_a_s, s.cm_slew_a_s),
            safe_slew_per_s=(s.safe_slew_a_s, s.safe_slew_a_s),
            frame_period_s=1.0 / s.frame_rate_hz, stale_after_s=s.stale_after_s, hold_s=s.hold_s,
            watch_names=("coil_vz_m_s",), watchdog_rms=(s.watchdog_vz_rms_m_s,),
            watchdog_window_s=s.watchdog_window_s))
        self.main_connected = True
        self.main_driver = BusDriver(self, s.main_device)
        self.cm_driver = BusDriver(self, s.cm_device)
        self.subscribe(self.topics.setpoint("servo"), Setpoint, self.on_setpoint)

    def on_setpoint(self, sp: Setpoint) -> None:
        missing = [k for k in CURRENTS if k not in sp.values]
        if missing:
            self.reject(self.topics.setpoint("servo"), f"setpoint lacks {', '.join(missing)}")
            return
        connected = sp.values.get("main_coil_connected")
        if connected is not None:
            if connected not in (0.0, 1.0):
                self.reject(self.topics.setpoint("servo"),
                            f"main_coil_connected must be 0 or 1, got {connected}")
                return
            self.main_connected = connected == 1.0
        self.drive(sp.frame, [sp.values[k] for k in CURRENTS])

    def watch_motion(self, frame: DaqFrame) -> Sequence[float]:
        return (frame.coil_vz_m_s,)

    def write_outputs(self, frame: int, outputs: np.ndarray) -> None:
        self.main_driver.write(frame, self.main_dac.to_codes(float(outputs[0])), [self.main_connected])
        self.cm_driver.write(frame, self.cm_dac.to_codes(float(outputs[1])), [True])
