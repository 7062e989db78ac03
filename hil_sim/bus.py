"""The HIL simulator on the MQTT bus: :class:`SimServer` (``kibble sim``).

The simulator is the hardware. It subscribes only to the ``hw/<device>`` actuator topics
(:class:`~kibble.bus_schema.messages.HwActuatorCommand`: DAC codes and relay states) and to its
control topic ``sim/cmd``; it publishes only raw sensor frames on ``hw/sensors``
(:class:`~kibble.bus_schema.messages.HwSensorFrame`), the ground truth on ``sim/truth``
(:class:`~kibble.bus_schema.messages.SimTruth`), events on ``sim/event``, replies, and a retained
status on ``sim/status`` (last will: offline). The device and channel tables are in
``hil_sim/README.md`` and in :data:`NIST4_DEVICES` / :data:`EFB_DEVICES`.

Clocks (``clock``):

- ``realtime``: frame k is integrated and published at ``t0 + k / rate_hz`` on the monotonic
  clock (drift-free schedule); the plant integrates the commands last received (zero-order
  hold), as hardware does. ``t0`` is when every device of ``expect`` has said hello: the plant
  does not run (an EFB link falls ~0.1 mm in 5 s unheld) while the daemons are still starting.
  Within a receive batch only the newest command per device is applied.
- ``lockstep``: the simulator publishes frame k and integrates frame k + 1 only when every
  registered device has answered with a command tagged ``frame == k``, or when
  ``lockstep_timeout_s`` of wall time has passed (a miss per missing device; after
  ``drop_after_misses`` consecutive misses the device is unregistered until it speaks again).
  Same seed, same parameters and the same commands give bit-identical frames.

A lockstep device is registered by its first command (any frame tag, ``-1`` for "hello") or by
the ``register`` control command; frame 0 is published once every device of ``expect`` (and at
least one device) is registered. The event-driven ``mass_lift`` device is never waited for.

A command that does not decode, names another device than its topic, has the wrong number of
codes or relays, or a code outside its DAC range is rejected: the last good command stays held,
``rejected`` is counted and an event of kind ``rejected`` goes out on ``sim/event``
(rate-limited). A rejected command whose device and frame tag could be read still counts as the
device's lockstep answer (the loop goes on with the held command).

Timing of the frames: frame k holds the commands answered for frame k - 1 over one frame
period and is sampled at its end, ``sim_time_s = (k + 1) / rate_hz`` in lockstep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine, Mapping, Sequence

import aiomqtt
from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import (
    Command, HwActuatorCommand, HwSensorFrame, Message, Reply, SimTruth, Status, Timing,
)
from kibble.bus_schema.node import BusNode
from kibble.bus_schema.realtime import FrameIntake, FrameTiming, LoopTimer, saturating_add
from kibble.bus_schema.transport import DEFAULT_BROKER, corked, publish_now

from . import efb as efb_model
from . import nist4 as nist4_model
from .clock import LatencyTracker, LockstepGate, RealtimeSchedule
from .errors import ActuatorError, PlantError
from .params import load_params

__all__ = ["SimServer", "DeviceSpec", "NIST4_DEVICES", "EFB_DEVICES", "SENSOR_CHANNELS",
           "TRUTH_NAMES", "CLOCKS", "MODELS", "SERVICE_NAME", "PLANT_COMMANDS", "adapter_for",
           "plant_control", "load_overrides_file", "frame_overrides"]

log = logging.getLogger(__name__)

SERVICE_NAME = "sim"
"""The simulator's name on the bus: ``kb/<inst>/sim/{cmd,reply,event,status,truth}``."""
MODELS = ("nist4", "efb")
REALTIME_TRUTH_HZ = 100.0
"""Default rate of ``sim/truth`` on the realtime clock: enough for a 0.1 Hz null figure, and
no daemon pays for it (the tests and benchmarks that read it do)."""
CLOCKS = ("realtime", "lockstep")
ZERO_C_K = 273.15


# ============================================================================ devices


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


def _nist4_devices(p) -> tuple[DeviceSpec, ...]:
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


def _efb_devices(p) -> tuple[DeviceSpec, ...]:
    return (
        DeviceSpec("hv", (("code", p["hv.dac_bits"]),), ("to_main", "enable"),
                   doc="HV amplifier DAC (V = code FS/2^(bits-1)); relays: True = on the main "
                       "electrodes (weighing) / False = auxiliary electrode; output enabled"),
        DeviceSpec("mass_lift", (), ("small_on_holder", "large_on_holder"), lockstep=False,
                   doc="mass handler, event-driven: load = small_kg x small + large_kg x large, "
                       "ramped; applied when the relay state changes"),
    )


NIST4_DEVICES = _nist4_devices(load_params("nist4"))
"""Device table of the NIST-4 model with the default DAC widths (the server uses its params)."""
EFB_DEVICES = _efb_devices(load_params("efb"))
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
        raise RuntimeError(f"{model}: plant truth fields {missing} have no bus name in hil_sim/bus.py")
    return tuple((names[f], i, ZERO_C_K if names[f] in _KELVIN_TRUTH else 0.0)
                 for i, f in enumerate(fields) if f != "t")


_TRUTH_COLUMNS = {"nist4": _truth_columns("nist4", nist4_model.TRUTH_FIELDS),
                  "efb": _truth_columns("efb", efb_model.TRUTH_FIELDS)}
TRUTH_NAMES = {m: tuple(c[0] for c in cols) for m, cols in _TRUTH_COLUMNS.items()}
"""Keys of :attr:`SimTruth.values` per model (SI units in the names)."""


# ============================================================================ model adapters


class _Adapter:
    """What the two plant adapters share: the plant-level control commands."""

    plant: Any

    def set_temperature(self, args: "_Args") -> dict[str, Any]:
        temperature_k = args.get("temperature_k", float)
        immediate = args.get("immediate", bool, True)
        if not 173.15 <= temperature_k <= 373.15:
            raise ValueError(f"set_temperature: {temperature_k} K outside 173.15..373.15 K")
        self.plant.set_temperature(temperature_k - ZERO_C_K, immediate=immediate)
        return {"temperature_k": temperature_k, "immediate": immediate}

    def set_pressure(self, args: "_Args") -> dict[str, Any]:
        pressure_pa = args.get("pressure_pa", float)
        self.plant.set_pressure(pressure_pa)
        return {"pressure_pa": pressure_pa}


class _Nist4Adapter(_Adapter):
    """Maps the NIST-4 plant to bus devices, sensor frames and truth."""

    model = "nist4"

    def __init__(self, plant: nist4_model.Nist4Plant) -> None:
        self.plant = plant
        self.devices = {d.name: d for d in _nist4_devices(plant.params)}
        self.held = nist4_model.Nist4Actuators()
        p = plant.params
        self.mass = (bool(p["initial.test_mass_on"]), bool(p["initial.aux_on"]))
        self.truth_columns = _TRUTH_COLUMNS["nist4"]

    def apply(self, device: str, codes: list[int], relays: list[bool]) -> None:
        h = self.held
        if device == "main_source":
            h.main_coarse, h.main_fine = codes
            h.main_force_mode = relays[0]
        elif device == "cm_source":
            h.cm_coarse, h.cm_fine = codes
            h.cm_enable = relays[0]
        elif device == "damping":
            h.damping = tuple(codes)
            h.damping_enable = relays[0]
        elif device == "theta_z_hv":
            h.hv = tuple(codes)
            h.hv_enable = relays[0]
        elif device == "mass_lift":
            self.set_mass(relays[0], relays[1])
        else:  # the server only passes devices of self.devices
            raise KeyError(device)

    def held_table(self) -> dict[str, dict[str, list]]:
        h = self.held
        return {
            "main_source": {"codes": [h.main_coarse, h.main_fine], "relays": [h.main_force_mode]},
            "cm_source": {"codes": [h.cm_coarse, h.cm_fine], "relays": [h.cm_enable]},
            "damping": {"codes": list(h.damping), "relays": [h.damping_enable]},
            "theta_z_hv": {"codes": list(h.hv), "relays": [h.hv_enable]},
            "mass_lift": {"codes": [], "relays": list(self.mass)},
        }

    def set_mass(self, test_on: bool, aux_on: bool) -> None:
        if test_on != self.mass[0]:
            self.plant.place_mass(test_on)
        if aux_on != self.mass[1]:
            self.plant.lift_aux(on_pan=aux_on)
        self.mass = (test_on, aux_on)

    def sensor_frame(self, frame: int, row: list[float]) -> HwSensorFrame:
        return HwSensorFrame(
            frame=frame, sim_time_s=row[19],
            fringe_count=[int(row[0]), int(row[1]), int(row[2]), int(row[3])],
            fringe_phase_rad=row[4:8], psd_v=row[8:14], dvm_v=row[14:15],
            current_monitor_v=row[15:17], temperature_k=row[17] + ZERO_C_K, pressure_pa=row[18])

    # ---- control commands
    def place_mass(self, args: "_Args") -> dict[str, Any]:
        on = args.get("on", bool, True)
        self.set_mass(on, self.mass[1])
        return {"test_mass_on_pan": on}

    def remove_mass(self, args: "_Args") -> dict[str, Any]:
        self.set_mass(False, self.mass[1])
        return {"test_mass_on_pan": False}

    def lift_aux(self, args: "_Args") -> dict[str, Any]:
        on_pan = args.get("on_pan", bool, False)
        self.set_mass(self.mass[0], on_pan)
        return {"aux_on_pan": on_pan}

    def inject_force(self, args: "_Args") -> dict[str, Any]:
        dof = args.get("dof", str, "z")
        value = args.get("value", float)
        duration_s = args.get("duration_s", float)
        self.plant.inject_force(dof, value, duration_s)
        return {"dof": dof, "value": value, "duration_s": duration_s}

    def inject_impulse(self, args: "_Args") -> dict[str, Any]:
        dof = args.get("dof", str, "z")
        impulse = args.get("impulse", float)
        self.plant.inject_impulse(dof, impulse)
        return {"dof": dof, "impulse": impulse}


class _EfbAdapter(_Adapter):
    """Maps the EFB plant to bus devices, sensor frames and truth."""

    model = "efb"

    def __init__(self, plant: efb_model.EfbPlant) -> None:
        self.plant = plant
        self.devices = {d.name: d for d in _efb_devices(plant.params)}
        self.held = efb_model.EfbActuators()
        self.mass = (False, False)
        self.load_kg = 0.0
        self.truth_columns = _TRUTH_COLUMNS["efb"]

    def apply(self, device: str, codes: list[int], relays: list[bool]) -> None:
        if device == "hv":
            self.held.hv_code = codes[0]
            self.held.hv_to_main, self.held.hv_enable = relays
        elif device == "mass_lift":
            if (relays[0], relays[1]) != self.mass:
                p = self.plant.params
                self.mass = (relays[0], relays[1])
                self._load(relays[0] * p["masses.small_kg"] + relays[1] * p["masses.large_kg"])
        else:
            raise KeyError(device)

    def _load(self, kg: float) -> None:
        # EfbPlant.place_mass sets the ramp rate from the distance to go: apply changes only
        if kg != self.load_kg:
            self.plant.place_mass(float(kg))
            self.load_kg = kg

    def held_table(self) -> dict[str, dict[str, list]]:
        h = self.held
        return {"hv": {"codes": [h.hv_code], "relays": [h.hv_to_main, h.hv_enable]},
                "mass_lift": {"codes": [], "relays": list(self.mass)}}

    def sensor_frame(self, frame: int, row: list[float]) -> HwSensorFrame:
        return HwSensorFrame(
            frame=frame, sim_time_s=row[6], fringe_count=[int(row[0])], fringe_phase_rad=row[1:2],
            dvm_v=row[2:3], capacitance_f=[row[3] * 1e-12], temperature_k=row[4] + ZERO_C_K,
            pressure_pa=row[5])

    def place_mass(self, args: "_Args") -> dict[str, Any]:
        mass = args.get("mass", (str, float), "small")
        p = self.plant.params
        if isinstance(mass, str):
            if mass not in ("small", "large"):
                raise ValueError(f"place_mass: mass must be 'small', 'large' or kg, got {mass!r}")
            kg = p[f"masses.{mass}_kg"]
        else:
            kg = float(mass)
            if not (math.isfinite(kg) and 0.0 <= kg <= 1e-3):
                raise ValueError(f"place_mass: mass {kg!r} kg outside [0, 1e-3] kg")
        self._load(kg)
        return {"m_load_kg": kg}

    def remove_mass(self, args: "_Args") -> dict[str, Any]:
        self._load(0.0)
        return {"m_load_kg": 0.0}

    def lift_aux(self, args: "_Args") -> dict[str, Any]:
        raise ValueError("lift_aux: the EFB model has no auxiliary mass")

    def inject_force(self, args: "_Args") -> dict[str, Any]:
        dof = args.get("dof", str, "z")
        if dof != "z":
            raise ValueError(f"inject_force: the EFB has one degree of freedom, 'z'; got {dof!r}")
        value = args.get("value", float)
        duration_s = args.get("duration_s", float)
        self.plant.inject_force(value, duration_s)
        return {"dof": dof, "value": value, "duration_s": duration_s}

    def inject_impulse(self, args: "_Args") -> dict[str, Any]:
        dof = args.get("dof", str, "z")
        if dof != "z":
            raise ValueError(f"inject_impulse: the EFB has one degree of freedom, 'z'; got {dof!r}")
        impulse = args.get("impulse", float)
        self.plant.inject_impulse(impulse)
        return {"dof": dof, "impulse": impulse}


PLANT_COMMANDS = ("place_mass", "remove_mass", "lift_aux", "set_temperature", "set_pressure",
                  "inject_force", "inject_impulse")
"""The control commands that act on the plant (the rest act on the simulator's clock)."""


def adapter_for(plant: nist4_model.Nist4Plant | efb_model.EfbPlant) -> _Nist4Adapter | _EfbAdapter:
    """The bus adapter of ``plant``: its device table, held commands, sensor-frame and truth
    mapping and plant-level control commands. :class:`SimServer` uses it over MQTT; an
    in-process loop uses it without a broker."""
    if isinstance(plant, nist4_model.Nist4Plant):
        return _Nist4Adapter(plant)
    if isinstance(plant, efb_model.EfbPlant):
        return _EfbAdapter(plant)
    raise TypeError(f"no bus adapter for {type(plant).__name__}")


def plant_control(adapter: _Nist4Adapter | _EfbAdapter, command: str,
                  args: Mapping[str, Any]) -> dict[str, Any]:
    """Run one plant-level control command (:data:`PLANT_COMMANDS`) with ``args`` exactly as
    ``sim/cmd`` would; ``ValueError`` saying what was wrong with the command or an argument."""
    if command not in PLANT_COMMANDS:
        raise ValueError(f"unknown plant command {command!r}; one of {', '.join(PLANT_COMMANDS)}")
    parsed = _Args(command, args)
    result = getattr(adapter, command)(parsed)
    parsed.check_unused()
    return result


_REQUIRED = object()


class _Args:
    """Typed access to a :class:`Command`'s args; ``ValueError`` naming the argument."""

    def __init__(self, command: str, args: Mapping[str, Any]) -> None:
        self.command = command
        self.args = args
        self.used: set[str] = set()

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        self.used.add(name)
        if name not in self.args:
            if default is _REQUIRED:
                raise ValueError(f"{self.command}: missing argument {name!r}")
            return default
        value = self.args[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"{self.command}: argument {name!r} must be a {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.command}: argument {name!r} must be finite, got {value!r}")
        return value

    def names(self, name: str) -> list[str]:
        """A str or a list of str argument as a list."""
        self.used.add(name)
        value = self.args.get(name, _REQUIRED)
        if value is _REQUIRED:
            raise ValueError(f"{self.command}: missing argument {name!r}")
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) for v in items):
            raise ValueError(f"{self.command}: argument {name!r} must be a name or a list of names")
        return [v for item in items for v in item.split(",") if v]

    def check_unused(self) -> None:
        extra = sorted(set(self.args) - self.used)
        if extra:
            raise ValueError(f"{self.command}: unknown argument(s) {extra}")


# ============================================================================ parameters


def load_overrides_file(path: str | Path) -> dict[str, Any]:
    """Plant parameter overrides from a TOML file, as ``{dotted.name: value}``.

    Accepts nested tables (``[wheel]`` / ``q = 300``), dotted keys (``"wheel.q" = 300``) and
    the full parameter format (``q = { value = 300, ... }``: the value is taken), so a copy of
    ``hil_sim/nist4.toml`` with edited values works too.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read simulator parameters {path}: {exc}") from None
    out: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and "value" in value:
                out[name] = value["value"]
            elif isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = value

    walk(data, "")
    return out


def frame_overrides(model: str, rate_hz: float, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``overrides`` plus ``sim.frame_rate_hz = rate_hz``, checked: a frame must be a whole
    number of integration steps (``sim.rate_hz``, 10 kHz by default)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
    merged = dict(overrides or {})
    merged["sim.frame_rate_hz"] = float(rate_hz)
    step_hz = float(merged.get("sim.rate_hz", load_params(model)["sim.rate_hz"]))
    if not (math.isfinite(rate_hz) and 0 < rate_hz <= step_hz):
        raise ValueError(f"frame rate {rate_hz!r} Hz must be > 0 and <= the {step_hz:g} Hz "
                         "integration rate")
    n_sub = step_hz / rate_hz
    if abs(n_sub - round(n_sub)) > 1e-9:
        raise ValueError(f"frame rate {rate_hz:g} Hz is not a whole number of {step_hz:g} Hz "
                         f"integration steps (use e.g. 1000, 500, 250, 200 or 100 Hz)")
    return merged


# ============================================================================ the server


class _SimReceiver:
    """The simulator's side of :func:`~kibble.bus_schema.transport.deliver_directly`.

    In realtime each receive batch is conflated to the newest command per device (the hardware
    holds the last command it got, so the older ones of a batch would be overwritten unseen
    anyway); in lockstep every command is an answer and is handled in order.
    """

    __slots__ = ("sim", "intake", "messages", "skipped_at")

    def __init__(self, sim: "SimServer") -> None:
        self.sim = sim
        self.intake = sim.intake
        self.messages = 0
        self.skipped_at = 0

    def message(self, topic: str, payload: bytes) -> None:
        self.messages += 1
        if self.sim.clock == "realtime" and self.intake.offer(topic, payload):
            return
        self.sim._on_message(topic, payload)

    def batch_begin(self) -> None:
        self.messages = 0
        self.skipped_at = self.intake.skipped
        self.sim.timing.batch_begin()

    def batch_end(self) -> None:
        for topic, payloads in self.intake.take():
            for i in range(len(payloads) - 1, -1, -1):  # newest first; older ones only if it is bad
                if self.sim._on_message(topic, payloads[i]):
                    self.intake.skip(i)
                    break

    def batch_flushed(self) -> None:
        self.sim.timing.batch_end(self.messages, self.intake.skipped - self.skipped_at)


class SimServer(BusNode):
    """The HIL simulator as a bus participant (a :class:`~kibble.bus_schema.node.BusNode`).

    ::

        sim = SimServer("nist4", "lockstep", rate_hz=1000, seed=1, broker_url=url,
                        instrument="nist4", expect=("main_source",))
        task = asyncio.create_task(sim.run(install_signal_handlers=False))
        await sim.connected.wait()
        ...
        sim.stop(); await task

    ``params``: plant parameter overrides (``{dotted.name: value}``, see
    :func:`load_overrides_file`); ``rate_hz`` sets ``sim.frame_rate_hz``. ``expect``: lockstep
    devices that must be registered before frame 0. ``truth_every``: publish ``sim/truth``
    every n-th frame (0: never; None: every frame in lockstep, at most :data:`REALTIME_TRUTH_HZ`
    in realtime). ``max_frames``: stop after publishing that many frames (and,
    in lockstep, collecting the answers to the last one); 0 runs until :meth:`stop`.
    """

    name = SERVICE_NAME

    def __init__(self, model: str = "nist4", clock: str = "lockstep", rate_hz: float = 1000.0,
                 seed: int = 0, params: Mapping[str, Any] | None = None,
                 broker_url: str = DEFAULT_BROKER, instrument: str = "nist4",
                 expect: Sequence[str] = (), lockstep_timeout_s: float = 1.0,
                 drop_after_misses: int = 3, truth_every: int | None = None, max_frames: int = 0,
                 heartbeat_s: float = 1.0, client_id: str | None = None,
                 reconnect_min_s: float = 0.1, reconnect_max_s: float = 5.0,
                 noise: str = "published") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r}; one of {', '.join(CLOCKS)}")
        if truth_every is None:
            truth_every = 1 if clock == "lockstep" else max(1, int(round(rate_hz / REALTIME_TRUTH_HZ)))
        overrides = frame_overrides(model, rate_hz, params)
        super().__init__(instrument, broker_url, client_id or f"kibble-{instrument}-sim-{os.getpid()}",
                         heartbeat_s=heartbeat_s, reconnect_min_s=reconnect_min_s,
                         reconnect_max_s=reconnect_max_s)
        if not lockstep_timeout_s > 0:
            raise ValueError(f"lockstep timeout must be > 0 s, got {lockstep_timeout_s!r}")
        for name, value in (("drop_after_misses", drop_after_misses), ("truth_every", truth_every),
                            ("max_frames", max_frames)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.model = model
        self.clock = clock
        self.rate_hz = float(rate_hz)
        self.seed = seed
        plant_class = nist4_model.Nist4Plant if model == "nist4" else efb_model.EfbPlant
        self.plant = plant_class(overrides, seed=seed, noise=noise)
        self.adapter = adapter_for(self.plant)
        self.devices = self.adapter.devices
        for device in expect:
            spec = self.devices.get(device)
            if spec is None or not spec.lockstep:
                known = ", ".join(d for d, s in self.devices.items() if s.lockstep)
                raise ValueError(f"cannot expect device {device!r}: the {model} lockstep devices "
                                 f"are {known}")
        self.expect = frozenset(expect)
        self.lockstep_timeout_s = float(lockstep_timeout_s)
        self.truth_every = truth_every
        self.max_frames = max_frames

        self.t_sensors = self.topics.hw("sensors")
        self.t_truth = self.topics.sim("truth")
        self._device_topics = {self.topics.hw(name): spec for name, spec in self.devices.items()}

        self.frame = -1
        """Index of the last published sensor frame (-1: none yet)."""
        self.paused = False
        self.gate = LockstepGate(drop_after=drop_after_misses)
        self.latency = LatencyTracker()
        self.schedule = RealtimeSchedule(1.0 / self.rate_hz)
        self.timing = FrameTiming(1.0 / self.rate_hz)
        """CPU per frame (receiving the commands and integrating, publishing the frame) and
        the age of the commands applied."""
        self.intake = FrameIntake(self._device_topics)
        self._seen: set[str] = set()
        """Realtime: the devices heard from (their hello or any command)."""
        self._connected_devices = asyncio.Event()
        """Realtime: set once every device of ``expect`` has been heard from (at once when
        ``expect`` is empty), when frame 0 goes out."""
        if not self.expect:
            self._connected_devices.set()
        self.counters.update({"frames_out": 0, "frames_in": 0, "misses": 0, "dropped": 0,
                              "stale_tags": 0, "late": 0, "slips": 0, "plant_errors": 0})
        self._resume = asyncio.Event()
        self._resume.set()
        self._started = False
        self._gate_open = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_ok = dataclasses.replace(self.adapter.held)
        self._frame_seq = 0
        self._truth_seq = 0
        self._session = int(time.time())
        self.loop_timer = LoopTimer()
        """Period of the published sensor frames."""
        self._last_timing = Timing()
        self._rate_mark = (time.monotonic(), 0)
        self._steps_per_s = 0.0
        self.commands.update({
            "register": self._cmd_register, "unregister": self._cmd_unregister,
            "pause": self._cmd_pause, "resume": self._cmd_resume, "stats": self._cmd_stats,
            **{name: getattr(self.adapter, name) for name in PLANT_COMMANDS}})

    # ------------------------------------------------------------------ the node's hooks

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(topic, 0) for topic in self._device_topics]

    def receiver(self) -> _SimReceiver:
        return _SimReceiver(self)

    async def on_connected(self) -> None:
        if self.clock == "lockstep":
            if self._started and self._gate_open:
                self._arm_timer(self.frame)  # the frame may have been lost with the connection
            else:
                self._lockstep_next()

    def serve_tasks(self) -> list[Coroutine[Any, Any, Any]]:
        return [self._realtime()] if self.clock == "realtime" else []

    async def on_disconnect(self) -> None:
        self._cancel_timer()

    async def stopping(self) -> None:
        self._cancel_timer()

    def call_command(self, handler: Callable[[_Args], dict[str, Any]], cmd: Command) -> dict[str, Any]:
        args = _Args(cmd.command, cmd.args)
        result = handler(args)
        args.check_unused()
        return {"frame": self.frame, **result}

    def command_done(self, cmd: Command, reply: Reply) -> None:
        if reply.ok and cmd.command != "stats":
            self.event("control", f"{cmd.command} {dict(cmd.args)} from {cmd.client_id or '?'} "
                                  f"after frame {self.frame}",
                       data={"command": cmd.command, "frame": self.frame})
        super().command_done(cmd, reply)

    def _on_message(self, topic: str, payload: bytes) -> bool:
        """Every incoming message, from the socket-readable callback through
        :class:`_SimReceiver`: the ``hw/<device>`` commands and ``sim/cmd``. True if it was a
        device command that was applied. A bug met here is reported (``handler_error``) and
        the simulator goes on."""
        try:
            spec = self._device_topics.get(topic)
            if spec is not None:
                return self._on_hw(spec, topic, payload)
            if topic == self._t_cmd:
                self.command_received(payload)
        except Exception as exc:
            self.handler_failed(topic, exc)
        return False

    # ------------------------------------------------------------------ publishing

    def _stamp(self, msg: Message, seq: int) -> bytes:
        msg.seq = seq
        msg.t_mono_s = time.monotonic()
        msg.t_utc_s = time.time()
        return encode(msg)

    # ------------------------------------------------------------------ stepping

    def _step_and_publish(self) -> bool:
        """Integrate one frame with the held commands and publish it; False if the plant
        refused (the simulation is then paused)."""
        adapter = self.adapter
        k = self.frame + 1
        want_truth = self.truth_every and k % self.truth_every == 0
        try:
            block = self.plant.run(adapter.held, 1, record_truth=bool(want_truth))
        except ActuatorError as exc:
            # the device checks mirror the plant's; should one differ, fall back to the last
            # command set the plant accepted and say so
            self._reject_held(exc)
            block = self.plant.run(adapter.held, 1, record_truth=bool(want_truth))
        except PlantError as exc:
            self.counters["plant_errors"] += 1
            self.event("plant_error", f"frame {k}: {exc}; simulation paused", severity="alarm",
                       data={"frame": k})
            self._set_paused(True)
            return False
        self._last_ok = dataclasses.replace(adapter.held)
        self.frame = k
        client = self._client
        if client is None:
            self._publish_frame(k, block, want_truth, None)
        else:
            with corked(client):  # sensors and truth leave in one write
                self._publish_frame(k, block, want_truth, client)
        return True

    def _publish_frame(self, k: int, block: Any, want_truth: Any,
                       client: aiomqtt.Client | None) -> None:
        adapter = self.adapter
        self._frame_seq += 1
        msg = adapter.sensor_frame(k, block.sensors[0].tolist())
        payload = self._stamp(msg, self._frame_seq)
        t_pub = msg.t_mono_s
        if client is None or not publish_now(client, self.t_sensors, payload):
            self.counters["publish_failed"] += 1
        self.latency.published(k, t_pub)
        self.counters["frames_out"] += 1
        self.loop_timer.tick(t_pub)
        if want_truth:
            row = block.truth[0]
            values = {name: float(row[i]) + off for name, i, off in adapter.truth_columns}
            self._truth_seq += 1
            truth = SimTruth(frame=k, sim_time_s=msg.sim_time_s, model=self.model, values=values)
            if client is None or not publish_now(client, self.t_truth, self._stamp(truth, self._truth_seq)):
                self.counters["publish_failed"] += 1

    def _reject_held(self, exc: ActuatorError) -> None:
        self.counters["rejected"] += 1
        self.event("rejected", f"plant refused the held commands ({exc}); reverted to the last "
                               "accepted set", severity="warning",
                   data={"channel": exc.channel, "reason": str(exc), "frame": self.frame})
        self.adapter.held = dataclasses.replace(self._last_ok)

    # ---- realtime

    async def _realtime(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._started:  # the plant starts when the devices of ``expect`` are connected
            await self._connected_devices.wait()
            self._started = True
            self.event("started", f"realtime clock started with {sorted(self._seen)}",
                       data={"devices": sorted(self._seen)})
        sched = self.schedule
        sched.start(loop.time())
        while True:
            if self.paused:
                await self._resume.wait()
                sched.start(loop.time())
            delay = sched.deadline_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.paused:
                continue
            sched.frame_started(loop.time())
            self.counters["late"], self.counters["slips"] = sched.late, sched.slips
            self.timing.batch_begin()
            stepped = self._step_and_publish()
            self.timing.batch_end(0, 0)
            if not stepped:
                continue
            self.timing.frame_done()
            if self.max_frames and self.counters["frames_out"] >= self.max_frames:
                self._stop.set()
                return

    # ---- lockstep

    def _lockstep_next(self) -> None:
        """Publish the next lockstep frame if allowed (started, not paused, someone to wait for)."""
        if self.clock != "lockstep" or self._client is None:
            return
        if not self._started:
            if not self.gate.registered or not self.expect <= self.gate.registered:
                return
            self._started = True
            self.event("started", f"lockstep started with {sorted(self.gate.registered)}",
                       data={"devices": sorted(self.gate.registered)})
        self._gate_open = False
        if self.paused or not self.gate.registered:
            return
        if self.max_frames and self.counters["frames_out"] >= self.max_frames:
            self._stop.set()
            return
        if not self._step_and_publish():
            return
        self.timing.frame_done()
        self.gate.open(self.frame)
        self._gate_open = True
        self._arm_timer(self.frame)

    def _arm_timer(self, frame: int) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(
            self.lockstep_timeout_s, self._on_timeout, frame)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self, frame: int) -> None:
        self._timer = None
        if not self._gate_open or self.gate.frame != frame:
            return
        missed, dropped = self.gate.timeout()
        self.counters["misses"] += len(missed)
        self.counters["dropped"] += len(dropped)
        self.event("miss", f"frame {frame}: no answer within {self.lockstep_timeout_s} s from "
                           f"{', '.join(missed)}", severity="warning",
                   data={"frame": frame, "devices": missed})
        for device in dropped:
            self.event("dropped", f"{device} unregistered after {self.gate.drop_after} "
                                  "consecutive misses (its next command registers it again)",
                       severity="warning", data={"device": device, "frame": frame})
        self._lockstep_next()

    # ------------------------------------------------------------------ hardware commands

    def _reject(self, device: str, topic: str, reason: str, frame: int | None) -> None:
        self.reject(topic, reason, data={"device": device, "frame": -1 if frame is None else frame,
                                         "sim_frame": self.frame})

    def _on_hw(self, spec: DeviceSpec, topic: str, payload: bytes) -> bool:
        """One device command; True if applied."""
        t_rx = time.monotonic()
        try:
            msg = decode(payload, HwActuatorCommand)
        except DecodeError as exc:
            self._reject(spec.name, topic, str(exc), None)
            return False
        if msg.device != spec.name:
            self._reject(spec.name, topic, f"payload names device {msg.device!r}, topic is "
                                           f"{spec.name!r}", msg.frame)
            return False
        self.timing.acted(msg.t_mono_s, t_rx)
        reason = spec.check(msg.codes, msg.relays)
        if reason is None:
            self.adapter.apply(spec.name, msg.codes, msg.relays)
            self.counters["frames_in"] += 1
        else:
            self._reject(spec.name, topic, reason, msg.frame)
        self.latency.answered(spec.name, msg.frame, t_rx)
        if self.clock != "lockstep" or not spec.lockstep:
            if spec.lockstep and spec.name not in self._seen:
                self._seen.add(spec.name)
                if self.expect <= self._seen:
                    self._connected_devices.set()
            return reason is None
        if 0 <= msg.frame < self.frame:
            self.counters["stale_tags"] += 1
        if self.gate.register(spec.name):
            self.event("registered", f"{spec.name} registered (lockstep waits for it from frame "
                                     f"{self.frame + 1})", data={"device": spec.name})
            if not self._started or not self._gate_open:
                self._lockstep_next()
        elif self._gate_open and self.gate.answer(spec.name, msg.frame, msg.hold_frames):
            self._cancel_timer()
            self._lockstep_next()
        return reason is None

    # ------------------------------------------------------------------ control commands

    def _lockstep_devices(self, args: _Args, name: str) -> list[str]:
        devices = args.names(name)
        for device in devices:
            spec = self.devices.get(device)
            if spec is None or not spec.lockstep:
                known = ", ".join(d for d, s in self.devices.items() if s.lockstep)
                raise ValueError(f"{args.command}: {device!r} is not a lockstep device of the "
                                 f"{self.model} model ({known})")
        return devices

    def _cmd_register(self, args: _Args) -> dict[str, Any]:
        devices = self._lockstep_devices(args, "devices")
        new = [d for d in devices if self.gate.register(d)]
        if self.clock == "lockstep" and new and (not self._started or not self._gate_open):
            self._lockstep_next()
        return {"registered": sorted(self.gate.registered), "new": new}

    def _cmd_unregister(self, args: _Args) -> dict[str, Any]:
        devices = self._lockstep_devices(args, "devices")
        gone = [d for d in devices if self.gate.unregister(d)]
        if self._gate_open and self.gate.complete:
            self._cancel_timer()
            self._lockstep_next()
        return {"registered": sorted(self.gate.registered), "removed": gone}

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if paused:
            self._resume.clear()
        else:
            self._resume.set()

    def _cmd_pause(self, args: _Args) -> dict[str, Any]:
        self._set_paused(True)
        return {"paused": True}

    def _cmd_resume(self, args: _Args) -> dict[str, Any]:
        self._set_paused(False)
        if self.clock == "lockstep" and not self._gate_open:
            self._lockstep_next()
        return {"paused": False}

    def _cmd_stats(self, args: _Args) -> dict[str, Any]:
        reset = args.get("reset", bool, False)
        lat = {d: self.latency.summary(d).as_dict() for d in self.latency.devices()}
        total = self.latency.summary()
        result = {
            "model": self.model, "clock": self.clock, "rate_hz": self.rate_hz,
            "sim_time_s": (self.frame + 1) / self.rate_hz, "paused": self.paused,
            "registered": sorted(self.gate.registered), "counters": dict(self.counters),
            "misses_by_device": dict(self.gate.misses), "latency": lat,
            "latency_p50_ms": total.p50_ms, "latency_p99_ms": total.p99_ms,
            "latency_n": total.n, "steps_per_s": self._steps_per_s,
            "held": self.adapter.held_table()}
        if reset:
            self.latency.reset()
        return result

    # ------------------------------------------------------------------ status

    def status(self, online: bool = True, interval: bool = False) -> Status:
        mean, jitter, peak = self.loop_timer.snapshot() if interval else (0.0, 0.0, 0.0)
        now = time.monotonic()
        if interval:
            self._last_timing = self.timing.snapshot()
            t_mark, f_mark = self._rate_mark
            if now > t_mark:
                self._steps_per_s = (self.counters["frames_out"] - f_mark) / (now - t_mark)
            self._rate_mark = (now, self.counters["frames_out"])
        lat = self.latency.summary()
        if not online:
            state = "offline"
        elif self.paused or (self.clock == "lockstep" and not self._gate_open):
            state = "idle"
        else:
            state = "running"
        self.counters["commands_skipped"] = self.intake.skipped
        return Status(
            service=SERVICE_NAME, state=state, online=online, session=self._session,
            client_id=self.client_id, heartbeat=self.heartbeats,
            uptime_s=now - self.t_start_s,
            counters={k: saturating_add(v, 0) for k, v in self.counters.items()},
            loop_period_mean_s=mean, loop_period_jitter_s=jitter, loop_period_max_s=peak,
            loop_overruns=self.timing.overruns, timing=self._last_timing if online else Timing(),
            detail={"model": self.model, "clock": self.clock, "rate_hz": self.rate_hz,
                    "seed": self.seed, "frame": self.frame, "paused": self.paused,
                    "registered": ",".join(sorted(self.gate.registered)),
                    "steps_per_s": self._steps_per_s, "latency_p50_ms": lat.p50_ms,
                    "latency_p99_ms": lat.p99_ms, "latency_n": lat.n})
