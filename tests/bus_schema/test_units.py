"""Units as data (kibble.bus_schema.units): every numeric name the daemons and the simulator
publish has a declared unit (the frames' fields from their plausibility limits), and names a
suffix would misread have their own (in process, a few seconds). Names renamed to say their unit
divides (``units.RENAMED``): what was saved under an old name is restored under the new one, an
old name anywhere else is refused naming the new one."""

from __future__ import annotations

import asyncio
import sys

import msgspec
import pytest

from kibble.bus_schema import units
from kibble.bus_schema.codec import decode
from kibble.bus_schema.topics import message_type_for
from kibble.bus_schema.units import unit_of
from kibble.hil_sim.adapter import PLANTS, adapter_for
from kibble.hil_sim.params import ParamError as SimParamError, load_params
from kibble.services.daemons.current_source import CurrentSource
from kibble.services.harness.inprocess import InProcessStack
from kibble.services.runtime.params import ParamError, declared_params
from kibble.services.runtime.registry import SERVICES, service_class
from kibble.services.runtime.service import ServiceConfig
from kibble.services.daemons.servo import Servo
from kibble.services.instruments import DEFINITIONS, instrument

LEAVES = ("setpoint", "frame", "status", "event")


def numeric_names(msg: msgspec.Struct, within: str = "") -> set[tuple[str, str]]:
    """(name, the map or struct field it is in) of every numeric value of a decoded message."""
    out: set[tuple[str, str]] = set()
    for name in msg.__struct_fields__:
        value = getattr(msg, name)
        if isinstance(value, msgspec.Struct):
            out |= numeric_names(value, name)
        elif isinstance(value, dict):
            out |= {(k, name) for k, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        elif isinstance(value, (int, float, list)) and not isinstance(value, bool):
            out.add((name, within))
    return out


@pytest.mark.parametrize("model", sorted(DEFINITIONS))
def test_every_numeric_name_the_stack_publishes_has_a_declared_unit(model):
    stack = InProcessStack(model, rate_hz=1000.0, seed=1)
    topics = [f"kb/{model}/{svc}/{leaf}" for svc in instrument(model).daemons for leaf in LEAVES]
    topics += [f"kb/{model}/hw/{device}" for device in instrument(model).devices]
    taps = {topic: stack.tap(topic) for topic in topics}

    async def run() -> None:
        await stack.start()
        await stack.command("servo", "mode", mode="force")
        await stack.run_seconds(0.5, record=False)
    try:
        asyncio.run(run())
    finally:
        stack.close()
    seen: set[tuple[str, str]] = set()
    assert all(taps[f"kb/{model}/{svc}/status"] for svc in instrument(model).daemons)
    for topic, payloads in taps.items():
        for payload in payloads:
            seen |= numeric_names(decode(payload, message_type_for(topic)))
    undeclared = sorted(f"{within}/{name}" if within else name for name, within in seen
                        if unit_of(name, within) is None)
    assert not undeclared, f"no unit declared in bus_schema/units.py for {undeclared}"
    assert ("main_coil_current_a" if model == "nist4" else "hv_voltage_v", "values") in seen


@pytest.mark.parametrize("model", sorted(DEFINITIONS))
def test_the_simulators_truth_and_sensors_have_declared_units(model):
    adapter = adapter_for(PLANTS[model](seed=0))
    names = [name for name, _, _ in adapter.truth_columns]
    assert not [n for n in names if unit_of(n, "values") is None]
    assert unit_of("bl_t_m") == "T m" and unit_of("dcdz_f_per_m") == "F/m"   # "m" by their suffixes
    assert unit_of("tau_hyst_n_m") == "N m"



# ---------------------------------------------------------------- names renamed to say they divide

OLD = "gain_saved_before_a_rename"
"""A name standing for one saved before a rename (the tests below rename it to a real one)."""


@pytest.fixture
def renamed_kp(monkeypatch):
    """The servo's proportional gain renamed from :data:`OLD` (the table as the renames script
    writes it, with this one entry)."""
    monkeypatch.setattr(units, "RENAMED", {OLD: "kp_n_per_m"})
    return "kp_n_per_m"


def _servo(state_dir, restore=True, **config):
    return Servo(ServiceConfig(instrument="nist4", state_dir=state_dir, restore=restore, **config))


def test_a_state_file_saved_under_an_old_name_is_restored_under_the_new_one_with_a_notice(
        tmp_path, renamed_kp):
    """A servo tuned and saved before the rename: its tuned gain is restored, the notice names
    both, and the file is written again under the new name."""
    path = tmp_path / "nist4" / "servo.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(msgspec.json.encode(
        {"service": "servo", "session": 4, "params": {OLD: 6.1e4, "derivative_filter_s": 4e-3}}))
    servo = _servo(tmp_path)
    assert servo.params.values[renamed_kp] == 6.1e4
    assert servo.params.values["derivative_filter_s"] == 4e-3
    assert servo._restore_warnings == [f"servo.json: {OLD} is called {renamed_kp} now: "
                                       f"restored as {renamed_kp}"]
    saved = msgspec.json.decode(path.read_bytes())["params"]
    assert saved[renamed_kp] == 6.1e4 and OLD not in saved


def test_an_old_name_in_an_override_a_command_or_the_settings_is_refused_naming_the_new_one(
        tmp_path, renamed_kp, monkeypatch):
    with pytest.raises(ParamError, match=f"no parameter '{OLD}': it is called '{renamed_kp}' now"):
        _servo(tmp_path, param_overrides={OLD: 6.1e4})
    servo = _servo(tmp_path)
    with pytest.raises(ParamError, match=f"it is called '{renamed_kp}' now"):
        servo.params.set(OLD, 6.1e4, "operator", 0.0)
    with pytest.raises(ParamError, match=r"no parameter 'kp_unknown' \(known: "):
        servo.params.set("kp_unknown", 6.1e4, "operator", 0.0)
    monkeypatch.setattr(units, "RENAMED", {"limit_before": "main_limit_a"})
    with pytest.raises(ValueError, match="current_source settings: 'limit_before' is called "
                                         "'main_limit_a' now"):
        CurrentSource(ServiceConfig(instrument="nist4", state_dir=tmp_path, restore=False,
                                    settings={"limit_before": 0.01}))


def test_an_old_name_in_a_simulator_file_or_override_is_refused_naming_the_new_one(
        tmp_path, monkeypatch):
    monkeypatch.setattr(units, "RENAMED", {"q_before": "q"})
    with pytest.raises(SimParamError, match=r"'wheel.q_before' in overrides is called 'wheel.q' now"):
        load_params("nist4", {"wheel.q_before": 300})
    toml = tmp_path / "old.toml"
    toml.write_text('[wheel]\nq_before = { value = 300, source = "a file saved before" }\n')
    with pytest.raises(SimParamError, match=r"wheel.q_before is called wheel.q now: rename it"):
        load_params("nist4", path=toml)


def _declared_names() -> set[str]:
    """Every name of the unit table, every daemon's parameters and settings fields, and every
    simulator parameter (its last part)."""
    names = set(units.UNITS)
    for service in SERVICES:
        cls = service_class(service)
        names |= set(declared_params(cls))
        for value in vars(sys.modules[cls.__module__]).values():
            if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__name__.endswith("Settings"):
                names |= {f.name for f in msgspec.structs.fields(value)}
    for model in ("nist4", "efb"):
        names |= {n.rpartition(".")[2] for n in load_params(model).names()}
    return names


def test_no_renamed_name_is_declared_any_more_and_every_new_one_says_it_divides():
    """The table the renames script writes: none of its old names is a unit-table name, a
    parameter, a setting or a simulator parameter any more, and every new name says ``per``."""
    declared = _declared_names()
    assert {"kp_n_per_m", "main_limit_a", "q"} <= declared
    assert not sorted(set(units.RENAMED) & declared)
    assert all("_per_" in new.lower() for new in units.RENAMED.values())


def test_a_servo_state_file_naming_every_renamed_parameter_restores_them(tmp_path):
    """Every renamed parameter of the servo, saved under its old name at its default: each is
    restored under its new name with one notice."""
    old_names = {old: new for old, new in units.RENAMED.items() if new in declared_params(Servo)}
    path = tmp_path / "nist4" / "servo.json"
    path.parent.mkdir(parents=True)
    saved = {old: declared_params(Servo)[new].default for old, new in old_names.items()}
    path.write_bytes(msgspec.json.encode({"service": "servo", "params": saved}))
    servo = _servo(tmp_path)
    assert len(servo._restore_warnings) == len(old_names)
    assert all(f"restored as {new}" in w for new, w in zip(old_names.values(), servo._restore_warnings))
