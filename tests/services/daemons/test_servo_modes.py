"""The servo's modes in process (issue 17): velocity mode handing the main coil's force to the
counter-mass motor before the switchbox opens, the approach from the stops and the recovery
procedure of the README, and what a restarted servo takes up from its persisted state."""

import numpy as np
import pytest

from kibble.bus_schema.codec import decode
from kibble.bus_schema.messages import Command, DaqFrame, HwActuatorCommand, Setpoint
from kibble.services.harness.inprocess import InProcessStack
from kibble.services.runtime.service import ServiceConfig
from kibble.services.daemons.servo import Servo

ACTUATORS = ("current_source", "damping", "theta_z")


async def test_velocity_mode_hands_the_force_to_the_motor_before_the_switchbox_opens():
    """Build item 4 of issue 17, at 1 kHz: force mode holding a 0.5 N external force with the
    main coil (0.7 mA), then velocity mode. The main-coil current ramps to zero at
    ``handover_slew_a_per_s`` (5 mA/s, what the counter-mass source's 0.2 A/s gives through the
    motor) while the motor takes the force over; the switchbox opens at zero current, after
    140 frames. Measured: the coil moves 1 nm; when the switchbox opened at once (and the motor
    took the force at its slew) it went 7.5 mm and tripped the current source."""
    stack = InProcessStack("nist4", rate_hz=1000.0, seed=11)
    try:
        await stack.start()
        hw = stack.tap(stack.topics.hw("main_source"))
        await stack.command("servo", "mode", mode="force")
        await stack.sim("inject_force", dof="z", value=-0.5, duration_s=100.0)
        held = await stack.run_seconds(8.0)
        n = len(hw)
        await stack.command("servo", "mode", mode="velocity")
        tr = await stack.run_seconds(3.0)
        cmds = [decode(p, HwActuatorCommand) for p in hw[n - 1:]]
    finally:
        stack.close()
    assert held["i_main_a"][-1] == pytest.approx(0.5 / held["bl_t_m"][-1], rel=1e-2)
    switched = [k for k in range(1, len(cmds)) if cmds[k].relays != cmds[k - 1].relays]
    assert len(switched) == 1 and cmds[switched[0]].relays == [False]
    assert cmds[switched[0]].codes == [0, 0] and all(c.codes != [0, 0] for c in cmds[:switched[0]])
    assert switched[0] == pytest.approx(held["i_main_a"][-1] / 5e-6, abs=3)
    assert np.abs(tr["z_m"]).max() < 0.1e-6
    assert stack.services["current_source"].guard.state == "armed"


async def _to_the_stops(stack: InProcessStack, cause: str) -> float:
    """Force mode, 1 kg on (auxiliary mass off), then one of the campaign's ways to the stops;
    where the coil ends (m)."""
    await stack.command("servo", "mode", mode="force")
    await stack.command("servo", "mass", aux=False, test=True)
    await stack.run_seconds(5.0, record=False)
    servo, daq_frame = stack.services["servo"], stack.topics.frame("daq")
    if cause == "load_dropped":        # what a restarted servo did: 0 A at the armed slew
        await stack.command("servo", "mode", mode="idle")
    elif cause == "servo_silent":      # a hung servo: stale, held 1 s, ramped down at 5 mA/s
        stack.routes[daq_frame].remove(servo)
    else:                              # beyond the loop's 10 N: flung to a stop, pulling at its limit
        await stack.sim("inject_force", dof="z", value=30.0, duration_s=0.5)
    tr = await stack.run_seconds(8.0)
    if cause == "servo_silent":
        stack.routes[daq_frame].append(servo)
    return float(tr["z_m"][-1])


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["load_dropped", "servo_silent", "kicked"])
async def test_the_documented_recovery_brings_the_coil_back_from_its_stops(cause):
    """Issue 17 finding 10: from the stops, ``reset``, ``arm`` and ``mode force`` stepped the
    reference 45 mm to ``z_ref_m``; the servo pulled at its limit and the watchdog tripped again
    (here too, on the code before: 26 mm/s RMS). The README's recovery: the servo ``idle``, the
    actuators reset and armed, then ``mode force``, whose reference now starts where the coil
    is and slews to ``z_ref_m`` at 1 mm/s (47.8 s from the lower stop): the coil is back at the
    null without a trip, the masses as they were. 200 Hz."""
    stack = InProcessStack("nist4", rate_hz=200.0, seed=7)
    try:
        await stack.start()
        assert await _to_the_stops(stack, cause) < -0.045
        assert stack.services["current_source"].guard.state in ("tripped", "safe")
        await stack.command("servo", "mode", mode="idle")
        await stack.run_seconds(0.1, record=False)
        for name in ACTUATORS:
            await stack.command(name, "reset")
            await stack.command(name, "arm")
        reply = await stack.command("servo", "mode", mode="force")
        tr = await stack.run_seconds(reply.get("duration_s", 0.0) + 10.0)
        state = await stack.command("servo", "state")
        guards = {name: stack.services[name].guard.state for name in ACTUATORS}
    finally:
        stack.close()
    assert guards == dict.fromkeys(ACTUATORS, "armed")
    assert reply["trajectory"] == "approach" and 45.0 < reply["duration_s"] < 50.0
    assert np.abs(tr["vz_m_per_s"]).max() < 1.1e-3              # the approach's 1 mm/s, no more
    assert np.abs(tr["z_m"][-200:]).max() < 10e-9           # held at the null
    assert state["mode"] == "force" and state["trajectory"] == ""
    assert state["test_mass_on"] and not state["aux_on"]


def _servo(state_dir, restore: bool) -> tuple[Servo, list[Setpoint]]:
    """A NIST-4 servo without a broker; its setpoints collected."""
    servo = Servo(ServiceConfig(state_dir=state_dir, restore=restore, settings={"frame_rate_hz": 200.0}))
    setpoints: list[Setpoint] = []
    topic = servo.topics.setpoint("servo")
    servo.attach_local(lambda t, payload, qos, retain: setpoints.append(decode(payload, Setpoint))
                       if t == topic else None)
    return servo, setpoints


def test_a_restarted_servo_holds_the_readback_until_it_is_safe_to_resume(tmp_path):
    """Finding 9's other cases, frame by frame: a servo that was in force mode with 1 kg on comes
    back with the coil 2 mm from the null (beyond ``step_limit_m``): it holds what the sources
    produce (their readback), reports the masses, and ``mode force`` then slews the reference
    from the coil. One that was in velocity mode holds with the switchbox open. A persisted
    state from before the frame clock restarted (a new simulator) is not taken up."""
    before, _ = _servo(tmp_path, restore=False)
    before.on_frame(DaqFrame(frame=100))
    before.cmd_mode(Command(id="1", command="mode", args={"mode": "force"}))
    before.cmd_mass(Command(id="2", command="mass", args={"test": True, "aux": False}))

    servo, setpoints = _servo(tmp_path, restore=True)
    assert servo.mode == "hold" and servo.mass_on == [True, False]
    servo.on_frame(DaqFrame(frame=500, coil_z_m=-2e-3, main_coil_current_a=3.45e-3,
                            counter_mass_current_a=1e-3))
    servo.on_frame(DaqFrame(frame=501, coil_z_m=-2e-3, main_coil_current_a=3.0e-3))
    assert servo.mode == "hold"
    assert [sp.values for sp in setpoints] == 2 * [{"main_coil_current_a": 3.45e-3,
                                                    "counter_mass_current_a": 1e-3}]
    assert [sp.switches for sp in setpoints] == 2 * [{"main_coil_connected": True}]
    reply = servo.cmd_mode(Command(id="3", command="mode", args={"mode": "force"}))
    assert reply["trajectory"] == "approach"
    servo.on_frame(DaqFrame(frame=502, coil_z_m=-2e-3, main_coil_current_a=3.45e-3))
    assert servo.ref[0, 0] == pytest.approx(-2e-3)            # from where the coil is
    assert setpoints[-1].values["main_coil_current_a"] == pytest.approx(3.45e-3, rel=1e-3)
    with pytest.raises(ValueError, match="an approach is running"):
        servo.cmd_mode(Command(id="4", command="mode", args={"mode": "idle"}))

    at_null, _ = _servo(tmp_path, restore=True)
    at_null.on_frame(DaqFrame(frame=700, coil_z_m=1e-6))      # within step_limit_m: resumed
    assert at_null.mode == "force"
    at_null.cmd_mode(Command(id="5", command="mode", args={"mode": "velocity"}))
    velocity, setpoints = _servo(tmp_path, restore=True)
    velocity.on_frame(DaqFrame(frame=800, main_coil_current_a=2e-9, counter_mass_current_a=4e-3))
    assert velocity.mode == "hold" and setpoints[-1].values == {
        "main_coil_current_a": 0.0, "counter_mass_current_a": 4e-3}
    assert setpoints[-1].switches == {"main_coil_connected": False}

    fresh, setpoints = _servo(tmp_path, restore=True)
    fresh.on_frame(DaqFrame(frame=3, main_coil_current_a=1e-3))
    assert fresh.mode == "idle" and fresh.mass_on == [False, True]    # as configured
    assert setpoints[-1].values["main_coil_current_a"] == 0.0
