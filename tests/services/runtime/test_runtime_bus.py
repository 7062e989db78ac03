"""The service runtime over a real broker, with the service in the test's own event loop:
parameters (list, get, set, reject, revert, persist), invalid input, heartbeat, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import msgspec
import pytest

from kibble.bus_schema.codec import decode, encode
from kibble.bus_schema.messages import (
    DaqFrame, Event, HwSensorFrame, ParamList, Setpoint, Status,
)
from kibble.services.runtime.client import BusClient, follow
from kibble.services.runtime.service import ServiceConfig
from tests.svc_example import ExampleService

pytestmark = pytest.mark.broker

HEARTBEAT_S = 0.2


@pytest.fixture
def instrument() -> str:
    """A fresh instrument id per test, so retained messages of other tests never show up."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def config(broker, instrument, tmp_path) -> ServiceConfig:
    return ServiceConfig(broker=broker.url, instrument=instrument, state_dir=tmp_path,
                         heartbeat_s=HEARTBEAT_S, reconnect_min_s=0.05, reconnect_max_s=0.5)


@contextlib.asynccontextmanager
async def running(service: ExampleService, timeout_s: float = 10.0):
    """Run ``service`` until the block ends, then stop it gracefully."""
    task = asyncio.create_task(service.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(service.connected.wait(), timeout_s)
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, timeout_s)


@contextlib.asynccontextmanager
async def tool(config: ServiceConfig, client_id: str = "pytest-operator"):
    async with BusClient(config.broker, config.instrument, client_id=client_id) as bus:
        yield bus


# ------------------------------------------------------------------------ parameters


@pytest.mark.amqtt
async def test_params_listed_retained_and_by_command(config):
    async with running(ExampleService(config)) as svc, tool(config) as bus:
        async with bus.listen(svc.topics.params("example")) as sub:
            plist = await sub.expect(ParamList, timeout_s=3)
        names = [p.name for p in plist.params]
        assert names == ["gain", "window", "mode", "enabled", "firmware"]
        gain = plist.params[0]
        assert (gain.type, gain.value, gain.unit, gain.min, gain.max) == ("float", 1.0, "V/m", 0.0, 10.0)
        assert gain.doc == "output per metre of input"
        assert plist.params[2].choices == ["normal", "hold"]
        assert plist.params[4].read_only

        reply = await bus.request("example", "param.list", timeout_s=3)
        assert reply.ok
        listed = {p["name"]: p for p in reply.result["params"]}
        assert listed["window"]["value"] == 5 and listed["window"]["max"] == 100


@pytest.mark.amqtt
async def test_param_set_is_replied_audited_applied_and_republished(config):
    async with running(ExampleService(config)) as svc, tool(config) as bus:
        frames_topic = svc.topics.frame("example")
        async with bus.listen(svc.topics.event("example")) as events, \
                bus.listen(svc.topics.params("example")) as params, \
                bus.listen(frames_topic) as frames:
            await params.expect(ParamList, timeout_s=3)  # the retained one, before the change
            t0 = time.time()
            reply = await bus.request("example", "param.set", {"name": "gain", "value": 2.5},
                                      timeout_s=3)
            assert reply.ok, reply.error
            assert reply.result == {"name": "gain", "old": 1.0, "value": 2.5}

            audit = await events.expect(Event, lambda e: e.kind == "audit", timeout_s=3)
            assert audit.data["param"] == "gain"
            assert (audit.data["old"], audit.data["new"]) == (1.0, 2.5)
            assert audit.data["client_id"] == "pytest-operator"
            assert t0 - 1 <= audit.data["t_utc_s"] <= time.time() + 1

            plist = await params.expect(ParamList, timeout_s=3)
            assert {p.name: p.value for p in plist.params}["gain"] == 2.5

            assert svc.gain == 2.5
            assert svc.applied == [("gain", 1.0, 2.5)]
            await bus.publish(svc.topics.setpoint("driver"),
                              Setpoint(frame=7, values={"x_m": 0.02}), qos=1)
            out = await frames.expect(DaqFrame, lambda f: f.frame == 7, timeout_s=3)
            assert out.coil_z_m == pytest.approx(0.05)

        got = await bus.request("example", "param.get", {"name": "gain"}, timeout_s=3)
        assert got.ok and got.result == {"name": "gain", "value": 2.5, "unit": "V/m"}


@pytest.mark.amqtt
@pytest.mark.parametrize("name,value,words", [
    ("gain", 11.0, ["gain", "above the maximum 10.0"]),
    ("gain", -0.5, ["gain", "below the minimum 0.0"]),
    ("gain", "fast", ["gain", "expected a number"]),
    ("window", 2.5, ["window", "expected an integer"]),
    ("mode", "turbo", ["mode", "not one of normal, hold"]),
    ("enabled", 3, ["enabled", "expected true or false"]),
    ("firmware", "2.0", ["firmware", "read-only"]),
    ("nonesuch", 1, ["no parameter 'nonesuch'", "gain"]),
])
async def test_param_set_rejected_with_clear_message(config, name, value, words):
    async with running(ExampleService(config)) as svc, tool(config) as bus:
        before = dict(svc.params.values)
        async with bus.listen(svc.topics.event("example")) as events:
            reply = await bus.request("example", "param.set", {"name": name, "value": value},
                                      timeout_s=3)
            assert not reply.ok
            for word in words:
                assert word in reply.error
            ev = await events.expect(Event, lambda e: e.kind == "command_rejected", timeout_s=3)
            assert ev.severity == "warning" and words[0] in ev.text
        assert svc.params.values == before
        assert svc.applied == []
        assert svc.params.history == []


async def test_param_revert_undoes_last_change(config):
    async with running(ExampleService(config)) as svc, tool(config) as bus:
        for value in (3.0, 4.0):
            assert (await bus.request("example", "param.set", {"name": "gain", "value": value})).ok
        assert (await bus.request("example", "param.set", {"name": "mode", "value": "hold"})).ok
        reply = await bus.request("example", "param.revert", timeout_s=3)
        assert reply.ok and reply.result == {"name": "mode", "old": "hold", "value": "normal"}
        reply = await bus.request("example", "param.revert", timeout_s=3)
        assert reply.ok and reply.result == {"name": "gain", "old": 4.0, "value": 3.0}
        assert svc.gain == 3.0 and svc.mode == "normal"
        assert svc.applied[-1] == ("gain", 4.0, 3.0)
        await bus.request("example", "param.revert", timeout_s=3)
        reply = await bus.request("example", "param.revert", timeout_s=3)
        assert not reply.ok and "no parameter change to revert" in reply.error
        assert svc.gain == 1.0


async def test_params_persist_across_restart_and_session_increases(config):
    async with running(ExampleService(config)) as first, tool(config) as bus:
        assert (await bus.request("example", "param.set", {"name": "gain", "value": 7.25})).ok
        assert (await bus.request("example", "param.set", {"name": "window", "value": 9})).ok
        session1 = first.session
    second = ExampleService(config)
    assert second.session == session1 + 1
    assert (second.gain, second.window) == (7.25, 9)
    async with running(second), tool(config) as bus:
        async with bus.listen(second.topics.status("example")) as sub:
            status = await sub.expect(Status, lambda s: s.online, timeout_s=3)
        assert status.session == session1 + 1
        got = await bus.request("example", "param.get", {"name": "gain"}, timeout_s=3)
        assert got.result["value"] == 7.25
    third = ExampleService(ServiceConfig(**{**config.__dict__, "restore": False}))
    assert third.gain == 1.0 and third.session == session1 + 2


async def test_state_file_value_out_of_range_is_refused_with_warning(config):
    path = config.state_dir / config.instrument / "example.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"service": "example", "session": 4,
                                "params": {"gain": 99.0, "window": 12}}))
    svc = ExampleService(config)
    assert svc.gain == 1.0 and svc.window == 12 and svc.session == 5
    async with tool(config) as bus, bus.listen(svc.topics.event("example")) as events:
        async with running(svc):
            ev = await events.expect(Event, lambda e: e.kind == "restore", timeout_s=3)
    assert ev.severity == "warning"
    assert "gain" in ev.text and "above the maximum 10.0" in ev.text


# ------------------------------------------------------------------------ commands


@pytest.mark.amqtt
async def test_service_commands_and_unknown_command(config):
    async with running(ExampleService(config)), tool(config) as bus:
        reply = await bus.request("example", "echo", {"a": 1, "b": "x"}, timeout_s=3)
        assert reply.ok and reply.result == {"args": {"a": 1, "b": "x"}}
        reply = await bus.request("example", "fail", timeout_s=3)
        assert not reply.ok and reply.error == "fail was asked to fail"
        reply = await bus.request("example", "warp.drive", timeout_s=3)
        assert not reply.ok and "unknown command 'warp.drive'" in reply.error
        assert "param.set" in reply.error and "echo" in reply.error


# ------------------------------------------------------------------------ invalid input


async def test_invalid_messages_dropped_counted_reported_and_service_goes_on(config):
    cfg = ServiceConfig(**{**config.__dict__, "event_burst": 5, "event_rate_per_s": 2.0})
    async with running(ExampleService(cfg)) as svc, tool(cfg) as bus:
        topic = svc.topics.setpoint("driver")
        raw = bus._client  # raw publishes: BusClient.publish only sends valid messages
        async with bus.listen(svc.topics.event("example")) as events, \
                bus.listen(svc.topics.frame("example")) as frames:
            nan_frame = msgspec.msgpack.encode([1, 1, 0.0, 0.0, 3, {"x_m": float("nan")}])
            wrong_type = encode(HwSensorFrame(frame=2))
            for payload in (b"\xc1\xff garbage", wrong_type, nan_frame):
                await raw.publish(topic, payload, qos=1)
            seen = [await events.expect(Event, lambda e: e.kind == "rejected", timeout_s=3)
                    for _ in range(3)]
            assert "not valid MessagePack" in seen[0].text
            assert "Setpoint" in seen[1].text
            assert "finite" in seen[2].text and "values" in seen[2].text
            assert all(e.severity == "warning" and e.data["topic"] == topic for e in seen)

            await bus.publish(topic, Setpoint(frame=5, values={"x_m": 0.015}), qos=1)
            assert (await frames.expect(DaqFrame, timeout_s=3)).coil_z_m == pytest.approx(0.015)
            assert svc.counters["rejected"] == 3

            for k in range(100):  # a flood: a bounded number of events, the rest counted
                await raw.publish(topic, b"\xc1" * (k + 1), qos=0)
            await bus.publish(topic, Setpoint(frame=6, values={"x_m": 0.02}), qos=1)
            assert (await frames.expect(DaqFrame, timeout_s=3)).frame == 6
            await asyncio.sleep(0.6)  # let one token refill: the next event reports the count
            await raw.publish(topic, b"\xc1", qos=1)
            flood_events = []
            with contextlib.suppress(Exception):
                while True:
                    flood_events.append(await events.expect(
                        Event, lambda e: e.kind == "rejected", timeout_s=0.5))
        assert svc.counters["rejected"] == 104
        assert 1 <= len(flood_events) <= 6
        reported = sum(e.data.get("suppressed_since_last", 0) for e in flood_events)
        assert reported + len(flood_events) == 101
        assert svc.counters["events_suppressed"] == reported
        assert svc.counters["frames_in"] == 2


# ------------------------------------------------------------------------ heartbeat


async def test_heartbeat_rate_counters_and_loop_timing(config):
    async with running(ExampleService(config)) as svc, tool(config) as bus:
        async with bus.listen(svc.topics.status("example")) as sub:
            await sub.expect(Status, timeout_s=3)  # retained
            first = await sub.expect(Status, timeout_s=3)
            period = 0.01
            t_end = time.monotonic() + 1.0
            k = 0
            beats = []
            while time.monotonic() < t_end:
                await bus.publish(svc.topics.setpoint("driver"),
                                  Setpoint(frame=k, values={"x_m": 1.0}), qos=0)
                k += 1
                await asyncio.sleep(period)
                while not sub.queue.empty():
                    beats.append(await sub.expect(Status, timeout_s=0.1))
            beats.append(await sub.expect(Status, timeout_s=1))
        span = beats[-1].t_mono_s - first.t_mono_s
        rate = (beats[-1].heartbeat - first.heartbeat) / span
        assert rate == pytest.approx(1 / HEARTBEAT_S, rel=0.25)
        last = beats[-1]
        assert last.online and last.state == "idle" and last.service == "example"
        assert last.counters["frames_in"] > 0.7 * k and last.counters["frames_out"] > 0.7 * k
        assert set(last.counters) >= {"rejected", "late", "reconnects", "commands",
                                      "handler_errors", "publish_failed", "events_suppressed"}
        busy = [b for b in beats if b.loop_period_mean_s > 0]
        assert busy, "no heartbeat carried loop timing while frames flowed"
        for b in busy:
            assert 0.5 * period < b.loop_period_mean_s < 10 * period
            assert b.loop_period_max_s >= b.loop_period_mean_s
            assert b.loop_period_jitter_s >= 0
        assert last.detail == {"mode": "normal", "gain": 1.0}


# ------------------------------------------------------------------------ broker restart


@pytest.mark.amqtt
async def test_reconnects_after_broker_restart(broker, config):
    svc = ExampleService(config)
    seen: list[Status] = []
    losses: list[str] = []

    async def view() -> None:  # what kibble up's table and supervisor follow
        async for _, payload in follow(config.broker, config.instrument,
                                       svc.topics.status("example"), retry_s=0.1,
                                       on_lost=losses.append):
            seen.append(decode(payload, Status))

    viewer = asyncio.create_task(view())
    try:
        async with running(svc), tool(config) as bus0:
            assert (await bus0.request("example", "param.set", {"name": "gain", "value": 2.0})).ok
            # the follower up before the broker goes (on a slow broker it may still be
            # connecting, and a connect that fails is not a lost broker)
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert seen, "the follower saw no status"
            t_stop = time.monotonic()
            t_stop_utc = time.time()
            await asyncio.to_thread(broker.stop)
            deadline = time.monotonic() + 5
            while not svc.disconnects and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert svc.disconnects, "on_disconnect did not run after the broker stopped"
            noticed_s = svc.disconnects[0] - t_stop
            assert noticed_s < 1.5 * HEARTBEAT_S + 0.2, f"disconnect noticed after {noticed_s:.2f} s"
            assert not svc.connected.is_set()
            await asyncio.sleep(0.3)  # a few refused reconnects
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(svc.connected.wait(), 10)
            assert svc.counters["reconnects"] >= 1
            async with tool(config) as bus:
                async with bus.listen(svc.topics.status("example")) as sub:
                    status = await sub.expect(Status, lambda s: s.online, timeout_s=3)
                assert status.counters["reconnects"] >= 1
                async with bus.listen(svc.topics.params("example")) as sub:
                    plist = await sub.expect(ParamList, timeout_s=3)
                assert {p.name: p.value for p in plist.params}["gain"] == 2.0
                reply = await bus.request("example", "param.get", {"name": "gain"}, timeout_s=3)
                assert reply.ok and reply.result["value"] == 2.0
            # the follower lost the broker once, reconnected and caught up (a fresh heartbeat)
            deadline = time.monotonic() + 5
            while not any(st.t_utc_s > t_stop_utc and st.online for st in seen) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(losses) == 1 and "lost the broker" in losses[0], losses
            assert any(st.t_utc_s > t_stop_utc and st.online for st in seen)
    finally:
        viewer.cancel()
        if not broker.broker.running:
            await asyncio.to_thread(broker.start)
    assert len(svc.connects) >= 2


async def test_connected_service_does_not_spin_the_event_loop(config):
    """After publishing, no socket writer may stay registered on an always-writable socket
    (that makes the event loop spin and burns a core per service)."""
    async with running(ExampleService(config)) as svc, tool(config) as bus:
        for k in range(20):
            await bus.publish(svc.topics.setpoint("driver"), Setpoint(frame=k, values={"x_m": 1.0}))
        await bus.request("example", "param.get", {"name": "gain"}, timeout_s=3)
        await asyncio.sleep(0.1)
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(1.0)
        cpu_fraction = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    assert svc.counters["frames_out"] == 20
    assert cpu_fraction < 0.3, f"idle service used {cpu_fraction:.0%} of a core"


async def test_handler_error_is_counted_reported_and_service_goes_on(config):
    async with running(ExampleService(config)) as svc, tool(config) as bus:
        topic = svc.topics.setpoint("driver")
        async with bus.listen(svc.topics.event("example")) as events, \
                bus.listen(svc.topics.frame("example")) as frames:
            await bus.publish(topic, Setpoint(frame=1, values={"boom": 1.0}), qos=1)
            ev = await events.expect(Event, lambda e: e.kind == "handler_error", timeout_s=3)
            assert ev.severity == "alarm" and "RuntimeError" in ev.text and "boom requested" in ev.text
            await bus.publish(topic, Setpoint(frame=2, values={"x_m": 0.03}), qos=1)
            assert (await frames.expect(DaqFrame, timeout_s=3)).coil_z_m == pytest.approx(0.03)
        assert svc.counters["handler_errors"] == 1


def test_bus_bench_finishes_without_loss(broker):
    from kibble.services.bench.suite import bench_bus

    t0 = time.monotonic()
    result = bench_bus(broker=broker.url, duration_s=1.0, rate_hz=500.0)
    assert time.monotonic() - t0 < 30
    assert result["bus_frames_sent"] == 500 and result["bus_frames_lost"] == 0
    assert 0 < result["bus_hop_p50_ms"] <= result["bus_hop_p99_ms"] <= result["bus_hop_max_ms"] < 1000
