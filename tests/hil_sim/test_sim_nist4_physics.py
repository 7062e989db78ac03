"""NIST-4 plant physics: ring-down vs linearization, energy, static balance, induced voltage,
knife-edge hysteresis and erasing."""

import math

import numpy as np
import pytest

from kibble.hil_sim.nist4 import Nist4Actuators, Nist4Plant, STATE_NAMES, INPUT_NAMES, OUTPUT_NAMES
from kibble.hil_sim.params import load_params
from kibble.hil_sim.testing import QUIET_NIST4, dmd_eigs, fit_damped_sine

NOHYST = QUIET_NIST4 | {"hysteresis.enabled": False}


def _modes(eigs):
    """(f_n Hz, zeta) of the oscillatory eigenvalues with positive imaginary part, sorted."""
    out = []
    for lam in eigs:
        if lam.imag > 1e-9:
            wn = abs(lam)
            out.append((wn / (2 * np.pi), -lam.real / wn))
    return sorted(out)


@pytest.mark.parametrize("hv", [False, True])
def test_five_dof_ringdown_matches_linearization(hv):
    p = Nist4Plant(NOHYST, seed=1)
    sc = 0.05 if hv else 1.0  # the plate force is nonlinear in the gap: stay small with HV
    p.set_state(q=sc * np.array([2e-5, -1e-5, 3e-6, -2e-6, 1e-4]), qd=sc * np.array([1e-5, 2e-5, -1e-6, 3e-6, -2e-5]))
    # with hv: 500 V bias on every electrode (negative stiffness) plus an unbalanced plate
    act = Nist4Actuators(hv=(16384, 16384, 16384, 16384, 16384, 16400), hv_enable=hv)
    sys = p.linearize(act)
    blk = sys.A[4:14, 4:14]
    lin = _modes(np.linalg.eigvals(blk))
    assert len(lin) == 5
    b = p.run(act, 40_000)  # 40 s of 1 kHz frames
    X = np.column_stack([b.col(n) for n in ("x", "y", "theta_x", "theta_y", "theta_z",
                                             "vx", "vy", "wx", "wy", "wz")])
    X = X[::20]  # 50 Hz snapshots
    sim = _modes(dmd_eigs(X, 0.02))
    assert len(sim) == 5
    for (fl, zl), (fs, zs) in zip(lin, sim):
        assert fs == pytest.approx(fl, rel=0.01)
        assert zs == pytest.approx(zl, rel=0.01)


def test_wheel_ringdown_matches_linearization():
    p = Nist4Plant(NOHYST, seed=2)
    p.set_state(theta=3e-5)
    sys = p.linearize(Nist4Actuators())
    (fl, zl), = _modes(np.linalg.eigvals(sys.A[0:2, 0:2]))
    # independent check of the linearization: k / J
    k = p.params["wheel.knife_stiffness_N_m_per_rad"]
    assert 2 * np.pi * fl == pytest.approx(math.sqrt(k / p.inertia), rel=1e-6)
    b = p.run(Nist4Actuators(), 150_000, record_truth=True)  # 150 s, ~5 periods
    t, th = b.col("t")[::50], b.col("theta")[::50]
    fs, zs = fit_damped_sine(t, th, fl, zl)
    assert fs == pytest.approx(fl, rel=0.01)
    assert zs == pytest.approx(zl, rel=0.01)


def test_energy_conserved_without_dissipation():
    ov = NOHYST | {"mechanics.dissipation": False}
    p = Nist4Plant(ov, seed=3)
    i0 = 1e-5  # force-mode current (A), constant
    act = Nist4Actuators(main_coarse=i0 / p._dac["main_source"][2], main_force_mode=True,
                         damping=(300, -200, 100, 400, -300, 250), damping_enable=True,
                         hv=(16000, 15000, 16000, 16500, 15800, 16000), hv_enable=True)
    p.act = p.decode(act)
    p.set_state(theta=-1e-3, omega=2e-4, i_main=p.act[0], q=[1e-5, -2e-5, 3e-6, 1e-6, 2e-5],
                qd=[1e-6, 0, 2e-6, 0, -1e-5])
    e0 = p.energy()
    es, kes = [], []
    for _ in range(100):  # 100 s
        p.run(act, 1000, record_truth=False)
        es.append(p.energy())
        kes.append(0.5 * p.inertia * p.x[1] ** 2)
    swing = max(abs(e - e0) for e in es)
    scale = max(max(kes), abs(e0))
    assert swing / scale < 1e-6, (swing, scale)


def _bl_independent(params, z, i, temp):
    zs = params["coil.profile_scale_m"]
    a = params["coil.profile_coeffs"]
    u = z / zs
    prof = 1 + sum(a[n] * u ** (n + 1) for n in range(6))
    ima = i * 1e3
    return (params["coil.bl0_T_m"] * prof
            * (1 + params["coil.alpha_per_mA"] * ima + params["coil.beta_per_mA2"] * ima ** 2)
            * (1 + params["coil.temp_coeff_per_K"] * (temp - params["coil.temp_ref_C"])))


@pytest.mark.parametrize("mass_on", [True, False])
def test_static_balance_current(mass_on):
    ov = NOHYST | {"initial.aux_on": False, "initial.test_mass_on": mass_on}
    params = load_params("nist4", ov)
    p = Nist4Plant(params, seed=4)
    g = params["sim.g_m_per_s2"]
    m_net = (params["main_side.tare_mass_kg"] + (params["main_side.test_mass_kg"] if mass_on else 0.0)
             - params["counter_side.mass_kg"])  # +0.5 kg (mass on) / -0.5 kg (off)
    temp = params["temperature.initial_C"]
    i = m_net * g / params["coil.bl0_T_m"]
    for _ in range(50):  # fixed point Bl(z, I) I = m g
        i = m_net * g / _bl_independent(params, 0.0, i, temp)
    assert abs(i) == pytest.approx(6.9e-3, rel=0.01)
    lsb = p._dac["main_source"][2]
    act = Nist4Actuators(main_coarse=i / lsb, main_force_mode=True, cm_enable=False)
    p.act = p.decode(act)
    p.set_state(theta=0.0, omega=0.0, i_main=p.act[0])
    dx = p.derivative()
    torque = dx[1] * p.inertia
    assert abs(torque) / (abs(m_net) * g * params["wheel.radius_m"]) < 1e-9
    # the plant's own Bl agrees with the independent formula
    assert p.bl(0.0, i) == pytest.approx(_bl_independent(params, 0.0, i, temp), rel=1e-14)
    # and holding that current keeps the wheel still
    b = p.run(act, 5000)
    assert np.max(np.abs(b.col("z"))) < 1e-12


def test_induced_voltage_during_driven_sweep():
    ov = NOHYST | {"coil.fx_over_fz": -4.78e-4, "coil.ty_over_fz_m": 3.91e-5}  # enlarge 2 parasitics
    p = Nist4Plant(ov, seed=5)
    params = p.params
    p.set_state(q=[1e-5, 2e-5, -3e-6, 4e-6, 1e-4], qd=[3e-5, -1e-5, 2e-5, -3e-5, 1e-4])
    c = np.array([params[k] for k in ("coil.fx_over_fz", "coil.fy_over_fz", "coil.tx_over_fz_m",
                                       "coil.ty_over_fz_m", "coil.tz_over_fz_m")])
    zs, a = params["coil.profile_scale_m"], params["coil.profile_coeffs"]
    lsb = p._dac["cm_source"][2]
    worst = 0.0
    emf_prev = p.truth().emf
    dvm_err = emf_max = 0.0
    for k in range(2000):  # 2 s driven by the counter-mass motor, velocity mode (coil open)
        i_cm = 0.02 * math.sin(2 * math.pi * 0.5 * k * 1e-3)
        b = p.run(Nist4Actuators(cm_coarse=i_cm / lsb, main_force_mode=False), 1)
        tr = p.truth()
        u = tr.z / zs
        bl = params["coil.bl0_T_m"] * (1 + sum(a[n] * u ** (n + 1) for n in range(6)))
        dbl = params["coil.bl0_T_m"] * sum((n + 1) * a[n] * u ** n for n in range(6)) / zs
        expect = (bl + dbl * (c @ tr.q)) * tr.vz + bl * (c @ tr.qd)
        worst = max(worst, abs(tr.emf - expect) / max(abs(expect), 1e-12))
        # the DVM integrates U over the frame: compare with the trapezoid of the frame ends
        # (exact for a linear ramp; the current-source lag after each command step curves U(t)
        # within the frame by ~1e-6 V here)
        if k >= 10:
            dvm_err = max(dvm_err, abs(b.sensors[-1, 14] - 0.5 * (emf_prev + tr.emf)))
            emf_max = max(emf_max, abs(tr.emf))
        emf_prev = tr.emf
    assert worst < 1e-12
    assert dvm_err < 1e-5 * emf_max
    assert abs(tr.vz) > 1e-5  # the sweep really moved the coil
    # parasitic part is visible and included
    assert abs(bl * (c @ tr.qd)) > 1e-9


def test_hysteresis_grows_with_excursion_and_erase_reduces_it():
    ov = QUIET_NIST4 | {"wheel.q": 1.0}
    p = Nist4Plant(ov, seed=6)
    lsb = p._dac["cm_source"][2]
    k_z = p.params["wheel.knife_stiffness_N_m_per_rad"] / p.params["wheel.radius_m"] ** 2

    def excursion(z_peak):
        # push with the counter-mass motor (F = -Bl_cm I at the counter side), release, settle
        i = -z_peak * k_z / p.params["counter_side.motor_bl_T_m"]
        p.run(Nist4Actuators(cm_coarse=i / lsb), 60_000, record_truth=False)
        p.run(Nist4Actuators(), 60_000, record_truth=False)
        return abs(p.truth().tau_hyst)

    small = excursion(5e-6)
    large = excursion(45e-6)
    assert large > 3 * small > 0
    # erase: z(t) = A exp(-t/tau) sin(w t), A = 380 um, tau = 20 s (seed 001), imposed with the
    # motor by inverse dynamics F = m z'' + c z' + k z (the hysteresis torque is a 1e-3 effect)
    r = p.params["wheel.radius_m"]
    m_eff, c_z = p.inertia / r ** 2, p.P[4] / r ** 2
    A, tau, w = 380e-6, 20.0, 2 * math.pi * 0.2
    z0 = p.truth().z

    def traj(t):  # starts from rest: 5 s raised-cosine envelope onset
        s = 0.5 * (1 - math.cos(math.pi * t / 5.0)) if t < 5.0 else 1.0
        return A * s * math.exp(-t / tau) * math.sin(w * t)

    peak = 0.0
    hd = 1e-3
    for k in range(20_000):
        t = (k + 0.5) * 0.01
        z = traj(t)
        zd = (traj(t + hd) - traj(t - hd)) / (2 * hd)
        zdd = (traj(t + hd) - 2 * z + traj(t - hd)) / hd ** 2
        f = m_eff * zdd + c_z * zd + k_z * (z + z0)
        i = -f / p.params["counter_side.motor_bl_T_m"]
        p.run(Nist4Actuators(cm_coarse=i / lsb), 10, record_truth=False)
        peak = max(peak, abs(p.truth().z - z0))
    assert peak == pytest.approx(A * 0.75, rel=0.2)
    p.run(Nist4Actuators(), 60_000, record_truth=False)
    erased = abs(p.truth().tau_hyst)
    assert erased < 0.2 * large


def test_linearization_named():
    p = Nist4Plant(NOHYST)
    sys = p.linearize(Nist4Actuators(main_force_mode=True, damping_enable=True))
    assert sys.state_labels == STATE_NAMES
    assert sys.input_labels == INPUT_NAMES
    assert sys.output_labels == OUTPUT_NAMES
    # a z force at the coil gives wheel angular acceleration r / J
    j = INPUT_NAMES.index("f_ext_z")
    assert sys.B[1, j] == pytest.approx(p.params["wheel.radius_m"] / p.inertia, rel=1e-6)
    # damping coil vertical set 0 (enabled) produces theta torque; current command drives i_main
    assert sys.B[2, 0] == pytest.approx(1 / p.params["main_source.tau_s"], rel=1e-6)
    assert abs(sys.B[1, INPUT_NAMES.index("i_damp0v")]) > 0


def _free_response(x0, lam1, lam2, t):
    """x(t) of the linear oscillator with (real, distinct) roots lam1, lam2, from x0 at rest."""
    return x0 * (lam1 * np.exp(lam2 * t) - lam2 * np.exp(lam1 * t)) / (lam1 - lam2)


@pytest.mark.parametrize("k", [-0.35, -0.05])
def test_negative_knife_stiffness_departs_at_the_analytic_rate(k):
    """A knife edge balanced through zero (the wheel's centre of mass above the edge): the free
    wheel leaves the null as J theta'' = -k theta - c theta' with the damping of the nominal
    stiffness, c = sqrt(k_nom J) / q, so at the rate -c/2J + sqrt((c/2J)^2 - k/J), about
    sqrt(-k/J); the linearization's unstable pole is that root."""
    p = Nist4Plant(NOHYST | {"wheel.knife_stiffness_N_m_per_rad": k}, seed=7)
    params = p.params
    J = p.inertia
    a = math.sqrt(params["wheel.nominal_stiffness_N_m_per_rad"] * J) / params["wheel.q"] / (2 * J)
    lam1, lam2 = -a + math.sqrt(a * a - k / J), -a - math.sqrt(a * a - k / J)
    theta0 = 1e-7
    p.set_state(theta=theta0)
    pole = max(np.linalg.eigvals(p.linearize(Nist4Actuators()).A[0:2, 0:2]).real)
    assert pole == pytest.approx(lam1, rel=1e-6)
    b = p.run(Nist4Actuators(), 20_000)  # 20 s
    expect = _free_response(theta0, lam1, lam2, b.col("t"))
    assert np.max(np.abs(b.col("theta") - expect)) <= 1e-6 * np.max(np.abs(expect))
    assert b.col("theta")[-1] > 2 * theta0


def test_knife_stiffness_sign_keeps_the_losses_and_flips_the_ground_lever():
    """Tuning k through zero moves the centre of mass, not the edge's contact: the damping and
    the (positive) Iwan element stiffnesses stay those of the nominal stiffness. The
    gravitational part f k = M g d sets the lever d of the horizontal ground acceleration, so
    the torque per m/s^2, M d = f k / g, follows the sign of k."""
    plants = {k: Nist4Plant(QUIET_NIST4 | {"wheel.knife_stiffness_N_m_per_rad": k}, seed=8)
              for k in (0.35, 0.0, -0.35)}
    nominal = plants[0.35]
    k_nom = nominal.params["wheel.nominal_stiffness_N_m_per_rad"]
    hyk = nominal.params["hysteresis.stiffness_fraction"] * k_nom / len(nominal.hyk)
    agx = INPUT_NAMES.index("agx")
    for k, p in plants.items():
        assert p.P[4] == nominal.P[4] > 0                      # P_C, the wheel's damping
        assert np.array_equal(p.hyk, np.full(len(nominal.hyk), hyk)) and hyk > 0
        torque_per_accel = p.linearize(Nist4Actuators()).B[1, agx] * p.inertia
        lever = p.params["wheel.gravity_fraction"] * k / p.params["sim.g_m_per_s2"]
        assert torque_per_accel == pytest.approx(lever, rel=1e-6, abs=1e-12)
