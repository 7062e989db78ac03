"""The pure analysis of ``kibble bench --only realtime`` and ``--only soak``
(kibble.services.bench.realtime), on made-up observer records (no stack, no broker; well under a
second). The soak itself, an hour of the whole stack, is run by hand (README, Benchmarks)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from kibble.services.bench import realtime as rtbench, suite as bench


def _commands(rows):
    """rows of (device, tag, hold, t) -> the observer's command arrays."""
    a = np.array(rows, dtype=float).reshape(-1, 4)
    return a[:, 0].astype(int), a[:, 1].astype(int), a[:, 2].astype(int), a[:, 3]


def test_latency_is_the_last_device_tagging_the_frame_and_hold_frames_cover():
    s_k = np.arange(10, 16)                         # frames 10..15
    s_t = 1.0 + 0.001 * np.arange(6)
    rows = []
    for i, k in enumerate(s_k):                     # device 0 answers every frame after 0.2 ms
        rows.append((0, k, 1, s_t[i] + 0.0002))
    for k in (10, 12, 14):                          # device 1 decimated by 2, after 0.5 ms
        rows.append((1, k, 2, s_t[k - 10] + 0.0005))
    rows.append((0, 12, 1, s_t[2] + 0.003))         # a later duplicate of frame 12: ignored
    rows.append((1, -1, 1, 0.5))                    # the hello: ignored
    d, k, h, t = _commands(rows)
    lat, answered = rtbench.frame_latencies(s_k, s_t, d, k, h, t, 2)
    np.testing.assert_allclose(lat, [5e-4, 2e-4, 5e-4, 2e-4, 5e-4, 2e-4], atol=1e-9)
    assert answered.all()
    summary = rtbench.latency_summary(lat)
    assert summary["max_ms"] == pytest.approx(0.5)
    assert summary["p50_ms"] == pytest.approx(0.35)


def test_unanswered_frames_and_missing_device():
    s_k = np.arange(0, 8)
    s_t = np.arange(8) * 1e-3
    # device 0 answers 0..5 only; device 1 holds 3 frames from 0 (covers 0..2) and from 4 (4..6)
    rows = [(0, k, 1, s_t[k] + 1e-4) for k in range(6)] + [(1, 0, 3, 1e-4), (1, 4, 3, 4e-3 + 1e-4)]
    d, k, h, t = _commands(rows)
    lat, answered = rtbench.frame_latencies(s_k, s_t, d, k, h, t, 2)
    assert answered.tolist() == [True, True, True, False, True, True, False, False]
    assert math.isnan(lat[7]) and np.isfinite(lat[:6]).all()
    # a device that never answered: nothing is answered
    _, answered = rtbench.frame_latencies(s_k, s_t, d, k, h, t, 3)
    assert not answered.any()


def test_frames_lost_events_states_and_own_cpu():
    assert rtbench.frames_lost(np.array([5, 6, 8, 9, 9, 12])) == 3
    assert rtbench.frames_lost(np.array([], dtype=int)) == 0
    events = [(1.0, "damping", "stale", "warning", 0, ""), (2.0, "damping", "safe", "alarm", 0, ""),
              (3.0, "hv_source", "trip", "alarm", 2, ""), (3.5, "servo", "audit", "info", 0, ""),
              (9.0, "damping", "trip", "alarm", 0, "")]
    assert rtbench.count_events(events, 0.5, 5.0) == {"trips": 4, "stale": 1}
    statuses = [(1.0, "servo", "running", True, 0, 0.0, 0.0),      # timing not filled: skipped
                (2.0, "servo", "running", True, 900, 40.0, 0.1),
                (3.0, "servo", "running", True, 900, 60.0, 0.1),
                (2.0, "damping", "armed", True, 0, 0.0, 0.0),
                (4.0, "damping", "safe", True, 0, 0.0, 0.0)]
    own = rtbench.own_cpu_us(statuses, 0.0, 5.0)
    assert own["servo"] == pytest.approx(50.0) and math.isnan(own["damping"])
    assert rtbench.end_states(statuses, ["damping", "theta_z"]) == {"damping": "safe", "theta_z": "?"}


def test_null_uses_the_truth_clock_and_cases_parse(monkeypatch):
    # scenarios.band_rms itself (and its python-control import, seconds) is not under test here:
    # what reaches it is
    seen = {}

    def band_rms(x, fs_hz, f_hz):
        seen.update(x=x, fs_hz=fs_hz, f_hz=f_hz)
        return float(np.sqrt(np.mean((x - x.mean()) ** 2)))

    monkeypatch.setattr(rtbench, "_band_rms", band_rms)
    fs = 50.0                                        # truth at 50 Hz, one sample lost, shuffled
    t = 100.0 + np.arange(0, 200.0, 1 / fs)
    z = 1e-9 * np.sin(2 * np.pi * 0.02 * (t - 100.0))
    keep = np.ones(t.size, bool)
    keep[1234] = False
    order = np.random.default_rng(0).permutation(int(keep.sum()))
    rms = rtbench.null_rms_m(t[keep][order], z[keep][order])
    assert seen["fs_hz"] == pytest.approx(fs) and seen["f_hz"] == 0.1
    assert seen["x"].size == t.size                  # the gap filled on the truth clock
    np.testing.assert_allclose(seen["x"], z, atol=1e-12)
    assert rms == pytest.approx(1e-9 / math.sqrt(2), rel=0.01)
    assert math.isnan(rtbench.null_rms_m(t[:10], z[:10]))
    assert rtbench.parse_cases("nist4:1000, efb:200") == [("nist4", 1000.0), ("efb", 200.0)]
    assert rtbench.parse_cases(None) == list(rtbench.DEFAULT_CASES)
    for bad in ("nist5:100", "nist4", "efb:fast", "efb:0"):
        with pytest.raises(ValueError):
            rtbench.parse_cases(bad)
    assert rtbench.case_prefix("nist4", 1000.0) == "rt_nist4_1000"
    assert "realtime" in bench.GROUPS and "realtime" not in bench.DEFAULT_GROUPS
    assert rtbench.proc_cpu_s(os.getpid()) >= 0.0
    assert math.isnan(rtbench.proc_cpu_s(None))


def test_soak_memory_growth_frames_by_connection_reconnects_and_the_recorded_gap():
    # memory: the slope after the first tenth of the window, of the last PID only
    samples = [(t, 7 if t < 50 else 8, 100.0 + (0.0 if t < 50 else 2.0 * (t - 50) / 3600.0))
               for t in range(0, 101, 5)]
    samples[1] = (5.0, 7, 1e6)                          # start-up: inside the first tenth
    assert rtbench.rss_growth_mb_per_h(samples, 0.0, 100.0) == pytest.approx(2.0)
    assert math.isnan(rtbench.rss_growth_mb_per_h(samples[:3], 0.0, 100.0))
    assert math.isnan(rtbench.rss_growth_mb_per_h([], 0.0, 100.0))
    assert rtbench.proc_rss_mb(os.getpid()) > 1.0 and math.isnan(rtbench.proc_rss_mb(None))

    # frames: lost within each connection of the observer, unseen between two
    spans = rtbench.episodes([(0.0, True), (10.0, False), (12.0, True)], t_end=20.0)
    assert spans == [(0.0, 10.0), (12.0, 20.0)]
    s_k = np.array([1, 2, 4, 5, 6, 9, 10, 12])  # 3 lost in the first, 7 and 8 unseen, 11 lost
    s_t = np.array([1.0, 2.0, 3.0, 4.0, 9.0, 13.0, 14.0, 15.0])
    assert rtbench.frames_lost_by_episode(s_k, s_t, spans) == (2, 2)

    # reconnects: online after a will or after a silence of 3 s; other services and times ignored
    def st(t, service, online=True):
        return (t, service, "armed", online, 0, 0.0, 0.0, 1, "armed", t)

    statuses = [st(t, "servo") for t in (1.0, 2.0, 3.0, 7.0, 8.0)]          # silent 3 -> 7
    statuses += [st(1.0, "daq"), st(2.0, "daq", online=False), st(2.5, "daq"), st(3.5, "daq")]
    statuses += [st(1.0, "other"), st(9.0, "other"), st(30.0, "servo")]
    assert rtbench.reconnects(statuses, ["servo", "daq", "sim"], 0.0, 10.0) == {
        "servo": 1, "daq": 1, "sim": 0}

    # the recorder's gap spans the outage and holds no record
    assert rtbench.gap_recorded([(0.5, 1.0), (9.0, 16.0)], [8.0, 9.0, 16.0, 17.0], 10.0, 15.0) == (
        True, 7.0, 0)
    assert rtbench.gap_recorded([(9.0, 16.0)], [9.0, 12.0], 10.0, 15.0) == (False, 7.0, 1)
    ok, gap_s, inside = rtbench.gap_recorded([(11.0, 16.0)], [], 10.0, 15.0)   # starts too late
    assert not ok and math.isnan(gap_s) and inside == 0

    assert "soak" in bench.GROUPS and "soak" not in bench.DEFAULT_GROUPS
    for bad in ({"seconds": 10}, {"case": "nist4:200,efb:200", "seconds": 60}):
        with pytest.raises(ValueError):
            rtbench.run_soak(**bad)


def test_the_hil_chain_bench_builds_its_stack_like_the_whole_one():
    """``kibble bench --only hil`` starts the chain (simulator, daq, servo, current_source) as
    the whole stack runs it at that rate: the hot path in one process (its spec lacked the
    ``together`` entry, and the bench died with a KeyError before it measured anything)."""
    from kibble.services.bench import loop as loopbench
    from kibble.services.harness import up

    chain = loopbench.ChainStack("nist4", clock="lockstep", rate_hz=loopbench.RATE_HZ)
    whole = up.Stack("nist4", clock="lockstep", rate_hz=loopbench.RATE_HZ)
    assert chain.processes == [("daq", "servo", "current_source")]
    assert chain.processes[0] in whole.processes
