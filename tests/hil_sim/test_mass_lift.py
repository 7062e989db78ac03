"""Mass lifts (issue 13 point 4): the plants ramp every load change over one duration whatever
the mass, as the servo's feedforward does. (That the servo is configured as the simulated lift
is a row of the instruments' table, tests/services/daemons/test_hardware_config.py.)"""

import numpy as np
import pytest

from kibble.control.trajectory import load_step_feedforward_at
from kibble.hil_sim.efb import EfbActuators, EfbPlant
from kibble.hil_sim.nist4 import Nist4Actuators, Nist4Plant
from kibble.hil_sim.testing import QUIET_EFB, QUIET_NIST4
from kibble.services.instruments import instrument
from kibble.services.runtime.service import load_config
from kibble.services.daemons.servo import Servo


def _servo(model, tmp_path):
    """The servo as ``kibble up --sim MODEL`` configures it (services/instruments/<model>.toml; its mass-lift
    parameters equal the simulator's: tests/services/daemons/test_hardware_config.py)."""
    return Servo(load_config("servo", instrument(model).config, instrument=model, state_dir=tmp_path,
                             restore=False))


@pytest.mark.parametrize("events", [("aux off",), ("1 kg on",), ("aux off", "1 kg on")])
def test_nist4_load_follows_the_servo_feedforward(events, tmp_path):
    """The plant's load change, frame by frame, is the servo's feedforward over g: every event
    a ramp of its own mass over lift_ramp_s (the 0.5 kg auxiliary mass too), events at once a
    ramp of their net load."""
    servo = _servo("nist4", tmp_path)
    ramp_s, g = servo.params.values["lift_ramp_s"], servo.params.values["g_m_per_s2"]
    p = Nist4Plant(QUIET_NIST4, seed=1)
    load0 = p.truth().m_test + p.truth().m_aux
    delta = 0.0
    if "aux off" in events:
        p.lift_aux(on_pan=False)
        delta -= servo.params.values["aux_mass_kg"]
    if "1 kg on" in events:
        p.place_mass(True)
        delta += servo.params.values["test_mass_kg"]
    b = p.run(Nist4Actuators(), int(1.5 * ramp_s * p.params["sim.frame_rate_hz"]))
    load = b.col("m_test") + b.col("m_aux") - load0
    expected = np.array([load_step_feedforward_at(t, 0.0, ramp_s, delta, g, 1.0, 0.0) / g
                         for t in b.col("t")])
    assert np.max(np.abs(load - expected)) <= 1e-9 * abs(delta)
    assert load[-1] == delta


def test_efb_load_follows_the_servo_feedforward(tmp_path):
    servo = _servo("efb", tmp_path)
    ramp_s, g = servo.params.values["lift_ramp_s"], servo.params.values["g_m_per_s2"]
    p = EfbPlant(QUIET_EFB, seed=1)
    delta = servo.params.values["aux_mass_kg"]
    p.place_mass("large")
    b = p.run(EfbActuators(), int(1.5 * ramp_s * p.params["sim.frame_rate_hz"]))
    expected = np.array([load_step_feedforward_at(t, 0.0, ramp_s, delta, g, 1.0, 0.0) / g
                         for t in b.col("t")])
    assert np.max(np.abs(b.col("m_load") - expected)) <= 1e-9 * delta
