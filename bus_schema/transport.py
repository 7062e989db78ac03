"""MQTT transport plumbing shared by the services, the simulator, the CLI and the tests.

- :func:`parse_broker_url` turns ``mqtt://host:port`` into ``(host, port)``;
  :func:`broker_spec` reads the whole connection from a URL (user, password, TLS; see
  "Broker URLs" below), :func:`redact_url` is the URL fit to print.
- :func:`make_client` builds an ``aiomqtt.Client`` with TCP_NODELAY and a short keepalive.
- :func:`connect_error_text` turns a failed connect into one line (a refused login says so).
- :func:`deliver_directly` is the low-latency receive path: the handler runs in the
  socket-readable callback, with no queue and no task in between.
- :func:`publish_now` is the low-latency publish path: it writes the packet to the socket at
  once, instead of ``await client.publish()``, which for QoS 0 waits two event-loop turns for
  aiomqtt's writer callback and paho's ``on_publish`` (~250 us here). QoS 0 packets are built
  here (MQTT 3.1.1 PUBLISH) and sent with one ``send``; QoS 1 goes through paho.
  :func:`make_client` installs writer callbacks that keep the event loop's socket writer in
  step with paho's output queue (aiomqtt's own leave a stale writer behind).
- :func:`corked` collects the QoS 0 publishes of a block of code and writes them with one
  ``send`` at its end (one wake-up of the broker instead of one per message);
  :func:`deliver_directly` corks around every batch of received messages, so whatever the
  handlers publish in answer leaves in one write.

It lives beside the schema, not in ``kibble.services``, because the HIL simulator speaks the bus
too and must import nothing from the services.

Private API
-----------

The fast paths stand on internals that neither library documents, all of them here and nowhere
else (pyproject.toml pins the releases they were checked against): of ``aiomqtt.Client``,
``_client`` (its paho client), ``_loop`` and ``_disconnected`` (the future its message iterator
watches); of ``paho.mqtt.client.Client``, ``_sock``, ``_sock_recv`` (replaced for the length of
one read by :func:`deliver_directly`), ``_in_packet``, ``_out_packet``, ``_last_msg_out`` and
``_last_bytes_received`` (its keepalive clocks) and ``_call_socket_register_write``; and
``_kibble_tx``, our own attribute on the paho client.

Broker URLs
-----------

``mqtt://[USER[:PASSWORD]@]HOST[:PORT][?OPTIONS]`` (port 1883) or ``mqtts://...`` (TLS, port
8883). ``OPTIONS`` (``&``-separated, all paths, none secret):

- ``password_file=PATH``: the password is the file's first line (the way to keep it off the
  command line; ``kibble deploy-credentials`` writes one 0600 file per identity);
- ``ca_file=PATH``: the CA certificate(s) that signed the broker's (default: the system's);
- ``cert_file=PATH``, ``key_file=PATH``: a client certificate and its key (optional).

What the URL leaves out comes from the environment: ``KIBBLE_BROKER_USER``,
``KIBBLE_BROKER_PASSWORD_FILE``, ``KIBBLE_BROKER_PASSWORD`` (in that order of preference after
the URL's own password and ``password_file``), and for ``mqtts://`` ``KIBBLE_BROKER_CA``,
``KIBBLE_BROKER_CERT``, ``KIBBLE_BROKER_KEY``. A password in the URL works but is visible in the
process list; nothing here ever logs or prints one (:func:`redact_url`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Protocol, cast
from urllib.parse import parse_qsl, quote, unquote, urlparse

import aiomqtt
import paho.mqtt.client as paho

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
KEEPALIVE_S = 2
"""Short keepalive so a silently dead broker is noticed within a few seconds."""
OPERATION_TIMEOUT_S = 3.0
"""How long a connect, subscribe or acknowledged publish waits for the broker's answer. aiomqtt
does not watch the connection while it waits (a broker that drops it before its CONNACK or
SUBACK, as amqtt now and then does with a new client, leaves the wait to run out), so this is
also how soon such a client gives up and connects again; a round trip on the lab's network
takes milliseconds."""
TCP_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


_PLAIN_SCHEMES = ("mqtt", "tcp")
_TLS_SCHEMES = ("mqtts", "ssl", "tls")
_URL_OPTIONS = ("password_file", "ca_file", "cert_file", "key_file")


@dataclass(frozen=True)
class BrokerSpec:
    """Everything needed to connect: address, TLS files, user and password (never shown)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def display(self) -> str:
        """``mqtt[s]://[user@]host:port``: no password, no options."""
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"

    def read_password(self) -> str | None:
        """The password: given, else the first line of ``password_file``; ``ValueError`` if
        that file cannot be read (its path in the text, never its content)."""
        if self.password is not None or not self.password_file:
            return self.password
        try:
            with open(self.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read the broker password file {self.password_file}: "
                             f"{exc.strerror or exc}") from None

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context: ``ca_file`` (else the system's CAs), and the client
        certificate if given. ``ValueError`` naming a file that cannot be loaded."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the broker CA file {self.ca_file}: {exc}") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the client certificate {self.cert_file} "
                                 f"(key {self.key_file}): {exc}") from None
        return context


def broker_spec(url: str, env: Mapping[str, str] | None = None) -> BrokerSpec:
    """Parse a broker URL (see "Broker URLs" in the module docstring), filling what it leaves
    out from ``env`` (default ``os.environ``). ``ValueError`` (without the password) if the URL
    is not one; the password file is read only at connect time (:func:`make_client`)."""
    env = os.environ if env is None else env
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    shown = redact_url(url)
    scheme = parsed.scheme.lower()
    if scheme not in _PLAIN_SCHEMES + _TLS_SCHEMES or not parsed.hostname:
        raise ValueError(f"broker URL {shown!r} is not of the form mqtt://[user@]host:port "
                         "or mqtts://[user@]host:port")
    tls = scheme in _TLS_SCHEMES
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {shown!r} has an invalid port") from None
    if parsed.path not in ("", "/") or parsed.fragment or parsed.params:
        raise ValueError(f"broker URL {shown!r}: nothing may follow host:port but ?options")
    options: dict[str, str] = {}
    for key, value in parse_qsl(parsed.query, keep_blank_values=True, strict_parsing=False):
        if key not in _URL_OPTIONS:
            raise ValueError(f"broker URL {shown!r}: unknown option {key!r} "
                             f"(known: {', '.join(_URL_OPTIONS)})")
        if not value:
            raise ValueError(f"broker URL {shown!r}: option {key!r} needs a value")
        options[key] = value
    if not tls and any(k in options for k in ("ca_file", "cert_file", "key_file")):
        raise ValueError(f"broker URL {shown!r}: ca_file, cert_file and key_file need mqtts://")
    username = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password is not None else None
    if password is not None and not username:
        raise ValueError(f"broker URL {shown!r} has a password but no user")
    username = username or env.get("KIBBLE_BROKER_USER") or None
    password_file = options.get("password_file")
    if password is None and password_file is None and username:
        password_file = env.get("KIBBLE_BROKER_PASSWORD_FILE") or None
        if password_file is None:
            password = env.get("KIBBLE_BROKER_PASSWORD") or None
    if password_file is not None and not username:
        raise ValueError(f"broker URL {shown!r} has a password_file but no user")
    ca_file = cert_file = key_file = None
    if tls:
        ca_file = options.get("ca_file") or env.get("KIBBLE_BROKER_CA") or None
        cert_file = options.get("cert_file") or env.get("KIBBLE_BROKER_CERT") or None
        key_file = options.get("key_file") or env.get("KIBBLE_BROKER_KEY") or None
        if key_file and not cert_file:
            raise ValueError(f"broker URL {shown!r}: a key_file without a cert_file")
    return BrokerSpec(parsed.hostname, port, tls, username, password, password_file,
                      ca_file, cert_file, key_file)


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: the form to log or print."""
    try:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.password is None:
            return url
        netloc = parsed.netloc.rpartition("@")[2]
        user = parsed.username or ""
        return parsed._replace(netloc=f"{user}:***@{netloc}").geturl()
    except ValueError:
        return "<unparsable broker URL>"


def with_identity(url: str, username: str, password_file: str | os.PathLike | None = None) -> str:
    """``url`` for another user: its user and password replaced by ``username`` (and its
    ``password_file`` option by ``password_file``), its address and TLS options kept."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    host = parsed.netloc.rpartition("@")[2]
    options = [(k, v) for k, v in parse_qsl(parsed.query, keep_blank_values=True)
               if k != "password_file"]
    if password_file is not None:
        options.append(("password_file", os.fspath(password_file)))
    query = "&".join(f"{k}={quote(v, safe='/._-~')}" for k, v in options)
    return parsed._replace(netloc=f"{quote(username, safe='')}@{host}", query=query).geturl()


def with_options(url: str, username: str | None = None, password_file: str | os.PathLike | None = None,
                 ca_file: str | os.PathLike | None = None, cert_file: str | os.PathLike | None = None,
                 key_file: str | os.PathLike | None = None) -> str:
    """``url`` with what it leaves out filled in (its own user and options win): how the
    configuration's ``broker_user``, ``broker_password_file`` ... and the command line's
    ``--broker-user`` ... join the broker URL."""
    spec = broker_spec(url, env={})
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    options = dict(parse_qsl(parsed.query, keep_blank_values=True))
    for key, value in (("password_file", password_file), ("ca_file", ca_file),
                       ("cert_file", cert_file), ("key_file", key_file)):
        if value is not None and key not in options and not (key == "password_file" and spec.password):
            options[key] = os.fspath(value)
    netloc = parsed.netloc
    if username and not spec.username:
        netloc = f"{quote(username, safe='')}@{netloc}"
    query = "&".join(f"{k}={quote(v, safe='/._-~')}" for k, v in options.items())
    out = parsed._replace(netloc=netloc, query=query).geturl()
    broker_spec(out, env={})  # the options must fit the scheme (ca_file needs mqtts://)
    return out


def without_password(url: str) -> str:
    """``url`` without the password of its ``user:password@`` (the user stays)."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.password is None:
        return url
    host = parsed.netloc.rpartition("@")[2]
    return parsed._replace(netloc=f"{parsed.username}@{host}").geturl()


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt[s]://[user@]host:port`` to ``(host, port)`` (1883, or 8883 for ``mqtts``);
    ``ValueError`` if it is not a broker URL (:func:`broker_spec` has the rest)."""
    spec = broker_spec(url, env={})
    return spec.host, spec.port


_REFUSED_LOGIN = {4: "bad user name or password", 5: "not authorized",
                  134: "bad user name or password", 135: "not authorized"}


def connect_error_text(url: str, exc: BaseException, connecting: bool = False) -> str:
    """One line for an MQTT error with ``url``: a refused login names the user (``broker
    ... refused user 'x': not authorized``); anything else gives the URL without its password
    and the error (``cannot connect to the broker at URL: ...`` if ``connecting``)."""
    try:
        spec = broker_spec(url)
        where, user = spec.display, spec.username
    except ValueError:
        where, user = redact_url(url), None
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    if isinstance(exc, aiomqtt.MqttCodeError) and code in _REFUSED_LOGIN:
        who = f"user {user!r}" if user else "an anonymous login (give a user: mqtt://USER@host)"
        return f"broker {where} refused {who}: {_REFUSED_LOGIN[code]}"
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
        return f"TLS with the broker {where} failed: {exc}"
    if connecting:
        return f"cannot connect to the broker at {where}: {exc}"
    return f"broker {where}: {exc}"


def make_client(url: str, client_id: str, will: aiomqtt.Will | None = None,
                keepalive_s: int = KEEPALIVE_S) -> aiomqtt.Client:
    """An aiomqtt client for ``url`` with TCP_NODELAY, MQTT 3.1.1 and a clean session; the
    user, password and TLS of the URL (see "Broker URLs" above).

    Must be called inside the event loop that will use it. ``ValueError`` for a bad URL, an
    unreadable password file or TLS file.
    """
    spec = broker_spec(url)
    password = spec.read_password()
    client = aiomqtt.Client(
        spec.host, spec.port, identifier=client_id, will=will, keepalive=keepalive_s,
        username=spec.username, password=password,
        tls_context=spec.ssl_context() if spec.tls else None,
        socket_options=TCP_NODELAY, protocol=aiomqtt.ProtocolVersion.V311, clean_session=True,
        timeout=OPERATION_TIMEOUT_S, max_queued_incoming_messages=100_000)
    _keep_writer_in_step(client)
    _tx_for(client)
    if spec.tls:
        _drain_tls_reads(client)
    return client


def _drain_tls_reads(client: aiomqtt.Client) -> None:
    """Make paho's ``loop_read`` read on while the TLS layer holds decrypted bytes.

    paho reads one packet per ``loop_read`` (when nothing is in flight); over TLS the rest of
    a record is already out of the socket, inside the ``SSLSocket``, so the socket does not
    become readable again and those packets would wait for the next bytes from the broker.
    Both aiomqtt's reader and :func:`deliver_directly` (which hands non-plain sockets to
    paho) call ``loop_read`` through the instance, so they both get this.
    """
    paho_client: paho.Client = client._client
    loop_read = paho_client.loop_read

    def drained(max_packets: int = 1) -> paho.MQTTErrorCode:
        rc = loop_read(max_packets)
        while rc == paho.MQTT_ERR_SUCCESS:
            sock = paho_client._sock
            if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                break
            rc = loop_read(max_packets)
        return rc

    paho_client.loop_read = drained  # type: ignore[method-assign]


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

    def add_if_wanted(sock: SocketLike) -> None:
        if paho_client.socket() is sock and sock.fileno() >= 0 and paho_client.want_write():
            loop.add_writer(sock.fileno(), writable)

    def on_register(_client: paho.Client, _userdata: object, sock: SocketLike) -> None:
        loop.call_soon_threadsafe(add_if_wanted, sock)

    def on_unregister(_client: paho.Client, _userdata: object, sock: SocketLike) -> None:
        fd = sock.fileno()
        if fd < 0:
            return
        if _on_loop_thread(loop):
            loop.remove_writer(fd)
        else:
            loop.call_soon_threadsafe(loop.remove_writer, fd)

    paho_client.on_socket_register_write = on_register
    paho_client.on_socket_unregister_write = on_unregister


# ============================================================================ QoS 0 fast path

_PUBLISH = 0x30
_MAX_REMAINING = 268_435_455
"""Largest MQTT remaining length (a four-byte varint)."""


def _remaining_length(n: int) -> bytes:
    """The MQTT remaining-length varint of ``n`` (1 to 4 bytes, low 7 bits first)."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
    """An MQTT 3.1.1 QoS 0 PUBLISH packet (no packet id): fixed header, topic, payload.

    ``ValueError`` for a topic with wildcards, an empty or too long topic, or a payload too
    large, as paho's ``publish`` does.
    """
    head = _topic_head(topic)
    return _packet(head, payload, retain)


def _topic_head(topic: str) -> bytes:
    """Length-prefixed UTF-8 topic, checked as paho checks it."""
    if not topic:
        raise ValueError("Invalid topic.")
    raw = topic.encode("utf-8")
    paho.Client._raise_for_invalid_topic(raw)
    return len(raw).to_bytes(2, "big") + raw


def _packet(head: bytes, payload: bytes, retain: bool) -> bytes:
    n = len(head) + len(payload)
    command = _PUBLISH | 1 if retain else _PUBLISH
    if n < 128:
        return b"".join((bytes((command, n)), head, payload))
    if n > _MAX_REMAINING:
        raise ValueError("Payload too large.")
    return b"".join((bytes((command,)), _remaining_length(n), head, payload))


class _Tx:
    """Per-client state of the QoS 0 fast path: topic headers, the cork and its pending bytes.

    Writes go straight to paho's socket when paho's own output queue is empty; otherwise (or
    for the unsent rest of a partial write) the bytes join the end of paho's queue as one
    packet, so they can never interleave with a packet paho has half written, and paho's
    writer (see :func:`_keep_writer_in_step`) finishes them. Everything runs on the event
    loop's thread (aiomqtt drives paho from there), so no locking is needed.
    """

    __slots__ = ("paho", "heads", "cork", "pending")

    def __init__(self, paho_client: paho.Client) -> None:
        self.paho = paho_client
        self.heads: dict[str, bytes] = {}
        self.cork = 0
        self.pending: list[bytes] = []

    def publish(self, topic: str, payload: bytes, retain: bool) -> bool | None:
        """Queue or write one packet; None when the socket is not plain TCP (TLS): then
        the caller publishes through paho, which writes through the TLS layer."""
        sock = self.paho._sock
        if sock is None:
            return False
        if type(sock) is not socket.socket:
            return None
        head = self.heads.get(topic)
        if head is None:
            head = self.heads[topic] = _topic_head(topic)
        packet = _packet(head, payload, retain)
        if self.cork:
            self.pending.append(packet)
            return True
        self.send(packet)
        return True

    def flush(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            self.send(data)

    def send(self, data: bytes) -> None:
        pc = self.paho
        sock = pc._sock
        if sock is None:  # lost while corked: dropped, as paho drops QoS 0 on a closed socket
            return
        if pc._out_packet:  # paho has output waiting (maybe half written): go behind it
            self._queue(data, 0)
            pc.loop_write()
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # a broken connection: let paho's own write find and report it
            self._queue(data, 0)
            pc.loop_write()
            return
        pc._last_msg_out = time.monotonic()  # paho's keepalive clock (it uses time.monotonic)
        if sent < len(data):
            self._queue(data, sent)
            pc._call_socket_register_write()

    def _queue(self, data: bytes, pos: int) -> None:
        self.paho._out_packet.append({
            "command": _PUBLISH, "mid": 0, "qos": 0, "pos": pos, "to_process": len(data) - pos,
            "packet": data, "info": paho.MQTTMessageInfo(0)})


def _tx_for(client: aiomqtt.Client) -> _Tx:
    paho_client: paho.Client = client._client
    tx = getattr(paho_client, "_kibble_tx", None)
    if tx is None:
        # our own attribute on paho's client (see the module's docstring), unknown to its types
        tx = paho_client._kibble_tx = _Tx(paho_client)  # type: ignore[attr-defined]
    return tx


@contextlib.contextmanager
def corked(client: aiomqtt.Client) -> Iterator[None]:
    """Hold the QoS 0 :func:`publish_now` packets of the block and write them with one
    ``send`` at its end (in order; a QoS 1 publish inside the block first writes what is
    held). Nests; only the outermost block writes."""
    tx = _tx_for(client)
    tx.cork += 1
    try:
        yield
    finally:
        tx.cork -= 1
        if not tx.cork:
            tx.flush()


# ============================================================================ receive


_READ_BYTES = 65536
"""The most one ``recv`` of :func:`deliver_directly` takes."""
_MAX_READS_PER_TICK = 64
"""The most reads one timed read (``every_s``) makes before it lets the event loop run (4 MiB
at :data:`_READ_BYTES`)."""


def _readable_now(sock: SocketLike) -> bool:
    """True if ``sock`` (an ``SSLSocket`` or other) holds bytes to read now."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed meanwhile: the next read reports it
        return False


class _Feed:
    """Stands in for paho's socket reads while paho parses one packet handed to it."""

    __slots__ = ("data", "end")

    def __init__(self) -> None:
        self.data = b""
        self.end: BaseException | bool = False
        """After the data: False (nothing more yet), True (end of stream) or an error."""

    def recv(self, bufsize: int) -> bytes:
        data = self.data
        if data:
            chunk, self.data = data[:bufsize], data[bufsize:]
            return chunk
        end = self.end
        if end is True:
            return b""
        if end is not False:
            self.end = False
            raise end
        raise BlockingIOError()


class Receiver(Protocol):
    """What :func:`deliver_directly` drives: one call per message, and three per batch (one
    read of the socket): ``batch_begin`` before its first message, ``batch_end`` after its
    last (still corked: what it publishes leaves with the batch's answers) and
    ``batch_flushed`` once those are written."""

    def message(self, topic: str, payload: bytes) -> None: ...
    def batch_begin(self) -> None: ...
    def batch_end(self) -> None: ...
    def batch_flushed(self) -> None: ...


class _PlainReceiver:
    """A bare ``on_message(topic, payload)`` callable as a :class:`Receiver`."""

    __slots__ = ("message",)

    def __init__(self, on_message: Callable[[str, bytes], None]) -> None:
        self.message = on_message

    def batch_begin(self) -> None:
        pass

    def batch_end(self) -> None:
        pass

    def batch_flushed(self) -> None:
        pass


def deliver_directly(client: aiomqtt.Client,
                     on_message: Callable[[str, bytes], None] | Receiver,
                     every_s: float | None = None) -> None:
    """Call ``on_message(topic, payload)`` (or a :class:`Receiver`'s ``message``) for every
    incoming message straight from the socket-readable callback, before ``client`` connects.

    aiomqtt puts each message on an ``asyncio.Queue`` and its iterator creates a task per
    message: three event-loop turns between the bytes arriving and the handler running. Here
    the handler runs in the same callback. One ``recv`` takes all that has arrived; QoS 0
    PUBLISH packets are parsed here (paho would read each packet with three ``recv`` calls
    and build a message object); every other packet (CONNACK, SUBACK, PUBACK, PINGRESP, QoS 1
    messages) is handed to paho, in order, which parses and acknowledges it as usual. The
    QoS 0 publishes the handlers make are corked (:func:`corked`) and leave in one write after
    the batch. ``on_message`` must not raise (an escaping exception is reported as a lost
    connection); ``client.messages`` stays empty but still raises ``MqttError`` when the
    connection drops.

    ``every_s``: read the socket on a timer, every ``every_s`` seconds, instead of when it
    becomes readable: each read takes all that arrived since the last. For a follower that
    only shows what it reads (the operator's views), where waking up for each message costs
    several times what the message does; messages then wait up to ``every_s`` and a dropped
    connection is seen within it. The socket's receive buffer must hold ``every_s`` of the
    traffic (the broker holds the rest, as for any slow reader).
    """
    receiver: Receiver
    if hasattr(on_message, "batch_end"):
        receiver = cast(Receiver, on_message)  # it has a Receiver's methods: a test mypy cannot narrow on
    else:
        receiver = _PlainReceiver(on_message)
    deliver = receiver.message
    loop = client._loop
    paho_client: paho.Client = client._client
    tx = _tx_for(client)
    received: deque[tuple[str, bytes]] = deque()
    feed = _Feed()
    # bytes of an incomplete packet: the chunks so far, their length, and the length the
    # packet needs (0 while its header is incomplete); joined once, when it is all there
    rest: list[bytes] = []
    state = {"have": 0, "need": 0}

    def on_paho_message(_client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        # Runs inside paho's callback lock, where publishing would deadlock: only collect.
        # paho types payload bytes | bytearray (a message it sends may hold a bytearray); one it
        # received was sliced from the bytes read off the socket
        received.append((message.topic, cast(bytes, message.payload)))

    def paho_read(data: bytes, end: BaseException | bool = False) -> None:
        """Let paho read ``data`` (whole packets), then ``end`` (see :class:`_Feed`), as if
        from its socket, then deliver what it collected."""
        feed.data, feed.end = data, end
        paho_client._sock_recv = feed.recv  # type: ignore[method-assign]
        try:
            while feed.data and paho_client._sock is not None:
                left = len(feed.data)
                paho_client.loop_read()
                if len(feed.data) == left:
                    break  # paho took nothing: it is done with this connection
            if feed.end is not False and paho_client._sock is not None:
                paho_client.loop_read()  # reads the end of stream or the error, and reports it
        finally:
            del paho_client._sock_recv
            feed.data, feed.end = b"", False
        while received:
            deliver(*received.popleft())

    def keep(buf: bytes, need: int) -> None:
        rest.clear()
        if buf:
            rest.append(buf)
        state["have"], state["need"] = len(buf), need

    def parse(buf: bytes) -> None:
        """Deliver the whole packets at the start of ``buf``; keep the incomplete rest."""
        n = len(buf)
        i = 0
        while n - i >= 2:
            command = buf[i]
            j = i + 1
            length = 0
            shift = 0
            while True:
                if j >= n:
                    keep(buf[i:], 0)
                    return
                byte = buf[j]
                j += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift > 21:  # more than four bytes: paho reports the protocol error
                    keep(b"", 0)
                    paho_read(buf[i:])
                    return
            end = j + length
            if end > n:
                keep(buf[i:] if i else buf, end - i)
                return
            if command & 0xF6 == _PUBLISH and length >= 2:  # PUBLISH, QoS 0 (any dup/retain)
                t_end = j + 2 + (buf[j] << 8 | buf[j + 1])
                if t_end <= end:
                    try:
                        topic = buf[j + 2:t_end].decode("utf-8")
                    except UnicodeDecodeError:
                        topic = None
                    if topic is not None:
                        deliver(topic, buf[t_end:end])
                        i = end
                        continue
            paho_read(buf[i:end])
            i = end
        keep(buf[i:], 0)

    def readable() -> bool:
        """Read what is there and deliver it; True if more may be waiting."""
        sock = paho_client._sock
        tx.cork += 1
        receiver.batch_begin()
        try:
            if type(sock) is not socket.socket or paho_client._in_packet["command"]:
                # not a plain TCP socket, or paho is inside a packet: paho reads, as aiomqtt's reader
                paho_client.loop_read()
                while received:
                    deliver(*received.popleft())
                receiver.batch_end()
                # more waiting? (asked only on a timer: the event loop's reader asks the selector)
                return every_s is not None and sock is not None and paho_client._sock is sock \
                    and _readable_now(sock)
            try:
                data = sock.recv(_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:  # paho sees the error on its next read and reports it
                keep(b"", 0)
                paho_read(b"", exc)
                return False
            if not data:  # end of stream: paho reads b'' and reports the lost connection
                keep(b"", 0)
                paho_read(b"", True)
                return False
            paho_client._last_bytes_received = time.monotonic()  # paho's keepalive clock
            more = len(data) == _READ_BYTES
            if rest:
                rest.append(data)
                state["have"] += len(data)
                if state["have"] < state["need"]:
                    return more  # a large packet still coming in
                data = b"".join(rest)
            parse(data)
            receiver.batch_end()
            return more
        except Exception as exc:  # a broken connection, as aiomqtt's own callback reports it
            received.clear()
            keep(b"", 0)
            if not client._disconnected.done():
                client._disconnected.set_exception(exc)
            return False
        finally:
            tx.cork -= 1
            if not tx.cork:
                tx.flush()
            receiver.batch_flushed()

    def read_on_timer(sock: SocketLike) -> None:
        if paho_client._sock is not sock:
            return  # that connection is over; the next one starts its own timer
        for _ in range(_MAX_READS_PER_TICK):
            if not readable():
                break
        assert every_s is not None
        loop.call_later(every_s, read_on_timer, sock)

    aiomqtt_on_open = paho_client.on_socket_open
    assert aiomqtt_on_open is not None  # aiomqtt.Client's constructor set it

    def on_timer_from_now(sock: SocketLike) -> None:
        loop.remove_reader(sock.fileno())
        assert every_s is not None
        loop.call_later(every_s, read_on_timer, sock)

    def on_open(pc: paho.Client, userdata: object, sock: SocketLike) -> None:
        keep(b"", 0)
        aiomqtt_on_open(pc, userdata, sock)  # schedules aiomqtt's reader and its keepalive task
        if every_s is None:  # then replaces the reader
            loop.call_soon_threadsafe(loop.add_reader, sock.fileno(), readable)
        else:  # or removes it, for a timer
            loop.call_soon_threadsafe(on_timer_from_now, sock)

    paho_client.on_message = on_paho_message
    paho_client.on_socket_open = on_open


def publish_now(client: aiomqtt.Client, topic: str, payload: bytes, qos: int = 0,
                retain: bool = False) -> bool:
    """Publish ``payload`` on ``topic`` and write it to the socket now, without awaiting.

    Returns False if the client is not connected (the caller counts it; the reconnect loop
    deals with the connection). QoS 0 is built and written here with one ``send`` (held
    until the end of a :func:`corked` block); a partial write is finished by the event
    loop's writer callback. QoS 1 goes through paho, which handles its acknowledgement;
    this does not wait for it.
    """
    paho_client: paho.Client = client._client
    tx = getattr(paho_client, "_kibble_tx", None)
    if qos == 0 and tx is not None:
        sent = tx.publish(topic, payload, retain)
        if sent is not None:
            return sent
        # not a plain socket (TLS): paho builds and writes the packet, as for QoS 1
    if tx is not None and tx.pending:  # keep the order of what is corked
        tx.flush()
    info = paho_client.publish(topic, payload, qos, retain)
    if info.rc != paho.MQTT_ERR_SUCCESS:
        return False
    paho_client.loop_write()
    return True


__all__ = ["DEFAULT_BROKER", "KEEPALIVE_S", "TCP_NODELAY", "BrokerSpec", "Receiver", "broker_spec",
           "connect_error_text", "corked", "deliver_directly", "make_client", "parse_broker_url",
           "publish_now", "publish_packet", "redact_url", "with_identity", "with_options",
           "without_password"]
