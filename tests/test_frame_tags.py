"""Frame tags checked, not trusted; implausible frames dropped (issue 17 findings 3, 8; build
items 1 and 5): the daemons in process, every message encoded and decoded as on the bus.

Each daemon gets the frames of a lockstep run at 200 Hz (the campaign's), one message at a time
through the runtime's decode (:meth:`Service.dispatch_now`); what it publishes is recorded.
"""

from __future__ import annotations

import time
from typing import Any

from kibble.bus_schema.codec import decode, encode
from kibble.bus_schema.messages import (
    FRAME_MAX, Command, DaqFrame, Event, HwSensorFrame, Message, Setpoint, Status,
)
from kibble.services.damping import Damping
from kibble.services.daq import Daq
from kibble.services.runtime import Service, ServiceConfig
from kibble.services.servo import Servo

RATE_HZ = 200.0


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
    assert max(abs(f.coil_vz_m_s) for f in frames) == 0.0
    assert "implausible: DaqFrame: $.coil_z_m is 0.2 m" in daq.events("rejected")[-1].text
    assert daq.svc.counters["frames_missed"] == 1


def test_implausible_daq_frames_in_a_row_are_stale_input(tmp_path):
    """Several implausible frames in a row are missing input: the damping holds, then goes safe
    (it no longer drives its coils to their limit from a reading of 1e300)."""
    damping = InProcess(Damping, tmp_path)
    for k in range(200):
        damping.sensors(k)
        damping.daq(k, coil_vx_m_s=1e-6)
        if k == 99:
            damping.arm()
    for k in range(200, 400):
        damping.sensors(k)
        damping.daq(k, coil_vx_m_s=1e300)
    assert damping.svc.guard.state == "safe" and not damping.svc.guard.out.any()
    assert damping.events("stale")[0].data["frame"] == 200 + damping.svc.stale_ticks
    assert damping.svc.counters["rejected"] == 200
