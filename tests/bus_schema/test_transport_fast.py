"""The hand-built QoS 0 publish path and the direct receive path of ``bus_schema/transport.py``,
against a real broker (mosquitto, or amqtt in the ``-m amqtt`` run)."""

from __future__ import annotations

import asyncio
import os

import aiomqtt
import paho.mqtt.client as paho
import pytest

from kibble.bus_schema.transport import (
    _remaining_length, corked, deliver_directly, make_client, publish_now, publish_packet,
)

pytestmark = [pytest.mark.broker, pytest.mark.amqtt]

SIZES = [0, 1, 100, 125, 126, 127, 128, 200, 16_000, 16_383, 16_384, 20_000, 300_000]
"""Payload sizes around the one-, two- and three-byte remaining-length boundaries."""


def _decode_remaining(data: bytes, start: int) -> tuple[int, int]:
    value, shift, i = 0, 0, start
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_remaining_length_round_trips(n):
    encoded = _remaining_length(n)
    assert len(encoded) == 1 + (n > 127) + (n > 16_383) + (n > 2_097_151)
    assert _decode_remaining(encoded, 0) == (n, len(encoded))


@pytest.mark.parametrize("size", [0, 5, 126, 127, 128, 16_383, 16_384, 70_000])
@pytest.mark.parametrize("retain", [False, True])
def test_publish_packet_matches_paho(size, retain):
    """Byte for byte what paho itself sends for a QoS 0 publish (MQTT 3.1.1)."""
    payload = os.urandom(size)
    topic = "kb/test/x/frame"
    sent: list[bytes] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client._sock = object()  # "connected": _send_publish only checks it is there
    client._packet_queue = lambda command, packet, mid, qos, info=None: sent.append(bytes(packet))
    client._send_publish(1, topic.encode(), payload, 0, retain, False)
    client._sock = None
    assert publish_packet(topic, payload, retain) == sent[0]


def test_publish_packet_checks_the_topic():
    for bad in ("", "kb/+/x", "kb/#"):
        with pytest.raises(ValueError):
            publish_packet(bad, b"x")


async def _collect(url: str, topic: str, n: int, ready: asyncio.Event,
                   out: list[aiomqtt.Message]) -> None:
    """An independent receiver: aiomqtt's own queue and paho's own parser."""
    async with aiomqtt.Client(*url.removeprefix("mqtt://").split(":")[:1],
                              port=int(url.rsplit(":", 1)[1]), identifier=f"rx-{os.getpid()}-{id(out)}",
                              protocol=aiomqtt.ProtocolVersion.V311,
                              max_queued_incoming_messages=100_000) as rx:
        await rx.subscribe(topic, qos=0)
        ready.set()
        async for message in rx.messages:
            if message.topic.value != topic:  # amqtt also sends other topics' retained messages
                continue
            out.append(message)
            if len(out) >= n:
                return


async def test_hand_built_publishes_arrive_intact(broker):
    topic = f"kb/fast{os.getpid()}/t/frame"
    payloads = [os.urandom(size) for size in SIZES]
    got: list[aiomqtt.Message] = []
    ready = asyncio.Event()
    rx = asyncio.create_task(_collect(broker.url, topic, len(payloads) + 3, ready, got))
    await asyncio.wait_for(ready.wait(), 10)
    async with make_client(broker.url, f"tx-{os.getpid()}") as tx:
        for payload in payloads:
            assert publish_now(tx, topic, payload)
        with corked(tx):  # three in one write, in order
            for k in range(3):
                assert publish_now(tx, topic, b"corked %d" % k)
        await asyncio.wait_for(rx, 20)
    assert [m.payload for m in got] == payloads + [b"corked 0", b"corked 1", b"corked 2"]
    assert all(m.qos == 0 and m.topic.value == topic for m in got)


async def test_retained_flag(broker):
    topic = f"kb/fast{os.getpid()}/r/status"
    async with make_client(broker.url, f"txr-{os.getpid()}") as tx:
        assert publish_now(tx, topic, b"kept" * 100, retain=True)
        await asyncio.sleep(0.3)
        got: list[aiomqtt.Message] = []
        ready = asyncio.Event()
        await asyncio.wait_for(_collect(broker.url, topic, 1, ready, got), 10)
        assert got[0].payload == b"kept" * 100 and got[0].retain
        assert publish_now(tx, topic, b"", retain=True)  # clears it


async def test_partial_write_is_finished_in_order(broker):
    """A payload too large for one ``send`` (the rest goes through paho's queue), then small
    publishes of both QoS: everything arrives intact and in order."""
    topic = f"kb/fast{os.getpid()}/big/frame"
    big = os.urandom(24 * 1024 * 1024)
    got: list[aiomqtt.Message] = []
    ready = asyncio.Event()
    rx = asyncio.create_task(_collect(broker.url, topic, 4, ready, got))
    await asyncio.wait_for(ready.wait(), 10)
    async with make_client(broker.url, f"txb-{os.getpid()}") as tx:
        assert publish_now(tx, topic, big)
        assert tx._client.want_write()  # the socket took only part of it
        assert publish_now(tx, topic, b"after 1")
        assert publish_now(tx, topic, b"after 2", qos=1)
        with corked(tx):
            assert publish_now(tx, topic, b"after 3")
        await asyncio.wait_for(rx, 60)
    assert got[0].payload == big
    assert [m.payload for m in got[1:]] == [b"after 1", b"after 2", b"after 3"]


async def test_publish_when_not_connected_is_false(broker):
    client = make_client(broker.url, f"txn-{os.getpid()}")
    assert publish_now(client, "kb/x/y/frame", b"1") is False
    assert publish_now(client, "kb/x/y/frame", b"1", qos=1) is False


@pytest.mark.parametrize("every_s", [None, 0.05], ids=["on-readable", "on-timer"])
async def test_direct_delivery_of_a_burst(broker, every_s):
    """deliver_directly parses QoS 0 itself and hands everything else to paho: a burst of
    small, large (several reads) and QoS 1 messages comes out intact and in order, and a
    handler's corked replies go out; the same when the socket is read on a timer (several
    reads per tick, megabytes waiting between ticks)."""
    inst = f"fast{os.getpid()}"
    topic, echo = f"kb/{inst}/d/frame", f"kb/{inst}/d/echo"
    received: list[tuple[str, bytes]] = []
    rx_client = make_client(broker.url, f"rxd-{os.getpid()}")

    def on_message(t: str, payload: bytes) -> None:
        if t != topic:  # amqtt also sends other topics' retained messages
            return
        received.append((t, payload))
        publish_now(rx_client, echo, payload[:16])

    deliver_directly(rx_client, on_message, every_s=every_s)
    burst = []
    for k in range(400):
        size = (5, 300, 20_000, 150_000)[k % 4]
        burst.append((k % 3 == 0, k.to_bytes(4, "big") + os.urandom(size)))
    echoes: list[aiomqtt.Message] = []
    ready = asyncio.Event()
    async with rx_client:
        await rx_client.subscribe(topic, qos=1)
        watcher = asyncio.create_task(_collect(broker.url, echo, len(burst), ready, echoes))
        await asyncio.wait_for(ready.wait(), 10)
        async with make_client(broker.url, f"txd-{os.getpid()}") as tx:
            for qos1, payload in burst:
                assert publish_now(tx, topic, payload, qos=1 if qos1 else 0)
            await asyncio.wait_for(watcher, 60)
    # the broker keeps the order within one QoS (QoS 1 may wait for its in-flight window)
    for qos1 in (False, True):
        sent = [p for q, p in burst if q == qos1]
        assert [p for _, p in received if (p in sent)] == sent
    assert sorted(p for _, p in received) == sorted(p for _, p in burst)
    assert all(t == topic for t, _ in received)
    assert [m.payload for m in echoes] == [p[:16] for _, p in received]


class _Batches:
    """A Receiver that keeps the messages of each batch (one read) apart."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.batches: list[list[bytes]] = []

    def message(self, topic: str, payload: bytes) -> None:
        if topic == self.topic:
            self.batches[-1].append(payload)

    def batch_begin(self) -> None:
        self.batches.append([])

    def batch_end(self) -> None:
        pass

    def batch_flushed(self) -> None:
        pass


async def test_a_timed_read_takes_what_arrived_since_the_last(broker):
    """With ``every_s`` the socket is read on a timer, not when it becomes readable: 30
    messages sent 10 ms apart (0.3 s) over reads every 0.1 s come in a handful of reads, in
    order (read as they become readable, they come in one read each)."""
    inst = f"timed{os.getpid()}"
    topic = f"kb/{inst}/d/frame"
    got = {}
    for every_s in (None, 0.1):
        rx = _Batches(topic)
        client = make_client(broker.url, f"rxt-{os.getpid()}-{every_s}")
        deliver_directly(client, rx, every_s=every_s)
        async with client, make_client(broker.url, f"txt-{os.getpid()}") as tx:
            await client.subscribe(topic, qos=0)
            await asyncio.sleep(0.3)
            for k in range(30):
                assert publish_now(tx, topic, k.to_bytes(2, "big"))
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
        got[every_s] = [b for b in rx.batches if b]
        assert [p for b in got[every_s] for p in b] == [k.to_bytes(2, "big") for k in range(30)]
    assert len(got[None]) >= 20  # a read per message (a loaded machine may join a few)
    assert len(got[0.1]) <= 6
