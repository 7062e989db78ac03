"""Plans and the run engine on the in-process closed loop (real daemons + plant, no broker):
the procedures of the papers, shortened, produce the documents and the data they should, and
pause, abort and failure leave the balance safe."""

import asyncio

import numpy as np
import pytest

from kibble.bus_schema.codec import decode
from kibble.bus_schema.messages import HwActuatorCommand, LoopFrame
from kibble.services import analysis as an
from kibble.services.harness import campaign as C
from kibble.services.plans import engine as P
from kibble.services.harness.inprocess import InProcessStack

RATE_HZ = 500.0


class Documents:
    def __init__(self) -> None:
        self.docs: list[tuple[str, dict]] = []

    def __call__(self, name: str, doc: dict) -> None:
        self.docs.append((name, doc))

    def names(self) -> list[str]:
        return [n for n, _ in self.docs]

    def events(self, stream: str) -> list[dict]:
        uid = next(d["uid"] for n, d in self.docs if n == "descriptor" and d["name"] == stream)
        return [d for n, d in self.docs if n == "event" and d["descriptor"] == uid]


def aborting_on_first_event(stack: InProcessStack, docs: Documents) -> P.RunEngine:
    """An engine that collects into ``docs`` and aborts as the first event arrives."""
    engine = P.RunEngine(stack, emit=docs)

    def emit(name: str, doc: dict) -> None:
        docs(name, doc)
        if name == "event":
            engine.abort("operator abort")

    engine.emit = emit
    return engine


async def started(model: str, noise: str = "published", **params) -> InProcessStack:
    stack = InProcessStack(model, rate_hz=RATE_HZ, seed=9, params=params, noise=noise)
    await stack.start()
    return stack


SERVO_MOTION = {"sweep_speed_m_per_s": {"value": 1e-3}, "sweep_accel_m_per_s2": {"value": 5e-4},
                "sweep_jerk_m_per_s3": {"value": 0.0}}
"""What the servo answers velocity_set's param.get with (its defaults)."""


def test_plans_are_readable_generators_with_the_papers_counts():
    """Without any hardware: drive the generator by hand, answering every command."""
    plan = P.force_set()
    verbs, reply = [], None
    while True:
        try:
            msg = plan.send(reply)
        except StopIteration:
            break
        verbs.append((msg.command, msg.request, dict(msg.args)))
        reply = {"duration_s": 1.0, "delta_kg": 0.0} if msg.command == "cmd" else None
    weighings = [a for v, r, a in verbs if v == "measure"]
    assert len(weighings) == 17
    assert [w["info"]["mass_on"] for w in weighings] == [k % 2 == 0 for k in range(17)]
    assert sum(w["info"]["mass_on"] for w in weighings) == 9
    assert all(w["seconds"] == 58.0 for w in weighings)
    erases = [a for v, r, a in verbs if v == "cmd" and r == "erase"]
    assert len(erases) == 17                                   # after every exchange
    plan = P.velocity_set()
    sweeps = []
    reply = None
    while True:
        try:
            msg = plan.send(reply)
        except StopIteration:
            break
        if msg.command == "measure":
            sweeps.append((msg.args["info"]["direction"], msg.args["seconds"]))
        reply = (SERVO_MOTION.get(msg.args.get("name")) if msg.request == "param.get" else
                 {"duration_s": 84.0, "speed_m_per_s": 1e-3, "delta_kg": 0.5}) if msg.command == "cmd" else None
    assert [d for d, _ in sweeps] == ["down", "up"] * 15
    # the windows are timed from the servo's reply: 84 s for 80 mm at 1 mm/s accelerates for
    # 4 s at either end; less the 1 s margins, 74 s of constant velocity
    assert all(seconds == pytest.approx(74.0) for _, seconds in sweeps)


async def test_force_set_measures_mass_on_and_off_currents():
    stack = await started("nist4", servo={"erase_decay_s": 1.0, "erase_n_decay": 2.0,
                                          "erase_freq_hz": 1.0})
    docs = Documents()
    progress = []
    try:
        engine = P.RunEngine(stack, emit=docs, progress=progress.append)
        stop = await engine.run("force_set", {"weighings": 3, "window_s": 2.0, "settle_s": 2.0},
                                config={"servo": {"kp_n_per_m": 5.33e4}})
    finally:
        stack.close()
    assert stop["exit_status"] == "success", stop["reason"]
    assert docs.names()[0] == "start" and docs.names()[-1] == "stop"
    assert docs.docs[0][1]["config_hash"] == P.config_hash({"servo": {"kp_n_per_m": 5.33e4}})
    events = docs.events("weighing")
    assert [e["info"]["mass_on"] for e in events] == [True, False, True]
    currents = [np.mean(e["data"]["main_coil_current_a"]) for e in events]
    frames = [len(e["data"]["frame"]) for e in events]
    assert frames == [int(2.0 * RATE_HZ)] * 3
    # 1 kg on the pan: the DAQ's current moves by m g / Bl (the plant's Bl, not the servo's)
    p = stack.plant.params
    delta = currents[0] - currents[1]
    assert delta == pytest.approx(p["main_side.test_mass_kg"] * p["sim.g_m_per_s2"] / 710.0, rel=2e-2)
    assert currents[0] == pytest.approx(currents[2], abs=1e-3 * abs(delta))
    assert progress[-1].sim_s == pytest.approx(stop["sim_s"])
    assert progress[-1].total_s > 0


async def test_velocity_set_sweeps_alternate_with_damping_open_at_constant_velocity():
    stack = await started("nist4")
    docs = Documents()
    try:
        stop = await P.RunEngine(stack, emit=docs).run(
            "velocity_set", {"sweeps": 2, "travel_m": 0.008})
    finally:
        stack.close()
    assert stop["exit_status"] == "success", stop["reason"]
    events = docs.events("sweep")
    assert [e["info"]["direction"] for e in events] == ["down", "up"]
    for e, sign in zip(events, (-1.0, 1.0)):
        v = np.array(e["data"]["coil_vz_m_per_s"])
        assert np.mean(v) == pytest.approx(sign * 1e-3, rel=1e-3)     # constant velocity only
        bl = np.array(e["data"]["coil_voltage_v"]) / v
        assert np.median(bl) == pytest.approx(710.0, rel=0.02)         # U / v is Bl
    assert stack.services["servo"].mode == "force"
    assert stack.services["damping"].relays_closed


async def test_abort_runs_the_safe_ending():
    stack = await started("nist4")
    docs = Documents()
    engine = aborting_on_first_event(stack, docs)
    try:
        stop = await engine.run("velocity_set", {"sweeps": 4, "travel_m": 0.008})
        assert stop["exit_status"] == "abort" and stop["reason"] == "operator abort"
        assert stop["num_events"] == {"sweep": 1}
        assert stack.services["servo"].mode == "force"          # at the null, in force mode
        assert stack.services["damping"].relays_closed
    finally:
        stack.close()


async def test_a_refused_command_fails_the_run_safely():
    stack = await started("nist4")
    docs = Documents()
    try:
        # 200 mm of travel: the servo refuses the parameter (at most 90 mm)
        stop = await P.RunEngine(stack, emit=docs).run("velocity_set", {"travel_m": 0.2})
        assert stop["exit_status"] == "fail"
        assert "servo refused param.set" in stop["reason"] and "sweep_travel_m" in stop["reason"]
        assert stack.services["servo"].mode == "force"
    finally:
        stack.close()


async def test_pause_holds_between_messages_and_resume_goes_on():
    stack = await started("nist4")
    docs = Documents()
    engine = P.RunEngine(stack, emit=docs)
    try:
        task = asyncio.create_task(engine.run("force_set", {"weighings": 2, "window_s": 1.0,
                                                             "settle_s": 1.0, "erase": False}))
        await asyncio.sleep(0)
        engine.pause()
        await asyncio.sleep(0.2)
        assert engine.state == "paused" and not task.done()
        frame = stack.frame
        await asyncio.sleep(0.1)
        assert stack.frame == frame                  # nothing runs while paused
        engine.resume()
        stop = await asyncio.wait_for(task, 60)
    finally:
        stack.close()
    assert stop["exit_status"] == "success"
    assert [e["info"]["mass_on"] for e in docs.events("weighing")] == [True, False]


def test_unknown_plan_or_argument_is_refused_at_once():
    engine = P.RunEngine(loop=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown plan"):
        asyncio.run(engine.run("no_such_plan"))
    with pytest.raises(TypeError):
        asyncio.run(engine.run("force_set", {"weighingz": 3}))


async def test_efb_weighing_both_polarities_give_the_surface_potential_and_the_mass():
    # quiet: one pair of 5 s windows gives V_s within 2 mV only while the force the loop carries
    # wanders ~1e-10 N between windows; on the published plant it wanders ~2e-10 N (the
    # interferometer's flicker that the link follows, the floor tilt), ~1 mV on V_s per pair,
    # which the campaign's many pairs average (test_campaign.py)
    stack = await started("efb", noise="quiet")
    docs = Documents()
    try:
        stop = await P.RunEngine(stack, emit=docs).run("efb_weighing",
                                                       {"settle_s": 10.0, "window_s": 5.0})
        kappa = stack.plant.kappa(0.0)
        p = stack.plant.params
    finally:
        stack.close()
    assert stop["exit_status"] == "success", stop["reason"]
    v = {(e["info"]["polarity"], e["info"]["index"]): np.mean(e["data"]["coil_voltage_v"])
         for e in docs.events("weighing")}
    assert len(v) == 6
    # F = kappa (V - V_s)^2: reversing the polarity, (V+ + V-) / 2 = V_s
    v_s = (v["+", 0] + v["-", 0]) / 2
    assert v_s == pytest.approx(p["capacitor.surface_potential_V"], abs=2e-3)
    for pol in "+-":
        unloaded = (v[pol, 0] + v[pol, 2]) / 2
        m_g = kappa * ((v[pol, 1] - v_s) ** 2 - (unloaded - v_s) ** 2)
        assert m_g / p["sim.g_m_per_s2"] == pytest.approx(p["masses.small_kg"], rel=2e-3)


def _drive(plan, answer):
    """Run a plan generator by hand: ``answer(msg)`` is the reply to each message."""
    msgs, reply = [], None
    while True:
        try:
            msg = plan.send(reply)
        except StopIteration:
            return msgs
        msgs.append(msg)
        reply = answer(msg)


def _efb_answer(msg):
    if msg.command != "cmd":
        return None
    return {"state": {"mode": "force", "z_ref_m": 1e-4, "trajectory": "", "trajectory_left_s": 0.0},
            "param.get": {"value": 5e-5 if msg.args.get("name") == "gradient_speed_m_per_s" else 4e-6},
            "move": {"duration_s": 10.0}}.get(msg.request, {})


def test_efb_gradient_and_run_plans_have_the_papers_points_and_bracketing():
    msgs = _drive(P.efb_gradient(), _efb_answer)
    points = [m.args["info"] for m in msgs if m.command == "measure"]
    assert all(m.obj == "gradient" for m in msgs if m.command == "measure")
    assert len(points) == 22 and [p["sweep"] for p in points] == [0] * 11 + [1] * 11
    z = np.array([p["z_set_m"] for p in points])
    # 11 equidistant points within 2 mm about the weighing position, up then down
    assert np.diff(z[:11]) == pytest.approx(np.full(10, 2e-4), rel=1e-9)
    assert np.all(z[11:] == z[:11][::-1]) and z.mean() == pytest.approx(1e-4, rel=1e-12)
    modes = [m.args["mode"] for m in msgs if m.command == "cmd" and m.request == "mode"]
    assert modes == ["gradient", "force"]
    last_move = [m for m in msgs if m.command == "cmd" and m.request == "move"][-1]
    assert last_move.args["z_m"] == 1e-4                     # back to the weighing position
    estimate = sum(m.args["seconds"] for m in msgs if m.command == "estimate")
    waited = sum(m.args["seconds"] for m in msgs if m.command in ("wait", "measure"))
    assert estimate > 0 and all(m.args["seconds"] == 10.0 for m in msgs if m.command == "measure")
    assert waited == pytest.approx(22 * 10.0 + 23 * 5.0 + 23 * 10.0)   # the fake moves: 10 s each

    msgs = _drive(P.efb_run(runs=6, gradient_every=3), lambda m: _efb_answer(m) if m.command == "cmd" and
                  m.request != "mass" else {"delta_kg": 0.0} if m.command == "cmd" else None)
    blocks = []
    for m in msgs:
        if m.command == "measure" and (not blocks or blocks[-1][0] != m.obj):
            blocks.append([m.obj, 0])
        if m.command == "measure":
            blocks[-1][1] += 1
    assert blocks == [["gradient", 22], ["weighing", 18], ["gradient", 22], ["weighing", 18], ["gradient", 22]]
    for bad, match in (({"points": 6}, "points must be an integer >= 7"),
                       ({"sweeps": 1}, "sweeps must be an integer >= 2"),
                       ({"span_m": 0.0}, "span_m must be a positive number")):
        with pytest.raises(ValueError, match=match):
            next(P.efb_gradient(**bad))


GRADIENT_RATE_HZ = 100.0
"""The gradient plan's tests run at 100 Hz (461 s simulated in ~15 s; the handover at 1 kHz is
in test_efb_gradient.py)."""


async def test_efb_gradient_plan_recovers_the_plants_dcdz_with_the_link_on_the_auxiliary_electrode():
    """The shortened determination (the paper's 11 points within 2 mm, 2 sweeps, 3 bridge readings
    per point) against the simulator's dC/dz at the weighing position, computed from efb.toml:
    c1 = dcdz_F_per_m + temp_coeff (T - T_ref) (the profile is 1 at z = 0), T the balance
    thermometer; and its curvature d2C/dz2 = c1 a1 / profile_scale against the fit's
    second-order coefficient, with the fit's uncertainty propagated here from its residuals."""
    stack = InProcessStack("efb", rate_hz=GRADIENT_RATE_HZ, seed=9)
    await stack.start()
    docs = Documents()
    loop_frames = stack.tap(stack.topics.frame("servo"))
    hw = stack.tap(stack.topics.hw("hv"))
    try:
        stop = await P.RunEngine(stack, emit=docs).run("efb_gradient", C.EFB_TEST_GRADIENT)
        # hv_source moves the relay once the output has ramped to zero (the auxiliary
        # electrode's 217 V at 200 V a frame)
        await stack.run_frames(3, record=False)
        hv, servo = stack.services["hv_source"], stack.services["servo"]
        p = stack.plant.params
        assert stop["exit_status"] == "success", stop["reason"]
        assert hv.guard.state == "armed" and hv.counters["rejected"] == 0
        assert servo.mode == "force" and hv.to_main
    finally:
        stack.close()
    events = docs.events("gradient")
    assert len(events) == 22
    relay = {c.frame: c.relays for c in (decode(b, HwActuatorCommand) for b in hw)}
    assert relay[max(relay)] == [True, True]
    for e in events:
        # every reading taken with the amplifier on the auxiliary electrode
        assert all(relay[f] == [False, True] for f in e["data"]["frame"])
        # the link sits at its point: the loop's residual error 2 s after a move is below
        # 10 nm (the null's noise is ~0.3 nm), 2e-5 of the 0.2 mm spacing; the fit uses the
        # measured positions anyway
        assert np.abs(np.array(e["data"]["coil_z_m"]) - e["info"]["z_set_m"]).max() < 10e-9
    lf = [decode(b, LoopFrame) for b in loop_frames]
    gradient = [f for f in lf if f.mode == "gradient"]
    ref = np.array([f.values["z_ref_m"] for f in gradient])
    assert ref.min() == pytest.approx(-1e-3, abs=1e-12) and ref.max() == pytest.approx(1e-3, abs=1e-12)
    # slewed, never stepped (the servo's 50 um/s), and followed within 2 um throughout
    assert np.abs(np.diff(ref)).max() <= 5e-5 / GRADIENT_RATE_HZ * (1 + 1e-9)
    assert max(abs(f.values["error_m"]) for f in gradient) < 2e-6

    (t0, t1, res), = an.efb_gradients(events)
    temp_c = np.mean([np.mean(e["data"]["temperature_k"]) for e in events]) - 273.15
    c1 = p["capacitor.dcdz_F_per_m"] + p["capacitor.temp_coeff_F_per_m_K"] * (temp_c - p["capacitor.temp_ref_C"])
    assert res.dcdz_f_per_m == pytest.approx(c1, abs=3.0 * res.u_dcdz_f_per_m)
    assert 2e-7 < res.u_dcdz_f_per_m / c1 < 5e-6
    # curvature: d2C/dz2 = 2 a2 / zs^2 of the fit, a2 averaged over the sweeps
    zs = res.z_scale_m
    u_pts = np.array([[np.mean(an.efb_bridge_readings(np.array(e["data"]["sim_time_s"]),
                                                      np.array(e["data"]["coil_z_m"]),
                                                      np.array(e["data"]["capacitance_f"]))[1])
                       for e in events if e["info"]["sweep"] == s] for s in (0, 1)]) / zs
    row = np.array([np.linalg.pinv(np.polynomial.polynomial.polyvander(u, 5))[2] for u in u_pts])
    u_a2 = res.sigma_f * np.sqrt(np.sum(row**2)) / 2
    curv_true = c1 * p["capacitor.profile_coeffs"][0] / p["capacitor.profile_scale_m"]
    assert 2 * res.coef_sweep[:, 2].mean() / zs**2 == pytest.approx(curv_true, abs=4 * 2 * u_a2 / zs**2)


async def test_abort_in_gradient_mode_hands_the_link_back_at_the_weighing_position():
    stack = InProcessStack("efb", rate_hz=GRADIENT_RATE_HZ, seed=3)
    await stack.start()
    docs = Documents()
    engine = aborting_on_first_event(stack, docs)
    try:
        stop = await engine.run("efb_gradient", {"settle_s": 1.0, "window_s": 1.5})
        assert stop["exit_status"] == "abort" and stop["num_events"] == {"gradient": 1}
        tr = await stack.run_seconds(1.0)
        servo, hv = stack.services["servo"], stack.services["hv_source"]
        assert servo.mode == "force" and servo.ref[0, 0] == 0.0 and hv.to_main
        assert hv.guard.state == "armed"
        assert np.abs(tr["z_m"]).max() < 1e-7
        # once hv_source has ramped the auxiliary electrode's 217 V down (200 V a frame) and
        # moved the relay, it is at 0 V: only its 20 mV surface potential pulls
        # (1/2 dC_aux/dz V_s^2 = 4e-14 N)
        assert tr["f_aux_n"][2:].max() < 1e-13
    finally:
        stack.close()


async def test_the_bus_loop_on_a_daemon_counts_the_daq_frames_that_arrive_after_it_starts():
    """The sequencer's loop (the bus one, on the daemon's connection): a wait or a measurement
    counts the DAQ frames handed to it from its start on (those before are not time of this
    step), a measurement returns exactly those frames, a refused request raises with its
    reason, and a stack without frames fails after ``frame_timeout_s``."""
    from kibble.bus_schema.messages import DaqFrame, Reply
    from kibble.services.runtime.client import BusError, Refused
    from kibble.services.plans.mqtt_loop import BusLoop

    sent = []

    async def request(service: str, command: str, args: dict) -> Reply:
        sent.append((service, command, args))
        return Reply(id="1", ok=command != "explode", result={"echo": args}, error="no such thing")

    loop = BusLoop.on_node(request, rate_hz=100.0, frame_timeout_s=0.2)
    for k in range(5):
        loop.take_daq_frame(DaqFrame(frame=k))             # before: nobody waits for them
    measuring = asyncio.create_task(loop.measure(0.03))    # 3 frames at 100 Hz
    await asyncio.sleep(0)
    for k in range(5, 10):
        loop.take_daq_frame(DaqFrame(frame=k, coil_z_m=k * 1e-9))
    data = await measuring
    assert data["frame"].tolist() == [5, 6, 7] and data["coil_z_m"][0] == 5e-9
    waiting = asyncio.create_task(loop.run_seconds(0.02))
    await asyncio.sleep(0)
    loop.take_daq_frame(DaqFrame(frame=10))
    await asyncio.sleep(0)
    assert not waiting.done()
    loop.take_daq_frame(DaqFrame(frame=11))
    assert await waiting == {}
    assert await loop.command("servo", "mode", mode="force") == {"echo": {"mode": "force"}}
    with pytest.raises(Refused, match="servo refused explode: no such thing"):
        await loop.command("servo", "explode")
    assert sent[0] == ("servo", "mode", {"mode": "force"})
    with pytest.raises(BusError, match="no DAQ frame for 0.2 s"):
        await loop.run_seconds(0.01)


@pytest.mark.parametrize("approach", [False, True])
def test_force_mode_waits_out_the_approach_it_starts_before_the_first_mass_exchange(approach):
    """Where the link had drifted from z_ref_m (the published plant's tilt and thermal drift do
    that while the servo idles), ``mode force`` starts an approach and the servo refuses a mass
    exchange until it ends: the weighing waits the approach out, and only then exchanges."""
    plan = P.efb_weighing(settle_s=1.0, window_s=1.0)
    assert next(plan).command == "estimate"
    msg = plan.send(None)
    assert (msg.command, msg.obj, msg.request, dict(msg.args)) == ("cmd", "servo", "mode", {"mode": "force"})
    reply = {"mode": "force", "frame": 100}
    if approach:
        reply |= {"trajectory": "approach", "duration_s": 2.0, "end_frame": 501}
    msg = plan.send(reply)
    if approach:
        assert msg.command == "wait" and msg.args["seconds"] == pytest.approx(2.5)
        msg = plan.send(None)
    assert (msg.command, msg.request) == ("cmd", "param.set")
    msg = plan.send({"name": "polarity", "value": "+"})
    assert (msg.command, msg.request, dict(msg.args)) == ("cmd", "mass", {"test": False})
