"""The servo's pure core without a bus (issue 14 item 3), as the actuator guard is tested: the
actuator maps against their laws (``I = F / Bl``; ``F = kappa (V - V_s)^2``), the velocity-mode
handover, the mass exchange against ``m g = Bl I`` with a plant written here, restart take-up
and the refusals, and the effects the shell carries out, in order."""

import math

import numpy as np
import pytest

from kibble.bus_schema.messages import DaqFrame
from kibble.services.runtime.actuator import typed_settings
from kibble.services.instruments import instrument
from kibble.services.runtime.params import declared_params
from kibble.services.runtime.service import load_config
from kibble.services.daemons.servo import Servo, ServoSettings
from kibble.services.daemons.servo_core import CurrentMap, ServoCore, VoltageMap


def configured(model: str, saved=None, **params) -> ServoCore:
    """A core as ``kibble up --sim MODEL`` configures the servo (services/instruments/<model>.toml)."""
    cfg = load_config("servo", instrument(model).config, instrument=model, restore=False)
    values = {name: p.default for name, p in declared_params(Servo).items()}
    values.update(cfg.params, **params)
    settings = typed_settings(cfg.settings, ServoSettings, "servo")
    return ServoCore(settings, values, instrument(model).actuator_map, instrument(model).modes, saved)


def kinds(effects):
    return [e[1] if e[0] in ("event", "state") else e[0] for e in effects]


def test_the_instruments_choose_their_maps():
    assert configured("nist4").actuators.__class__ is CurrentMap
    assert configured("efb").actuators.__class__ is VoltageMap


def test_current_map_force_mode_is_force_over_bl_within_the_limit():
    core = configured("nist4")
    m = core.actuators
    bl = core.values["bl_t_m"]
    sp, switches = m.setpoint("force", 4.9, core.values)
    assert sp == {"main_coil_current_a": 4.9 / bl, "counter_mass_current_a": 0.0}
    assert switches == {"main_coil_connected": True}
    assert m.force(core.values) == pytest.approx(4.9, rel=1e-15)
    assert m.setpoint("force", 100.0, core.values)[0]["main_coil_current_a"] == core.settings.main_limit_a
    assert m.setpoint("idle", 0.0, core.values)[0]["main_coil_current_a"] == 0.0


def test_current_map_velocity_mode_hands_the_force_to_the_motor_at_the_handover_slew():
    """Each frame the main-coil current drops by ``handover_slew_a_per_s dt``; the motor carries
    the rest, so the two together produce the loop's force; the switchbox opens once the main
    current is zero, after ceil(I0 / (slew dt)) frames."""
    core = configured("nist4")
    m, v = core.actuators, core.values
    i0 = 0.7e-3
    m.setpoint("force", i0 * v["bl_t_m"], v)
    m.switch("velocity")
    frames, sp = 0, None
    while True:
        sp, switches = m.setpoint("velocity", 0.5, v)
        frames += 1
        assert m.force(v, motor_too=True) == pytest.approx(0.5, rel=1e-12)
        if not switches["main_coil_connected"]:
            break
    assert frames == math.ceil(i0 / (v["handover_slew_a_per_s"] * core.dt_s) - 1e-9)
    assert sp["main_coil_current_a"] == 0.0
    assert sp["counter_mass_current_a"] == pytest.approx(-0.5 / v["motor_bl_t_m"], rel=1e-12)


@pytest.mark.parametrize("polarity", ["+", "-"])
def test_voltage_map_meets_the_force_law_with_either_polarity(polarity):
    core = configured("efb", polarity=polarity, surface_potential_v=0.05)
    m, v = core.actuators, core.values
    f = 4.735e-6 + 1e-6 * 9.8
    volts = m.setpoint("force", f, v)[0]["hv_voltage_v"]
    assert volts == pytest.approx(0.05 + (1 if polarity == "+" else -1) * math.sqrt(f / v["kappa_f_per_m"]), rel=1e-14)
    assert m.force(v) == pytest.approx(f, rel=1e-12)
    assert m.setpoint("force", -1.0, v)[0]["hv_voltage_v"] == 0.05           # only pulls: zero force
    assert abs(m.setpoint("force", 1.0, v)[0]["hv_voltage_v"]) == core.settings.hv_limit_v


def test_voltage_map_gradient_mode_drives_the_auxiliary_electrode_with_the_same_force():
    core = configured("efb", aux_kappa_f_per_m=1.0e-10, aux_surface_potential_v=0.02)
    m, v = core.actuators, core.values
    m.setpoint("force", 4.735e-6, v)
    before = m.force(v)
    m.switch("gradient")
    sp, switches = m.setpoint("gradient", before, v)
    assert switches == {"hv_to_main": False}
    assert sp["hv_voltage_v"] == pytest.approx(0.02 + math.sqrt(before / 1.0e-10), rel=1e-14)
    assert m.force(v) == pytest.approx(before, rel=1e-12)


def test_mode_change_lists_its_effects_in_order_and_persists_the_mode():
    core = configured("nist4")
    core.step(DaqFrame(frame=10))
    assert core.effects == []
    reply = core.set_mode("force")
    assert reply == {"mode": "force", "frame": 10}
    assert kinds(core.effects) == ["running", "mode", "save"]
    assert core.operating() == {"mode": "force", "test_mass_on": False, "aux_on": True}
    core.effects.clear()
    core.erase()
    assert core.operating()["mode"] == "force"                              # erase persists as force


@pytest.mark.parametrize("model,call,text", [
    ("nist4", lambda c: c.set_mode("erase"), "erase: use the erase command"),
    ("nist4", lambda c: c.set_mode("gradient"), "mode must be one of idle, force, velocity"),
    ("efb", lambda c: c.sweep("down"), "sweep is a NIST-4 velocity-mode command"),
    ("nist4", lambda c: c.mass({"test": 1}), "mass exchange needs force mode"),
    ("nist4", lambda c: c.move(0.01), "move needs velocity mode at rest"),
    ("efb", lambda c: c.move(0.01), "move needs gradient mode at rest"),
])
def test_refusals_name_the_reason(model, call, text):
    core = configured(model)
    core.step(DaqFrame(frame=1))
    with pytest.raises(ValueError, match=text):
        call(core)
    assert core.effects == [] and core.mode == "idle"


def test_a_move_beyond_the_sweep_range_is_refused():
    core = configured("nist4")
    core.step(DaqFrame(frame=1))
    core.set_mode("velocity")
    with pytest.raises(ValueError, match="beyond"):
        core.move(0.05)
    reply = core.move(-0.01)
    assert reply["end_m"] == -0.01 and reply["duration_s"] > 0.01 / core.values["sweep_speed_m_per_s"]


def _run_nist4(core: ServoCore, plant_bl: float, seconds: float, z0: float = 0.0):
    """The core against a 1-DOF coil written here: ``m z'' = -k z + Bl_plant I - m_load g``,
    the load as the lift ramps it (linear over ``lift_ramp_s``), two frames of delay from
    the current set to the force (the source's lag); positions per frame."""
    v = core.values
    m, k, g, ramp = v["effective_mass_kg"], v["spring_n_per_m"], v["g_m_per_s2"], v["lift_ramp_s"]
    dt = core.dt_s
    z, vz, zs, currents, loads = z0, 0.0, [], [0.0, 0.0], []
    frame0 = core.frame
    for n in range(int(seconds / dt)):
        frame = frame0 + 1 + n
        sp, _, _ = core.step(DaqFrame(frame=frame, coil_z_m=z))
        currents.append(sp["main_coil_current_a"])
        t = frame * dt
        load = sum(dm * min(max((t - t0) / ramp, 0.0), 1.0) for t0, dm in core.load_steps)
        loads.append(load)
        a = (-k * z + plant_bl * currents[-3] - load * g) / m
        vz += a * dt
        z += vz * dt
        zs.append(z)
    return np.array(zs), np.array(currents[2:])


def test_a_mass_exchange_ends_with_m_g_equal_to_bl_i():
    """1 kg on in force mode: the feedforward announces the load, the loop holds the null and
    the current settles where the plant's force balances the weight, ``I = m g / Bl`` of the
    plant (1 % off the servo's calibrated Bl: the loop, not the feedforward, sets it)."""
    core = configured("nist4")
    core.step(DaqFrame(frame=0))
    core.set_mode("force")
    plant_bl = 1.01 * core.values["bl_t_m"]
    reply = core.mass({"test": True})
    assert reply["delta_kg"] == 1.0 and kinds(core.effects)[-3:] == ["save", "mass_lift", "mass"]
    assert core.effects[-2] == ("mass_lift", [True, True])
    z, i = _run_nist4(core, plant_bl, 20.0)
    assert np.abs(z).max() < 10e-6                                   # the target's 10 um
    assert np.abs(z[-1000:]).max() < 1e-9
    assert i[-1] == pytest.approx(1.0 * core.values["g_m_per_s2"] / plant_bl, rel=1e-6)


def test_a_restarted_core_resumes_force_mode_from_the_readback():
    """Saved in force mode with 1 kg on, the coil at the null: the first frame holds what the
    source produces (its monitor) and resumes force mode from that force, without a step."""
    saved = {"mode": "force", "test_mass_on": True, "aux_on": False, "frame": 50}
    core = configured("nist4", saved=saved)
    assert core.mode == "hold" and core.mass_on == [True, False]
    with pytest.raises(ValueError, match="no DAQ frame yet"):
        core.set_mode("force")
    sp, _, _ = core.step(DaqFrame(frame=60, main_coil_current_a=3.45e-3))
    assert core.mode == "force"
    assert core.force_n == pytest.approx(3.45e-3 * core.values["bl_t_m"], rel=1e-12)
    assert sp["main_coil_current_a"] == pytest.approx(3.45e-3, rel=1e-9)
    assert kinds(core.effects) == ["running", "running", "mode", "save", "restore"]


def test_a_restarted_core_does_not_take_up_a_state_from_before_the_clock_restarted():
    saved = {"mode": "force", "test_mass_on": True, "aux_on": False, "frame": 500}
    core = configured("nist4", saved=saved)
    core.step(DaqFrame(frame=3))
    assert core.mode == "idle" and core.mass_on == [False, True]
    assert core.effects[0][:2] == ("event", "restore") and core.effects[0][4] == "warning"
    assert core.effects[1] == ("save",)
