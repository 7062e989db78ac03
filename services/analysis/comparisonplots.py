"""The plots of a key comparison (PNG, matplotlib's Agg backend, as :mod:`.plots`), after seed
002 figures 2-4: each participant's Delta m_i with its standard uncertainty and the KCRV with
its band; the degrees of equivalence with k = 1 bars; the same with k = 2 bars. Participants
outside the KCRV are drawn hollow; the as-maintained unit's deviation (eqs. 7-8), if known,
is drawn last."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kibble.services.analysis.comparison import ComparisonResult
from kibble.services.analysis.plots import _plt

__all__ = ["plot_comparison_results", "plot_degrees_of_equivalence", "write_comparison_plots"]


def _points(ax, x, y, e, inside) -> None:
    for xi, yi, ei, ins in zip(x, y, e, inside):
        ax.errorbar([xi], [yi], yerr=[ei], fmt="o", ms=5, capsize=3, color="C0",
                    mfc="C0" if ins else "white")


def plot_comparison_results(result: ComparisonResult, path, title: str = "") -> str:
    """Delta m_i (mg) with k = 1 bars and the KCRV with its standard uncertainty (figure 2).
    Returns the path."""
    plt = _plt()
    rows = result.participants
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(rows))
    _points(ax, x, [p["delta_mg"] for p in rows], [p["u_mg"] for p in rows], [p["in_kcrv"] for p in rows])
    ax.axhline(result.kcrv_mg, color="k", lw=1, label=f"KCRV {result.kcrv_mg:+.4f} mg")
    ax.axhspan(result.kcrv_mg - result.u_kcrv_mg, result.kcrv_mg + result.u_kcrv_mg, color="k",
               alpha=0.15, label=f"u(KCRV) {result.u_kcrv_mg:.4f} mg")
    ax.axhline(0.0, color="g", ls="--", lw=0.8, label="reference (as maintained)")
    ax.set_xticks(x, [p["name"] for p in rows], rotation=30, ha="right")
    ax.set_ylabel("Delta m_i / mg")
    ax.set_title(title or "results and KCRV (k = 1)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot_degrees_of_equivalence(result: ComparisonResult, path, *, k: float = 1.0, title: str = "") -> str:
    """Degrees of equivalence Delta m'_i (mg) with k u(Delta m'_i) bars (figures 3, 4), the
    as-maintained unit's last if known. Returns the path."""
    plt = _plt()
    rows = result.participants
    names = [p["name"] for p in rows]
    y = [p["doe_mg"] for p in rows]
    e = [k * p["u_doe_mg"] for p in rows]
    inside = [p["in_kcrv"] for p in rows]
    if result.reference_doe_mg is not None:
        assert result.u_reference_doe_mg is not None  # kcrv() sets the two together
        names.append("reference (h via IPK)")
        y.append(result.reference_doe_mg)
        e.append(k * result.u_reference_doe_mg)
        inside.append(False)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(names))
    _points(ax, x, y, e, inside)
    ax.axhline(0.0, color="k", lw=1, label="KCRV")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("Delta m'_i (from the KCRV) / mg")
    ax.set_title(title or f"degrees of equivalence (k = {k:g})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def write_comparison_plots(result: ComparisonResult, directory, name: str = "") -> list[str]:
    """``comparison_results.png`` (figure 2), ``comparison_doe.png`` (figure 3, k = 1) and
    ``comparison_doe_k2.png`` (figure 4) into ``directory`` (created); their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}: " if name else ""
    return [plot_comparison_results(result, out / "comparison_results.png",
                                    f"{prefix}results and KCRV (k = 1)"),
            plot_degrees_of_equivalence(result, out / "comparison_doe.png", k=1.0,
                                        title=f"{prefix}degrees of equivalence (k = 1)"),
            plot_degrees_of_equivalence(result, out / "comparison_doe_k2.png", k=2.0,
                                        title=f"{prefix}degrees of equivalence (k = 2)")]
