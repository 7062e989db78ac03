"""Design helpers (kibble.control.design): gain proposal, loop analysis, closed-loop step,
checked with python-control's own margins and an in-kernel closed-loop simulation."""

import math

import control as ct
import numpy as np
import pytest

from kibble.control import design as D
from kibble.control import filters as F
from kibble.control import pid as P

DT = 1e-3


@pytest.mark.filterwarnings("ignore:stability_margins")
@pytest.mark.parametrize("plant,fc,pm,delay", [
    (ct.tf([1 / 40.0], [1, 0, 0]), 5.0, 45.0, 1),                                  # double integrator
    (ct.tf([0.305**2 * 710.2 / 8.3], [1, 2 * math.pi * 0.033 / 200, (2 * math.pi * 0.033) ** 2]),
     2.0, 50.0, 2),                                                                # wheel-like, force mode
    (ct.c2d(ct.tf([1.0], [1, 0.1, 0]), DT, "zoh"), 10.0, 40.0, 0),                 # discrete plant
])
def test_proposed_gains_meet_bandwidth_and_phase_margin(plant, fc, pm, delay):
    g = D.propose_pid(plant, DT, fc, pm, delay_samples=delay)
    par = P.pid_params(1, dt_s=DT, **g)
    _, c_y = D.pid_tfs(par[0])
    L = D.loop_gain(plant, c_y, delay)
    gm_, pm_, wg_, wp_ = ct.margin(L)[:4]
    assert wp_ / (2 * math.pi) == pytest.approx(fc, rel=0.05)
    assert pm_ == pytest.approx(pm, rel=0.05)
    fig = D.loop_analysis(L)
    assert fig.stable and fig.crossover_hz == pytest.approx(fc, rel=0.05)
    assert fig.bandwidth_hz > fc


def test_proposal_with_filter_and_closed_loop_step_matches_kernel():
    """Proposed gains with a low-pass in the filter module; the python-control closed-loop
    step response equals the kernel driving a discretized plant in closed loop."""
    plant = ct.tf([1 / 40.0], [1, 0, 0])
    sos = F.lowpass_sos(60.0, 0.7071, 1 / DT)[None]
    fm_par = F.fm_params(1, dt_s=DT, mask=1)
    g = D.propose_pid(plant, DT, 4.0, 45.0, delay_samples=1, filter_tf=D.fm_tf(fm_par[0], sos))
    par = P.pid_params(1, dt_s=DT, b=1.0, **g)
    c_r, c_y = D.kernel_tfs(par[0], fm_par[0], sos)
    L = D.loop_gain(plant, c_y, 1)
    fig = D.loop_analysis(L)
    assert fig.phase_margin_deg == pytest.approx(45.0, rel=0.05)
    assert fig.crossover_hz == pytest.approx(4.0, rel=0.05)
    # the kernel in closed loop with the ZOH-discretized plant (one sample of delay)
    from kibble.control.loop import loop_run
    pd = ct.ss(D.discretize_plant(plant, DT, 1))
    st = P.pid_state(par, y0=0.0)
    fm_st = F.fm_state(fm_par, 1)
    n = 1500
    x = np.zeros(pd.nstates)
    y = np.empty(n)
    one = P.io_block(1, 1)
    for k in range(n):
        y[k] = (pd.C @ x).item()
        one[0, 0, P.IO_R] = 1.0
        one[0, 0, P.IO_Y] = y[k]
        loop_run(par, st, fm_par, sos[None], fm_st, one)
        x = pd.A @ x + pd.B[:, 0] * one[0, 0, P.IO_U]
    # python-control, in state space (y = P u, u = C_r r + C_y y)
    c_r_pid, c_y_pid = D.pid_tfs(par[0])
    c_y_ss = ct.series(ct.ss(D.fm_tf(fm_par[0], sos)), ct.ss(c_y_pid))
    T = ct.series(ct.ss(c_r), ct.feedback(pd, c_y_ss, sign=1))
    t = np.arange(n) * DT
    ref = ct.step_response(T, T=t).outputs.squeeze()
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-9)
    # closed_loop_step is the complementary sensitivity of L (unit DC gain with integral action)
    ts, ys = D.closed_loop_step(L, 3.0)
    assert ys[-1] == pytest.approx(1.0, abs=1e-3)


def test_invalid_requests_raise():
    with pytest.raises(ValueError):
        D.propose_pid(ct.tf([1.0], [1, 0, 0]), DT, 600.0, 45.0)
    with pytest.raises(ValueError):
        D.discretize_plant(ct.tf([1.0], [1, -0.5], 0.01), DT)


def test_kernel_delay_equals_plant_delay():
    """A controller delay in kernel_tfs gives the same loop gain as the delay on the plant."""
    plant = ct.tf([1 / 40.0], [1, 0, 0])
    par = P.pid_params(1, dt_s=DT, kp=2000.0, ki_per_s=5000.0, kd_s=200.0, tf_s=0.003)
    _, c_y2 = D.kernel_tfs(par[0], delay_samples=2)
    _, c_y0 = D.kernel_tfs(par[0])
    z = np.exp(2j * np.pi * np.array([0.5, 5.0, 50.0]) * DT)
    np.testing.assert_allclose(D.loop_gain(plant, c_y2)(z), D.loop_gain(plant, c_y0, 2)(z), rtol=1e-9)
    np.testing.assert_allclose(c_y2(z), c_y0(z) * z**-2, rtol=1e-12)
