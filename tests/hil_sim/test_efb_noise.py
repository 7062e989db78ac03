"""The EFB's published noise mechanisms (hil_sim/efb.toml [profiles.published]), each against an
independent calculation, and the published null with the paper's loop and with ours
(services/bench/efb_fidelity.py) against the loops' transfer functions (python-control)."""

import asyncio
import math

import numpy as np
import pytest
from scipy import signal

from kibble.hil_sim import efb as E
from kibble.hil_sim.params import load_params
from kibble.services.bench import efb_fidelity as F

FS = 1000.0


def _held_at_null(plant: E.EfbPlant) -> E.EfbActuators:
    """The amplifier on at the unloaded null's voltage (the link floats at z = 0)."""
    p = plant.params
    v = p["capacitor.surface_potential_V"] + math.sqrt(p["linkage.tare_force_N"] / plant.kappa())
    act = E.EfbActuators(hv_code=plant.volts_to_code(v), hv_to_main=True, hv_enable=True)
    plant.set_state(v_amp=act.hv_code * plant._V_per_code)
    return act


def _run(overrides: dict, seconds: float, seed: int = 4) -> tuple[E.EfbPlant, E.EfbBlock]:
    plant = E.EfbPlant(seed=seed, noise="off", overrides=overrides)
    return plant, plant.run_seconds(_held_at_null(plant), seconds)


def _force_on_link(plant: E.EfbPlant, block: E.EfbBlock) -> np.ndarray:
    """The force (N) the truth does not account for, frame by frame: m dv/dt + k z + c v minus
    the electrostatic, preload, load and hysteresis forces."""
    P = plant.P
    a = np.diff(block.col("vz")) * FS
    z, v = block.col("z")[1:], block.col("vz")[1:]
    known = (block.col("f_main") + block.col("f_aux") - P[E.P_TARE]
             - block.col("m_load") * P[E.P_G] + block.col("f_hyst"))[1:]
    return P[E.P_M] * a + P[E.P_K] * z + P[E.P_C] * v - known


def _ifo_error(plant: E.EfbPlant, block: E.EfbBlock) -> np.ndarray:
    """Interferometer reading minus the true z (m)."""
    lam = plant.params["interferometer.wavelength_m"]
    s = block.sensors
    return (s[:, E.S_FR] + s[:, E.S_PH] / (2 * math.pi)) * lam / 2 - block.col("z")


def test_quiet_takes_no_normals_of_the_published_mechanisms():
    """Quiet is today's model: the published mechanisms switched off draw nothing, so the
    published plant with every new switch off computes the quiet plant's bits."""
    assert E.EfbPlant(noise="quiet").P[E.P_NX] == 0 and E.EfbPlant(noise="off").P[E.P_NX] == 0
    new = {f"noise.{n}": False for n in ("tilt", "residual_gas", "surface_potential_drift", "ifo_flicker",
                                         "ifo_quantization", "thermal_drift")}
    quiet, pub = E.EfbPlant(seed=9, noise="quiet"), E.EfbPlant(seed=9, noise="published", overrides=new)
    a, b = quiet.run(_held_at_null(quiet), 3000), pub.run(_held_at_null(pub), 3000)
    assert np.array_equal(a.sensors, b.sensors) and np.array_equal(a.truth, b.truth)
    assert E.EfbPlant(noise="published").P[E.P_NX] == E.NX_FIXED + len(E.flicker_poles(1e-3, 10.0))


def test_tilt_force_has_the_gauss_markov_spectrum_through_the_travel_misalignment():
    p = load_params("efb", noise="published")
    sig, tau = p["tilt.std_rad"], p["tilt.tau_s"]
    plant, block = _run({"noise.tilt": True, "tilt.std_rad": sig}, 1600.0)
    force = _force_on_link(plant, block)
    f, psd = signal.welch(signal.decimate(force, 100, ftype="fir"), fs=FS / 100, nperseg=2048)
    k = p["linkage.mass_kg"] * p["sim.g_m_per_s2"] * math.sqrt(2 * 7.3e-7)   # seed 000 Table 1
    expected = k ** 2 * 4 * sig ** 2 * tau / (1 + (2 * np.pi * f * tau) ** 2)
    for lo, hi in ((0.01, 0.05), (0.05, 0.2), (0.2, 1.0)):
        band = (f >= lo) & (f < hi)
        assert np.mean(psd[band]) == pytest.approx(np.mean(expected[band]), rel=0.2), (lo, hi)


def test_residual_gas_force_is_white_at_four_kT_beta():
    pressure = 0.05   # below hv_source's 0.1 Pa arming limit
    plant = E.EfbPlant(seed=5, noise="off", overrides={"noise.residual_gas": True})
    plant.set_pressure(pressure)
    force = _force_on_link(plant, plant.run_seconds(_held_at_null(plant), 200.0))
    f, psd = signal.welch(force, fs=FS, nperseg=4096)
    p = plant.params
    kt = 1.380649e-23 * (p["temperature.initial_C"] + 273.15)
    m0 = 0.018 / 6.02214076e23
    beta = pressure * p["gas.area_m2"] * math.sqrt(32 * m0 / (math.pi * kt))
    band = (f > 1.0) & (f < 100.0)
    assert np.mean(psd[band]) == pytest.approx(4 * kt * beta, rel=0.05)


def test_interferometer_flicker_is_one_over_f_at_its_level():
    a = load_params("efb", noise="published")["interferometer.flicker_asd_m"]
    plant, block = _run({"noise.ifo_flicker": True, "interferometer.flicker_asd_m": a}, 2000.0)
    err = signal.decimate(_ifo_error(plant, block), 100, ftype="fir")
    f, psd = signal.welch(err, fs=FS / 100, nperseg=8192)
    band = (f >= 0.01) & (f <= 1.0)
    slope, icpt = np.polyfit(np.log10(f[band]), np.log10(psd[band]), 1)
    assert slope == pytest.approx(-1.0, abs=0.1)
    assert 10 ** icpt == pytest.approx(a ** 2, rel=0.2)   # the PSD at 1 Hz


def test_interferometer_reads_in_steps_of_its_least_significant_bit():
    plant = E.EfbPlant(seed=4, noise="off", overrides={"noise.ifo_quantization": True})
    act = _held_at_null(plant)
    plant.set_state(vz=1e-8)   # drifting through ~1000 steps
    block = plant.run_seconds(act, 20.0)
    lsb = plant.params["interferometer.resolution_m"]
    assert lsb == pytest.approx(1e-7 * 2e-3)   # seed 000: delta L / L = 1e-7 over the 2 mm travel
    err = _ifo_error(plant, block)
    assert np.max(np.abs(err)) <= lsb / 2 * (1 + 1e-6)
    assert np.std(err) == pytest.approx(lsb / math.sqrt(12), rel=0.05)


def test_surface_potential_walks_at_its_rate():
    w = load_params("efb", noise="published")["capacitor.surface_potential_walk_V_sqrt_s"]
    plant, block = _run({"noise.surface_potential_drift": True, "capacitor.surface_potential_walk_V_sqrt_s": w},
                        400.0)
    v_s = block.col("v_out") - np.sqrt(2 * block.col("f_main") / block.col("dcdz"))
    steps = np.diff(v_s[::1000])   # 1 s increments
    assert np.var(steps) == pytest.approx(w ** 2 * 1.0, rel=0.15)


def test_thermal_drift_follows_the_lagged_temperature_ramp():
    """The balance temperature relaxes to a ramping set point (temperature.tau_s), the link's
    follows it (thermal.link_tau_s): a ramp through two first-order lags."""
    r, t1, t2 = 10.0 / 3600, 1000.0, 100.0
    over = {"noise.thermal_drift": True, "noise.temperature": True, "temperature.fluct_std_K": 0.0,
            "temperature.sensor_noise_K": 0.0, "temperature.drift_K_per_h": 10.0, "temperature.tau_s": t1,
            "thermal.link_tau_s": t2}
    plant, block = _run(over, 300.0)
    t = block.col("t")[1:]
    link = r * (t - (t1 + t2) + (t1 ** 2 * np.exp(-t / t1) - t2 ** 2 * np.exp(-t / t2)) / (t1 - t2))
    p = plant.params
    assert np.allclose(_ifo_error(plant, block)[1:], p["thermal.ifo_path_m_per_K"] * link, rtol=2e-3, atol=1e-13)
    assert np.allclose(_force_on_link(plant, block), p["thermal.force_coeff_N_per_K"] * link, rtol=2e-3, atol=1e-12)


def test_the_default_loop_margins_against_python_control():
    """Our EFB loop (services/instruments/efb.toml) is the 1 Hz, 50 deg design of the same rules as the
    paper's (efbfidelity.loop_gains); python-control's margins of both, as the README states."""
    ours = F.default_loop_gains()
    for name, value in F.loop_gains(1.0).items():
        assert ours[name] == pytest.approx(value, rel=0.01), name
    fig = F.loop_figures(ours)
    assert fig.stable and fig.phase_margin_deg == pytest.approx(50.0, abs=1.0)
    assert fig.crossover_hz == pytest.approx(1.0, rel=0.01) and fig.bandwidth_hz == pytest.approx(1.67, rel=0.02)
    # a PID on a nearly free mass is conditionally stable: the gain may fall 4.66x (phase
    # crossover 0.32 Hz) before the loop rings up
    assert fig.gain_margin == pytest.approx(1 / 4.66, rel=0.02)
    assert fig.phase_crossover_hz == pytest.approx(0.319, rel=0.02)
    paper = F.loop_figures(F.loop_gains(F.PAPER_CROSSOVER_HZ))
    assert paper.stable and paper.phase_margin_deg == pytest.approx(50.0, abs=1.0)
    assert paper.crossover_hz == pytest.approx(0.1, rel=0.01)


def test_published_null_with_the_paper_loop_and_ours_as_predicted():
    """Shortened records (the paper's loop 100 s, ours 60 s, where the prediction's own scatter
    between seeds is ~20 % and ~26 %): each within 1.5x of the python-control prediction for
    that window; the prediction for the bench's 600 s is within 1.5x of seed 000's 1 nm with
    the paper's loop and <= 0.5 nm (docs/architecture.md section 7) with ours."""
    paper = F.loop_gains(F.PAPER_CROSSOVER_HZ)
    ours = F.default_loop_gains()

    async def both():
        # 45 s to settle: the paper's loop takes up the 1 mg feedforward's error (the servo's
        # V_s = 0 against the plant's 40 mV: ~3e-9 N) with its integral's ~8 s time constant
        a = await F.null_nm(paper, noise="published", seconds=100.0, seed=1, settle_s=45.0)
        b = await F.null_nm(None, noise="published", seconds=60.0, seed=1, settle_s=5.0)
        return a, b

    paper_nm, ours_nm = asyncio.run(both())
    for got, gains, seconds in ((paper_nm, paper, 100.0), (ours_nm, ours, 60.0)):
        expected = F.predicted_null_nm(gains, seconds)
        assert expected["scatter_rel"] < 0.3
        assert expected["total_nm"] / 1.5 <= got <= 1.5 * expected["total_nm"], (got, expected)
    long_paper = F.predicted_null_nm(paper, 600.0)["total_nm"]
    assert F.NULL_PUBLISHED_NM / 1.5 <= long_paper <= 1.5 * F.NULL_PUBLISHED_NM
    assert F.predicted_null_nm(ours, 600.0)["total_nm"] <= 0.5
