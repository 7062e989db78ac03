"""Plans and the run engine on the in-process closed loop (real daemons + plant, no broker):
the procedures of the papers, shortened, produce the documents and the data they should, and
pause, abort and failure leave the balance safe."""

import asyncio

import numpy as np
import pytest

from kibble.services import plans as P
from kibble.services.inprocess import InProcessStack

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


async def started(model: str, **params) -> InProcessStack:
    stack = InProcessStack(model, rate_hz=RATE_HZ, seed=9, params=params)
    await stack.start()
    return stack


def test_plans_are_readable_generators_with_the_papers_counts():
    """Without any hardware: drive the generator by hand, answering every command."""
    plan = P.force_set()
    verbs, reply = [], None
    while True:
        try:
            msg = plan.send(reply)
        except StopIteration:
            break
        verbs.append((msg.verb, msg.target, dict(msg.args)))
        reply = {"duration_s": 1.0, "delta_kg": 0.0} if msg.verb == "cmd" else None
    weighings = [a for v, t, a in verbs if v == "measure"]
    assert len(weighings) == 17
    assert [w["info"]["mass_on"] for w in weighings] == [k % 2 == 0 for k in range(17)]
    assert sum(w["info"]["mass_on"] for w in weighings) == 9
    assert all(w["seconds"] == 58.0 for w in weighings)
    erases = [a for v, t, a in verbs if v == "cmd" and a["_command"] == "erase"]
    assert len(erases) == 17                                   # after every exchange
    plan = P.velocity_set()
    sweeps = []
    reply = None
    while True:
        try:
            msg = plan.send(reply)
        except StopIteration:
            break
        if msg.verb == "measure":
            sweeps.append(msg.args["info"]["direction"])
        reply = {"duration_s": 84.0, "delta_kg": 0.5} if msg.verb == "cmd" else None
    assert sweeps == ["down", "up"] * 15


async def test_force_set_measures_mass_on_and_off_currents():
    stack = await started("nist4", servo={"erase_decay_s": 1.0, "erase_n_decay": 2.0,
                                          "erase_freq_hz": 1.0})
    docs = Documents()
    progress = []
    try:
        engine = P.RunEngine(stack, emit=docs, progress=progress.append)
        stop = await engine.run("force_set", {"weighings": 3, "window_s": 2.0, "settle_s": 2.0},
                                config={"servo": {"kp_n_m": 5.33e4}})
    finally:
        stack.close()
    assert stop["exit_status"] == "success", stop["reason"]
    assert docs.names()[0] == "start" and docs.names()[-1] == "stop"
    assert docs.docs[0][1]["config_hash"] == P.config_hash({"servo": {"kp_n_m": 5.33e4}})
    events = docs.events("weighing")
    assert [e["info"]["mass_on"] for e in events] == [True, False, True]
    currents = [np.mean(e["data"]["main_coil_current_a"]) for e in events]
    frames = [len(e["data"]["frame"]) for e in events]
    assert frames == [int(2.0 * RATE_HZ)] * 3
    # 1 kg on the pan: the DAQ's current moves by m g / Bl (the plant's Bl, not the servo's)
    p = stack.plant.params
    delta = currents[0] - currents[1]
    assert delta == pytest.approx(p["main_side.test_mass_kg"] * p["sim.g_m_s2"] / 710.0, rel=2e-2)
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
        v = np.array(e["data"]["coil_vz_m_s"])
        assert np.mean(v) == pytest.approx(sign * 1e-3, rel=1e-3)     # constant velocity only
        bl = np.array(e["data"]["coil_voltage_v"]) / v
        assert np.median(bl) == pytest.approx(710.0, rel=0.02)         # U / v is Bl
    assert stack.services["servo"].mode == "force"
    assert stack.services["damping"].relays_closed


async def test_abort_runs_the_safe_ending():
    stack = await started("nist4")
    docs = Documents()
    engine = P.RunEngine(stack, emit=docs)

    def abort_on_first_sweep(name: str, doc: dict) -> None:
        docs(name, doc)
        if name == "event":
            engine.abort("operator abort")

    engine.emit = abort_on_first_sweep
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
    stack = await started("efb")
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
        assert m_g / p["sim.g_m_s2"] == pytest.approx(p["masses.small_kg"], rel=2e-3)
