"""``kibble measure --plan NAME`` on a running stack (``kibble up --measurement``).

Opens a recording (the ``recorder``), has the ``sequencer`` run the plan ``--repeat`` times,
shows its progress (step, simulated or real seconds done of those planned, ETA), closes the
recording and analyses it (:mod:`kibble.services.data.runanalysis`). Ctrl-C aborts the plan through
its safe ending and still closes the recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kibble.services.runtime.client import BusClient, BusError, result_of

ALIASES = {"nist4": "nist4_run", "efb": "efb_weighing"}


async def _ask(bus: BusClient, service: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
    return result_of(await bus.request(service, command, args, timeout_s=10.0), service, command)


async def cli_measure_live(plan: str, args: dict[str, Any], repeat: int, run_id: str | None,
                           broker: str, instrument: str, timeout_s: float,
                           json_out: str | None, plots_dir: str | None) -> int:
    plan = ALIASES.get(plan, plan)
    if repeat < 1:
        print("kibble measure: --repeat must be >= 1", file=sys.stderr)
        return 2
    run_id = run_id or f"{plan}-{time.strftime('%Y%m%dT%H%M%S')}"
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        async with BusClient(broker, instrument) as bus:
            try:
                path = Path((await _ask(bus, "recorder", "start", {"run_id": run_id}))["path"])
            except (ValueError, BusError) as exc:
                print(f"kibble measure: {exc} (is the stack up with --measurement?)", file=sys.stderr)
                return 1
            print(f"recording {run_id} -> {path}", flush=True)
            try:
                for k in range(repeat):
                    ok = await _one(bus, plan, args, k, repeat, timeout_s, interrupted)
                    if not ok:
                        return 1
            except (ValueError, BusError) as exc:
                print(f"kibble measure: {exc}", file=sys.stderr)
                return 1
            finally:
                with contextlib.suppress(ValueError, BusError):
                    closed = await _ask(bus, "recorder", "stop", {})
                    print(f"recorded {closed['records']} messages, {closed['bytes']} bytes", flush=True)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    from kibble.services.data.runanalysis import cli_analyze

    return cli_analyze(str(path), json_out, plots_dir, None)


async def _one(bus: BusClient, plan: str, args: dict[str, Any], k: int, repeat: int,
               timeout_s: float, interrupted: asyncio.Event) -> bool:
    """Run the plan once and follow it; True if it succeeded."""
    await _ask(bus, "sequencer", "run", {"plan": plan, **args})
    deadline = time.monotonic() + timeout_s
    aborted = False
    last = ""
    while True:
        if interrupted.is_set() and not aborted:
            print("interrupted: aborting the plan (safe ending)", flush=True)
            with contextlib.suppress(ValueError):
                await _ask(bus, "sequencer", "abort", {"reason": "interrupted at the console"})
            aborted = True
        if time.monotonic() > deadline and not aborted:
            print(f"no end after {timeout_s:.0f} s: aborting the plan", flush=True)
            with contextlib.suppress(ValueError):
                await _ask(bus, "sequencer", "abort", {"reason": "kibble measure timed out"})
            aborted = True
        state = await _ask(bus, "sequencer", "state", {})
        if state["engine"] == "idle" and state["last_stop"]:
            stop = state["last_stop"]
            print(f"[{k + 1}/{repeat}] {plan}: {stop['exit_status']} {stop.get('reason', '')}".rstrip(),
                  flush=True)
            return stop["exit_status"] == "success"
        eta = "?" if state["eta_s"] < 0 else f"{state['eta_s']:.0f} s"
        line = (f"[{k + 1}/{repeat}] {plan}: step {state['step']}, {state['sim_s']:.0f} of "
                f"{state['total_s']:.0f} s, ETA {eta}")
        if line != last:
            print(line, flush=True)
            last = line
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(interrupted.wait(), 1.0)
