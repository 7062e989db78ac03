"""PID kernel (kibble.control.pid) and the composed loop (kibble.control.loop): equivalence with
python-control simulations of the design transfer functions, anti-windup, bumpless transfer,
reset, snapshot/restore."""

import math

import control as ct
import numpy as np
import pytest

from kibble.control import design as D
from kibble.control import filters as F
from kibble.control import pid as P
from kibble.control.loop import loop_run

DT = 1e-3


def _signals(n, n_axes, seed):
    """Steps, ramps and noise on setpoint, measurement and feedforward."""
    rng = np.random.default_rng(seed)
    k = np.arange(n)[:, None]
    io = P.io_block(n, n_axes)
    io[:, :, P.IO_R] = np.where(k >= 37, 1.0, 0.0) + 0.002 * k * (k >= 400)
    io[:, :, P.IO_Y] = 0.3 * rng.standard_normal((n, n_axes)) + np.where(k >= 150, -0.5, 0.0) + 1e-3 * k
    io[:, :, P.IO_FF] = rng.standard_normal((n, n_axes)) * 0.1 + np.where(k >= 600, 0.25, 0.0)
    return io


def _simulate(c_r, c_y, io, a):
    t = np.arange(io.shape[0]) * DT
    return (ct.forced_response(c_r, t, io[:, a, P.IO_R]).outputs
            + ct.forced_response(c_y, t, io[:, a, P.IO_Y]).outputs + io[:, a, P.IO_FF])


@pytest.mark.parametrize("gains", [
    dict(kp=2.0, ki_per_s=3.0, kd_s=0.05, tf_s=0.01, b=0.7),
    dict(kp=0.5, ki_per_s=40.0, kd_s=0.0, tf_s=0.0, b=1.0),
    dict(kp=1.5, ki_per_s=0.0, kd_s=0.002, tf_s=0.0, b=0.0),
])
def test_pid_matches_python_control(gains):
    par = P.pid_params(3, dt_s=DT, **gains)
    st = P.pid_state(par, y0=0.0)
    io = _signals(1000, 3, seed=1)
    P.pid_run(par, st, io)
    c_r, c_y = D.pid_tfs(par[0])
    for a in range(3):
        np.testing.assert_allclose(io[:, a, P.IO_U], _simulate(c_r, c_y, io, a), rtol=0, atol=1e-9)
    assert np.all(st[:, P.FLAGS] == 0.0)


def test_loop_with_filter_module_matches_python_control():
    par = P.pid_params(2, dt_s=DT, kp=2.0, ki_per_s=5.0, kd_s=0.02, tf_s=0.005, b=0.5)
    st = P.pid_state(par, y0=0.0)
    sos = np.stack([F.lowpass_sos(80.0, 0.7, 1 / DT), F.notch_sos(31.0, 8.0, 1 / DT),
                    F.lead_lag_sos(3.0, 30.0, 1 / DT)])
    fm_par = F.fm_params(2, dt_s=DT, gain=1.3, mask=0b111)
    fm_sos = np.stack([sos, sos])
    fm_st = F.fm_state(fm_par, 3)
    io = _signals(1500, 2, seed=2)
    loop_run(par, st, fm_par, fm_sos, fm_st, io)
    # python-control, stage by stage (a product polynomial of order 9 would lose digits)
    c_r, c_y = D.pid_tfs(par[0])
    t = np.arange(io.shape[0]) * DT
    yf = io[:, 1, P.IO_Y]
    for c in sos:
        yf = ct.forced_response(ct.tf(c[:3], [1.0, c[3], c[4]], DT), t, yf).outputs
    yf = 1.3 * yf
    u = (ct.forced_response(c_r, t, io[:, 1, P.IO_R]).outputs
         + ct.forced_response(c_y, t, yf).outputs + io[:, 1, P.IO_FF])
    np.testing.assert_allclose(io[:, 1, P.IO_U], u, rtol=0, atol=1e-9)
    # and kernel_tfs is that cascade (frequency response; the order-9 product polynomial
    # evaluated near z = 1 keeps ~8 digits)
    _, c_y_loop = D.kernel_tfs(par[0], fm_par[0], fm_sos[0])
    z = np.exp(2j * np.pi * np.array([0.1, 3.0, 31.0, 200.0]) * DT)
    cascade = c_y(z) * 1.3 * np.prod([(c[0] + c[1] / z + c[2] / z**2) / (1 + c[3] / z + c[4] / z**2)
                                      for c in sos], axis=0)
    np.testing.assert_allclose(c_y_loop(z), cascade, rtol=1e-7, atol=1e-9)


def test_block_and_single_sample_calls_agree_and_snapshot_restores():
    par = P.pid_params(6, dt_s=DT, kp=1.0, ki_per_s=20.0, kd_s=0.01, tf_s=0.003, u_min=-0.4,
                       u_max=0.4, slew_per_s=300.0)
    io = _signals(400, 6, seed=3)
    st_block = P.pid_state(par)
    io_block = io.copy()
    P.pid_run(par, st_block, io_block)
    st_single = P.pid_state(par)
    one = P.io_block(1, 6)
    out = np.empty((400, 6))
    snap = None
    for k in range(400):
        if k == 200:
            snap = st_single.copy()
        one[0] = io[k]
        P.pid_run(par, st_single, one)
        out[k] = one[0, :, P.IO_U]
    np.testing.assert_array_equal(out, io_block[:, :, P.IO_U])
    np.testing.assert_array_equal(st_single, st_block)
    again = io[200:].copy()
    P.pid_run(par, snap, again)
    np.testing.assert_array_equal(again[:, :, P.IO_U], io_block[200:, :, P.IO_U])


def _exit_samples(kp, ki, kt, e, e2, u_max, n_sat):
    """Run a PI open loop on a constant error e (saturating), then e2; samples until the output
    first drops below u_max."""
    par = P.pid_params(1, dt_s=DT, kp=kp, ki_per_s=ki, kt_per_s=kt, u_min=-u_max, u_max=u_max)
    st = P.pid_state(par, y0=0.0)
    n2 = 20000
    io = P.io_block(n_sat + n2, 1)
    io[:n_sat, 0, P.IO_R] = e
    io[n_sat:, 0, P.IO_R] = e2
    P.pid_run(par, st, io)
    u = io[:, 0, P.IO_U]
    assert np.all(u[n_sat // 2:n_sat] == u_max)
    after = np.nonzero(u[n_sat:] < u_max)[0]
    return int(after[0]) + 1 if after.size else None, st


def test_anti_windup_exit_within_documented_samples():
    kp, ki, kt, e, e2 = 0.01, 10.0, 200.0, 5.0, -2.0
    n, _ = _exit_samples(kp, ki, kt, e, e2, 1.0, 300)
    # documented bound (module docstring): excess settles at s_inf = ki e / kt; first sample
    # after the change s1 = (1 - kt dt) s_inf + kp (e2 - e) + ki dt e2; then geometric
    a = 1.0 - kt * DT
    s_inf = ki * e / kt
    s1 = a * s_inf + kp * (e2 - e) + ki * DT * e2
    s_star = ki * e2 / kt
    n_doc = 1 + math.ceil(math.log(-s_star / (s1 - s_star)) / math.log(a))
    assert n_doc == 5
    assert n == n_doc
    # full conditioning (kt dt = 1) leaves on the first sample
    assert _exit_samples(kp, ki, 1.0 / DT, e, e2, 1.0, 300)[0] == 1
    # without anti-windup the integral winds up (300 samples x ki dt e = 15): far later
    n_wound, _ = _exit_samples(kp, ki, 0.0, e, e2, 1.0, 300)
    assert n_wound is not None and n_wound > 50 * n_doc


def test_anti_windup_excess_bounded_during_saturation():
    kp, ki, kt, e = 0.2, 10.0, 100.0, 3.0
    par = P.pid_params(1, dt_s=DT, kp=kp, ki_per_s=ki, kt_per_s=kt, u_min=-1.0, u_max=1.0)
    st = P.pid_state(par, y0=0.0)
    excess = []
    for _ in range(2000):
        io = P.io_block(1, 1)
        io[0, 0, P.IO_R] = e
        P.pid_run(par, st, io)
        excess.append(st[0, P.V] - st[0, P.U])
    excess = np.array(excess)
    # excess s = v - u: s[k+1] = (1 - kt dt) s[k] + ki dt e, from s[0] = kp e + ki dt e - 1
    s_inf = ki * e / kt
    assert np.max(excess) <= max(excess[0], s_inf) + 1e-12
    assert excess[-1] == pytest.approx(s_inf, rel=1e-9)


def test_saturated_step_overshoot_within_linear_bound():
    """Integrator plant y[k+1] = y[k] + g dt u[k] with a PI: a setpoint step that saturates the
    output overshoots no more than the linear (unsaturated) loop's step response (python-control),
    while the same loop without anti-windup overshoots far more."""
    g, kp, ki = 1.0, 20.0, 60.0
    plant = ct.tf([g * DT], [1.0, -1.0], DT)

    def run(kt, r):
        par = P.pid_params(1, dt_s=DT, kp=kp, ki_per_s=ki, kt_per_s=kt, u_min=-2.0, u_max=2.0)
        st = P.pid_state(par, y0=0.0)
        y = 0.0
        ys = []
        one = P.io_block(1, 1)
        for _ in range(6000):
            one[0, 0, P.IO_R] = r
            one[0, 0, P.IO_Y] = y
            P.pid_run(par, st, one)
            y = y + g * DT * one[0, 0, P.IO_U]
            ys.append(y)
        return np.array(ys)

    c_r, c_y = D.pid_tfs(P.pid_params(1, dt_s=DT, kp=kp, ki_per_s=ki)[0])
    T = c_r * plant / (1 - c_y * plant)
    lin = ct.step_response(ct.minreal(T, verbose=False), T=np.arange(6000) * DT).outputs.squeeze()
    lin_overshoot = lin.max() - 1.0
    r = 1.0
    y_aw = run(1.0 / DT, r)
    y_wound = run(0.0, r)
    assert np.max(np.abs(np.diff(y_aw))) <= g * DT * 2.0 + 1e-15  # it did saturate at 2
    assert np.max(y_aw) - r <= lin_overshoot * r + 1e-9
    assert np.max(y_wound) - r > 3 * (lin_overshoot * r)
    assert abs(y_aw[-1] - r) < 1e-6


def _steady(n, k_change):
    t = np.arange(n) * DT
    io = P.io_block(n, 1)
    io[:, 0, P.IO_R] = 0.3
    io[:, 0, P.IO_Y] = 0.5 * np.sin(2 * np.pi * 2.0 * t)
    io[:, 0, P.IO_FF] = 0.1 * np.cos(2 * np.pi * 1.0 * t)
    return io


def _reference(par, io):
    """Output of an all-auto run with the final gains (the normal sample-to-sample change)."""
    ref = io.copy()
    p = par.copy()
    p[:, P.MODE] = P.MODE_AUTO
    P.pid_run(p, P.pid_state(p, y0=0.0), ref)
    return ref[:, 0, P.IO_U]


def test_gain_change_is_bumpless():
    par = P.pid_params(1, dt_s=DT, kp=2.0, ki_per_s=3.0, kd_s=0.05, tf_s=0.01, b=0.7)
    st = P.pid_state(par, y0=0.0)
    io = _steady(1000, 500)
    P.pid_run(par, st, io[:500])
    y_prev, r_prev, yd = st[0, P.Y_PREV], st[0, P.R_PREV], st[0, P.YD]
    par[0, P.KP], par[0, P.KD], par[0, P.B] = 8.0, 0.2, 1.0
    P.pid_run(par, st, io[500:])
    u = io[:, 0, P.IO_U]
    step = abs(u[500] - u[499])
    ref = _reference(par, io)
    assert step == pytest.approx(abs(ref[500] - ref[499]), rel=1e-9)  # exactly the normal change
    naive = abs((8.0 * (1.0 * r_prev - y_prev) - 0.2 * yd) - (2.0 * (0.7 * r_prev - y_prev) - 0.05 * yd))
    assert naive > 20 * step  # the correction matters


def test_mode_switches_are_bumpless():
    par = P.pid_params(1, dt_s=DT, kp=2.0, ki_per_s=3.0, kd_s=0.05, tf_s=0.01, b=0.7,
                       slew_per_s=5.0, u_man=0.0)
    st = P.pid_state(par, y0=0.0)
    io = _steady(3000, 0)
    P.pid_run(par, st, io[:500])
    par[0, P.MODE] = P.MODE_HOLD
    P.pid_run(par, st, io[500:1000])
    par[0, P.MODE] = P.MODE_AUTO
    P.pid_run(par, st, io[1000:1500])
    par[0, P.MODE] = P.MODE_MANUAL
    P.pid_run(par, st, io[1500:2500])
    par[0, P.MODE] = P.MODE_AUTO
    P.pid_run(par, st, io[2500:])
    u = io[:, 0, P.IO_U]
    assert np.all(u[500:1000] == u[499])                              # hold
    ref = _reference(par, io)
    for k in (1000, 2500):
        assert u[k] - u[k - 1] == pytest.approx(ref[k] - ref[k - 1], rel=1e-9, abs=1e-15)
    assert np.max(np.abs(np.diff(u[1500:2500]))) <= 5.0 * DT + 1e-15  # manual at the slew limit
    assert u[2499] == 0.0                                               # reached the manual value


def test_reset_and_nan_hold():
    par = P.pid_params(1, dt_s=DT, kp=1.0, ki_per_s=10.0, u_min=-1.0, u_max=1.0)
    st = P.pid_state(par, y0=0.0)
    io = P.io_block(10, 1)
    io[:, 0, P.IO_R] = 0.1
    io[5:7, 0, P.IO_Y] = np.nan
    P.pid_run(par, st, io)
    u = io[:, 0, P.IO_U]
    assert u[5] == u[4] and u[6] == u[4] and u[7] != u[4]
    assert st[0, P.N_HOLD] == 2.0
    P.pid_reset(par, st, u0=0.25, y0=0.0, r0=0.0)
    io = P.io_block(1, 1)
    P.pid_run(par, st, io)
    assert io[0, 0, P.IO_U] == pytest.approx(0.25)
    assert st[0, P.N_HOLD] == 0.0
