"""Electrostatic actuators: EFB force-to-voltage, theta-z push-pull plates (with the NIST-4
plant's plate model as cross-check)."""

import numpy as np
import pytest

from kibble.control import electrostatic as E
from kibble.hil_sim import nist4 as N
from kibble.hil_sim.nist4 import Nist4Actuators, Nist4Plant
from kibble.hil_sim.params import load_params
from kibble.hil_sim.testing import QUIET_NIST4

KAPPA = 0.947e-9 / 2


@pytest.mark.parametrize("polarity", [1.0, -1.0])
def test_efb_voltage_gives_force_with_surface_potential(polarity):
    f = np.array([0.0, 1e-7, 9.8e-6, 2e-4, -1e-6, np.nan, 1e9])
    out = np.empty_like(f)
    n = E.efb_force_to_voltage(f, KAPPA, 0.04, polarity, 1000.0, 0.0, out)
    realized = KAPPA * (out - 0.04) ** 2                  # plant: F = kappa (V - V_s)^2
    np.testing.assert_allclose(realized[:4], f[:4], rtol=1e-12, atol=1e-24)
    assert np.all(np.sign(out[1:4] - 0.04) == polarity)
    assert out[4] == 0.04                                 # negative force: zero force
    assert out[5] == out[4]                               # NaN: hold
    assert out[6] == polarity * 1000.0                    # limited
    assert n == 3


def test_thetaz_push_pull_torque_in_plant():
    p = load_params("nist4", QUIET_NIST4)
    plant = Nist4Plant(dict(QUIET_NIST4))
    gain = E.thetaz_gain_nm_per_v2(p["theta_z.radius_m"], p["theta_z.gap_m"],
                                   p["theta_z.plate_area_m2"], 3)
    torque = np.array([2e-5, -1e-5, 1.0, np.nan])
    out = np.empty((4, 2))
    n = E.thetaz_voltages(torque, 300.0, gain, p["theta_z.hv_limit_V"], 0.0, out)
    assert n == 2
    assert np.all(np.abs(out) <= 1000.0) and out[2, 0] == 1000.0 and out[2, 1] == -400.0
    np.testing.assert_array_equal(out[3], out[2])
    v_per_code = p["theta_z.full_scale_V"] / 2 ** (p["theta_z.dac_bits"] - 1)
    base = plant.derivative(plant.decode(Nist4Actuators(hv_enable=True)))
    for k in range(2):
        codes = tuple(float(v) / v_per_code for v in np.tile(out[k], 3))
        dx = plant.derivative(plant.decode(Nist4Actuators(hv=codes, hv_enable=True))) - base
        q = dx[N.QD0:N.QD0 + 5] * plant.M5                 # generalized force at rest
        assert q[4] == pytest.approx(torque[k], rel=1e-9)  # exact: linear at the null
        assert np.max(np.abs(q[:2])) < 1e-12 * abs(torque[k]) / 0.25 + 1e-18
