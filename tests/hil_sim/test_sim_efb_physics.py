"""EFB plant physics: equilibrium voltage, ring-down vs linearization, energy, gradient mode,
temperature coefficient of dC/dz, mass loading."""

import math

import numpy as np
import pytest

from kibble.hil_sim.efb import EfbActuators, EfbPlant
from kibble.hil_sim.params import load_params
from kibble.hil_sim.testing import QUIET_EFB, dmd_eigs

NOHYST = QUIET_EFB | {"hysteresis.enabled": False}


@pytest.mark.parametrize("mass,tare", [(1e-6, 0.0), (20e-6, 0.0), (20e-6, 4.735e-6)])
@pytest.mark.parametrize("polarity", [1, -1])
def test_equilibrium_voltage(mass, tare, polarity):
    pr = load_params("efb", NOHYST | {"linkage.tare_force_N": tare})
    p = EfbPlant(pr, seed=1)
    p.place_mass(mass)
    p.env[1] = mass  # load fully on (skip the ramp)
    g = pr["sim.g_m_per_s2"]
    kappa = pr["capacitor.dcdz_F_per_m"] / 2
    vs = pr["capacitor.surface_potential_V"]
    # the grounded auxiliary electrode still pulls through its surface potential
    f_aux = 0.5 * pr["capacitor.aux_dcdz_F_per_m"] * pr["capacitor.aux_surface_potential_V"] ** 2
    v = vs + polarity * math.sqrt((mass * g + tare - f_aux) / kappa)
    p.act = p.decode(EfbActuators(hv_code=v / p._V_per_code, hv_to_main=True, hv_enable=True))
    p.set_state(z=0.0, vz=0.0, v_amp=p.act[0])
    f = p.derivative()[1] * pr["linkage.mass_kg"]
    assert abs(f) / (mass * g) < 1e-9
    assert p.kappa() == pytest.approx(kappa, rel=1e-15)


def test_ringdown_matches_linearization():
    p = EfbPlant(NOHYST, seed=2)
    v = p.params["capacitor.surface_potential_V"] + math.sqrt(p.params["linkage.tare_force_N"] / p.kappa())
    act = EfbActuators(hv_code=v / p._V_per_code, hv_enable=True)
    p.act = p.decode(act)
    p.set_state(z=2e-7, v_amp=p.act[0])
    sys = p.linearize(act)
    lam = [e for e in np.linalg.eigvals(sys.A[:2, :2]) if e.imag > 0][0]
    b = p.run(act, 400_000)  # 400 s, ~3 periods
    X = np.column_stack([b.col("z"), b.col("vz")])[::500]
    sim = [e for e in dmd_eigs(X, 0.5) if e.imag > 0][0]
    for l_ in (lam, sim):
        assert l_.imag > 0
    assert abs(sim) == pytest.approx(abs(lam), rel=0.01)
    assert -sim.real / abs(sim) == pytest.approx(-lam.real / abs(lam), rel=0.01)
    # stiffness includes the electrostatic term -1/2 d2C/dz2 (V - Vs)^2
    k_mech = p.params["linkage.stiffness_N_per_m"]
    a1 = p.params["capacitor.profile_coeffs"][0] / p.params["capacitor.profile_scale_m"]
    k_el = -p.kappa() * a1 * (p.act[0] - p.params["capacitor.surface_potential_V"]) ** 2
    assert -sys.A[1, 0] * p.params["linkage.mass_kg"] == pytest.approx(k_mech + k_el, rel=1e-5)


def test_energy_conserved_without_dissipation():
    p = EfbPlant(NOHYST | {"mechanics.dissipation": False}, seed=3)
    v = p.params["capacitor.surface_potential_V"] + math.sqrt(p.params["linkage.tare_force_N"] / p.kappa())
    act = EfbActuators(hv_code=(v + 1e-3) / p._V_per_code, hv_enable=True)  # ~0.1 um off null
    p.act = p.decode(act)
    p.set_state(z=-3e-7, vz=1e-8, v_amp=p.act[0])
    e0 = p.energy()
    es, ke = [], []
    for _ in range(100):
        p.run(act, 1000, record_truth=False)
        es.append(p.energy())
        ke.append(0.5 * p.params["linkage.mass_kg"] * p.x[1] ** 2)
    assert max(abs(e - e0) for e in es) / max(ke) < 1e-6


def test_gradient_mode_aux_electrode_and_bridge():
    p = EfbPlant(QUIET_EFB, seed=4)
    pr = p.params
    # aux electrode alone holds the tare: V_aux = Vs_aux + sqrt(2 F / dC_aux/dz)
    F = pr["linkage.tare_force_N"] - 0.5 * pr["capacitor.dcdz_F_per_m"] * pr["capacitor.surface_potential_V"] ** 2
    v = pr["capacitor.aux_surface_potential_V"] + math.sqrt(2 * F / pr["capacitor.aux_dcdz_F_per_m"])
    act = EfbActuators(hv_code=v / p._V_per_code, hv_to_main=False, hv_enable=True)
    p.act = p.decode(act)
    p.set_state(v_amp=p.act[0])
    assert abs(p.derivative()[1]) * pr["linkage.mass_kg"] < 1e-9 * F
    # stepping the aux voltage moves z; the bridge tracks C(z)
    act2 = EfbActuators(hv_code=(v + 2.0) / p._V_per_code, hv_to_main=False, hv_enable=True)
    b = p.run(act2, 3000)
    assert b.col("z")[-1] > 1e-7
    assert b.sensors[-1, 3] == pytest.approx(b.col("capacitance")[-1] * 1e12, abs=1e-6)
    c0 = pr["capacitor.c0_pF"]
    dz = b.col("z")[-1]
    assert (b.col("capacitance")[-1] * 1e12 - c0) / (dz * 1e12) == pytest.approx(pr["capacitor.dcdz_F_per_m"], rel=1e-3)


def test_dcdz_temperature_coefficient():
    p = EfbPlant(QUIET_EFB)
    k0 = p.kappa(0.0, 20.0)
    k1 = p.kappa(0.0, 21.0)
    assert 2 * (k1 - k0) == pytest.approx(-4.2e-15, rel=1e-6)


def test_mass_loading_ramps():
    p = EfbPlant(QUIET_EFB)
    p.place_mass("large")
    p.run(EfbActuators(), 500, record_truth=False)
    assert 0 < p.truth().m_load < 20e-6
    p.run(EfbActuators(), 600, record_truth=False)
    assert p.truth().m_load == 20e-6
    p.remove_mass()
    p.run(EfbActuators(), 1100, record_truth=False)
    assert p.truth().m_load == 0.0


@pytest.mark.parametrize("k", [-1e-3, -2e-4])
def test_negative_linkage_stiffness_departs_at_the_analytic_rate(k):
    """The buckling spring tuned past zero: the link held at z = 0 by the voltage that balances
    the preload leaves it as m z'' = -(k + k_el) z - c z', k_el = -1/2 d2C/dz2 (V - V_s)^2 the
    electrodes' own stiffness and c = sqrt(k_nom m) / q the damping of the nominal stiffness
    (the flexures', which the tuning does not change); the Iwan elements keep their positive
    stiffness of the nominal one too."""
    p = EfbPlant(NOHYST | {"linkage.stiffness_N_per_m": k}, seed=7)
    pr = p.params
    m, kappa, vs = pr["linkage.mass_kg"], p.kappa(), pr["capacitor.surface_potential_V"]
    f_aux = 0.5 * pr["capacitor.aux_dcdz_F_per_m"] * pr["capacitor.aux_surface_potential_V"] ** 2
    v = vs + math.sqrt((pr["linkage.tare_force_N"] - f_aux) / kappa)
    act = EfbActuators(hv_code=v / p._V_per_code, hv_to_main=True, hv_enable=True)
    p.act = p.decode(act)
    z0 = 1e-8
    p.set_state(z=z0, vz=0.0, v_amp=p.act[0])
    a1 = pr["capacitor.profile_coeffs"][0] / pr["capacitor.profile_scale_m"]
    k_total = k - kappa * a1 * (v - vs) ** 2
    a = math.sqrt(pr["linkage.nominal_stiffness_N_per_m"] * m) / pr["linkage.q"] / (2 * m)
    lam1, lam2 = -a + math.sqrt(a * a - k_total / m), -a - math.sqrt(a * a - k_total / m)
    pole = max(np.linalg.eigvals(p.linearize(act).A[:2, :2]).real)
    assert pole == pytest.approx(lam1, rel=1e-4)
    b = p.run(act, 60_000)  # 60 s
    expect = z0 * (lam1 * np.exp(lam2 * b.col("t")) - lam2 * np.exp(lam1 * b.col("t"))) / (lam1 - lam2)
    assert np.max(np.abs(b.col("z") - expect)) <= 1e-6 * np.max(np.abs(expect))
    assert b.col("z")[-1] > 1.5 * z0
    nominal = EfbPlant(QUIET_EFB, seed=7)
    tuned = EfbPlant(QUIET_EFB | {"linkage.stiffness_N_per_m": k}, seed=7)
    assert np.array_equal(tuned.hyk, nominal.hyk) and np.all(nominal.hyk > 0)
    assert tuned.P[3] == nominal.P[3] > 0                      # P_C, the link's damping
