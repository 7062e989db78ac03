"""The views' follower in process (no bus): the band-limited z, the display bins, and the
newest-frame receiver of a view without traces."""

from __future__ import annotations

import numpy as np

from kibble.bus_schema.codec import encode
from kibble.bus_schema.messages import DaqFrame, LoopFrame
from kibble.services.views.model import BAND_HZ, BusView, Trace, _NewestFrames, band_step, unmeasured


def test_band_limited_z_is_two_first_order_low_passes():
    """A unit step through :func:`band_step` against the analytic step response of two
    cascaded first-order low-passes, 1 - exp(-t/tau) (1 + t/tau), tau = 1 / (2 pi 0.1 Hz), on
    the hardware's clock whatever its frame period."""
    tau = 1.0 / (2 * np.pi * BAND_HZ)
    for dt, tol in ((1e-3, 1e-3), (1e-2, 1e-2)):
        state = [0.0, 0.0]
        t = np.arange(1, int(10.0 / dt) + 1) * dt
        y = np.array([band_step(state, 1.0, dt) for _ in t])
        assert np.max(np.abs(y - (1 - np.exp(-t / tau) * (1 + t / tau)))) < tol


def test_trace_bins_and_groups():
    """Samples averaged into bins of 1 / BIN_HZ by their UTC time, bins into groups of k,
    only whole groups, and the next call continues where the last stopped."""
    trace = Trace(("a", "b"), bin_hz=10.0, history_s=100.0)
    rng = np.random.default_rng(1)
    t = 1000.0 + np.sort(rng.uniform(0, 3.0, 600))
    a, b = rng.normal(size=600), rng.normal(size=600)
    for ti, ai, bi in zip(t, a, b):
        trace.add(ti, [ai, bi])
    bins = np.floor(t * 10).astype(int)
    closed = bins.max() - 1                       # the newest bin is still open
    last, times, cols = trace.series(-1, 4)
    assert last == (closed + 1) // 4 * 4 - 1
    groups = np.unique(bins[bins <= last] // 4)
    want = [np.mean([a[bins == k].mean() for k in range(g * 4, g * 4 + 4) if (bins == k).any()])
            for g in groups]
    assert np.allclose(cols["a"], want)
    assert np.allclose(times, (groups * 4 + 2) / 10.0)
    trace.add(t[-1] + 1.0, [5.0, 0.0])            # closes the open bin
    trace.add(t[-1] + 2.0, [0.0, 0.0])            # and this one
    again, times2, cols2 = trace.series(last, 4)
    assert again > last and times2[0] > times[-1]
    assert cols2["a"][-1] == 5.0                  # the group of the lone sample: its mean


def test_a_view_without_traces_decodes_the_newest_frame_of_each_topic_per_read():
    """``traces=False``: of one read's frames only the newest of each topic is decoded (the
    older ones counted as superseded), an undecodable one is counted and skipped, and no
    trace is built."""
    view = BusView("mqtt://127.0.0.1:1", "nist4", traces=False)
    rx = _NewestFrames(view)
    daq, servo = "kb/nist4/daq/frame", "kb/nist4/servo/frame"
    rx.batch_begin()
    for k in range(50):
        rx.message(daq, encode(DaqFrame(frame=k, t_utc_s=1e9 + k, coil_z_m=k * 1e-9)))
        rx.message(servo, encode(LoopFrame(frame=k, mode="force", values={"error_m": -k * 1e-9})))
    rx.batch_end()
    assert view.frames["daq"].msg.frame == 49 and view.frames["daq"].msg.coil_z_m == 49e-9
    assert view.frames["servo"].msg.values == {"error_m": -49e-9}
    assert (view.counters["frames"], view.counters["superseded"]) == (2, 98)
    assert view.traces == {}
    rx.batch_begin()
    rx.message(daq, encode(DaqFrame(frame=50, t_utc_s=1e9 + 50)))
    rx.message(daq, b"\xc1 not a frame")
    rx.batch_end()
    assert view.counters["undecodable"] == 1 and view.frames["daq"].msg.frame == 49


def test_what_an_instrument_does_not_measure_is_left_out():
    """The EFB's DAQ frame leaves the coil's x, y, tilts and the currents at zero: the
    dashboard's charts of them and the EPICS server's default PVs of them are left out; an
    instrument id that is not a model shows everything."""
    from kibble.services.views.epics import EpicsMirror

    efb = set(unmeasured("efb"))
    assert {"coil_x_m", "coil_theta_x_rad", "main_coil_current_a", "counter_mass_current_a"} <= efb
    assert not {"coil_z_m", "coil_z_0p1hz_m", "coil_voltage_v", "temperature_k"} & efb
    assert unmeasured("nist4") == [] and unmeasured("lab2-balance") == []
    names = set(EpicsMirror(BusView("mqtt://127.0.0.1:1", "efb", traces=False)).pvdb)
    assert "KB:efb:daq:frame:coil_z_m" in names and "KB:efb:servo:frame:force_n" in names
    assert "KB:efb:daq:frame:coil_x_m" not in names and "KB:efb:daq:frame:main_coil_current_a" not in names
    assert "KB:nist4:daq:frame:coil_x_m" in EpicsMirror(BusView("mqtt://127.0.0.1:1", "nist4", traces=False)).pvdb
