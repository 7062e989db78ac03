"""``kibble bench --only views``: what the operator's views cost a running stack.

Windows alternate: without the views, then with ``kibble dashboard`` (one browser's websocket
reading its pushes) and ``kibble epics`` (a Channel Access monitor of the z PV, in a process of
its own) running as child processes (started before the window, stopped after it), then
without again, ``rounds`` times: a stack's rate on a two-core machine wanders by several per
cent over a minute, and each window with the views is compared with its neighbours. Two parts,
the NIST-4 stack (:class:`~kibble.services.harness.up.Stack`, on a broker of its own) at 1 kHz in
force mode in each.

**Lockstep**, as fast as the stack goes: its steps per second (``hil_fullstack_steps_per_s``
of the ``loop`` group) read from the simulator's own stamps, the frame number and ``t_mono_s``
of the newest ``sim/truth`` at each end of a window (an observer that falls behind does not
change them). Keys:

- ``views_steps_per_s_without`` and ``views_steps_per_s_with``: the means of the windows;
  ``views_steps_ratio`` (with / without; target >= 0.95); ``views_steps_ratio_rounds``: each
  window with the views over the mean of the two beside it;
- ``views_dashboard_cpu_load`` and ``views_epics_cpu_load`` (cores: the process's CPU seconds
  from ``/proc/<pid>/stat`` per wall second over the windows with the views; target < 0.10
  each); ``views_broker_cpu_load_without`` and ``_with`` (the broker, which sends every frame
  to each view too), ``views_stack_cpu_load_...`` (the simulator and the daemons),
  ``views_observer_cpu_load_...`` (this process: the truth follower, and the browser's
  websocket);
- ``views_dashboard_frames_per_s`` (frames the dashboard read per second, from its pushes'
  counters: the DAQ's and the servo's, two per step), ``views_dashboard_dropped`` (pushes
  dropped; 0 with a reading browser), ``views_epics_z_updates_per_s`` (the monitor's
  updates), ``views_seconds``, ``views_rounds``.

**Real time**, watched by :mod:`~kibble.services.bench.realtime`'s outside observer (a process
of its own subscribed to ``kb/#``): the clock makes 1000 steps/s whatever happens, so what the
views could take away is answers. Keys (``_without`` / ``_with``, means over the windows):
``views_rt_answered_steps_per_s_...`` (sensor frames per second that every lockstep device
answered), ``views_rt_steps_ratio`` (with / without), ``views_rt_answered_...``,
``views_rt_p99_ms_...``, ``views_rt_broker_...``; ``views_rt_max_ms_...`` (the largest),
``views_rt_frames_lost_...`` and ``views_rt_trips_...`` (sums); ``views_rt_dashboard_cpu_load``,
``views_rt_epics_cpu_load``, ``views_rt_epics_z_updates_per_s``; ``views_rt_seconds``,
``views_rt_rounds``. And ``views_loadavg_1min``, the machine's at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import aiomqtt
import numpy as np

from kibble.bus_schema.codec import decode
from kibble.bus_schema.messages import SimTruth
from kibble.bus_schema.topics import Topics
from kibble.bus_schema.transport import deliver_directly, make_client
from kibble.services.bench.realtime import proc_cpu_s
from kibble.services.harness.broker import Broker
from kibble.services.harness.up import Stack
from kibble.services.runtime.client import BusClient, new_client_id

RATE_HZ = 1000.0


async def _start(*argv: str, env: dict[str, str], word: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "kibble.services.cli.main", *argv, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60.0)).decode()
        if word in line:
            asyncio.get_running_loop().create_task(proc.stdout.read())  # keep its pipe drained
            return proc, line.strip()
        if not line:
            raise RuntimeError(f"views bench: kibble {argv[0]} exited before it was ready")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NewestTruth:
    """The newest ``sim/truth`` payload, read on a timer (see :func:`deliver_directly`)."""

    def __init__(self) -> None:
        self.payload: bytes | None = None

    def __call__(self, topic: str, payload: bytes) -> None:
        self.payload = payload

    def stamp(self) -> tuple[int, float]:
        """(frame, the simulator's ``t_mono_s``) of the newest truth."""
        if self.payload is None:
            raise RuntimeError("views bench: no sim/truth frame received")
        truth = decode(self.payload, SimTruth)
        return truth.frame, truth.t_mono_s

    async def follow(self, url: str, topic: str) -> None:
        client = make_client(url, new_client_id("viewsbench"))
        deliver_directly(client, self, every_s=0.02)
        async with client:
            await client.subscribe(topic, qos=0)
            async for _ in client.messages:  # stays empty; raises if the broker goes
                pass


async def _cpu_window(seconds: float, groups: dict[str, list[int | None]]) -> tuple[float, float, dict[str, float]]:
    """Wait ``seconds``: its start and end on ``time.monotonic()``, and the CPU load (cores,
    from ``/proc/<pid>/stat``) of each named group of processes over it."""
    def cpu() -> dict[str, float]:
        return {name: sum(proc_cpu_s(pid) for pid in pids) for name, pids in groups.items()}

    c0, t0 = cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = cpu(), time.monotonic()
    return t0, t1, {name: (c1[name] - c0[name]) / (t1 - t0) for name in groups}


async def _window(truth: _NewestTruth, seconds: float, pids: dict[str, int | None],
                  stack: Stack) -> dict[str, float]:
    """``steps`` per second of the stack over ``seconds``, the CPU load (cores) of each of
    ``pids``, of the ``stack``'s processes and of this one (``observer``: the truth follower,
    and with the views, their browser's websocket)."""
    groups = {name: [pid] for name, pid in pids.items()}
    groups["observer"] = [os.getpid()]
    groups["stack"] = [child.proc.pid for child in stack.children.values() if child.proc is not None]
    f0, s0 = truth.stamp()
    _, _, out = await _cpu_window(seconds, groups)
    f1, s1 = truth.stamp()
    out["steps"] = (f1 - f0) / (s1 - s0)
    return out


def _ca_env() -> dict[str, str]:
    """Channel Access on one free loopback port (the server's and the monitor's)."""
    return {"EPICS_CA_SERVER_PORT": str(_free_port()), "EPICS_CA_ADDR_LIST": "127.0.0.1",
            "EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO", "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1"}


async def _views(bus: list[str], env: dict[str, str]) -> tuple[asyncio.subprocess.Process,
                                                                 asyncio.subprocess.Process, str]:
    """``kibble dashboard`` and ``kibble epics`` started (their processes, the page's URL)."""
    dash, line = await _start("dashboard", *bus, "--port", "0", env=env, word="http://")
    epics, _ = await _start("epics", *bus, env=env, word="epics: PVs")
    return dash, epics, line.split()[1]


async def _stop(*procs: asyncio.subprocess.Process) -> None:
    for proc in procs:
        proc.terminate()
        await proc.wait()


async def _lockstep(seconds: float, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"views_seconds": seconds, "views_rounds": rounds}
    ca = _ca_env()
    env = {**os.environ, **ca, "PYTHONUNBUFFERED": "1"}
    without: list[dict[str, float]] = []
    with_views: list[dict[str, Any]] = []
    truth = _NewestTruth()
    with tempfile.TemporaryDirectory(prefix="kibble-viewsbench-") as tmp:
        async with Broker() as broker, Stack("nist4", clock="lockstep", rate_hz=RATE_HZ,
                                             broker_url=broker.url, run_dir=Path(tmp),
                                             progress=lambda s: None) as stack:
            inst = stack.instrument
            bus = ["--broker", broker.url, "--instrument", inst]
            follower = asyncio.create_task(truth.follow(broker.url, Topics(inst).sim("truth")))
            try:
                async with BusClient(broker.url, inst) as client:
                    reply = await client.request("servo", "mode", {"mode": "force"})
                    if not reply.ok:
                        raise RuntimeError(f"views bench: the servo refused force mode: {reply.error}")
                await asyncio.sleep(1.0)
                without.append(await _window(truth, seconds, {"broker": broker.pid}, stack))
                say(f"  without the views: {without[-1]['steps']:.0f} steps/s")
                for _ in range(rounds):
                    dash, epics, url = await _views(bus, env)
                    try:
                        pids = {"broker": broker.pid, "dashboard": dash.pid, "epics": epics.pid}
                        with_views.append(await _with_views(
                            functools.partial(_window, truth, seconds, pids, stack), url, stack, ca))
                    finally:
                        await _stop(dash, epics)
                    got = with_views[-1]
                    say(f"  with them: {got['steps']:.0f} steps/s, dashboard {got['dashboard']:.3f} "
                        f"cores, epics {got['epics']:.3f} cores")
                    await asyncio.sleep(1.0)
                    without.append(await _window(truth, seconds, {"broker": broker.pid}, stack))
                    say(f"  without the views: {without[-1]['steps']:.0f} steps/s")
            finally:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await follower

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    out["views_steps_per_s_without"] = mean(without, "steps")
    out["views_steps_per_s_with"] = mean(with_views, "steps")
    out["views_steps_ratio"] = out["views_steps_per_s_with"] / out["views_steps_per_s_without"]
    out["views_steps_ratio_rounds"] = [row["steps"] / ((a["steps"] + b["steps"]) / 2)
                                       for row, a, b in zip(with_views, without, without[1:])]
    out["views_dashboard_cpu_load"] = mean(with_views, "dashboard")
    out["views_epics_cpu_load"] = mean(with_views, "epics")
    out["views_broker_cpu_load_without"] = mean(without, "broker")
    out["views_broker_cpu_load_with"] = mean(with_views, "broker")
    for key in ("stack", "observer"):
        out[f"views_{key}_cpu_load_without"] = mean(without, key)
        out[f"views_{key}_cpu_load_with"] = mean(with_views, key)
    out["views_dashboard_frames_per_s"] = mean(with_views, "frames_per_s")
    out["views_dashboard_dropped"] = sum(row["dropped"] for row in with_views)
    out["views_epics_z_updates_per_s"] = mean(with_views, "z_updates_per_s")
    say(f"  steps/s with the views / without: {out['views_steps_ratio']:.3f} (rounds: "
        f"{', '.join(f'{r:.3f}' for r in out['views_steps_ratio_rounds'])}); dashboard "
        f"{out['views_dashboard_cpu_load']:.3f} cores, epics {out['views_epics_cpu_load']:.3f} cores, "
        f"broker {out['views_broker_cpu_load_without']:.3f} -> {out['views_broker_cpu_load_with']:.3f}, "
        f"stack {out['views_stack_cpu_load_without']:.3f} -> {out['views_stack_cpu_load_with']:.3f}, "
        f"observer {out['views_observer_cpu_load_without']:.3f} -> {out['views_observer_cpu_load_with']:.3f} cores")
    return out


_MONITOR = """
import sys, time
from caproto.threading.client import Context

(pv,) = Context().get_pvs(sys.argv[1], timeout=10.0)
sub = pv.subscribe(data_type="time")


def on_update(sub, response):  # caproto holds callbacks weakly: this name keeps it
    print(time.monotonic(), flush=True)


sub.add_callback(on_update)
print("monitoring", flush=True)
while True:
    time.sleep(1.0)
"""
"""A Channel Access monitor (caproto's threading client) in a process of its own, as a CA
client is: one line per update, its receipt on ``time.monotonic()`` (the same clock here)."""


async def _with_views(window: Callable[[], Awaitable[dict[str, Any]]], url: str, stack: Stack,
                      ca: dict[str, str]) -> dict[str, Any]:
    """One ``window`` with the views, a browser's websocket and a CA monitor reading them:
    also ``frames_per_s`` the dashboard read, its ``dropped`` pushes and the monitor's
    ``z_updates_per_s``."""
    monitor = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MONITOR, f"KB:{stack.instrument}:daq:frame:coil_z_m",
        env={**os.environ, **ca}, stdout=asyncio.subprocess.PIPE)
    assert monitor.stdout is not None
    updates: list[float] = []
    pushes: list[tuple[float, dict[str, Any]]] = []
    try:
        if b"monitoring" not in await asyncio.wait_for(monitor.stdout.readline(), 20.0):
            raise RuntimeError("views bench: the CA monitor did not connect to the z PV")

        async def monitored() -> None:
            assert monitor.stdout is not None
            async for line in monitor.stdout:
                updates.append(float(line))

        async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}ws") as ws:
            async def read() -> None:
                async for msg in ws:
                    pushes.append((time.monotonic(), json.loads(msg.data)))
            readers = [asyncio.create_task(read()), asyncio.create_task(monitored())]
            deadline = time.monotonic() + 10.0
            while not pushes:
                if time.monotonic() > deadline:
                    raise RuntimeError("views bench: the dashboard pushed nothing to its websocket in 10 s")
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # the views settle
            t0 = time.monotonic()
            out = await window()
            t1 = time.monotonic()
            for task in readers:
                task.cancel()
    finally:
        await _stop(monitor)
    inside = [(t, push) for t, push in pushes if t0 <= t <= t1]
    (ta, a), (tb, b) = inside[0], inside[-1]
    out["frames_per_s"] = (b["counters"].get("frames", 0) - a["counters"].get("frames", 0)) / (tb - ta)
    out["dropped"] = b["dropped_total"]
    out["z_updates_per_s"] = sum(t0 <= t <= t1 for t in updates) / (t1 - t0)
    return out


async def _realtime(seconds: float, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The real-time part (see the module docstring): figures ``views_rt_...``."""
    from kibble.services.bench.realtime import Observer, analyze, force_mode
    from kibble.services.instruments import instrument

    spec = instrument("nist4")
    ca = _ca_env()
    env = {**os.environ, **ca, "PYTHONUNBUFFERED": "1"}
    windows: list[tuple[bool, float, float, dict[str, float]]] = []

    async def window(pids: dict[str, int | None]) -> dict[str, Any]:
        t0, t1, loads = await _cpu_window(seconds, {name: [pid] for name, pid in pids.items()})
        return {"t0": t0, "t1": t1, **loads}

    with tempfile.TemporaryDirectory(prefix="kibble-viewsbench-rt-") as tmp:
        async with Broker() as broker, Observer(broker.url, "nist4", spec.devices, Path(tmp) / "obs.pkl") as obs:
            async with Stack("nist4", clock="realtime", rate_hz=RATE_HZ, broker_url=broker.url,
                             run_dir=Path(tmp), progress=lambda s: None) as stack:
                await force_mode(stack, "nist4", 5.0, lambda s: None)
                bus = ["--broker", broker.url, "--instrument", stack.instrument]
                got = await window({"broker": broker.pid})
                windows.append((False, got.pop("t0"), got.pop("t1"), got))
                for _ in range(rounds):
                    dash, epics, url = await _views(bus, env)
                    try:
                        pids = {"broker": broker.pid, "dashboard": dash.pid, "epics": epics.pid}
                        got = await _with_views(functools.partial(window, pids), url, stack, ca)
                    finally:
                        await _stop(dash, epics)
                    windows.append((True, got.pop("t0"), got.pop("t1"), got))
                    await asyncio.sleep(1.0)
                    got = await window({"broker": broker.pid})
                    windows.append((False, got.pop("t0"), got.pop("t1"), got))
                await asyncio.sleep(1.0)
                rec = await obs.records()
    rows: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for views_on, t0, t1, cpu in windows:
        fig = analyze(rec, t0, t1, spec.devices, spec.daemons, spec.actuators)
        row = {**cpu, "answered_steps_per_s": fig["answered"] * fig["frames"] / (t1 - t0)}
        row.update({key: fig[key] for key in ("answered", "p99_ms", "max_ms", "frames_lost", "trips")})
        rows[views_on].append(row)
        say(f"  real time, {'with' if views_on else 'without'} the views: {row['answered_steps_per_s']:.0f} "
            f"answered steps/s ({row['answered']:.4f}), p99 {row['p99_ms']:.2f} ms, max "
            f"{row['max_ms']:.1f} ms, {row['frames_lost']} lost, {row['trips']} trips"
            + (f"; dashboard {row['dashboard']:.3f} cores, epics {row['epics']:.3f}" if views_on else ""))

    def mean(views_on: bool, key: str) -> float:
        return float(np.mean([row[key] for row in rows[views_on]]))

    out: dict[str, Any] = {}
    for when, views_on in (("without", False), ("with", True)):
        for key in ("answered_steps_per_s", "answered", "p99_ms", "broker"):
            out[f"views_rt_{key}_{when}"] = mean(views_on, key)
        out[f"views_rt_max_ms_{when}"] = max(row["max_ms"] for row in rows[views_on])
        out[f"views_rt_frames_lost_{when}"] = sum(row["frames_lost"] for row in rows[views_on])
        out[f"views_rt_trips_{when}"] = sum(row["trips"] for row in rows[views_on])
    out["views_rt_steps_ratio"] = (out["views_rt_answered_steps_per_s_with"]
                                   / out["views_rt_answered_steps_per_s_without"])
    out["views_rt_dashboard_cpu_load"] = mean(True, "dashboard")
    out["views_rt_epics_cpu_load"] = mean(True, "epics")
    out["views_rt_epics_z_updates_per_s"] = mean(True, "z_updates_per_s")
    say(f"  real time: answered steps/s with the views / without: {out['views_rt_steps_ratio']:.4f}, p99 "
        f"{out['views_rt_p99_ms_without']:.2f} -> {out['views_rt_p99_ms_with']:.2f} ms; dashboard "
        f"{out['views_rt_dashboard_cpu_load']:.3f} cores, epics {out['views_rt_epics_cpu_load']:.3f}")
    return out


async def _measure(seconds: float, rounds: int, rt_seconds: float, rt_rounds: int,
                   say: Callable[[str], None]) -> dict[str, Any]:
    say("  lockstep")
    out = await _lockstep(seconds, rounds, say)
    say("  real time")
    out.update(await _realtime(rt_seconds, rt_rounds, say))
    out["views_rt_seconds"], out["views_rt_rounds"] = rt_seconds, rt_rounds
    out["views_loadavg_1min"] = os.getloadavg()[0]
    return out


def run(seconds: float = 10.0, rounds: int = 5, rt_seconds: float = 20.0, rt_rounds: int = 3,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """The figures of the module docstring (about five minutes)."""
    return asyncio.run(_measure(seconds, rounds, rt_seconds, rt_rounds, say))
