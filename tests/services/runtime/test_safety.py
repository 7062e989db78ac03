"""The actuator guard: safe on boot, limits, slew, stale hold and ramp (whatever the request's
tag), watchdog trip and reset."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kibble.services.runtime.safety import ActuatorGuard, GuardConfig

DT = 1e-3


def make_guard(**kw) -> ActuatorGuard:
    cfg = dict(names=("a", "b"), limits=(1.0, 2.0), slew_per_s=(10.0, 10.0),
               safe_slew_per_s=(1.0, 1.0), frame_period_s=DT, stale_after_s=0.01, hold_s=0.05,
               watch_names=("z",), watchdog_rms=(1e-6,), watchdog_window_s=0.01)
    cfg.update(kw)
    return ActuatorGuard(GuardConfig(**cfg))


def test_safe_on_boot_ignores_requests_until_armed():
    g = make_guard()
    g.request(0, [0.5, 0.5])
    assert g.state == "safe"
    assert np.all(g.output(0) == 0.0)
    g.arm()
    out = [g.output(k)[0] for k in range(1, 100) if g.request(k, [0.5, 0.5]) is None]
    assert out[0] == pytest.approx(10.0 * DT)            # slew-limited first step
    assert np.all(np.diff(out) <= 10.0 * DT + 1e-15)
    assert out[-1] == 0.5


@pytest.mark.parametrize("values, text", [
    ([2.0, 0.0], "a: 2 is beyond the limit +-1"),
    ([0.0, float("nan")], "b: nan is not finite"),
    ([0.0], "expected 2 values"),
])
def test_bad_request_rejected_last_good_kept(values, text):
    g = make_guard()
    g.arm()
    g.request(0, [0.1, 0.2])
    with pytest.raises(ValueError, match=re.escape(text)):
        g.request(1, values)
    assert g.request_values.tolist() == [0.1, 0.2]


def test_stale_request_holds_then_ramps_to_zero_and_disarms():
    g = make_guard()
    g.arm()
    for k in range(200):
        g.request(k, [0.5, -1.0])
        g.output(k)
    held = g.out.copy()
    outs = np.array([g.output(k) for k in range(200, 1500)])
    age = np.arange(200, 1500) - 199
    # within stale_after + hold: held exactly
    holding = age * DT < 0.01 + 0.05
    assert np.all(outs[holding] == held)
    # then a ramp at the safe slew, never past zero, ending at zero and disarmed
    ramp = outs[~holding]
    assert np.all(np.abs(np.diff(ramp, axis=0)) <= 1.0 * DT + 1e-15)
    assert np.all(ramp[:, 0] >= 0) and np.all(ramp[:, 1] <= 0)
    assert np.all(ramp[-1] == 0.0)
    assert g.state == "safe"
    g.request(1500, [0.5, 0.5])
    assert np.all(g.output(1500) == 0.0)


def test_fresh_request_within_hold_resumes_without_step():
    g = make_guard()
    g.arm()
    for k in range(100):
        g.request(k, [0.3, 0.0])
        g.output(k)
    for k in range(100, 130):       # 30 ms without a request: stale, still holding
        g.output(k)
    assert g.stale and g.state == "armed"
    g.request(130, [0.3, 0.0])
    assert g.output(130)[0] == 0.3
    assert not g.stale


def test_a_request_tagged_in_the_future_still_goes_stale():
    """Issue 17 finding 1: a request tagged frame + 1e9 left the guard's input fresh forever
    (its age negative). Its age now runs from the frame it is applied at."""
    g = make_guard()
    g.arm()
    for k in range(100):
        g.request(k, [0.3, 0.0])
        g.output(k)
    g.request(100 + 10**9, [0.3, 0.0])
    for k in range(100, 200):       # no request since: stale after 10 ms, safe 50 ms later
        g.output(k)
    assert g.state == "safe" and g.stale


def test_watchdog_trips_on_excess_rms_and_needs_reset_then_arm():
    g = make_guard()
    g.arm()
    for k in range(50):
        g.request(k, [0.5, 0.0])
        assert g.observe([1e-7]) is None
        g.output(k)
    reason = None
    for k in range(50, 80):
        g.request(k, [0.5, 0.0])
        reason = reason or g.observe([5e-6])
        g.output(k)
    assert g.state == "tripped" and "z RMS" in reason
    with pytest.raises(ValueError, match="reset before arming"):
        g.arm()
    for k in range(80, 2000):
        g.request(k, [0.5, 0.0])
        g.output(k)
    assert g.at_zero
    g.reset()
    assert g.state == "safe"
    g.arm()
    assert g.state == "armed"


def test_watchdog_rms_matches_window():
    """A sine of amplitude A has RMS A/sqrt(2): trips just above the limit, not below."""
    for amp, trips in ((1.3e-6, False), (1.5e-6, True)):
        g = make_guard(watchdog_window_s=0.1)
        g.arm()
        t = np.arange(1000) * DT
        hit = [g.observe([amp * math.sin(2 * math.pi * 10 * tk)]) for tk in t]
        assert any(hit) == trips


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True, width=64),
                          st.floats(allow_nan=True, allow_infinity=True, width=64),
                          st.sampled_from(["req", "arm", "disarm", "skip", "reset"])),
                min_size=1, max_size=60))
def test_outputs_always_finite_and_within_limits(ops):
    g = make_guard()
    for k, (a, b, op) in enumerate(ops):
        if op == "req":
            try:
                g.request(k, [a, b])
            except ValueError:
                pass
        elif op == "arm" and g.state != "tripped":
            g.arm()
        elif op == "disarm":
            g.disarm()
        elif op == "reset":
            g.reset()
        g.observe([a])
        out = g.output(k)
        assert np.all(np.isfinite(out))
        assert abs(out[0]) <= 1.0 and abs(out[1]) <= 2.0
