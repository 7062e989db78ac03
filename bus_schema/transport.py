"""MQTT transport plumbing shared by the services, the simulator, the CLI and the tests.

- :func:`parse_broker_url` turns ``mqtt://host:port`` into ``(host, port)``.
- :func:`make_client` builds an ``aiomqtt.Client`` with TCP_NODELAY and a short keepalive.
- :func:`deliver_directly` is the low-latency receive path: the handler runs in the
  socket-readable callback, with no queue and no task in between.
- :func:`publish_now` is the low-latency publish path: it hands the packet to paho and writes
  it to the socket at once, instead of ``await client.publish()``, which for QoS 0 waits two
  event-loop turns for aiomqtt's writer callback and paho's ``on_publish`` (~250 us here).
  :func:`make_client` installs writer callbacks that keep the event loop's socket writer in
  step with paho's output queue on that path (aiomqtt's own leave a stale writer behind).

It lives beside the schema, not in ``kibble.services``, because the HIL simulator speaks the bus
too and must import nothing from the services.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Callable
from urllib.parse import urlparse

import aiomqtt
import paho.mqtt.client as paho

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
KEEPALIVE_S = 2
"""Short keepalive so a silently dead broker is noticed within a few seconds."""
TCP_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (port defaults to 1883) to ``(host, port)``; ``ValueError`` if not."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "tcp") or not parsed.hostname:
        raise ValueError(f"broker URL {url!r} is not of the form mqtt://host:port")
    try:
        port = parsed.port or 1883
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    return parsed.hostname, port


def make_client(url: str, client_id: str, will: aiomqtt.Will | None = None,
                keepalive_s: int = KEEPALIVE_S) -> aiomqtt.Client:
    """An aiomqtt client for ``url`` with TCP_NODELAY, MQTT 3.1.1 and a clean session.

    Must be called inside the event loop that will use it.
    """
    host, port = parse_broker_url(url)
    client = aiomqtt.Client(
        host, port, identifier=client_id, will=will, keepalive=keepalive_s,
        socket_options=TCP_NODELAY, protocol=aiomqtt.ProtocolVersion.V311, clean_session=True,
        timeout=10.0, max_queued_incoming_messages=100_000)
    _keep_writer_in_step(client)
    return client


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _keep_writer_in_step(client: aiomqtt.Client) -> None:
    """Replace aiomqtt's socket-writer callbacks with ones that cannot leave a stale writer.

    aiomqtt adds the writer with ``call_soon_threadsafe`` (later) but removes it at once. When
    paho queues a packet and writes it in the same call, as :func:`publish_now` does, the late
    add runs after the removal: the writer stays registered with nothing to write, the event
    loop spins on an always-writable socket (a busy core per client), and when the connection
    drops the closed descriptor stays in the selector, so the next socket that gets the same
    number cannot be watched and the reconnect times out. Here the deferred step adds the
    writer only if paho still has output for that same socket.
    """
    loop = client._loop
    paho_client: paho.Client = client._client

    def writable() -> None:
        try:
            paho_client.loop_write()
        except Exception as exc:  # a broken pipe: report it as aiomqtt's own callback does
            if not client._disconnected.done():
                client._disconnected.set_exception(exc)

    def add_if_wanted(sock: socket.socket) -> None:
        if paho_client.socket() is sock and sock.fileno() >= 0 and paho_client.want_write():
            loop.add_writer(sock.fileno(), writable)

    def on_register(_client: paho.Client, _userdata: object, sock: socket.socket) -> None:
        loop.call_soon_threadsafe(add_if_wanted, sock)

    def on_unregister(_client: paho.Client, _userdata: object, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        if _on_loop_thread(loop):
            loop.remove_writer(fd)
        else:
            loop.call_soon_threadsafe(loop.remove_writer, fd)

    paho_client.on_socket_register_write = on_register
    paho_client.on_socket_unregister_write = on_unregister


def deliver_directly(client: aiomqtt.Client, on_message: Callable[[str, bytes], None]) -> None:
    """Call ``on_message(topic, payload)`` for every incoming message straight from the
    socket-readable callback, before ``client`` connects.

    aiomqtt puts each message on an ``asyncio.Queue`` and its iterator creates a task per
    message: three event-loop turns between the bytes arriving and the handler running. Here
    paho parses the packet and the handler runs in the same callback. ``on_message`` must not
    raise (an escaping exception is reported as a lost connection); ``client.messages`` stays
    empty but still raises ``MqttError`` when the connection drops.
    """
    loop = client._loop
    paho_client: paho.Client = client._client
    received: deque[tuple[str, bytes]] = deque()

    def on_paho_message(_client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        # Runs inside paho's callback lock, where publishing would deadlock: only collect.
        received.append((message.topic, message.payload))

    def readable() -> None:
        try:
            paho_client.loop_read()
            while received:
                on_message(*received.popleft())
        except Exception as exc:  # a broken connection, as aiomqtt's own callback reports it
            received.clear()
            if not client._disconnected.done():
                client._disconnected.set_exception(exc)

    aiomqtt_on_open = paho_client.on_socket_open

    def on_open(pc: paho.Client, userdata: object, sock: socket.socket) -> None:
        aiomqtt_on_open(pc, userdata, sock)  # schedules aiomqtt's reader and its keepalive task
        loop.call_soon_threadsafe(loop.add_reader, sock.fileno(), readable)  # then replaces the reader

    paho_client.on_message = on_paho_message
    paho_client.on_socket_open = on_open


def publish_now(client: aiomqtt.Client, topic: str, payload: bytes, qos: int = 0,
                retain: bool = False) -> bool:
    """Queue ``payload`` on ``topic`` and write it to the socket now, without awaiting.

    Returns False if the client is not connected (the caller counts it; the reconnect loop
    deals with the connection). A partial write is finished by aiomqtt's writer callback.
    QoS 1 acknowledgements are handled by paho; this does not wait for them.
    """
    paho_client: paho.Client = client._client  # the one place we reach into aiomqtt
    info = paho_client.publish(topic, payload, qos, retain)
    if info.rc != paho.MQTT_ERR_SUCCESS:
        return False
    paho_client.loop_write()
    return True


__all__ = ["DEFAULT_BROKER", "KEEPALIVE_S", "TCP_NODELAY", "deliver_directly", "make_client",
           "parse_broker_url", "publish_now"]
