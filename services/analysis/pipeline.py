"""The documents of a run in, its result out: the one entry point of the analysis.

The plan named in the start document picks the analysis:

- ``nist4_run`` (velocity sets bracketing force sets): h and the mass
  (:func:`~kibble.services.analysis.nist4.analyze_nist4`), with the servo's ``test_mass_kg``
  and ``g_m_per_s2``;
- ``efb_weighing`` (one or more runs of it): the artifact's mass with the servo's ``kappa_f_per_m``
  and ``g_m_per_s2`` (:func:`~kibble.services.analysis.efb.analyze_efb`);
- ``efb_run`` (gradient determinations bracketing weighings): the artifact's mass with the
  measured dC/dz and the servo's ``g_m_per_s2``.

``kibble analyze`` takes the servo's parameters from the recording (as the servo published
them when the run started), the offline campaign gives the plant's mass and g.
"""

from __future__ import annotations

from typing import Any, Mapping

from kibble.services.analysis.documents import RunDocuments
from kibble.services.analysis.efb import EfbAnalysis, analyze_efb
from kibble.services.analysis.nist4 import Nist4Analysis, analyze_nist4
from kibble.services.analysis.uncertainty import budget_named

__all__ = ["PLANS", "analyze_run"]

PLANS: dict[str, str] = {"nist4_run": "nist4", "efb_weighing": "efb", "efb_run": "efb"}
"""The plans a run can be analysed from: plan -> instrument."""


def _plan_and_instrument(documents: RunDocuments) -> tuple[str, str]:
    """(plan, instrument) of the first start document; ``ValueError`` without one, or for a
    plan that is not analysed (:data:`PLANS`)."""
    if not documents.plans:
        raise ValueError("no run documents (was the sequencer running?)")
    plan = documents.plans[0]
    if plan not in PLANS:
        raise ValueError(f"no analysis for plan {plan!r} ({', '.join(PLANS)})")
    return plan, PLANS[plan]


def _servo(servo_params: Mapping[str, Any], name: str, plan: str) -> float:
    try:
        return float(servo_params[name])
    except KeyError:
        raise ValueError(f"a {plan} is analysed with the servo's {name}, which is not known (a "
                         "recording has it when the recorder was started after the daemons)") from None


def analyze_run(documents: RunDocuments, servo_params: Mapping[str, Any], *,
                budget: str | None = None, **options: Any) -> Nist4Analysis | EfbAnalysis:
    """The result of the run in ``documents``: h and the mass (NIST-4) or the mass (EFB).

    ``servo_params``: the servo's parameters the run is analysed with, by name (``g_m_per_s2``;
    ``test_mass_kg`` for a ``nist4_run``, ``kappa_f_per_m`` for ``efb_weighing``). ``budget``: the
    name of a type B budget (``table3``, ``table1``, None; :func:`~kibble.services.analysis.
    uncertainty.budget_named`). ``options``: keyword arguments of the instrument's analysis
    (:func:`~kibble.services.analysis.nist4.analyze_nist4`: ``order``, ``resistance_ohm``,
    ``temp_coeff_per_k``, ``velocity_regression``; :func:`~kibble.services.analysis.efb.
    analyze_efb`: ``order``). ``ValueError`` with the reason for a plan that did not succeed,
    one without an analysis, or a value the analysis needs and does not have.
    """
    plan, instrument = _plan_and_instrument(documents)
    failed = [s for s in documents.stops if s["exit_status"] != "success"]
    if failed:
        raise ValueError(f"the plan ended {failed[0]['exit_status']}: {failed[0]['reason']}")
    table = budget_named(budget, instrument)
    g_m_per_s2 = _servo(servo_params, "g_m_per_s2", plan)
    if plan == "nist4_run":
        return analyze_nist4(documents.events("sweep"), documents.events("weighing"),
                             mass_kg=_servo(servo_params, "test_mass_kg", plan), g_m_per_s2=g_m_per_s2,
                             budget=table, **options)
    kappa = ({"gradients": documents.events("gradient")} if plan == "efb_run"
             else {"kappa_f_per_m": _servo(servo_params, "kappa_f_per_m", plan)})
    return analyze_efb(documents.events("weighing"), g_m_per_s2=g_m_per_s2, budget=table, **kappa, **options)
