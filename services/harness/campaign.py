"""Offline campaigns: a plan on the in-process closed loop, then the analysis, to h and a mass.

:func:`offline_nist4` runs a NIST-4 run (velocity set, then per force set: force set, velocity
set) on an :class:`~kibble.services.harness.inprocess.InProcessStack` (the real daemons and the
simulated plant, no broker), collects the run documents of the :class:`~kibble.services.plans.engine.
RunEngine` and hands them to the analysis a recording gets from ``kibble analyze``
(:func:`kibble.services.analysis.analyze_run`); :func:`offline_efb` does the same for the EFB
and the 1 mg artifact. :func:`cli_measure_offline` is the synchronous entry point of ``kibble
measure --offline``; :func:`offline_summary` the unit of work of a process pool.

Nothing in the result is taken from the simulator's truth except the mass and g the run is
analysed with (as a real campaign takes them from the mass calibration and the gravimeter;
NIST-4 units: :mod:`kibble.services.analysis.nist4`); the EFB's kappa = dC/dz / 2 is measured
(gradient determinations bracketing the weighings). The truth (h_SI, the true mass, the
plant's kappa) is kept beside the result, for the comparison only.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine, Mapping

from kibble.services import analysis as an
from kibble.services.plans import engine as P
from kibble.hil_sim.params import DEFAULT_NOISE
from kibble.hil_sim.efb import EfbPlant
from kibble.services.analysis.efb import EfbAnalysis
from kibble.services.analysis.nist4 import Nist4Analysis
from kibble.services.daemons.daq import Daq
from kibble.services.harness.inprocess import InProcessStack

__all__ = ["NistResult", "EfbResult", "offline_nist4", "offline_efb", "cli_measure_offline",
           "offline_summary", "NIST4_TEST_VELOCITY", "NIST4_TEST_FORCE", "NIST4_TEST_SERVO",
           "EFB_TEST_GRADIENT"]

NIST4_TEST_VELOCITY: dict[str, Any] = {"sweeps": 10, "travel_m": 0.010}
"""A shortened velocity set (the paper: 30 sweeps over 80 mm)."""
NIST4_TEST_FORCE: dict[str, Any] = {"weighings": 9, "window_s": 5.0, "settle_s": 3.0}
"""A shortened force set (the paper: 17 weighings of 58 s, 170 s erases)."""
NIST4_TEST_SERVO: dict[str, Any] = {"erase_decay_s": 1.5, "erase_n_decay": 3.0, "erase_freq_hz": 1.0}
"""A short erase (4.5 s) for the shortened force set."""
EFB_TEST_GRADIENT: dict[str, Any] = {"settle_s": 2.0, "window_s": 3.0}
"""A shortened gradient determination: the paper's 11 points within 2 mm, 2 sweeps, 3 bridge
readings per point after 2 s of settling (default 10 after 5 s); ~460 s simulated."""


# =============================================================================== results


@dataclass
class NistResult:
    """One offline NIST-4 run: its analysis (h, the mass, their uncertainties) and the run.

    seed, rate_hz (frame rate of the closed loop), mass_true_kg (the plant's test mass, which
    the run is analysed with), sim_s (simulated), wall_s, exit_status (of the plan), analysis.
    """

    seed: int
    rate_hz: float
    mass_true_kg: float
    sim_s: float
    wall_s: float
    exit_status: str
    analysis: an.Nist4Analysis

    @property
    def z_score(self) -> float:
        """(h - h_SI) / u_h: the error in units of the stated uncertainty."""
        return (self.analysis.h_j_s - an.H_J_S) / self.analysis.u_h_j_s

    def summary(self) -> dict[str, Any]:
        """JSON-able: the analysis's figures, the run's and the z score."""
        return {"seed": self.seed, "rate_hz": self.rate_hz, **self.analysis.summary(),
                "mass_true_kg": self.mass_true_kg, "sim_s": self.sim_s, "wall_s": self.wall_s,
                "exit_status": self.exit_status, "z_score": self.z_score}

    def write_plots(self, directory) -> list[str]:
        """The analysis's PNGs (:func:`kibble.services.analysis.write_plots`)."""
        return an.write_plots(self.analysis, directory)


@dataclass
class EfbResult:
    """One offline EFB campaign: its analysis (the mass, dC/dz, their uncertainties) and the run.

    seed, rate_hz, mass_true_kg (the plant's artifact), kappa_true_f_per_m (the plant's kappa at
    z = 0 at the end, for comparison only), sim_s, wall_s, exit_status, analysis.
    """

    seed: int
    rate_hz: float
    mass_true_kg: float
    kappa_true_f_per_m: float
    sim_s: float
    wall_s: float
    exit_status: str
    analysis: an.EfbAnalysis

    @property
    def mass_rel_err(self) -> float:
        return self.analysis.mass_kg / self.mass_true_kg - 1.0

    @property
    def z_score(self) -> float:
        """(m - m_true) / u_m."""
        return (self.analysis.mass_kg - self.mass_true_kg) / self.analysis.u_mass_kg

    def summary(self) -> dict[str, Any]:
        """JSON-able: the analysis's figures, the run's, the z score and the errors of the mass
        and of the measured kappa."""
        return {"seed": self.seed, "rate_hz": self.rate_hz, **self.analysis.summary(),
                "mass_true_kg": self.mass_true_kg, "mass_rel_err": self.mass_rel_err,
                "kappa_true_f_per_m": self.kappa_true_f_per_m, "sim_s": self.sim_s, "wall_s": self.wall_s,
                "exit_status": self.exit_status, "z_score": self.z_score,
                "kappa_rel_err": self.analysis.kappa_f_per_m / self.kappa_true_f_per_m - 1.0}

    def write_plots(self, directory) -> list[str]:
        """The analysis's PNGs, the true mass drawn for reference."""
        return an.write_plots(self.analysis, directory, reference_mass_kg=self.mass_true_kg)


# =============================================================================== campaigns


def _collect(progress: Callable[[str], None] | None) -> tuple[an.RunDocuments, Callable[[str, dict], None]]:
    """The documents an engine emits, and the engine's ``emit`` that collects them (and says
    each start and event to ``progress``)."""
    docs = an.RunDocuments()

    def emit(name: str, doc: dict) -> None:
        docs.append(name, doc)
        if progress is None:
            return
        if name == "event":
            info = ", ".join(f"{k}={v}" for k, v in doc["info"].items())
            t = doc["data"]["sim_time_s"]
            progress(f"  {docs.stream(doc) or '?'} {info} (t = {t[0]:.1f}..{t[-1]:.1f} s)")
        elif name == "start":
            progress(f"  run {doc['plan_name']} {doc['plan_args']}")

    return docs, emit


async def offline_nist4(seed: int, *, rate_hz: float = 200.0, velocity: Mapping[str, Any] | None = None,
                        force: Mapping[str, Any] | None = None, force_sets: int = 1,
                        budget: str | None = None,
                        servo: Mapping[str, Any] | None = None, order: int = 6,
                        plant_overrides: Mapping[str, Any] | None = None,
                        temp_coeff_per_k: float | None = an.TEMP_COEFF_NIST4_PER_K,
                        velocity_regression: str = "flux", noise: str = DEFAULT_NOISE,
                        progress: Callable[[str], None] | None = None) -> NistResult:
    """Run a NIST-4 run offline (in process) and return h with its stated uncertainty.

    The run is the plan ``nist4_run(force_sets, velocity, force)``: velocity sets bracketing
    each force set.

    ``velocity`` / ``force``: arguments of the velocity and force sets (defaults: the papers'
    counts); ``servo``: servo parameters (e.g. :data:`NIST4_TEST_SERVO`, a short erase);
    ``budget``: the name of a type B budget (``table3``: seed 001 Table III); None: type A only
    (the simulator has no type B effects to speak of). ``rate_hz``: frame rate of the closed
    loop; 200 Hz is the lowest where the NIST-4 loops stay well behaved (at 100 Hz the sweeps
    trip the current source's watchdog). ``order``, ``temp_coeff_per_k``,
    ``velocity_regression`` (``"flux"`` or the paper's ``"point"``): of
    :func:`kibble.services.analysis.analyze_nist4`. ``noise``: the plant's noise profile.
    """
    t0 = time.perf_counter()
    stack = InProcessStack("nist4", rate_hz=rate_hz, seed=seed, plant_overrides=plant_overrides, noise=noise,
                           params={"servo": dict(servo or {})})
    docs, emit = _collect(progress)
    try:
        await stack.start()
        stop = await P.RunEngine(stack, emit=emit).run(
            "nist4_run", {"force_sets": force_sets, "velocity": dict(velocity or {}),
                          "force": dict(force or {})})
        p = stack.plant.params
        mass, g = float(p["main_side.test_mass_kg"]), float(p["sim.g_m_per_s2"])
        daq = stack.services["daq"]
        assert isinstance(daq, Daq)  # the NIST-4 stack's "daq"
        resistance = float(daq.settings.std_resistor_ohm)
    finally:
        stack.close()
    analysis = an.analyze_run(docs, {"test_mass_kg": mass, "g_m_per_s2": g}, budget=budget,
                              resistance_ohm=resistance, order=order,
                              temp_coeff_per_k=temp_coeff_per_k,
                              velocity_regression=velocity_regression)
    assert isinstance(analysis, Nist4Analysis)  # the documents are a NIST-4 run's
    return NistResult(seed, rate_hz, mass, float(stop["sim_s"]), time.perf_counter() - t0,
                      stop["exit_status"], analysis)


async def offline_efb(seed: int, *, rate_hz: float = 200.0, runs: int = 6, settle_s: float = 10.0,
                      window_s: float = 20.0, gradient: Mapping[str, Any] | None = None,
                      gradient_every: int = 3, budget: str | None = None,
                      plant_overrides: Mapping[str, Any] | None = None, noise: str = DEFAULT_NOISE,
                      progress: Callable[[str], None] | None = None) -> EfbResult:
    """Weigh the 1 mg artifact offline with the plan ``efb_run``: capacitance-gradient
    determinations (``efb_gradient`` with the arguments ``gradient``; default the paper's 11
    points within 2 mm) bracketing ``runs`` weighing runs (``efb_weighing``: unloaded, loaded,
    unloaded, positive then negative polarity, ``settle_s``, ``window_s``), one after every
    ``gradient_every`` runs and after the last; analysed with eq. (17) and the measured dC/dz
    (:func:`kibble.services.analysis.analyze_efb`); the mass with its stated uncertainty (type
    A from the trials' scatter and the gradient determinations, type B from the budget named
    ``budget``, ``table1``: seed 000 Table 1; None: type A only). The plant's kappa at z = 0
    (at the end) is kept beside the measured one, for comparison only. ``noise``: the plant's
    noise profile.
    """
    t0 = time.perf_counter()
    stack = InProcessStack("efb", rate_hz=rate_hz, seed=seed, plant_overrides=plant_overrides, noise=noise)
    docs, emit = _collect(progress)
    try:
        await stack.start()
        stop = await P.RunEngine(stack, emit=emit).run(
            "efb_run", {"runs": runs, "gradient_every": gradient_every,
                        "gradient": dict(gradient or {}),
                        "weighing": {"settle_s": settle_s, "window_s": window_s}})
        assert isinstance(stack.plant, EfbPlant)  # InProcessStack("efb") built one
        kappa_true = float(stack.plant.kappa(0.0))
        p = stack.plant.params
        mass, g = float(p["masses.small_kg"]), float(p["sim.g_m_per_s2"])
    finally:
        stack.close()
    analysis = an.analyze_run(docs, {"g_m_per_s2": g}, budget=budget)
    assert isinstance(analysis, EfbAnalysis)  # the documents are an EFB run's
    return EfbResult(seed, rate_hz, mass, kappa_true, float(stop["sim_s"]),
                     time.perf_counter() - t0, stop["exit_status"], analysis)


def offline_summary(kind: str, seed: int, kwargs: Mapping[str, Any] | None = None,
                    progress_prefix: str | None = None) -> dict[str, Any]:
    """Synchronous :func:`offline_nist4` (``kind='nist4'``) or :func:`offline_efb` (``'efb'``)
    returning the JSON-able summary: a picklable unit of work for a process pool (the seeds of
    a campaign in parallel). With ``progress_prefix`` the progress lines go to stderr, each
    after the prefix."""
    fns: dict[str, Callable[..., Coroutine[Any, Any, NistResult | EfbResult]]] = {
        "nist4": offline_nist4, "efb": offline_efb}
    fn = fns[kind]
    progress = (None if progress_prefix is None
                else lambda line: print(f"{progress_prefix}{line}", file=sys.stderr, flush=True))
    return asyncio.run(fn(seed, progress=progress, **dict(kwargs or {}))).summary()


# =============================================================================== CLI


def _coerce(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def cli_measure_offline(plan: str, params: dict, seed: int, json_out: str | None,
                        plots_dir: str | None, noise: str = DEFAULT_NOISE) -> int:
    """``kibble measure --offline``: run ``nist4`` or ``efb`` in process, print progress and a
    summary (value, u, relative u, the deviation from h_SI or the true mass in units of u),
    optionally write the JSON summary and the plots. Exit status 0, or 1 if the deviation
    exceeds 3 u, 2 for a usage error.

    ``params`` (strings are parsed as JSON): NIST-4 ``rate_hz``, ``force_sets``, ``order``,
    ``velocity_regression`` (``flux`` or ``point``),
    ``velocity.<arg>``, ``force.<arg>``, ``servo.<param>``, ``budget`` (``table3`` or none);
    ``test=true`` starts from the shortened test plans. EFB (an ``efb_run``) ``rate_hz``,
    ``runs``, ``settle_s``, ``window_s`` (of the weighings), ``gradient_every``,
    ``gradient.<arg>`` (of ``efb_gradient``), ``budget`` (``table1`` or none); ``test=true``
    starts from the shortened gradient determination :data:`EFB_TEST_GRADIENT`.
    """
    params = {k: _coerce(v) for k, v in (params or {}).items()}
    say = lambda s: print(s, flush=True)  # noqa: E731
    res: NistResult | EfbResult
    try:
        if plan in ("nist4", "nist4_run"):
            kw: dict[str, Any] = {"velocity": {}, "force": {}, "servo": {}}
            if params.pop("test", False):
                kw = {"velocity": dict(NIST4_TEST_VELOCITY), "force": dict(NIST4_TEST_FORCE),
                      "servo": dict(NIST4_TEST_SERVO)}
            for k, v in params.items():
                head, _, tail = k.partition(".")
                if tail and head in ("velocity", "force", "servo"):
                    kw[head][tail] = v
                elif k == "budget":
                    kw["budget"] = str(v).lower()
                    an.budget_named(kw["budget"], "nist4")
                elif k in ("rate_hz", "force_sets", "order", "velocity_regression"):
                    kw[k] = v
                else:
                    raise ValueError(f"unknown parameter {k!r} for plan nist4")
            say(f"offline NIST-4 run, seed {seed}")
            res = asyncio.run(offline_nist4(seed, progress=say, noise=noise, **kw))
            r = res.analysis
            say(f"h = {r.h_j_s:.12e} J s, u = {r.u_h_j_s:.2e} J s (rel. {r.u_h_rel:.2e}; "
                f"type A {r.u_a_h_j_s / r.h_j_s:.2e}, type B {r.u_b_h_j_s / r.h_j_s:.2e})")
            say(f"h / h_SI - 1 = {r.h_rel_err:+.2e} = {res.z_score:+.2f} u; mass {r.mass_kg:.12f} kg "
                f"(true {res.mass_true_kg:g} kg); Bl_V {r.bl_v_t_m:.6f} T m, Bl_F {r.bl_f_t_m:.6f} T m; "
                f"{r.n_sweeps} sweeps, {r.n_weighings} weighings, {r.n_triplets} triplet(s); "
                f"{res.sim_s:.0f} s simulated in {res.wall_s:.1f} s")
        elif plan in ("efb", "efb_weighing", "efb_run"):
            kw = {"gradient": dict(EFB_TEST_GRADIENT) if params.pop("test", False) else {}}
            for k, v in params.items():
                head, _, tail = k.partition(".")
                if tail and head == "gradient":
                    kw["gradient"][tail] = v
                elif k == "budget":
                    kw["budget"] = str(v).lower()
                    an.budget_named(kw["budget"], "efb")
                elif k in ("rate_hz", "runs", "settle_s", "window_s", "gradient_every"):
                    kw[k] = v
                else:
                    raise ValueError(f"unknown parameter {k!r} for plan efb")
            say(f"offline EFB run (gradient determinations bracketing weighings of the 1 mg artifact), seed {seed}")
            res = asyncio.run(offline_efb(seed, progress=say, noise=noise, **kw))
            e = res.analysis
            say("dC/dz = " + ", ".join(f"{d * 1e9:.7f} nF/m (u rel. {u / d:.1e})"
                                       for d, u in zip(e.dcdz_f_per_m, e.u_dcdz_f_per_m))
                + f"; kappa / kappa_plant - 1 = {e.kappa_f_per_m / res.kappa_true_f_per_m - 1.0:+.2e}")
            say(f"m = {e.mass_kg * 1e6:.9f} mg, u = {e.u_mass_kg * 1e12:.3f} ng (rel. {e.u_mass_rel:.2e}; "
                f"type A of it from dC/dz {e.u_a_dcdz_kg / e.mass_kg:.1e})")
            say(f"m / m_true - 1 = {res.mass_rel_err:+.2e} = {res.z_score:+.2f} u; {e.n_trials} trials; "
                f"{res.sim_s:.0f} s simulated in {res.wall_s:.1f} s")
        else:
            raise ValueError(f"unknown offline plan {plan!r}; one of nist4, efb")
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    if res.analysis.uncertainty.budget:
        say(res.analysis.uncertainty.table())
    if json_out:
        Path(json_out).write_text(json.dumps(res.summary(), indent=2, default=float))
        say(f"summary written to {json_out}")
    if plots_dir:
        for path in res.write_plots(plots_dir):
            say(f"plot: {path}")
    return 0 if abs(res.z_score) <= 3.0 else 1
