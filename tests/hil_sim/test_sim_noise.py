"""Noise models of the plants: Welch PSDs match the configured levels (within 20 % over the
band), ground vibration sits above the Peterson NLNM, drifts have the configured rates."""

import math

import numpy as np
import pytest
from scipy.signal import welch

from kibble.hil_sim.efb import EfbActuators, EfbPlant
from kibble.hil_sim.nist4 import Nist4Actuators, Nist4Plant
from kibble.hil_sim.noise import ground_block, ground_filter, ground_psd, nlnm_accel_psd
from kibble.hil_sim.testing import QUIET_EFB, QUIET_NIST4, band_mean_psd, fringes_to_m

FS = 1000.0  # frame rate


def _only(quiet, *names):
    return quiet | {f"noise.{n}": True for n in names} | {"hysteresis.enabled": False}


def _bands(lo, hi, n):
    e = np.geomspace(lo, hi, n + 1)
    return list(zip(e[:-1], e[1:]))


def test_ground_generator_psd_matches_model_and_exceeds_nlnm():
    gp = dict(peak_hz=0.215, peak_q=1.5, peak_asd=1.2e-7, floor_asd=6e-9)
    tick = 1 / 250.0
    phi, L, c, fstd = ground_filter(tick_s=tick, **gp)
    rng = np.random.default_rng(11)
    a = ground_block(np.zeros(2), phi, L, c, fstd, rng.standard_normal((250 * 2400, 3)))
    f, pxx = welch(a, fs=250.0, nperseg=2 ** 14)
    # analytic model above NLNM everywhere in 0.1-10 Hz
    fg = np.geomspace(0.1, 10, 400)
    assert np.all(ground_psd(fg, **gp) >= nlnm_accel_psd(fg))
    for lo, hi in _bands(0.1, 10.0, 10):
        meas = band_mean_psd(f, pxx, lo, hi)
        model = band_mean_psd(f, ground_psd(f, **gp), lo, hi)
        assert meas == pytest.approx(model, rel=0.2), (lo, hi)
        assert meas >= 0.95 * band_mean_psd(f, nlnm_accel_psd(np.maximum(f, 1e-3)), lo, hi)


def test_ground_in_plant():
    p = Nist4Plant(_only(QUIET_NIST4, "ground"), seed=12)
    b = p.run(Nist4Actuators(), 300_000)
    pr = p.params
    gp = dict(peak_hz=pr["ground.peak_hz"], peak_q=pr["ground.peak_q"], peak_asd=pr["ground.peak_asd"],
              floor_asd=pr["ground.floor_asd"])
    for name in ("agx", "agz"):
        f, pxx = welch(b.col(name), fs=FS, nperseg=2 ** 14)
        for lo, hi in _bands(0.2, 10.0, 5):
            expected = band_mean_psd(f, ground_psd(f, **gp), lo, hi)
            assert band_mean_psd(f, pxx, lo, hi) == pytest.approx(expected, rel=0.2)
    # the ground drives the x pendulum: it moves
    assert np.std(b.col("x")) > 0


def test_interferometer_noise():
    p = Nist4Plant(_only(QUIET_NIST4, "interferometer"), seed=13)
    b = p.run(Nist4Actuators(), 60_000, record_truth=False)
    lam = p.params["interferometer.wavelength_m"]
    asd = p.params["interferometer.noise_asd_m"]
    for i in range(4):
        d = fringes_to_m(b.sensors[:, i], b.sensors[:, 4 + i], lam)
        f, pxx = welch(d, fs=FS, nperseg=4096)
        assert band_mean_psd(f, pxx, 1, 400) == pytest.approx(asd ** 2, rel=0.2)
    # fringe count is an integer, phase in [0, 2 pi)
    assert np.all(b.sensors[:, 0:4] == np.round(b.sensors[:, 0:4]))
    assert np.all((b.sensors[:, 4:8] >= 0) & (b.sensors[:, 4:8] < 2 * np.pi))


def test_psd_noise():
    p = Nist4Plant(_only(QUIET_NIST4, "psd") | {"noise.adc_quantization": True}, seed=14)
    b = p.run(Nist4Actuators(), 60_000, record_truth=False)
    asd = p.params["psd.noise_asd_V"]
    for k in range(6):
        f, pxx = welch(b.sensors[:, 8 + k], fs=FS, nperseg=4096)
        assert band_mean_psd(f, pxx, 1, 400) == pytest.approx(asd ** 2, rel=0.2)


def test_current_source_noise():
    p = Nist4Plant(_only(QUIET_NIST4, "current"), seed=15)
    lsb = p._dac["main_source"][2]
    b = p.run(Nist4Actuators(main_coarse=round(6.9e-3 / lsb), main_force_mode=True), 60_000)
    r_std = p.params["dvm.std_resistor_ohm"]
    i = b.sensors[:, 14] / r_std
    f, pxx = welch(i - np.mean(i), fs=FS, nperseg=4096)
    tick_hz = FS * p.ticks_per_frame
    model = p.params["main_source.noise_asd_A"] ** 2 * np.sinc(f / tick_hz) ** 2  # noise held per tick
    assert band_mean_psd(f, pxx, 1, 40) == pytest.approx(band_mean_psd(f, model, 1, 40), rel=0.2)
    assert np.sqrt(band_mean_psd(f, pxx, 1, 40)) == pytest.approx(100e-12, rel=0.2)


def test_dvm_and_monitor_noise():
    p = Nist4Plant(_only(QUIET_NIST4, "dvm"), seed=16)
    b = p.run(Nist4Actuators(), 60_000, record_truth=False)
    for col, key in ((14, "dvm.noise_asd_V"), (15, "monitor.noise_asd_V"), (16, "monitor.noise_asd_V")):
        f, pxx = welch(b.sensors[:, col], fs=FS, nperseg=4096)
        assert band_mean_psd(f, pxx, 1, 400) == pytest.approx(p.params[key] ** 2, rel=0.2)


def test_current_drift_rate():
    p = Nist4Plant(_only(QUIET_NIST4, "current_drift"), seed=17)
    lsb = p._dac["main_source"][2]
    p.run(Nist4Actuators(main_coarse=round(6.9e-3 / lsb), main_force_mode=True), 100_000, record_truth=False)
    tr = p.truth()
    rel = tr.i_main / tr.i_main_reg - 1
    assert abs(rel) == pytest.approx(p.params["main_source.drift_rel_per_h"] * tr.t / 3600, rel=1e-6)


def test_magnet_temperature_fluctuation_drift_and_bl_coefficient():
    p = Nist4Plant(_only(QUIET_NIST4, "temperature") | {"temperature.tau_s": 5.0}, seed=18)
    b = p.run(Nist4Actuators(), 400_000)
    t, temp = b.col("t"), b.col("magnet_temperature")
    drift = p.params["temperature.drift_K_per_h"] / 3600
    t0 = p.params["temperature.initial_C"]
    resid = temp - (t0 + drift * (t - 5.0))
    assert np.std(resid[50_000:]) == pytest.approx(p.params["temperature.fluct_std_K"], rel=0.2)
    assert np.mean(resid[50_000:]) == pytest.approx(0.0, abs=3e-4)
    # Bl follows the magnet temperature with the seed coefficient
    q = Nist4Plant(QUIET_NIST4)
    bl0 = q.truth().bl
    q.set_temperature(q.params["temperature.initial_C"] + 1.0)
    assert q.truth().bl / bl0 - 1 == pytest.approx(q.params["coil.temp_coeff_per_K"], rel=1e-9)


def _efb_hold(p):
    v = p.params["capacitor.surface_potential_V"] + math.sqrt(p.params["linkage.tare_force_N"] / p.kappa())
    code = p.volts_to_code(v)
    p.set_state(v_amp=code * p._V_per_code)
    return EfbActuators(hv_code=code, hv_to_main=True, hv_enable=True)


def test_efb_noise_sources():
    p = EfbPlant(_only(QUIET_EFB, "interferometer", "hv", "dvm", "bridge"), seed=19)
    act = _efb_hold(p)
    b = p.run(act, 60_000)
    pr = p.params
    d = fringes_to_m(b.sensors[:, 0], b.sensors[:, 1], pr["interferometer.wavelength_m"]) - b.col("z")
    f, pxx = welch(d, fs=FS, nperseg=4096)
    assert band_mean_psd(f, pxx, 1, 400) == pytest.approx(pr["interferometer.noise_asd_m"] ** 2, rel=0.2)
    n_hv = b.col("v_out") - b.col("v_amp")
    f, pxx = welch(n_hv, fs=FS, nperseg=4096)
    model = pr["hv.noise_asd_V"] ** 2 * np.sinc(f / (FS * p.ticks_per_frame)) ** 2
    assert band_mean_psd(f, pxx, 1, 40) == pytest.approx(band_mean_psd(f, model, 1, 40), rel=0.2)
    f, pxx = welch(b.sensors[:, 2] - b.col("v_amp"), fs=FS, nperseg=4096)
    # DVM = frame average of the amplifier output (its held noise) + DVM white noise
    dvm_model = pr["dvm.noise_asd_V"] ** 2 + pr["hv.noise_asd_V"] ** 2 * np.sinc(f / (FS * p.ticks_per_frame)) ** 2
    assert band_mean_psd(f, pxx, 1, 40) == pytest.approx(band_mean_psd(f, dvm_model, 1, 40), rel=0.2)
    br = b.sensors[::1000, 3][1:]  # one reading per bridge period
    c = b.col("capacitance")[::1000][1:] * 1e12
    assert np.std(br - c) == pytest.approx(pr["bridge.noise_pF"], rel=0.25)
