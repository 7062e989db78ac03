"""The analysis plots (PNG, matplotlib's Agg backend), and the choice of them for a result.

:func:`write_plots` writes the same set for a result whichever path produced it (``kibble analyze``
of a recording, the offline campaign): NIST-4, the Bl profile of the first velocity set with
the residuals (after seed 001 figure 11), Bl over time of every triplet (figure 12) and the h
of each triplet with the result (figure 14); EFB, the mass of each trial with the result (seed
000 figure 6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kibble.services.analysis.constants import H_J_S
from kibble.services.analysis.efb import EfbAnalysis
from kibble.services.analysis.nist4 import H_UNITS_J_S, Nist4Analysis
from kibble.services.analysis.triplet import TripletResult
from kibble.services.analysis.uncertainty import UncertaintyResult
from kibble.services.analysis.velocity import VelocitySetResult

__all__ = ["plot_bl_profile", "plot_bl_time", "plot_mass_determinations", "write_plots"]


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_bl_profile(result: VelocitySetResult, path) -> str:
    """Bl(z) of every sweep with the master profile (top) and the residuals (bottom), PNG
    (after seed 001 figure 11). Returns the path."""
    plt = _plt()
    fig, (a0, a1) = plt.subplots(2, 1, sharex=True, figsize=(7, 6), height_ratios=[2, 1])
    for z, b, r in zip(result.z_m, result.bl_t_m, result.residual_t_m):
        a0.plot(z * 1e3, b, ".", ms=2, alpha=0.4)
        a1.plot(z * 1e3, r * 1e9 / abs(result.bl_mean_t_m), ".", ms=2, alpha=0.4)
    zz = np.linspace(*result.z_range_m, 400)
    a0.plot(zz * 1e3, result.profile_t_m(zz), "k-", lw=1.5, label="master profile")
    a0.axvline(result.z_weigh_m * 1e3, color="r", lw=0.8, label="weighing position")
    a0.set_ylabel("Bl / (T m)")
    a0.legend(loc="best", fontsize=8)
    a1.set_ylabel("residual / 1e-9 (rel.)")
    a1.set_xlabel("z / mm")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_bl_time(result: TripletResult, path) -> str:
    """Bl over time, force (s = 1) vs velocity (s = 0) points, PNG (after seed 001 figure 12):
    top the data relative to {Bl_V} with the triplet regression, bottom the data minus the
    smooth part l1 + l2 t + l3 t^2, where the force points sit l4 above the velocity points;
    the title l4 / {Bl_V} = h / h_units - 1 (eq. 15; h_units the h of the electrical units,
    the SI value in the pipeline, :mod:`~kibble.services.analysis.constants`). Returns the
    path."""
    plt = _plt()
    fig, (a0, a1) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    t0 = result.time_s.min()
    ref = result.bl_v_t_m
    f = result.is_force
    tm = (result.time_s - t0) / 60
    smooth = result.model_t_m(result.time_s, False)
    for ax, y in ((a0, result.bl_t_m / ref - 1), (a1, (result.bl_t_m - smooth) / ref)):
        ax.plot(tm[~f], y[~f] * 1e9, "r.", label="velocity mode")
        ax.plot(tm[f], y[f] * 1e9, "bs", ms=4, label="force mode")
    tt = np.linspace(result.time_s.min(), result.time_s.max(), 300)
    a0.plot((tt - t0) / 60, (result.model_t_m(tt, False) / ref - 1) * 1e9, "r-", lw=1)
    a0.plot((tt - t0) / 60, (result.model_t_m(tt, True) / ref - 1) * 1e9, "b-", lw=1)
    a1.axhline(0.0, color="r", lw=1)
    a1.axhline(result.lam[3] / ref * 1e9, color="b", lw=1)
    a0.set_ylabel("Bl / Bl_V - 1 / 1e-9")
    a1.set_ylabel("Bl - (l1 + l2 t + l3 t^2) / 1e-9 (rel.)")
    a1.set_xlabel("t / min")
    a0.set_title(f"l4 / Bl_V = h / h_units - 1 = {result.h_rel * 1e9:.1f}({result.u_h_rel * 1e9:.1f}) x 1e-9")
    a0.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_mass_determinations(result: UncertaintyResult, path, *, u_each=None, unit: str = "kg",
                             scale: float = 1.0, reference: float | None = None) -> str:
    """The determinations with error bars (u_each, default the sample standard deviation) and
    the result with its combined uncertainty band, PNG (after seed 001 figure 14 / seed 000
    figure 6). ``scale`` multiplies the values for display in ``unit``. Returns the path."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    v = result.values * scale
    e = (np.full(v.size, np.std(result.values, ddof=1) if v.size > 1 else 0.0) if u_each is None
         else np.broadcast_to(np.asarray(u_each, dtype=float), v.shape)) * scale
    ax.errorbar(np.arange(v.size), v, yerr=e, fmt="o", ms=4, capsize=2, label="determinations")
    ax.axhline(result.value * scale, color="k", lw=1, label="result")
    ax.axhspan((result.value - result.u_c) * scale, (result.value + result.u_c) * scale,
               color="k", alpha=0.15, label="u_c (k=1)")
    if reference is not None:
        ax.axhline(reference * scale, color="g", ls="--", lw=1, label="reference")
    ax.set_xlabel("determination")
    ax.set_ylabel(unit)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def write_plots(result: Nist4Analysis | EfbAnalysis, directory, *,
                reference_mass_kg: float | None = None) -> list[str]:
    """The analysis PNGs of ``result`` into ``directory`` (created); their paths.

    NIST-4: ``nist4_bl_profile.png``, ``nist4_bl_time_<k>.png`` per triplet, ``nist4_h.png``
    (with h_SI as the reference). EFB: ``efb_mass.png``, with ``reference_mass_kg`` drawn if
    given (the offline campaign's true mass)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(result, EfbAnalysis):
        return [plot_mass_determinations(result.uncertainty, out / "efb_mass.png", unit="mass / mg",
                                         scale=1e6, reference=reference_mass_kg)]
    paths = [plot_bl_profile(result.velocity_sets[0], out / "nist4_bl_profile.png")]
    for k, tr in enumerate(result.triplets):
        paths.append(plot_bl_time(tr, out / f"nist4_bl_time_{k}.png"))
    paths.append(plot_mass_determinations(
        result.uncertainty, out / "nist4_h.png", u_each=[t.u_h_rel * H_UNITS_J_S for t in result.triplets],
        unit="h / 1e-34 J s", scale=1e34, reference=H_J_S))
    return paths
