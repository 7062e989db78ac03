"""``kibble xrcd FILE`` and ``kibble compare FILE``: from a realization of the kilogram to the
key comparison (seed 003's XRCD route, seed 002's comparison of realizations).

The printing and the JSON of the two commands; the work is in
:mod:`kibble.services.analysis.xrcd`, :mod:`~kibble.services.analysis.comparison` and
:mod:`~kibble.services.analysis.inputfiles` (the file formats). No bus, no simulator.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from kibble.services.analysis import comparison as cmp
from kibble.services.analysis import xrcd
from kibble.services.analysis.inputfiles import InputFileError, load_comparison, load_sphere

MC_DRAWS = 200_000
"""Monte Carlo draws of ``kibble xrcd`` (JCGM 101)."""


def _sig(value: float, u: float, digits: int = 2) -> str:
    """value(u) with u to ``digits`` significant digits, like the papers' tables (Table 14 gives
    N_A's u three digits when its first is 1)."""
    if not (u > 0 and math.isfinite(u)):
        return f"{value:.12g}"
    places = max(0, digits - 1 - math.floor(math.log10(u)))
    return f"{value:.{places}f}({round(u * 10**places):d})"


def cli_xrcd(path: str, json_out: str | None, mc_draws: int = MC_DRAWS) -> int:
    """``kibble xrcd FILE [--json OUT]``: Table 14 (M, a, V, m, rho, N_A), the core mass and
    mass deficit, the mass realized with N_A fixed, the budget (Table 15) and, for a sphere with
    several investigations, the weighted mean of the core masses (Table 13); the first-order
    uncertainties checked by a Monte Carlo. Exit status 1 for bad input."""
    try:
        sphere = load_sphere(path)
    except InputFileError as exc:
        print(f"kibble xrcd: {exc}", file=sys.stderr)
        return 1
    result = xrcd.analyze_sphere(sphere)
    mc = xrcd.monte_carlo(result, mc_draws)
    a = sphere.lattice_parameter
    m = sphere.molar_mass
    print(f"sphere {sphere.name} (crystal {sphere.crystal}), {len(sphere.investigations)} investigation(s)")
    print(f"  M = {_sig(m.value * 1e3, m.u * 1e3)} g/mol, a = {_sig(a.value * 1e12, a.u * 1e12)} pm")
    per: dict[str, dict[str, Any]] = {}
    for k, inv in enumerate(sphere.investigations):
        d = result.figures(k)
        n = len(xrcd.OUTPUTS)
        mc_u_rel = float(mc["std"][k * n + xrcd.OUTPUTS.index("avogadro_per_mol")]) / d["avogadro_per_mol"]
        print(f"\n[{inv.name}]")
        print(f"  V        = {_sig(inv.volume.value * 1e6, inv.volume.u * 1e6)} cm^3")
        print(f"  m_sphere = {_sig(inv.sphere_mass.value, inv.sphere_mass.u)} kg")
        print(f"  m_SL     = {_sig(d['surface_layer_mass_kg'] * 1e9, d['u_surface_layer_mass_kg'] * 1e9)} ug")
        print(f"  m_core   = {_sig(d['core_mass_kg'], d['u_core_mass_kg'])} kg")
        print(f"  m_deficit= {_sig(d['mass_deficit_kg'] * 1e9, d['u_mass_deficit_kg'] * 1e9)} ug (eq. 16)")
        print(f"  m        = {_sig(d['mass_kg'] * 1e3, d['u_mass_kg'] * 1e3)} g")
        print(f"  rho      = {_sig(d['density_kg_m3'], d['u_density_kg_m3'])} kg/m^3")
        u_na = d['u_avogadro_per_mol'] / 1e23
        print(f"  N_A      = {_sig(d['avogadro_per_mol'] / 1e23, u_na, 3 if f'{u_na:e}'[0] == '1' else 2)} "
              f"x 1e23 /mol (u_rel {d['u_avogadro_rel']:.3g}; Monte Carlo {mc_u_rel:.3g}, {mc['n']} draws)")
        print(f"  with N_A fixed: m_sphere realized = {_sig(d['realized_mass_kg'], d['u_realized_mass_kg'])} kg, "
              f"{(d['realized_mass_kg'] - inv.sphere_mass.value) * 1e6:+.4f} mg from the weighing")
        print("  budget of N_A (relative, 1e-9):")
        for group, u_rel in xrcd.budget(result, k):
            print(f"    {group:<18} {u_rel * 1e9:6.1f}")
        per[inv.name] = {**d, "u_avogadro_rel_mc": mc_u_rel}
    summary: dict[str, Any] = {"file": str(path), "sphere": sphere.name, "investigations": per}
    if len(per) == 1:
        summary.update(next(iter(per.values())))
    else:
        mean, u, _ = xrcd.core_mass_mean(result)
        print(f"\nweighted mean of the core masses (with their covariance): {_sig(mean, u)} kg")
        summary.update({"core_mass_mean_kg": mean, "u_core_mass_mean_kg": u})
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"wrote {json_out}")
    return 0


def _with(path: str, reference_kg: float | None) -> cmp.ParticipantMean:
    """A ``--with`` result file as a participant (not in the KCRV)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a result of kibble analyze / kibble measure: {exc}") from None
    ref = data.get("mass_true_kg", reference_kg)
    if ref is None:
        raise ValueError(f"{path}: the result has no mass_true_kg (kibble measure --offline writes "
                         "it); give the reference's mass of the standard with --reference-kg")
    name = f"kibble {data.get('plan', 'run')} ({Path(path).stem})"
    return cmp.participant_from_result(data, name, reference_mass_kg=float(ref), in_kcrv=False)


def cli_compare(path: str, with_results: Sequence[str], plots_dir: str | None, json_out: str | None,
                consistent_subset: bool = False, reference_kg: float | None = None) -> int:
    """``kibble compare FILE [--with RESULT.json ...] [--plots DIR] [--json OUT]
    [--consistent-subset] [--reference-kg KG]``: Table 7 (each participant's mean), the KCRV,
    Table 8 and the chi-squared test; our results beside the file's participants. Exit status 1
    for bad input."""
    try:
        comp = load_comparison(path)
        extra = [_with(p, reference_kg) for p in with_results]
        means, result = cmp.compare(comp, extra=extra, consistent_subset=consistent_subset)
    except ValueError as exc:
        print(f"kibble compare: {exc}", file=sys.stderr)
        return 1
    print(f"{comp.name}: {len(comp.participants)} participants"
          + (f", {len(extra)} added (not in the KCRV)" if extra else ""))
    print(result.table())
    if plots_dir:
        from kibble.services.analysis.comparisonplots import write_comparison_plots

        for p in write_comparison_plots(result, plots_dir, comp.name):
            print(f"plot: {p}")
    if json_out:
        summary = {"file": str(path), "comparison": comp.name, **result.summary()}
        Path(json_out).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"wrote {json_out}")
    return 0
