"""Frame tags checked, not trusted; implausible frames dropped (issue 17 findings 1, 2, 3, 8, 11;
build items 1 and 5): the daemons in process, every message encoded and decoded as on the bus.

Each daemon gets the frames of a lockstep run at 200 Hz (the campaign's), one message at a time
through the runtime's decode (:meth:`Service.dispatch_now`); what it publishes is recorded.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from kibble.bus_schema.codec import decode, encode
from kibble.bus_schema.messages import (
    FRAME_MAX, Command, DaqFrame, Event, HwActuatorCommand, HwSensorFrame, Message, Setpoint,
    Status,
)
from kibble.bus_schema.realtime import SLACK_FRAMES
from kibble.services.runtime.actuator import LOCKSTEP_ANSWER_S
from kibble.services.daemons.current_source import CurrentSource
from kibble.services.daemons.damping import Damping
from kibble.services.daemons.daq import Daq
from kibble.services.runtime.service import Service, ServiceConfig
from kibble.services.daemons.servo import Servo
from kibble.services.daemons.theta_z import ThetaZ

RATE_HZ = 200.0
HELD_A = 6.9e-3
"""The current that holds the 1 kg mass (services/daemons/current_source.py)."""


class InProcess:
    """One daemon: messages in through the runtime's decode, everything it publishes kept."""

    def __init__(self, cls: type[Service], tmp_path, clock: str = "lockstep",
                 **settings: Any) -> None:
        self.svc = cls(ServiceConfig(instrument="tags", state_dir=tmp_path, restore=False,
                                     clock=clock, settings={"frame_rate_hz": RATE_HZ, **settings}))
        self.out: list[tuple[str, bytes]] = []
        self.svc.attach_local(lambda topic, payload, qos, retain: self.out.append((topic, payload)))
        self.topics = self.svc.topics

    def send(self, topic: str, msg: Message) -> None:
        msg.t_mono_s = time.monotonic()
        self.svc.dispatch_now(topic, encode(msg))

    def sensors(self, k: int, **fields: Any) -> None:
        self.send(self.topics.hw("sensors"), HwSensorFrame(frame=k, **fields))

    def daq(self, k: int, **fields: Any) -> None:
        self.send(self.topics.frame("daq"), DaqFrame(frame=k, **fields))

    def setpoint(self, k: int, main_a: float) -> None:
        self.send(self.topics.setpoint("servo"), Setpoint(frame=k, values={
            "main_coil_current_a": main_a, "counter_mass_current_a": 0.0}))

    def arm(self) -> None:
        self.svc.cmd_arm(Command(id="1", command="arm"))

    def events(self, kind: str) -> list[Event]:
        topic = self.topics.event(self.svc.name)
        return [e for e in (decode(p, Event) for t, p in self.out if t == topic) if e.kind == kind]

    def published(self, topic: str, msg_type: type[Message]) -> list[Any]:
        return [decode(p, msg_type) for t, p in self.out if t == topic]


def holding_current_source(tmp_path) -> tuple[InProcess, int]:
    """A current source holding 6.9 mA at frame 300 of a run (armed at frame 100), and 300."""
    cs = InProcess(CurrentSource, tmp_path)
    for k in range(300):
        cs.sensors(k)
        cs.daq(k)
        cs.setpoint(k, HELD_A if k >= 100 else 0.0)
        if k == 99:
            cs.arm()
    assert cs.svc.guard.state == "armed" and cs.svc.guard.out[0] == pytest.approx(HELD_A)
    return cs, 300


def main_current_a(cs: InProcess, i: int = -1) -> float:
    commands = cs.published(cs.topics.hw("main_source"), HwActuatorCommand)
    return cs.svc.main_dac.to_value(*commands[i].codes)


def servo_freezes(cs: InProcess, first: int, frames: int = 2948, **sensors: Any) -> None:
    """The servo falls silent: only the hardware clock and the DAQ go on."""
    for k in range(first, first + frames):
        cs.sensors(k, **sensors)
        cs.daq(k)


def assert_stale_then_safe(cs: InProcess, last_input: int) -> None:
    """Stale within its stale time, held for hold_s, then ramped to zero: safe."""
    stale = cs.events("stale")
    assert stale, "no stale event"
    assert stale[0].data["frame"] <= last_input + cs.svc.stale_ticks + 1
    assert cs.svc.guard.state == "safe" and main_current_a(cs) == 0.0


# ------------------------------------------------------------------ finding 1


def test_a_setpoint_tagged_in_the_future_does_not_blind_stale_detection(tmp_path):
    """Finding 1: one well-formed servo/setpoint tagged frame + 1e9, then a frozen servo: over
    2948 frames the current source raised no stale event, stayed armed and held 6.9 mA."""
    cs, k = holding_current_source(tmp_path)
    cs.sensors(k)
    cs.setpoint(k + 10**9, HELD_A)
    servo_freezes(cs, k + 1)
    assert_stale_then_safe(cs, k - 1)
    assert "ahead of the hardware clock" in cs.events("rejected")[0].text


def test_a_clock_frame_tagged_in_the_future_does_not_blind_stale_detection(tmp_path):
    """Finding 1, through hw/sensors: one frame at frame + 1e6, then a frozen servo."""
    cs, k = holding_current_source(tmp_path)
    cs.sensors(k + 10**6)
    assert not cs.events("stale")  # a rejected tag moves no clock
    servo_freezes(cs, k)
    assert_stale_then_safe(cs, k - 1)
    assert "more than the" in cs.events("rejected")[0].text


@pytest.mark.parametrize("new_session", [False, True])
def test_a_simulator_restart_does_not_blind_stale_detection(tmp_path, new_session):
    """Finding 1, by a restart: the frame counter starts again at 0. With a new session the
    clock follows at once; without one, after the restarted frames agree for a few frames."""
    cs, _ = holding_current_source(tmp_path)
    servo_freezes(cs, 0, **({"session": 2} if new_session else {}))
    assert_stale_then_safe(cs, 0)
    notes = [e.text for e in cs.events("frame_clock")]
    assert any(("session 2 from frame 0" if new_session else "resynchronised") in n for n in notes)


def test_an_input_before_the_first_clock_frame_does_not_blind_stale_detection(tmp_path):
    """Before the hardware clock's first frame no tag can be checked: a setpoint tagged 1e9 then
    counts as of the clock's start (plus the slack), and a frozen servo after it is stale input
    as any."""
    cs = InProcess(CurrentSource, tmp_path)
    cs.setpoint(10**9, HELD_A)
    cs.arm()
    servo_freezes(cs, 0, frames=600)
    assert_stale_then_safe(cs, SLACK_FRAMES)


# ------------------------------------------------------------------ finding 2


@pytest.mark.parametrize("cls", [Damping, ThetaZ])
def test_a_future_clock_frame_does_not_put_damping_or_theta_z_safe(tmp_path, cls):
    """Finding 2: one hw/sensors message with a future frame put damping and theta_z safe at
    once (theta_z holds for 0 s)."""
    svc = InProcess(cls, tmp_path, frame_rate_hz=1000.0)  # 200 Hz loops: decimated by 5
    for k in range(600):
        if k == 300:
            svc.sensors(k + 10**6)
        svc.sensors(k)
        svc.daq(k, coil_vx_m_per_s=1e-6, coil_theta_z_rad=1e-7)
        if k == 99:
            svc.arm()
    assert not svc.events("safe") and not svc.events("stale")
    assert svc.svc.guard.state == "armed"
    assert svc.svc.counters["rejected"] == 1


# ------------------------------------------------------------------ finding 3


def test_the_daq_takes_no_tag_beyond_the_clock_and_its_counters_stay_sane(tmp_path):
    """Finding 3: a frame tag of 2^63 - 1 made the daq's counters grow until its heartbeat could
    not be encoded. Such a tag is refused by the decode, a jump by the clock; the frames after
    it are published as before, the counters and the status are sane."""
    daq = InProcess(Daq, tmp_path)
    raw = {"fringe_count": [0] * 4, "fringe_phase_rad": [0.0] * 4, "psd_v": [0.0] * 6,
           "dvm_v": [0.0], "current_monitor_v": [0.0, 0.0]}
    for k in range(10):
        daq.sensors(k, **raw)
    for tag in ((1 << 63) - 1, FRAME_MAX, 10 + 10**6):
        daq.sensors(tag, **raw)
    for k in range(10, 20):
        daq.sensors(k, **raw)
    frames = [f.frame for f in daq.published(daq.topics.frame("daq"), DaqFrame)]
    assert frames == list(range(20))
    counters = daq.svc.counters
    assert counters["rejected"] == 3 and counters.get("frames_missed", 0) == 0
    status = decode(encode(daq.svc.stamp(daq.svc.status(interval=True))), Status)
    assert status.counters["rejected"] == 3 and status.detail["frame"] == 19


# ------------------------------------------------------------------ finding 8


def test_an_implausible_daq_frame_moves_no_servo(tmp_path):
    """Finding 8: one daq/frame with coil_z_m = 1.0 moved the coil 548 um; 1e300 drove the
    servo to its 10 N limit. The servo's decode drops them, counted, and its setpoints go on."""
    servo = InProcess(Servo, tmp_path)
    for k in range(20):
        servo.daq(k)
    servo.svc.cmd_mode(Command(id="1", command="mode", args={"mode": "force"}))
    for k in range(20, 100):
        servo.daq(k)
    before = servo.svc.counters["rejected"]
    servo.daq(100, coil_z_m=1.0)
    servo.daq(101, coil_z_m=1e300)
    for k in range(102, 120):
        servo.daq(k)
    setpoints = servo.published(servo.topics.setpoint("servo"), Setpoint)
    currents = [s.values["main_coil_current_a"] for s in setpoints if s.frame >= 90]
    assert max(currents) - min(currents) < 1e-6  # nothing moved the loop
    assert 100 not in [s.frame for s in setpoints] and 101 not in [s.frame for s in setpoints]
    assert servo.svc.counters["rejected"] == before + 2
    texts = [e.text for e in servo.events("rejected")]
    assert any("$.coil_z_m is 1 m, beyond its plausibility limits" in t for t in texts)


def test_the_daq_drops_a_frame_it_finds_implausible_like_a_missing_one(tmp_path):
    """A fringe count that puts the coil 0.2 m from level (beyond its stops) is not published;
    the velocities of the frames after it do not see it."""
    daq = InProcess(Daq, tmp_path)
    raw = {"fringe_phase_rad": [0.0] * 4, "psd_v": [0.0] * 6, "dvm_v": [0.0],
           "current_monitor_v": [0.0, 0.0]}
    glitch = int(0.2 / (daq.svc.settings.wavelength_m / 2))
    for k in range(40):
        daq.sensors(k, fringe_count=[glitch] * 3 + [0] if k == 20 else [0] * 4, **raw)
    frames = daq.published(daq.topics.frame("daq"), DaqFrame)
    assert [f.frame for f in frames] == [k for k in range(40) if k != 20]
    assert max(abs(f.coil_vz_m_per_s) for f in frames) == 0.0
    assert "implausible: DaqFrame: $.coil_z_m is 0.2 m" in daq.events("rejected")[-1].text
    assert daq.svc.counters["frames_missed"] == 1


def test_implausible_daq_frames_in_a_row_are_stale_input(tmp_path):
    """Several implausible frames in a row are missing input: the damping holds, then goes safe
    (it no longer drives its coils to their limit from a reading of 1e300)."""
    damping = InProcess(Damping, tmp_path)
    for k in range(200):
        damping.sensors(k)
        damping.daq(k, coil_vx_m_per_s=1e-6)
        if k == 99:
            damping.arm()
    for k in range(200, 400):
        damping.sensors(k)
        damping.daq(k, coil_vx_m_per_s=1e300)
    assert damping.svc.guard.state == "safe" and not damping.svc.guard.out.any()
    assert damping.events("stale")[0].data["frame"] == 200 + damping.svc.stale_ticks
    assert damping.svc.counters["rejected"] == 200


# ------------------------------------------------------------------ finding 11 and the backstop


def test_lockstep_answers_from_the_clock_once_the_upstream_is_silent(tmp_path):
    """Finding 11, in process: the servo falls silent; the frame waiting for it is answered once
    it has waited LOCKSTEP_ANSWER_S, every frame after it at once, until input comes again."""
    cs, k = holding_current_source(tmp_path)

    def answered() -> list[int]:
        return [c.frame for c in cs.published(cs.topics.hw("main_source"), HwActuatorCommand)]

    cs.sensors(k)
    assert answered()[-1] == k - 1                              # waiting for the servo
    cs.svc.watch_clock(time.monotonic())
    assert answered()[-1] == k - 1                              # not yet
    cs.svc.watch_clock(time.monotonic() + LOCKSTEP_ANSWER_S + 0.01)
    assert answered()[-1] == k and cs.events("upstream_silent")
    for j in range(k + 1, k + 5):
        cs.sensors(j)
        assert answered()[-1] == j                              # at once
    cs.setpoint(k + 4, HELD_A)                                  # the servo is back
    cs.sensors(k + 5)
    assert answered()[-1] == k + 4                              # waited for again
    cs.setpoint(k + 5, HELD_A)
    assert answered()[-1] == k + 5 and cs.svc.guard.state == "armed"


def test_realtime_a_clock_that_stops_advancing_is_stale_whatever_the_tags_say(tmp_path):
    """Build item 1's backstop: the frames keep coming but every tag is refused; on the wall
    clock the input goes stale, is held for hold_s (1 s), then ramps to zero at 5 mA/s."""
    cs = InProcess(CurrentSource, tmp_path, clock="realtime")
    for k in range(300):
        cs.sensors(k)
        cs.setpoint(k, HELD_A if k >= 100 else 0.0)
        if k == 99:
            cs.arm()
    t0 = time.monotonic()
    for i in range(1, 4):
        cs.sensors(300 + i * 10**6)                             # each jump refused
    assert cs.svc.counters["rejected"] == 3
    cs.svc.watch_clock(t0 + 0.01)
    assert not cs.events("stale")
    cs.svc.watch_clock(t0 + 0.1)
    assert cs.events("clock_stopped") and cs.events("stale") and cs.svc.guard.state == "armed"
    assert main_current_a(cs) == pytest.approx(HELD_A, abs=cs.svc.main_dac.fine_lsb)
    cs.svc.watch_clock(t0 + 1.5)                                # held 1 s, then the ramp
    assert cs.svc.guard.state == "safe"
    ramped = HELD_A - main_current_a(cs)
    assert 0.0 < ramped <= 0.005 * 0.5 + 2 * cs.svc.main_dac.fine_lsb
    cs.svc.watch_clock(t0 + 3.0)
    assert main_current_a(cs) == 0.0
