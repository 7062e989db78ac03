"""hv_source logic without a broker: pressure interlock, trip, ramp to zero, relay opening."""

import pytest

from kibble.bus_schema.messages import Command, DaqFrame, HwSensorFrame, Setpoint
from kibble.services.daemons.hv_source import HvSource
from kibble.services.runtime.service import ServiceConfig

from tests.recording import Recorder


@pytest.fixture
def hv(tmp_path):
    svc = HvSource(ServiceConfig(instrument="efb", state_dir=tmp_path, restore=False))
    svc.driver = Recorder()
    return svc


def tick(svc, k, volts=None, pressure_pa=1e-3, z_m=0.0):
    svc.on_clock(HwSensorFrame(frame=k))
    svc.on_daq_frame(DaqFrame(frame=k, pressure_pa=pressure_pa, coil_z_m=z_m))
    if volts is not None:
        svc.on_setpoint(Setpoint(frame=k, values={"hv_voltage_v": volts}))


def volts(svc, i=-1):
    return svc.dac.to_value(svc.driver.writes[i][1][0])


def test_arm_refused_above_the_pressure_limit(hv):
    tick(hv, 0, 100.0, pressure_pa=5.0)
    with pytest.raises(ValueError, match=r"arm refused: pressure 5 Pa is not below the HV limit 0.1 Pa"):
        hv.cmd_arm(Command(id="1", command="arm"))
    assert hv.guard.state == "safe"
    assert all(w[1] == (0,) and w[2] == (True, False) for w in hv.driver.writes)


def test_pressure_rise_while_armed_trips_and_ramps_to_zero(hv):
    tick(hv, 0, 0.0)
    hv.cmd_arm(Command(id="1", command="arm"))
    for k in range(1, 300):
        tick(hv, k, 150.0)
    assert volts(hv) == pytest.approx(150.0, abs=hv.dac.lsb)
    assert hv.driver.writes[-1][2] == (True, True)
    for k in range(300, 900):
        tick(hv, k, 150.0, pressure_pa=0.5)
    assert hv.guard.state == "tripped" and "pressure" in hv.guard.trip_reason
    ramp = [volts(hv, i) for i in range(-600, 0)]
    assert ramp[-1] == 0.0
    assert max(abs(a - b) for a, b in zip(ramp, ramp[1:])) <= 500.0 / 1000 + hv.dac.lsb
    assert hv.driver.writes[-1][2] == (True, False)      # amplifier disabled once at zero


def test_stale_setpoint_ramps_hv_down_without_hold(hv):
    tick(hv, 0, 0.0)
    hv.cmd_arm(Command(id="1", command="arm"))
    for k in range(1, 200):
        tick(hv, k, 100.0)
    for k in range(200, 600):
        tick(hv, k)
    after = [volts(hv, i) for i in range(len(hv.driver.writes)) if hv.driver.writes[i][0] >= 200]
    assert after[0] < 100.0 - 0.4          # ramping from the first stale frame on
    assert after[-1] == 0.0


def test_a_refused_setpoint_changes_neither_relay_nor_reference(hv):
    """A setpoint with a tag far ahead is refused whole: its relay and reference fields too
    (a spoofed z_ref_m would move the watchdog's centre, a relay field would switch the HV)."""
    tick(hv, 0, 0.0)
    hv.cmd_arm(Command(id="1", command="arm"))
    for k in range(1, 50):
        tick(hv, k, 0.0)
    hv.on_setpoint(Setpoint(frame=49 + 10**6, values={
        "hv_voltage_v": 0.0, "z_ref_m": 1e-3}, switches={"hv_to_main": False}))
    assert hv.counters["rejected"] >= 1
    for k in range(50, 60):
        tick(hv, k, 0.0)
    assert hv.to_main and hv.to_main_wanted and hv.z_ref_m == 0.0
    assert hv.driver.writes[-1][2] == (True, True)


def test_a_relay_sent_as_a_number_is_rejected_naming_where_it_belongs(hv):
    """The relay travels typed, in the setpoint's ``switches``: ``hv_to_main`` = 0.0 among the
    values (an out-of-date producer) is dropped whole with a reason, the relay unchanged."""
    reasons = []
    hv.event = lambda kind, text, **kw: kind == "rejected" and reasons.append(kw["data"]["reason"])
    tick(hv, 0, 0.0)
    hv.on_setpoint(Setpoint(frame=0, values={"hv_voltage_v": 0.0, "hv_to_main": 0.0}))
    assert hv.counters["rejected"] == 1 and hv.to_main_wanted
    assert reasons == ["hv_to_main is a switch: send it in the setpoint's switches as true or "
                       "false, not as a value"]
    hv.on_setpoint(Setpoint(frame=0, values={"hv_voltage_v": 0.0}, switches={"hv_to_main": False}))
    assert hv.counters["rejected"] == 1 and not hv.to_main_wanted
