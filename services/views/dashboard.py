"""``kibble dashboard``: the instrument's live web page (aiohttp; plots by uPlot, served from
the package, no network needed).

One page (``static/index.html``): live traces over a chosen window (10 s .. 1 h) decimated to
at most :data:`MAX_POINTS` points per trace, a panel per daemon from its retained status (stale
ones greyed), each daemon's parameters as its ``params`` topic declares them (set through
``param.set``, the reply shown in words, revert), the operator's commands as buttons (the
page asks for a confirmation of every one that moves or energizes the hardware), the event
log newest first, and the sequencer's measurement in progress.

The page talks to the server over one websocket (pushes every :data:`PUSH_S`) and posts its
requests to ``/api/param``, ``/api/revert`` and ``/api/cmd``. Each browser has a queue of at
most :data:`CLIENT_QUEUE` pushes: a browser that does not read loses pushes (counted, shown on
the page, and made good by a full push once it reads again), never a bus message, because the
bus is read by :class:`~kibble.services.views.model.BusView`, which never waits for a browser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import math
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

from kibble.services.views.model import BIN_HZ, STALE_AFTER_S, BusView, trace_units, unmeasured

STATIC = Path(__file__).with_name("static")
PUSH_S = 0.25
"""Period of the pushes to every browser (s)."""
CLIENT_QUEUE = 4
"""Pushes queued per browser at most; more are dropped (and counted)."""
SEND_BUFFER_B = 16384
"""The kernel's and aiohttp's send buffers per browser (bytes): a browser that stops reading
holds that much and :data:`CLIENT_QUEUE` pushes, no more."""
MAX_POINTS = 1000
"""Points per trace sent to a browser at most, whatever the window."""
WINDOWS_S = (10.0, 60.0, 600.0, 3600.0)
"""The trace windows the page offers (s)."""
EVENTS_SENT = 200
"""Events in a full push (the newest)."""

COMMANDS: tuple[dict[str, Any], ...] = (
    {"service": "servo", "command": "mode", "args": {"mode": "idle"}, "label": "idle", "confirm": True},
    {"service": "servo", "command": "mode", "args": {"mode": "force"}, "label": "force mode", "confirm": True},
    {"service": "servo", "command": "mode", "args": {"mode": "velocity"}, "label": "velocity mode",
     "confirm": True},
    {"service": "servo", "command": "mass", "args": {"test": True}, "label": "mass on", "confirm": True},
    {"service": "servo", "command": "mass", "args": {"test": False}, "label": "mass off", "confirm": True},
    {"service": "servo", "command": "erase", "args": {}, "label": "erase", "confirm": True},
    {"service": "servo", "command": "sweep", "args": {"direction": "down"}, "label": "sweep down",
     "confirm": True},
    {"service": "servo", "command": "sweep", "args": {"direction": "up"}, "label": "sweep up", "confirm": True},
    {"service": "daq", "command": "zero", "args": {}, "label": "zero", "confirm": True},
    {"service": "daq", "command": "unzero", "args": {}, "label": "unzero", "confirm": True},
    {"service": "damping", "command": "open", "args": {}, "label": "open relays", "confirm": True},
    {"service": "damping", "command": "close", "args": {}, "label": "close relays", "confirm": True},
    {"service": "sequencer", "command": "pause", "args": {}, "label": "pause", "confirm": True},
    {"service": "sequencer", "command": "resume", "args": {}, "label": "resume", "confirm": True},
    {"service": "sequencer", "command": "abort", "args": {}, "label": "abort", "confirm": True},
    *({"service": s, "command": c, "args": {}, "label": c, "confirm": True}
      for s in ("current_source", "damping", "theta_z", "hv_source") for c in ("arm", "disarm", "reset")),
)
"""The buttons, per daemon (shown for the daemons on the bus): every one of them moves or
energizes the hardware (or stops it doing so), so each asks for a confirmation."""


def window_k(window_s: float) -> int:
    """Display bins averaged into one point for a window of ``window_s``."""
    return max(1, math.ceil(window_s * BIN_HZ / MAX_POINTS))


def status_row(view: BusView, service: str, now_s: float) -> dict[str, Any]:
    """What a daemon's panel shows, from its last status."""
    s = view.statuses[service].msg
    t = s.timing
    return {"service": service, "state": s.state, "online": s.online, "stale": view.stale(service, now_s),
            "session": s.session, "heartbeat_age_s": now_s - s.t_utc_s if s.t_utc_s else None,
            "frame_age_ms_p50": t.age_ms_p50, "frame_age_ms_p99": t.age_ms_p99,
            "cpu_us_p50": t.cpu_us_p50, "cpu_us_p99": t.cpu_us_p99, "cpu_load": t.cpu_load,
            "counters": dict(s.counters), "detail": msgspec.to_builtins(s.detail)}


@dataclass(eq=False)
class Client:
    """One browser: its window, what it has been sent, and its bounded queue of pushes."""

    ws: web.WebSocketResponse
    window_s: float = WINDOWS_S[0]
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    after: dict[str, int] = field(default_factory=dict)
    events_after: int = -1
    params_version: int = -1
    full: bool = True
    """The next push carries everything (first push, new window, or pushes were dropped)."""
    dropped: int = 0


class Dashboard:
    """The web application over a :class:`BusView` (see the module docstring).

    :param auth: ``("basic", user, password)``, ``("token", token)`` or None (no check).
    """

    def __init__(self, view: BusView, auth: tuple[str, ...] | None = None) -> None:
        self.view = view
        self.auth = auth
        self.clients: set[Client] = set()
        self.dropped = 0
        """Pushes dropped over every browser since the start."""
        self.app = web.Application(middlewares=[self._check_auth])
        self.app.add_routes([
            web.get("/", self._index), web.get("/ws", self._ws), web.get("/api/state", self._state),
            web.post("/api/param", self._param), web.post("/api/revert", self._revert),
            web.post("/api/cmd", self._cmd), web.static("/static", STATIC)])

    # ---------------------------------------------------------------- auth

    @web.middleware
    async def _check_auth(self, request: web.Request, handler):
        if self.auth is None:
            return await handler(request)
        if self.auth[0] == "basic":
            header = request.headers.get("Authorization", "")
            want = "Basic " + base64.b64encode(f"{self.auth[1]}:{self.auth[2]}".encode()).decode()
            if hmac.compare_digest(header.encode(), want.encode()):
                return await handler(request)
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="kibble"'})
        token = self.auth[1]
        given = (request.query.get("token") or request.cookies.get("kibble_token")
                 or request.headers.get("Authorization", "").removeprefix("Bearer "))
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise web.HTTPUnauthorized(text="kibble dashboard: a token is needed (?token=...)")
        response = await handler(request)
        if "token" in request.query and isinstance(response, web.Response):
            response.set_cookie("kibble_token", token, httponly=True, samesite="Strict")
        return response

    # ---------------------------------------------------------------- pages and requests

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def _state(self, request: web.Request) -> web.Response:
        """Everything a full push carries, for a 10 s window (scripts, tests)."""
        return web.json_response(self.push(Client(ws=None)))  # type: ignore[arg-type]

    async def _body(self, request: web.Request, *names: str) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="the request body is not JSON") from None
        missing = [n for n in names if not isinstance(body, dict) or n not in body]
        if missing:
            raise web.HTTPBadRequest(text=f"the request lacks {', '.join(missing)}")
        return body

    async def _param(self, request: web.Request) -> web.Response:
        """``{"service", "name", "value"}``: ``param.set`` with the value as ``kibble param set``
        reads it from text; the reply as ``{"ok", "result", "error"}``."""
        from kibble.services.cli.main import parse_value

        body = await self._body(request, "service", "name", "value")
        value = body["value"]
        value = parse_value(value) if isinstance(value, str) else value
        return web.json_response(await self.view.request(
            str(body["service"]), "param.set", {"name": body["name"], "value": value}))

    async def _revert(self, request: web.Request) -> web.Response:
        body = await self._body(request, "service")
        return web.json_response(await self.view.request(str(body["service"]), "param.revert"))

    async def _cmd(self, request: web.Request) -> web.Response:
        body = await self._body(request, "service", "command")
        args = body.get("args") or {}
        if not isinstance(args, dict):
            raise web.HTTPBadRequest(text="args must be an object of NAME: VALUE")
        return web.json_response(await self.view.request(str(body["service"]), str(body["command"]), args))

    # ---------------------------------------------------------------- the live page

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, writer_limit=SEND_BUFFER_B)
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_B)
        await ws.prepare(request)
        client = Client(ws)
        self.clients.add(client)
        writer = asyncio.create_task(self._write(client))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                with contextlib.suppress(json.JSONDecodeError, TypeError, ValueError):
                    want = float(json.loads(msg.data).get("window_s"))
                    if WINDOWS_S[0] <= want <= WINDOWS_S[-1]:
                        client.window_s, client.full = want, True
        finally:
            self.clients.discard(client)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    async def _write(self, client: Client) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await client.ws.send_str(await client.queue.get())

    async def pusher(self) -> None:
        """Every :data:`PUSH_S`, a push into every browser's queue (dropped where it is full)."""
        while True:
            await asyncio.sleep(PUSH_S)
            for client in list(self.clients):
                if client.queue.full():
                    client.dropped += 1
                    self.dropped += 1
                    client.full = True
                    continue
                client.queue.put_nowait(json.dumps(self.push(client), allow_nan=False))

    def push(self, client: Client) -> dict[str, Any]:
        """What ``client`` is sent now: the traces since its last push (all of its window on a
        full push), the panels, new events, the parameters when they changed."""
        view, now = self.view, time.time()
        full, client.full = client.full, False
        k = window_k(client.window_s)
        traces = {}
        for src, trace in view.traces.items():
            after = (trace.closed - int(client.window_s * BIN_HZ)) if full else client.after.get(src, -1)
            last, t, cols = trace.series(after, k)
            client.after[src] = last
            traces[src] = {"t": t, **cols}
        out: dict[str, Any] = {
            "full": full, "now_utc_s": now, "window_s": client.window_s, "k": k, "bin_hz": BIN_HZ,
            "instrument": view.instrument, "connection": view.connection, "dropped": client.dropped,
            "dropped_total": self.dropped,
            "counters": dict(view.counters), "traces": traces,
            "statuses": [status_row(view, s, now) for s in sorted(view.statuses)],
            "stale_after_s": STALE_AFTER_S}
        first = view.events_seen - len(view.events)
        since = max(client.events_after + 1, first) if not full else max(first, view.events_seen - EVENTS_SENT)
        out["events"] = [view.events[i - first] for i in range(since, view.events_seen)]
        client.events_after = view.events_seen - 1
        if full or client.params_version != view.params_version:
            client.params_version = view.params_version
            out["params"] = {s: msgspec.to_builtins(view.param_specs(s)) for s in sorted(view.params)}
            out["commands"] = list(COMMANDS)
            out["units"] = trace_units()
            out["unmeasured"] = unmeasured(view.instrument)
            out["windows_s"] = list(WINDOWS_S)
        return out


async def serve(url: str, instrument: str, host: str = "127.0.0.1", port: int = 8080,
                auth: tuple[str, ...] | None = None, ready=None) -> None:
    """Run the dashboard until cancelled; ``ready(port)`` once it listens (``port`` 0: a free
    one)."""
    async with BusView(url, instrument) as view:
        dash = Dashboard(view, auth)
        runner = web.AppRunner(dash.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        pusher = asyncio.create_task(dash.pusher())
        try:
            if ready is not None:
                ready(runner.addresses[0][1])
            await asyncio.Event().wait()
        finally:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher
            await runner.cleanup()


def read_auth(user: str | None, password_file: str | None, token_file: str | None) -> tuple[str, ...] | None:
    """The dashboard's check from its options: basic auth (``user`` and the first line of
    ``password_file``), a token (the first line of ``token_file``), or None; ``ValueError``
    naming what is wrong."""
    if token_file and (user or password_file):
        raise ValueError("choose basic auth (--user, --password-file) or a token (--token-file), not both")
    if bool(user) != bool(password_file):
        raise ValueError("basic auth needs both --user and --password-file")

    def first_line(path: str, what: str) -> str:
        try:
            line = Path(path).read_text().splitlines()[0].strip() if Path(path).read_text() else ""
        except OSError as exc:
            raise ValueError(f"cannot read the {what} file {path}: {exc.strerror}") from None
        if not line:
            raise ValueError(f"the {what} file {path} is empty")
        return line

    if token_file:
        return ("token", first_line(token_file, "token"))
    if user:
        return ("basic", user, first_line(str(password_file), "password"))
    return None
