"""The bus node: the connection life cycle that every daemon and the simulator stand on.

A node is one MQTT client with a name under ``kb/<instrument>/``. :meth:`BusNode.run` does
the I/O, once for everyone:

- connect with a last will (the node's status, ``offline``) and reconnect with exponential
  back-off; a lost broker is noticed by the reader or the keepalive, and
  :meth:`BusNode.on_disconnect` runs at once;
- on every connection: the subscriptions, a retained status (:meth:`BusNode.announce`),
  :meth:`BusNode.on_connected`, then a heartbeat (retained status every ``heartbeat_s``) and
  the node's own tasks (:meth:`BusNode.serve_tasks`) until the connection drops or a stop is
  asked;
- a clean stop (:meth:`BusNode.stop`, SIGINT/SIGTERM): :meth:`BusNode.stopping` while still
  connected, then a retained ``offline`` status; any other end (an exception) publishes the
  ``offline`` status too, with the reason, before the exception leaves: a crash is seen on
  the bus, although a clean disconnect makes the broker discard the will;
- events on ``<name>/event``, rate-limited per kind (:class:`RateLimiter`);
- commands on ``<name>/cmd`` (:meth:`BusNode.command_received`): every command gets a reply,
  on its ``reply_to`` only if that is a reply topic of this instrument
  (:meth:`~kibble.bus_schema.topics.Topics.check_reply_to`); a command whose arguments do not
  decode (a NaN, a wrong type) is answered with what was wrong when its id can be read.

The owner (``kibble.services.runtime.service.Service``, ``kibble.hil_sim.server.SimServer``) subclasses
it, builds its :class:`~kibble.bus_schema.messages.Status`, says what it subscribes to and how
messages are received (a :class:`~kibble.bus_schema.transport.Receiver`), and fills
:attr:`BusNode.commands`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import signal
import time
from typing import Any, Awaitable, Callable, ClassVar, Coroutine, Generic, Iterable, TypeVar

import aiomqtt
import msgspec

from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import Command, Event, Message, Reply, Severity, Status
from kibble.bus_schema.topics import Topics, check_name, topic_matches
from kibble.bus_schema.transport import (
    Receiver, connect_error_text, deliver_directly, make_client, parse_broker_url, publish_now,
)

log = logging.getLogger(__name__)

CommandHandler = Callable[[Command], Any]
"""A command's handler: takes the :class:`Command`, returns the reply's ``result`` (a dict or
None), synchronously or as an awaitable; ``ValueError``/``TypeError`` is a refusal, its text
the reply's error."""

H = TypeVar("H", bound=Callable[..., Any])
"""The type of a node's command handlers: :data:`CommandHandler` unless the node's
:meth:`BusNode.call_command` calls them with something else."""


class RateLimiter:
    """Token bucket per key: ``burst`` at once, then ``rate_per_s``; counts what it drops."""

    def __init__(self, burst: int, rate_per_s: float) -> None:
        self.burst = burst
        self.rate_per_s = rate_per_s
        self._tokens: dict[str, tuple[float, float]] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._tokens.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)
        if tokens >= 1.0:
            self._tokens[key] = (tokens - 1.0, now)
            return True
        self._tokens[key] = (tokens, now)
        self.suppressed[key] = self.suppressed.get(key, 0) + 1
        return False


class _CommandEnvelope(msgspec.Struct, forbid_unknown_fields=False):
    """What can be read of a command that did not decode as a :class:`Command`: enough to
    answer it."""

    id: Any = None
    command: Any = None
    args: Any = None
    reply_to: Any = ""


_FMAX = 1.7976931348623157e308


def decodable_status(status: Status) -> Status:
    """``status`` with its timing figures within what a :class:`Status` may carry (finite,
    not negative), so that a node never publishes a status its own codec refuses. A frame
    acted on whose publisher stamped it absurdly far in the past (``t_mono_s`` = -1e308 is
    a valid message) makes an age of ~1e308 s: infinite in milliseconds, and the percentiles
    NaN. Such a figure is kept as the largest finite float, which still says how absurd it
    was; a negative one is 0."""
    timing = status.timing
    for name in timing.__struct_fields__:
        value = getattr(timing, name)
        if isinstance(value, float) and not 0.0 <= value <= _FMAX:
            setattr(timing, name, 0.0 if value < 0.0 else _FMAX)
    return status


def _first_non_finite(value: Any, where: str) -> str | None:
    """The path of the first NaN or infinite float in ``value`` (an argument), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value[:1024]):
            found = _first_non_finite(item, f"{where}[{i}]")
            if found:
                return found
    return None


class BusNode(Generic[H]):
    """One named MQTT client of an instrument's tree; subclasses fill in the hooks.

    ``name`` is the node's topic level (``kb/<instrument>/<name>/...``), set by the subclass
    as a class attribute. Counters every node keeps: ``commands``, ``rejected`` (messages
    dropped), ``replies_refused`` (a ``reply_to`` outside the instrument's reply topics),
    ``handler_errors``, ``publish_failed``, ``events_suppressed``, ``reconnects``.
    """

    name: ClassVar[str] = "node"

    def __init__(self, instrument: str, broker: str, client_id: str, *, heartbeat_s: float = 1.0,
                 reconnect_min_s: float = 0.1, reconnect_max_s: float = 5.0,
                 event_burst: int = 5, event_rate_per_s: float = 1.0) -> None:
        check_name("service name", self.name)
        parse_broker_url(broker)
        if not 0.05 <= heartbeat_s <= 60:
            raise ValueError(f"heartbeat_s must be within 0.05..60 s, got {heartbeat_s!r}")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError(f"reconnect back-off must satisfy 0 < min <= max, got "
                             f"{reconnect_min_s!r}, {reconnect_max_s!r}")
        self.topics = Topics(instrument)
        self.broker = broker
        self.client_id = client_id
        self.heartbeat_s = heartbeat_s
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.session = 0
        """The node's session, in its :class:`Status` (the subclass numbers its starts)."""
        self.counters: dict[str, int] = {
            "commands": 0, "rejected": 0, "replies_refused": 0, "handler_errors": 0,
            "publish_failed": 0, "events_suppressed": 0, "reconnects": 0}
        self.commands: dict[str, H] = {}
        """The node's commands by name (see :data:`CommandHandler`)."""
        self.connected = asyncio.Event()
        """Set while connected and subscribed."""
        self.heartbeats = 0
        self.t_start_s = time.monotonic()
        self._client: aiomqtt.Client | None = None
        self._stop = asyncio.Event()
        self._seq = 0
        self._limiter = RateLimiter(event_burst, event_rate_per_s)
        self._tasks: set[asyncio.Task] = set()
        self._t_cmd = self.topics.cmd(self.name)
        self._t_reply = self.topics.reply(self.name)
        self._t_status = self.topics.status(self.name)

    # ------------------------------------------------------------------ the owner's part

    def status(self, online: bool = True, interval: bool = False) -> Status:
        """The node's status now (``online=False``: the offline status of the will and of the
        stop); ``interval``: the heartbeat's, which also closes the timing interval."""
        raise NotImplementedError

    def subscriptions(self) -> Iterable[tuple[str, int]]:
        """``(topic, qos)`` to subscribe to on every connection (``<name>/cmd`` is added unless
        a pattern covers it)."""
        return ()

    def receiver(self) -> Receiver:
        """What the socket's messages are delivered to (see
        :func:`~kibble.bus_schema.transport.deliver_directly`); it must not raise, and hands
        ``<name>/cmd`` payloads to :meth:`command_received`."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Once, before the first connection (warm-up, process settings)."""

    def announce(self) -> None:
        """What to publish first on every connection: the retained status."""
        self.publish_status()

    async def on_connected(self) -> None:
        """After every (re)connection, once subscribed and announced."""

    async def on_disconnect(self) -> None:
        """As soon as the broker is lost (not at a clean stop)."""

    def serve_tasks(self) -> list[Coroutine[Any, Any, Any]]:
        """Coroutines run while connected (cancelled when the connection ends)."""
        return []

    async def stopping(self) -> None:
        """A clean stop, while still connected: go to the safe state."""

    def call_command(self, handler: H, cmd: Command) -> Any:
        """Call a command's handler (an owner with its own handler signature overrides)."""
        return handler(cmd)

    # ------------------------------------------------------------------ publishing

    def stamp(self, msg: Message) -> Message:
        """Fill a message's header: next sequence number, monotonic and UTC time."""
        self._seq += 1
        msg.seq = self._seq
        msg.t_mono_s = time.monotonic()
        msg.t_utc_s = time.time()
        return msg

    def publish(self, topic: str, msg: Message, qos: int = 0, retain: bool = False) -> bool:
        """Stamp and publish now (no await). False, and counted, when not connected."""
        return self.publish_bytes(topic, encode(self.stamp(msg)), qos, retain)

    def publish_bytes(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish an encoded payload now (no await); False, and counted, when not connected."""
        client = self._client
        if client is None or not publish_now(client, topic, payload, qos, retain):
            self.counters["publish_failed"] += 1
            return False
        return True

    def publish_status(self, interval: bool = False) -> None:
        self.publish(self._t_status, decodable_status(self.status(interval=interval)), qos=1, retain=True)

    def event(self, kind: str, text: str, severity: Severity = "info",
              data: dict[str, Any] | None = None, rate_limited: bool = True) -> None:
        """Publish an event on ``<name>/event`` (rate-limited per kind) and log it."""
        if rate_limited and not self._limiter.allow(kind, time.monotonic()):
            self.counters["events_suppressed"] += 1
            return
        level = {"info": logging.INFO, "warning": logging.WARNING, "alarm": logging.ERROR}[severity]
        log.log(level, "%s: %s: %s", self.name, kind, text)
        payload = dict(data or {})
        dropped = self._limiter.suppressed.pop(kind, 0)
        if dropped:
            payload["suppressed_since_last"] = dropped
        self.publish(self.topics.event(self.name),
                     Event(service=self.name, kind=kind, severity=severity, text=text, data=payload),
                     qos=1)

    def handler_failed(self, where: str, exc: BaseException) -> None:
        """A bug met while handling ``where``: counted, logged, reported; the node goes on."""
        self.counters["handler_errors"] += 1
        log.error("%s: handling %s failed", self.name, where, exc_info=exc)
        self.event("handler_error", f"{type(exc).__name__} handling {where}: {exc}",
                   severity="alarm", data={"topic": where})

    def reject(self, topic: str, reason: str, data: dict[str, Any] | None = None) -> None:
        """Count and report a message that was dropped (``data``: more for the event)."""
        self.counters["rejected"] += 1
        self.event("rejected", f"dropped message on {topic}: {reason}", severity="warning",
                   data={"topic": topic, "reason": reason, **(data or {})})

    def spawn(self, work: Awaitable[Any], where: str) -> None:
        """Run ``work`` as a task of this node (waited for at the end of a connection, up to
        5 s); an exception in it is :meth:`handler_failed`."""
        async def guarded() -> None:
            try:
                await work
            except Exception as exc:
                self.handler_failed(where, exc)
        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ commands

    def command_received(self, payload: bytes) -> Coroutine[Any, Any, None] | None:
        """One ``<name>/cmd`` payload: decode, check, run, reply. Returns the rest of the
        work when the handler is ``async`` (await it, or :meth:`spawn` it), else None."""
        self.counters["commands"] += 1
        try:
            cmd = decode(payload, Command)
        except DecodeError as exc:
            self._answer_undecodable(payload, exc)
            return None
        reply_to = self._reply_topic(cmd.reply_to, cmd.command, cmd.id)
        if reply_to is None:
            return None
        reply = Reply(id=cmd.id, ok=False, service=self.name)
        handler = self.commands.get(cmd.command)
        if handler is None:
            reply.error = (f"unknown command {cmd.command!r}; {self.name} knows "
                           f"{', '.join(sorted(self.commands))}")
            self._send_reply(cmd, reply_to, reply)
            return None
        try:
            result = self.call_command(handler, cmd)
        except (ValueError, TypeError) as exc:
            reply.error = str(exc)
            self._send_reply(cmd, reply_to, reply)
            return None
        except Exception as exc:
            self.handler_failed(self._t_cmd, exc)
            reply.error = f"internal error: {type(exc).__name__}: {exc}"
            self._send_reply(cmd, reply_to, reply)
            return None
        if inspect.isawaitable(result):
            return self._finish_command(cmd, reply_to, reply, result)
        reply.ok, reply.result = True, result or {}
        self._send_reply(cmd, reply_to, reply)
        return None

    async def _finish_command(self, cmd: Command, reply_to: str, reply: Reply,
                              pending: Awaitable[Any]) -> None:
        try:
            result = await pending
            reply.ok, reply.result = True, result or {}
        except (ValueError, TypeError) as exc:
            reply.error = str(exc)
        except Exception as exc:
            self.handler_failed(self._t_cmd, exc)
            reply.error = f"internal error: {type(exc).__name__}: {exc}"
        self._send_reply(cmd, reply_to, reply)

    def command_done(self, cmd: Command, reply: Reply) -> None:
        """After a command's reply went out; by default a refusal is an event."""
        if not reply.ok:
            self.event("command_rejected", f"{cmd.command} from {cmd.client_id or '?'}: {reply.error}",
                       severity="warning", data={"command": cmd.command, "error": reply.error})

    def _send_reply(self, cmd: Command, reply_to: str, reply: Reply) -> None:
        self.publish(reply_to, reply, qos=1)
        self.command_done(cmd, reply)

    def _reply_topic(self, reply_to: str, command: str, cid: str) -> str | None:
        """Where to answer: ``reply_to`` if it is a reply topic of this instrument, the node's
        own reply topic if it is empty; None (refused, counted, answered on the node's own
        reply topic, an event) otherwise."""
        if not reply_to:
            return self._t_reply
        try:
            return self.topics.check_reply_to(reply_to)
        except ValueError as exc:
            self.counters["replies_refused"] += 1
            text = f"{command} refused: {exc}"
            self.publish(self._t_reply, Reply(id=cid, ok=False, service=self.name, error=text), qos=1)
            self.event("command_rejected", text, severity="warning",
                       data={"command": command, "error": text})
            return None

    def _answer_undecodable(self, payload: bytes, exc: DecodeError) -> None:
        """A command that is not a valid :class:`Command`: rejected and reported; answered
        with the reason (the non-finite argument named) when its id and reply topic read."""
        try:
            env = msgspec.msgpack.decode(payload, type=_CommandEnvelope)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError,
                OverflowError, RecursionError):
            env = None
        reason = exc.reason
        if env is not None and isinstance(env.args, dict):
            for name, value in env.args.items():
                where = _first_non_finite(value, f"argument {name!r}")
                if where:
                    reason = f"{where} is not finite (NaN or infinity)"
                    break
        self.reject(self._t_cmd, reason)
        if env is None or not isinstance(env.id, str) or not 0 < len(env.id) <= 128:
            return
        command = env.command if isinstance(env.command, str) else "?"
        reply_to = env.reply_to if isinstance(env.reply_to, str) else "?"
        topic = self._reply_topic(reply_to, command[:64], env.id)
        if topic is not None:
            self.publish(topic, Reply(id=env.id, ok=False, service=self.name,
                                      error=f"{command[:64]}: {reason}"), qos=1)

    # ------------------------------------------------------------------ run

    def stop(self) -> None:
        """Ask :meth:`run` to stop cleanly (as SIGINT/SIGTERM does)."""
        self._stop.set()

    async def run(self, install_signal_handlers: bool = True) -> None:
        """Connect, serve, reconnect with back-off until stopped; then stop cleanly."""
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        try:
            self.prepare()
            backoff = self.reconnect_min_s
            first = True
            while not self._stop.is_set():
                if not first:
                    self.counters["reconnects"] += 1
                first = False
                connected_at = None
                try:
                    # stamped now, so the will carries this session's last connect time
                    offline = decodable_status(self.status(online=False))
                    will = aiomqtt.Will(self._t_status, encode(self.stamp(offline)), qos=1, retain=True)
                    client = make_client(self.broker, self.client_id, will=will)
                    deliver_directly(client, self.receiver())
                    async with client:
                        connected_at = time.monotonic()
                        try:
                            await self._serve(client)
                        except aiomqtt.MqttError:
                            raise
                        except BaseException as exc:
                            self._went_down(exc)
                            raise
                except aiomqtt.MqttError as exc:
                    log.warning("%s: %s", self.name, connect_error_text(self.broker, exc))
                finally:
                    self._client = None
                    self.connected.clear()
                if self._stop.is_set():
                    break
                await self.on_disconnect()
                if connected_at is not None and time.monotonic() - connected_at > 5.0:
                    backoff = self.reconnect_min_s
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(self.reconnect_max_s, backoff * 2)
        finally:
            if install_signal_handlers:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    def _went_down(self, exc: BaseException) -> None:
        """An end that is not a clean stop: the offline status goes out now, ahead of the
        clean disconnect that follows (which makes the broker discard the will)."""
        reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, asyncio.CancelledError):
            log.critical("%s: stopped by %s", self.name, reason, exc_info=exc)
        try:
            status = decodable_status(self.status(online=False))
            status.detail["exit"] = reason[:500]
            self.publish(self._t_status, status, qos=1, retain=True)
        except Exception as inner:  # the status itself may be what failed: the will's, then
            log.error("%s: offline status failed (%s); publishing the will's", self.name, inner)
            with contextlib.suppress(Exception):
                self.publish(self._t_status, Status(service=self.name, state="offline",
                                                    online=False, session=self.session,
                                                    client_id=self.client_id,
                                                    detail={"exit": reason[:500]}),
                             qos=1, retain=True)

    async def _serve(self, client: aiomqtt.Client) -> None:
        self._client = client
        subs = list(self.subscriptions())
        if not any(topic_matches(pattern, self._t_cmd) for pattern, _ in subs):
            subs.append((self._t_cmd, 1))
        for topic, qos in subs:
            await client.subscribe(topic, qos=qos)
        self.announce()
        self.connected.set()
        await self.on_connected()
        tasks = [asyncio.create_task(self._watch_connection(client)),
                 asyncio.create_task(self._heartbeat()), asyncio.create_task(self._stop.wait()),
                 *(asyncio.create_task(work) for work in self.serve_tasks())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._tasks:  # commands in progress finish (their replies may go out)
                await asyncio.wait(list(self._tasks), timeout=5.0)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        if self._stop.is_set():
            await self.stopping()
            self.publish(self._t_status, decodable_status(self.status(online=False)), qos=1, retain=True)

    async def _watch_connection(self, client: aiomqtt.Client) -> None:
        """Return (by raising ``MqttError``) when the connection drops: messages do not come
        through ``client.messages`` (see :func:`deliver_directly`), whose iterator stays empty
        and raises as soon as aiomqtt sees the connection close."""
        async for message in client.messages:
            raise RuntimeError(f"unexpected message on {message.topic} through aiomqtt's queue")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.heartbeats += 1
            self.publish_status(interval=True)
