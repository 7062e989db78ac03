"""NIST electrostatic force balance (EFB) plant: floating link of a parallelogram 4-bar
linkage softened by a buckling spring, concentric-cylinder capacitor, auxiliary electrode.

Parameters: ``hil_sim/efb.toml``. Physics (z up, m; positive z increases cylinder overlap):

``m z'' = -k z - c z' - F_tare - m_load g_eff - f_imb m a_gz + F_main + F_aux + F_hyst + F_ext
+ F_stop`` with ``g_eff = g + a_gz`` and

* ``F_main = 1/2 dC/dz(z, T) (V_main - V_s)^2``, ``dC/dz(z, T) = (c1 + tc (T - T_ref))
  (1 + sum_{n=1..5} a_n (z/z_s)^n)`` (seed 000: F = kappa V^2, kappa = dC/dz / 2, 5th-order
  profile, -4.2e-15 F/m/K, surface potential V_s of tens of mV);
* ``F_aux = 1/2 dC_aux/dz (V_aux - V_s,aux)^2`` (auxiliary electrode, gradient mode);
* one HV amplifier (24-bit DAC, +-1000 V, first-order lag) switched by a relay to the main
  electrodes (weighing) or to the auxiliary electrode (gradient mode); the electrode not
  connected sits at 0 V (its surface potential still pulls);
* ``F_hyst``: Iwan (Prandtl/Maxwell-slip) elements in the flexures, as in the NIST-4 knife edge;
* ``k`` (flexures plus buckling spring) may be negative, tuned through zero by the buckling
  spring (unstable without the loop, growth rate ``sqrt(-k/m)``); the damping
  ``c = sqrt(k_nom m) / q`` and the Iwan elements' stiffnesses are stated at the nominal
  stiffness ``k_nom > 0``: they belong to the flexures, which the tuning does not change (as
  the NIST-4 knife edge's);
* mass loading: 1 mg / 20 mg artifacts (or any mass) ramped on the mass holder;
* the ``published`` noise profile's mechanisms (:func:`published_tick`; each a ``noise.*``
  switch, all off in ``quiet`` and ``off``, which then draw nothing of them): floor tilt through
  the travel's misalignment, the residual gas's Brownian force, the surface potential's random
  walk (in ``V_s`` above), the interferometer's 1/f flicker and its least significant bit, and
  the thermal drift of the restoring force and of the interferometer's dead path.

The linear mechanics (z, z') is stepped exactly (matrix exponential, zero-order hold of the
other forces at the step start); the amplifier lag exactly. Capacitance bridge:
``C(z) = C0 + int_0^z dC/dz``, read every ``bridge.period_s`` and held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from numba import njit
from scipy.linalg import expm

from .errors import ActuatorError
from .nist4 import NormalDraws, advance_in_chunks
from .noise import ground_filter, ground_tick, white_std
from .params import DEFAULT_NOISE, Params, load_params

BOLTZMANN_J_K = 1.380649e-23
AVOGADRO_PER_MOL = 6.02214076e23
FLICKER_POLES_PER_DECADE = 2
FLICKER_LN_RATIO = math.log(10.0) / FLICKER_POLES_PER_DECADE
"""Each flicker pole's variance is ``A^2 ln r`` (``r`` the poles' frequency ratio): the sum of
first-order poles, log-spaced, has the one-sided PSD ``A^2 / f`` between the first and the last."""


def flicker_poles(f_lo_hz: float, f_hi_hz: float) -> np.ndarray:
    """Corner frequencies (Hz) of the interferometer flicker poles: ``f_lo`` times
    ``10^(k / FLICKER_POLES_PER_DECADE)`` up to ``f_hi``."""
    n = int(math.floor(FLICKER_POLES_PER_DECADE * math.log10(f_hi_hz / f_lo_hz) + 1e-9)) + 1
    return f_lo_hz * 10.0 ** (np.arange(n) / FLICKER_POLES_PER_DECADE)

__all__ = ["EfbActuators", "EfbSensors", "EfbTruth", "EfbBlock", "EfbPlant", "linearize",
           "SENSOR_FIELDS", "TRUTH_FIELDS"]

Z, V, VA = 0, 1, 2
NX = 3
(E_T, E_M, E_MT, E_RATE, E_TEMP, E_TSET, E_P, E_AG, E_GS0, E_GS1, E_NHV, E_EXT, E_EXTN,
 E_TICK, E_BNEXT, E_BRIDGE, E_FH, E_TILT, E_VSD, E_TL, E_FN, E_ZIFO) = range(22)
NE = 23
A_V, A_MAIN, A_EN = 0, 1, 2
NA = 3
(P_H, P_M, P_K, P_C, P_G, P_IMB, P_TARE, P_STOP, P_KSTOP, P_CSTOP, P_DC, P_ZS, P_A1, P_A2, P_A3,
 P_A4, P_A5, P_C0, P_TC, P_TREF, P_VS, P_DCA, P_VSA, P_TAUHV, P_TICKN, P_FLOOR, P_NHV, P_TA,
 P_TSTD, P_TDRIFT, P_LAM, P_PHSTD, P_DVMSTD, P_DVMRES, P_DVMRNG, P_BRP, P_BRSTD, P_BRRES,
 P_TSSTD, P_TSRES, P_PRSTD, P_ADCQ, P_NX, P_TILTA, P_TILTS, P_TILTK, P_GASS, P_VSW, P_THON, P_TLA,
 P_TL0, P_TFK, P_TZK, P_IFOQ) = range(54)
NP = 54
NX_FIXED = 3
"""Normals per noise tick of the published mechanisms besides the flicker poles (tilt, residual
gas, surface potential), taken only when one of them is switched on."""

SENSOR_FIELDS = ("ifo_fringes", "ifo_phase_rad", "dvm_V", "bridge_pF", "temperature_C",
                 "pressure_Pa", "time_s")
S_FR, S_PH, S_DVM, S_BR, S_TEMP, S_PRES, S_TIME = range(7)
NS = 7
TRUTH_FIELDS = ("t", "z", "vz", "v_amp", "v_out", "f_main", "f_aux", "dcdz", "capacitance",
                "temperature", "agz", "m_load", "f_hyst")
NT = len(TRUTH_FIELDS)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _dcdz(z, temp, P):
    """(dC/dz, d2C/dz2, C - C0) at z, temperature."""
    u = z / P[P_ZS]
    c1 = P[P_DC] + P[P_TC] * (temp - P[P_TREF])
    p = 1.0 + u * (P[P_A1] + u * (P[P_A2] + u * (P[P_A3] + u * (P[P_A4] + u * P[P_A5]))))
    dp = (P[P_A1] + u * (2 * P[P_A2] + u * (3 * P[P_A3] + u * (4 * P[P_A4] + u * 5 * P[P_A5])))) / P[P_ZS]
    ip = z * (1.0 + u * (P[P_A1] / 2 + u * (P[P_A2] / 3 + u * (P[P_A3] / 4 + u * (P[P_A4] / 5 + u * P[P_A5] / 6)))))
    return c1 * p, c1 * dp, c1 * ip


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _forces(x, slip, env, act, P, hyk):
    """Force on the floating link except -k z - c z'; returns (F, F_main, F_aux, V_out, dC/dz)."""
    z = x[Z]
    vout = 0.0
    if act[A_EN] != 0.0:
        vout = x[VA] + env[E_NHV]
    dc, _, _ = _dcdz(z, env[E_TEMP], P)
    vm = vout if act[A_MAIN] != 0.0 else 0.0
    va = vout if act[A_MAIN] == 0.0 else 0.0
    fm = 0.5 * dc * (vm - (P[P_VS] + env[E_VSD])) ** 2
    fa = 0.5 * P[P_DCA] * (va - P[P_VSA]) ** 2
    f = fm + fa - P[P_TARE] - env[E_M] * (P[P_G] + env[E_AG]) - P[P_IMB] * P[P_M] * env[E_AG]
    fh = 0.0
    for i in range(hyk.shape[0]):
        fh -= hyk[i] * (z - slip[i])
    env[E_FH] = fh
    f += fh
    if env[E_EXTN] > 0.0:
        f += env[E_EXT]
    if env[E_FN] != 0.0:
        f += env[E_FN]
    if z > P[P_STOP]:
        f -= P[P_KSTOP] * (z - P[P_STOP]) + P[P_CSTOP] * x[V]
    elif z < -P[P_STOP]:
        f -= P[P_KSTOP] * (z + P[P_STOP]) + P[P_CSTOP] * x[V]
    return f, fm, fa, vout, dc


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def published_tick(env, P, flk, fla, fls, nz, iz, nx):
    """One noise tick of the published mechanisms (seed 000 in vacuum; hil_sim/efb.toml says
    why each is there and its size), from the normals ``nz[iz:iz + nx]`` (none if ``nx`` is 0):

    * floor tilt ``E_TILT`` (rad): first-order Gauss-Markov, per tick ``a th + s n``; it tips
      the link's travel, misaligned from vertical by ``tilt.travel_angle_rad``, and its weight
      has a component ``-m g phi th`` along the travel (``P_TILTK = m g phi``);
    * residual-gas Brownian force: white, one-sided PSD ``4 k_B T beta`` with the
      free-molecular damping ``beta`` proportional to the pressure ``E_P`` (``P_GASS`` the
      per-tick std at 1 Pa, times ``sqrt(p)``);
    * surface-potential drift ``E_VSD`` (V): a random walk added to the main electrodes' V_s;
    * interferometer flicker: the sum of first-order poles ``flk`` (m), ``flk = fla flk + fls n``
      (the poles' variances equal, two per decade: one-sided PSD ``A^2 / f`` between them);
    * thermal: the link's temperature ``E_TL`` lags the balance thermometer's (``P_TLA``), its
      change from the start moves the restoring force (``P_TFK`` N/K) and the interferometer's
      dead path (``P_TZK`` m/K).

    Writes the force on the link ``E_FN`` (N) and the interferometer's reading error ``E_ZIFO``
    (m), both held over the tick."""
    fn = 0.0
    zifo = 0.0
    if nx > 0:
        env[E_TILT] = P[P_TILTA] * env[E_TILT] + P[P_TILTS] * nz[iz]
        fn = -P[P_TILTK] * env[E_TILT] + P[P_GASS] * math.sqrt(env[E_P]) * nz[iz + 1]
        env[E_VSD] += P[P_VSW] * nz[iz + 2]
        for k in range(nx - NX_FIXED):
            flk[k] = fla[k] * flk[k] + fls[k] * nz[iz + NX_FIXED + k]
            zifo += flk[k]
    if P[P_THON] != 0.0:
        env[E_TL] = env[E_TEMP] + (env[E_TL] - env[E_TEMP]) * P[P_TLA]
        dt = env[E_TL] - P[P_TL0]
        fn += P[P_TFK] * dt
        zifo += P[P_TZK] * dt
    env[E_FN] = fn
    env[E_ZIFO] = zifo


@njit(cache=True, fastmath=True, error_model="numpy")
def _run(x, slip, env, act, P, hyk, hyth, W, gphi, gL, gc, flk, fla, fls, nz, nzu, n_frames, n_sub,
         out, tr, rec):
    """Advance n_frames frames of n_sub steps with ``act`` held. ``nz``: standard normals of
    the plant's Generator (see :class:`~kibble.hil_sim.nist4.NormalDraws`); per frame the
    kernel takes 5 per noise tick (ground 3, HV 1, temperature 1), then ``P[P_NX]`` more if a
    published mechanism is on (tilt, residual gas, surface potential, one per interferometer
    flicker pole: :func:`published_tick`), then 5 at the frame end (ifo, dvm, bridge,
    thermometer, gauge), and writes how many it took to ``nzu[0]`` (-1: ``nz`` was too short).
    ``flk``: the flicker poles' states, ``fla``/``fls`` their per-tick decay and innovation std.
    Returns frames done (< n_frames: non-finite, the state then put back as it was at the call)."""
    iz = 0
    nx = int(P[P_NX])
    flk0 = flk.copy()
    nzn = nz.shape[0]
    x0 = x.copy()
    slip0 = slip.copy()
    env0 = env.copy()
    h = P[P_H]
    gs = np.zeros(2)
    tick_n = int(P[P_TICKN])
    nt = np.zeros(5)
    nf = np.zeros(5)
    ea = math.exp(-h / P[P_TAUHV])
    ta = P[P_TA]
    tsq = P[P_TSTD] * math.sqrt(max(0.0, 1.0 - ta * ta))
    nh = hyk.shape[0]
    for fr in range(n_frames):
        dvm_acc = 0.0
        for _ in range(n_sub):
            if env[E_TICK] <= 0.0:
                if iz + 5 + nx > nzn:
                    nzu[0] = -1
                    x[:] = x0
                    slip[:] = slip0
                    env[:] = env0
                    flk[:] = flk0
                    return fr
                for j in range(5):
                    nt[j] = nz[iz + j]
                iz += 5
                gs[0] = env[E_GS0]
                gs[1] = env[E_GS1]
                env[E_AG] = ground_tick(gs, gphi, gL, gc, P[P_FLOOR], nt[0], nt[1], nt[2])
                env[E_GS0] = gs[0]
                env[E_GS1] = gs[1]
                env[E_NHV] = P[P_NHV] * nt[3]
                tset = env[E_TSET] + P[P_TDRIFT] * env[E_T]
                env[E_TEMP] = tset + (env[E_TEMP] - tset) * ta + tsq * nt[4]
                if nx > 0 or P[P_THON] != 0.0:
                    published_tick(env, P, flk, fla, fls, nz, iz, nx)
                    iz += nx
                env[E_TICK] = tick_n
            env[E_TICK] -= 1.0
            dm = env[E_MT] - env[E_M]
            if dm != 0.0:
                rate = env[E_RATE] * h
                if abs(dm) <= rate:
                    env[E_M] = env[E_MT]
                elif dm > 0:
                    env[E_M] += rate
                else:
                    env[E_M] -= rate
            f, fm, fa, vout, dc = _forces(x, slip, env, act, P, hyk)
            z = x[Z]
            v = x[V]
            x[Z] = W[0] * z + W[1] * v + W[4] * f
            x[V] = W[2] * z + W[3] * v + W[5] * f
            x[VA] = act[A_V] + (x[VA] - act[A_V]) * ea
            zn = x[Z]
            for i in range(nh):
                e = zn - slip[i]
                if e > hyth[i]:
                    slip[i] = zn - hyth[i]
                elif e < -hyth[i]:
                    slip[i] = zn + hyth[i]
            dvm_acc += vout
            if env[E_EXTN] > 0.0:
                env[E_EXTN] -= 1.0
            env[E_T] += h
        ok = np.isfinite(x[0]) and np.isfinite(x[1]) and np.isfinite(x[2])
        if not ok or iz + 5 > nzn:
            nzu[0] = -1 if ok else iz  # (ok: the normals ran out)
            x[:] = x0
            slip[:] = slip0
            env[:] = env0
            flk[:] = flk0
            return fr
        for j in range(5):
            nf[j] = nz[iz + j]
        iz += 5
        zi = x[Z]
        if env[E_ZIFO] != 0.0:
            zi += env[E_ZIFO]
        ph = 4.0 * math.pi * zi / P[P_LAM] + P[P_PHSTD] * nf[0]
        if P[P_IFOQ] != 0.0:
            ph = np.floor(ph / P[P_IFOQ] + 0.5) * P[P_IFOQ]
        nfr = math.floor(ph / (2.0 * math.pi))
        out[fr, S_FR] = nfr
        out[fr, S_PH] = ph - 2.0 * math.pi * nfr
        dvm = dvm_acc / n_sub + P[P_DVMSTD] * nf[1]
        if env[E_T] >= env[E_BNEXT] - 0.5 * h:
            _, _, ci = _dcdz(x[Z], env[E_TEMP], P)
            br = (P[P_C0] + ci) * 1e12 + P[P_BRSTD] * nf[2]
            if P[P_ADCQ] != 0.0:
                br = np.floor(br / P[P_BRRES] + 0.5) * P[P_BRRES]
            env[E_BRIDGE] = br
            env[E_BNEXT] += P[P_BRP]
        out[fr, S_BR] = env[E_BRIDGE]
        temp = env[E_TEMP] + P[P_TSSTD] * nf[3]
        if P[P_ADCQ] != 0.0:
            d = dvm
            if d > P[P_DVMRNG]:
                d = P[P_DVMRNG]
            elif d < -P[P_DVMRNG]:
                d = -P[P_DVMRNG]
            dvm = np.floor(d / P[P_DVMRES] + 0.5) * P[P_DVMRES]
            temp = np.floor(temp / P[P_TSRES] + 0.5) * P[P_TSRES]
        out[fr, S_DVM] = dvm
        out[fr, S_TEMP] = temp
        out[fr, S_PRES] = env[E_P] * (1.0 + P[P_PRSTD] * nf[4])
        out[fr, S_TIME] = env[E_T]
        if rec:
            f, fm, fa, vout, dc = _forces(x, slip, env, act, P, hyk)
            _, _, ci = _dcdz(x[Z], env[E_TEMP], P)
            tr[fr, 0] = env[E_T]
            tr[fr, 1] = x[Z]
            tr[fr, 2] = x[V]
            tr[fr, 3] = x[VA]
            tr[fr, 4] = vout
            tr[fr, 5] = fm
            tr[fr, 6] = fa
            tr[fr, 7] = dc
            tr[fr, 8] = P[P_C0] + ci
            tr[fr, 9] = env[E_TEMP]
            tr[fr, 10] = env[E_AG]
            tr[fr, 11] = env[E_M]
            tr[fr, 12] = env[E_FH]
    nzu[0] = iz
    return n_frames


@njit(cache=True, fastmath=True, error_model="numpy")
def _deriv(x, slip, env, act, P, hyk, dx):
    f, fm, fa, vout, dc = _forces(x, slip, env, act, P, hyk)
    dx[Z] = x[V]
    dx[V] = (f - P[P_K] * x[Z] - P[P_C] * x[V]) / P[P_M]
    dx[VA] = (act[A_V] - x[VA]) / P[P_TAUHV]
    return fm, fa, vout, dc


@dataclass
class EfbActuators:
    """EFB command frame (held over the frame).

    hv_code      int   24-bit signed DAC code into the +-1000 V amplifier:
                       V = code * hv.full_scale_V / 2^23 (the amplifier follows with hv.tau_s)
    hv_to_main   bool  relay: True = amplifier on the main electrodes (weighing mode),
                       False = on the auxiliary electrode (gradient mode; main cylinders on the bridge)
    hv_enable    bool  amplifier output enabled (False: output 0 V)
    """
    hv_code: int = 0
    hv_to_main: bool = True
    hv_enable: bool = False


@dataclass
class EfbSensors:
    """EFB raw sensor frame.

    ifo_fringes    int    interferometer fringe count (lambda/2 per fringe, counts up as z rises)
    ifo_phase_rad  float  phase within the fringe [0, 2 pi)
    dvm_V          V      frame-averaged DVM reading of the applied high voltage
    bridge_pF      pF     capacitance bridge reading of the main capacitor, updated every
                          bridge.period_s (held in between; 0 before the first reading)
    temperature_C  degC   balance thermometer
    pressure_Pa    Pa     vacuum gauge
    time_s         s      simulated time at the frame end
    """
    ifo_fringes: int
    ifo_phase_rad: float
    dvm_V: float
    bridge_pF: float
    temperature_C: float
    pressure_Pa: float
    time_s: float

    @classmethod
    def from_row(cls, row: np.ndarray) -> "EfbSensors":
        return cls(int(row[S_FR]), float(row[S_PH]), float(row[S_DVM]), float(row[S_BR]),
                   float(row[S_TEMP]), float(row[S_PRES]), float(row[S_TIME]))


@dataclass
class EfbTruth:
    """True EFB state: z (m), vz (m/s), amplifier state v_amp and output v_out (V), forces (N),
    dC/dz (F/m), capacitance (F), temperature (degC), ground acceleration (m/s^2), load (kg)."""
    t: float
    z: float
    vz: float
    v_amp: float
    v_out: float
    f_main: float
    f_aux: float
    dcdz: float
    capacitance: float
    temperature: float
    agz: float
    m_load: float
    f_hyst: float


@dataclass
class EfbBlock:
    """Block result: ``sensors`` (n, 7) in :data:`SENSOR_FIELDS` order, ``truth`` (n, 13) in
    :data:`TRUTH_FIELDS` order or None."""
    sensors: np.ndarray
    truth: np.ndarray | None

    def col(self, name: str) -> np.ndarray:
        if self.truth is None:
            raise ValueError(f"no truth column {name!r}: the block was run with record_truth=False")
        return self.truth[:, TRUTH_FIELDS.index(name)]


class EfbPlant:
    """In-process EFB plant. ``EfbPlant(params=None, seed=0, overrides=None, noise="published")``."""

    model = "efb"

    def __init__(self, params: Params | Mapping[str, Any] | None = None, seed: int = 0,
                 overrides: Mapping[str, Any] | None = None, noise: str = DEFAULT_NOISE):
        if params is None or isinstance(params, Mapping):
            params = load_params("efb", dict(params or {}) | dict(overrides or {}), noise=noise)
        elif overrides:
            params = params.with_overrides(overrides)
        self.params = p = params
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        fs = p["sim.rate_hz"]
        self.dt = 1.0 / fs
        n_sub = fs / p["sim.frame_rate_hz"]
        if abs(n_sub - round(n_sub)) > 1e-9:
            raise ValueError("sim.frame_rate_hz must divide sim.rate_hz")
        self.n_sub = int(round(n_sub))
        self.tick_n = math.gcd(self.n_sub, max(1, int(round(fs / p["sim.noise_rate_hz"]))))
        self.ticks_per_frame = self.n_sub // self.tick_n
        tick_s = self.tick_n * self.dt
        f_frame = p["sim.frame_rate_hz"]
        sw = lambda n: 1.0 if p[f"noise.{n}"] else 0.0  # noqa: E731
        P = np.zeros(NP)
        P[P_H] = self.dt
        P[P_M] = p["linkage.mass_kg"]
        P[P_K] = p["linkage.stiffness_N_per_m"]
        diss = 1.0 if p["mechanics.dissipation"] else 0.0
        # the flexures' losses and anelasticity, stated at the nominal (positive) stiffness; the
        # buckling spring that tunes linkage.stiffness_N_per_m through zero changes neither
        k_nominal = p["linkage.nominal_stiffness_N_per_m"]
        P[P_C] = diss * math.sqrt(k_nominal * P[P_M]) / p["linkage.q"]
        P[P_G] = p["sim.g_m_per_s2"]
        P[P_IMB] = p["linkage.imbalance_fraction"]
        P[P_TARE] = p["linkage.tare_force_N"]
        P[P_STOP] = p["linkage.stop_m"]
        P[P_KSTOP] = p["linkage.stop_stiffness_N_per_m"]
        P[P_CSTOP] = 2 * math.sqrt(P[P_KSTOP] * P[P_M])
        P[P_DC] = p["capacitor.dcdz_F_per_m"]
        P[P_ZS] = p["capacitor.profile_scale_m"]
        P[P_A1:P_A5 + 1] = p["capacitor.profile_coeffs"]
        P[P_C0] = p["capacitor.c0_pF"] * 1e-12
        P[P_TC] = p["capacitor.temp_coeff_F_per_m_K"]
        P[P_TREF] = p["capacitor.temp_ref_C"]
        P[P_VS] = p["capacitor.surface_potential_V"]
        P[P_DCA] = p["capacitor.aux_dcdz_F_per_m"]
        P[P_VSA] = p["capacitor.aux_surface_potential_V"]
        P[P_TAUHV] = p["hv.tau_s"]
        P[P_TICKN] = self.tick_n
        gphi, gL, gc, floor_std = ground_filter(p["ground.peak_hz"], p["ground.peak_q"],
                                                p["ground.peak_asd"], p["ground.floor_asd"], tick_s)
        self._gphi, self._gL, self._gc = gphi, gL * sw("ground"), gc
        P[P_FLOOR] = floor_std * sw("ground")
        P[P_NHV] = sw("hv") * white_std(p["hv.noise_asd_V"], 1.0 / tick_s)
        P[P_TA] = math.exp(-tick_s / p["temperature.tau_s"])
        P[P_TSTD] = sw("temperature") * p["temperature.fluct_std_K"]
        P[P_TDRIFT] = sw("temperature") * p["temperature.drift_K_per_h"] / 3600.0
        P[P_LAM] = p["interferometer.wavelength_m"]
        P[P_PHSTD] = sw("interferometer") * 4 * math.pi / P[P_LAM] * white_std(p["interferometer.noise_asd_m"], f_frame)
        P[P_DVMSTD] = sw("dvm") * white_std(p["dvm.noise_asd_V"], f_frame)
        P[P_DVMRES] = p["dvm.resolution_V"]
        P[P_DVMRNG] = p["dvm.range_V"]
        P[P_BRP] = p["bridge.period_s"]
        P[P_BRSTD] = sw("bridge") * p["bridge.noise_pF"]
        P[P_BRRES] = p["bridge.resolution_pF"]
        P[P_TSSTD] = sw("temperature") * p["temperature.sensor_noise_K"]
        P[P_TSRES] = p["temperature.sensor_resolution_K"]
        P[P_PRSTD] = p["pressure.gauge_rel_noise"]
        P[P_ADCQ] = sw("adc_quantization")
        self._published_mechanisms(P, tick_s, f_frame, sw)
        self.P = P
        yl = np.asarray(p["hysteresis.yield_m"], dtype=float)
        self.hyth = yl.copy()
        self.hyk = (np.full(len(yl), p["hysteresis.stiffness_fraction"] * k_nominal / len(yl))
                    if p["hysteresis.enabled"] else np.zeros(len(yl)))
        self.slip = np.zeros(len(yl))
        A = np.array([[0.0, 1.0, 0.0], [-P[P_K] / P[P_M], -P[P_C] / P[P_M], 1.0 / P[P_M]], [0, 0, 0]])
        E = expm(A * self.dt)
        self.W = np.array([E[0, 0], E[0, 1], E[1, 0], E[1, 1], E[0, 2], E[1, 2]])
        self.x = np.zeros(NX)
        self.env = np.zeros(NE)
        self.env[E_TEMP] = self.env[E_TSET] = self.env[E_TL] = p["temperature.initial_C"]
        self._stationary_start()
        self.env[E_P] = p["pressure.initial_Pa"]
        self.env[E_RATE] = 1e-6
        self.act = np.zeros(NA)
        self.act[A_MAIN] = 1.0
        self.last_actuators = EfbActuators()
        self._bits = p["hv.dac_bits"]
        self._V_per_code = p["hv.full_scale_V"] / 2 ** (self._bits - 1)
        self._quantize_dac = p["noise.dac_quantization"]
        self._out1 = np.zeros((1, NS))
        self._tr1 = np.zeros((1, NT))
        self._normals = NormalDraws()

    def _published_mechanisms(self, P: np.ndarray, tick_s: float, f_frame: float, sw) -> None:
        """The published profile's mechanisms (:func:`published_tick`) into ``P`` and the
        flicker poles' arrays; every one off (``P[P_NX] = 0``, no normals taken) unless its
        ``noise.*`` switch is on."""
        p = self.params
        flicker = p["noise.ifo_flicker"]
        f_lo, f_hi = p["interferometer.flicker_band_hz"]
        if not 0.0 < f_lo < f_hi:
            raise ValueError("interferometer.flicker_band_hz must be [f_lo, f_hi] with 0 < f_lo < f_hi")
        poles = flicker_poles(f_lo, f_hi) if flicker else np.zeros(0)
        var = p["interferometer.flicker_asd_m"] ** 2 * FLICKER_LN_RATIO
        self.fla = np.exp(-2.0 * math.pi * poles * tick_s)
        self.fls = np.sqrt(var * (1.0 - self.fla ** 2))
        self._flicker_std = math.sqrt(var)
        self.flk = np.zeros(len(poles))
        drawn = any(p[f"noise.{n}"] for n in ("tilt", "residual_gas", "surface_potential_drift", "ifo_flicker"))
        P[P_NX] = NX_FIXED + len(poles) if drawn else 0
        P[P_TILTA] = math.exp(-tick_s / p["tilt.tau_s"])
        P[P_TILTS] = sw("tilt") * p["tilt.std_rad"] * math.sqrt(1.0 - P[P_TILTA] ** 2)
        P[P_TILTK] = p["linkage.mass_kg"] * p["sim.g_m_per_s2"] * p["tilt.travel_angle_rad"]
        kt = BOLTZMANN_J_K * (p["temperature.initial_C"] + 273.15)
        m0 = p["gas.molar_mass_kg_per_mol"] / AVOGADRO_PER_MOL
        beta_per_pa = p["gas.area_m2"] * math.sqrt(32.0 * m0 / (math.pi * kt))
        P[P_GASS] = sw("residual_gas") * white_std(math.sqrt(4.0 * kt * beta_per_pa), 1.0 / tick_s)
        P[P_VSW] = sw("surface_potential_drift") * p["capacitor.surface_potential_walk_V_sqrt_s"] * math.sqrt(tick_s)
        P[P_THON] = sw("thermal_drift")
        P[P_TLA] = math.exp(-tick_s / p["thermal.link_tau_s"])
        P[P_TL0] = p["temperature.initial_C"]
        P[P_TFK] = p["thermal.force_coeff_N_per_K"]
        P[P_TZK] = p["thermal.ifo_path_m_per_K"]
        P[P_IFOQ] = sw("ifo_quantization") * 4.0 * math.pi * p["interferometer.resolution_m"] / P[P_LAM]

    def _stationary_start(self) -> None:
        """The tilt and the flicker poles start in their stationary distributions, drawn from
        a generator of their own (the plant's stream is the quiet profile's until a tick)."""
        if self.P[P_NX] == 0:
            return
        init = np.random.default_rng([self.seed, 13])
        self.env[E_TILT] = self.params["tilt.std_rad"] * (self.P[P_TILTS] != 0.0) * init.standard_normal()
        self.flk[:] = self._flicker_std * (self.fls != 0.0) * init.standard_normal(len(self.flk))

    # -------------------------------------------------------------- commands
    def decode(self, a: EfbActuators) -> np.ndarray:
        v = a.hv_code if type(a) is EfbActuators else None
        if (type(v) is int and -(2 ** (self._bits - 1)) <= v <= 2 ** (self._bits - 1) - 1
                and type(a.hv_to_main) is bool and type(a.hv_enable) is bool):
            # an int code and bools (what the bus adapter holds): the checks below pass
            return np.array([float(v) * self._V_per_code, 1.0 if a.hv_to_main else 0.0,
                             1.0 if a.hv_enable else 0.0])
        if not isinstance(a, EfbActuators):
            raise ActuatorError("frame", a, "expected an EfbActuators")
        v = a.hv_code
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ActuatorError("hv_code", v, "DAC code must be a number")
        f = float(v)
        if not math.isfinite(f):
            raise ActuatorError("hv_code", v, "non-finite DAC code")
        if self._quantize_dac and f != math.floor(f):
            raise ActuatorError("hv_code", v, "DAC code must be an integer")
        lo, hi = -(2 ** (self._bits - 1)), 2 ** (self._bits - 1) - 1
        if f < lo or f > hi:
            raise ActuatorError("hv_code", v, f"outside the {self._bits}-bit range [{lo}, {hi}]")
        act = np.zeros(NA)
        act[A_V] = f * self._V_per_code
        for name, idx in (("hv_to_main", A_MAIN), ("hv_enable", A_EN)):
            b = getattr(a, name)
            if not isinstance(b, (bool, np.bool_)):
                raise ActuatorError(name, b, "relay state must be a bool")
            act[idx] = 1.0 if b else 0.0
        return act

    def volts_to_code(self, volts: float) -> int:
        return int(max(-(2 ** (self._bits - 1)), min(2 ** (self._bits - 1) - 1, round(volts / self._V_per_code))))

    def _advance(self, act, n_frames, out, tr, rec):
        def kernel(nz, used, n, out_n, tr_n):
            return _run(self.x, self.slip, self.env, act, self.P, self.hyk, self.hyth, self.W,
                        self._gphi, self._gL, self._gc, self.flk, self.fla, self.fls, nz, used, n,
                        self.n_sub, out_n, tr_n, rec)

        advance_in_chunks(self, n_frames, out, tr, rec, state=("x", "slip", "env", "flk"),
                          per_tick=5 + int(self.P[P_NX]),
                          per_frame=5, tick_n=int(self.P[P_TICKN]),
                          env_tick=lambda: float(self.env[E_TICK]), kernel=kernel)

    def step_frame(self, actuators: EfbActuators) -> EfbSensors:
        act = self.decode(actuators)
        self.act = act
        self.last_actuators = actuators
        self._advance(act, 1, self._out1, self._tr1, False)
        return EfbSensors.from_row(self._out1[0])

    def run(self, actuators: EfbActuators, n_frames: int, record_truth: bool = True) -> EfbBlock:
        act = self.decode(actuators)
        self.act = act
        self.last_actuators = actuators
        out = np.zeros((n_frames, NS))
        tr = np.zeros((n_frames, NT)) if record_truth else self._tr1  # (not written unrecorded)
        self._advance(act, n_frames, out, tr, record_truth)
        return EfbBlock(out, tr if record_truth else None)

    def run_seconds(self, actuators: EfbActuators, seconds: float, record_truth: bool = True) -> EfbBlock:
        return self.run(actuators, int(round(seconds * self.params["sim.frame_rate_hz"])), record_truth)

    # -------------------------------------------------------------- events
    def place_mass(self, mass: str | float = "small") -> None:
        """Load an artifact: "small" (1 mg), "large" (20 mg) or a mass in kg; ramped over
        masses.lift_ramp_s."""
        m = mass
        if isinstance(mass, str):
            m = {"small": self.params["masses.small_kg"], "large": self.params["masses.large_kg"]}.get(mass, mass)
        if isinstance(m, str) or not math.isfinite(float(m)) or float(m) < 0:
            raise ValueError(f"bad mass {mass!r}")
        self.env[E_MT] = float(m)
        self.env[E_RATE] = max(abs(self.env[E_MT] - self.env[E_M]), 1e-12) / self.params["masses.lift_ramp_s"]

    def remove_mass(self) -> None:
        self.place_mass(0.0)

    def set_temperature(self, temp_C: float, immediate: bool = True) -> None:
        if not math.isfinite(temp_C):
            raise ValueError("temperature must be finite")
        self.env[E_TSET] = temp_C - self.P[P_TDRIFT] * self.env[E_T]
        if immediate:
            self.env[E_TEMP] = temp_C

    def set_pressure(self, pressure_Pa: float) -> None:
        if not (math.isfinite(pressure_Pa) and pressure_Pa >= 0):
            raise ValueError("pressure must be finite and >= 0")
        self.env[E_P] = pressure_Pa

    def inject_force(self, value: float, duration_s: float) -> None:
        """External vertical force (N) on the floating link for ``duration_s``."""
        if not (math.isfinite(value) and math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError("bad disturbance")
        self.env[E_EXT] = value
        self.env[E_EXTN] = max(1, int(round(duration_s / self.dt)))

    def inject_impulse(self, impulse_Ns: float) -> None:
        self.inject_force(impulse_Ns / self.dt, self.dt)

    # -------------------------------------------------------------- state
    def set_state(self, z: float | None = None, vz: float | None = None, v_amp: float | None = None) -> None:
        for v, i in ((z, Z), (vz, V), (v_amp, VA)):
            if v is not None:
                self.x[i] = v

    def truth(self) -> EfbTruth:
        env = self.env.copy()
        f, fm, fa, vout, dc = _forces(self.x, self.slip, env, self.act, self.P, self.hyk)
        _, _, ci = _dcdz(self.x[Z], env[E_TEMP], self.P)
        return EfbTruth(env[E_T], self.x[Z], self.x[V], self.x[VA], vout, fm, fa, dc,
                        self.P[P_C0] + ci, env[E_TEMP], env[E_AG], env[E_M], env[E_FH])

    def kappa(self, z: float = 0.0, temp_C: float | None = None) -> float:
        """kappa = dC/dz / 2 (F/m) at z and temperature."""
        t = self.env[E_TEMP] if temp_C is None else temp_C
        return 0.5 * _dcdz(z, t, self.P)[0]

    def derivative(self, act: np.ndarray | None = None) -> np.ndarray:
        dx = np.zeros(NX)
        _deriv(self.x, self.slip, self.env.copy(), self.act if act is None else act, self.P, self.hyk, dx)
        return dx

    def energy(self) -> float:
        """Mechanical energy + co-energy of the constant applied voltages (conserved without
        dissipation, noise, events, hysteresis and stops)."""
        P, x, env = self.P, self.x, self.env
        z = x[Z]
        vout = x[VA] if self.act[A_EN] else 0.0
        vm = vout if self.act[A_MAIN] else 0.0
        va = 0.0 if self.act[A_MAIN] else vout
        _, _, ci = _dcdz(z, env[E_TEMP], P)
        e = 0.5 * P[P_M] * x[V] ** 2 + 0.5 * P[P_K] * z ** 2
        e += np.sum(0.5 * self.hyk * (z - self.slip) ** 2)
        e += (P[P_TARE] + env[E_M] * (P[P_G] + env[E_AG]) + P[P_IMB] * P[P_M] * env[E_AG]) * z
        e -= 0.5 * (vm - P[P_VS]) ** 2 * ci + 0.5 * P[P_DCA] * (va - P[P_VSA]) ** 2 * z
        return float(e)

    def linearize(self, actuators: EfbActuators | None = None):
        return linearize(self, actuators)


STATE_NAMES = ["z", "vz", "v_amp"]
INPUT_NAMES = ["v_cmd", "agz", "f_ext"]
OUTPUT_NAMES = ["z", "v_out", "f_main"]


def linearize(plant: EfbPlant, actuators: EfbActuators | None = None):
    """Small-signal continuous model about the current state and command as a python-control
    ``StateSpace``: states (z m, vz m/s, v_amp V), inputs (v_cmd V, agz m/s^2, f_ext N),
    outputs (z m, v_out V, f_main N). Hysteresis elements stuck, noise excluded."""
    import control

    act0 = plant.act.copy() if actuators is None else plant.decode(actuators)
    env0 = plant.env.copy()
    env0[E_AG] = 0.0
    env0[E_NHV] = 0.0
    env0[E_EXTN] = 1.0
    env0[E_EXT] = 0.0
    x0 = plant.x.copy()

    def f(x, u):
        act = act0.copy()
        act[A_V] += u[0]
        env = env0.copy()
        env[E_AG] = u[1]
        env[E_EXT] = u[2]
        dx = np.zeros(NX)
        fm, fa, vout, dc = _deriv(x, plant.slip, env, act, plant.P, plant.hyk, dx)
        return dx, np.array([x[Z], vout, fm])

    xs = np.array([1e-9, 1e-9, 1e-3])
    us = np.array([1e-3, 1e-6, 1e-9])
    A = np.zeros((3, 3))
    C = np.zeros((3, 3))
    B = np.zeros((3, 3))
    D = np.zeros((3, 3))
    for j in range(3):
        d = np.zeros(3)
        d[j] = xs[j]
        (fp, yp), (fm_, ym) = f(x0 + d, np.zeros(3)), f(x0 - d, np.zeros(3))
        A[:, j] = (fp - fm_) / (2 * xs[j])
        C[:, j] = (yp - ym) / (2 * xs[j])
        d = np.zeros(3)
        d[j] = us[j]
        (fp, yp), (fm_, ym) = f(x0, d), f(x0, -d)
        B[:, j] = (fp - fm_) / (2 * us[j])
        D[:, j] = (yp - ym) / (2 * us[j])
    return control.ss(A, B, C, D, states=STATE_NAMES, inputs=INPUT_NAMES, outputs=OUTPUT_NAMES, name="efb")
