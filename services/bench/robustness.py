"""Robustness of the default tuning over NIST-4 plants nobody tuned on (issue 13 point 6).

:func:`draw_plants` draws plant parameter overrides, seeded: every parameter of :data:`BANDS`
inside its tolerance band (uniform; the noise amplitudes log-uniform), each element of a list
parameter on its own. :func:`run_plant` runs one of them closed loop in process
(:class:`~kibble.services.harness.inprocess.InProcessStack`, 1 kHz, every daemon with its default
parameters, so the servo keeps its nominal ``bl_t_m`` whatever the plant's Bl): a short null,
then the auxiliary mass off and the 1 kg on and off (:func:`~kibble.services.harness.scenarios.mass_exchanges`,
no erase). :func:`check` states the bounds each plant must meet; :func:`run` is
``kibble bench --only robust`` (the figures' spread over the plants).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kibble.hil_sim.params import load_params
from kibble.services.daemons.servo import Servo
from kibble.services.harness import scenarios as S
from kibble.services.harness.inprocess import InProcessStack
from kibble.services.instruments import instrument
from kibble.services.runtime.actuator import ActuatorService

RATE_HZ = 1000.0


@dataclass(frozen=True)
class Band:
    """``name`` (dotted plant parameter) drawn as its nominal value times a factor between
    ``low`` and ``high``: uniform, or log-uniform with ``log``."""

    name: str
    low: float
    high: float
    why: str
    log: bool = False


NOISE_AMPLITUDES = ("ground.peak_asd", "ground.floor_asd", "interferometer.noise_asd_m",
                    "psd.noise_asd_V", "main_source.noise_asd_A", "cm_source.noise_asd_A",
                    "dvm.noise_asd_V", "monitor.noise_asd_V", "temperature.fluct_std_K",
                    "temperature.sensor_noise_K")
"""Every noise amplitude of the NIST-4 plant (hil_sim/nist4.toml)."""

BANDS: tuple[Band, ...] = (
    Band("coil.bl0_T_m", 0.9, 1.1, "Bl +-10 % (issue 13); the servo keeps bl_t_m = 710.2 T m, so the "
                                    "load feedforward and the loop gain are up to 10 % off as well"),
    Band("wheel.inertia_kg_m2", 1.0, 2.0, "hil_sim/nist4.toml: the nominal is 1/2 M R^2; a spoked wheel "
                                          "lies between 1/2 and 1 M R^2"),
    Band("wheel.knife_stiffness_N_m_per_rad", -1.0, 2.0,
         "through zero: the centre of mass from as far above the knife edge as it is below it "
         "nominally (unstable open loop) to twice as far below"),
    Band("suspension.freq_hz", 0.8, 1.2, "the five pendulum frequencies +-20 % (issue 13), each alone"),
    *(Band(name, 0.5, 3.0, "noise amplitude x0.5 .. x3 (issue 13), each source alone", log=True)
      for name in NOISE_AMPLITUDES),
)

SETTLE_S = 1.0
NULL_S = 2.0
WINDOW_S = 4.0
"""Simulated durations (s): force mode settles, the null is recorded, each exchange is recorded."""

NULL_RMS_BOUND_M = 1e-9
"""Null: z RMS over the whole band (the 0.1 Hz band of docs/architecture.md section 7 needs
records far longer than :data:`NULL_S`; the whole band is the stricter figure)."""
NULL_MEAN_BOUND_M = 1e-9
EXCHANGE_PEAK_BOUND_M = 10e-6
"""Every exchange (auxiliary mass off, 1 kg on, 1 kg off): peak excursion (issue 13)."""
EXCHANGE_SETTLE_BOUND_S = WINDOW_S - 1.0
"""... and back within 1 um, staying there for at least the last second of its window."""


def draw_plants(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` plant override dicts (dotted names), seeded, every :data:`BANDS` parameter drawn."""
    nominal = load_params("nist4")
    rng = np.random.default_rng(seed)
    plants = []
    for _ in range(n):
        overrides: dict[str, Any] = {}
        for band in BANDS:
            value = nominal[band.name]
            values = value if isinstance(value, list) else [value]
            if band.log:
                factors = np.exp(rng.uniform(math.log(band.low), math.log(band.high), len(values)))
            else:
                factors = rng.uniform(band.low, band.high, len(values))
            drawn = [float(v * f) for v, f in zip(values, factors)]
            overrides[band.name] = drawn if isinstance(value, list) else drawn[0]
        plants.append(overrides)
    return plants


async def run_plant(overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    """One plant closed loop with the default tuning: the null, then every exchange."""
    stack = InProcessStack("nist4", rate_hz=RATE_HZ, seed=seed, plant_overrides=overrides)
    try:
        await stack.start()
        null = await S.force_null(stack, NULL_S, settle_s=SETTLE_S)
        z = null["truth"]["z_m"]
        ex = await S.mass_exchanges(stack, cycles=1, window_s=WINDOW_S, erase=False)
        tripped = []
        for name in instrument("nist4").actuators:
            actuator = stack.services[name]
            assert isinstance(actuator, ActuatorService) and actuator.guard is not None  # started
            if actuator.guard.state != "armed":
                tripped.append(name)
        servo = stack.services["servo"]
        assert isinstance(servo, Servo)
        return {"null_rms_m": float(np.sqrt(np.mean(z * z))), "null_mean_m": null["null_mean_m"],
                "exchanges": ex["exchanges"], "peaks_m": ex["peaks_m"], "settle_s": ex["settle_s"],
                "tripped": tripped, "servo_mode": servo.mode}
    finally:
        stack.close()


def check(figures: dict[str, Any]) -> list[str]:
    """The bounds a plant's figures miss (empty: it meets them all)."""
    missed = [f"{name} tripped" for name in figures["tripped"]]
    if figures["servo_mode"] != "force":
        missed.append(f"servo in {figures['servo_mode']} mode")
    if not figures["null_rms_m"] <= NULL_RMS_BOUND_M:
        missed.append(f"null RMS {figures['null_rms_m'] * 1e9:.3g} nm > {NULL_RMS_BOUND_M * 1e9:g} nm")
    if not abs(figures["null_mean_m"]) <= NULL_MEAN_BOUND_M:
        missed.append(f"null mean {figures['null_mean_m'] * 1e9:.3g} nm")
    for name, peak, settle in zip(figures["exchanges"], figures["peaks_m"], figures["settle_s"]):
        if not peak <= EXCHANGE_PEAK_BOUND_M:
            missed.append(f"{name}: peak {peak * 1e6:.3g} um > {EXCHANGE_PEAK_BOUND_M * 1e6:g} um")
        if not settle <= EXCHANGE_SETTLE_BOUND_S:
            missed.append(f"{name}: back within 1 um after {settle:.3g} s > {EXCHANGE_SETTLE_BOUND_S:g} s")
    return missed


async def run_plants(n: int, seed: int) -> list[dict[str, Any]]:
    """Every drawn plant's figures, with its overrides (``plant``) and what it missed."""
    out = []
    for k, overrides in enumerate(draw_plants(n, seed)):
        figures = await run_plant(overrides, seed + k)
        out.append(figures | {"plant": overrides, "missed": check(figures)})
    return out


def spread(results: list[dict[str, Any]]) -> dict[str, float]:
    """Worst and median of each figure over the plants (flat, SI units named)."""
    out: dict[str, float] = {"robust_plants": float(len(results)),
                             "robust_plants_missed": float(sum(bool(r["missed"]) for r in results))}
    series = {"null_rms_nm": [r["null_rms_m"] * 1e9 for r in results],
              "aux_peak_um": [r["peaks_m"][0] * 1e6 for r in results],
              "exchange_1kg_peak_um": [max(r["peaks_m"][1:]) * 1e6 for r in results],
              "settle_s": [max(r["settle_s"]) for r in results]}
    for key, values in series.items():
        out[f"robust_{key}_max"] = float(np.max(values))
        out[f"robust_{key}_median"] = float(np.median(values))
        out[f"robust_{key}_min"] = float(np.min(values))
    return out


def run(n: int = 20, seed: int = 2013, say: Callable[[str], None] = print) -> dict[str, float]:
    """``kibble bench --only robust``: :func:`run_plants` and the figures' :func:`spread`."""
    t0 = time.monotonic()
    results = asyncio.run(run_plants(n, seed))
    bl0 = load_params("nist4")["coil.bl0_T_m"]
    for k, r in enumerate(results):
        say(f"  plant {k}: Bl x{r['plant']['coil.bl0_T_m'] / bl0:.3f}, k "
            f"{r['plant']['wheel.knife_stiffness_N_m_per_rad']:+.3f} N m/rad: null {r['null_rms_m'] * 1e9:.4f} nm, "
            f"peaks {', '.join(f'{p * 1e6:.3f}' for p in r['peaks_m'])} um"
            + (f"; MISSED {'; '.join(r['missed'])}" if r["missed"] else ""))
    figures = spread(results)
    figures["robust_wall_s"] = time.monotonic() - t0
    return figures
