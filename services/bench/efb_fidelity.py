"""The EFB's null beside the published one (issue 13; seed 000 section 3.1: "the average
position within a 0.1 Hz bandwidth is held within approximately 1 nm from the null position").

Measured the paper's way: the 1 mg artifact loaded, force mode, the RMS of the true link z
(``sim/truth``) low-passed to 0.1 Hz (:func:`kibble.services.harness.scenarios.efb_null`), on the
in-process stack (:class:`~kibble.services.harness.inprocess.InProcessStack`: the real daemons and the
plant, 1 kHz) with the plant's noise profile ``noise``, twice:

* the paper's loop (``fidelity_efb_null_nm``): seed 000 gives no gains and no bandwidth for its
  position loop, only the 0.1 Hz bandwidth the null is stated in and that the loop's gain is
  reduced before the voltage is measured (section 4.2.1). Its loop here is our servo's PID
  designed by the same rules as our own (:func:`loop_gains`: python-control, 50 deg phase
  margin, integral zero at 1/5, derivative filter at 5x the crossover, one sample of delay)
  with its unity-gain crossover at that 0.1 Hz (:data:`PAPER_CROSSOVER_HZ`);
* our loop as ``kibble up --sim efb`` configures it (``efb_null_rms_nm``; 1 Hz crossover,
  services/instruments/efb.toml), which docs/architecture.md section 7 holds to <= 0.5 nm.

:func:`predicted_null_nm` is the same figure from the loop's transfer functions and the
mechanisms' spectra (python-control), the check the simulation is held against.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Mapping

import control as ct
import numpy as np
from scipy import signal

from kibble.control import design as D
from kibble.control import pid as P
from kibble.hil_sim.params import DEFAULT_NOISE, Params, load_params
from kibble.services.harness import scenarios as S
from kibble.services.harness.inprocess import InProcessStack
from kibble.services.runtime.service import load_config
from kibble.services.daemons.servo import Servo
from kibble.services.instruments import instrument

__all__ = ["NULL_PUBLISHED_NM", "PAPER_CROSSOVER_HZ", "RATE_HZ", "efb_force_plant", "loop_gains",
           "default_loop_gains", "loop_figures", "predicted_null_nm", "efb_null_fidelity"]

NULL_PUBLISHED_NM = 1.0
"""Seed 000 section 3.1: the null held to about 1 nm in a 0.1 Hz bandwidth."""
PAPER_CROSSOVER_HZ = 0.1
"""The paper's loop's unity-gain frequency (estimate: the 0.1 Hz of seed 000's statement)."""
PHASE_MARGIN_DEG = 50.0
RATE_HZ = 1000.0
DELAY_SAMPLES = 1
BAND_HZ = 0.1
GAIN_NAMES = ("kp_n_per_m", "ki_n_per_m_s", "kd_n_s_per_m", "derivative_filter_s")


def efb_force_plant(params: Params) -> ct.TransferFunction:
    """Force on the floating link (N) to its position (m): the linkage ``1 / (m s^2 + c s + k)``
    (damping at the nominal stiffness, as the plant) times the amplifier's first-order lag."""
    m, k = params["linkage.mass_kg"], params["linkage.stiffness_N_per_m"]
    c = math.sqrt(params["linkage.nominal_stiffness_N_per_m"] * m) / params["linkage.q"]
    return ct.tf([1.0], [m, c, k]) * ct.tf([1.0], [params["hv.tau_s"], 1.0])


def loop_gains(crossover_hz: float, params: Params | None = None) -> dict[str, float]:
    """The servo's EFB PID (its parameter names) for ``crossover_hz``, designed as the default
    loop is (:func:`kibble.control.design.propose_pid`)."""
    params = params if params is not None else load_params("efb", noise="quiet")
    g = D.propose_pid(efb_force_plant(params), 1.0 / RATE_HZ, crossover_hz, PHASE_MARGIN_DEG,
                      delay_samples=DELAY_SAMPLES, integral_ratio=5.0, derivative_filter_ratio=5.0)
    return {"kp_n_per_m": g["kp"], "ki_n_per_m_s": g["ki_per_s"], "kd_n_s_per_m": g["kd_s"],
            "derivative_filter_s": g["tf_s"]}


def default_loop_gains() -> dict[str, float]:
    """The EFB servo's gains as ``kibble up --sim efb`` configures them (services/instruments/efb.toml over
    the servo's defaults)."""
    cfg = load_config("servo", instrument("efb").config, restore=False)
    return {name: float(cfg.params.get(name, Servo.__dict__[name].default)) for name in GAIN_NAMES}


def _c_y(gains: Mapping[str, float]) -> ct.TransferFunction:
    row = P.pid_params(1, dt_s=1.0 / RATE_HZ, kp=gains["kp_n_per_m"], ki_per_s=gains["ki_n_per_m_s"],
                       kd_s=gains["kd_n_s_per_m"], tf_s=gains["derivative_filter_s"])[0]
    return D.pid_tfs(row)[1]


def loop_figures(gains: Mapping[str, float], params: Params | None = None) -> D.LoopFigures:
    """Margins, crossover and bandwidth of the EFB force loop with ``gains`` (python-control)."""
    params = params if params is not None else load_params("efb", noise="quiet")
    return D.loop_analysis(D.loop_gain(efb_force_plant(params), _c_y(gains), DELAY_SAMPLES))


def predicted_null_nm(gains: Mapping[str, float], seconds: float,
                      params: Params | None = None) -> dict[str, float]:
    """The null's 0.1 Hz-bandwidth RMS (nm) from the loop and the published mechanisms' spectra:
    the tilt force through ``S P`` (``S = 1 / (1 + L)``), the interferometer's white and
    flicker noise through ``T = L / (1 + L)`` (the loop follows its sensor), each weighted by
    the zero-phase 4th-order Butterworth of :func:`~kibble.services.harness.scenarios.band_rms` and the
    removal of the record's mean (``1 - sinc^2(f T)``). The other mechanisms (residual gas,
    thermal force, surface potential, the quiet profile's noises) are below 2 % of these and
    left out. Returns ``{"force_nm", "sensor_nm", "total_nm", "scatter_rel"}``, the last the
    expected relative standard deviation of the RMS between records of ``seconds`` (from the
    spectrum of the band-passed z, as for a Gaussian process)."""
    p = params if params is not None else load_params("efb", noise="published")
    dt = 1.0 / RATE_HZ
    f = np.logspace(-5, math.log10(0.499 * RATE_HZ), 40000)
    # evaluated term by term: the products of the discrete polynomials lose every digit near
    # z = 1 (the linkage's 0.007 Hz resonance), where z - 1 is taken as expm1(j w dt)
    zm1 = np.expm1(2j * np.pi * f * dt)
    c = (gains["kp_n_per_m"] + gains["ki_n_per_m_s"] * dt * (zm1 + 1.0) / zm1
         + gains["kd_n_s_per_m"] * zm1 / (gains["derivative_filter_s"] * zm1 + dt * (zm1 + 1.0)))
    s = 2j * np.pi * f
    m, k = p["linkage.mass_kg"], p["linkage.stiffness_N_per_m"]
    damping = math.sqrt(p["linkage.nominal_stiffness_N_per_m"] * m) / p["linkage.q"]
    Pf = 1.0 / (m * s ** 2 + damping * s + k)
    # the amplifier's lag, the sample of delay and the zero-order hold's half sample
    Lf = c * Pf / (p["hv.tau_s"] * s + 1.0) * np.exp(-s * dt * (DELAY_SAMPLES + 0.5))
    sens, comp = 1.0 / (1.0 + Lf), Lf / (1.0 + Lf)
    sos = signal.butter(4, BAND_HZ, fs=RATE_HZ, output="sos")
    _, hb = signal.sosfreqz(sos, worN=f, fs=RATE_HZ)
    w = np.abs(hb) ** 4 * (1.0 - np.sinc(f * seconds) ** 2)
    sig = p["tilt.std_rad"] if p["noise.tilt"] else 0.0
    tau = p["tilt.tau_s"]
    kt = p["linkage.mass_kg"] * p["sim.g_m_per_s2"] * p["tilt.travel_angle_rad"]
    s_force = kt ** 2 * 4.0 * sig ** 2 * tau / (1.0 + (2 * np.pi * f * tau) ** 2)
    a = p["interferometer.flicker_asd_m"] if p["noise.ifo_flicker"] else 0.0
    f_lo, f_hi = p["interferometer.flicker_band_hz"]
    white = p["interferometer.noise_asd_m"] if p["noise.interferometer"] else 0.0
    s_sensor = a ** 2 / np.clip(f, f_lo, None) * (f <= f_hi) + white ** 2
    s_force_z = np.abs(sens * Pf) ** 2 * s_force * w
    s_sensor_z = np.abs(comp) ** 2 * s_sensor * w
    force, sensor = float(np.trapezoid(s_force_z, f)), float(np.trapezoid(s_sensor_z, f))
    # a Gaussian record's mean square over T scatters by (1/T) int S^2 df (one-sided S)
    scatter = 0.5 * math.sqrt(float(np.trapezoid((s_force_z + s_sensor_z) ** 2, f)) / seconds) / (force + sensor)
    return {"force_nm": math.sqrt(force) * 1e9, "sensor_nm": math.sqrt(sensor) * 1e9,
            "total_nm": math.sqrt(force + sensor) * 1e9, "scatter_rel": scatter}


async def null_nm(gains: Mapping[str, float] | None, *, noise: str, seconds: float, seed: int,
                  settle_s: float) -> float:
    """The 1 mg-loaded null (nm, 0.1 Hz bandwidth, true z) with the servo's ``gains`` (None: the
    default loop's) on the in-process EFB stack."""
    params = {"servo": dict(gains)} if gains is not None else None
    stack = InProcessStack("efb", rate_hz=RATE_HZ, seed=seed, params=params, noise=noise)
    try:
        await stack.start()
        res = await S.efb_null(stack, seconds, settle_s=settle_s)
    finally:
        stack.close()
    return res["null_rms_m"] * 1e9


def efb_null_fidelity(noise: str = DEFAULT_NOISE, seconds: float = 600.0, seed: int = 102,
                      settle_s: float = 60.0) -> dict[str, Any]:
    """The EFB null figures (nm): ``fidelity_efb_null_nm`` (the paper's loop, crossover
    :data:`PAPER_CROSSOVER_HZ`), ``fidelity_efb_null_nm_published`` (seed 000: 1.0) and
    ``efb_null_rms_nm`` (our default loop), each over ``seconds`` of record after ``settle_s``
    before and after the artifact goes on; with them the predictions of
    :func:`predicted_null_nm`, their expected scatter between seeds (``*_scatter_rel``, relative
    standard deviation: 8 % with the paper's loop and 14 % with ours at 600 s, 26 % each at 60 s)
    and the two loops' crossovers."""
    if not (seconds > 0 and math.isfinite(seconds)) or not (settle_s >= 0 and math.isfinite(settle_s)):
        raise ValueError(f"seconds must be > 0 and settle_s >= 0 (got {seconds!r}, {settle_s!r})")
    params = load_params("efb", noise=noise)
    paper, ours = loop_gains(PAPER_CROSSOVER_HZ), default_loop_gains()

    async def both() -> tuple[float, float]:
        a = await null_nm(paper, noise=noise, seconds=seconds, seed=seed, settle_s=settle_s)
        b = await null_nm(None, noise=noise, seconds=seconds, seed=seed, settle_s=settle_s)
        return a, b

    paper_nm, ours_nm = asyncio.run(both())
    pred_paper, pred_ours = predicted_null_nm(paper, seconds, params), predicted_null_nm(ours, seconds, params)
    return {"fidelity_efb_null_nm": paper_nm, "fidelity_efb_null_nm_published": NULL_PUBLISHED_NM,
            "efb_null_rms_nm": ours_nm,
            "fidelity_efb_null_predicted_nm": pred_paper["total_nm"],
            "fidelity_efb_null_scatter_rel": pred_paper["scatter_rel"],
            "efb_null_predicted_nm": pred_ours["total_nm"], "efb_null_scatter_rel": pred_ours["scatter_rel"],
            "efb_null_paper_crossover_hz": loop_figures(paper).crossover_hz,
            "efb_null_crossover_hz": loop_figures(ours).crossover_hz,
            "efb_null_seconds": float(seconds)}
