"""``current_source``: servo setpoints (A) to the coarse + fine DAC codes of the two sources.

Input ``servo/setpoint`` (:class:`~kibble.bus_schema.messages.Setpoint`):

==========================  ========  ========================================================
``main_coil_current_a``     A         value: main-coil source current (force mode)
``counter_mass_current_a``  A         value: counter-mass motor source current (velocity mode,
                                      parking)
``main_coil_connected``     switch    switchbox: True = source drives the main coil (force
                                      mode), False = coil open, the DVM reads its voltage
                                      (velocity mode)
==========================  ========  ========================================================

Both currents are required in every setpoint; the switchbox keeps its last state when absent.

Switchbox interlock: the switchbox changes only with no current through it. A setpoint that
asks for another switchbox state makes the main-coil current ramp to zero (at the armed slew),
and the switchbox follows in the frame the current reaches zero (closing, at once: an open coil
carries none); until then the setpoints' main-coil current is not applied. Only velocity mode
opens the coil, and it asks for no main-coil current (the servo hands the force to the
counter-mass motor first): a setpoint asking to open the coil with a main-coil current no mode
of the servo sends is refused whole, counted (``relay_refused`` and ``rejected``) and reported
with one ``relay_refused`` event for every run of them (a run ends after a second of frames
without one).

Output devices (``hw/<device>``, :class:`HwActuatorCommand`): ``main_source`` codes
``[coarse, fine]``, relays ``[force_mode]``; ``cm_source`` codes ``[coarse, fine]``, relays
``[enable]``. Readback: the source monitors arrive in ``daq/frame``; the applied values are in
the status detail.

Safety: boots disarmed at zero; limits and slew per source; a setpoint older than
``stale_after_s`` (frame clock) holds the current for ``hold_s``, then ramps it to zero at
``safe_slew_a_per_s``; the watchdog trips on the coil's vertical-velocity RMS. Out-of-range or
non-finite setpoints are rejected with an event and the last good one stays in force.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgspec
import numpy as np

from kibble.bus_schema.messages import DaqFrame, Setpoint
from kibble.bus_schema.realtime import saturating_add
from kibble.services.runtime.actuator import ActuatorService, BusDriver, typed_settings
from kibble.services.runtime.dac import CoarseFineDac
from kibble.services.runtime.safety import GuardConfig

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
    main_slew_a_per_s: float = 0.1
    cm_slew_a_per_s: float = 0.2
    safe_slew_a_per_s: float = 0.005
    """Ramp to zero when going safe (A/s): 7 mA in 1.4 s, slow enough for the 6 H coil."""
    stale_after_s: float = 0.05
    hold_s: float = 1.0
    watchdog_vz_rms_m_per_s: float = 0.005
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
            slew_per_s=(s.main_slew_a_per_s, s.cm_slew_a_per_s),
            safe_slew_per_s=(s.safe_slew_a_per_s, s.safe_slew_a_per_s),
            frame_period_s=1.0 / s.frame_rate_hz, stale_after_s=s.stale_after_s, hold_s=s.hold_s,
            watch_names=("coil_vz_m_per_s",), watchdog_rms=(s.watchdog_vz_rms_m_per_s,),
            watchdog_window_s=s.watchdog_window_s))
        self.main_connected = True
        """The switchbox as applied: True = the source drives the main coil."""
        self.main_connect_wanted = True
        """The switchbox as the setpoints ask for it (applied once no current flows through it)."""
        self._refused_at = -1
        """Hardware frame of the last refused setpoint (-1: none)."""
        self.counters["relay_refused"] = 0
        self.main_driver = BusDriver(self, s.main_device)
        self.cm_driver = BusDriver(self, s.cm_device)
        self.subscribe(self.topics.setpoint("servo"), Setpoint, self.on_setpoint)

    def on_setpoint(self, sp: Setpoint) -> None:
        topic = self.topics.setpoint("servo")
        missing = [k for k in CURRENTS if k not in sp.values]
        if missing:
            self.reject(topic, f"setpoint lacks {', '.join(missing)}")
            return
        if "main_coil_connected" in sp.values:
            self.reject(topic, "main_coil_connected is a switch: send it in the setpoint's "
                               "switches as true or false, not as a value")
            return
        want = sp.switches.get("main_coil_connected", self.main_connect_wanted)
        request = [sp.values[k] for k in CURRENTS]
        if not want and request[0] != 0.0:
            self._refuse_relay(sp.frame, request[0])
            return
        if want != self.main_connected:
            request[0] = 0.0  # the switchbox changes only once its current has ramped to zero

        def taken() -> None:
            self.main_connect_wanted = want
        self.drive(sp.frame, request, taken)

    def _refuse_relay(self, frame: int, main_a: float) -> None:
        """A setpoint asking to open the coil with current through it: dropped, counted, and
        one event for a run of them (on the hardware's frame clock, not the setpoint's tag)."""
        for key in ("rejected", "relay_refused"):
            self.counters[key] = saturating_add(self.counters[key], 1)
        first = self._refused_at < 0 or self.last_frame - self._refused_at > self.settings.frame_rate_hz
        self._refused_at = self.last_frame
        if first:
            self.event("relay_refused",
                       f"setpoint for frame {frame} asks to open the main-coil switchbox with "
                       f"main_coil_current_a = {main_a:.6g} A, which no servo mode does (velocity "
                       "mode opens it with the current at zero): dropped, the switchbox stays "
                       f"{'closed' if self.main_connected else 'open'} (more in this run are "
                       "counted in relay_refused)", severity="alarm",
                       data={"frame": frame, "main_coil_current_a": main_a}, rate_limited=False)

    def watch_motion(self, frame: DaqFrame) -> Sequence[float]:
        return (frame.coil_vz_m_per_s,)

    def write_outputs(self, frame: int, outputs: np.ndarray) -> None:
        main = float(outputs[0])
        if self.main_connect_wanted != self.main_connected and main == 0.0:
            self.main_connected = self.main_connect_wanted
        self.main_driver.write(frame, self.main_dac.to_codes(main), [self.main_connected])
        self.cm_driver.write(frame, self.cm_dac.to_codes(float(outputs[1])), [True])

    def status_detail(self) -> dict[str, Any]:
        return {**super().status_detail(), "main_coil_connected": self.main_connected}
