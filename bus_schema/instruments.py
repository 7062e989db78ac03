"""The instruments on the bus and their hardware (issue 14 item 2): what the daemons and the
simulator (or a real rack's drivers) must agree on, and nothing else.

Each instrument id (``nist4``, ``efb``) names its ``hw/<device>`` actuator devices (their DAC
channels and relays, in the order of :class:`~kibble.bus_schema.messages.HwActuatorCommand`'s
``codes`` and ``relays``) and the channels of its ``hw/sensors`` frames. How wide each DAC is
belongs to the hardware (the simulator reads it from its parameters); what the daemons run,
their modes, plans and settings belong to ``kibble.services.instruments``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DAQ_FIELDS", "HwDevice", "HW_DEVICES", "INSTRUMENTS", "SENSOR_CHANNELS", "hw_devices",
           "lockstep_devices"]


@dataclass(frozen=True)
class HwDevice:
    """One ``hw/<name>`` actuator device: its DAC channels and relays (names, in message
    order), and whether the lockstep clock waits for it every frame."""

    name: str
    codes: tuple[str, ...]
    relays: tuple[str, ...]
    lockstep: bool = True
    doc: str = ""


HW_DEVICES: dict[str, tuple[HwDevice, ...]] = {
    "nist4": (
        HwDevice("main_source", ("coarse", "fine"), ("force_mode",),
                 doc="main-coil current source: I = FS/2^(cb-1) (coarse + fine span/2^fb); "
                     "relay True = source drives the coil (force mode), False = coil open, DVM reads U"),
        HwDevice("cm_source", ("coarse", "fine"), ("enable",),
                 doc="counter-mass motor current source; relay = output connected"),
        HwDevice("damping", tuple(f"set{k // 2}_{'vh'[k % 2]}" for k in range(6)), ("enable",),
                 doc="damping-coil DACs (set0 v, set0 h, set1 v, set1 h, set2 v, set2 h); "
                     "relay = coil relays closed"),
        HwDevice("theta_z_hv", tuple(f"plate{k // 2}_{'ab'[k % 2]}" for k in range(6)), ("enable",),
                 doc="theta-z HV amplifier DACs (plate0 a, plate0 b, ... plate2 b); relay = "
                     "amplifiers enabled (output 0 above the pressure limit)"),
        HwDevice("mass_lift", (), ("test_mass_on_pan", "aux_on_pan"), lockstep=False,
                 doc="mass handler, event-driven: applied when the relay state changes"),
    ),
    "efb": (
        HwDevice("hv", ("code",), ("to_main", "enable"),
                 doc="HV amplifier DAC (V = code FS/2^(bits-1)); relays: True = on the main "
                     "electrodes (weighing) / False = auxiliary electrode; output enabled"),
        HwDevice("mass_lift", (), ("small_on_holder", "large_on_holder"), lockstep=False,
                 doc="mass handler, event-driven: load = small_kg x small + large_kg x large, "
                     "ramped; applied when the relay state changes"),
    ),
}
"""Instrument id -> its ``hw/<device>`` actuator devices."""

INSTRUMENTS: tuple[str, ...] = tuple(HW_DEVICES)
"""The instrument ids (models) the software knows."""

SENSOR_CHANNELS: dict[str, dict[str, str]] = {
    "nist4": {
        "fringe_count": "[ifo0, ifo1, ifo2 (main coil retroreflectors), ifo3 (counter-mass)] "
                        "fringes of lambda/2, count up as the reflector rises",
        "fringe_phase_rad": "same 4 interferometers, phase within the fringe [0, 2 pi)",
        "psd_v": "[retro0 dx, retro0 dy, retro1 dx, retro1 dy, lever theta_x, lever theta_y] V",
        "dvm_v": "[DVM] V: velocity mode U (coil open), force mode R_std I",
        "current_monitor_v": "[main source monitor (500 V/A), counter-mass source monitor (200 V/A)] V",
        "capacitance_f": "[] (none)",
        "temperature_k": "magnet thermometer, K (plant degC + 273.15)",
        "pressure_pa": "vacuum gauge, Pa",
    },
    "efb": {
        "fringe_count": "[ifo] fringes of lambda/2, counts up as z rises",
        "fringe_phase_rad": "[ifo] phase within the fringe [0, 2 pi)",
        "psd_v": "[] (none)",
        "dvm_v": "[DVM] V: frame-averaged applied high voltage",
        "current_monitor_v": "[] (none)",
        "capacitance_f": "[bridge] F: main capacitor, updated every bridge.period_s, 0 before "
                         "the first reading",
        "temperature_k": "balance thermometer, K (plant degC + 273.15)",
        "pressure_pa": "vacuum gauge, Pa",
    },
}
"""What each list of :class:`~kibble.bus_schema.messages.HwSensorFrame` holds, per instrument
(channel order)."""

_POSE = ("coil_x_m", "coil_y_m", "coil_z_m", "coil_theta_x_rad", "coil_theta_y_rad", "coil_theta_z_rad")
DAQ_FIELDS: dict[str, tuple[str, ...]] = {
    "nist4": _POSE + ("coil_vx_m_per_s", "coil_vy_m_per_s", "coil_vz_m_per_s", "coil_wx_rad_per_s",
                      "coil_wy_rad_per_s", "coil_wz_rad_per_s", "counter_mass_z_m", "coil_voltage_v",
                      "main_coil_current_a", "counter_mass_current_a", "temperature_k", "pressure_pa"),
    "efb": ("coil_z_m", "coil_vz_m_per_s", "coil_voltage_v", "capacitance_f", "temperature_k",
            "pressure_pa"),
}
"""The :class:`~kibble.bus_schema.messages.DaqFrame` fields each instrument's daq measures (the
EFB's ``coil_z_m`` is its link's z, its ``coil_voltage_v`` the applied high voltage); the
others stay at their defaults. For the readers of the frame that show or publish it (the
operator's views)."""


def hw_devices(instrument: str) -> tuple[HwDevice, ...]:
    """The ``hw/`` actuator devices of ``instrument`` (``ValueError`` naming the known ones)."""
    try:
        return HW_DEVICES[instrument]
    except (KeyError, TypeError):
        raise ValueError(f"unknown instrument {instrument!r}; one of {', '.join(INSTRUMENTS)}") from None


def lockstep_devices(instrument: str) -> tuple[str, ...]:
    """The devices the lockstep clock waits for every frame (the event-driven ones left out)."""
    return tuple(d.name for d in hw_devices(instrument) if d.lockstep)
