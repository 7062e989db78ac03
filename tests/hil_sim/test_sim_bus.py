"""The HIL simulator on the bus (hil_sim/server.py, adapter.py, devices.py, clock.py): lockstep
determinism over a real broker (in-process and through ``kibble sim``), rejection of bad actuator
commands, simulator control commands, the realtime clock's rate, zero-order hold and latency
statistics."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from typing import Callable

import msgspec
import pytest

from kibble.bus_schema.codec import decode, encode
from kibble.bus_schema.messages import Event, HwActuatorCommand, HwSensorFrame, SimTruth, Status
from kibble.bus_schema.topics import Topics
from kibble.bus_schema.transport import make_client, publish_now
from kibble.hil_sim.devices import EFB_DEVICES, NIST4_DEVICES, TRUTH_NAMES
from kibble.hil_sim.params import frame_overrides, load_overrides_file
from kibble.hil_sim.server import SimServer
from kibble.hil_sim.clock import LatencyTracker, LockstepGate, RealtimeSchedule
from kibble.hil_sim.testing import QUIET_EFB
from kibble.services.runtime.client import BusClient

Answer = Callable[[int], "tuple[list[int], list[bool]]"]

NIST4_ECHO: dict[str, Answer] = {
    "main_source": lambda k: ([300 + k % 5, (7 * k) % 1000 - 500], [True]),
    "cm_source": lambda k: ([-(k % 3), 11], [True]),
    "damping": lambda k: ([(k * (j + 1)) % 200 - 100 for j in range(6)], [True]),
    "theta_z_hv": lambda k: ([0, 0, 50, 50, 0, 0], [k % 2 == 0]),
}
EFB_ECHO: dict[str, Answer] = {"hv": lambda k: [[(k * 1013) % 40000 - 20000], [True, True]]}


# ----------------------------------------------------------------------------- helpers


class Echo:
    """An actuator client: answers every sensor frame k with one command per device, tagged k.

    ``before(k)`` may return extra ``(topic, payload)`` messages sent before the answers (e.g.
    a mass-lift command or a malformed command). Records every sensor frame and truth message.
    """

    def __init__(self, url: str, instrument: str, answers: dict[str, Answer],
                 before: Callable[[int], list[tuple[str, bytes]]] | None = None,
                 answer: bool = True) -> None:
        self.url = url
        self.topics = Topics(instrument)
        self.answers = answers
        self.before = before
        self.answer = answer
        self.frames: list[HwSensorFrame] = []
        self.arrivals_s: list[float] = []
        self.truth: list[SimTruth] = []
        self.events: list[Event] = []
        self.ready = asyncio.Event()

    def command(self, device: str, k: int, codes: list[int], relays: list[bool]) -> bytes:
        return encode(HwActuatorCommand(frame=k, device=device, codes=codes, relays=relays,
                                        seq=k + 1, t_mono_s=time.monotonic()))

    async def run(self) -> None:
        t_sensors, t_truth = self.topics.hw("sensors"), self.topics.sim("truth")
        t_event = self.topics.event("sim")
        async with make_client(self.url, f"echo-{id(self)}") as client:
            for topic in (t_sensors, t_truth, t_event):
                await client.subscribe(topic, qos=0 if topic != t_event else 1)
            if self.answer:
                for device, fn in self.answers.items():   # hello: registers the device
                    publish_now(client, self.topics.hw(device), self.command(device, -1, *fn(0)))
            self.ready.set()
            async for message in client.messages:
                topic = message.topic.value
                if topic == t_truth:
                    self.truth.append(decode(message.payload, SimTruth))
                    continue
                if topic == t_event:
                    self.events.append(decode(message.payload, Event))
                    continue
                frame = decode(message.payload, HwSensorFrame)
                self.frames.append(frame)
                self.arrivals_s.append(time.monotonic())
                k = frame.frame
                for extra_topic, payload in (self.before(k) if self.before else []):
                    publish_now(client, extra_topic, payload)
                if self.answer:
                    for device, fn in self.answers.items():
                        publish_now(client, self.topics.hw(device), self.command(device, k, *fn(k)))


@contextlib.asynccontextmanager
async def running(*parts):
    """Run SimServers and Echo clients as tasks; stop and await them on exit."""
    tasks = []
    try:
        for part in parts:
            if isinstance(part, SimServer):
                tasks.append(asyncio.create_task(part.run(install_signal_handlers=False)))
                await asyncio.wait_for(part.connected.wait(), 10)
            else:
                tasks.append(asyncio.create_task(part.run()))
                await asyncio.wait_for(part.ready.wait(), 10)
        yield
    finally:
        for part, task in zip(parts, tasks):
            if isinstance(part, SimServer):
                part.stop()
            else:
                task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                raise result


async def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    t_end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_online(url: str, instrument: str, timeout_s: float = 30.0) -> Status:
    """The simulator's retained status once it says online (it is subscribed by then)."""
    async with BusClient(url, instrument) as bus:
        async def first_online() -> Status:
            async for _, payload in bus.subscribe(bus.topics.status("sim")):
                status = decode(payload, Status)
                if status.online:
                    return status
        return await asyncio.wait_for(first_online(), timeout_s)


def comparable(frame: msgspec.Struct) -> bytes:
    """The frame's bytes with the wall-clock header fields zeroed (they differ per run)."""
    return encode(msgspec.structs.replace(frame, t_mono_s=0.0, t_utc_s=0.0))


async def lockstep_run(url: str, instrument: str, model: str, answers: dict[str, Answer],
                       n_frames: int, seed: int, rate_hz: float = 1000.0, before=None,
                       params=None) -> tuple[Echo, SimServer, float]:
    sim = SimServer(model, "lockstep", rate_hz=rate_hz, seed=seed, broker_url=url,
                    instrument=instrument, expect=tuple(answers), max_frames=n_frames,
                    params=params)
    echo = Echo(url, instrument, answers, before)
    task = asyncio.create_task(sim.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(sim.connected.wait(), 10)
        t0 = time.perf_counter()
        async with running(echo):
            await asyncio.wait_for(task, 30)   # max_frames reached: the server stops itself
            elapsed = time.perf_counter() - t0
            await wait_until(lambda: len(echo.frames) >= n_frames, 5, "the last frames")
    finally:
        sim.stop()
        await task
    return echo, sim, elapsed


# ----------------------------------------------------------------------------- pure logic


def test_lockstep_gate_answers_misses_and_drop():
    gate = LockstepGate(drop_after=2)
    assert gate.register("a") and gate.register("b") and not gate.register("a")
    gate.open(0)
    assert not gate.answer("a", -1)          # an older tag is not the answer
    assert not gate.answer("a", 0)           # b still missing
    assert gate.answer("b", 0) and gate.complete
    gate.open(1)
    gate.answer("a", 1)
    assert gate.timeout() == (["b"], [])
    gate.open(2)
    gate.register("c")                       # registered mid-frame: waited for from frame 3
    assert gate.pending == {"a", "b"}
    gate.answer("a", 2)
    assert gate.timeout() == (["b"], ["b"])  # second consecutive miss: dropped
    assert gate.registered == {"a", "c"} and gate.misses["b"] == 2


def test_realtime_schedule_is_drift_free():
    s = RealtimeSchedule(0.001, max_lag_s=0.05)
    s.start(10.0)
    for _ in range(1000):                    # every frame starts 0.4 ms late: no accumulation
        s.frame_started(s.deadline_s + 0.0004)
    assert s.deadline_s == pytest.approx(11.0, abs=1e-9) and s.late == 0 and s.slips == 0
    s.frame_started(s.deadline_s + 0.2)      # far behind: restart the schedule, count a slip
    assert s.slips == 1 and s.late == 1


def test_latency_tracker_counts_first_answer_per_frame():
    lt = LatencyTracker(ring=8)
    for k in range(20):
        lt.published(k, 100.0 + k)
    assert lt.answered("dev", 19, 119.002) == pytest.approx(0.002)
    assert lt.answered("dev", 19, 119.5) is None     # second answer to the same frame
    assert lt.answered("dev", 3, 200.0) is None      # older than the ring
    assert lt.answered("dev", -1, 200.0) is None
    for k in range(12, 19):
        lt.answered("other", k, 100.0 + k + 0.001 * (k - 11))
    s = lt.summary("other")
    assert s.n == 7 and s.p50_ms == pytest.approx(4.0) and s.max_ms == pytest.approx(7.0)
    assert lt.summary().n == 8


def test_frame_rate_must_be_whole_integration_steps(tmp_path):
    with pytest.raises(ValueError, match="whole number of 10000 Hz"):
        frame_overrides("nist4", 300.0, None)
    assert frame_overrides("efb", 200.0, {"wheel.q": 1})["sim.frame_rate_hz"] == 200.0
    f = tmp_path / "p.toml"
    f.write_text('"noise.ground" = false\n[wheel]\nq = 300\n[coil]\nbl0_T_m = { value = 700.0, source = "x" }\n')
    assert load_overrides_file(f) == {"noise.ground": False, "wheel.q": 300, "coil.bl0_T_m": 700.0}
    with pytest.raises(ValueError, match="unknown parameter 'wheel.nope'"):
        SimServer("nist4", params={"wheel.nope": 1})
    with pytest.raises(ValueError, match="cannot expect device 'mass_lift'"):
        SimServer("nist4", expect=("mass_lift",))


def test_device_tables_match_the_plants():
    assert [d.name for d in NIST4_DEVICES] == ["main_source", "cm_source", "damping",
                                               "theta_z_hv", "mass_lift"]
    assert [d.name for d in EFB_DEVICES] == ["hv", "mass_lift"]
    hv = EFB_DEVICES[0]
    assert hv.check([2 ** 23 - 1], [True, True]) is None
    assert "outside its 24-bit range" in hv.check([2 ** 23], [True, True])
    assert "takes 2 relays" in hv.check([0], [True])
    assert "z_m" in TRUTH_NAMES["nist4"] and "m_test_kg" in TRUTH_NAMES["nist4"]


# ----------------------------------------------------------------------------- over the broker


@pytest.mark.broker
async def test_lockstep_runs_are_bit_identical(broker):
    n = 300
    mass = Topics("det").hw("mass_lift")
    before = lambda k: ([(mass, encode(HwActuatorCommand(frame=k, device="mass_lift",  # noqa: E731
                                                        relays=[True, False])))]
                        if k == 100 else [])
    runs = [await lockstep_run(broker.url, "det", "nist4", NIST4_ECHO, n, seed=7, before=before)
            for _ in range(2)]
    (e1, s1, t1), (e2, s2, _) = runs
    assert [f.frame for f in e1.frames] == list(range(n))
    assert [comparable(f) for f in e1.frames] == [comparable(f) for f in e2.frames]
    assert [comparable(t) for t in e1.truth] == [comparable(t) for t in e2.truth]
    assert len(e1.truth) == n
    for s in (s1, s2):
        assert s.counters["misses"] == 0 and s.counters["rejected"] == 0
        assert s.counters["frames_in"] == 4 * (n + 1) + 1
    # the commands drove the plant: main current follows the codes, the mass went on at 100
    i_main = [t.values["i_main_reg_a"] for t in e1.truth]
    assert i_main[-1] > 0 and i_main[50] != i_main[51]
    m_test = [t.values["m_test_kg"] for t in e1.truth]
    assert m_test[100] == 0.0 and m_test[-1] > 0.0
    # a third run with another seed differs (the comparison above is not vacuous)
    e3, _, _ = await lockstep_run(broker.url, "det", "nist4", NIST4_ECHO, 20, seed=8)
    assert comparable(e3.frames[5]) != comparable(e1.frames[5])
    print(f"lockstep nist4 echo: {n / t1:.0f} steps/s")


@pytest.mark.broker
async def test_cli_lockstep_matches_in_process(broker, subprocess_env):
    n = 200
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kibble.services.cli.main", "sim", "--model", "efb", "--clock",
        "lockstep", "--rate", "500", "--seed", "3", "--frames", str(n), "--expect", "hv",
        "--param", "noise.ground=false", "--broker", broker.url, "--instrument", "cli",
        env=subprocess_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"sim: efb lockstep at 500 Hz" in line
        await wait_online(broker.url, "cli")       # then the hello of the echo is heard
        echo = Echo(broker.url, "cli", EFB_ECHO)
        async with running(echo):
            rc = await asyncio.wait_for(proc.wait(), 30)
            await wait_until(lambda: len(echo.frames) >= n, 5, "the frames of kibble sim")
        assert rc == 0, (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    ref, _, _ = await lockstep_run(broker.url, "cli", "efb", EFB_ECHO, n, seed=3, rate_hz=500.0,
                                   params={"noise.ground": False})
    assert len(echo.frames) == n
    assert [comparable(f) for f in echo.frames] == [comparable(f) for f in ref.frames]
    assert echo.frames[-1].sim_time_s == pytest.approx(n / 500.0)
    # retained status of the finished subprocess: offline
    async with BusClient(broker.url, "cli") as bus:
        items = await bus.collect(bus.topics.status("sim"), 0.3)
    status = decode(items[-1][1], Status)
    assert status.online is False and status.counters["frames_out"] == n


@pytest.mark.broker
async def test_bad_actuator_commands_are_rejected_and_the_last_good_is_held(broker):
    topics = Topics("bad")
    damping = topics.hw("damping")
    bad = {
        10: (damping, encode(HwActuatorCommand(frame=10, device="damping", codes=[40000] + [0] * 5,
                                               relays=[True]))),
        11: (damping, encode(HwActuatorCommand(frame=11, device="damping", codes=[1, 2],
                                               relays=[True]))),
        12: (damping, encode(HwActuatorCommand(frame=12, device="main_source", codes=[0, 0],
                                               relays=[True]))),
        13: (damping, b"\x93\x01\xff garbage"),
        14: (damping, msgspec.msgpack.encode([1, 14, 0.0, 0.0, 14, "damping", [float("nan")], [True]])),
    }
    answers = dict(NIST4_ECHO)
    good = lambda k: ([5, 6, 7, 8, 9, 10], [True])  # noqa: E731
    # frames 10..14: the echo sends only the bad command for damping (it still answers k)
    answers["damping"] = lambda k: good(k) if k not in bad or k in (13, 14) else ([0] * 6, [True])

    sim = SimServer("nist4", "lockstep", rate_hz=1000, seed=1, broker_url=broker.url,
                    instrument="bad", expect=tuple(NIST4_ECHO), lockstep_timeout_s=0.5)

    class BadEcho(Echo):
        def command(self, device, k, codes, relays):
            if device == "damping" and k in (10, 11, 12):   # the bad one replaces the answer
                return bad[k][1]
            return super().command(device, k, codes, relays)

    echo = BadEcho(broker.url, "bad", answers,
                   before=lambda k: [bad[k]] if k in (13, 14) else [])
    async with running(sim, echo):
        await wait_until(lambda: len(echo.frames) >= 60, 20, "60 frames")
        async with BusClient(broker.url, "bad") as bus:
            sim._set_paused(True)
            reply = await bus.request("sim", "stats")
    assert reply.ok
    res = reply.result
    assert res["counters"]["rejected"] == 5
    # a rejected command still answers frame k for its device, except the one naming another
    # device (frame 12): that is a miss, after the 0.5 s timeout
    assert res["counters"]["misses"] == 1 and res["misses_by_device"]["damping"] == 1
    assert res["held"]["damping"]["codes"] == [5, 6, 7, 8, 9, 10]
    rejected = [e for e in echo.events if e.kind == "rejected"]
    assert len(rejected) >= 4                       # rate limit: burst of 5 per kind
    reasons = " | ".join(e.data["reason"] for e in rejected)
    assert "outside its 16-bit range" in reasons and "takes 6 codes" in reasons
    assert "names device 'main_source'" in reasons and "at least length 6" in reasons
    assert "Expected `int`, got `float`" in reasons                 # the NaN code
    assert all(e.severity == "warning" and e.data["topic"] == damping for e in rejected)
    frames = [f.frame for f in echo.frames]
    assert frames == list(range(len(frames)))       # the simulation kept running, no gap
    assert all(math.isfinite(v) for t in echo.truth for v in t.values.values())


@pytest.mark.broker
async def test_sim_control_commands_and_pause(broker):
    sim = SimServer("nist4", "realtime", rate_hz=500, seed=2, broker_url=broker.url,
                    instrument="ctl", params={"main_side.lift_ramp_s": 0.05})
    echo = Echo(broker.url, "ctl", {}, answer=False)
    async with running(sim, echo), BusClient(broker.url, "ctl") as bus:
        await wait_until(lambda: len(echo.truth) > 20, 5, "truth")
        assert echo.truth[-1].values["m_test_kg"] == 0.0
        assert echo.truth[-1].values["m_aux_kg"] > 0.0
        reply = await bus.request("sim", "place_mass", {"on": True})
        assert reply.ok and reply.result["test_mass_on_pan"] is True
        reply = await bus.request("sim", "lift_aux", {"on_pan": False})
        assert reply.ok
        # effects are awaited on the frames (a loaded machine delays them), never on a sleep
        await wait_until(lambda: echo.truth[-1].values["m_test_kg"] == pytest.approx(1.0)
                         and echo.truth[-1].values["m_aux_kg"] == 0.0, 5, "the masses moved")
        reply = await bus.request("sim", "set_temperature", {"temperature_k": 300.0})
        assert reply.ok
        await wait_until(lambda: echo.truth[-1].values["magnet_temperature_k"]
                         == pytest.approx(300.0, abs=0.01)
                         and echo.frames[-1].temperature_k == pytest.approx(300.0, abs=0.01),
                         5, "the magnet and its sensor at 300 K")
        vx0 = echo.truth[-1].values["vx_m_per_s"]
        reply = await bus.request("sim", "inject_impulse", {"dof": "x", "impulse": 0.05})
        assert reply.ok
        await wait_until(lambda: abs(echo.truth[-1].values["vx_m_per_s"] - vx0) > 1e-3, 5,
                         "the impulse in vx")
        for command, args, err in (
                ("inject_force", {"dof": "q", "value": 1.0, "duration_s": 0.1}, "bad disturbance"),
                ("set_temperature", {}, "missing argument 'temperature_k'"),
                ("place_mass", {"on": 3}, "must be a bool"),
                ("place_mass", {"color": "red"}, "unknown argument"),
                ("register", {"devices": "mass_lift"}, "not a lockstep device"),
                ("fly", {}, "unknown command 'fly'")):
            reply = await bus.request("sim", command, args)
            assert not reply.ok and err in reply.error, (command, reply.error)
        reply = await bus.request("sim", "pause")
        assert reply.ok
        await asyncio.sleep(0.05)
        n_paused = len(echo.frames)
        await asyncio.sleep(0.3)
        assert len(echo.frames) == n_paused        # pause stops the frames
        reply = await bus.request("sim", "resume")
        assert reply.ok
        await wait_until(lambda: len(echo.frames) > n_paused + 20, 2, "frames after resume")
        assert echo.frames[n_paused].frame == echo.frames[n_paused - 1].frame + 1
    controls = [e for e in echo.events if e.kind == "control"]
    assert [e.data["command"] for e in controls][:2] == ["place_mass", "lift_aux"]


@pytest.mark.broker
async def test_realtime_rate_hold_and_latency(broker):
    rate = 100.0   # sim, echo and test share one process and one core: keep it well below its limit
    sim = SimServer("efb", "realtime", rate_hz=rate, seed=4, broker_url=broker.url,
                    instrument="rt", params=QUIET_EFB, heartbeat_s=0.2)
    code = 123_456
    sent = {"n": 0}

    def hv(k):   # answer every frame, with the same code: latency samples and a held value
        sent["n"] += 1
        return [code], [True, True]

    echo = Echo(broker.url, "rt", {"hv": hv})
    async with running(sim, echo), BusClient(broker.url, "rt") as bus:
        await wait_until(lambda: len(echo.frames) > 100, 5, "frames")
        t0 = time.monotonic()
        n0 = len(echo.frames)
        await asyncio.sleep(1.0)
        t1 = time.monotonic()
        counted = len(echo.frames) - n0
        assert counted / (t1 - t0) == pytest.approx(rate, rel=0.03), sim.counters
        k0, k1 = echo.frames[n0].frame, echo.frames[-1].frame
        assert k1 - k0 + 1 == len(echo.frames) - n0          # none lost
        # zero-order hold: stop answering; the plant keeps integrating the last command
        echo.answer = False
        await asyncio.sleep(0.3)
        volts = code * 1000.0 / 2 ** 23
        assert echo.truth[-1].values["v_out_v"] == pytest.approx(volts, rel=1e-6)
        assert echo.frames[-1].dvm_v[0] == pytest.approx(volts, rel=1e-3)
        reply = await bus.request("sim", "stats")
        items = await bus.collect(bus.topics.status("sim"), 0.3)
    lat = reply.result["latency"]["hv"]
    assert lat["n"] > 120
    assert 0.0 < lat["p50_ms"] <= lat["p99_ms"] < 50.0
    assert reply.result["latency_p99_ms"] == lat["p99_ms"]
    assert reply.result["held"]["hv"] == {"codes": [code], "relays": [True, True]}
    status = decode(items[-1][1], Status)
    assert status.online and status.state == "running"
    assert status.detail["latency_p99_ms"] > 0 and status.detail["clock"] == "realtime"
    assert status.detail["steps_per_s"] == pytest.approx(rate, rel=0.1)


@pytest.mark.broker
async def test_lockstep_miss_times_out_and_drops_a_silent_device(broker):
    sim = SimServer("efb", "lockstep", rate_hz=200, seed=5, broker_url=broker.url,
                    instrument="miss", lockstep_timeout_s=0.1, drop_after_misses=2)
    echo = Echo(broker.url, "miss", EFB_ECHO)
    async with running(sim, echo):
        await wait_until(lambda: len(echo.frames) >= 20, 5, "frames")
        echo.answer = False                                  # the device goes silent
        await wait_until(lambda: sim.counters["dropped"] == 1, 3, "the device to be dropped")
        assert sim.counters["misses"] == 2 and "hv" not in sim.gate.registered
        n = len(echo.frames)
        await asyncio.sleep(0.3)
        assert len(echo.frames) == n                         # nobody to wait for: no frames
        echo.answer = True                                   # it speaks again: re-registered
        async with make_client(broker.url, "late-hello") as client:
            publish_now(client, Topics("miss").hw("hv"), echo.command("hv", -1, [0], [True, True]))
            await wait_until(lambda: len(echo.frames) > n + 20, 5, "frames after re-registering")
    kinds = [e.kind for e in echo.events]
    assert kinds.count("miss") == 2 and "dropped" in kinds and kinds.count("registered") == 2
