"""Each instrument defined once (issue 14 item 2): the definitions agree with the bus contract,
the simulator's device tables and the daemons as ``kibble up`` configures them."""

import dataclasses

import pytest

from kibble.bus_schema.instruments import HW_DEVICES, INSTRUMENTS, hw_devices
from kibble.hil_sim.devices import EFB_DEVICES, NIST4_DEVICES
from kibble.hil_sim.params import MODELS
from kibble.services.runtime.actuator import ActuatorService
from kibble.services.harness.inprocess import InProcessStack
from kibble.services.instruments import DEFINITIONS, PLANS, instrument
from kibble.services.runtime.registry import SERVICES, service_class
from kibble.services.runtime.service import load_config
from kibble.services.harness.up import Stack


def configured(model: str, daemon: str, state_dir):
    cfg = load_config(daemon, instrument(model).config, instrument=model, state_dir=state_dir, restore=False)
    return service_class(daemon)(cfg)


def test_every_instrument_of_the_bus_has_one_definition_and_the_simulator_models_it():
    assert tuple(DEFINITIONS) == INSTRUMENTS == MODELS
    with pytest.raises(ValueError, match="unknown instrument 'watt'; one of nist4, efb"):
        instrument("watt")
    with pytest.raises(ValueError, match="unknown instrument 'watt'"):
        hw_devices("watt")


@pytest.mark.parametrize("model,sim_devices", [("nist4", NIST4_DEVICES), ("efb", EFB_DEVICES)])
def test_the_simulators_devices_are_the_bus_contracts(model, sim_devices):
    assert [(d.name, tuple(n for n, _ in d.codes), d.relays, d.lockstep, d.doc) for d in sim_devices] == \
        [(d.name, d.codes, d.relays, d.lockstep, d.doc) for d in HW_DEVICES[model]]
    assert all(bits > 0 for d in sim_devices for _, bits in d.codes)


@pytest.mark.parametrize("model", INSTRUMENTS)
def test_the_daemons_groups_and_actuators_are_registered_daemons(model):
    inst = instrument(model)
    assert set(inst.daemons) <= set(SERVICES)
    assert set(inst.actuators) <= set(inst.daemons) and set(inst.drives) == set(inst.actuators)
    assert sorted(inst.devices) == sorted(d.name for d in hw_devices(model) if d.lockstep)
    grouped = [n for group in inst.together for n in group]
    assert len(grouped) == len(set(grouped)) and set(grouped) <= set(inst.daemons)
    assert all(issubclass(service_class(n), ActuatorService) for n in inst.actuators)


@pytest.mark.parametrize("model", INSTRUMENTS)
async def test_the_actuators_drive_exactly_the_lockstep_devices(model):
    """In the in-process stack, the actuator daemons as configured answer every frame on every
    device the lockstep clock waits for, with commands the simulator's device table takes (no
    unknown device, the device's numbers of DAC codes and relays); the servo's mass lift is
    the instrument's event-driven device."""
    inst = instrument(model)
    stack = InProcessStack(model, rate_hz=200.0, seed=1)
    try:
        taps = {d.name: stack.tap(stack.topics.hw(d.name)) for d in hw_devices(model)}
        await stack.start()
        await stack.run_frames(3, record=False)
        lift = stack.services["servo"].settings.mass_lift_device
    finally:
        stack.close()
    assert stack.rejected_hw == []
    assert sorted(name for name, seen in taps.items() if seen) == sorted(inst.devices)
    assert all(len(taps[name]) >= 4 for name in inst.devices)       # hello + frames 0..2
    assert lift in taps and not next(d for d in hw_devices(model) if d.name == lift).lockstep


@pytest.mark.parametrize("model", INSTRUMENTS)
def test_the_daq_and_the_servo_are_configured_for_their_instrument(model, tmp_path):
    for daemon in ("daq", "servo"):
        assert configured(model, daemon, tmp_path).settings.kind == model
    servo = configured(model, "servo", tmp_path)
    with pytest.raises(ValueError) as refused:
        servo.core.set_mode("no-such-mode")
    assert f"one of {', '.join(m for m in instrument(model).modes if m != 'erase')} " in str(refused.value)


def test_a_daemon_of_an_unknown_instrument_is_refused(tmp_path):
    cfg = load_config("servo", instrument("efb").config, instrument="efb", state_dir=tmp_path, restore=False)
    cfg = dataclasses.replace(cfg, settings={**cfg.settings, "kind": "watt"})
    with pytest.raises(ValueError, match="unknown instrument 'watt'"):
        service_class("servo")(cfg)


def test_every_plan_belongs_to_one_instrument():
    names = [fn.__name__ for inst in DEFINITIONS.values() for fn in inst.plans]
    assert sorted(names) == sorted(PLANS) and len(names) == len(set(names))


def test_kibble_up_reads_the_definition():
    stack = Stack("efb", rate_hz=1000.0)
    assert stack.daemons == instrument("efb").daemons
    assert stack.together == instrument("efb").together
    assert Stack("nist4", rate_hz=200.0).processes == [(n,) for n in instrument("nist4").daemons]
    with pytest.raises(ValueError, match="unknown simulated instrument 'watt'"):
        Stack("watt")
