"""MQTT transport plumbing shared by the services, the simulator, the CLI and the tests.

- :func:`parse_broker_url` turns ``mqtt://host:port`` into ``(host, port)``.
- :func:`make_client` builds an ``aiomqtt.Client`` with TCP_NODELAY and a short keepalive.
- :func:`publish_now` is the low-latency publish path: it hands the packet to paho and writes
  it to the socket at once, instead of ``await client.publish()``, which for QoS 0 waits two
  event-loop turns for aiomqtt's writer callback and paho's ``on_publish`` (~250 us here).

It lives beside the schema, not in ``kibble.services``, because the HIL simulator speaks the bus
too and must import nothing from the services.
"""

from __future__ import annotations

import socket
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
    """An aiomqtt client for ``url`` with TCP_NODELAY, MQTT 3.1.1 and a clean session."""
    host, port = parse_broker_url(url)
    return aiomqtt.Client(
        host, port, identifier=client_id, will=will, keepalive=keepalive_s,
        socket_options=TCP_NODELAY, protocol=aiomqtt.ProtocolVersion.V311, clean_session=True,
        timeout=10.0, max_queued_incoming_messages=100_000)


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


__all__ = ["DEFAULT_BROKER", "KEEPALIVE_S", "TCP_NODELAY", "make_client", "parse_broker_url",
           "publish_now"]
