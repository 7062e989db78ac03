"""Uncertainties: the papers' type B budgets, small-sample widening, type A and type B combined.

Standard uncertainties (k = 1) throughout, after the GUM; a type A uncertainty comes from the
scatter of the data, each pipeline states how (:mod:`~kibble.services.analysis.nist4`,
:mod:`~kibble.services.analysis.efb`); the type B lines are the published budgets (seed 001
Table III, seed 000 Table 1), relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

__all__ = ["NIST4_TABLE_III_BUDGET", "EFB_TABLE_1_BUDGET_1MG", "BUDGETS", "budget_named",
           "UncertaintyResult", "combine_uncertainty", "std_of_mean", "small_sample_factor"]

NIST4_TABLE_III_BUDGET: dict[str, float] = {
    "magnetic_field": 15.4e-9,
    "electrical": 10.9e-9,
    "alignment": 6.5e-9,
    "mass_metrology": 6.3e-9,
    "mathematical": 5.0e-9,
    "balance_mechanics": 5.0e-9,
    "local_acceleration_g": 4.4e-9,
    "velocity": 1.7e-9,
}
"""Type B relative standard uncertainties (k = 1) of seed 001 Table III (the "statistical"
line, 24.9e-9, is type A and comes from the scatter)."""

EFB_TABLE_1_BUDGET_1MG: dict[str, float] = {
    "transfer_of_length": 1e-7,
    "transfer_of_voltage": 4.0e-6,
    "transfer_of_capacitance": 1.2e-7,
    "alignment_of_capacitor_cylinders": 1.2e-7,
    "corner_loading": 6.0e-7,
    "stray_capacitance": 8.2e-7,
    "hysteresis": 1.4e-6,
    "alignment_of_balance_travel": 7.3e-7,
    "temperature_dependence_of_dcdz": 4.4e-6,
}
"""Type B relative standard uncertainties (k = 1) of seed 000 Table 1, 1 mg artifact (type A
"weighing", 3.8e-6, comes from the scatter; combined 7.3e-6)."""

BUDGETS: dict[str, tuple[str, dict[str, float]]] = {
    "table3": ("nist4", NIST4_TABLE_III_BUDGET),
    "table1": ("efb", EFB_TABLE_1_BUDGET_1MG),
}
"""The budgets by the name the command line gives them: name -> (instrument, budget)."""


def budget_named(name: str | None, instrument: str) -> dict[str, float] | None:
    """The type B budget called ``name`` (:data:`BUDGETS`) for ``instrument`` (``nist4`` or
    ``efb``); None for no name or ``"none"`` (type A only). ``ValueError`` for an unknown name
    or another instrument's budget."""
    if name is None or name == "none":
        return None
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}: table3 (NIST-4, seed 001 Table III), "
                         "table1 (EFB 1 mg, seed 000 Table 1) or none")
    owner, budget = BUDGETS[name]
    if owner != instrument:
        raise ValueError(f"budget {name} is the {owner} budget, not one for the {instrument}")
    return budget


def std_of_mean(values) -> float:
    """The standard deviation of the mean of ``values`` (shape (n,)): s / sqrt(n) with the
    sample standard deviation s (n - 1 degrees of freedom); nan for fewer than two values."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return float("nan")
    return float(np.std(v, ddof=1) / math.sqrt(v.size))


def small_sample_factor(dof: int) -> float:
    """sqrt(nu / (nu - 2)): the factor from a standard deviation estimated with ``dof`` = nu
    degrees of freedom to the standard uncertainty of the quantity, the standard deviation of
    the scaled and shifted Student t it is known by (JCGM 101:2008, 6.4.9.4). 1.29 for 5
    degrees of freedom, 1.08 for 13, 1.01 for 100. Needs nu > 2 (with fewer the t has no
    finite variance): ValueError otherwise."""
    if dof <= 2:
        raise ValueError(f"a standard uncertainty needs more than 2 degrees of freedom, got {dof}")
    return math.sqrt(dof / (dof - 2.0))


@dataclass
class UncertaintyResult:
    """A result with type A, type B and combined standard uncertainties (k = 1).

    value the mean of the determinations; u_a (type A, from the scatter), u_b (type B, from
    the budget), u_c = sqrt(u_a^2 + u_b^2), all in the unit of the value; u_a_rel, u_b_rel,
    u_c_rel relative to |value|; budget: name -> relative standard uncertainty (the type B
    lines); n the number of determinations; values the determinations, shape (n,).
    """

    value: float
    u_a: float
    u_b: float
    u_c: float
    u_a_rel: float
    u_b_rel: float
    u_c_rel: float
    budget: dict[str, float]
    n: int
    values: np.ndarray = field(repr=False)

    def table(self) -> str:
        """Budget table (relative, 1e-9), like seed 001 Table III / seed 000 Table 1."""
        rows = [f"{'statistical (type A)':<36s}{self.u_a_rel * 1e9:12.2f}"]
        rows += [f"{k:<36s}{v * 1e9:12.2f}" for k, v in sorted(self.budget.items(), key=lambda kv: -kv[1])]
        rows.append(f"{'total relative uncertainty':<36s}{self.u_c_rel * 1e9:12.2f}")
        return "source                              rel. u (1e-9)\n" + "\n".join(rows)


def combine_uncertainty(values, u_a: float,
                        budget: Mapping[str, float] | None = None) -> UncertaintyResult:
    """The mean of the determinations ``values`` (shape (n,), e.g. one h per triplet, one mass
    per trial) with the type A uncertainty ``u_a`` (in their unit; the caller's estimate) and
    the type B lines of ``budget`` (name -> relative standard uncertainty, k = 1; e.g.
    :data:`NIST4_TABLE_III_BUDGET`) combined in quadrature (GUM; seed 001 Table III, seed 000
    Table 1)."""
    v = np.atleast_1d(np.asarray(values, dtype=float))
    val = float(v.mean())
    ua = float(u_a)
    b = {str(k): float(x) for k, x in (budget or {}).items()}
    ub_rel = math.sqrt(sum(x * x for x in b.values()))
    ub = abs(val) * ub_rel
    uc = math.hypot(ua, ub)
    av = abs(val) if val != 0 else float("nan")
    return UncertaintyResult(val, ua, ub, uc, ua / av, ub_rel, uc / av, b, v.size, v)
