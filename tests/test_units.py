"""Units as data (kibble.bus_schema.units): every numeric name the daemons and the simulator
publish has a declared unit (the frames' fields from their plausibility limits), and names a
suffix would misread have their own (in process, a few seconds)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from kibble.bus_schema.codec import decode
from kibble.bus_schema.topics import message_type_for
from kibble.bus_schema.units import unit_of
from kibble.hil_sim.bus import adapter_for
from kibble.services.inprocess import PLANTS, InProcessStack
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
    assert unit_of("bl_t_m") == "T m" and unit_of("dcdz_f_m") == "F/m"   # "m" by their suffixes
    assert unit_of("tau_hyst_n_m") == "N m"

