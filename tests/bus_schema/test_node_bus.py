"""The bus node (bus_schema/node.py) over a real broker, for both of its kinds, a daemon
(:class:`~kibble.services.runtime.service.Service`) and the simulator: replies only inside the caller's
instrument tree, a non-finite argument answered with its name, and a crash seen on the bus as
an ``offline`` status."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid

import msgspec
import pytest

from kibble.bus_schema.codec import decode, encode
from kibble.bus_schema.messages import Command, Reply, Status
from kibble.bus_schema.node import BusNode
from kibble.bus_schema.topics import Topics
from kibble.bus_schema.transport import make_client
from kibble.hil_sim.server import SimServer
from kibble.services.runtime.client import BusClient
from kibble.services.runtime.service import ServiceConfig
from tests.svc_example import ExampleService

pytestmark = pytest.mark.broker


@pytest.fixture
def instrument() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def make_node(kind: str, broker, instrument: str, tmp_path) -> BusNode:
    if kind == "service":
        return ExampleService(ServiceConfig(broker=broker.url, instrument=instrument,
                                            state_dir=tmp_path, heartbeat_s=0.2))
    return SimServer("nist4", "lockstep", rate_hz=200, broker_url=broker.url,
                     instrument=instrument, heartbeat_s=0.2)


# a command each kind knows, answered ok
GOOD = {"service": ("echo", {"a": 1}), "sim": ("stats", {})}


@contextlib.asynccontextmanager
async def serving(node: BusNode):
    task = asyncio.create_task(node.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(node.connected.wait(), 10)
        yield task
    finally:
        node.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


class Recorder:
    """Every message on the broker (``#``) while the block runs: (topic, payload)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[str, bytes]] = []

    async def __aenter__(self) -> "Recorder":
        self._client = make_client(self.url, f"rec-{uuid.uuid4().hex[:8]}")
        await self._client.__aenter__()
        await self._client.subscribe("#", qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def _collect(self) -> None:
        async for message in self._client.messages:
            self.seen.append((message.topic.value, bytes(message.payload)))

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._client.__aexit__(None, None, None)

    def replies(self, topic: str) -> list[Reply]:
        return [decode(p, Reply) for t, p in self.seen if t == topic]


async def wait_for(cond, timeout_s: float, what: str) -> None:
    t_end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", ["service", "sim"])
async def test_reply_to_outside_the_instruments_reply_topics_is_refused(kind, broker, instrument, tmp_path):
    """issue 17, finding 6 (confused deputy) and finding 4 (the simulator crashed on ``kb/#``):
    a command whose ``reply_to`` is a wildcard, another tree, another instrument, a hardware
    command or a setpoint topic is not run; the refusal goes to the node's own reply topic;
    nothing is published where the caller asked; the node goes on answering."""
    node = make_node(kind, broker, instrument, tmp_path)
    topics = Topics(instrument)
    bad = ["kb/#", f"kb/{instrument}/+/reply", "outside/tree/x", "kb/other-inst/tool/reply",
           topics.hw("main_source"), topics.setpoint("servo"), topics.status(node.name),
           f"kb/{instrument}/tool/reply/deeper"]
    command, args = GOOD[kind]
    async with serving(node) as task, Recorder(broker.url) as rec, \
            make_client(broker.url, "pytest-attacker") as raw:
        await asyncio.sleep(0.2)
        for i, reply_to in enumerate(bad):
            await raw.publish(topics.cmd(node.name), encode(Command(
                id=f"bad-{i}", command=command, args=args, reply_to=reply_to)), qos=1)
        own = topics.reply(node.name)
        await wait_for(lambda: len(rec.replies(own)) >= len(bad), 10, "the refusals")
        async with BusClient(broker.url, instrument) as bus:  # still answering, on a good topic
            reply = await bus.request(node.name, command, args, timeout_s=5)
        assert reply.ok, reply.error
        assert not task.done()
    refusals = {r.id: r for r in rec.replies(own)}
    for i in range(len(bad)):
        r = refusals[f"bad-{i}"]
        assert not r.ok and "reply_to" in r.error and "not a reply topic" in r.error, r.error
    status_topic = topics.status(node.name)  # the node's own heartbeat, never a reply
    published_on = {t for t, _ in rec.seen if t != status_topic}
    assert not published_on & set(bad), published_on & set(bad)
    assert not any("id" in msgspec.msgpack.decode(p) for t, p in rec.seen if t == status_topic)
    assert node.counters["replies_refused"] == len(bad)
    assert node.counters["handler_errors"] == 0


@pytest.mark.parametrize("kind", ["service", "sim"])
async def test_non_finite_argument_is_answered_with_its_name(kind, broker, instrument, tmp_path):
    """issue 17, finding 14: a command with a NaN or infinite argument is refused with a
    reply that names the argument (it used to be dropped whole: the caller timed out)."""
    node = make_node(kind, broker, instrument, tmp_path)
    topics = Topics(instrument)
    command = "echo" if kind == "service" else "set_pressure"
    async with serving(node), BusClient(broker.url, instrument) as bus:
        reply_topic = topics.reply("tool-nan")
        async with bus.listen(reply_topic) as replies:
            for cid, value in (("nan", math.nan), ("inf", [1.0, -math.inf])):
                payload = msgspec.msgpack.encode({
                    "schema": 1, "id": cid, "command": command, "reply_to": reply_topic,
                    "args": {"pressure_pa": value}})
                await bus._client.publish(topics.cmd(node.name), payload, qos=1)
                reply = await replies.expect(Reply, lambda r, cid=cid: r.id == cid, timeout_s=5)
                assert not reply.ok
                assert "argument 'pressure_pa'" in reply.error and "not finite" in reply.error, reply.error
        assert node.counters["rejected"] == 2


class Crashing(ExampleService):
    """Raises from its background task once connected (a bug in a daemon)."""

    async def background(self) -> None:
        await asyncio.sleep(0.3)
        raise RuntimeError("a bug in the daemon")


async def crashed_status(node: BusNode, url: str, instrument: str, match: str) -> Status:
    """Run ``node`` until it raises (``match``), then its retained status, as anyone connecting
    after the crash sees it."""
    async with BusClient(url, instrument) as bus:
        task = asyncio.create_task(node.run(install_signal_handlers=False))
        with pytest.raises(RuntimeError, match=match):
            await asyncio.wait_for(task, 10)
        async with bus.listen(bus.topics.status(node.name)) as sub:
            return await sub.expect(Status, timeout_s=5)


@pytest.mark.parametrize("kind", ["service", "sim"])
async def test_crash_is_seen_as_an_offline_status_with_the_reason(kind, broker, instrument, tmp_path):
    """issue 17, finding 5: a node that dies of an exception disconnects cleanly, so the broker
    discards its will; the node publishes its ``offline`` status itself, with the reason."""
    if kind == "service":
        node = Crashing(ServiceConfig(broker=broker.url, instrument=instrument,
                                      state_dir=tmp_path, heartbeat_s=0.2))
    else:
        node = make_node(kind, broker, instrument, tmp_path)

        async def boom() -> None:
            await asyncio.sleep(0.3)
            raise RuntimeError("a bug in the simulator")
        node.serve_tasks = lambda: [boom()]
    status = await crashed_status(node, broker.url, instrument, "a bug in the")
    assert status.state == "offline" and not status.online
    assert "RuntimeError: a bug in the" in status.detail["exit"]


@pytest.mark.parametrize("kind", ["service", "sim"])
async def test_crash_with_a_failing_status_still_publishes_offline(kind, broker, instrument, tmp_path):
    """When building the node's own status is what fails, the fallback offline status (with
    the node's session) still goes out: it lacked the required ``session`` before, so its
    construction raised inside the suppressing block and nothing was published."""
    node = make_node(kind, broker, instrument, tmp_path)

    def broken_status(online: bool = True, interval: bool = False) -> Status:
        raise RuntimeError("status is broken")

    async def boom() -> None:
        await asyncio.sleep(0.3)
        node.status = broken_status
        raise RuntimeError("a bug in the node")
    node.serve_tasks = lambda: [boom()]
    status = await crashed_status(node, broker.url, instrument, "a bug in the node")
    assert status.state == "offline" and not status.online
    assert status.session == node.session
    assert "RuntimeError: a bug in the node" in status.detail["exit"]
