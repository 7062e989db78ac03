"""current_source logic without a broker: handlers called directly, devices recorded.

The devices sit behind the driver interface; a recording driver stands in for the bus driver
here (the bus path is tested in the HIL tests). Frames are the hardware frame clock.
"""

import numpy as np
import pytest

from kibble.bus_schema.messages import Command, DaqFrame, HwSensorFrame, Setpoint
from kibble.services.daemons.current_source import CurrentSource
from kibble.services.runtime.service import ServiceConfig

from tests.recording import Recorder


@pytest.fixture
def cs(tmp_path):
    svc = CurrentSource(ServiceConfig(state_dir=tmp_path, restore=False))
    svc.main_driver, svc.cm_driver = Recorder(), Recorder()
    return svc


def tick(svc, k, main_a=None, cm_a=0.0, vz=0.0, connected=None):
    svc.on_clock(HwSensorFrame(frame=k))
    svc.on_daq_frame(DaqFrame(frame=k, coil_vz_m_per_s=vz))
    if main_a is not None:
        values = {"main_coil_current_a": main_a, "counter_mass_current_a": cm_a}
        switches = {} if connected is None else {"main_coil_connected": connected}
        svc.on_setpoint(Setpoint(frame=k, values=values, switches=switches))


def main_current(svc, i=-1):
    frame, codes, relays = svc.main_driver.writes[i]
    return svc.main_dac.to_value(*codes)


def arm(svc):
    """Arm as an operator would: once the servo's setpoints flow (at boot, one at frame 0)."""
    if svc.last_input_tick < 0:
        svc.on_setpoint(Setpoint(frame=0, values={"main_coil_current_a": 0.0, "counter_mass_current_a": 0.0}))
        svc.main_driver.writes.clear()
        svc.cm_driver.writes.clear()
    svc.cmd_arm(Command(id="1", command="arm"))


def test_arm_refused_until_the_input_flows_and_while_it_is_stale(cs):
    """Armed with no setpoint yet, or a stale one, the guard would go safe at its next frame
    (kibble up arms as soon as the daemons are online, before the first frame reaches them)."""
    with pytest.raises(ValueError, match="no input received yet"):
        cs.cmd_arm(Command(id="1", command="arm"))
    tick(cs, 0, main_a=0.0)
    for k in range(1, 200):  # the servo falls silent
        tick(cs, k)
    with pytest.raises(ValueError, match="no fresh input"):
        cs.cmd_arm(Command(id="2", command="arm"))
    tick(cs, 200, main_a=0.0)
    cs.cmd_arm(Command(id="3", command="arm"))
    assert cs.guard.state == "armed"


def test_boots_safe_and_outputs_zero_until_armed(cs):
    for k in range(20):
        tick(cs, k, main_a=0.005)
    assert cs.guard.state == "safe"
    assert all(codes == (0, 0) for _, codes, _ in cs.main_driver.writes)
    arm(cs)
    for k in range(20, 200):
        tick(cs, k, main_a=0.005)
    assert main_current(cs) == pytest.approx(0.005, abs=cs.main_dac.fine_lsb)
    # slew-limited: 0.1 A/s at 1 kHz is 100 uA per frame
    steps = np.diff([cs.main_dac.to_value(*c) for _, c, _ in cs.main_driver.writes])
    assert np.max(np.abs(steps)) <= 1e-4 + 2 * cs.main_dac.fine_lsb


def test_every_frame_answered_once_when_fresh(cs):
    arm(cs)
    for k in range(50):
        tick(cs, k, main_a=0.001)
    frames = [f for f, _, _ in cs.main_driver.writes]
    assert frames == list(range(50))


@pytest.mark.parametrize("bad", [0.5, -0.02, float("inf")])
def test_out_of_range_setpoint_rejected_last_good_kept(cs, bad):
    arm(cs)
    for k in range(100):
        tick(cs, k, main_a=0.002)
    before = cs.counters["rejected"]
    cs.on_clock(HwSensorFrame(frame=100))
    cs.on_setpoint(Setpoint(frame=100, values={"main_coil_current_a": bad, "counter_mass_current_a": 0.0}))
    assert cs.counters["rejected"] == before + 1
    tick(cs, 101)                      # clock only: still fresh, nothing written for 101 yet
    tick(cs, 102, main_a=0.002)
    assert main_current(cs) == pytest.approx(0.002, abs=cs.main_dac.fine_lsb)


def test_setpoint_missing_a_current_is_rejected(cs):
    arm(cs)
    cs.on_setpoint(Setpoint(frame=0, values={"main_coil_current_a": 0.001}))
    assert cs.counters["rejected"] == 1
    assert cs.main_driver.writes == []


def test_dead_servo_holds_then_ramps_to_zero_on_the_frame_clock(cs):
    arm(cs)
    for k in range(300):
        tick(cs, k, main_a=0.007)
    assert main_current(cs) == pytest.approx(0.007, abs=cs.main_dac.fine_lsb)
    n_before = len(cs.main_driver.writes)
    for k in range(300, 4000):        # servo gone: only the clock and the DAQ
        tick(cs, k)
    after = [cs.main_dac.to_value(*c) for _, c, _ in cs.main_driver.writes[n_before:]]
    frames = [f for f, _, _ in cs.main_driver.writes[n_before:]]
    assert frames[0] == 300 + cs.stale_ticks       # answers on its own once stale
    hold = int(1.0 * 1000)                          # hold_s = 1 s at 1 kHz
    assert all(v == pytest.approx(0.007, abs=cs.main_dac.fine_lsb) for v in after[:hold - 1])
    assert after[-1] == 0.0
    assert np.max(np.abs(np.diff(after))) <= 0.005 / 1000 + 2 * cs.main_dac.fine_lsb
    assert cs.guard.state == "safe"


def test_watchdog_trips_ramps_down_and_needs_reset(cs):
    arm(cs)
    for k in range(100):
        tick(cs, k, main_a=0.004)
    for k in range(100, 1300):
        tick(cs, k, main_a=0.004, vz=0.02 * np.sin(k / 10))
    assert cs.guard.state == "tripped" and "coil_vz_m_per_s" in cs.guard.trip_reason
    for k in range(1300, 2300):      # 4 mA at the 5 mA/s safe slew: 0.8 s
        tick(cs, k, main_a=0.004)
    assert main_current(cs) == 0.0
    with pytest.raises(ValueError, match="reset before arming"):
        arm(cs)
    cs.cmd_reset(Command(id="2", command="reset"))
    arm(cs)
    assert cs.guard.state == "armed"


def test_switchbox_follows_setpoint(cs):
    arm(cs)
    tick(cs, 0, main_a=0.0, connected=False)
    assert cs.main_driver.writes[-1][2] == (False,)
    tick(cs, 1, main_a=0.0)
    assert cs.main_driver.writes[-1][2] == (False,)
    tick(cs, 2, main_a=0.0, connected=True)
    assert cs.main_driver.writes[-1][2] == (True,)


@pytest.mark.parametrize("carried", [0.0, 1.0])
def test_a_switch_sent_as_a_number_is_rejected_naming_where_it_belongs(cs, carried):
    """The switchbox travels typed, in the setpoint's ``switches``: the old 0.0/1.0 among the
    values is an out-of-date producer, dropped whole with a reason, the switchbox unchanged."""
    reasons = []
    cs.event = lambda kind, text, **kw: kind == "rejected" and reasons.append(kw["data"]["reason"])
    arm(cs)
    tick(cs, 0, main_a=0.0, connected=True)
    cs.on_clock(HwSensorFrame(frame=1))
    cs.on_setpoint(Setpoint(frame=1, values={"main_coil_current_a": 0.0, "counter_mass_current_a": 0.0,
                                             "main_coil_connected": carried}))
    assert cs.counters["rejected"] == 1
    assert reasons == ["main_coil_connected is a switch: send it in the setpoint's switches as "
                       "true or false, not as a value"]
    assert cs.main_connect_wanted and cs.main_connected


def test_switchbox_opens_only_once_the_current_has_ramped_to_zero(cs):
    """Build item 4 of issue 17: velocity mode's setpoints (no main-coil current, coil open)
    after force mode's 5 mA: the current ramps down at the armed slew (100 uA per frame at
    1 kHz) with the switchbox closed, which opens in the frame the current is zero; closing
    again happens at once (no current through an open coil), and the current follows from
    the next frame."""
    arm(cs)
    for k in range(100):
        tick(cs, k, main_a=0.005, connected=True)
    n = len(cs.main_driver.writes)
    for k in range(100, 200):
        tick(cs, k, main_a=0.0, connected=False)
    ramp = cs.main_driver.writes[n:]
    current = [cs.main_dac.to_value(*codes) for _, codes, _ in ramp]
    opened = [relays == (False,) for _, _, relays in ramp]
    first_open, zero_at = opened.index(True), current.index(0.0)
    assert zero_at == 49 and all(opened[first_open:])  # 5 mA in 100 uA steps: the 50th frame
    # open at zero current (a frame later when the sum of the steps leaves a 1e-18 A residue)
    assert first_open - zero_at in (0, 1) and not any(current[first_open:])
    assert np.max(np.abs(np.diff(current))) <= 1e-4 + 2 * cs.main_dac.fine_lsb
    assert cs.counters["relay_refused"] == 0
    tick(cs, 200, main_a=0.002, connected=True)
    assert cs.main_driver.writes[-1] == (200, cs.main_dac.to_codes(0.0), (True,))
    tick(cs, 201, main_a=0.002, connected=True)
    assert main_current(cs) == pytest.approx(1e-4, abs=cs.main_dac.fine_lsb)


def test_opening_the_coil_under_current_is_refused_with_one_event(cs):
    """Issue 17 finding 7, in process: setpoints asking to open the switchbox while they ask
    for 6.9 mA (a copy of the servo's with the relay flipped) are dropped whole, counted, and
    reported once; the coil stays connected and its current unchanged."""
    events = []
    cs.event = lambda kind, text, **kw: events.append(kind)
    arm(cs)
    for k in range(100):
        tick(cs, k, main_a=0.0069, connected=True)
    for k in range(100, 150):
        tick(cs, k, main_a=0.0069, connected=False)
    assert all(relays == (True,) for _, _, relays in cs.main_driver.writes)
    assert main_current(cs) == pytest.approx(0.0069, abs=cs.main_dac.fine_lsb)
    assert cs.counters["relay_refused"] == 50 and cs.counters["rejected"] == 50
    assert events.count("relay_refused") == 1
    tick(cs, 150, main_a=0.0069, connected=True)     # the servo's own setpoint: accepted again
    assert cs.counters["rejected"] == 50 and cs.guard.state == "armed"


def test_a_refused_setpoint_does_not_move_the_switchbox(cs):
    """A setpoint tagged far ahead of the hardware clock is refused whole: its switchbox field
    must not be remembered either, or the coil would open once the servo's own current next
    reaches zero (the spoofed tag alone would have changed the relay)."""
    arm(cs)
    for k in range(1, 50):
        tick(cs, k, main_a=0.0, connected=True)
    rejected = cs.counters["rejected"]
    cs.on_setpoint(Setpoint(frame=49 + 10**6, values={
        "main_coil_current_a": 0.0, "counter_mass_current_a": 0.0},
        switches={"main_coil_connected": False}))
    assert cs.counters["rejected"] == rejected + 1
    for k in range(50, 60):
        tick(cs, k, main_a=0.0)              # the servo's own setpoints leave the field out
    assert cs.main_connected and cs.main_connect_wanted
    assert all(relays == (True,) for _, _, relays in cs.main_driver.writes)
