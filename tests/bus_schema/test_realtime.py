"""bus_schema.realtime (newest frame wins, honest timing, frame tags checked) and the lockstep
gate's held answers: pure, no broker."""

from __future__ import annotations

import time

import pytest

from kibble.bus_schema.codec import encode
from kibble.bus_schema.messages import Setpoint, Timing
from kibble.bus_schema.realtime import (
    COUNTER_MAX, RESYNC_FRAMES, SLACK_FRAMES, FrameClock, FrameIntake, FrameTiming, cannot_keep_up,
    saturating_add,
)
from kibble.hil_sim.clock import LockstepGate
from kibble.services.runtime.service import Service, ServiceConfig


def test_intake_keeps_the_newest_frame_per_topic_and_counts_the_rest():
    intake = FrameIntake({"a", "b"})
    for payload in (b"a1", b"a2", b"a3"):
        assert intake.offer("a", payload)
    assert intake.offer("b", b"b1")
    assert not intake.offer("cmd", b"c")  # not a frame topic: the caller handles it at once
    taken = intake.take()
    assert [(t, p[-1]) for t, p in taken] == [("a", b"a3"), ("b", b"b1")]
    assert taken[0][1] == [b"a1", b"a2", b"a3"]  # oldest to newest, for the fallback
    assert intake.take() == []
    intake.offer("b", b"b2")
    intake.offer("a", b"a4")
    intake.offer("b", b"b3")
    assert [t for t, _ in intake.take()] == ["a", "b"]  # in order of the newest arrival


def test_a_malformed_newest_frame_does_not_hide_the_valid_one_before_it(tmp_path):
    """Runtime: newest first; a frame that does not decode is rejected and the one before it is
    acted on; the older ones are skipped, never looked at."""

    class Loop(Service):
        name = "loop"

        def setup(self) -> None:
            self.seen: list[int] = []
            self.subscribe(self.topics.setpoint("servo"), Setpoint, lambda sp: self.seen.append(sp.frame))

    svc = Loop(ServiceConfig(instrument="t1", state_dir=tmp_path))
    svc.intake.frame_topics = frozenset(svc._newest_only)
    topic = svc.topics.setpoint("servo")
    svc.batch_begin()
    for k in (1, 2, 3):
        svc.message(topic, encode(Setpoint(frame=k, values={"x": 1.0}, t_mono_s=time.monotonic())))
    svc.message(topic, b"\xc1 not msgpack")
    svc.batch_end()
    svc.batch_flushed()
    assert svc.seen == [3]
    assert svc.counters["rejected"] == 1
    assert svc.intake.skipped == 2
    assert svc.counters["frames_in"] == 1


def test_timing_percentiles_late_and_overruns():
    timing = FrameTiming(period_s=1e-3, late_after_frames=2.0)
    now = 100.0
    for age in [0.0005] * 98 + [0.004, 0.010]:
        timing.batch_begin()
        timing.acted(now - age, now)
        timing.batch_end(1, 0)
        timing.frame_done()
    snap = timing.snapshot()
    assert snap.frames == 100
    assert snap.age_ms_p50 == pytest.approx(0.5)
    assert snap.age_ms_max == pytest.approx(10.0)
    assert timing.late == 2  # 4 ms and 10 ms are beyond 2 periods
    assert timing.overruns == 0
    timing.batch_begin()
    t_end = time.thread_time() + 3e-3  # 3 ms of CPU in one frame of 1 ms: an overrun
    while time.thread_time() < t_end:
        pass
    timing.batch_end(1, 0)
    timing.frame_done()
    assert timing.overruns == 1
    snap = timing.snapshot()
    assert snap.frames == 1 and snap.cpu_us_p50 >= 3000
    assert timing.snapshot().frames == 0  # a new interval


def test_nested_batches_charge_each_loop_its_own_cpu():
    """A loop that hands a frame to another loop of the same process (run_together) is not
    charged for the other's work."""
    outer, inner = FrameTiming(1e-3), FrameTiming(1e-3)

    def burn(s: float) -> None:
        t_end = time.thread_time() + s
        while time.thread_time() < t_end:
            pass

    outer.batch_begin()
    burn(1e-3)
    inner.batch_begin()
    burn(4e-3)
    inner.batch_end(1, 0)
    burn(1e-3)
    outer.batch_end(1, 0)
    outer.frame_done()
    inner.frame_done()
    o, i = outer.snapshot().cpu_us_p50, inner.snapshot().cpu_us_p50
    assert 2000 <= o < 3500
    assert 4000 <= i < 5500


def test_counters_saturate():
    assert saturating_add(COUNTER_MAX - 1, 10) == COUNTER_MAX
    assert saturating_add(5, -10) == 0


def test_cannot_keep_up_speaks_only_when_it_cannot():
    assert cannot_keep_up("servo", Timing(frames=995, skipped=5, age_ms_p99=1.2, cpu_us_p50=200), 1000) is None
    assert cannot_keep_up("servo", Timing(frames=750, skipped=250, age_ms_p99=2, cpu_us_p50=100), 1000) is None
    line = cannot_keep_up("servo", Timing(frames=400, skipped=600, age_ms_p99=12, cpu_us_p50=900), 1000)
    assert line is not None and "servo" in line and "60 % skipped" in line and "--rate" in line
    old = cannot_keep_up("daq", Timing(frames=1000, skipped=0, age_ms_p99=30, cpu_us_p50=100), 1000)
    assert old is not None and "30.0 ms old" in old


def test_lockstep_gate_waits_for_a_decimated_device_only_at_its_frames():
    gate = LockstepGate()
    gate.register("fast")
    gate.register("slow")
    gate.open(0)
    assert not gate.answer("fast", 0)
    assert gate.answer("slow", 0, hold_frames=5)  # answers frames 0..4
    for k in range(1, 5):
        gate.open(k)
        assert gate.pending == {"fast"}
        assert gate.answer("fast", k)
    gate.open(5)
    assert gate.pending == {"fast", "slow"}


def test_a_decimated_actuator_acts_once_per_loop_period_and_says_how_long_it_holds(tmp_path):
    """Damping at 1 kHz frames runs its loop at 200 Hz: one command per 5 frames, each
    answering its 5 frames (hold_frames), armed from a clean boot, stale input still caught."""
    from kibble.bus_schema.codec import decode
    from kibble.bus_schema.messages import Command, DaqFrame, HwActuatorCommand, HwSensorFrame
    from kibble.services.daemons.damping import Damping

    damping = Damping(ServiceConfig(instrument="t2", state_dir=tmp_path,
                                    settings={"frame_rate_hz": 1000.0, "loop_rate_hz": 200.0}))
    sent: list[HwActuatorCommand] = []
    damping.attach_local(lambda topic, payload, qos, retain: sent.append(decode(payload, HwActuatorCommand))
                         if topic.endswith("hw/damping") else None)
    assert damping.decimation == 5
    for k in range(100):  # boot: the input flows, the guard is safe
        damping.on_clock(HwSensorFrame(frame=k))
        damping.on_daq_frame(DaqFrame(frame=k, coil_vx_m_per_s=1e-6))
    damping.cmd_arm(Command(command="arm", id="1"))
    sent.clear()
    for k in range(100, 200):
        damping.on_clock(HwSensorFrame(frame=k))
        damping.on_daq_frame(DaqFrame(frame=k, coil_vx_m_per_s=1e-6))
    assert damping.guard.state == "armed"
    assert [c.frame for c in sent] == list(range(100, 200, 5))
    assert {c.hold_frames for c in sent} == {5}
    assert any(c.codes != [0] * 6 for c in sent)  # it damps
    for k in range(200, 400):  # the DAQ falls silent: stale after 50 ms, held for 0.25 s
        damping.on_clock(HwSensorFrame(frame=k))
    assert damping.guard.state == "armed" and damping.guard.stale
    for k in range(400, 600):  # then the clock alone drives the guard to safe
        damping.on_clock(HwSensorFrame(frame=k))
    assert damping.guard.state == "safe"


# ------------------------------------------------------------------ frame tags (issue 17)


def _clock(**kw) -> FrameClock:
    clock = FrameClock(1e-3, **{"realtime": False, "lockstep_device": True, **kw})
    assert clock.advance(100, 1, 10.0, 10.0) is None and clock.step == 0  # the first frame
    return clock


def test_a_clock_frame_advances_by_the_slack_never_back_and_never_further():
    clock = _clock()
    for k in range(101, 101 + SLACK_FRAMES + 1, 2):
        assert clock.advance(k, 1, 10.0, 10.0) is None
    frame, local = clock.frame, clock.local
    for bad, why in ((frame, "not after"), (frame - 50, "not after"),
                     (frame + SLACK_FRAMES + 1, "more than the 4"),
                     (frame + 10**9, "more than the 4")):
        assert why in clock.advance(bad, 1, 10.0, 10.0)
        assert (clock.frame, clock.local) == (frame, local)  # a rejected tag moves nothing
    assert clock.advance(frame + SLACK_FRAMES, 1, 10.0, 10.0) is None
    assert clock.local == local + SLACK_FRAMES and clock.offset == clock.local - clock.frame


def test_the_wall_clock_allows_longer_steps_in_realtime_and_to_a_loop_lockstep_does_not_wait_for():
    rt = _clock(realtime=True)  # 1 kHz: 0.5 s of publisher stamps allow 500 frames more
    assert rt.advance(600, 1, 10.5, 10.6) is None and rt.local == 600
    # frames a late publisher owed, in a burst with the same stamp: taken, but the count moves
    # only as far as the stamps say (the slack)
    assert rt.advance(600 + rt.late_frames, 1, 10.5, 10.6) is None
    assert rt.local == 600 + SLACK_FRAMES and rt.offset == rt.local - rt.frame
    assert "more than" in rt.advance(10**6, 1, 1e9, 10.7)       # a stamp from the future is now
    free = _clock(lockstep_device=False)  # the daq: the simulator may run ahead of it
    assert free.advance(100 + 200, 1, 10.01, 10.01) is None     # 10 ms at up to 20 kHz
    assert "more than" in free.advance(300 + 10**6, 1, 10.02, 10.02)
    gated = _clock()  # an actuator: the simulator waits for it, it sees every frame
    assert "more than the 4" in gated.advance(300, 1, 10.01, 10.01)


def test_a_count_held_back_by_the_stamps_keeps_a_decimated_loops_periods_aligned():
    rt = _clock(realtime=True, align=2)
    assert rt.advance(105, 1, 10.0, 10.0) is None                 # 5 tags, the slack's 4 allowed
    assert rt.local == 103 and rt.offset % 2 == 0


def test_an_input_ahead_of_the_clock_counts_as_of_the_clock():
    rt = _clock(realtime=True)
    assert rt.check_input(100 + rt.lead_frames) is None           # its stream read first
    assert "ahead of the hardware clock" in rt.check_input(101 + rt.lead_frames)
    assert rt.cap(100 + rt.lead_frames + rt.offset) == rt.local + SLACK_FRAMES
    assert rt.cap(101 + rt.offset) == 101 + rt.offset


def test_a_new_session_starts_a_new_numbering_and_the_count_goes_on():
    clock = _clock(align=5)
    assert clock.advance(103, 1, 10.0, 10.0) is None
    local = clock.local
    assert clock.advance(0, 2, 10.0, 10.0) is None  # the simulator restarted
    assert clock.step == 0 and "session 2 from frame 0" in clock.note
    assert clock.local > local and clock.local % 5 == 0 and clock.offset == clock.local
    assert clock.advance(1, 2, 10.0, 10.0) is None and clock.local == clock.offset + 1


def test_only_a_run_of_frames_that_agree_resynchronises_the_clock():
    clock = _clock()
    for k in range(101, 111):  # a spoofer interleaving far tags with the real frames: never
        assert clock.advance(k + 10**6, 1, 10.0, 10.0) is not None
        assert clock.advance(k, 1, 10.0, 10.0) is None
    local = clock.local
    # a restart that named no new session: the frames start again, and agree with one another
    assert "not after" in clock.advance(0, 1, 10.0, 10.0)
    assert "not after" in clock.advance(1, 1, 10.0, 10.0)
    assert clock.advance(2, 1, 10.0, 10.0) is None and clock.step == 0
    assert "resynchronised" in clock.note and clock.frame == 2
    assert clock.local == local + RESYNC_FRAMES  # the frames of the run counted, no more


def test_a_stall_ages_the_inputs_of_the_frames_before_it():
    clock = _clock()
    input_local = 100 + clock.offset
    clock.stall(50)
    assert clock.local - input_local == 50
    assert clock.advance(101, 1, 10.0, 10.0) is None and clock.local == input_local + 51
    assert clock.check_input(101 + SLACK_FRAMES) is None
    assert "ahead of the hardware clock" in clock.check_input(102 + SLACK_FRAMES)
    assert "must name the frame" in clock.check_input(-1)


def test_a_loop_back_from_a_lost_connection_takes_the_next_jump_once():
    clock = _clock()
    clock.rejoin()  # the simulator ran on while the broker was away
    assert clock.advance(100 + 500, 1, 10.0, 10.0) is None and clock.local == 600
    assert "more than the 4" in clock.advance(600 + 500, 1, 10.0, 10.0)  # once only
