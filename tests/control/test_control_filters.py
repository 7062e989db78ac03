"""Filter design (Tustin with prewarp) and the LIGO-style filter module kernel."""

import math

import control as ct
import numpy as np
import pytest

from kibble.control import filters as F
from kibble.control import pid as P

FS = 1000.0
DT = 1 / FS


def _h(sos, f_hz):
    z = np.exp(2j * np.pi * f_hz / FS)
    return (sos[0] + sos[1] / z + sos[2] / z**2) / (1 + sos[3] / z + sos[4] / z**2)


def _c2d(num, den, f_prewarp):
    d = ct.c2d(ct.tf(num, den), DT, method="tustin", prewarp_frequency=2 * np.pi * f_prewarp)
    n, m = np.ravel(d.num[0][0]), np.ravel(d.den[0][0])
    n = np.concatenate([np.zeros(m.size - n.size), n, np.zeros(3 - m.size)])  # powers of z^-1
    m = np.concatenate([m, np.zeros(3 - m.size)])
    return np.concatenate([n / m[0], m[1:] / m[0]])


def test_designs_equal_python_control_tustin_prewarp():
    w = 2 * np.pi * 40.0
    np.testing.assert_allclose(F.lowpass_sos(40.0, 2.0, FS),
                               _c2d([w * w], [1, w / 2.0, w * w], 40.0), rtol=1e-12, atol=1e-14)
    w = 2 * np.pi * 31.0
    np.testing.assert_allclose(F.notch_sos(31.0, 10.0, FS),
                               _c2d([1, 0, w * w], [1, w / 10.0, w * w], 31.0), rtol=1e-12, atol=1e-14)
    wz, wp = 2 * np.pi * 2.0, 2 * np.pi * 20.0
    np.testing.assert_allclose(F.lead_lag_sos(2.0, 20.0, FS),
                               _c2d([1 / wz, 1], [1 / wp, 1], math.sqrt(40.0)), rtol=1e-12, atol=1e-14)


def test_prewarped_frequencies_land_exactly():
    # notch: zero at the resonance (exactly, thanks to prewarping) and unit gain far away
    assert abs(_h(F.notch_sos(123.0, 5.0, FS), 123.0)) < 1e-12
    assert abs(_h(F.notch_sos(123.0, 5.0, FS), 0.0)) == pytest.approx(1.0, abs=1e-12)
    assert abs(_h(F.notch_sos(123.0, 5.0, FS, depth_db=40.0), 123.0)) == pytest.approx(0.01, rel=1e-9)
    # low-pass: gain q at the corner, phase -90 deg
    h = _h(F.lowpass_sos(200.0, 3.0, FS), 200.0)
    assert abs(h) == pytest.approx(3.0, rel=1e-9)
    assert np.angle(h, deg=True) == pytest.approx(-90.0, abs=1e-9)
    # lead: maximum phase lead asin((p - z)/(p + z)) at sqrt(fz fp)
    h = _h(F.lead_lag_sos(10.0, 90.0, FS), 30.0)
    assert np.angle(h) == pytest.approx(math.asin(80.0 / 100.0), rel=1e-9)
    assert abs(_h(F.highpass_sos(5.0, 0.7071, FS), 0.0)) < 1e-12
    with pytest.raises(ValueError):
        F.lowpass_sos(600.0, 0.7, FS)


def _module(mask=0b11, **kw):
    sos = np.stack([F.lowpass_sos(50.0, 0.7071, FS), F.notch_sos(20.0, 4.0, FS)])[None]
    par = F.fm_params(1, dt_s=DT, mask=mask, **kw)
    return par, sos, F.fm_state(par, 2)


def test_gain_and_offset_ramp_linearly_and_end_exactly():
    par, sos, st = _module(mask=0, ramp_s=0.1)
    io = P.io_block(300, 1)
    io[:, 0, P.IO_Y] = 1.0
    F.fm_run(par, sos, st, io[:10])
    par[0, F.GAIN] = 3.0
    par[0, F.OFFSET] = 0.5
    F.fm_run(par, sos, st, io[10:])
    out = io[:, 0, P.IO_U]
    assert np.all(out[:10] == 1.0)
    expect = (1.0 + 2.0 * np.arange(1, 101) / 100) * (1.0 + 0.5 * np.arange(1, 101) / 100)
    np.testing.assert_allclose(out[10:110], expect, rtol=1e-12)
    assert np.all(out[109:] == 3.0 * 1.5)
    assert np.max(np.abs(np.diff(out))) < 0.1  # no step


def test_switches_limit_hold_monitors_excitation_and_history_reset():
    par, sos, st = _module(limit=0.5)
    io = P.io_block(3000, 1)
    io[:, 0, P.IO_Y] = 1.0
    io[:, 0, P.IO_EXC] = 0.25
    F.fm_run(par, sos, st, io[:1000])
    assert io[999, 0, P.IO_U] == 0.5                                    # limited (1.25 > 0.5)
    assert st[0, F.MON_IN1] == 1.0 and st[0, F.MON_IN2] == 1.25
    par[0, F.LIMIT] = math.inf
    F.fm_run(par, sos, st, io[1000:2000])
    assert io[1999, 0, P.IO_U] == pytest.approx(1.25, rel=1e-9)         # DC gain 1 of both stages
    par[0, F.HOLD] = 1.0
    F.fm_run(par, sos, st, io[2000:2020])
    assert np.all(io[2000:2020, 0, P.IO_U] == io[1999, 0, P.IO_U])
    par[0, F.HOLD] = 0.0
    par[0, F.IN_ON] = 0.0
    F.fm_run(par, sos, st, io[2020:3000])
    assert st[0, F.MON_IN2] == 0.25 and st[0, F.MON_IN1] == 1.0
    assert io[2999, 0, P.IO_U] == pytest.approx(0.25, rel=1e-6)        # only the excitation
    par[0, F.OUT_ON] = 0.0
    one = P.io_block(1, 1)
    F.fm_run(par, sos, st, one)
    assert one[0, 0, P.IO_U] == 0.0
    assert np.any(st[0, F.NFS:] != 0.0)
    F.fm_reset_history(st)
    assert np.all(st[0, F.NFS:] == 0.0)


def test_stage_switching_and_nan_hold():
    par, sos, st = _module(mask=0b01)
    rng = np.random.default_rng(0)
    io = P.io_block(500, 1)
    io[:, 0, P.IO_Y] = rng.standard_normal(500)
    io[100, 0, P.IO_Y] = np.nan
    F.fm_run(par, sos, st, io)
    # only stage 0 engaged: equals the single section; the NaN sample repeats the output and
    # leaves the history untouched (the section sees the sequence without that sample)
    x = np.delete(io[:, 0, P.IO_Y], 100)
    y = np.empty_like(x)
    F.sos_run(sos[0, :1].copy(), np.zeros((1, 2)), x, y)
    out = io[:, 0, P.IO_U]
    assert out[100] == out[99]
    np.testing.assert_allclose(np.delete(out, 100), y, rtol=0, atol=1e-12)
    assert st[0, F.FM_N_HOLD] == 1.0
    assert np.all(st[0, F.NFS + 2:] == 0.0)                             # stage 1 off: cleared


def test_sos_run_matches_python_control():
    sos = np.stack([F.lowpass_sos(50.0, 0.7071, FS), F.notch_sos(20.0, 4.0, FS)])
    x = np.random.default_rng(1).standard_normal(2000)
    y = np.empty_like(x)
    F.sos_run(sos, np.zeros((2, 2)), x, y)
    t = np.arange(x.size) * DT
    ref = x
    for c in sos:
        ref = ct.forced_response(ct.tf(c[:3], [1.0, c[3], c[4]], DT), t, ref).outputs
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-10)
