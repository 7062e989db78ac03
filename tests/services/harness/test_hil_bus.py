"""HIL over a real broker, lockstep: every daemon as its own process (``kibble up``), the
simulator as the hardware, the scenarios of the in-process tests shortened, and the safety
behaviour an operator relies on: a parameter set mid-run over MQTT takes effect without an
output step, a watchdog trip and its reset, HV refused above the pressure limit, spoofed
setpoints unable to open the coil under current, a restarted servo taking the load up where
it was, and a killed servo leaving the current source in its safe state (then restarted by the
supervisor), after spoofed frame tags and without stalling the lockstep run.

200 Hz frames (docs/architecture.md section 6: the chain makes a few hundred steps per second over MQTT on
this machine); figures come from ``sim/truth``, as in ``make run``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile

import numpy as np
import pytest
import pytest_asyncio

from kibble.bus_schema.codec import decode
from kibble.bus_schema.messages import (
    DaqFrame, Event, HwActuatorCommand, HwSensorFrame, LoopFrame, Setpoint, Status,
)
from kibble.services.harness import scenarios as S
from kibble.services.plans.mqtt_loop import BusLoop
from kibble.services.runtime.registry import service_class
from kibble.services.runtime.service import load_config
from kibble.services.instruments import instrument
from kibble.services.harness.up import Stack

pytestmark = [pytest.mark.broker, pytest.mark.asyncio(loop_scope="module")]
RATE_HZ = 200.0
WATCHDOG_XY_RMS_M = 2e-6
"""Damping watchdog for the trip test: far above the closed loop's ~10 nm of x motion, far
below the ~7 um ring-down of a 3e-4 N s impulse."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nist4(broker, tmp_path_factory):
    stack = Stack("nist4", clock="lockstep", rate_hz=RATE_HZ, broker_url=broker.url,
                  instrument="hil", seed=3, run_dir=tmp_path_factory.mktemp("hil-nist4"),
                  settings={"damping": {"watchdog_xy_rms_m": WATCHDOG_XY_RMS_M}},
                  progress=lambda line: None)
    async with stack:
        async with BusLoop(broker.url, "hil", RATE_HZ) as loop:
            await loop.wait_frames()
            for name, value in (("erase_decay_s", 1.0), ("erase_n_decay", 3.0), ("erase_freq_hz", 1.0)):
                await loop.command("servo", "param.set", name=name, value=value)
            yield stack, loop


def main_source_dac():
    """The main-coil DAC of the stack's current source (its configuration, not a copy)."""
    with tempfile.TemporaryDirectory() as state:
        cfg = load_config("current_source", instrument("nist4").config, instrument="dac", state_dir=state,
                          restore=False)
        return service_class("current_source")(cfg).main_dac


def drained(sub, msg_type):
    """Every message queued on the subscription ``sub`` so far, decoded as ``msg_type``."""
    out = []
    while not sub.queue.empty():
        out.append(decode(sub.queue.get_nowait()[1], msg_type))
    return out


async def status_of(loop: BusLoop, service: str, predicate=lambda status: True,
                    timeout_s: float = 5.0) -> Status:
    """The first status of ``service`` (the retained one, then one per heartbeat) that
    satisfies ``predicate``."""
    async with loop.bus.listen(loop.bus.topics.status(service)) as sub:
        return await sub.expect(Status, predicate, timeout_s=timeout_s)


async def test_null_and_a_mass_exchange_through_every_daemon(nist4):
    _, loop = nist4
    null = await S.force_null(loop, 10.0, settle_s=5.0)
    assert null["null_rms_m"] <= 1e-9
    assert abs(null["null_mean_m"]) <= 2e-9
    daq = await loop.measure(1.0)                  # what a measurement plan sees: DAQ frames
    assert np.array_equal(daq["frame"], np.arange(daq["frame"][0], daq["frame"][0] + RATE_HZ))
    assert np.abs(daq["coil_z_m"]).max() < 5e-9
    ex = await S.mass_exchanges(loop, cycles=1, window_s=6.0, erase_tail_s=2.0)
    assert max(ex["peaks_m"]) <= 10e-6
    assert max(ex["settle_s"]) <= 6.0
    assert max(ex["erase_end_m"]) < 20e-9


async def test_gain_change_mid_run_makes_no_output_step(nist4):
    """Doubling the integral gain of a non-bumpless PID would double the integral term, which
    holds the whole static force: a step of newtons. Bumpless, the force moves by no more than
    it does from frame to frame anyway."""
    _, loop = nist4
    await loop.command("servo", "mode", mode="force")
    ki = (await loop.command("servo", "param.get", name="ki_n_per_m_s"))["value"]
    forces: dict[int, float] = {}
    async with loop.bus.listen(loop.bus.topics.frame("servo"), qos=0) as sub:
        async def record(n: int) -> None:
            while len(forces) < n:
                frame = decode((await sub.get(10.0))[1], LoopFrame)
                forces[frame.frame] = frame.values["force_n"]
        await record(400)
        before = max(forces)
        reply = await loop.command("servo", "param.set", name="ki_n_per_m_s", value=2 * ki)
        assert reply["value"] == 2 * ki
        await record(len(forces) + 400)
    await loop.command("servo", "param.set", name="ki_n_per_m_s", value=ki)
    frames = sorted(forces)
    assert frames == list(range(frames[0], frames[-1] + 1)), "servo/frame lost frames"
    f = np.array([forces[k] for k in frames])
    steps = np.abs(np.diff(f))
    split = frames.index(before)
    normal, across = steps[:split].max(), steps[split:].max()
    assert abs(f).min() > 1000 * normal          # a step of the integral term would show
    assert across <= 3 * normal, (across, normal)


async def test_watchdog_trips_the_damping_and_reset_rearms_it(nist4):
    _, loop = nist4
    await loop.run_seconds(3.0, record=False)      # the watchdog window holds quiet motion
    async with loop.bus.listen(loop.bus.topics.event("damping")) as events:
        await loop.sim("inject_impulse", dof="x", impulse=3e-4)
        trip = await events.expect(Event, lambda e: e.kind == "trip", timeout_s=30.0)
    assert "watchdog" in trip.text or "rms" in trip.text.lower(), trip.text
    status = await status_of(loop, "damping")
    assert status.state == "tripped"
    # tripped: the coil currents ramp to zero
    await status_of(loop, "damping", lambda st: all(st.detail[f"set{k}_{d}_a"] == 0.0
                                                     for k in range(3) for d in "vh"), 10.0)
    with pytest.raises(ValueError, match="refused arm|trip|reset"):
        await loop.command("damping", "arm")
    await loop.run_seconds(4.0, record=False)       # let the ring-down leave the window
    assert (await loop.command("damping", "reset"))["state"] == "safe"
    assert (await loop.command("damping", "arm"))["state"] == "armed"
    tr = await loop.run_seconds(5.0)
    assert np.sqrt(np.mean(tr["x_m"][-400:] ** 2)) < WATCHDOG_XY_RMS_M


async def test_theta_z_hv_refused_above_the_pressure_limit(nist4):
    _, loop = nist4
    async with loop.bus.listen(loop.bus.topics.event("theta_z")) as events:
        await loop.sim("set_pressure", pressure_pa=5.0)
        trip = await events.expect(Event, lambda e: e.kind == "trip", timeout_s=30.0)
    assert "pressure" in trip.text
    await status_of(loop, "theta_z", lambda st: st.detail["electrode_a_v"] == 0.0
                    and st.detail["electrode_b_v"] == 0.0, 10.0)      # ramped to zero
    await loop.command("theta_z", "reset")
    with pytest.raises(ValueError, match="pressure"):
        await loop.command("theta_z", "arm")
    async with loop.bus.listen(loop.bus.topics.frame("daq"), qos=0) as daq:
        await loop.sim("set_pressure", pressure_pa=1e-4)
        # once the DAQ has published a low pressure, theta_z has it queued before the arm
        await daq.expect(DaqFrame, lambda f: f.pressure_pa < 0.1, timeout_s=30.0)
    assert (await loop.command("theta_z", "arm"))["state"] == "armed"


async def test_spoofed_setpoints_cannot_open_the_coil_under_current(nist4):
    """Issue 17 finding 7: 50 setpoints on ``servo/setpoint`` from an outsider, one per frame,
    copying the current the coil carries (the auxiliary mass off: -3.5 mA) but with
    ``main_coil_connected`` false, used to open the switchbox under current (the coil lost its
    force for those frames; with 13.8 mA it went to its stops and tripped). The switchbox
    changes only with no current through it, and no servo mode opens the coil while asking for
    current: every such setpoint is dropped and counted, with one event, and the coil stays
    connected and held."""
    _, loop = nist4
    await loop.command("servo", "mode", mode="force")
    await loop.command("servo", "mass", aux=False)
    dac = main_source_dac()
    async with loop.bus.listen(loop.bus.topics.hw("main_source"), qos=0) as hw:
        await loop.run_seconds(4.0, record=False)
        i_main = dac.to_value(*drained(hw, HwActuatorCommand)[-1].codes)
    assert i_main < -3e-3
    before = await status_of(loop, "current_source")
    topic = loop.bus.topics.setpoint("servo")
    async with loop.bus.listen(loop.bus.topics.hw("main_source"), qos=0) as hw, \
            loop.bus.listen(loop.bus.topics.event("current_source")) as events:
        truth = []
        for _ in range(50):
            await loop.bus.publish(topic, Setpoint(frame=loop.frame, values={
                "main_coil_current_a": i_main, "counter_mass_current_a": 0.0},
                switches={"main_coil_connected": False}), qos=0)
            truth.append(await loop.run_seconds(1.0 / RATE_HZ))
        truth.append(await loop.run_seconds(2.0))
        commands, seen = drained(hw, HwActuatorCommand), drained(events, Event)
    assert commands and all(c.relays == [True] for c in commands)
    z = np.concatenate([t["z_m"] for t in truth])
    assert np.abs(z).max() < 1e-6
    after = await status_of(loop, "current_source",
                            lambda st: st.counters.get("relay_refused", 0) > 0, 5.0)
    assert after.state == "armed" and after.detail["main_coil_connected"] is True
    refused = after.counters["relay_refused"]
    assert 1 <= refused <= 50                    # newest frame wins: some spoofs were skipped
    assert after.counters["rejected"] - before.counters["rejected"] == refused
    assert [e.kind for e in seen].count("relay_refused") == 1
    assert not [e for e in seen if e.kind in ("trip", "safe", "stale")]


async def test_restarted_servo_takes_up_the_load_where_it_left_it(nist4):
    """Issue 17 finding 9: a servo restarted under load (1 kg on, force mode) came back idle,
    commanded 0 A at the armed slew (0.1 A/s) and forgot the masses; the coil hit its stops.
    Here the supervisor restarts a killed servo while the simulator is paused (a restart
    quicker than the current source's stale time): the new servo holds what the current source
    produces, from the DAQ's readback of the source monitors (resolution 153 nA), resumes force
    mode bumplessly (the coil at the null) and reports the persisted masses."""
    stack, loop = nist4
    await loop.command("servo", "mode", mode="force")
    await loop.command("servo", "mass", test=True, aux=False)
    dac = main_source_dac()
    async with loop.bus.listen(loop.bus.topics.hw("main_source"), qos=0) as hw:
        held = np.zeros(0)
        for _ in range(20):  # until the 1 kg hangs on the coil (an approach may come first)
            await loop.run_seconds(1.0, record=False)
            held = np.concatenate([held, [dac.to_value(*c.codes) for c in drained(hw, HwActuatorCommand)]])
            if held.size > 2 * RATE_HZ and held[-1] > 3e-3:
                break
        await loop.run_seconds(2.0, record=False)
        await loop.sim("pause")
        held = np.concatenate([held, [dac.to_value(*c.codes) for c in drained(hw, HwActuatorCommand)]])
    i_before = held[-1]
    assert i_before > 3e-3
    # the loop's own excursion of the commanded current over its last second, held loaded
    loop_ptp_a = float(np.ptp(held[-int(RATE_HZ):]))
    servo = stack.child_of("servo")
    old = await status_of(loop, "servo")
    os.kill(servo.proc.pid, signal.SIGKILL)
    await status_of(loop, "servo", lambda st: st.online and st.session > old.session, 30.0)
    async with loop.bus.listen(loop.bus.topics.hw("main_source"), qos=0) as hw, \
            loop.bus.listen(loop.bus.topics.event("current_source")) as events:
        await loop.sim("resume")
        tr = await loop.run_seconds(3.0)
        commands = drained(hw, HwActuatorCommand)
        while not commands or commands[-1].frame < loop.frame:   # the last ones on their way
            commands.append(decode((await hw.get(5.0))[1], HwActuatorCommand))
        seen = drained(events, Event)
    commanded = np.array([dac.to_value(*c.codes) for c in commands])
    state = await loop.command("servo", "state")
    assert state["mode"] == "force" and state["test_mass_on"] and not state["aux_on"]
    assert commanded.size >= 0.99 * 3.0 * RATE_HZ   # (a loaded machine may drop one to the observer)
    # no step: within the loop's own excursion (or 1 uA, ~7 readback steps, if that is less)
    step = np.abs(commanded - i_before).max()
    assert step < max(loop_ptp_a, 1e-6), (step, loop_ptp_a)
    assert np.abs(tr["z_m"]).max() < 1e-6
    assert not [e for e in seen if e.kind in ("trip", "safe", "stale")]


async def test_killed_servo_sends_the_current_source_safe_and_is_restarted(nist4):
    """The servo dies and nobody restarts it at once: the current source stops hearing
    setpoints, counts the frames (simulated time), holds the current, then ramps it to zero,
    answering every frame from the clock once the servo is silent: the simulator never waits
    for it (issue 17 finding 11: it stayed silent 10 frames, the simulator counted misses and
    dropped it). Just before, a setpoint tagged frame + 1e9 and a sensor frame tagged frame + 1e6
    (finding 1: they blinded its stale detection; finding 2: the sensor frame put damping and
    theta_z safe) are refused. The supervisor then restarts the servo: a new session, with the
    persisted masses, holding what the (now safe) source produces: the coil is at its stop, so
    it waits in ``hold`` for an operator."""
    stack, loop = nist4
    await loop.command("servo", "mode", mode="force")
    await loop.run_seconds(2.0, record=False)
    before = await loop.sim("stats")
    frame = before["frame"]
    async with loop.bus.listen("kb/hil/+/event") as sub:
        await loop.bus.publish(loop.bus.topics.setpoint("servo"), Setpoint(
            frame=frame + 10**9, values={"main_coil_current_a": 6.9e-3,
                                         "counter_mass_current_a": 0.0}), qos=0)
        await loop.bus.publish(loop.bus.topics.hw("sensors"), HwSensorFrame(
            frame=frame + 10**6, fringe_count=[0] * 4, fringe_phase_rad=[0.0] * 4,
            psd_v=[0.0] * 6), qos=0)
        await loop.run_seconds(0.5, record=False)
        spoofed = drained(sub, Event)
    assert not [e for e in spoofed if e.kind in ("stale", "safe")], spoofed
    # refused by the tag check where it was read; a daemon whose socket read brought a newer
    # real frame in the same batch skips it unread (the newest frame wins), so not every one
    # need report it
    rejected = {e.service for e in spoofed if e.kind == "rejected" and "frame" in e.text}
    assert rejected and rejected <= {"daq", "current_source", "damping", "theta_z"}, spoofed
    servo = stack.child_of("servo")
    old_pid, restarts = servo.proc.pid, servo.restarts
    stack.max_restarts = restarts                    # hold the supervisor back for now
    async with loop.bus.listen(loop.bus.topics.event("current_source")) as events, \
            loop.bus.listen(loop.bus.topics.hw("main_source"), qos=0) as hw:
        os.kill(old_pid, signal.SIGKILL)
        stale = await events.expect(Event, lambda e: e.kind == "stale", timeout_s=60.0)
        assert stale.severity == "warning"
        # held for hold_s (1 s), then ramped to zero at the safe slew (5 mA/s, <= 15 mA); the
        # wheel, no longer held, swings to its stop, its EMF driving current through the coil
        tr = await loop.run_seconds(6.0)
        commands = drained(hw, HwActuatorCommand)
    dac = main_source_dac()
    commanded = np.array([dac.to_value(*c.codes) for c in sorted(commands, key=lambda c: c.frame)
                          if c.frame >= 0])
    assert abs(commanded[0]) > 1e-4 and commanded[-1] == 0.0
    assert np.abs(np.diff(commanded)).max() <= 5e-3 / RATE_HZ + dac.fine_lsb
    assert abs(tr["i_main_reg_a"][-1]) < 1e-6
    status = await status_of(loop, "current_source",
                             lambda st: st.detail["main_coil_current_a"] == 0.0, 10.0)
    assert status.state in ("safe", "tripped"), status.state   # the wheel swings once unheld
    after = await loop.sim("stats")
    assert after["counters"]["misses"] == before["counters"]["misses"]
    assert after["counters"]["dropped"] == before["counters"]["dropped"]
    stack.max_restarts = 5
    for _ in range(100):
        if servo.running and servo.proc.pid != old_pid:
            break
        await asyncio.sleep(0.1)
    assert servo.proc.pid != old_pid and servo.restarts == restarts + 1
    restarted = await status_of(loop, "servo", lambda st: st.online and st.detail["mode"] == "hold", 30.0)
    assert restarted.detail["test_mass_on"] is True and restarted.detail["aux_on"] is False


async def test_restarted_simulator_is_answered_without_a_command(nist4):
    """issue 17, finding 4: the actuators registered only when they connected, so a restarted
    lockstep simulator waited for them forever (no frame for 8 s until a manual ``kibble cmd
    sim register``). With no hardware frame for a second they say hello again. Runs last of
    the module's stack: the new simulator is a new plant."""
    stack, loop = nist4
    sim = stack.child_of("sim")
    old_pid = sim.proc.pid
    async with loop.bus.listen(loop.bus.topics.status("sim")) as statuses:
        old = await statuses.expect(Status, lambda st: st.online, timeout_s=10.0)
        os.kill(old_pid, signal.SIGKILL)
        new = await statuses.expect(
            Status, lambda st: st.online and st.session != old.session and st.detail["frame"] > 20,
            timeout_s=30.0)
    assert sim.proc.pid != old_pid
    assert set(new.detail["registered"].split(",")) == {"cm_source", "damping", "main_source",
                                                        "theta_z_hv"}


@pytest.mark.asyncio(loop_scope="function")
async def test_efb_holds_1_mg_and_refuses_hv_above_the_pressure_limit(broker, tmp_path):
    async with Stack("efb", clock="lockstep", rate_hz=RATE_HZ, broker_url=broker.url,
                     instrument="hil-efb", seed=2, run_dir=tmp_path, progress=lambda line: None):
        async with BusLoop(broker.url, "hil-efb", RATE_HZ) as loop:
            await loop.wait_frames()
            out = await S.efb_null(loop, 15.0, settle_s=8.0)
            assert out["null_rms_m"] <= 0.3e-9
            async with loop.bus.listen(loop.bus.topics.event("hv_source")) as events:
                await loop.sim("set_pressure", pressure_pa=5.0)
                trip = await events.expect(Event, lambda e: e.kind == "trip", timeout_s=30.0)
            assert "pressure" in trip.text
            tr = await loop.run_seconds(2.0)
            assert abs(tr["v_out_v"][-1]) < 1e-3       # ramped to zero at the HV slew
            with pytest.raises(ValueError, match="pressure"):
                await loop.command("hv_source", "arm")
