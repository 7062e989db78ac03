"""``kibble demo`` (``make run``): the whole stack on the simulator, over MQTT, step by step.

1. ``kibble up --sim nist4 --clock lockstep``: broker, simulator, the five daemons, armed;
2. force mode at the null; the auxiliary mass lifted off, the 1 kg mass on and off twice, an
   erase after every exchange; one velocity sweep each way with the damping opened during the
   sweep; back to the null;
3. ``kibble up --sim efb``: the EFB holding its null with the 1 mg artifact loaded;
4. a summary table of the measured figures against their targets.

Every figure is measured from the simulator's ground truth over the bus, with the loop rate
given (``--rate``, 200 Hz by default so the run fits in a few minutes; docs/architecture.md section 6).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kibble.services.harness import scenarios as S
from kibble.services.plans.mqtt_loop import BusLoop
from kibble.services.harness.up import Stack

DEMO_SERVO = {"erase_decay_s": 2.0, "erase_n_decay": 3.0, "erase_freq_hz": 0.5}
"""A short erase for the demonstration: 6 s (the paper's decays over 20 s and lasts 160 s)."""


@dataclass(frozen=True)
class DemoPlan:
    """Simulated durations of the demonstration (s, m). The defaults keep ``make run`` under
    three minutes at 200 Hz on a 2-core machine; the full-length figures (80 mm sweeps, 60 s
    null records, 1 kHz) are measured in process by the tests and ``kibble bench --only loop``."""

    null_settle_s: float = 5.0
    null_record_s: float = 20.0
    exchange_cycles: int = 2
    exchange_window_s: float = 6.0
    erase_tail_s: float = 2.0
    sweep_travel_m: float = 0.02
    sweep_settle_s: float = 3.0
    theta_z_record_s: float = 5.0
    efb_settle_s: float = 8.0
    efb_record_s: float = 20.0


def _row(name: str, value: float, unit: str, target: str, ok: bool | None) -> tuple[str, ...]:
    verdict = "" if ok is None else ("ok" if ok else "MISSED")
    return name, f"{value:.4g}", unit, target, verdict


async def run_demo(rate_hz: float = 200.0, run_dir: Path = Path(".state") / "demo",
                   plan: DemoPlan = DemoPlan(),
                   say: Callable[[str], None] = print, noise: str = "published") -> list[tuple[str, ...]]:
    """Run the demonstration on the simulator's noise profile ``noise``; returns the summary
    rows (name, value, unit, target, verdict)."""
    rows: list[tuple[str, ...]] = []
    t_start = time.monotonic()
    next_line = [0.0]

    def progress(t_sim: float) -> None:
        if t_sim >= next_line[0]:
            next_line[0] = t_sim + 10.0
            say(f"    ... {t_sim:6.0f} s simulated, {time.monotonic() - t_start:5.0f} s wall")

    say(f"== NIST-4 on the simulator, lockstep at {rate_hz:g} Hz, noise {noise}")
    async with Stack("nist4", clock="lockstep", rate_hz=rate_hz, run_dir=run_dir / "nist4", noise=noise,
                     progress=lambda s: say(f"  {s}")) as stack:
        assert stack.broker_url is not None
        async with BusLoop(stack.broker_url, stack.instrument, rate_hz, progress=progress) as loop:
            await loop.wait_frames()
            for name, value in DEMO_SERVO.items():
                await loop.command("servo", "param.set", name=name, value=value)
            say(f"  force mode: holding the null for {plan.null_record_s:g} s")
            null = await S.force_null(loop, plan.null_record_s, settle_s=plan.null_settle_s)
            rows.append(_row("null_rms_nm (0.1 Hz)", null["null_rms_m"] * 1e9, "nm", "<= 1",
                             null["null_rms_m"] <= 1e-9))
            say(f"    null RMS {null['null_rms_m'] * 1e9:.3f} nm in 0.1 Hz bandwidth")
            say(f"  mass exchanges: auxiliary mass off, 1 kg on/off {plan.exchange_cycles} times, "
                "erase after each")
            ex = await S.mass_exchanges(loop, cycles=plan.exchange_cycles,
                                        window_s=plan.exchange_window_s,
                                        erase_tail_s=plan.erase_tail_s)
            erase_ends = iter(ex["erase_end_m"])
            for name, peak, settle in zip(ex["exchanges"], ex["peaks_m"], ex["settle_s"]):
                erased = "" if name == "aux off" else f", after the erase {next(erase_ends) * 1e9:.2f} nm"
                say(f"    {name}: peak {peak * 1e6:.2f} um, back within 1 um in {settle:.2f} s{erased}")
            rows.append(_row("mass_exchange_peak_um", max(ex["peaks_m"]) * 1e6, "um", "<= 10",
                             max(ex["peaks_m"]) <= 10e-6))
            rows.append(_row("mass_exchange_settle_s", max(ex["settle_s"]), "s", "<= 10",
                             max(ex["settle_s"]) <= 10.0))
            rows.append(_row("after_erase_max_nm", max(ex["erase_end_m"]) * 1e9, "nm", "report", None))
            say(f"  velocity mode: one {plan.sweep_travel_m * 1e3:g} mm sweep each way, damping open")
            sw = await S.velocity_sweeps(loop, travel_m=plan.sweep_travel_m, settle_s=plan.sweep_settle_s)
            err = max(sw["velocity_err_rel_rms"])
            rows.append(_row("velocity_err_rel_rms", err, "", "<= 1e-4", err <= 1e-4))
            say(f"    velocity error RMS {', '.join(f'{e:.2e}' for e in sw['velocity_err_rel_rms'])} "
                "of 1 mm/s (down, up)")
            tz = await loop.run_seconds(plan.theta_z_record_s)
            rows.append(_row("theta_z_rms_urad", float((tz["theta_z_rad"] ** 2).mean() ** 0.5) * 1e6,
                             "urad", "report", None))
            stats = await loop.sim("stats")
            rows.append(_row("nist4_steps_per_s", stats["steps_per_s"], "1/s", "report", None))
    say(f"== EFB on the simulator, lockstep at {rate_hz:g} Hz, noise {noise}")
    async with Stack("efb", clock="lockstep", rate_hz=rate_hz, run_dir=run_dir / "efb", noise=noise,
                     progress=lambda s: say(f"  {s}")) as stack:
        assert stack.broker_url is not None
        next_line[0] = 0.0
        async with BusLoop(stack.broker_url, stack.instrument, rate_hz, progress=progress) as loop:
            await loop.wait_frames()
            say(f"  force mode, 1 mg artifact loaded, holding the null for {plan.efb_record_s:g} s")
            efb = await S.efb_null(loop, plan.efb_record_s, settle_s=plan.efb_settle_s)
            rows.append(_row("efb_null_rms_nm (0.1 Hz)", efb["null_rms_m"] * 1e9, "nm", "<= 0.5",
                             efb["null_rms_m"] <= 0.5e-9))
            rows.append(_row("efb_voltage_v", efb["v_out_mean_v"], "V", "report", None))
    rows.append(_row("demo_wall_s", time.monotonic() - t_start, "s", "< 180", None))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    """The summary rows as an aligned text table."""
    head = ("figure", "value", "unit", "target", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])
