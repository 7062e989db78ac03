"""Bus helpers for tools (CLI, tests): :class:`BusClient` for subscriptions and request/reply.

The transport itself (:func:`make_client`, :func:`publish_now`, :func:`parse_broker_url`) lives in
:mod:`kibble.bus_schema.transport` and is re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
import uuid
from typing import Any, AsyncIterator, TypeVar

import aiomqtt

from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import Command, Message, Reply
from kibble.bus_schema.topics import Topics, topic_matches
from kibble.bus_schema.transport import (
    DEFAULT_BROKER, connect_error_text, make_client, parse_broker_url, publish_now, redact_url,
)

M = TypeVar("M", bound=Message)


class BusError(RuntimeError):
    """A bus operation failed: no broker, a timeout, or a rejected request."""


class Refused(BusError, ValueError):
    """A service refused a command; the text says which service, which command and why."""


def result_of(reply: Reply, service: str, command: str) -> dict[str, Any]:
    """The result of a service's ``reply`` to ``command``, or :class:`Refused` with its reason."""
    if not reply.ok:
        raise Refused(f"{service} refused {command}: {reply.error}")
    return reply.result


def new_client_id(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class BusClient:
    """A tool's connection to the bus: subscriptions as async iterators and request/reply.

    ::

        async with BusClient("mqtt://127.0.0.1:1883", "nist4") as bus:
            reply = await bus.request("servo", "param.set", {"name": "kp", "value": 2.0})
            async for topic, payload in bus.subscribe("kb/nist4/+/status"):
                ...
    """

    def __init__(self, url: str, instrument: str, client_id: str | None = None) -> None:
        self.url = url
        self.topics = Topics(instrument)
        self.client_id = client_id or new_client_id("tool")
        self._reply_topic = self.topics.reply(f"tool-{uuid.uuid4().hex[:12]}")
        self._client = make_client(url, self.client_id)
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._queues: list[tuple[str, asyncio.Queue]] = []
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    async def __aenter__(self) -> "BusClient":
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise BusError(connect_error_text(self.url, exc, connecting=True)) from None
        await self._client.subscribe(self._reply_topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        try:
            async for message in self._client.messages:
                topic = str(message.topic)
                payload = bytes(message.payload)
                if topic == self._reply_topic:
                    self._resolve(payload)
                    continue
                for pattern, queue in self._queues:
                    if message.topic.matches(pattern):
                        queue.put_nowait((topic, payload))
        except aiomqtt.MqttError as exc:
            err = BusError(f"lost the broker at {redact_url(self.url)}: {exc}")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            for _, queue in self._queues:
                queue.put_nowait(err)

    def _resolve(self, payload: bytes) -> None:
        try:
            reply = decode(payload, Reply)
        except DecodeError:
            return
        fut = self._pending.pop(reply.id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    async def publish(self, topic: str, msg: Message, qos: int = 1, retain: bool = False) -> None:
        """Publish a message with a filled header (sequence number and timestamps)."""
        msg.seq = next(self._seq)
        msg.t_mono_s = time.monotonic()
        msg.t_utc_s = time.time()
        await self._client.publish(topic, encode(msg), qos=qos, retain=retain)

    async def request(self, service: str, command: str, args: dict | None = None,
                      timeout_s: float = 5.0) -> Reply:
        """Send a command to ``service`` and wait for its reply; ``BusError`` on timeout."""
        cid = f"{self.client_id}-{next(self._ids)}"
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        cmd = Command(id=cid, command=command, args=args or {}, reply_to=self._reply_topic,
                      client_id=self.client_id)
        try:
            await self.publish(self.topics.cmd(service), cmd, qos=1)
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise BusError(f"no reply from service {service!r} to {command!r} within {timeout_s} s "
                           f"(is it running on instrument {self.topics.instrument!r}?)") from None
        finally:
            self._pending.pop(cid, None)

    @contextlib.asynccontextmanager
    async def listen(self, pattern: str, qos: int = 1) -> AsyncIterator["Subscription"]:
        """A :class:`Subscription` to ``pattern``, acknowledged by the broker on entry.

        Use it when the order matters: everything published after ``async with`` is entered
        is caught (unlike a lazily started :meth:`subscribe` generator).
        """
        sub = Subscription(pattern)
        entry = (pattern, sub.queue)
        self._queues.append(entry)
        try:
            try:
                await self._client.subscribe(pattern, qos=qos)
            except aiomqtt.MqttError as exc:
                raise BusError(f"cannot subscribe to {pattern!r} at {redact_url(self.url)}: {exc}") from None
            yield sub
        finally:
            self._queues.remove(entry)
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.unsubscribe(pattern)

    async def subscribe(self, pattern: str, qos: int = 1) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(topic, payload)`` for every message matching ``pattern``."""
        async with self.listen(pattern, qos) as sub:
            while True:
                yield await sub.get()

    async def collect(self, pattern: str, duration_s: float) -> list[tuple[str, bytes]]:
        """Every message matching ``pattern`` (retained ones included) for ``duration_s``."""
        out: list[tuple[str, bytes]] = []

        async def gather() -> None:
            async for item in self.subscribe(pattern):
                out.append(item)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gather(), duration_s)
        return out


async def follow(url: str, instrument: str, pattern: str, retry_s: float = 0.5,
                 on_lost=None) -> AsyncIterator[tuple[str, bytes]]:
    """Every ``(topic, payload)`` matching ``pattern``, across lost connections and broker
    restarts: a lost broker is retried every ``retry_s`` (``on_lost(error_text)`` is called
    once per loss), and the retained messages arrive again on every new connection, so a view
    built from them catches up."""
    up = True
    while True:
        try:
            async with BusClient(url, instrument) as bus:
                up = True
                async for item in bus.subscribe(pattern):
                    yield item
        except BusError as exc:
            if up and on_lost is not None:
                on_lost(str(exc))
            up = False
            await asyncio.sleep(retry_s)


class Subscription:
    """Messages matching one pattern, queued as they arrive (see :meth:`BusClient.listen`)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.queue: asyncio.Queue = asyncio.Queue()

    async def get(self, timeout_s: float | None = None) -> tuple[str, bytes]:
        """The next ``(topic, payload)``; ``BusError`` on timeout or when the broker is lost."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            raise BusError(f"no message on {self.pattern!r} within {timeout_s} s") from None
        if isinstance(item, Exception):
            raise item
        return item

    async def expect(self, msg_type: type[M], predicate=lambda msg: True,
                     timeout_s: float = 5.0) -> M:
        """The next message that decodes as ``msg_type`` and satisfies ``predicate``.

        Messages that do not decode or do not match are skipped; ``BusError`` at the deadline.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BusError(f"no matching {msg_type.__name__} on {self.pattern!r} "
                               f"within {timeout_s} s") from None
            if isinstance(item, Exception):
                raise item
            _, payload = item
            try:
                msg = decode(payload, msg_type)
            except DecodeError:
                continue
            if predicate(msg):
                return msg


__all__ = ["BusClient", "BusError", "Subscription", "DEFAULT_BROKER", "make_client", "parse_broker_url",
           "publish_now", "topic_matches", "new_client_id", "follow"]
