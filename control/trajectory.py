"""Setpoint trajectories (numba kernels): velocity-mode sweep, erase, load-step feedforward.

All kernels evaluate an analytic profile at given times, so a service can call them per frame
(``n = 1``) or for a whole block; the end points are assigned exactly.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["sweep_eval", "sweep_duration_s", "sweep_plan", "erase_eval", "erase_duration_s",
           "load_step_feedforward", "load_step_feedforward_at"]


@njit(cache=True, error_model="numpy", inline="always")
def _accel_phase(t, v, a, tj):
    """Position, velocity, acceleration of the acceleration phase at time t in [0, T_a]."""
    if tj <= 0.0:
        return 0.5 * a * t * t, a * t, a
    j = a / tj
    ta = v / a + tj
    if t < tj:
        return j * t * t * t / 6.0, 0.5 * j * t * t, j * t
    if t <= ta - tj:
        u = t - tj
        return j * tj * tj * tj / 6.0 + 0.5 * a * tj * u + 0.5 * a * u * u, 0.5 * a * tj + a * u, a
    tau = ta - t
    return 0.5 * v * ta - v * tau + j * tau * tau * tau / 6.0, v - 0.5 * j * tau * tau, j * tau


@njit(cache=True, error_model="numpy")
def _sweep_shape(speed, accel, jerk):
    """(effective acceleration, jerk ramp time tj, acceleration time T_a) of one sweep."""
    if math.isinf(jerk):
        return accel, 0.0, speed / accel
    a = min(accel, math.sqrt(speed * jerk))
    tj = a / jerk
    return a, tj, speed / a + tj


def sweep_duration_s(speed_m_per_s: float, accel_m_per_s2: float, travel_m: float,
                     jerk_m_per_s3: float = math.inf) -> float:
    """Duration (s) of one sweep; raises ``ValueError`` if the travel is too short to reach
    the speed."""
    if not (speed_m_per_s > 0 and accel_m_per_s2 > 0 and travel_m > 0 and jerk_m_per_s3 > 0):
        raise ValueError("sweep needs positive speed, acceleration, travel and jerk")
    a, tj, ta = _sweep_shape(speed_m_per_s, accel_m_per_s2, jerk_m_per_s3)
    d_acc = 0.5 * speed_m_per_s * ta
    if 2.0 * d_acc > travel_m:
        raise ValueError(f"travel {travel_m} m too short: acceleration + deceleration need {2 * d_acc} m")
    return 2.0 * ta + (travel_m - 2.0 * d_acc) / speed_m_per_s


def sweep_plan(n_sweeps: int, centre_m: float = 0.0, travel_m: float = 0.08):
    """Start positions (m) and directions (+1 up, -1 down) of ``n_sweeps`` alternating sweeps
    over ``travel_m`` centred on ``centre_m``, down first. Returns two arrays of shape (n,)."""
    direction = np.where(np.arange(n_sweeps) % 2 == 0, -1.0, 1.0)
    start = centre_m - direction * 0.5 * travel_m
    return start, direction


@njit(cache=True, error_model="numpy")
def sweep_eval(t_s, start_m, direction, speed_m_per_s, accel_m_per_s2, jerk_m_per_s3, travel_m, out):
    """One velocity-mode sweep at times ``t_s[n]`` (s, 0 = sweep start).

    Accelerate at ``accel_m_per_s2`` (jerk-limited to ``jerk_m_per_s3`` unless it is inf: trapezoid),
    cruise at ``speed_m_per_s``, decelerate symmetrically, stopping exactly at
    ``start_m + direction * travel_m`` (direction +1 up, -1 down). The deceleration is the
    time-reversed acceleration, ``p(t) = L - p_acc(T - t)``. Before the start the profile rests
    at ``start_m`` (also for a NaN time), after the end at the end point. ``out[n, 3]``: position (m), velocity (m/s),
    acceleration (m/s^2). Use :func:`sweep_duration_s` to validate the parameters."""
    a, tj, ta = _sweep_shape(speed_m_per_s, accel_m_per_s2, jerk_m_per_s3)
    d_acc = 0.5 * speed_m_per_s * ta
    total = 2.0 * ta + (travel_m - 2.0 * d_acc) / speed_m_per_s
    for k in range(t_s.shape[0]):
        t = t_s[k]
        if t <= 0.0 or t != t:
            p, v, acc = 0.0, 0.0, 0.0
        elif t >= total:
            p, v, acc = travel_m, 0.0, 0.0
        elif t < ta:
            p, v, acc = _accel_phase(t, speed_m_per_s, a, tj)
        elif t <= total - ta:
            p, v, acc = d_acc + speed_m_per_s * (t - ta), speed_m_per_s, 0.0
        else:
            p, v, acc = _accel_phase(total - t, speed_m_per_s, a, tj)
            p, acc = travel_m - p, -acc
        if t >= total:
            out[k, 0] = start_m + direction * travel_m
        else:
            out[k, 0] = start_m + direction * p
        out[k, 1] = direction * v
        out[k, 2] = direction * acc


def erase_duration_s(decay_s: float = 20.0, freq_hz: float = 0.1, n_decay: float = 8.0) -> float:
    """Erase duration (s): ``n_decay`` decay times rounded up to whole periods (8 decay times
    leave 380 um x e^-8 = 0.13 um before the final taper)."""
    return math.ceil(n_decay * decay_s * freq_hz) / freq_hz


@njit(cache=True, error_model="numpy")
def erase_eval(t_s, centre_m, amplitude_m, decay_s, freq_hz, duration_s, out):
    """Erase trajectory: damped sinusoid about the weighing position, at times ``t_s[n]`` (s).

    ``z = centre + A exp(-t/tau) sin(w t) h(t)``, ``h`` a sin^2 taper over the first and last
    half period (``h = 1`` between), so the motion starts and ends at ``centre_m`` at rest with
    continuous acceleration; exactly ``centre_m`` and zero velocity outside ``[0, duration_s]``
    (and for a NaN time).
    ``amplitude_m`` (m, 380e-6 in NIST-4), ``decay_s`` tau (s, 20 s), ``freq_hz`` (Hz),
    ``duration_s`` >= one period. ``out[n, 3]``: position (m), velocity (m/s), acceleration (m/s^2)."""
    w = 2.0 * math.pi * freq_hz
    tw = 0.5 / freq_hz
    c = 0.5 * math.pi / tw
    for k in range(t_s.shape[0]):
        t = t_s[k]
        if not (0.0 < t < duration_s):
            out[k, 0] = centre_m
            out[k, 1] = 0.0
            out[k, 2] = 0.0
            continue
        if t < tw:
            sh = math.sin(c * t)
            ch = math.cos(c * t)
            h, h1, h2 = sh * sh, 2.0 * c * sh * ch, 2.0 * c * c * (ch * ch - sh * sh)
        elif t > duration_s - tw:
            tau = duration_s - t
            sh = math.sin(c * tau)
            ch = math.cos(c * tau)
            h, h1, h2 = sh * sh, -2.0 * c * sh * ch, 2.0 * c * c * (ch * ch - sh * sh)
        else:
            h, h1, h2 = 1.0, 0.0, 0.0
        e = amplitude_m * math.exp(-t / decay_s)
        s = math.sin(w * t)
        co = math.cos(w * t)
        f = e * s                                   # damped sinusoid and its derivatives
        f1 = e * (w * co - s / decay_s)
        f2 = e * (s / (decay_s * decay_s) - 2.0 * w * co / decay_s - w * w * s)
        out[k, 0] = centre_m + f * h
        out[k, 1] = f1 * h + f * h1
        out[k, 2] = f2 * h + 2.0 * f1 * h1 + f * h2


@njit(cache=True, error_model="numpy")
def load_step_feedforward(t_s, t0_s, ramp_s, delta_mass_kg, g_m_per_s2, bl_t_m, lag_s, out):
    """Main-coil current increment (A) that cancels a known load change on the main side.

    The load (mass put on: ``delta_mass_kg > 0``; taken off or auxiliary mass lifted off the
    pan: ``< 0``) is applied as a linear ramp from ``t0_s`` over ``ramp_s`` (s), as the NIST-4
    mass lift does; the coil force ``Bl I`` (up) must grow by ``delta_m g``, so
    ``dI(t) = delta_m g / Bl * clip((t - t0)/ramp, 0, 1) + lag_s d/dt(...)``, the second term
    cancelling a first-order current-source lag of ``lag_s`` (s; 0 = none); a NaN time gives 0. ``t_s[n]`` (s),
    ``out[n]`` current increment (A)."""
    di = delta_mass_kg * g_m_per_s2 / bl_t_m
    for k in range(t_s.shape[0]):
        x = (t_s[k] - t0_s) / ramp_s
        if x <= 0.0 or x != x:
            out[k] = 0.0
        elif x >= 1.0:
            out[k] = di
        else:
            out[k] = di * x + lag_s * di / ramp_s


def load_step_feedforward_at(t_s: float, t0_s: float, ramp_s: float, delta_mass_kg: float,
                             g_m_per_s2: float, bl_t_m: float, lag_s: float) -> float:
    """:func:`load_step_feedforward` at one time ``t_s`` (s), in plain Python: a service's
    per-frame call costs a fraction of the kernel's dispatch. The same IEEE operations in the
    same order (the kernel is compiled without fastmath), so the same bits."""
    if ramp_s == 0.0 or bl_t_m == 0.0:  # the kernel's division by zero (inf/nan, no exception)
        out = np.zeros(1)
        load_step_feedforward(np.array([t_s], dtype=float), t0_s, ramp_s, delta_mass_kg,
                              g_m_per_s2, bl_t_m, lag_s, out)
        return float(out[0])
    di = delta_mass_kg * g_m_per_s2 / bl_t_m
    x = (t_s - t0_s) / ramp_s
    if x <= 0.0 or x != x:
        return 0.0
    if x >= 1.0:
        return di
    return di * x + lag_s * di / ramp_s
