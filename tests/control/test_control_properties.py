"""Property tests (hypothesis): any input, including NaN, inf and huge values, never gives a
non-finite or out-of-limit output from the control kernels."""

import math

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kibble.control import electrostatic as E
from kibble.control import filters as F
from kibble.control import geometry as G
from kibble.control import pid as P
from kibble.control.loop import loop_run

ANY = st.floats(allow_nan=True, allow_infinity=True, width=64)
WILD = st.one_of(ANY, st.sampled_from([1e308, -1e308, 1e-308, 0.0, 1.0, -1.0]))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _io(data, n, n_axes):
    return data.draw(arrays(np.float64, (n, n_axes, P.NIO), elements=WILD))


@SETTINGS
@given(data=st.data(), kp=st.floats(0, 1e6), ki=st.floats(0, 1e6), kd=st.floats(0, 1e3),
       slew=st.one_of(st.just(math.inf), st.floats(1e-3, 1e6)), lim=st.floats(1e-6, 1e6),
       mode=st.sampled_from([P.MODE_HOLD, P.MODE_MANUAL, P.MODE_AUTO]), u_man=WILD)
def test_pid_output_finite_and_limited(data, kp, ki, kd, slew, lim, mode, u_man):
    u_man = u_man if math.isfinite(u_man) else 0.0
    par = P.pid_params(2, dt_s=1e-3, kp=kp, ki_per_s=ki, kd_s=kd, tf_s=1e-3, u_min=-lim,
                       u_max=0.5 * lim, slew_per_s=slew, mode=mode, u_man=u_man)
    s = P.pid_state(par)
    io = _io(data, 40, 2)
    P.pid_run(par, s, io)
    u = io[:, :, P.IO_U]
    assert np.all(np.isfinite(u)) and np.all(u >= -lim) and np.all(u <= 0.5 * lim)
    assert np.all(np.isfinite(s))


@SETTINGS
@given(data=st.data(), gain=st.floats(-1e6, 1e6), lim=st.floats(0.0, 1e6))
def test_loop_and_filter_module_output_finite_and_limited(data, gain, lim):
    par = P.pid_params(2, dt_s=1e-3, kp=3.0, ki_per_s=50.0, kd_s=0.01, tf_s=2e-3, u_min=-1.0,
                       u_max=2.0)
    s = P.pid_state(par)
    sos = np.stack([F.lowpass_sos(100.0, 5.0, 1e3), F.notch_sos(30.0, 10.0, 1e3)])
    fm_par = F.fm_params(2, dt_s=1e-3, gain=gain, mask=3, limit=lim, ramp_s=0.01)
    fm_sos = np.stack([sos, sos])
    fm_st = F.fm_state(fm_par, 2)
    io = _io(data, 40, 2)
    fm_io = io.copy()
    loop_run(par, s, fm_par, fm_sos, fm_st, io)
    u = io[:, :, P.IO_U]
    assert np.all(np.isfinite(u)) and np.all(u >= -1.0) and np.all(u <= 2.0)
    F.fm_run(fm_par, fm_sos, F.fm_state(fm_par, 2), fm_io)
    o = fm_io[:, :, P.IO_U]
    assert np.all(np.isfinite(o)) and np.all(np.abs(o) <= lim)
    assert np.all(np.isfinite(fm_st)) and np.all(np.isfinite(s))


@SETTINGS
@given(x=arrays(np.float64, (20, 4), elements=WILD))
def test_matrix_run_finite_and_limited(x):
    B = G.damping_force_matrix(np.radians([30.0, 150.0, 270.0]), 0.217, 0.1, 0.1)
    D = G.damping_pinv(B)
    lo, hi = np.full(6, -0.05), np.full(6, 0.05)
    out = np.empty((20, 6))
    G.matrix_run(D, x, lo, hi, np.zeros(6), out)
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 0.05)


@SETTINGS
@given(f=arrays(np.float64, 20, elements=WILD), pol=st.sampled_from([1.0, -1.0]),
       vs=st.floats(-10, 10), hold=WILD, bias=st.floats(-2000, 2000))
@example(f=np.zeros(20), pol=1.0, vs=0.0, hold=0.0, bias=5e-324)  # gain * bias underflows to 0
def test_electrostatic_finite_and_limited(f, pol, vs, hold, bias):
    out = np.empty(20)
    hold = hold if math.isfinite(hold) else 0.0
    E.efb_force_to_voltage(f, 4.7e-10, vs, pol, 1000.0, hold, out)
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1000.0)
    out2 = np.empty((20, 2))
    E.thetaz_voltages(f, bias, 1.5e-11, 1000.0, hold, out2)
    assert np.all(np.isfinite(out2)) and np.all(np.abs(out2) <= 1000.0)


@SETTINGS
@given(t=arrays(np.float64, 30, elements=WILD), jerk=st.sampled_from([math.inf, 2e-3]))
def test_trajectories_finite_for_any_time(t, jerk):
    from kibble.control import trajectory as T
    out = np.empty((30, 3))
    T.sweep_eval(t, 0.04, -1.0, 1e-3, 0.5e-3, jerk, 0.08, out)
    assert np.all(np.isfinite(out)) and np.all(np.abs(out[:, 0]) <= 0.04 + 1e-15)
    assert np.all(np.abs(out[:, 1]) <= 1e-3 + 1e-15) and np.all(np.abs(out[:, 2]) <= 0.5e-3 + 1e-15)
    T.erase_eval(t, 0.0, 380e-6, 20.0, 0.1, 160.0, out)
    assert np.all(np.isfinite(out)) and np.all(np.abs(out[:, 0]) <= 380e-6)
    ff = np.empty(30)
    T.load_step_feedforward(t, 1.0, 2.0, 1.0, 9.8, 710.2, 1e-3, ff)
    assert np.all(np.isfinite(ff)) and np.all(np.abs(ff) <= 9.8 / 710.2 * (1 + 1e-3 / 2.0) + 1e-15)
