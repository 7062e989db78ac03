"""A key comparison of realizations of the kilogram (seed 002, CCM.M-K8.2019, sections 5-6).

Each participant realizes the kilogram and attributes masses m_ij^NMI to one or more travelling
standards j; the pilot (the BIPM) weighs every standard against its working standards,
m_ij^BIPM. The comparison works with the differences Delta m_ij = m_ij^NMI - m_ij^BIPM (mg, a
deviation from the as-maintained unit) and their covariance:

- variance of one difference: u_NMI^2 + u_stability^2 + u_BIPM^2 + u_cleaning^2 (Table 4, right);
- covariance of two standards of one participant: r_jk u_NMI,j u_NMI,k (the realization's
  correlation, a coefficient r_i or a full matrix as the PTB's Table 5); the BIPM's weighing,
  stability and cleaning terms are uncorrelated between standards (section 6, after Table 5),
  unless a participant gives ``bipm_covariance_mg2``.

Per participant the generalised least-squares mean of its differences (eqs. 1-2 for two
standards: :func:`correlated_mean`); over the participants in the reference value the KCRV as
the inverse-variance weighted mean (eqs. 3-4) with each one's weight; the degrees of
equivalence Delta m'_i = Delta m_i - KCRV with u^2 = u_i^2 - u_KCRV^2 for a participant in the
KCRV (eqs. 5-6; its correlation with the KCRV it contributed to) and u_i^2 + u_KCRV^2 for one
outside it; the as-maintained unit's deviation -KCRV with u^2 = u_ref^2 + u_KCRV^2 (eqs. 7-8);
the chi-squared test (eq. 9) against the 95 % cut-off of chi^2(nu) and against nu + sqrt(2 nu),
the Birge ratio; and, for a set that fails, the largest consistent subset (Cox 2007: the
largest subset passing the 95 % test, the one with the smallest chi-squared among equals).

Pure numpy (and scipy for the chi-squared quantile): no bus, no simulator.

A Kibble balance's result as a participant (:func:`participant_from_result`). Since 2019 h is
fixed, so the mass a Kibble balance measures is m = m_assumed Bl_V / Bl_F
(:mod:`~kibble.services.analysis.nist4`, seed 001 eq. 22): its ``mass_kg`` is the realized
mass of its standard with h fixed, and Delta m = (mass_kg - m_ref) with m_ref the mass the
reference (the BIPM) attributes to that standard. Before 2019 the same numbers gave h / h_SI - 1
= -(Delta m / m) to first order. With the simulator's true mass as m_ref (an offline run) the
difference is against the exact SI kilogram, not against the pilot's as-maintained unit the
other participants' differences are taken against (the two differ by the deviation of eqs. 7-8).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Standard", "Participant", "ParticipantMean", "Comparison", "ComparisonResult",
           "correlated_mean", "participant_mean", "kcrv", "compare", "largest_consistent_subset",
           "participant_from_result", "chi2_cutoff"]

KG_PER_MG = 1e-6


def correlated_mean(x, cov) -> tuple[float, float]:
    """The generalised least-squares mean of correlated estimates of one quantity and its
    standard uncertainty: (1' C^-1 x) / (1' C^-1 1), u^2 = 1 / (1' C^-1 1). For two estimates
    this is seed 002 eqs. 1-2. ``x`` shape (n,), ``cov`` shape (n, n), any one unit (and its
    square); ``ValueError`` for a covariance that is not positive definite."""
    x = np.asarray(x, dtype=float)
    cov = np.atleast_2d(np.asarray(cov, dtype=float))
    if cov.shape != (x.size, x.size):
        raise ValueError(f"covariance shape {cov.shape} does not match {x.size} values")
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError("the covariance matrix is not positive definite") from None
    ones = np.ones(x.size)
    w = np.linalg.solve(chol.T, np.linalg.solve(chol, ones))
    s = float(ones @ w)
    return float(w @ x) / s, math.sqrt(1.0 / s)


def chi2_cutoff(nu: int, p: float = 0.95) -> float:
    """The p quantile of the chi-squared distribution with nu degrees of freedom."""
    from scipy.stats import chi2

    return float(chi2.ppf(p, nu))


@dataclass(frozen=True)
class Standard:
    """One travelling standard of a participant (mg, deviations from 1 kg; k = 1).

    nmi_mg, u_nmi_mg: the participant's realization of its mass; bipm_mg, u_bipm_mg: the
    pilot's weighing; u_stability_mg: its mass (in)stability during the comparison (seed 002:
    the larger of the observed change and its uncertainty, Table 6); u_cleaning_mg: any further
    uncorrelated term (the PTB sphere's cleaning reproducibility)."""

    id: str
    nmi_mg: float
    u_nmi_mg: float
    bipm_mg: float
    u_bipm_mg: float
    u_stability_mg: float = 0.0
    u_cleaning_mg: float = 0.0

    @property
    def delta_mg(self) -> float:
        """Delta m_ij = m^NMI - m^BIPM, mg."""
        return self.nmi_mg - self.bipm_mg

    @property
    def u_delta_mg(self) -> float:
        """Its standard uncertainty, mg (Table 4, right)."""
        return math.sqrt(self.u_nmi_mg**2 + self.u_stability_mg**2 + self.u_bipm_mg**2
                         + self.u_cleaning_mg**2)


@dataclass(frozen=True)
class Participant:
    """A participant: its standards and the correlation matrix of their realization
    uncertainties (shape (n, n), the identity for one standard); ``in_kcrv`` whether it
    contributes to the reference value; ``bipm_covariance_mg2`` the covariance of the pilot's
    weighings of two of its standards (0: uncorrelated, as seed 002 takes them)."""

    name: str
    standards: tuple[Standard, ...]
    correlation: np.ndarray
    in_kcrv: bool = True
    bipm_covariance_mg2: float = 0.0

    def covariance_mg2(self) -> np.ndarray:
        """The covariance of its Delta m_ij, mg^2, shape (n, n)."""
        u_nmi = np.array([s.u_nmi_mg for s in self.standards])
        cov = np.asarray(self.correlation, dtype=float) * np.outer(u_nmi, u_nmi)
        cov += self.bipm_covariance_mg2 * (1.0 - np.eye(len(self.standards)))
        cov += np.diag([s.u_delta_mg**2 - s.u_nmi_mg**2 for s in self.standards])
        return cov


@dataclass(frozen=True)
class ParticipantMean:
    """A participant's one result (Table 7): delta_mg, u_mg."""

    name: str
    delta_mg: float
    u_mg: float
    in_kcrv: bool = True


def participant_mean(p: Participant) -> ParticipantMean:
    """The participant's mean Delta m_i and u (eqs. 1-2, or their generalisation to a full
    correlation matrix)."""
    x = [s.delta_mg for s in p.standards]
    mean, u = correlated_mean(x, p.covariance_mg2())
    return ParticipantMean(p.name, mean, u, p.in_kcrv)


@dataclass
class ComparisonResult:
    """The reference value and the degrees of equivalence (mg, k = 1 unless named U).

    kcrv_mg, u_kcrv_mg (eqs. 3-4); participants: per participant its mean (delta_mg, u_mg),
    weight (0 outside the KCRV), doe_mg, u_doe_mg, U_doe_mg (k = 2) and in_kcrv; reference_doe_mg,
    u_reference_doe_mg (eqs. 7-8, if u_reference_mg was given); chi2 (eq. 9), nu, chi2_cutoff_95,
    chi2_expected (nu + sqrt(2 nu)), passes_95, passes_expected; birge_ratio
    sqrt(sum w_i (x_i - KCRV)^2 / nu); excluded: the participants left out of the KCRV by the
    largest-consistent-subset option."""

    kcrv_mg: float
    u_kcrv_mg: float
    participants: list[dict[str, Any]]
    chi2: float
    nu: int
    chi2_cutoff_95: float
    chi2_expected: float
    birge_ratio: float
    reference_doe_mg: float | None = None
    u_reference_doe_mg: float | None = None
    excluded: list[str] = field(default_factory=list)

    @property
    def passes_95(self) -> bool:
        """chi2 within the 95 % cut-off (a single participant, nu = 0, passes)."""
        return self.nu == 0 or self.chi2 <= self.chi2_cutoff_95

    @property
    def passes_expected(self) -> bool:
        """chi2 within nu + sqrt(2 nu)."""
        return self.nu == 0 or self.chi2 <= self.chi2_expected

    def summary(self) -> dict[str, Any]:
        """JSON-able figures: ``kcrv_mg``, ``u_kcrv_mg``, ``chi2``, ``nu``, ``chi2_cutoff_95``,
        ``chi2_expected``, ``passes_95``, ``passes_expected``, ``birge_ratio``, ``excluded``,
        ``reference_doe_mg`` and ``u_reference_doe_mg`` (if known), and ``participants``: name ->
        ``delta_mg``, ``u_mg``, ``weight``, ``doe_mg``, ``u_doe_mg``, ``U_doe_mg``, ``in_kcrv``."""
        d: dict[str, Any] = {
            "kcrv_mg": self.kcrv_mg, "u_kcrv_mg": self.u_kcrv_mg, "chi2": self.chi2, "nu": self.nu,
            "chi2_cutoff_95": self.chi2_cutoff_95, "chi2_expected": self.chi2_expected,
            "passes_95": self.passes_95, "passes_expected": self.passes_expected,
            "birge_ratio": self.birge_ratio, "excluded": list(self.excluded),
            "participants": {p["name"]: {k: v for k, v in p.items() if k != "name"}
                             for p in self.participants},
        }
        if self.reference_doe_mg is not None:
            d["reference_doe_mg"] = self.reference_doe_mg
            d["u_reference_doe_mg"] = self.u_reference_doe_mg
        return d

    def table(self) -> str:
        """Tables 7 and 8 of seed 002 as text, and the chi-squared test."""
        lines = [f"{'participant':<24} {'dm_i/mg':>9} {'u/mg':>8} {'weight':>7} "
                 f"{'DoE/mg':>9} {'u/mg':>8} {'U(k=2)':>8}"]
        for p in self.participants:
            flag = "" if p["in_kcrv"] else "  (not in KCRV)"
            lines.append(f"{p['name']:<24} {p['delta_mg']:>+9.4f} {p['u_mg']:>8.4f} {p['weight']:>7.3f} "
                         f"{p['doe_mg']:>+9.4f} {p['u_doe_mg']:>8.4f} {p['U_doe_mg']:>8.4f}{flag}")
        if self.reference_doe_mg is not None:
            assert self.u_reference_doe_mg is not None  # kcrv() sets the two together
            lines.append(f"{'reference (as maintained)':<24} {'':>9} {'':>8} {'':>7} {self.reference_doe_mg:>+9.4f} "
                         f"{self.u_reference_doe_mg:>8.4f} {2 * self.u_reference_doe_mg:>8.4f}")
        lines.append(f"KCRV = {self.kcrv_mg:+.4f} mg, u = {self.u_kcrv_mg:.4f} mg")
        lines.append(f"chi2 = {self.chi2:.2f} (nu = {self.nu}); 95 % cut-off {self.chi2_cutoff_95:.1f}: "
                     f"{'passed' if self.passes_95 else 'FAILED'}; nu + sqrt(2 nu) = {self.chi2_expected:.1f}: "
                     f"{'passed' if self.passes_expected else 'FAILED'}; Birge ratio {self.birge_ratio:.2f}")
        if self.excluded:
            lines.append(f"largest consistent subset: excluded {', '.join(self.excluded)}")
        return "\n".join(lines)


def kcrv(means: Sequence[ParticipantMean], *, u_reference_mg: float | None = None,
         excluded: Sequence[str] = ()) -> ComparisonResult:
    """The KCRV, weights, degrees of equivalence and the consistency test (eqs. 3-9) of the
    participants' means; those with ``in_kcrv`` False, or named in ``excluded``, get a degree of
    equivalence but no weight. ``u_reference_mg``: the as-maintained unit's uncertainty with
    respect to h (seed 002 Table 3, 0.0116 mg) for eqs. 7-8. ``ValueError`` with fewer than
    one participant in the KCRV, or a non-positive uncertainty."""
    names = [m.name for m in means]
    if len(set(names)) != len(names):
        raise ValueError(f"a participant appears twice: {sorted({n for n in names if names.count(n) > 1})}")
    if any(not m.u_mg > 0 for m in means):
        raise ValueError("every participant needs a positive uncertainty")
    inside = [m.in_kcrv and m.name not in excluded for m in means]
    if not any(inside):
        raise ValueError("no participant contributes to the KCRV")
    x = np.array([m.delta_mg for m in means])
    u = np.array([m.u_mg for m in means])
    w = np.where(inside, 1.0 / u**2, 0.0)
    ref = float(w @ x / w.sum())
    u_ref = math.sqrt(1.0 / w.sum())
    doe = x - ref
    u_doe = np.sqrt(np.where(inside, u**2 - u_ref**2, u**2 + u_ref**2))
    ins = np.array(inside)
    nu = int(ins.sum()) - 1
    chi2 = float(np.sum(doe[ins] ** 2 / u_doe[ins] ** 2)) if nu > 0 else 0.0
    birge = math.sqrt(float(np.sum(w * doe**2)) / nu) if nu > 0 else float("nan")
    rows = [{"name": m.name, "delta_mg": m.delta_mg, "u_mg": m.u_mg, "weight": float(w[i] / w.sum()),
             "doe_mg": float(doe[i]), "u_doe_mg": float(u_doe[i]), "U_doe_mg": float(2 * u_doe[i]),
             "in_kcrv": bool(inside[i])} for i, m in enumerate(means)]
    return ComparisonResult(
        kcrv_mg=ref, u_kcrv_mg=u_ref, participants=rows, chi2=chi2, nu=nu,
        chi2_cutoff_95=chi2_cutoff(nu) if nu > 0 else float("nan"),
        chi2_expected=nu + math.sqrt(2 * nu), birge_ratio=birge,
        reference_doe_mg=None if u_reference_mg is None else -ref,
        u_reference_doe_mg=None if u_reference_mg is None else math.sqrt(u_reference_mg**2 + u_ref**2),
        excluded=[n for n in names if n in excluded])


def largest_consistent_subset(means: Sequence[ParticipantMean], *,
                              u_reference_mg: float | None = None) -> ComparisonResult:
    """The KCRV of the largest subset of the participants in the KCRV whose chi-squared passes
    the 95 % cut-off (among subsets of one size, the smallest chi-squared); the others are
    ``excluded``. The whole set if it passes. ``ValueError`` beyond 20 participants (2^n
    subsets)."""
    candidates = [m.name for m in means if m.in_kcrv]
    if len(candidates) > 20:
        raise ValueError("the largest consistent subset is searched over at most 20 participants")
    if not candidates:
        return kcrv(means, u_reference_mg=u_reference_mg)
    for drop in range(len(candidates)):
        results = [kcrv(means, u_reference_mg=u_reference_mg, excluded=out)
                   for out in itertools.combinations(candidates, drop)]
        passing = [r for r in results if r.passes_95]
        if passing or drop == len(candidates) - 1:
            return min(passing or results, key=lambda r: r.chi2)
    raise AssertionError("unreachable: the last drop count returns")


@dataclass(frozen=True)
class Comparison:
    """A comparison's submissions: its name, the participants, and the as-maintained unit's
    uncertainty with respect to h (eqs. 7-8; None to leave them out)."""

    name: str
    participants: tuple[Participant, ...]
    u_reference_mg: float | None = None


def compare(comparison: Comparison, *, extra: Sequence[ParticipantMean] = (),
            consistent_subset: bool = False) -> tuple[list[ParticipantMean], ComparisonResult]:
    """Every participant's mean (Table 7) and the KCRV with the degrees of equivalence (Table
    8); ``extra``: means added beside the file's (our own realizations); ``consistent_subset``:
    the largest consistent subset instead of all participants in the KCRV."""
    means = [participant_mean(p) for p in comparison.participants] + list(extra)
    fn = largest_consistent_subset if consistent_subset else kcrv
    return means, fn(means, u_reference_mg=comparison.u_reference_mg)


def participant_from_result(summary: Mapping[str, Any], name: str, *, reference_mass_kg: float,
                            u_reference_kg: float = 0.0, in_kcrv: bool = True) -> ParticipantMean:
    """A result of ``kibble analyze`` / ``kibble measure`` (its JSON summary: ``mass_kg``,
    ``u_mass_kg``) as a participant: Delta m = mass_kg - reference_mass_kg in mg, u the result's
    and the reference's in quadrature. ``ValueError`` naming a missing or non-finite figure."""
    try:
        m, u = float(summary["mass_kg"]), float(summary["u_mass_kg"])
    except KeyError as exc:
        raise ValueError(f"{name}: the result has no {exc.args[0]} (a result of kibble analyze "
                         "or kibble measure has mass_kg and u_mass_kg)") from None
    if not (math.isfinite(m) and math.isfinite(u) and u > 0):
        raise ValueError(f"{name}: mass_kg {m} and u_mass_kg {u} must be finite, u positive")
    return ParticipantMean(name, (m - reference_mass_kg) / KG_PER_MG,
                           math.hypot(u, u_reference_kg) / KG_PER_MG, in_kcrv)
