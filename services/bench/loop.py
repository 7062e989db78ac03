"""``kibble bench --only loop``: the closed-loop figures of docs/architecture.md section 7.

In process (real daemons + plant, :class:`~kibble.services.harness.inprocess.InProcessStack`, 1 kHz,
default noise): ``null_rms_nm`` (force mode, 600 s, 0.1 Hz bandwidth), ``mass_exchange_peak_um``
and ``mass_exchange_settle_s`` (worst of every exchange: the auxiliary mass off, then two 1 kg
on/off cycles; ``mass_exchange_aux_peak_um`` and ``mass_exchange_1kg_peak_um`` the worst of
each kind), ``velocity_err_rel_rms`` (one full
80 mm sweep each way), ``damping_decay_ratio_min``, ``theta_z_rms_urad``, ``efb_null_rms_nm``
(1 mg loaded, 300 s). Over the bus (:class:`~kibble.services.harness.up.Stack`, every daemon a process,
private broker): ``hil_chain_steps_per_s``, the architecture's (docs/architecture.md) HIL chain hw -> daq -> servo ->
current_source -> hw in lockstep (the simulator and those three daemons only, counted by the
simulator, with its sensor-frame-to-answer latency ``hil_chain_latency_p50_ms``/``_p99_ms``);
``hil_fullstack_steps_per_s`` (lockstep, every daemon, paced by a script reading ``sim/truth``
as :class:`~kibble.services.plans.mqtt_loop.BusLoop` does) and ``hil_latency_p99_ms`` (realtime, 1 kHz,
sensor frame to the last actuator command at the simulator, from its ``stats``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kibble.services.harness import scenarios as S
from kibble.services.runtime.client import BusClient
from kibble.services.plans.mqtt_loop import BusLoop
from kibble.services.harness.inprocess import InProcessStack
from kibble.services.instruments import Instrument, instrument
from kibble.services.harness.up import Stack

RATE_HZ = 1000.0

CHAIN_SPEC = dataclasses.replace(instrument("nist4"), daemons=("daq", "current_source", "servo"),
                                 actuators=("current_source",), together=(("daq", "servo", "current_source"),))
"""The HIL chain of docs/architecture.md section 7: hw -> daq -> servo -> current_source -> hw
(in one process above ``up.TOGETHER_ABOVE_HZ``, as in the whole stack)."""


class ChainStack(Stack):
    """A :class:`Stack` of the simulator and the HIL chain's daemons only (:data:`CHAIN_SPEC`)."""

    @property
    def spec(self) -> Instrument:
        return CHAIN_SPEC


async def _in_process(say: Callable[[str], None], null_s: float, efb_s: float) -> dict[str, float]:
    out: dict[str, float] = {}
    stack = InProcessStack("nist4", rate_hz=RATE_HZ, seed=101)
    try:
        await stack.start()
        t0 = time.monotonic()
        null = await S.force_null(stack, null_s)
        out["null_rms_nm"] = null["null_rms_m"] * 1e9
        out["inprocess_frames_per_s"] = (null_s + 10.0) * RATE_HZ / (time.monotonic() - t0)
        say(f"  null {out['null_rms_nm']:.4f} nm over {null_s:g} s")
        ex = await S.mass_exchanges(stack, cycles=2)
        out["mass_exchange_peak_um"] = max(ex["peaks_m"]) * 1e6
        out["mass_exchange_settle_s"] = max(ex["settle_s"])
        aux = [p for name, p in zip(ex["exchanges"], ex["peaks_m"]) if name == "aux off"]
        one_kg = [p for name, p in zip(ex["exchanges"], ex["peaks_m"]) if name != "aux off"]
        out["mass_exchange_aux_peak_um"] = max(aux) * 1e6
        out["mass_exchange_1kg_peak_um"] = max(one_kg) * 1e6
        say(f"  mass exchange peak {out['mass_exchange_peak_um']:.3f} um (aux off "
            f"{out['mass_exchange_aux_peak_um']:.3f} um, 1 kg {out['mass_exchange_1kg_peak_um']:.3f} um)")
        sw = await S.velocity_sweeps(stack, travel_m=0.08)
        out["velocity_err_rel_rms"] = max(sw["velocity_err_rel_rms"])
        say(f"  velocity error {out['velocity_err_rel_rms']:.3g}")
        dm = await S.damping_ratios(stack)
        out["damping_decay_ratio_min"] = min(dm["ratios"].values())
        for dof, ratio in dm["ratios"].items():
            out[f"damping_decay_ratio_{dof}"] = ratio
        tz = await stack.run_seconds(60.0)
        out["theta_z_rms_urad"] = float(np.sqrt(np.mean(tz["theta_z_rad"] ** 2))) * 1e6
    finally:
        stack.close()
    efb = InProcessStack("efb", rate_hz=RATE_HZ, seed=102)
    try:
        await efb.start()
        res = await S.efb_null(efb, efb_s)
        out["efb_null_rms_nm"] = res["null_rms_m"] * 1e9
        say(f"  EFB null {out['efb_null_rms_nm']:.4f} nm over {efb_s:g} s")
    finally:
        efb.close()
    return out


async def _sim_counters(stack_cls: type[Stack], run_dir: str, seconds: float,
                        clock: str) -> tuple[float, dict[str, Any]]:
    """(steps/s, the simulator's stats) of a stack in force mode, from the simulator's own
    counters (no other subscriber on the bus)."""
    async with stack_cls("nist4", clock=clock, rate_hz=RATE_HZ, run_dir=Path(run_dir),
                         progress=lambda s: None) as stack:
        assert stack.broker_url is not None
        async with BusClient(stack.broker_url, stack.instrument) as bus:

            async def stats(**args: Any) -> dict[str, Any]:
                reply = await bus.request("sim", "stats", args, timeout_s=10.0)
                if not reply.ok:
                    raise RuntimeError(f"sim refused stats: {reply.error}")
                return reply.result

            reply = await bus.request("servo", "mode", {"mode": "force"}, timeout_s=10.0)
            if not reply.ok:
                raise RuntimeError(f"servo refused mode force: {reply.error}")
            await asyncio.sleep(1.0)
            f0 = (await stats(reset=True))["counters"]["frames_out"]
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            end = await stats()
            rate = (end["counters"]["frames_out"] - f0) / (time.monotonic() - t0)
    return rate, end


async def _chain(tmp: str, seconds: float, clock: str = "lockstep") -> dict[str, float]:
    """Steps/s and sensor-to-command latency of the simulator + daq + servo + current_source."""
    rate, end = await _sim_counters(ChainStack, f"{tmp}/chain-{clock}", seconds, clock)
    if clock == "realtime":
        return {"hil_chain_realtime_latency_p50_ms": float(end["latency_p50_ms"]),
                "hil_chain_realtime_latency_p99_ms": float(end["latency_p99_ms"])}
    return {"hil_chain_steps_per_s": rate, "hil_chain_latency_p50_ms": float(end["latency_p50_ms"]),
            "hil_chain_latency_p99_ms": float(end["latency_p99_ms"])}


async def _over_the_bus(say: Callable[[str], None], seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kibble-loopbench-") as tmp:
        out.update(await _chain(tmp, seconds))
        say(f"  lockstep chain (sim, daq, servo, current_source) {out['hil_chain_steps_per_s']:.0f} "
            f"steps/s, latency p50 {out['hil_chain_latency_p50_ms']:.2f} ms")
        out.update(await _chain(tmp, seconds, "realtime"))
        say(f"  realtime chain latency p99 {out['hil_chain_realtime_latency_p99_ms']:.2f} ms")
        async with Stack("nist4", clock="lockstep", rate_hz=RATE_HZ, run_dir=Path(tmp) / "lockstep",
                         progress=lambda s: None) as stack:
            assert stack.broker_url is not None
            async with BusLoop(stack.broker_url, stack.instrument, RATE_HZ) as loop:
                await loop.wait_frames()
                await loop.command("servo", "mode", mode="force")
                await loop.run_seconds(1.0, record=False)
                f0, t0 = loop.frame, time.monotonic()
                await loop.run_seconds(seconds, record=False)
                out["hil_fullstack_steps_per_s"] = (loop.frame - f0) / (time.monotonic() - t0)
        say(f"  lockstep full stack, paced by sim/truth {out['hil_fullstack_steps_per_s']:.0f} steps/s")
        # in real time sim/truth goes out at 100 Hz: the simulator's own counters tell
        rate, stats = await _sim_counters(Stack, f"{tmp}/realtime", seconds, "realtime")
        out["hil_latency_p50_ms"] = float(stats["latency_p50_ms"])
        out["hil_latency_p99_ms"] = float(stats["latency_p99_ms"])
        out["hil_realtime_frames_per_s"] = rate
        say(f"  realtime full stack latency p99 {out['hil_latency_p99_ms']:.2f} ms, {rate:.0f} frames/s")
    return out


def run_hil(bus_s: float = 20.0, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Only the over-the-bus figures (``kibble bench --only hil``, about a minute)."""

    async def main() -> dict[str, float]:
        figures = await _over_the_bus(say, bus_s)
        figures["loop_rate_hz"] = RATE_HZ
        return figures

    return asyncio.run(main())


def run(null_s: float = 600.0, efb_s: float = 300.0, bus_s: float = 20.0,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every loop figure (flat dict). Long: ~10 minutes at the default durations."""

    async def main() -> dict[str, float]:
        figures = await _in_process(say, null_s, efb_s)
        figures.update(await _over_the_bus(say, bus_s))
        figures["loop_rate_hz"] = RATE_HZ
        return figures

    return asyncio.run(main())
