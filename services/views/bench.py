"""``kibble bench --only views``: what the operator's views cost a running stack.

A NIST-4 stack in lockstep at 1 kHz in force mode (:class:`~kibble.services.harness.up.Stack`, private
broker) runs ``seconds`` paced by a script reading ``sim/truth`` as ``hil_fullstack_steps_per_s``
of the ``loop`` group is measured, first alone, then with ``kibble dashboard`` (one browser's
websocket reading its pushes) and ``kibble epics`` (a Channel Access client monitoring the z PV)
running as child processes, then alone again. Keys: ``views_steps_per_s_without`` (the mean of
the two windows without them), ``views_steps_per_s_with``, ``views_steps_ratio`` (with /
without; target >= 0.95), ``views_dashboard_cpu_load`` and
``views_epics_cpu_load`` (cores: the process's CPU seconds from ``/proc/<pid>/stat`` per wall
second over the window; target < 0.10 each), ``views_dashboard_frames_per_s`` (frames the
dashboard read per second), ``views_dashboard_dropped`` (pushes dropped; 0 with a reading
browser), ``views_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp

from kibble.services.plans.mqtt_loop import BusLoop
from kibble.services.bench.realtime import proc_cpu_s
from kibble.services.harness.up import Stack

RATE_HZ = 1000.0


async def _steps_per_s(loop: BusLoop, seconds: float) -> float:
    await loop.run_seconds(0.5, record=False)
    f0, t0 = loop.frame, time.monotonic()
    await loop.run_seconds(seconds, record=False)
    return (loop.frame - f0) / (time.monotonic() - t0)


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


async def _measure(seconds: float, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"views_seconds": seconds}
    ca = {"EPICS_CA_SERVER_PORT": str(_free_port()), "EPICS_CA_ADDR_LIST": "127.0.0.1",
          "EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
          "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO", "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1"}
    env = {**os.environ, **ca, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="kibble-viewsbench-") as tmp:
        async with Stack("nist4", clock="lockstep", rate_hz=RATE_HZ, run_dir=Path(tmp),
                         progress=lambda s: None) as stack:
            assert stack.broker_url is not None
            bus = ["--broker", stack.broker_url, "--instrument", stack.instrument]
            async with BusLoop(stack.broker_url, stack.instrument, RATE_HZ) as loop:
                await loop.wait_frames()
                await loop.command("servo", "mode", mode="force")
                before = await _steps_per_s(loop, seconds)
                say(f"  without the views: {before:.0f} steps/s")
                dash, line = await _start("dashboard", *bus, "--port", "0", env=env, word="http://")
                epics, _ = await _start("epics", *bus, env=env, word="epics: PVs")
                url = line.split()[1]
                try:
                    out.update(await _with_views(loop, seconds, url, dash.pid, epics.pid, stack.instrument, ca))
                finally:
                    for proc in (dash, epics):
                        proc.terminate()
                        await proc.wait()
                after = await _steps_per_s(loop, seconds)
                say(f"  without the views again: {after:.0f} steps/s")
                out["views_steps_per_s_without"] = (before + after) / 2
    out["views_steps_ratio"] = out["views_steps_per_s_with"] / out["views_steps_per_s_without"]
    say(f"  with them: {out['views_steps_per_s_with']:.0f} steps/s (ratio {out['views_steps_ratio']:.3f}), "
        f"dashboard {out['views_dashboard_cpu_load']:.3f} cores, epics {out['views_epics_cpu_load']:.3f} cores")
    return out


async def _with_views(loop: BusLoop, seconds: float, url: str, dash_pid: int, epics_pid: int,
                      instrument: str, ca: dict[str, str]) -> dict[str, Any]:
    os.environ.update(ca)
    from caproto.threading.client import Context

    ctx = Context()
    # the threading client blocks while it searches: off the event loop, whose MQTT client
    # must go on answering the broker's keepalive
    (z,) = await asyncio.to_thread(ctx.get_pvs, f"KB:{instrument}:daq:frame:coil_z_m", timeout=10.0)
    updates = []

    def on_update(sub, response) -> None:  # caproto holds callbacks weakly: this name keeps it
        updates.append(response.metadata.timestamp)

    sub = await asyncio.to_thread(z.subscribe, data_type="time")
    sub.add_callback(on_update)
    pushes = []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}ws") as ws:
        async def read() -> None:
            async for msg in ws:
                pushes.append(json.loads(msg.data))
        reader = asyncio.create_task(read())
        await loop.run_seconds(1.0, record=False)   # the views settle
        deadline = time.monotonic() + 10.0          # and the page has its first push (wall time:
        while not pushes:                           # a fast lockstep runs 1 s in less)
            if time.monotonic() > deadline:
                raise RuntimeError("views bench: the dashboard pushed nothing to its websocket in 10 s")
            await loop.run_seconds(0.1, record=False)
        c0 = {pid: proc_cpu_s(pid) for pid in (dash_pid, epics_pid)}
        frames0 = pushes[-1]["counters"].get("frames", 0)
        t0 = time.monotonic()
        steps = await _steps_per_s(loop, seconds)
        wall = time.monotonic() - t0
        load = {pid: (proc_cpu_s(pid) - c0[pid]) / wall for pid in c0}
        reader.cancel()
    sub.clear()
    ctx.disconnect()
    return {"views_steps_per_s_with": steps, "views_dashboard_cpu_load": load[dash_pid],
            "views_epics_cpu_load": load[epics_pid],
            "views_dashboard_frames_per_s": (pushes[-1]["counters"].get("frames", 0) - frames0) / wall,
            "views_dashboard_dropped": pushes[-1]["dropped_total"],
            "views_epics_z_updates_per_s": len(updates) / max(wall, 1e-9)}


def run(seconds: float = 20.0, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The figures of the module docstring (about a minute and a half)."""
    return asyncio.run(_measure(seconds, say))
