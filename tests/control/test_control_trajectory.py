"""Trajectories: velocity sweep (trapezoid and jerk-limited), erase, load-step feedforward."""

import math

import numpy as np
import pytest

from kibble.control import trajectory as T

V, A, L = 1e-3, 0.5e-3, 0.08


@pytest.mark.parametrize("jerk", [math.inf, 2e-3])
def test_sweep_continuous_bounded_exact(jerk):
    dur = T.sweep_duration_s(V, A, L, jerk)
    start, direction = T.sweep_plan(2, centre_m=0.01, travel_m=L)
    assert list(direction) == [-1.0, 1.0] and start[0] == pytest.approx(0.05)
    dt = 1e-3
    t = np.arange(-0.5, dur + 0.5, dt)
    out = np.empty((t.size, 3))
    T.sweep_eval(t, start[0], direction[0], V, A, jerk, L, out)
    p, v, a = out.T
    assert abs(p[-1] - (start[0] - L)) <= 1e-12 and p[0] == start[0]
    assert np.all(np.abs(a) <= A * (1 + 1e-12))
    assert np.max(np.abs(np.diff(p))) <= V * dt * (1 + 1e-9)          # position continuous
    # velocity continuous: its changes are bounded by the acceleration bound
    assert np.max(np.abs(np.diff(v))) <= A * dt * (1 + 1e-9)
    # velocity is the derivative of position, acceleration of velocity (central differences)
    np.testing.assert_allclose((p[2:] - p[:-2]) / (2 * dt), v[1:-1], rtol=0, atol=A * dt)
    if math.isfinite(jerk):
        np.testing.assert_allclose((v[2:] - v[:-2]) / (2 * dt), a[1:-1], rtol=0, atol=jerk * dt)
        assert np.max(np.abs(np.diff(a))) <= jerk * dt * (1 + 1e-9)
    cruise = (t > dur / 2 - 10) & (t < dur / 2 + 10)
    assert np.all(v[cruise] == -V)
    # exact end point when evaluated at the end time itself, and the up sweep returns
    T.sweep_eval(np.array([dur]), start[1], direction[1], V, A, jerk, L, out[:1])
    assert out[0, 0] == start[1] + L and out[0, 1] == 0.0
    assert dur == pytest.approx(L / V + (V / A if math.isinf(jerk) else V / A + A / jerk))


def test_sweep_rejects_short_travel():
    with pytest.raises(ValueError):
        T.sweep_duration_s(V, A, 0.5e-3)


def test_erase_starts_and_ends_at_rest():
    dur = T.erase_duration_s(20.0, 0.1)
    assert dur == 160.0
    dt = 1e-3
    t = np.arange(0.0, dur + 1.0, dt)
    out = np.empty((t.size, 3))
    T.erase_eval(t, 1e-6, 380e-6, 20.0, 0.1, dur, out)
    p, v, a = out.T
    assert p[0] == 1e-6 and v[0] == 0.0 and a[0] == 0.0
    end = t >= dur
    assert np.all(p[end] == 1e-6) and np.all(v[end] == 0.0) and np.all(a[end] == 0.0)
    # approaching the end: position, velocity, acceleration go to the rest values continuously
    near = (t > dur - 0.01) & (t < dur)
    assert np.max(np.abs(p[near] - 1e-6)) < 1e-13 and np.max(np.abs(v[near])) < 1e-11
    assert np.all(np.diff(np.abs(v[near])) < 0)
    np.testing.assert_allclose((p[2:] - p[:-2]) / (2 * dt), v[1:-1], rtol=0, atol=1e-10)
    np.testing.assert_allclose((v[2:] - v[:-2]) / (2 * dt), a[1:-1], rtol=0, atol=1e-7)
    assert np.max(np.abs(np.diff(a))) < 5e-3 * np.max(np.abs(a))      # acceleration continuous
    # envelope: 380 um exp(-t / 20 s) after the taper
    mid = (t > 10.0) & (t < 150.0)
    assert np.all(np.abs(p[mid] - 1e-6) <= 380e-6 * np.exp(-t[mid] / 20.0) + 1e-15)
    k = np.argmin(np.abs(t - 12.5))                                      # sin peak at 12.5 s
    assert p[k] - 1e-6 == pytest.approx(380e-6 * math.exp(-12.5 / 20.0), rel=1e-9)


def test_load_step_feedforward_cancels_ramped_load():
    bl, g, m = 710.2, 9.801, 1.0
    t = np.arange(0.0, 5.0, 1e-3)
    out = np.empty_like(t)
    T.load_step_feedforward(t, 1.0, 2.0, m, g, bl, 0.0, out)
    load = m * g * np.clip((t - 1.0) / 2.0, 0.0, 1.0)          # plant: linear ramp of the load
    np.testing.assert_allclose(bl * out, load, rtol=0, atol=1e-12)
    # with a first-order source lag tau, the lagged command equals the ramp (exact ODE solution)
    tau = 0.05
    T.load_step_feedforward(t, 1.0, 2.0, -0.5, g, bl, tau, out)
    i = np.zeros_like(t)
    dt = t[1] - t[0]
    for k in range(1, t.size):                                   # first-order lag, held input
        a = math.exp(-dt / tau)
        i[k] = a * i[k - 1] + (1 - a) * out[k - 1]
    target = -0.5 * g / bl * np.clip((t - 1.0) / 2.0, 0.0, 1.0)
    settled = (t > 1.5) & (t < 3.0)
    assert np.max(np.abs(i[settled] - target[settled])) < 0.02 * abs(target.min())
    T.load_step_feedforward(t, 1.0, 2.0, -0.5, g, bl, 0.0, out)
    i0 = np.zeros_like(t)
    for k in range(1, t.size):
        i0[k] = math.exp(-dt / tau) * i0[k - 1] + (1 - math.exp(-dt / tau)) * out[k - 1]
    assert np.max(np.abs(i0[settled] - target[settled])) > 2 * np.max(np.abs(i[settled] - target[settled]))
