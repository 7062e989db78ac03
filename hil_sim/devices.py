"""The simulator's hardware as the bus sees it: the ``hw/<device>`` actuator devices
(:class:`DeviceSpec`, :data:`NIST4_DEVICES`, :data:`EFB_DEVICES`), what each list of a sensor
frame holds (:data:`SENSOR_CHANNELS`) and the names of the ground truth on ``sim/truth``
(:data:`TRUTH_NAMES`). The tables are in ``hil_sim/README.md`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import efb as efb_model
from . import nist4 as nist4_model
from .params import load_params

__all__ = ["DeviceSpec", "NIST4_DEVICES", "EFB_DEVICES", "SENSOR_CHANNELS", "TRUTH_NAMES",
           "TRUTH_COLUMNS", "ZERO_C_K", "nist4_devices", "efb_devices"]

ZERO_C_K = 273.15


@dataclass(frozen=True)
class DeviceSpec:
    """One ``hw/<name>`` actuator device: its DAC channels (name, bits) and relays, and whether
    the lockstep clock waits for it every frame."""

    name: str
    codes: tuple[tuple[str, int], ...]
    relays: tuple[str, ...]
    lockstep: bool = True
    doc: str = ""

    def check(self, codes: Sequence[int], relays: Sequence[bool]) -> str | None:
        """None if ``codes``/``relays`` fit this device, else the reason (names the channel)."""
        if len(codes) != len(self.codes):
            names = ", ".join(n for n, _ in self.codes) or "none"
            return f"{self.name} takes {len(self.codes)} codes ({names}), got {len(codes)}"
        if len(relays) != len(self.relays):
            names = ", ".join(self.relays) or "none"
            return f"{self.name} takes {len(self.relays)} relays ({names}), got {len(relays)}"
        for (name, bits), code in zip(self.codes, codes):
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if not lo <= code <= hi:
                return f"{self.name} code {name} = {code} outside its {bits}-bit range [{lo}, {hi}]"
        return None


def nist4_devices(p) -> tuple[DeviceSpec, ...]:
    mc, mf = p["main_source.coarse_bits"], p["main_source.fine_bits"]
    cc, cf = p["cm_source.coarse_bits"], p["cm_source.fine_bits"]
    db, hb = p["damping_coils.dac_bits"], p["theta_z.dac_bits"]
    return (
        DeviceSpec("main_source", (("coarse", mc), ("fine", mf)), ("force_mode",),
                   doc="main-coil current source: I = FS/2^(cb-1) (coarse + fine span/2^fb); "
                       "relay True = source drives the coil (force mode), False = coil open, DVM reads U"),
        DeviceSpec("cm_source", (("coarse", cc), ("fine", cf)), ("enable",),
                   doc="counter-mass motor current source; relay = output connected"),
        DeviceSpec("damping", tuple((f"set{k // 2}_{'vh'[k % 2]}", db) for k in range(6)),
                   ("enable",), doc="damping-coil DACs (set0 v, set0 h, set1 v, set1 h, set2 v, "
                                    "set2 h); relay = coil relays closed"),
        DeviceSpec("theta_z_hv", tuple((f"plate{k // 2}_{'ab'[k % 2]}", hb) for k in range(6)),
                   ("enable",), doc="theta-z HV amplifier DACs (plate0 a, plate0 b, ... plate2 b); "
                                    "relay = amplifiers enabled (output 0 above the pressure limit)"),
        DeviceSpec("mass_lift", (), ("test_mass_on_pan", "aux_on_pan"), lockstep=False,
                   doc="mass handler, event-driven: applied when the relay state changes"),
    )


def efb_devices(p) -> tuple[DeviceSpec, ...]:
    return (
        DeviceSpec("hv", (("code", p["hv.dac_bits"]),), ("to_main", "enable"),
                   doc="HV amplifier DAC (V = code FS/2^(bits-1)); relays: True = on the main "
                       "electrodes (weighing) / False = auxiliary electrode; output enabled"),
        DeviceSpec("mass_lift", (), ("small_on_holder", "large_on_holder"), lockstep=False,
                   doc="mass handler, event-driven: load = small_kg x small + large_kg x large, "
                       "ramped; applied when the relay state changes"),
    )


NIST4_DEVICES = nist4_devices(load_params("nist4"))
"""Device table of the NIST-4 model with the default DAC widths (the server uses its params)."""
EFB_DEVICES = efb_devices(load_params("efb"))
"""Device table of the EFB model with the default DAC widths."""

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
"""What each list of :class:`HwSensorFrame` holds, per model (channel order)."""

# plant truth field -> (bus name, offset added); the plant's degC become K
_TRUTH_MAP = {
    "nist4": {
        "theta": "theta_rad", "omega": "omega_rad_s", "z": "z_m", "vz": "vz_m_s",
        "i_main": "i_main_a", "i_cm": "i_cm_a", "i_main_reg": "i_main_reg_a",
        "i_cm_reg": "i_cm_reg_a", "x": "x_m", "y": "y_m", "theta_x": "theta_x_rad",
        "theta_y": "theta_y_rad", "theta_z": "theta_z_rad", "vx": "vx_m_s", "vy": "vy_m_s",
        "wx": "wx_rad_s", "wy": "wy_rad_s", "wz": "wz_rad_s", "bl": "bl_t_m", "emf": "emf_v",
        "coil_voltage": "coil_voltage_v", "magnet_temperature": "magnet_temperature_k",
        "agx": "agx_m_s2", "agy": "agy_m_s2", "agz": "agz_m_s2", "m_test": "m_test_kg",
        "m_aux": "m_aux_kg", "tau_hyst": "tau_hyst_n_m"},
    "efb": {
        "z": "z_m", "vz": "vz_m_s", "v_amp": "v_amp_v", "v_out": "v_out_v", "f_main": "f_main_n",
        "f_aux": "f_aux_n", "dcdz": "dcdz_f_m", "capacitance": "capacitance_f",
        "temperature": "temperature_k", "agz": "agz_m_s2", "m_load": "m_load_kg",
        "f_hyst": "f_hyst_n"},
}
_KELVIN_TRUTH = {"magnet_temperature_k", "temperature_k"}


def _truth_columns(model: str, fields: Sequence[str]) -> tuple[tuple[str, int, float], ...]:
    names = _TRUTH_MAP[model]
    missing = [f for f in fields if f != "t" and f not in names]
    if missing:
        raise RuntimeError(f"{model}: plant truth fields {missing} have no bus name in hil_sim/devices.py")
    return tuple((names[f], i, ZERO_C_K if names[f] in _KELVIN_TRUTH else 0.0)
                 for i, f in enumerate(fields) if f != "t")


# per model: (bus name, column of the plant's truth row, offset added)
TRUTH_COLUMNS = {"nist4": _truth_columns("nist4", nist4_model.TRUTH_FIELDS),
                  "efb": _truth_columns("efb", efb_model.TRUTH_FIELDS)}
TRUTH_NAMES = {m: tuple(c[0] for c in cols) for m, cols in TRUTH_COLUMNS.items()}
"""Keys of :attr:`SimTruth.values` per model (SI units in the names)."""
