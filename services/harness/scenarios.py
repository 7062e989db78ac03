"""Closed-loop scenarios that measure the figures of docs/architecture.md section 7.

Each scenario drives a running stack the way an operator would (commands to the daemons,
simulator control for disturbances) and reads the simulator's ground truth. A stack is anything
with the :class:`Loop` interface: :class:`~kibble.services.harness.inprocess.InProcessStack` (tests,
benchmarks: long simulated durations, no broker) or :class:`~kibble.services.plans.mqtt_loop.BusLoop`
(the real daemons over MQTT: the HIL tests and ``make run``). The same code measures both.
"""

from __future__ import annotations

import math
from typing import Any

import control as ct
import numpy as np
from scipy import signal

from kibble.hil_sim.nist4 import Nist4Actuators, Nist4Plant
from kibble.services.plans.engine import Loop


def band_rms(x: np.ndarray, fs_hz: float, f_hz: float = 0.1) -> float:
    """RMS of ``x`` (mean removed) low-passed to ``f_hz``: 4th-order Butterworth, zero phase."""
    sos = signal.butter(4, f_hz, fs=fs_hz, output="sos")
    y = signal.sosfiltfilt(sos, x - x.mean())
    return float(np.sqrt(np.mean(y * y)))


def settle_time_s(z: np.ndarray, fs_hz: float, tol_m: float) -> float:
    """Time from the start of ``z`` until it stays within ``tol_m`` of zero (s)."""
    outside = np.nonzero(np.abs(z) > tol_m)[0]
    return 0.0 if outside.size == 0 else (outside[-1] + 1) / fs_hz


def decay_time_s(x: np.ndarray, fs_hz: float) -> float:
    """Exponential decay time (s) of a ring-down: straight line through log |analytic signal|
    over the first half of the record after the first tenth (the Hilbert envelope is poor at
    the ends, and the second half approaches the noise floor)."""
    env = np.abs(signal.hilbert(x - x.mean()))
    n = env.size
    keep = slice(n // 10, n // 2)
    t = np.arange(n)[keep] / fs_hz
    slope = np.polyfit(t, np.log(env[keep]), 1)[0]
    return -1.0 / slope


async def force_mode(loop: Loop) -> dict[str, Any]:
    """The servo in force mode at rest: an approach to ``z_ref_m`` that the mode starts (where
    the coil was away from it) is waited out, as the plans' ``force_mode`` does. The reply."""
    reply = await loop.command("servo", "mode", mode="force")
    if reply.get("trajectory"):
        await loop.run_seconds(reply["duration_s"] + 0.5, record=False)
    return reply


async def force_null(loop: Loop, seconds: float, settle_s: float = 10.0) -> dict[str, Any]:
    """Force mode at the null: z RMS in 0.1 Hz bandwidth (m) over ``seconds`` after settling."""
    await force_mode(loop)
    await loop.run_seconds(settle_s, record=False)
    tr = await loop.run_seconds(seconds)
    z = tr["z_m"]
    return {"null_rms_m": band_rms(z, loop.rate_hz), "null_mean_m": float(z.mean()),
            "null_peak_m": float(np.abs(z).max()), "truth": tr}


async def mass_exchanges(loop: Loop, cycles: int = 1, window_s: float = 12.0,
                         erase: bool = True, erase_tail_s: float = 3.0) -> dict[str, Any]:
    """Force mode: auxiliary mass off, then the test mass on and off ``cycles`` times, each 1 kg
    exchange followed by an erase (and ``erase_tail_s`` at rest after it). Every exchange, the
    auxiliary mass's included, is recorded over ``window_s``: ``exchanges`` names them
    (``aux off``, ``1 kg on``, ``1 kg off``, ...), ``peaks_m`` and ``settle_s`` give the peak
    excursion (m) and the settling time to 1 um (s) of each, in that order; ``currents`` the
    mean current and Bl at the end of each 1 kg window and ``erase_end_m`` the largest |z| over
    the last second after each erase (m)."""
    await force_mode(loop)
    names, peaks, settles, ends, erase_end = [], [], [], [], []

    async def exchange(name: str, **masses: bool) -> dict[str, np.ndarray]:
        await loop.command("servo", "mass", **masses)
        tr = await loop.run_seconds(window_s)
        z = tr["z_m"]
        names.append(name)
        peaks.append(float(np.abs(z).max()))
        settles.append(settle_time_s(z, loop.rate_hz, 1e-6))
        return tr

    await exchange("aux off", aux=False)
    for _ in range(cycles):
        for test_on in (True, False):
            tr = await exchange("1 kg on" if test_on else "1 kg off", test=test_on)
            tail = slice(-int(0.4 * tr["z_m"].size), None)
            ends.append((test_on, float(tr["i_main_a"][tail].mean()), float(tr["bl_t_m"][tail].mean())))
            if erase:
                info = await loop.command("servo", "erase")
                tr = await loop.run_seconds(info["duration_s"] + erase_tail_s)
                erase_end.append(float(np.abs(tr["z_m"][-int(loop.rate_hz):]).max()))
    return {"exchanges": names, "peaks_m": peaks, "settle_s": settles, "currents": ends,
            "erase_end_m": erase_end}


async def velocity_sweeps(loop: Loop, travel_m: float = 0.08, directions=("down", "up"),
                          settle_s: float = 6.0) -> dict[str, Any]:
    """Velocity mode with the auxiliary mass on: move to the top of the travel, open the
    damping, sweep each way; the velocity error RMS relative to the speed over the
    constant-velocity part of each sweep (1 s of margin after the acceleration and before the
    deceleration). Ends back at the null in force mode, damping closed."""
    await force_mode(loop)
    await loop.command("servo", "mass", aux=True, test=False)
    await loop.run_seconds(settle_s, record=False)
    await loop.command("servo", "mode", mode="velocity")
    await loop.command("servo", "param.set", name="sweep_travel_m", value=travel_m)
    move = await loop.command("servo", "move", z_m=travel_m / 2)
    await loop.run_seconds(move["duration_s"] + 0.5, record=False)
    errors = []
    for direction in directions:
        await loop.command("damping", "open")
        sweep = await loop.command("servo", "sweep", direction=direction)
        tr = await loop.run_seconds(sweep["duration_s"] + 0.5)
        await loop.command("damping", "close")
        # timed from the servo's reply, as plans.velocity_set does: over the bus the record may
        # start before the servo took the command (the simulator runs on while a reply is
        # awaited), and the ramps' duration includes the jerk limit
        dt_s = 1.0 / loop.rate_hz
        t_end = sweep["end_frame"] * dt_s
        t_start = t_end - math.ceil(sweep["duration_s"] / dt_s) * dt_s
        t_acc = sweep["duration_s"] - abs(sweep["end_m"] - sweep["start_m"]) / sweep["speed_m_per_s"]
        t = tr["t_s"]
        cruise = (t > t_start + t_acc + 1.0) & (t < t_end - t_acc - 1.0)
        v = -sweep["speed_m_per_s"] if direction == "down" else sweep["speed_m_per_s"]
        errors.append(float(np.sqrt(np.mean((tr["vz_m_per_s"][cruise] - v) ** 2)) / sweep["speed_m_per_s"]))
    back = await loop.command("servo", "move", z_m=0.0)
    await loop.run_seconds(back["duration_s"] + 1.0, record=False)
    await force_mode(loop)
    return {"velocity_err_rel_rms": errors}


def undamped_decay_times_s(params: dict[str, Any] | None = None) -> dict[str, float]:
    """Decay times (s) of the x, y, theta-x, theta-y modes with the damping coils open, from
    the eigenvalues of the plant's linearization (python-control)."""
    plant = Nist4Plant(params or {}, seed=0)
    poles = ct.poles(plant.linearize(Nist4Actuators(main_force_mode=True)))
    out = {}
    for dof, f in zip(("x", "y", "theta_x", "theta_y"), plant.params["suspension.freq_hz"][:4]):
        p = poles[np.argmin(np.abs(np.abs(poles.imag) - 2 * math.pi * f))]
        out[dof] = -1.0 / p.real
    return out


DAMPING_IMPULSES = {"x": ("x_m", 3e-4), "y": ("y_m", 3e-4), "theta_x": ("theta_x_rad", 1e-5),
                    "theta_y": ("theta_y_rad", 1e-5)}
"""Impulse (N s or N m s) per DOF: ~7 um and ~3 urad amplitude, far above the noise."""


async def damping_ratios(loop: Loop, record_s: float = 8.0) -> dict[str, Any]:
    """Undamped / damped decay time per DOF: undamped from the linearized plant, damped from a
    ring-down of the closed loop after an impulse (force mode, damping armed and closed)."""
    undamped = undamped_decay_times_s()
    ratios, damped = {}, {}
    for dof, (key, impulse) in DAMPING_IMPULSES.items():
        await loop.sim("inject_impulse", dof=dof, impulse=impulse)
        tr = await loop.run_seconds(record_s)
        damped[dof] = decay_time_s(tr[key], loop.rate_hz)
        ratios[dof] = undamped[dof] / damped[dof]
    return {"ratios": ratios, "damped_s": damped, "undamped_s": undamped}


async def efb_null(loop: Loop, seconds: float, settle_s: float = 20.0) -> dict[str, Any]:
    """EFB: null held with the 1 mg artifact loaded; z RMS in 0.1 Hz bandwidth (m) and the mean
    electrode voltage (V)."""
    await force_mode(loop)
    await loop.run_seconds(settle_s, record=False)
    await loop.command("servo", "mass", test=True)
    await loop.run_seconds(settle_s, record=False)
    tr = await loop.run_seconds(seconds)
    z = tr["z_m"]
    return {"null_rms_m": band_rms(z, loop.rate_hz), "null_mean_m": float(z.mean()),
            "v_out_mean_v": float(tr["v_out_v"].mean()), "truth": tr}
