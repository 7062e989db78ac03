"""The simulator's hardware as the bus sees it: the ``hw/<device>`` actuator devices of the bus
contract (:mod:`kibble.bus_schema.instruments`, which also says what each list of a sensor frame
holds) with the simulator's DAC widths (:class:`DeviceSpec`, :data:`NIST4_DEVICES`,
:data:`EFB_DEVICES`), and the names of the ground truth on ``sim/truth`` (:data:`TRUTH_NAMES`).
The tables are in ``hil_sim/README.md`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kibble.bus_schema.instruments import hw_devices

from . import efb as efb_model
from . import nist4 as nist4_model
from .params import load_params

__all__ = ["DeviceSpec", "NIST4_DEVICES", "EFB_DEVICES", "TRUTH_NAMES",
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


_DAC_BITS: dict[str, dict[str, tuple[str, ...]]] = {
    "nist4": {"main_source": ("main_source.coarse_bits", "main_source.fine_bits"),
              "cm_source": ("cm_source.coarse_bits", "cm_source.fine_bits"),
              "damping": ("damping_coils.dac_bits",) * 6, "theta_z_hv": ("theta_z.dac_bits",) * 6},
    "efb": {"hv": ("hv.dac_bits",)},
}
"""Per model and device, the parameter that gives each DAC channel's width (the channels of
:data:`kibble.bus_schema.instruments.HW_DEVICES`, in order)."""


def _devices(model: str, p) -> tuple[DeviceSpec, ...]:
    """The model's devices (:func:`kibble.bus_schema.instruments.hw_devices`) with the DAC
    widths of parameters ``p``."""
    bits = _DAC_BITS[model]
    return tuple(DeviceSpec(d.name, tuple(zip(d.codes, (p[k] for k in bits.get(d.name, ())), strict=True)),
                            d.relays, d.lockstep, d.doc) for d in hw_devices(model))


def nist4_devices(p) -> tuple[DeviceSpec, ...]:
    return _devices("nist4", p)


def efb_devices(p) -> tuple[DeviceSpec, ...]:
    return _devices("efb", p)


NIST4_DEVICES = nist4_devices(load_params("nist4"))
"""Device table of the NIST-4 model with the default DAC widths (the server uses its params)."""
EFB_DEVICES = efb_devices(load_params("efb"))
"""Device table of the EFB model with the default DAC widths."""


# plant truth field -> (bus name, offset added); the plant's degC become K
_TRUTH_MAP = {
    "nist4": {
        "theta": "theta_rad", "omega": "omega_rad_per_s", "z": "z_m", "vz": "vz_m_per_s",
        "i_main": "i_main_a", "i_cm": "i_cm_a", "i_main_reg": "i_main_reg_a",
        "i_cm_reg": "i_cm_reg_a", "x": "x_m", "y": "y_m", "theta_x": "theta_x_rad",
        "theta_y": "theta_y_rad", "theta_z": "theta_z_rad", "vx": "vx_m_per_s", "vy": "vy_m_per_s",
        "wx": "wx_rad_per_s", "wy": "wy_rad_per_s", "wz": "wz_rad_per_s", "bl": "bl_t_m", "emf": "emf_v",
        "coil_voltage": "coil_voltage_v", "magnet_temperature": "magnet_temperature_k",
        "agx": "agx_m_per_s2", "agy": "agy_m_per_s2", "agz": "agz_m_per_s2", "m_test": "m_test_kg",
        "m_aux": "m_aux_kg", "tau_hyst": "tau_hyst_n_m"},
    "efb": {
        "z": "z_m", "vz": "vz_m_per_s", "v_amp": "v_amp_v", "v_out": "v_out_v", "f_main": "f_main_n",
        "f_aux": "f_aux_n", "dcdz": "dcdz_f_per_m", "capacitance": "capacitance_f",
        "temperature": "temperature_k", "agz": "agz_m_per_s2", "m_load": "m_load_kg",
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
