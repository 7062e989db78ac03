"""NIST-4 Kibble balance plant: wheel on a knife edge, main coil in a 0.55 T radial field,
counter-mass motor, five more coil degrees of freedom, damping coils, electrostatic theta-z plates.

Parameters: ``hil_sim/nist4.toml`` (every value with its source). Physics summary
(coordinates: z up, wheel plane = x-z plane, main coil on the +theta side):

* **Wheel** (angle ``theta``, rad; coil height ``z = r theta``, counter-mass height ``-r theta``).
  ``J(m) theta'' = -k theta - c theta' + tau``, with ``J = J_wheel + (m_main + m_counter) r^2``
  (the loads hang from bands on a wheel, so the lever arm is ``r`` at every angle) and
  ``tau = r (F_coil + sum F_damp,v + F_ext - m_main g_eff) - r (F_motor - m_counter g_eff)
  + tau_hyst + f_grav k a_gx / g + tau_stop``, ``g_eff = g + a_gz``. The knife-edge stiffness
  ``k`` may be negative (the wheel's centre of mass moved above the edge: unstable without the
  loop, growth rate ``sqrt(-k/J)``); its gravitational part ``f_grav k = M g d`` (``d`` the
  centre of mass's distance below the edge, negative above it) is also the lever of the
  horizontal ground acceleration, so that coupling follows the sign of ``k``. The damping
  ``c = sqrt(k_nom J) / q`` and the Iwan elements' stiffnesses (below) are stated at the
  nominal stiffness ``k_nom > 0``: they belong to the edge's contact, not to where the centre
  of mass is.
* **Knife-edge anelasticity**: an Iwan model, i.e. N parallel Prandtl (Maxwell-slip) elements,
  element i a spring ``k_i`` in series with a slider that slips when ``|theta - s_i| > y_i``
  (play operator). Small motions see the extra stiffness ``sum k_i``; an excursion past ``y_i``
  leaves a residual torque ``-k_i (theta - s_i)`` at the null (hysteresis that grows with the
  excursion); a damped sinusoid (erase) whose amplitude decays through all ``y_i`` leaves each
  element with a residual of at most the amplitude decrement per cycle near its yield, so the
  net torque shrinks (like AC demagnetization).
* **Main coil**: flux ``Phi(z, q) = Phi_z(z) + Bl(z) (c . q)``, ``q = (x, y, theta_x, theta_y,
  theta_z)``, ``c`` = Table II ratios (Fx/Fz, Fy/Fz, tau_x/Fz, tau_y/Fz, tau_z/Fz);
  ``Bl(z, I, T) = Bl0 p(z) (1 + alpha I + beta I^2) (1 + tc (T - T_ref))`` (eq. 16, I in mA),
  ``p(z) = 1 + sum a_n (z/z_s)^n``. Force ``F_z = I dPhi/dz``, generalized forces
  ``Q_q = I Bl c`` (eqs. 10, 11); induced voltage ``U = dPhi/dt = (Bl + Bl' c.q) v_z + Bl c.q'``
  (eq. 9). Reciprocity makes the coupling energy-conserving.
* **Current sources** (main coil, counter-mass motor): regulated current follows the DAC command
  with a first-order lag ``tau_s`` (exact exponential step), rate limited by the compliance
  voltage ``|R I + L dI/dt + U| <= V_c``; flowing current = regulated x (1 + drift t) + white
  noise. With ``main_force_mode = False`` (velocity mode) the switchbox opens the coil: I = 0,
  the DVM reads ``U``.
* **Five DOF**: ``M q'' + C q' + K q = Q``; ``K`` with weak symmetric cross terms, ``C``
  diagonal from the Q factors; ``Q`` = Table II parasitics + damping coils + theta-z plates
  + external - ``M (a_gx, a_gy, 0, 0, 0)``.
* **Damping coils**: set k at angle ``D_k``, radius ``R_d``: vertical coil force ``F_v = k_v i``
  (adds z force and torques ``(y_k F_v, -x_k F_v)``), horizontal coil tangential force
  ``F_h = k_h i`` (adds ``(-sin D_k, cos D_k) F_h`` and ``tau_z = R_d F_h``).
* **theta-z plates**: plate k between electrodes a and b (gap ``d``, area ``A``), tangential
  plate displacement ``s = R_p theta_z - x sin P_k + y cos P_k``,
  ``F = eps0 A / 2 [V_a^2 / (d - s)^2 - V_b^2 / (d + s)^2]`` (conservative, with the bias
  negative stiffness). Output zero unless ``hv_enable`` and pressure < the limit.

Integration: exact (matrix-exponential, zero-order-hold) discretization of the linear
mechanics (wheel 2x2, five DOF 10x10) and of the current lags at ``sim.rate_hz``; the
nonlinear forces (coil force with Bl(z, I, T), hysteresis, plates, stops) are evaluated once
per step at the step start and held over it. Noise processes are drawn from a seeded numpy
Generator per call, held per noise tick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from numba import njit
from scipy.linalg import expm

from .errors import ActuatorError, PlantError
from .noise import flicker_poles, ground_filter, ground_tick, white_std
from .params import DEFAULT_NOISE, Params, load_params

__all__ = ["Nist4Actuators", "Nist4Sensors", "Nist4Truth", "Nist4Block", "Nist4Plant",
           "SENSOR_FIELDS", "TRUTH_FIELDS", "DOF_NAMES", "linearize"]

EPS0 = 8.8541878128e-12
DOF_NAMES = ("x", "y", "theta_x", "theta_y", "theta_z")

# ---- state vector -------------------------------------------------------------------------
TH, OM, IM, IC, Q0, QD0 = 0, 1, 2, 3, 4, 9
NX = 14
# ---- environment / event vector -----------------------------------------------------------
E_T, E_MT, E_MTT, E_MA, E_MAT, E_TEMP, E_TSET, E_P = 0, 1, 2, 3, 4, 5, 6, 7
E_DRM, E_DRC = 8, 9            # current gain drift rates (1/s), signed
E_AG = 10                      # 10..12 ground acceleration x, y, z (m/s^2), held per tick
E_GS = 13                      # 13..18 ground filter states (3 axes x 2)
E_INM, E_INC = 19, 20          # held current-noise samples (A)
E_EXT = 21                     # 21..26 external z force (N at coil), Qx, Qy, tx, ty, tz
E_EXTN = 27                    # remaining steps of the external force
E_TICK = 28                    # steps since the last noise tick
E_JW = 29                      # inertia the wheel matrices were built for
E_TAUH = 30                    # last hysteresis torque (truth)
E_EMF = 31                     # last induced voltage (truth)
E_VCOIL = 32                   # last main coil terminal voltage (truth)
E_RMT, E_RMA = 34, 35          # load rate of the running test / auxiliary mass-lift event (kg/s)
NE = 36
# ---- physical actuator vector -------------------------------------------------------------
A_IM, A_IC, A_ID, A_HV, A_FM, A_CME, A_DE, A_HVE = 0, 1, 2, 8, 14, 15, 16, 17
A_FVS, A_QD = 18, 19           # derived: sum of vertical damping forces (N), damping Q (5)
NA = 24
# ---- parameter vector ---------------------------------------------------------------------
(P_H, P_R, P_G, P_K, P_C, P_JW, P_FG, P_STOP, P_KSTOP, P_CSTOP, P_MTARE, P_MCS, P_RATE,
 P_BL0, P_ZS, P_A1, P_A2, P_A3, P_A4, P_A5, P_A6, P_ALPHA, P_BETA, P_TC, P_TREF,
 P_RCOIL, P_LCOIL, P_CX, P_CY, P_CTX, P_CTY, P_CTZ, P_BLCM,
 P_EXPM, P_EXPC, P_VCM, P_VCC, P_RCM, P_LCM, P_RSTD,
 P_SUSM, P_HVLIM, P_PLIM, P_AREA, P_GAP, P_RP, P_P0, P_P1, P_P2,
 P_RD, P_D0, P_D1, P_D2, P_KV, P_KH,
 P_TICKN, P_FLOOR, P_NSTDM, P_NSTDC, P_TA, P_TSTD, P_TDRIFT,
 P_LAM, P_RIFO, P_I0, P_I1, P_I2, P_PHSTD,
 P_PSDR, P_B0, P_B1, P_LEVA, P_PSDG, P_LARM, P_PSDSTD, P_PSDLSB, P_PSDFS,
 P_DVMSTD, P_DVMRES, P_DVMRNG, P_MONGM, P_MONGC, P_MONSTD, P_MONLSB, P_MONFS,
 P_TSSTD, P_TSRES, P_PRSTD, P_ADCQ,
 P_PC0, P_PC1, P_PC2, P_PS0, P_PS1, P_PS2, P_IZS, P_FGK, P_HLM, P_HLC, P_LHM,
 P_IX0, P_IX1, P_IX2, P_IY0, P_IY1, P_IY2, P_BS0, P_BS1, P_BC0, P_BC1,
 P_TRJS, P_TRJV, P_PNL, P_PNLPH, P_XTRA, P_TRJSET) = range(116)
NP = 116
# ---- state of the published profile's slow mechanisms (flicker poles in ``fl``, rest in ``fx``)
FL_TILTX, FL_TILTY = 0, 1              # rows of fl: ground tilt tipping gravity along x, along y
FX_SWEEP, FX_MOVING, FX_SET, FX_TILTX, FX_TILTY, FX_FM = 0, 1, 2, 3, 4, 5
NFX = 6

SENSOR_FIELDS = (
    "ifo_fringes[0..3]", "ifo_phase_rad[0..3]", "psd_V[0..5]", "dvm_V",
    "main_monitor_V", "cm_monitor_V", "magnet_temperature_C", "pressure_Pa", "time_s")
# column layout of the raw sensor array
S_FR, S_PH, S_PSD, S_DVM, S_MONM, S_MONC, S_TEMP, S_PRES, S_TIME = 0, 4, 8, 14, 15, 16, 17, 18, 19
NS = 20
TRUTH_FIELDS = (
    "t", "theta", "omega", "z", "vz", "i_main", "i_cm", "i_main_reg", "i_cm_reg",
    "x", "y", "theta_x", "theta_y", "theta_z", "vx", "vy", "wx", "wy", "wz",
    "bl", "emf", "coil_voltage", "magnet_temperature", "agx", "agy", "agz",
    "m_test", "m_aux", "tau_hyst")
NT = len(TRUTH_FIELDS)


# =============================================================================================
# numba kernels
# =============================================================================================
@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _bl_parts(z, i_flow, temp, P):
    """Return (Bl, dBl/dz) at coil height z (m), flowing current (A), magnet temperature (C)."""
    u = z * P[P_IZS]
    u2 = u * u
    u4 = u2 * u2
    # Estrin form (short dependency chain)
    p = 1.0 + u * (P[P_A1] + P[P_A2] * u) + u2 * u * (P[P_A3] + P[P_A4] * u) + u4 * u * (P[P_A5] + P[P_A6] * u)
    dp = ((P[P_A1] + 2.0 * P[P_A2] * u) + u2 * (3.0 * P[P_A3] + 4.0 * P[P_A4] * u)
          + u4 * (5.0 * P[P_A5] + 6.0 * P[P_A6] * u)) * P[P_IZS]
    ima = i_flow * 1e3
    gi = 1.0 + P[P_ALPHA] * ima + P[P_BETA] * ima * ima
    gt = 1.0 + P[P_TC] * (temp - P[P_TREF])
    s = P[P_BL0] * gi * gt
    return s * p, s * dp


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _flowing(x, env, act, P):
    im = 0.0
    if act[A_FM] != 0.0:
        im = x[IM] * (1.0 + env[E_DRM] * env[E_T]) + env[E_INM]
    ic = 0.0
    if act[A_CME] != 0.0:
        ic = x[IC] * (1.0 + env[E_DRC] * env[E_T]) + env[E_INC]
    return im, ic


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _nl_forces(x, cq, cqd, sp, slip, env, act, P, hyk, Q, full):
    """Nonlinear / input forces at the current state. ``cq = c.q``, ``cqd = c.q'`` (Table II
    ratios times the five coil coordinates), ``sp[3]`` tangential plate displacements.
    Fills Q (5 generalized forces on the coil DOF, without -Kq - Cq'); returns (wheel torque
    without -k theta - c omega, flowing main current, flowing cm current, induced voltage U, Bl,
    hysteresis torque). With ``full`` False the damping-coil and ground terms of Q are left out
    (the kernel adds them once per noise tick)."""
    r = P[P_R]
    th = x[TH]
    z = r * th
    im, ic = _flowing(x, env, act, P)
    bl, dbl = _bl_parts(z, im, env[E_TEMP], P)
    fz = im * (bl + dbl * cq)
    fq = im * bl
    Q[0] = fq * P[P_CX]
    Q[1] = fq * P[P_CY]
    Q[2] = fq * P[P_CTX]
    Q[3] = fq * P[P_CTY]
    Q[4] = fq * P[P_CTZ]
    emf = (bl + dbl * cq) * r * x[OM] + bl * cqd
    # damping coils (currents constant over the frame; precomputed by the decoder)
    fvs = act[A_FVS]
    if full:
        for j in range(5):
            Q[j] += act[A_QD + j]
        Q[0] -= P[P_SUSM] * env[E_AG]
        Q[1] -= P[P_SUSM] * env[E_AG + 1]
    # electrostatic theta-z plates
    if act[A_HVE] != 0.0 and env[E_P] < P[P_PLIM]:
        c0 = 0.5 * EPS0 * P[P_AREA]
        d = P[P_GAP]
        for k in range(3):
            cs = P[P_PC0 + k]
            sn = P[P_PS0 + k]
            s = sp[k]
            va = act[A_HV + 2 * k]
            vb = act[A_HV + 2 * k + 1]
            ga = d - s
            gb = d + s
            if ga < 0.05 * d:
                ga = 0.05 * d
            if gb < 0.05 * d:
                gb = 0.05 * d
            f = c0 * (va * va / (ga * ga) - vb * vb / (gb * gb))
            Q[0] += -sn * f
            Q[1] += cs * f
            Q[4] += P[P_RP] * f
    # external generalized forces, ground
    ext = env[E_EXTN] > 0.0
    if ext:
        for j in range(5):
            Q[j] += env[E_EXT + 1 + j]
    # wheel torque
    g_eff = P[P_G] + env[E_AG + 2]
    m_main = P[P_MTARE] + env[E_MT] + env[E_MA]
    fcm = P[P_BLCM] * ic
    fzt = fz + fvs
    if ext:
        fzt += env[E_EXT]
    tau = r * (fzt - m_main * g_eff) - r * (fcm - P[P_MCS] * g_eff)
    tau += P[P_FGK] * env[E_AG]
    th_h = 0.0
    for i in range(hyk.shape[0]):
        th_h -= hyk[i] * (th - slip[i])
    tau += th_h
    stop = P[P_STOP]
    if th > stop:
        tau -= P[P_KSTOP] * (th - stop) + P[P_CSTOP] * x[OM]
    elif th < -stop:
        tau -= P[P_KSTOP] * (th + stop) + P[P_CSTOP] * x[OM]
    return tau, im, ic, emf, bl, th_h


@njit(cache=True, fastmath=True, error_model="numpy")
def _qdep(x, P, sp):
    """(c.q, c.q') from the physical state; fills the plate displacements sp[3]."""
    cq = (P[P_CX] * x[Q0] + P[P_CY] * x[Q0 + 1] + P[P_CTX] * x[Q0 + 2]
          + P[P_CTY] * x[Q0 + 3] + P[P_CTZ] * x[Q0 + 4])
    cqd = (P[P_CX] * x[QD0] + P[P_CY] * x[QD0 + 1] + P[P_CTX] * x[QD0 + 2]
           + P[P_CTY] * x[QD0 + 3] + P[P_CTZ] * x[QD0 + 4])
    for k in range(3):
        sp[k] = P[P_RP] * x[Q0 + 4] - x[Q0] * P[P_PS0 + k] + x[Q0 + 1] * P[P_PC0 + k]
    return cq, cqd


@njit(cache=True, fastmath=True, error_model="numpy")
def _expm3(a, h):
    """exp(a h) for a small 3x3 matrix via Taylor series with scaling and squaring."""
    n = 3
    m = a * h
    nrm = 0.0
    for i in range(n):
        for j in range(n):
            nrm = max(nrm, abs(m[i, j]))
    s = 0
    while nrm > 0.05:
        nrm *= 0.5
        s += 1
    m = m / (2.0 ** s)
    e = np.eye(n)
    term = np.eye(n)
    for k in range(1, 14):
        term = term @ m / k
        e = e + term
    for _ in range(s):
        e = e @ e
    return e


@njit(cache=True, fastmath=True, error_model="numpy")
def _wheel_matrices(J, P, W):
    a = np.zeros((3, 3))
    a[0, 1] = 1.0
    a[1, 0] = -P[P_K] / J
    a[1, 1] = -P[P_C] / J
    a[1, 2] = 1.0 / J
    e = _expm3(a, P[P_H])
    W[0] = e[0, 0]
    W[1] = e[0, 1]
    W[2] = e[1, 0]
    W[3] = e[1, 1]
    W[4] = e[0, 2]
    W[5] = e[1, 2]


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _quant(v, lsb, fs):
    if v > fs - lsb:
        v = fs - lsb
    elif v < -fs:
        v = -fs
    return np.floor(v / lsb + 0.5) * lsb


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _roll_back(x, x0, eta, eta0, slip, slip0, env, env0, W, W0, fl, fl0, fx, fx0):
    """Every state array of :func:`_run` back to the block's start: a block that stops early
    (non-finite state, or too few normals) leaves the plant as it was."""
    x[:] = x0
    eta[:] = eta0
    slip[:] = slip0
    env[:] = env0
    W[:] = W0
    fl[:] = fl0
    fx[:] = fx0


@njit(cache=True, fastmath=True, error_model="numpy")
def _run(x, eta, slip, env, act, P, hyk, hyth, Lam, Geta, Tq, Rq, W, gphi, gL, gc,
         nz, nzu, n_frames, n_sub, out, tr, rec, fl, fla, flb, fx, nz2):
    """Advance the plant n_frames frames of n_sub steps with actuators ``act`` held.
    nz: standard normals drawn from the plant's numpy Generator (:meth:`Nist4Plant._advance`;
    passing the Generator itself costs ~10 us per call); per frame the kernel takes, in this
    order, 12 per noise tick (3 x 3 ground, 2 current, 1 temperature) and 15 at the frame end
    (4 ifo, 6 psd, dvm, 2 monitors, thermometer, pressure gauge), whatever the switches, and
    writes how many it took to ``nzu[0]`` (-1: ``nz`` was too short). Returns the number of
    frames done (< n_frames if a non-finite state appeared, or nz was too short; the state is
    then put back as it was at the call).

    The published profile's slow mechanisms (``P[P_XTRA]`` != 0) take their normals from a
    second stream, ``nz2``: per frame, at its start, 2 x n_poles for the flicker poles ``fl``
    (2, n_poles) of the ground tilt (x, y) and one for the set draw, then at its end one for
    the sweep draw; ``fx`` (:data:`NFX`) holds the per-sweep and the per-set trajectory
    errors, the sweep flag, the frame's tilts and the switchbox state of the last frame.
    With ``P[P_XTRA]`` == 0 none of this runs and ``nz2`` may be empty (the first stream is
    taken exactly as before). The trajectory's voltage is in the DVM's velocity-mode reading;
    the truth's ``emf`` stays the ideal one."""
    iz = 0
    nzn = nz.shape[0]
    x0 = x.copy()
    eta0 = eta.copy()
    slip0 = slip.copy()
    env0 = env.copy()
    W0 = W.copy()
    xtra = P[P_XTRA] != 0.0
    fl0 = fl.copy()
    fx0 = fx.copy()
    npol = fla.shape[0]
    iz2 = 0
    eps_traj = 0.0
    tg0 = 0.0
    tg1 = 0.0
    pnl = P[P_PNL]
    h = P[P_H]
    r = P[P_R]
    Q = np.zeros(5)
    sp = np.zeros(3)
    en = np.zeros(10)
    hv_on = act[A_HVE] != 0.0 and env[E_P] < P[P_PLIM]
    gcv = np.zeros(10)      # Geta @ c (Table II direction)
    gconst = np.zeros(10)   # Geta @ (damping + ground) generalized forces, per tick
    qc = np.zeros(5)
    for i in range(10):
        acc = 0.0
        acc += Geta[i, 0] * P[P_CX] + Geta[i, 1] * P[P_CY] + Geta[i, 2] * P[P_CTX]
        acc += Geta[i, 3] * P[P_CTY] + Geta[i, 4] * P[P_CTZ]
        gcv[i] = acc
    th_h = 0.0
    emf = 0.0
    vcoil = 0.0
    # plate directions in modal coordinates and squared electrode voltages (held per call)
    gp = np.zeros((3, 10))
    va2 = np.zeros(3)
    vb2 = np.zeros(3)
    for k in range(3):
        va2[k] = act[A_HV + 2 * k] ** 2
        vb2[k] = act[A_HV + 2 * k + 1] ** 2
        for i in range(10):
            gp[k, i] = -P[P_PS0 + k] * Geta[i, 0] + P[P_PC0 + k] * Geta[i, 1] + P[P_RP] * Geta[i, 4]
    pc0 = 0.5 * EPS0 * P[P_AREA]
    gap = P[P_GAP]
    fp = np.zeros(3)
    # constant factors of the hot loop
    fm_on = act[A_FM] != 0.0
    cm_on = act[A_CME] != 0.0
    izs = P[P_IZS]
    a1, a2, a3, a4, a5, a6 = P[P_A1], P[P_A2], P[P_A3], P[P_A4], P[P_A5], P[P_A6]
    al3 = P[P_ALPHA] * 1e3
    be6 = P[P_BETA] * 1e6
    bl0 = P[P_BL0]
    blcm = P[P_BLCM]
    kh_sum = 0.0
    sh = 0.0
    for i in range(hyk.shape[0]):
        kh_sum += hyk[i]
        sh += hyk[i] * slip[i]
    stop = P[P_STOP]
    # per-tick quantities (set at the first tick of the call)
    gt_s = 1.0
    dfm = 1.0
    dfc = 1.0
    tau0 = 0.0
    tick_n = int(P[P_TICKN])
    nt = np.zeros(12)
    nf = np.zeros(15)
    ea_m = math.exp(-h / P[P_EXPM]) if P[P_EXPM] > 0 else 0.0
    ea_c = math.exp(-h / P[P_EXPC]) if P[P_EXPC] > 0 else 0.0
    ta = P[P_TA]
    tsq = P[P_TSTD] * math.sqrt(max(0.0, 1.0 - ta * ta))
    if act[A_FM] == 0.0:
        x[IM] = 0.0
    if act[A_CME] == 0.0:
        x[IC] = 0.0
    nh = hyk.shape[0]
    for fr in range(n_frames):
        dvm_acc = 0.0
        dvm_first = 0.0
        traj_acc = 0.0
        if xtra:
            # slow mechanisms, held over the frame: ground tilt (rad) about both horizontal
            # axes and the trajectory's slow error, each a sum of flicker poles
            if iz2 + 2 * npol + 2 > nz2.shape[0]:
                nzu[0] = -1
                _roll_back(x, x0, eta, eta0, slip, slip0, env, env0, W, W0, fl, fl0, fx, fx0)
                return fr
            for row in range(2):
                acc = 0.0
                for k in range(npol):
                    fl[row, k] = fla[k] * fl[row, k] + flb[row, k] * nz2[iz2]
                    iz2 += 1
                    acc += fl[row, k]
                fx[FX_TILTX + row] = acc
            # a velocity set starts where the switchbox opens the coil: its mean trajectory
            # is set up anew (the coil driven to the sweep start, the auxiliary mass placed)
            if act[A_FM] == 0.0 and fx[FX_FM] != 0.0:
                fx[FX_SET] = P[P_TRJSET] * nz2[iz2]
            iz2 += 1
            fx[FX_FM] = act[A_FM]
            eps_traj = fx[FX_SWEEP] + fx[FX_SET]
            tg0 = P[P_G] * fx[FX_TILTX]
            tg1 = P[P_G] * fx[FX_TILTY]
        for sub in range(n_sub):
            # ---- noise tick
            if env[E_TICK] <= 0.0:
                if iz + 12 > nzn:
                    nzu[0] = -1
                    _roll_back(x, x0, eta, eta0, slip, slip0, env, env0, W, W0, fl, fl0, fx, fx0)
                    return fr
                for j in range(12):
                    nt[j] = nz[iz + j]
                iz += 12
                for ax in range(3):
                    gs = env[E_GS + 2 * ax:E_GS + 2 * ax + 2]
                    env[E_AG + ax] = ground_tick(gs, gphi, gL, gc, P[P_FLOOR], nt[3 * ax],
                                                 nt[3 * ax + 1], nt[3 * ax + 2])
                if xtra:
                    # a tilt of the floor by t tips gravity: horizontal acceleration g t
                    env[E_AG] += tg0
                    env[E_AG + 1] += tg1
                env[E_INM] = P[P_NSTDM] * nt[9]
                env[E_INC] = P[P_NSTDC] * nt[10]
                tset = env[E_TSET] + P[P_TDRIFT] * env[E_T]
                env[E_TEMP] = tset + (env[E_TEMP] - tset) * ta + tsq * nt[11]
                for j in range(5):
                    qc[j] = act[A_QD + j]
                qc[0] -= P[P_SUSM] * env[E_AG]
                qc[1] -= P[P_SUSM] * env[E_AG + 1]
                for i in range(10):
                    acc = 0.0
                    for j in range(5):
                        acc += Geta[i, j] * qc[j]
                    gconst[i] = acc
                env[E_TICK] = tick_n
                # held per tick: magnet temperature factor, source drift factors, constant torque
                gt_s = bl0 * (1.0 + P[P_TC] * (env[E_TEMP] - P[P_TREF]))
                dfm = 1.0 + env[E_DRM] * env[E_T]
                dfc = 1.0 + env[E_DRC] * env[E_T]
                g_eff = P[P_G] + env[E_AG + 2]
                tau0 = (r * (act[A_FVS] - (P[P_MTARE] + env[E_MT] + env[E_MA]) * g_eff + P[P_MCS] * g_eff)
                        + P[P_FGK] * env[E_AG])
            env[E_TICK] -= 1.0
            # ---- mass lift ramps: each event at its own rate (its mass change over the ramp)
            changed = False
            for k in range(2):
                ci = E_MT + 2 * k          # E_MT, E_MA; each followed by its target
                dm = env[ci + 1] - env[ci]
                if dm != 0.0:
                    changed = True
                    rate = env[E_RMT + k] * h
                    if abs(dm) <= rate:
                        env[ci] = env[ci + 1]
                    elif dm > 0:
                        env[ci] += rate
                    else:
                        env[ci] -= rate
            if changed:
                g_eff = P[P_G] + env[E_AG + 2]
                tau0 = (r * (act[A_FVS] - (P[P_MTARE] + env[E_MT] + env[E_MA]) * g_eff + P[P_MCS] * g_eff)
                        + P[P_FGK] * env[E_AG])
                J = P[P_JW] + (P[P_MTARE] + env[E_MT] + env[E_MA] + P[P_MCS]) * r * r
                if J != env[E_JW]:
                    _wheel_matrices(J, P, W)
                    env[E_JW] = J
            # ---- forces at step start (held over the step)
            cq = 0.0
            cqd = 0.0
            if hv_on:
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                for j in range(10):
                    ej = eta[j]
                    cq += Rq[0, j] * ej
                    cqd += Rq[1, j] * ej
                    s0 += Rq[2, j] * ej
                    s1 += Rq[3, j] * ej
                    s2 += Rq[4, j] * ej
                sp[0] = s0
                sp[1] = s1
                sp[2] = s2
                for k in range(3):
                    a_ = sp[k]
                    ga = gap - a_
                    gb = gap + a_
                    if ga < 0.05 * gap:
                        ga = 0.05 * gap
                    if gb < 0.05 * gap:
                        gb = 0.05 * gap
                    inv = 1.0 / (ga * gb)
                    ia = gb * inv
                    ib = ga * inv
                    fp[k] = pc0 * (va2[k] * ia * ia - vb2[k] * ib * ib)
            else:
                for j in range(10):
                    cq += Rq[0, j] * eta[j]
                    cqd += Rq[1, j] * eta[j]
            # same physics as _nl_forces (which _deriv and the tests use), written out for speed
            th = x[TH]
            om = x[OM]
            u = th * r * izs
            u2 = u * u
            u4 = u2 * u2
            pz = 1.0 + u * (a1 + a2 * u) + u2 * u * (a3 + a4 * u) + u4 * u * (a5 + a6 * u)
            dpz = ((a1 + 2.0 * a2 * u) + u2 * (3.0 * a3 + 4.0 * a4 * u) + u4 * (5.0 * a5 + 6.0 * a6 * u)) * izs
            im = 0.0
            if fm_on:
                im = x[IM] * dfm + env[E_INM]
            ic = 0.0
            if cm_on:
                ic = x[IC] * dfc + env[E_INC]
            sb = gt_s * (1.0 + im * (al3 + be6 * im))
            bl = sb * pz
            blq = bl + sb * dpz * cq
            emf = blq * r * om + bl * cqd
            if xtra:
                # the trajectory's share of the induced voltage, as the DVM reads it
                traj_acc += bl * eps_traj * r * om
            th_h = sh - kh_sum * th
            tau = tau0 + r * (im * blq - blcm * ic) + th_h
            if env[E_EXTN] > 0.0:
                tau += r * env[E_EXT]
                for j in range(5):
                    Q[j] = env[E_EXT + 1 + j]
            if th > stop:
                tau -= P[P_KSTOP] * (th - stop) + P[P_CSTOP] * om
            elif th < -stop:
                tau -= P[P_KSTOP] * (th + stop) + P[P_CSTOP] * om
            # ---- wheel
            x[TH] = W[0] * th + W[1] * om + W[4] * tau
            x[OM] = W[2] * th + W[3] * om + W[5] * tau
            # ---- five DOF in real modal coordinates (2x2 blocks)
            for b in range(5):
                i = 2 * b
                e0 = eta[i]
                e1 = eta[i + 1]
                en[i] = Lam[i, 0] * e0 + Lam[i, 1] * e1
                en[i + 1] = Lam[i + 1, 0] * e0 + Lam[i + 1, 1] * e1
            fq = im * bl
            if hv_on:
                f0 = fp[0]
                f1 = fp[1]
                f2 = fp[2]
                for i in range(10):
                    eta[i] = en[i] + fq * gcv[i] + gconst[i] + f0 * gp[0, i] + f1 * gp[1, i] + f2 * gp[2, i]
            else:
                for i in range(10):
                    eta[i] = en[i] + fq * gcv[i] + gconst[i]
            if env[E_EXTN] > 0.0:
                for i in range(10):
                    acc = 0.0
                    for j in range(5):
                        acc += Geta[i, j] * Q[j]
                    eta[i] += acc
            # ---- current sources (exact first-order lag, compliance rate limit)
            if act[A_FM] != 0.0:
                i0 = x[IM]
                di = (act[A_IM] - i0) * (1.0 - ea_m)
                if P[P_LCOIL] > 0.0:
                    vmax = P[P_VCM] - abs(P[P_RCOIL] * i0 + emf)
                    if vmax < 0.0:
                        vmax = 0.0
                    dmax = vmax * P[P_HLM]
                    if di > dmax:
                        di = dmax
                    elif di < -dmax:
                        di = -dmax
                x[IM] = i0 + di
                vcoil = P[P_RCOIL] * im + P[P_LHM] * di + emf
                dvm_v = P[P_RSTD] * im
            else:
                vcoil = emf
                dvm_v = emf
            if sub == 0:
                dvm_first = dvm_v
            dvm_acc += dvm_v
            if act[A_CME] != 0.0:
                i0 = x[IC]
                di = (act[A_IC] - i0) * (1.0 - ea_c)
                if P[P_LCM] > 0.0:
                    emfc = -P[P_BLCM] * r * om
                    vmax = P[P_VCC] - abs(P[P_RCM] * i0 + emfc)
                    if vmax < 0.0:
                        vmax = 0.0
                    dmax = vmax * P[P_HLC]
                    if di > dmax:
                        di = dmax
                    elif di < -dmax:
                        di = -dmax
                x[IC] = i0 + di
            # ---- hysteresis play operators
            thn = x[TH]
            moved = False
            for i in range(nh):
                e = thn - slip[i]
                if e > hyth[i]:
                    slip[i] = thn - hyth[i]
                    moved = True
                elif e < -hyth[i]:
                    slip[i] = thn + hyth[i]
                    moved = True
            if moved:
                sh = 0.0
                for i in range(nh):
                    sh += hyk[i] * slip[i]
            # ---- external force countdown, time
            if env[E_EXTN] > 0.0:
                env[E_EXTN] -= 1.0
            env[E_T] += h
        # ---- physical five-DOF coordinates at the frame end
        for i in range(10):
            acc = 0.0
            for j in range(10):
                acc += Tq[i, j] * eta[j]
            x[Q0 + i] = acc
        # ---- induced voltage, Bl, hysteresis torque of the frame-end state (truth)
        cq, cqd = _qdep(x, P, sp)
        _, _, _, emf_end, _, th_h = _nl_forces(x, cq, cqd, sp, slip, env, act, P, hyk, Q, False)
        if xtra:
            # a sweep starts when the coil's speed rises above the threshold: the trajectory
            # of this sweep gets its own error
            vz = abs(r * x[OM])
            if fx[FX_MOVING] == 0.0 and vz > P[P_TRJV]:
                fx[FX_MOVING] = 1.0
                fx[FX_SWEEP] = P[P_TRJS] * nz2[iz2]
            elif fx[FX_MOVING] != 0.0 and vz < 0.5 * P[P_TRJV]:
                fx[FX_MOVING] = 0.0
            iz2 += 1
        env[E_EMF] = emf_end
        env[E_VCOIL] = vcoil
        env[E_TAUH] = th_h
        # ---- non-finite guard
        ok = True
        for i in range(NX):
            if not np.isfinite(x[i]):
                ok = False
        if not ok or iz + 15 > nzn:
            nzu[0] = -1 if ok else iz  # (ok: the normals ran out)
            _roll_back(x, x0, eta, eta0, slip, slip0, env, env0, W, W0, fl, fl0, fx, fx0)
            return fr
        # ---- sensors at frame end
        for j in range(15):
            nf[j] = nz[iz + j]
        iz += 15
        th = x[TH]
        lam = P[P_LAM]
        for i in range(4):
            if i < 3:
                zi = r * th + P[P_IY0 + i] * x[Q0 + 2] - P[P_IX0 + i] * x[Q0 + 3]
            else:
                zi = -r * th
            ph = 4.0 * math.pi * zi / lam + P[P_PHSTD] * nf[i]
            nfr = math.floor(ph / (2.0 * math.pi))
            out[fr, S_FR + i] = nfr
            out[fr, S_PH + i] = ph - 2.0 * math.pi * nfr
        if pnl != 0.0:
            # heterodyne periodic nonlinearity (frequency mixing): first order in the optical
            # phase, one period per fringe (lambda / 2 of displacement)
            for i in range(4):
                ph = 2.0 * math.pi * out[fr, S_FR + i] + out[fr, S_PH + i]
                ph += pnl * math.sin(ph + P[P_PNLPH])
                nfr = math.floor(ph / (2.0 * math.pi))
                out[fr, S_FR + i] = nfr
                out[fr, S_PH + i] = ph - 2.0 * math.pi * nfr
        g2 = 2.0 * P[P_PSDG]
        for k in range(2):
            dx = x[Q0] - P[P_BS0 + k] * x[Q0 + 4]
            dy = x[Q0 + 1] + P[P_BC0 + k] * x[Q0 + 4]
            out[fr, S_PSD + 2 * k] = g2 * dx + P[P_PSDSTD] * nf[4 + 2 * k]
            out[fr, S_PSD + 2 * k + 1] = g2 * dy + P[P_PSDSTD] * nf[5 + 2 * k]
        out[fr, S_PSD + 4] = g2 * P[P_LARM] * x[Q0 + 2] + P[P_PSDSTD] * nf[8]
        out[fr, S_PSD + 5] = g2 * P[P_LARM] * x[Q0 + 3] + P[P_PSDSTD] * nf[9]
        im, ic = _flowing(x, env, act, P)
        # integrating DVM: trapezoid rule over the frame's steps
        dvm_end = P[P_RSTD] * im if act[A_FM] != 0.0 else emf_end
        dvm = (dvm_acc + 0.5 * (dvm_end - dvm_first)) / n_sub + P[P_DVMSTD] * nf[10]
        if xtra and act[A_FM] == 0.0:
            dvm += traj_acc / n_sub
        out[fr, S_MONM] = P[P_MONGM] * im + P[P_MONSTD] * nf[11]
        out[fr, S_MONC] = P[P_MONGC] * ic + P[P_MONSTD] * nf[12]
        out[fr, S_TEMP] = env[E_TEMP] + P[P_TSSTD] * nf[13]
        out[fr, S_PRES] = env[E_P] * (1.0 + P[P_PRSTD] * nf[14])
        out[fr, S_TIME] = env[E_T]
        if P[P_ADCQ] != 0.0:
            for k in range(6):
                out[fr, S_PSD + k] = _quant(out[fr, S_PSD + k], P[P_PSDLSB], P[P_PSDFS])
            out[fr, S_MONM] = _quant(out[fr, S_MONM], P[P_MONLSB], P[P_MONFS])
            out[fr, S_MONC] = _quant(out[fr, S_MONC], P[P_MONLSB], P[P_MONFS])
            dvm = _quant(dvm, P[P_DVMRES], P[P_DVMRNG])
            out[fr, S_TEMP] = np.floor(out[fr, S_TEMP] / P[P_TSRES] + 0.5) * P[P_TSRES]
        out[fr, S_DVM] = dvm
        if rec:
            bl, _ = _bl_parts(r * th, im, env[E_TEMP], P)
            tr[fr, 0] = env[E_T]
            tr[fr, 1] = th
            tr[fr, 2] = x[OM]
            tr[fr, 3] = r * th
            tr[fr, 4] = r * x[OM]
            tr[fr, 5] = im
            tr[fr, 6] = ic
            tr[fr, 7] = x[IM]
            tr[fr, 8] = x[IC]
            for j in range(5):
                tr[fr, 9 + j] = x[Q0 + j]
                tr[fr, 14 + j] = x[QD0 + j]
            tr[fr, 19] = bl
            tr[fr, 20] = env[E_EMF]
            tr[fr, 21] = env[E_VCOIL]
            tr[fr, 22] = env[E_TEMP]
            tr[fr, 23] = env[E_AG]
            tr[fr, 24] = env[E_AG + 1]
            tr[fr, 25] = env[E_AG + 2]
            tr[fr, 26] = env[E_MT]
            tr[fr, 27] = env[E_MA]
            tr[fr, 28] = env[E_TAUH]
    nzu[0] = iz
    return n_frames


@njit(cache=True, fastmath=True, error_model="numpy")
def _deriv(x, slip, env, act, P, hyk, K5, C5, Minv, dx):
    """Continuous-time derivative (for linearization and static checks)."""
    Q = np.zeros(5)
    sp = np.zeros(3)
    cq, cqd = _qdep(x, P, sp)
    tau, im, ic, emf, bl, th_h = _nl_forces(x, cq, cqd, sp, slip, env, act, P, hyk, Q, True)
    r = P[P_R]
    J = P[P_JW] + (P[P_MTARE] + env[E_MT] + env[E_MA] + P[P_MCS]) * r * r
    dx[TH] = x[OM]
    dx[OM] = (tau - P[P_K] * x[TH] - P[P_C] * x[OM]) / J
    dx[IM] = (act[A_IM] - x[IM]) / P[P_EXPM] if act[A_FM] != 0.0 else 0.0
    dx[IC] = (act[A_IC] - x[IC]) / P[P_EXPC] if act[A_CME] != 0.0 else 0.0
    for i in range(5):
        dx[Q0 + i] = x[QD0 + i]
        f = Q[i]
        for j in range(5):
            f -= K5[i, j] * x[Q0 + j] + C5[i, j] * x[QD0 + j]
        dx[QD0 + i] = Minv[i] * f
    return emf, im, ic, bl


class NormalDraws:
    """Standard normals of a plant's numpy Generator, drawn in Python for its kernel.

    The kernels used to take the Generator itself and draw one value at a time; numba's
    unboxing of a Generator costs ~10 us per call, more than a whole frame of the plant. Numba's
    ``standard_normal`` is numpy's (the same ziggurat on the same bit generator: the same
    values, the same state after), so a kernel given ``rng.standard_normal(n)`` computes the
    same bits, provided ``n`` is exactly what it takes. A block that stops at a non-finite
    state took fewer; :meth:`rewind` then puts the generator where the per-value draws left
    it: back to a mark (a state snapshot, taken every :data:`MARK_EVERY` values) and forward
    by every value drawn since, minus the ones the kernel did not take. The plant's Generator
    must be drawn from by its plant only (it always was)."""

    MARK_EVERY = 1 << 17

    def __init__(self) -> None:
        self._rng: np.random.Generator | None = None
        self._mark: Mapping[str, Any] | None = None
        self._since = 0
        self.used = np.zeros(1, dtype=np.int64)
        """The kernel writes how many of the values it took here (-1: too few were given)."""

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if rng is not self._rng or self._mark is None or self._since > self.MARK_EVERY:
            self._rng, self._mark, self._since = rng, rng.bit_generator.state, 0
        self._since += count
        return rng.standard_normal(count)

    def rewind(self, rng: np.random.Generator, drawn: int, taken: int) -> None:
        """The generator as if only ``taken`` of the last ``drawn`` values had been drawn."""
        n = self._since - drawn + taken
        assert self._mark is not None  # draw() marks before the first values it gives
        rng.bit_generator.state = self._mark
        while n > 0:
            k = min(n, 1 << 20)
            rng.standard_normal(k)
            n -= k
        self._mark = None


def normals_needed(env_tick: float, tick_n: int, n_steps: int, n_frames: int, per_tick: int,
                   per_frame: int) -> int:
    """How many normals a kernel takes for ``n_frames`` frames of ``n_steps`` steps in all: it
    ticks at a step whose counter ``env_tick`` (decremented by one each step, reset to
    ``tick_n`` at a tick) is <= 0 and takes ``per_tick`` there, and ``per_frame`` at each
    frame end."""
    tick_n = max(1, tick_n)
    if not env_tick < n_steps:  # (also NaN: never ticks)
        ticks = 0
    else:
        s0 = 0 if env_tick <= 0.0 else math.ceil(env_tick)
        ticks = 0 if s0 >= n_steps else 1 + (n_steps - 1 - s0) // tick_n
    return per_tick * ticks + per_frame * n_frames


def advance_in_chunks(plant: Any, n_frames: int, out: np.ndarray, tr: np.ndarray, rec: bool, *,
                      state: tuple[str, ...], per_tick: int, per_frame: int, tick_n: int,
                      env_tick: Callable[[], float], kernel: Callable[..., int],
                      chunk: int = 4096) -> None:
    """Step ``plant`` by ``n_frames`` frames through its compiled ``kernel``, in calls of at
    most ``chunk`` frames (bounding the normals drawn ahead), each given exactly the normals it
    takes (:class:`NormalDraws`, :func:`normals_needed`). A block is cut only where a frame
    starts on a noise tick (as it always does: ``tick_n`` divides ``n_sub``), so the pieces
    compute what one call would. ``kernel(nz, used, n, out, tr)`` returns the frames it did;
    it puts back its own state when it stops at a non-finite state, and the block's earlier
    calls are put back here (the plant attributes named in ``state``), the generator rewound
    to where the per-value draws left it, and :class:`PlantError` raised."""
    normals, used = plant._normals, plant._normals.used
    n_sub = plant.n_sub
    saved = None
    done = 0
    while True:
        n = n_frames - done
        tick = env_tick()
        if n > chunk and not tick > 0.0:
            n = chunk
            if saved is None:
                saved = [getattr(plant, name).copy() for name in state]
        if n == 1 and tick == 0.0:  # one frame from a tick: the usual call
            count = per_frame + per_tick * (1 + (n_sub - 1) // max(1, tick_n))
        else:
            count = normals_needed(tick, tick_n, n * n_sub, n, per_tick, per_frame)
        nz = normals.draw(plant.rng, count)
        whole = done == 0 and n == n_frames
        got = kernel(nz, used, n, out if whole else out[done:done + n],
                     tr if whole or not rec else tr[done:done + n])
        taken = int(used[0])
        if got != n or taken != count:
            if saved is not None:
                for name, value in zip(state, saved):
                    setattr(plant, name, value)
            if taken < 0 or got == n:
                raise RuntimeError(f"plant kernel took {taken} normals, {count} were drawn")
            normals.rewind(plant.rng, count, taken)
            raise PlantError(f"non-finite plant state in frame {done + got}; block rolled back")
        done += n
        if done >= n_frames:
            return


# =============================================================================================
# Python interface
# =============================================================================================
@dataclass
class Nist4Actuators:
    """One actuator command frame, in hardware units (held zero-order over the frame).

    ========================  ======  ===================================================
    field                     type    meaning
    ========================  ======  ===================================================
    main_coarse, main_fine    int     main-coil current source DACs (signed codes)
    cm_coarse, cm_fine        int     counter-mass motor current source DACs
    damping[6]                int     damping-coil DACs, order (set0 vertical, set0
                                      horizontal, set1 v, set1 h, set2 v, set2 h)
    hv[6]                     int     theta-z HV amplifier DACs, order (plate0 electrode a,
                                      plate0 b, plate1 a, plate1 b, plate2 a, plate2 b)
    main_force_mode           bool    switchbox: True = source drives the main coil (force
                                      mode), False = coil open, DVM reads U (velocity mode)
    cm_enable                 bool    counter-mass motor source output relay closed
    damping_enable            bool    damping-coil relays closed
    hv_enable                 bool    theta-z HV amplifiers enabled (outputs 0 also when
                                      pressure >= theta_z.pressure_limit_Pa)
    ========================  ======  ===================================================

    Current = FS / 2^(coarse_bits-1) * (coarse + fine * fine_span_lsb / 2^fine_bits).
    Damping current = code * dac_full_scale_V / 2^(bits-1) * driver_A_per_V.
    HV volts = code * full_scale_V / 2^(bits-1), clamped to +-hv_limit_V.
    """
    main_coarse: int = 0
    main_fine: int = 0
    cm_coarse: int = 0
    cm_fine: int = 0
    damping: tuple = (0, 0, 0, 0, 0, 0)
    hv: tuple = (0, 0, 0, 0, 0, 0)
    main_force_mode: bool = False
    cm_enable: bool = True
    damping_enable: bool = False
    hv_enable: bool = False


@dataclass
class Nist4Sensors:
    """One raw sensor frame (values at the frame end unless noted).

    ifo_fringes[4]   int   fringe counts (one fringe = lambda/2 of mirror displacement) of
                           interferometers 0..2 (main coil retroreflectors at
                           interferometer.angles_deg, radius interferometer.radius_m; count up
                           when the coil rises) and 3 (counter-mass; counts up when it rises)
    ifo_phase_rad[4] float phase within the fringe, [0, 2 pi); position = (N + phase/2pi) lambda/2
    psd_V[6]         V     (retro0 dx, retro0 dy, retro1 dx, retro1 dy, lever theta_x,
                           lever theta_y): 2 gain d for the beam-translation retros at
                           psd.retro_angles_deg (d = horizontal displacement of the retro),
                           2 gain L theta for the optical lever; 24-bit +-10 V ADC
    dvm_V            V     frame-averaged DVM: velocity mode U (coil open), force mode
                           R_std * I (100 ohm standard resistor)
    main_monitor_V   V     main source current monitor (500 V/A), 18-bit +-10 V ADC
    cm_monitor_V     V     counter-mass source monitor (200 V/A)
    magnet_temperature_C degC magnet thermometer
    pressure_Pa      Pa    vacuum gauge
    time_s           s     simulated time at the frame end
    """
    ifo_fringes: np.ndarray
    ifo_phase_rad: np.ndarray
    psd_V: np.ndarray
    dvm_V: float
    main_monitor_V: float
    cm_monitor_V: float
    magnet_temperature_C: float
    pressure_Pa: float
    time_s: float

    @classmethod
    def from_row(cls, row: np.ndarray) -> "Nist4Sensors":
        return cls(row[S_FR:S_FR + 4].astype(np.int64), row[S_PH:S_PH + 4].copy(),
                   row[S_PSD:S_PSD + 6].copy(), float(row[S_DVM]), float(row[S_MONM]),
                   float(row[S_MONC]), float(row[S_TEMP]), float(row[S_PRES]), float(row[S_TIME]))


@dataclass
class Nist4Truth:
    """True plant state (SI units; angles rad). ``q``/``qd``: (x, y, theta_x, theta_y, theta_z)
    and their rates; ``bl`` = Bl(z, I, T) in T m; ``emf`` = induced voltage U (V);
    ``coil_voltage`` = main coil terminal voltage R I + L dI/dt + U (V)."""
    t: float
    theta: float
    omega: float
    z: float
    vz: float
    i_main: float
    i_cm: float
    i_main_reg: float
    i_cm_reg: float
    q: np.ndarray
    qd: np.ndarray
    bl: float
    emf: float
    coil_voltage: float
    magnet_temperature: float
    ground_accel: np.ndarray
    m_test: float
    m_aux: float
    tau_hyst: float
    hyst_slip: np.ndarray


@dataclass
class Nist4Block:
    """Result of a block run: ``sensors`` (n_frames, 20) raw array in the column layout of
    :data:`SENSOR_FIELDS` (ifo fringes 0-3, phases 4-7, psd 8-13, dvm 14, main monitor 15,
    cm monitor 16, temperature 17, pressure 18, time 19) and ``truth`` (n_frames, 29) in the
    order of :data:`TRUTH_FIELDS` (None if not recorded)."""
    sensors: np.ndarray
    truth: np.ndarray | None

    def col(self, name: str) -> np.ndarray:
        if self.truth is None:
            raise ValueError(f"no truth column {name!r}: the block was run with record_truth=False")
        return self.truth[:, TRUTH_FIELDS.index(name)]


def _deg(v):
    return [math.radians(a) for a in v]


class Nist4Plant:
    """In-process NIST-4 plant. ``Nist4Plant(params=None, seed=0, overrides=None, noise="published")``.

    ``params``: a :class:`Params` (``load_params("nist4", overrides)``), a dict of overrides,
    or None for the defaults, taken from the noise profile ``noise`` (``params.NOISE_PROFILES``;
    a :class:`Params` carries its own). The same seed and the same call sequence give bit-identical
    outputs (frame-by-frame and block runs consume the random streams identically).
    """

    model = "nist4"

    def __init__(self, params: Params | Mapping[str, Any] | None = None, seed: int = 0,
                 overrides: Mapping[str, Any] | None = None, noise: str = DEFAULT_NOISE):
        if params is None or isinstance(params, Mapping):
            params = load_params("nist4", dict(params or {}) | dict(overrides or {}), noise=noise)
        elif overrides:
            params = params.with_overrides(overrides)
        self.params = params
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        p = params
        fs = p["sim.rate_hz"]
        self.dt = 1.0 / fs
        n_sub = fs / p["sim.frame_rate_hz"]
        if abs(n_sub - round(n_sub)) > 1e-9:
            raise ValueError("sim.frame_rate_hz must divide sim.rate_hz")
        self.n_sub = int(round(n_sub))
        nt = max(1, int(round(fs / p["sim.noise_rate_hz"])))
        self.tick_n = math.gcd(self.n_sub, nt)
        self.ticks_per_frame = self.n_sub // self.tick_n
        tick_s = self.tick_n * self.dt
        f_frame = p["sim.frame_rate_hz"]
        sw = lambda name: 1.0 if p[f"noise.{name}"] else 0.0  # noqa: E731

        P = np.zeros(NP)
        r = p["wheel.radius_m"]
        P[P_H] = self.dt
        P[P_R] = r
        P[P_G] = p["sim.g_m_per_s2"]
        P[P_K] = p["wheel.knife_stiffness_N_m_per_rad"]
        P[P_JW] = p["wheel.inertia_kg_m2"]
        P[P_MTARE] = p["main_side.tare_mass_kg"]
        P[P_MCS] = p["counter_side.mass_kg"]
        m_aux0 = p["main_side.aux_mass_kg"] if p["initial.aux_on"] else 0.0
        m_test0 = p["main_side.test_mass_kg"] if p["initial.test_mass_on"] else 0.0
        J0 = P[P_JW] + (P[P_MTARE] + P[P_MCS] + m_aux0 + m_test0) * r * r
        diss = 1.0 if p["mechanics.dissipation"] else 0.0
        # the knife edge's losses and anelasticity belong to its contact, stated at the nominal
        # (positive) stiffness; tuning the centre of mass through zero changes neither
        k_nominal = p["wheel.nominal_stiffness_N_m_per_rad"]
        P[P_C] = diss * math.sqrt(k_nominal * J0) / p["wheel.q"]
        P[P_FG] = p["wheel.gravity_fraction"]
        P[P_STOP] = p["wheel.stop_rad"]
        P[P_KSTOP] = p["wheel.stop_stiffness_N_m_per_rad"]
        P[P_CSTOP] = 2.0 * math.sqrt(P[P_KSTOP] * J0)
        P[P_RATE] = 1.0 / p["main_side.lift_ramp_s"]  # 1/s: an event's load rate is |delta m| P_RATE
        self._ramp_s = p["main_side.lift_ramp_s"]
        P[P_BL0] = p["coil.bl0_T_m"]
        P[P_ZS] = p["coil.profile_scale_m"]
        P[P_A1:P_A6 + 1] = p["coil.profile_coeffs"]
        P[P_ALPHA] = p["coil.alpha_per_mA"]
        P[P_BETA] = p["coil.beta_per_mA2"]
        P[P_TC] = p["coil.temp_coeff_per_K"]
        P[P_TREF] = p["coil.temp_ref_C"]
        P[P_RCOIL] = p["coil.resistance_ohm"]
        P[P_LCOIL] = p["coil.inductance_H"]
        P[P_CX] = p["coil.fx_over_fz"]
        P[P_CY] = p["coil.fy_over_fz"]
        P[P_CTX] = p["coil.tx_over_fz_m"]
        P[P_CTY] = p["coil.ty_over_fz_m"]
        P[P_CTZ] = p["coil.tz_over_fz_m"]
        P[P_BLCM] = p["counter_side.motor_bl_T_m"]
        P[P_EXPM] = p["main_source.tau_s"]
        P[P_EXPC] = p["cm_source.tau_s"]
        P[P_VCM] = p["main_source.compliance_V"]
        P[P_VCC] = p["cm_source.compliance_V"]
        P[P_RCM] = p["cm_source.resistance_ohm"]
        P[P_LCM] = p["cm_source.inductance_H"]
        P[P_RSTD] = p["dvm.std_resistor_ohm"]
        P[P_SUSM] = p["suspension.mass_kg"]
        P[P_HVLIM] = p["theta_z.hv_limit_V"]
        P[P_PLIM] = p["theta_z.pressure_limit_Pa"]
        P[P_AREA] = p["theta_z.plate_area_m2"]
        P[P_GAP] = p["theta_z.gap_m"]
        P[P_RP] = p["theta_z.radius_m"]
        P[P_P0:P_P2 + 1] = _deg(p["theta_z.angles_deg"])
        P[P_RD] = p["damping_coils.radius_m"]
        P[P_D0:P_D2 + 1] = _deg(p["damping_coils.angles_deg"])
        P[P_KV] = p["damping_coils.kv_N_per_A"]
        P[P_KH] = p["damping_coils.kh_N_per_A"]
        P[P_TICKN] = self.tick_n
        gphi, gL, gc, floor_std = ground_filter(p["ground.peak_hz"], p["ground.peak_q"],
                                                p["ground.peak_asd"], p["ground.floor_asd"], tick_s)
        g_on = sw("ground")
        self._gphi, self._gL, self._gc = gphi, gL * g_on, gc
        P[P_FLOOR] = floor_std * g_on
        P[P_NSTDM] = sw("current") * white_std(p["main_source.noise_asd_A"], 1.0 / tick_s)
        P[P_NSTDC] = sw("current") * white_std(p["cm_source.noise_asd_A"], 1.0 / tick_s)
        tau_t = p["temperature.tau_s"]
        P[P_TA] = math.exp(-tick_s / tau_t)
        P[P_TSTD] = sw("temperature") * p["temperature.fluct_std_K"]
        P[P_TDRIFT] = sw("temperature") * p["temperature.drift_K_per_h"] / 3600.0
        P[P_LAM] = p["interferometer.wavelength_m"]
        P[P_RIFO] = p["interferometer.radius_m"]
        P[P_I0:P_I2 + 1] = _deg(p["interferometer.angles_deg"])
        P[P_PHSTD] = sw("interferometer") * 4 * math.pi / P[P_LAM] * white_std(p["interferometer.noise_asd_m"], f_frame)
        P[P_PSDR] = p["psd.radius_m"]
        P[P_B0:P_B1 + 1] = _deg(p["psd.retro_angles_deg"])
        P[P_LEVA] = math.radians(p["psd.lever_angle_deg"])
        P[P_PSDG] = p["psd.gain_V_per_m"]
        P[P_LARM] = p["psd.lever_arm_m"]
        P[P_PSDSTD] = sw("psd") * white_std(p["psd.noise_asd_V"], f_frame)
        P[P_PSDFS] = p["psd.adc_full_scale_V"]
        P[P_PSDLSB] = P[P_PSDFS] / 2 ** (p["psd.adc_bits"] - 1)
        P[P_DVMSTD] = sw("dvm") * white_std(p["dvm.noise_asd_V"], f_frame)
        P[P_DVMRES] = p["dvm.resolution_V"]
        P[P_DVMRNG] = p["dvm.range_V"]
        P[P_MONGM] = p["main_source.monitor_V_per_A"]
        P[P_MONGC] = p["cm_source.monitor_V_per_A"]
        P[P_MONSTD] = sw("dvm") * white_std(p["monitor.noise_asd_V"], f_frame)
        P[P_MONFS] = p["monitor.adc_full_scale_V"]
        P[P_MONLSB] = P[P_MONFS] / 2 ** (p["monitor.adc_bits"] - 1)
        P[P_TSSTD] = sw("temperature") * p["temperature.sensor_noise_K"]
        P[P_TSRES] = p["temperature.sensor_resolution_K"]
        P[P_PRSTD] = p["pressure.gauge_rel_noise"]
        P[P_ADCQ] = sw("adc_quantization")
        for k in range(3):
            P[P_PC0 + k] = math.cos(P[P_P0 + k])
            P[P_PS0 + k] = math.sin(P[P_P0 + k])
        P[P_IZS] = 1.0 / P[P_ZS]
        P[P_FGK] = P[P_FG] * P[P_K] / P[P_G]
        P[P_HLM] = self.dt / P[P_LCOIL] if P[P_LCOIL] > 0 else 0.0
        P[P_HLC] = self.dt / P[P_LCM] if P[P_LCM] > 0 else 0.0
        P[P_LHM] = P[P_LCOIL] / self.dt
        for i in range(3):
            P[P_IX0 + i] = P[P_RIFO] * math.cos(P[P_I0 + i])
            P[P_IY0 + i] = P[P_RIFO] * math.sin(P[P_I0 + i])
        for k in range(2):
            P[P_BS0 + k] = P[P_PSDR] * math.sin(P[P_B0 + k])
            P[P_BC0 + k] = P[P_PSDR] * math.cos(P[P_B0 + k])
        # the published profile's mechanisms (all zero in the quiet profile): heterodyne
        # periodic nonlinearity (phase amplitude of a displacement amplitude), the per-sweep and
        # the slow (flicker) trajectory error, the ground tilt; the slow ones from a second
        # random stream, drawn only when one of them is on, so the first stream stays as it was
        P[P_PNL] = sw("ifo_nonlinearity") * 4 * math.pi / P[P_LAM] * p["interferometer.nonlinearity_m"]
        P[P_PNLPH] = math.radians(p["interferometer.nonlinearity_phase_deg"])
        P[P_TRJS] = sw("trajectory") * p["trajectory.sweep_rel_std"]
        P[P_TRJSET] = sw("trajectory") * p["trajectory.set_rel_std"]
        P[P_TRJV] = p["trajectory.speed_threshold_m_per_s"]
        fla, flb1 = flicker_poles(p["tilt.f_lo_hz"], p["tilt.f_hi_hz"], p["tilt.poles_per_decade"],
                                  1.0 / f_frame, 1.0)
        amp = sw("tilt") * p["tilt.flicker_asd_rad"]
        self._fla = fla
        self._flb = np.ascontiguousarray(np.outer((amp, amp), flb1))
        self._fl = np.zeros((2, fla.size))
        self._fx = np.zeros(NFX)
        P[P_XTRA] = 1.0 if (P[P_TRJS] != 0.0 or P[P_TRJSET] != 0.0 or amp != 0.0) else 0.0
        self._nz2_per_frame = 2 * fla.size + 2 if P[P_XTRA] else 0
        self.rng2 = np.random.default_rng([seed, 13])
        """The second random stream (the published profile's slow mechanisms)."""
        self._nz2_none = np.zeros(0)
        self.P = P

        # hysteresis (Iwan elements)
        yl = np.asarray(p["hysteresis.yield_rad"], dtype=float)
        on = p["hysteresis.enabled"]
        self.hyth = yl.copy()
        self.hyk = (np.full(len(yl), p["hysteresis.stiffness_fraction"] * k_nominal / len(yl))
                    if on else np.zeros(len(yl)))
        self.slip = np.zeros(len(yl))

        # five DOF matrices and exact discretization
        inert = p["suspension.inertia_kg_m2"]
        self.M5 = np.array([P[P_SUSM], P[P_SUSM], inert[0], inert[1], inert[2]])
        w = 2 * np.pi * np.asarray(p["suspension.freq_hz"])
        kd = self.M5 * w ** 2
        K5 = np.diag(kd)
        pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
        for (i, j), rho in zip(pairs, p["suspension.coupling"]):
            K5[i, j] = K5[j, i] = rho * math.sqrt(kd[i] * kd[j])
        if np.min(np.linalg.eigvalsh(K5)) <= 0:
            raise ValueError("suspension.coupling makes the stiffness matrix non-positive")
        self.K5 = K5
        self.C5 = np.diag(diss * self.M5 * w / np.asarray(p["suspension.q"]))
        self.Minv5 = 1.0 / self.M5
        A = np.zeros((15, 15))
        A[0:5, 5:10] = np.eye(5)
        A[5:10, 0:5] = -self.K5 / self.M5[:, None]
        A[5:10, 5:10] = -self.C5 / self.M5[:, None]
        A[5:10, 10:15] = np.diag(self.Minv5)
        E = expm(A * self.dt)
        self.Phi5 = np.ascontiguousarray(E[0:10, 0:10])
        self.Gam5 = np.ascontiguousarray(E[0:10, 10:15])
        self._modal()

        # state
        self.x = np.zeros(NX)
        self.env = np.zeros(NE)
        self.env[E_MT] = self.env[E_MTT] = m_test0
        self.env[E_MA] = self.env[E_MAT] = m_aux0
        self.env[E_TEMP] = self.env[E_TSET] = p["temperature.initial_C"]
        self.env[E_P] = p["pressure.initial_Pa"]
        signs = self.rng.choice([-1.0, 1.0], size=2)
        self.env[E_DRM] = sw("current_drift") * signs[0] * p["main_source.drift_rel_per_h"] / 3600.0
        self.env[E_DRC] = sw("current_drift") * signs[1] * p["cm_source.drift_rel_per_h"] / 3600.0
        self.W = np.zeros(6)
        self.env[E_JW] = J0
        _wheel_matrices(J0, P, self.W)
        self.act = np.zeros(NA)
        self.act[A_CME] = 1.0
        self.last_actuators = Nist4Actuators()
        self._out1 = np.zeros((1, NS))
        self._tr1 = np.zeros((1, NT))
        self._normals = NormalDraws()

        # DAC scalings
        self._dac = {}
        for src in ("main_source", "cm_source"):
            cb, fb = p[f"{src}.coarse_bits"], p[f"{src}.fine_bits"]
            lsb = p[f"{src}.full_scale_A"] / 2 ** (cb - 1)
            self._dac[src] = (cb, fb, lsb, lsb * p[f"{src}.fine_span_lsb"] / 2 ** fb)
        self._dbits = p["damping_coils.dac_bits"]
        self._damp_A_per_code = (p["damping_coils.dac_full_scale_V"] / 2 ** (self._dbits - 1)
                                 * p["damping_coils.driver_A_per_V"])
        self._hbits = p["theta_z.dac_bits"]
        self._hv_V_per_code = p["theta_z.full_scale_V"] / 2 ** (self._hbits - 1)
        self._quantize_dac = p["noise.dac_quantization"]

    def _modal(self) -> None:
        """Real block-diagonal (modal) form of the exact five-DOF step: Phi5 = T Lam T^-1."""
        from scipy.linalg import cdf2rdf
        lam, V = np.linalg.eig(self.Phi5)
        # eig returns complex-conjugate pairs adjacent; cdf2rdf turns them into real 2x2 blocks
        wr, vr = cdf2rdf(lam, V)
        T = vr
        Tinv = np.linalg.inv(T)
        blk = Tinv @ self.Phi5 @ T
        Lam = np.zeros((10, 2))
        for b in range(5):
            Lam[2 * b:2 * b + 2, :] = blk[2 * b:2 * b + 2, 2 * b:2 * b + 2]
        resid = blk.copy()
        for b in range(5):
            resid[2 * b:2 * b + 2, 2 * b:2 * b + 2] = 0
        if np.max(np.abs(resid)) > 1e-9:
            raise ValueError("five-DOF step matrix is not diagonalizable into 2x2 blocks")
        self.T5 = np.ascontiguousarray(T)
        self.T5inv = np.ascontiguousarray(Tinv)
        self.Lam5 = np.ascontiguousarray(Lam)
        self.Geta = np.ascontiguousarray(Tinv @ self.Gam5)
        P = self.P
        c = np.array([P[P_CX], P[P_CY], P[P_CTX], P[P_CTY], P[P_CTZ]])
        R = np.zeros((5, 10))
        R[0, 0:5] = c
        R[1, 5:10] = c
        for k in range(3):
            ang = P[P_P0 + k]
            R[2 + k, 0] = -math.sin(ang)
            R[2 + k, 1] = math.cos(ang)
            R[2 + k, 4] = P[P_RP]
        self.Rq = np.ascontiguousarray(R @ T)
        self.eta = np.zeros(10)

    def _sync_eta(self) -> None:
        self.eta[:] = self.T5inv @ self.x[Q0:Q0 + 10]

    # ---------------------------------------------------------------- actuator decoding
    def _code(self, name: str, v: Any, bits: int) -> float:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ActuatorError(name, v, "DAC code must be a number")
        f = float(v)
        if not math.isfinite(f):
            raise ActuatorError(name, v, "non-finite DAC code")
        if self._quantize_dac and f != math.floor(f):
            raise ActuatorError(name, v, "DAC code must be an integer")
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if f < lo or f > hi:
            raise ActuatorError(name, v, f"outside the {bits}-bit range [{lo}, {hi}]")
        return f

    @staticmethod
    def _bool(name: str, v: Any) -> float:
        if not isinstance(v, (bool, np.bool_)):
            raise ActuatorError(name, v, "relay state must be a bool")
        return 1.0 if v else 0.0

    def _decode_fast(self, a: Nist4Actuators) -> np.ndarray | None:
        """:meth:`decode` of a frame of plain ints and bools (what the bus adapter holds), in a
        few microseconds instead of tens; None for anything else (:meth:`decode` then checks
        it the long way, with its error texts). The same operations in the same order as
        :meth:`decode` and :meth:`_derive`, so the same bits. The damping and HV parts are
        kept with the tuple they came from: the same tuple object (immutable; the adapter makes
        a new one per command, and the decimated loops send one every few frames) gives them
        again without a check."""
        c = self._dec_consts
        if c is None:
            c = self._dec_consts = self._decode_constants()
        m_lo, m_hi, mf_lo, mf_hi, m_lsb, m_flsb, c_lo, c_hi, cf_lo, cf_hi, c_lsb, c_flsb = c[0]
        mc, mf, cc, cf = a.main_coarse, a.main_fine, a.cm_coarse, a.cm_fine
        if not (type(mc) is int and type(mf) is int and type(cc) is int and type(cf) is int
                and m_lo <= mc <= m_hi and mf_lo <= mf <= mf_hi
                and c_lo <= cc <= c_hi and cf_lo <= cf <= cf_hi):
            return None
        fm, cme, de, hve = a.main_force_mode, a.cm_enable, a.damping_enable, a.hv_enable
        if not (type(fm) is bool and type(cme) is bool and type(de) is bool and type(hve) is bool):
            return None
        damp, hv = a.damping, a.hv
        cached = self._damp_cache
        if cached is not None and cached[0] is damp and cached[1] is de:
            idc, derived = cached[2], cached[3]
        else:
            d_lo, d_hi, d_per, damp_k, kv, kh, rd = c[1]
            if type(damp) is not tuple or len(damp) != 6:
                return None
            for v in damp:
                if type(v) is not int or not d_lo <= v <= d_hi:
                    return None
            idc = [float(v) * d_per for v in damp]
            # _derive: the damping coils' summed vertical force and generalized forces
            fvs = q0 = q1 = q2 = q3 = q4 = 0.0
            if de:
                for k in range(3):
                    cs, sn = damp_k[k]
                    fv = kv * idc[2 * k]
                    fh = kh * idc[2 * k + 1]
                    fvs += fv
                    q0 += -sn * fh
                    q1 += cs * fh
                    q2 += rd * sn * fv
                    q3 += -rd * cs * fv
                    q4 += rd * fh
            derived = [fvs, q0, q1, q2, q3, q4]
            self._damp_cache = (damp, de, idc, derived)
        cached = self._hv_cache
        if cached is not None and cached[0] is hv:
            volts = cached[1]
        else:
            h_lo, h_hi, h_per, hv_lim = c[2]
            if type(hv) is not tuple or len(hv) != 6:
                return None
            for v in hv:
                if type(v) is not int or not h_lo <= v <= h_hi:
                    return None
            volts = [max(-hv_lim, min(hv_lim, float(v) * h_per)) for v in hv]
            self._hv_cache = (hv, volts)
        act = [float(mc) * m_lsb + float(mf) * m_flsb, float(cc) * c_lsb + float(cf) * c_flsb]
        act += idc
        act += volts
        act += (1.0 if fm else 0.0, 1.0 if cme else 0.0, 1.0 if de else 0.0, 1.0 if hve else 0.0)
        act += derived
        return np.array(act, dtype=float)

    _damp_cache: tuple | None = None
    _hv_cache: tuple | None = None
    _dec_consts: tuple | None = None

    def _decode_constants(self) -> tuple:
        """Code ranges and scalings of :meth:`_decode_fast`: (sources, damping, HV); Python
        floats (the same values: numpy scalars would make every operation slow). ``P`` is
        fixed after ``__init__``."""
        P = self.P
        src: list = []
        for name in ("main_source", "cm_source"):
            cb, fb, lsb, flsb = self._dac[name]
            src += [-(2 ** (cb - 1)), 2 ** (cb - 1) - 1, -(2 ** (fb - 1)), 2 ** (fb - 1) - 1, lsb, flsb]
        damp = (-(2 ** (self._dbits - 1)), 2 ** (self._dbits - 1) - 1, self._damp_A_per_code,
                tuple((math.cos(P[P_D0 + k]), math.sin(P[P_D0 + k])) for k in range(3)),
                float(P[P_KV]), float(P[P_KH]), float(P[P_RD]))
        hv = (-(2 ** (self._hbits - 1)), 2 ** (self._hbits - 1) - 1, self._hv_V_per_code,
              float(P[P_HVLIM]))
        return tuple(src), damp, hv

    def decode(self, a: Nist4Actuators) -> np.ndarray:
        """Validate a command frame and return the physical actuator vector (A, V, flags)."""
        if type(a) is Nist4Actuators:
            act = self._decode_fast(a)
            if act is not None:
                return act
        if not isinstance(a, Nist4Actuators):
            raise ActuatorError("frame", a, "expected a Nist4Actuators")
        act = np.zeros(NA)
        for src, cf, ff, idx in (("main_source", "main_coarse", "main_fine", A_IM),
                                 ("cm_source", "cm_coarse", "cm_fine", A_IC)):
            cb, fb, lsb, flsb = self._dac[src]
            act[idx] = self._code(cf, getattr(a, cf), cb) * lsb + self._code(ff, getattr(a, ff), fb) * flsb
        for nm, arr, n in (("damping", a.damping, 6), ("hv", a.hv, 6)):
            try:
                seq = list(arr)
            except TypeError:
                raise ActuatorError(nm, arr, "expected a sequence of 6 DAC codes") from None
            if len(seq) != n:
                raise ActuatorError(nm, arr, f"expected {n} DAC codes")
            for k, v in enumerate(seq):
                if nm == "damping":
                    act[A_ID + k] = self._code(f"damping[{k}]", v, self._dbits) * self._damp_A_per_code
                else:
                    vv = self._code(f"hv[{k}]", v, self._hbits) * self._hv_V_per_code
                    act[A_HV + k] = max(-self.P[P_HVLIM], min(self.P[P_HVLIM], vv))
        act[A_FM] = self._bool("main_force_mode", a.main_force_mode)
        act[A_CME] = self._bool("cm_enable", a.cm_enable)
        act[A_DE] = self._bool("damping_enable", a.damping_enable)
        act[A_HVE] = self._bool("hv_enable", a.hv_enable)
        self._derive(act)
        return act

    def _derive(self, act: np.ndarray) -> None:
        """Fill the derived damping-coil entries (A_FVS, A_QD..) of a physical actuator vector."""
        P = self.P
        act[A_FVS] = 0.0
        act[A_QD:A_QD + 5] = 0.0
        if act[A_DE]:
            for k in range(3):
                ang = P[P_D0 + k]
                cs, sn = math.cos(ang), math.sin(ang)
                fv = P[P_KV] * act[A_ID + 2 * k]
                fh = P[P_KH] * act[A_ID + 2 * k + 1]
                act[A_FVS] += fv
                act[A_QD + 0] += -sn * fh
                act[A_QD + 1] += cs * fh
                act[A_QD + 2] += P[P_RD] * sn * fv
                act[A_QD + 3] += -P[P_RD] * cs * fv
                act[A_QD + 4] += P[P_RD] * fh

    def current_to_codes(self, current_A: float, source: str = "main") -> tuple[int, int]:
        """Nearest (coarse, fine) codes for a current (A); ``source`` = "main" or "cm"."""
        cb, fb, lsb, flsb = self._dac["main_source" if source == "main" else "cm_source"]
        c = int(round(current_A / lsb))
        c = max(-(2 ** (cb - 1)), min(2 ** (cb - 1) - 1, c))
        f = int(round((current_A - c * lsb) / flsb))
        f = max(-(2 ** (fb - 1)), min(2 ** (fb - 1) - 1, f))
        return c, f

    def codes_to_current(self, coarse: float, fine: float, source: str = "main") -> float:
        cb, fb, lsb, flsb = self._dac["main_source" if source == "main" else "cm_source"]
        return coarse * lsb + fine * flsb

    # ---------------------------------------------------------------- stepping
    def _advance(self, act: np.ndarray, n_frames: int, out: np.ndarray, tr: np.ndarray, rec: bool):
        def kernel(nz, used, n, out_n, tr_n):
            nz2 = self._nz2_none
            if self._nz2_per_frame:
                mark = self.rng2.bit_generator.state
                nz2 = self.rng2.standard_normal(n * self._nz2_per_frame)
            got = _run(self.x, self.eta, self.slip, self.env, act, self.P, self.hyk, self.hyth,
                       self.Lam5, self.Geta, self.T5, self.Rq, self.W, self._gphi, self._gL,
                       self._gc, nz, used, n, self.n_sub, out_n, tr_n, rec,
                       self._fl, self._fla, self._flb, self._fx, nz2)
            if self._nz2_per_frame and got != n:
                self.rng2.bit_generator.state = mark   # the call's frames are undone
            return got

        advance_in_chunks(self, n_frames, out, tr, rec, state=("x", "slip", "env", "W", "eta", "_fl", "_fx"),
                          per_tick=12, per_frame=15, tick_n=int(self.P[P_TICKN]),
                          env_tick=lambda: float(self.env[E_TICK]), kernel=kernel)

    def step_frame(self, actuators: Nist4Actuators) -> Nist4Sensors:
        """Hold ``actuators`` over one frame (``n_sub`` integration steps); return the frame."""
        act = self.decode(actuators)
        self.act = act
        self.last_actuators = actuators
        self._advance(act, 1, self._out1, self._tr1, False)
        return Nist4Sensors.from_row(self._out1[0])

    def run(self, actuators: Nist4Actuators, n_frames: int, record_truth: bool = True) -> Nist4Block:
        """Block variant: hold ``actuators`` for ``n_frames`` frames in one compiled call."""
        act = self.decode(actuators)
        self.act = act
        self.last_actuators = actuators
        out = np.zeros((n_frames, NS))
        tr = np.zeros((n_frames, NT)) if record_truth else self._tr1  # (not written unrecorded)
        self._advance(act, n_frames, out, tr, record_truth)
        return Nist4Block(out, tr if record_truth else None)

    def run_seconds(self, actuators: Nist4Actuators, seconds: float, record_truth: bool = True) -> Nist4Block:
        return self.run(actuators, int(round(seconds * self.params["sim.frame_rate_hz"])), record_truth)

    # ---------------------------------------------------------------- events
    def place_mass(self, on: bool = True) -> None:
        """Lower (on=True) or lift (on=False) the 1 kg test mass; see :meth:`_lift`."""
        self._lift(E_MT, self.params["main_side.test_mass_kg"] if on else 0.0)

    def remove_mass(self) -> None:
        self.place_mass(False)

    def lift_aux(self, on_pan: bool = False) -> None:
        """Auxiliary mass: on_pan=False lifts it off the pan (velocity -> force mode),
        on_pan=True puts it back; see :meth:`_lift`."""
        self._lift(E_MA, self.params["main_side.aux_mass_kg"] if on_pan else 0.0)

    def _lift(self, channel: int, target_kg: float) -> None:
        """One mass-lift event: the load of ``channel`` (E_MT test mass, E_MA auxiliary mass)
        goes linearly from where it is to ``target_kg`` in ``main_side.lift_ramp_s``, whatever
        the mass (the servo feeds ``delta_m g`` forward over the same duration, its
        ``lift_ramp_s``), so simultaneous events add up to one ramp of their net load."""
        self.env[channel + 1] = target_kg
        self.env[E_RMT + (channel - E_MT) // 2] = abs(target_kg - self.env[channel]) * self.P[P_RATE]

    def set_temperature(self, temp_C: float, immediate: bool = True) -> None:
        """Set the magnet temperature setpoint; ``immediate`` also jumps the magnet to it
        (else it relaxes with temperature.tau_s)."""
        if not math.isfinite(temp_C):
            raise ValueError("temperature must be finite")
        self.env[E_TSET] = temp_C - self.P[P_TDRIFT] * self.env[E_T]
        if immediate:
            self.env[E_TEMP] = temp_C

    def set_pressure(self, pressure_Pa: float) -> None:
        if not (math.isfinite(pressure_Pa) and pressure_Pa >= 0):
            raise ValueError("pressure must be finite and >= 0")
        self.env[E_P] = pressure_Pa

    _EXT = {"z": 0, "x": 1, "y": 2, "theta_x": 3, "theta_y": 4, "theta_z": 5}

    def inject_force(self, dof: str, value: float, duration_s: float) -> None:
        """Apply a constant external force (N, dof "z" at the coil, "x", "y") or torque (N m,
        "theta_x/y/z") for ``duration_s`` (rounded to whole integration steps, >= 1)."""
        if dof not in self._EXT or not math.isfinite(value) or not math.isfinite(duration_s) or duration_s < 0:
            raise ValueError(f"bad disturbance {dof!r} {value!r} {duration_s!r}")
        self.env[E_EXT:E_EXT + 6] = 0.0
        self.env[E_EXT + self._EXT[dof]] = value
        self.env[E_EXTN] = max(1, int(round(duration_s / self.dt)))

    def inject_impulse(self, dof: str, impulse: float) -> None:
        """Impulse (N s or N m s) delivered within one integration step."""
        self.inject_force(dof, impulse / self.dt, self.dt)

    # ---------------------------------------------------------------- state access
    def truth(self) -> Nist4Truth:
        x, env, r = self.x, self.env, self.P[P_R]
        dx = np.zeros(NX)
        emf, im, ic, bl = _deriv(x, self.slip, env.copy(), self.act, self.P, self.hyk, self.K5,
                                 self.C5, self.Minv5, dx)
        return Nist4Truth(env[E_T], x[TH], x[OM], r * x[TH], r * x[OM], im, ic, x[IM], x[IC],
                          x[Q0:Q0 + 5].copy(), x[QD0:QD0 + 5].copy(), bl, emf, env[E_VCOIL],
                          env[E_TEMP], env[E_AG:E_AG + 3].copy(), env[E_MT], env[E_MA], env[E_TAUH],
                          self.slip.copy())

    def set_state(self, theta: float | None = None, omega: float | None = None,
                  i_main: float | None = None, i_cm: float | None = None,
                  q=None, qd=None) -> None:
        """Set true states (tests). Currents are the regulated source currents (A)."""
        for v, i in ((theta, TH), (omega, OM), (i_main, IM), (i_cm, IC)):
            if v is not None:
                self.x[i] = v
        if q is not None:
            self.x[Q0:Q0 + 5] = q
        if qd is not None:
            self.x[QD0:QD0 + 5] = qd
        if q is not None or qd is not None:
            self._sync_eta()

    def mechanisms(self) -> dict[str, float]:
        """The published profile's slow mechanisms as of the last frame: ``tilt_x_rad``,
        ``tilt_y_rad`` (the floor's tilt tipping gravity along x and y), ``trajectory_sweep_rel``
        and ``trajectory_set_rel`` (the current sweep's and set's fractional errors of the
        velocity-mode induced voltage). All zero when the profile has none of them."""
        return {"tilt_x_rad": float(self._fx[FX_TILTX]), "tilt_y_rad": float(self._fx[FX_TILTY]),
                "trajectory_sweep_rel": float(self._fx[FX_SWEEP]),
                "trajectory_set_rel": float(self._fx[FX_SET])}

    def bl(self, z: float, current_A: float = 0.0, temp_C: float | None = None) -> float:
        t = self.env[E_TEMP] if temp_C is None else temp_C
        return _bl_parts(z, current_A, t, self.P)[0]

    def derivative(self, act: np.ndarray | None = None) -> np.ndarray:
        """Continuous-time state derivative at the current state (14 states, see ``state``)."""
        dx = np.zeros(NX)
        _deriv(self.x, self.slip, self.env, self.act if act is None else act, self.P, self.hyk,
               self.K5, self.C5, self.Minv5, dx)
        return dx

    @property
    def state(self) -> np.ndarray:
        """(theta, omega, i_main_reg, i_cm_reg, x, y, tx, ty, tz, vx, vy, wx, wy, wz)."""
        return self.x.copy()

    @property
    def inertia(self) -> float:
        r = self.P[P_R]
        return self.P[P_JW] + (self.P[P_MTARE] + self.env[E_MT] + self.env[E_MA] + self.P[P_MCS]) * r * r

    def energy(self) -> float:
        """Total energy (J) for constant currents and plate voltages: wheel and five-DOF kinetic
        + elastic energy, gravity of the unbalanced loads, coil/motor magnetic co-energy
        (-I Phi), plate co-energy, hysteresis element energy. Conserved without dissipation,
        noise, events and end stops."""
        x, P, env = self.x, self.P, self.env
        r, th = P[P_R], x[TH]
        z = r * th
        im, ic = _flowing(x, env, self.act, P)
        # Phi_z(z) = int_0^z Bl dz (polynomial)
        s = (P[P_BL0] * (1 + P[P_ALPHA] * im * 1e3 + P[P_BETA] * (im * 1e3) ** 2)
             * (1 + P[P_TC] * (env[E_TEMP] - P[P_TREF])))
        a = P[P_A1:P_A6 + 1]
        u = z / P[P_ZS]
        phi_z = s * (z + P[P_ZS] * sum(a[n] * u ** (n + 2) / (n + 2) for n in range(6)))
        bl, _ = _bl_parts(z, im, env[E_TEMP], P)
        c = np.array([P[P_CX], P[P_CY], P[P_CTX], P[P_CTY], P[P_CTZ]])
        q, qd = x[Q0:Q0 + 5], x[QD0:QD0 + 5]
        e = 0.5 * self.inertia * x[OM] ** 2 + 0.5 * P[P_K] * th ** 2
        e += np.sum(0.5 * self.hyk * (th - self.slip) ** 2)
        g = P[P_G] + env[E_AG + 2]
        e += r * th * g * (P[P_MTARE] + env[E_MT] + env[E_MA] - P[P_MCS])
        e -= im * (phi_z + bl * (c @ q))
        e += P[P_BLCM] * ic * r * th
        e += 0.5 * qd @ (self.M5 * qd) + 0.5 * q @ self.K5 @ q
        act = self.act
        if act[A_DE]:
            for k in range(3):
                ang = P[P_D0 + k]
                fv, fh = P[P_KV] * act[A_ID + 2 * k], P[P_KH] * act[A_ID + 2 * k + 1]
                gen = np.array([-math.sin(ang) * fh, math.cos(ang) * fh, P[P_RD] * math.sin(ang) * fv,
                                -P[P_RD] * math.cos(ang) * fv, P[P_RD] * fh])
                e -= gen @ q + fv * z
        if act[A_HVE] and env[E_P] < P[P_PLIM]:
            for k in range(3):
                ang = P[P_P0 + k]
                sk = P[P_RP] * q[4] - q[0] * math.sin(ang) + q[1] * math.cos(ang)
                ca = EPS0 * P[P_AREA] / (P[P_GAP] - sk)
                cb = EPS0 * P[P_AREA] / (P[P_GAP] + sk)
                e -= 0.5 * act[A_HV + 2 * k] ** 2 * ca + 0.5 * act[A_HV + 2 * k + 1] ** 2 * cb
        return float(e)

    def linearize(self, actuators: Nist4Actuators | None = None):
        """See :func:`linearize`."""
        return linearize(self, actuators)


# =============================================================================================
# linearization
# =============================================================================================
STATE_NAMES = ["theta", "omega", "i_main", "i_cm", "x", "y", "theta_x", "theta_y", "theta_z",
               "vx", "vy", "wx", "wy", "wz"]
INPUT_NAMES = ["i_main_cmd", "i_cm_cmd", "i_damp0v", "i_damp0h", "i_damp1v", "i_damp1h",
               "i_damp2v", "i_damp2h", "v_hv0a", "v_hv0b", "v_hv1a", "v_hv1b", "v_hv2a", "v_hv2b",
               "agx", "agy", "agz", "f_ext_z"]
OUTPUT_NAMES = ["z_ifo0", "z_ifo1", "z_ifo2", "z_cm", "psd0x", "psd0y", "psd1x", "psd1y",
                "psd_tx", "psd_ty", "emf", "i_main", "i_cm", "z"]


def _outputs(plant: Nist4Plant, x: np.ndarray, env: np.ndarray, act: np.ndarray) -> np.ndarray:
    P = plant.P
    r = P[P_R]
    y = np.zeros(len(OUTPUT_NAMES))
    for i in range(3):
        ang = P[P_I0 + i]
        y[i] = r * x[TH] + P[P_RIFO] * math.sin(ang) * x[Q0 + 2] - P[P_RIFO] * math.cos(ang) * x[Q0 + 3]
    y[3] = -r * x[TH]
    g2 = 2 * P[P_PSDG]
    for k in range(2):
        ang = P[P_B0 + k]
        y[4 + 2 * k] = g2 * (x[Q0] - P[P_PSDR] * math.sin(ang) * x[Q0 + 4])
        y[5 + 2 * k] = g2 * (x[Q0 + 1] + P[P_PSDR] * math.cos(ang) * x[Q0 + 4])
    y[8] = g2 * P[P_LARM] * x[Q0 + 2]
    y[9] = g2 * P[P_LARM] * x[Q0 + 3]
    dx = np.zeros(NX)
    slip = plant.slip
    emf, im, ic, bl = _deriv(x, slip, env, act, P, plant.hyk, plant.K5, plant.C5, plant.Minv5, dx)
    y[10] = emf
    y[11] = im
    y[12] = ic
    y[13] = r * x[TH]
    return y


def linearize(plant: Nist4Plant, actuators: Nist4Actuators | None = None, eps: float | None = None):
    """Small-signal continuous-time model about the plant's current state and ``actuators``
    (default: the last command), as a python-control ``StateSpace`` with named states
    (:data:`STATE_NAMES`), inputs (:data:`INPUT_NAMES`: commanded currents A, damping-coil
    currents A, electrode volts V, ground acceleration m/s^2, external z force N) and outputs
    (:data:`OUTPUT_NAMES`: retroreflector heights m, PSD volts, U in V, currents A, z in m).

    Hysteresis elements are taken as stuck (valid for excursions below the smallest yield).
    Noise, drift and quantization are excluded. Central differences on the compiled model."""
    import control

    act0 = plant.act.copy() if actuators is None else plant.decode(actuators)
    if not act0[A_FM]:
        act0[A_FM] = 0.0
    x0 = plant.x.copy()
    env = plant.env.copy()
    env[E_AG:E_AG + 3] = 0.0
    env[E_INM] = env[E_INC] = 0.0
    env[E_DRM] = env[E_DRC] = 0.0
    env[E_EXTN] = 1.0
    env[E_EXT:E_EXT + 6] = 0.0
    n, m = NX, len(INPUT_NAMES)

    def f(x, u):
        act = act0.copy()
        act[A_IM] += u[0]
        act[A_IC] += u[1]
        act[A_ID:A_ID + 6] += u[2:8]
        act[A_HV:A_HV + 6] += u[8:14]
        plant._derive(act)
        e = env.copy()
        e[E_AG:E_AG + 3] = u[14:17]
        e[E_EXT] = u[17]
        dx = np.zeros(NX)
        _deriv(x, plant.slip, e, act, plant.P, plant.hyk, plant.K5, plant.C5, plant.Minv5, dx)
        return dx, _outputs(plant, x, e, act)

    u0 = np.zeros(m)
    xs = np.maximum(np.abs(x0), 1.0) * 1e-6
    xs[IM] = xs[IC] = 1e-7
    us = np.full(m, 1e-6)
    us[8:14] = 1e-2
    A = np.zeros((n, n))
    C = np.zeros((len(OUTPUT_NAMES), n))
    B = np.zeros((n, m))
    D = np.zeros((len(OUTPUT_NAMES), m))
    for j in range(n):
        dp = np.zeros(n)
        dp[j] = xs[j]
        fp, yp = f(x0 + dp, u0)
        fm, ym = f(x0 - dp, u0)
        A[:, j] = (fp - fm) / (2 * xs[j])
        C[:, j] = (yp - ym) / (2 * xs[j])
    for j in range(m):
        du = np.zeros(m)
        du[j] = us[j]
        fp, yp = f(x0, du)
        fm, ym = f(x0, -du)
        B[:, j] = (fp - fm) / (2 * us[j])
        D[:, j] = (yp - ym) / (2 * us[j])
    # the derivative has no hysteresis-restoring term for the slip; stuck elements act as springs
    # (already in _nl_forces via -k_i (theta - s_i)). Current states with the relay open are frozen.
    return control.ss(A, B, C, D, states=STATE_NAMES, inputs=INPUT_NAMES, outputs=OUTPUT_NAMES,
                      name="nist4")
