"""The plants' side of the bus: each plant mapped to its devices, sensor frames and truth.

:func:`adapter_for` gives a plant's adapter (its device table, the commands it holds, the
mapping of a frame's sensor row to a :class:`~kibble.bus_schema.messages.HwSensorFrame` and of
its truth row to ``sim/truth`` values, and the plant-level control commands);
:func:`plant_control` runs one of those commands (:data:`PLANT_COMMANDS`) as ``sim/cmd`` would.
The simulator on the bus (:class:`~kibble.hil_sim.server.SimServer`) and the in-process loop
both stand on it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from kibble.bus_schema.messages import HwSensorFrame

from . import efb as efb_model
from . import nist4 as nist4_model
from .devices import TRUTH_COLUMNS, ZERO_C_K, efb_devices, nist4_devices

__all__ = ["PLANTS", "PLANT_COMMANDS", "CommandArgs", "adapter_for", "plant_control"]


class _Adapter:
    """What the two plant adapters share: the plant-level control commands."""

    plant: Any
    held: Any

    def set_temperature(self, args: "CommandArgs") -> dict[str, Any]:
        temperature_k = args.get("temperature_k", float)
        immediate = args.get("immediate", bool, True)
        if not 173.15 <= temperature_k <= 373.15:
            raise ValueError(f"set_temperature: {temperature_k} K outside 173.15..373.15 K")
        self.plant.set_temperature(temperature_k - ZERO_C_K, immediate=immediate)
        return {"temperature_k": temperature_k, "immediate": immediate}

    def set_pressure(self, args: "CommandArgs") -> dict[str, Any]:
        pressure_pa = args.get("pressure_pa", float)
        self.plant.set_pressure(pressure_pa)
        return {"pressure_pa": pressure_pa}

    def run_held(self, n_frames: int, record_truth: bool) -> Any:
        """The plant's next ``n_frames`` under the held commands (its own Block type)."""
        return self.plant.run(self.held, n_frames, record_truth=record_truth)


class _Nist4Adapter(_Adapter):
    """Maps the NIST-4 plant to bus devices, sensor frames and truth."""

    model = "nist4"

    def __init__(self, plant: nist4_model.Nist4Plant) -> None:
        self.plant = plant
        self.devices = {d.name: d for d in nist4_devices(plant.params)}
        self.held = nist4_model.Nist4Actuators()
        p = plant.params
        self.mass = (bool(p["initial.test_mass_on"]), bool(p["initial.aux_on"]))
        self.truth_columns = TRUTH_COLUMNS["nist4"]

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
    def place_mass(self, args: "CommandArgs") -> dict[str, Any]:
        on = args.get("on", bool, True)
        self.set_mass(on, self.mass[1])
        return {"test_mass_on_pan": on}

    def remove_mass(self, args: "CommandArgs") -> dict[str, Any]:
        self.set_mass(False, self.mass[1])
        return {"test_mass_on_pan": False}

    def lift_aux(self, args: "CommandArgs") -> dict[str, Any]:
        on_pan = args.get("on_pan", bool, False)
        self.set_mass(self.mass[0], on_pan)
        return {"aux_on_pan": on_pan}

    def inject_force(self, args: "CommandArgs") -> dict[str, Any]:
        dof = args.get("dof", str, "z")
        value = args.get("value", float)
        duration_s = args.get("duration_s", float)
        self.plant.inject_force(dof, value, duration_s)
        return {"dof": dof, "value": value, "duration_s": duration_s}

    def inject_impulse(self, args: "CommandArgs") -> dict[str, Any]:
        dof = args.get("dof", str, "z")
        impulse = args.get("impulse", float)
        self.plant.inject_impulse(dof, impulse)
        return {"dof": dof, "impulse": impulse}


class _EfbAdapter(_Adapter):
    """Maps the EFB plant to bus devices, sensor frames and truth."""

    model = "efb"

    def __init__(self, plant: efb_model.EfbPlant) -> None:
        self.plant = plant
        self.devices = {d.name: d for d in efb_devices(plant.params)}
        self.held = efb_model.EfbActuators()
        self.mass = (False, False)
        self.load_kg = 0.0
        self.truth_columns = TRUTH_COLUMNS["efb"]

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

    def place_mass(self, args: "CommandArgs") -> dict[str, Any]:
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

    def remove_mass(self, args: "CommandArgs") -> dict[str, Any]:
        self._load(0.0)
        return {"m_load_kg": 0.0}

    def lift_aux(self, args: "CommandArgs") -> dict[str, Any]:
        raise ValueError("lift_aux: the EFB model has no auxiliary mass")

    def inject_force(self, args: "CommandArgs") -> dict[str, Any]:
        dof = args.get("dof", str, "z")
        if dof != "z":
            raise ValueError(f"inject_force: the EFB has one degree of freedom, 'z'; got {dof!r}")
        value = args.get("value", float)
        duration_s = args.get("duration_s", float)
        self.plant.inject_force(value, duration_s)
        return {"dof": dof, "value": value, "duration_s": duration_s}

    def inject_impulse(self, args: "CommandArgs") -> dict[str, Any]:
        dof = args.get("dof", str, "z")
        if dof != "z":
            raise ValueError(f"inject_impulse: the EFB has one degree of freedom, 'z'; got {dof!r}")
        impulse = args.get("impulse", float)
        self.plant.inject_impulse(impulse)
        return {"dof": dof, "impulse": impulse}


PLANTS: dict[str, type[nist4_model.Nist4Plant] | type[efb_model.EfbPlant]] = {
    "nist4": nist4_model.Nist4Plant, "efb": efb_model.EfbPlant}
"""Each instrument's plant model (the simulator on the bus and the in-process stack build it)."""

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
    parsed = CommandArgs(command, args)
    result = getattr(adapter, command)(parsed)
    parsed.check_unused()
    return result


_REQUIRED = object()


class CommandArgs:
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
