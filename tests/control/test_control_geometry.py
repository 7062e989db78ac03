"""Actuation matrix, constrained pseudo-inverse, interferometer and PSD fusion; cross-checked
against the NIST-4 plant's own force map and sensor model (kibble.hil_sim)."""

import numpy as np
import pytest

from kibble.control import geometry as G
from kibble.hil_sim import nist4 as N
from kibble.hil_sim.nist4 import Nist4Actuators, Nist4Plant
from kibble.hil_sim.params import load_params
from kibble.hil_sim.testing import QUIET_NIST4

RAD = np.radians


def test_pinv_pure_motions_generic_geometry():
    B = G.damping_force_matrix(RAD([10.0, 130.0, 250.0]), 0.2, 0.12, 0.08)
    D = G.damping_pinv(B)
    W = B @ D
    np.testing.assert_allclose(W[:4], np.eye(4), rtol=0, atol=1e-12)   # unit gain, no cross talk
    assert np.max(np.abs(W[4:])) <= 1e-12                               # zero F_z, zero tau_z
    # with 4 sets (8 coils) the solution is the weighted least-norm one
    B8 = G.damping_force_matrix(RAD([0.0, 90.0, 180.0, 270.0]), 0.2, 0.1, 0.1)
    w = np.array([1.0, 1.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0])
    D8 = G.damping_pinv(B8, weights=w)
    np.testing.assert_allclose(B8 @ D8, np.vstack([np.eye(4), np.zeros((2, 4))]), atol=1e-12)
    # any other exact solution D8 + N (N in the null space of B8) costs more weighted current
    null = np.linalg.svd(B8)[2][6:].T
    for j in range(4):
        alt = D8[:, j] + null @ np.array([1e-3, -2e-3])
        assert np.sum(w * alt**2) > np.sum(w * D8[:, j] ** 2)
    with pytest.raises(ValueError):
        G.damping_pinv(G.damping_force_matrix(RAD([0.0, 0.0, 0.0]), 0.2, 0.1, 0.1))


def test_ifo_fusion_abbe_weights():
    F = G.ifo_fusion_matrix(RAD([0.0, 120.0, 240.0]), 0.25, centre_x_m=0.01, centre_y_m=-0.02)
    assert F[0].sum() == pytest.approx(1.0, abs=1e-15)
    z, tx, ty = 1e-6, 2e-6, -3e-6
    ang = RAD([0.0, 120.0, 240.0])
    zi = z + 0.25 * np.sin(ang) * tx - 0.25 * np.cos(ang) * ty
    np.testing.assert_allclose(F @ zi, [z - 0.02 * tx - 0.01 * ty, tx, ty], rtol=0, atol=1e-18)


@pytest.fixture(scope="module")
def plant_and_params():
    p = load_params("nist4", QUIET_NIST4)
    return Nist4Plant(dict(QUIET_NIST4)), p


def test_pinv_through_plant_force_map(plant_and_params):
    plant, p = plant_and_params
    B = G.damping_force_matrix(RAD(p["damping_coils.angles_deg"]), p["damping_coils.radius_m"],
                               p["damping_coils.kv_N_per_A"], p["damping_coils.kh_N_per_A"])
    D = G.damping_pinv(B)
    a_per_code = (p["damping_coils.dac_full_scale_V"] / 2 ** (p["damping_coils.dac_bits"] - 1)
                  * p["damping_coils.driver_A_per_V"])
    request = np.array([[1e-3, 0, 0, 0], [0, 1e-3, 0, 0], [0, 0, 2e-4, 0], [0, 0, 0, 2e-4],
                        [3e-4, -2e-4, 1e-4, 5e-5]])
    for req in request:
        codes = tuple(float(c) for c in (D @ req) / a_per_code)
        act = plant.decode(Nist4Actuators(damping=codes, damping_enable=True))
        # plant's derived damping forces: A_FVS = sum of vertical forces, A_QD.. = (Qx, Qy,
        # tau_x, tau_y, tau_z)
        q = act[N.A_QD:N.A_QD + 5]
        np.testing.assert_allclose(q[:4], req, rtol=1e-12, atol=1e-15)
        assert abs(act[N.A_FVS]) <= 1e-12 and abs(q[4]) <= 1e-12


def test_fusion_recovers_plant_truth(plant_and_params):
    _, p = plant_and_params
    plant = Nist4Plant(dict(QUIET_NIST4))
    F = G.ifo_fusion_matrix(RAD(p["interferometer.angles_deg"]), p["interferometer.radius_m"],
                            centre_x_m=0.003, centre_y_m=-0.004)
    S = G.psd_matrix(RAD(p["psd.retro_angles_deg"]), p["psd.radius_m"], p["psd.gain_V_per_m"],
                     p["psd.lever_arm_m"])
    plant.set_state(theta=2e-5, q=np.array([3e-6, -2e-6, 4e-6, -5e-6, 7e-6]))
    sens = plant.step_frame(Nist4Actuators())
    tr = plant.truth()
    zi = G.ifo_displacement_m(sens.ifo_fringes[:3], sens.ifo_phase_rad[:3], p["interferometer.wavelength_m"])
    z_c = tr.z - 0.004 * tr.q[2] - 0.003 * tr.q[3]
    np.testing.assert_allclose(F @ zi, [z_c, tr.q[2], tr.q[3]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S @ sens.psd_V, tr.q[[0, 1, 2, 3, 4]], rtol=0, atol=1e-12)


def test_matrix_run_limits_and_holds():
    M = np.array([[1.0, 2.0], [0.0, -1.0]])
    x = np.array([[1.0, 1.0], [np.nan, 0.0], [1e308, 1e308], [0.1, 0.2]])
    lo, hi = np.array([-1.0, -0.5]), np.array([2.0, 0.5])
    last = np.zeros(2)
    out = np.empty((4, 2))
    assert G.matrix_run(M, x, lo, hi, last, out) == 2
    np.testing.assert_array_equal(out, [[2.0, -0.5], [2.0, -0.5], [2.0, -0.5], [0.5, -0.2]])
    np.testing.assert_array_equal(last, [0.5, -0.2])
