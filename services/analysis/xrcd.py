"""The XRCD route: a 28Si sphere's mass, density and the Avogadro constant (seed 003, sections
2.5-3, eqs. 1 and 16, Tables 8-16).

For each investigation of a sphere (one laboratory's volume, mass and surface measurements):

- surface layer: m_SL = sum of the layers (oxide, carbonaceous, water, metallic), each given as
  a mass or as thickness d and density rho_l on the sphere's surface F = (36 pi V^2)^(1/3):
  m_l = F d rho_l (seed 003 section 2.4, Tables 8-9);
- core mass m_core = m_sphere - m_SL (Table 13);
- mass deficit of the point defects m_deficit = V sum_i (m_28 - m_i) N_i (eq. 16; m_i the mass
  on the defect's site: 0 for a vacancy, the 28Si atom plus the oxygen for interstitial
  oxygen);
- m = m_core + m_deficit, the density rho = m / V and N_A = 8 M V / (m a^3) (eq. 1, Table 14);
- with N_A fixed (the SI since 2019) the same measurements realize the sphere's mass:
  m_realized = 8 M V / (N_A a^3) - m_deficit + m_SL (the weighing's m_sphere is then what is
  compared with it; N_A measured / N_A fixed - 1 = -(m_realized / m_sphere - 1) to first order).

Uncertainties (k = 1): every input carries its standard uncertainty; correlations between
inputs (the sphere masses' common traceability to the prototypes, Table 13) are given by
name. The combined uncertainty is propagated to first order (JCGM 100, the Jacobian by central
differences at +-u) over the whole file at once, so inputs the investigations share (molar
mass, lattice parameter, point defects) correlate their results; :func:`monte_carlo` checks it
by JCGM 101 (the inputs drawn from their joint normal distribution). :func:`budget` gives the
relative contributions to N_A by group, shaped like Table 15. :func:`core_mass_mean` is the
weighted mean of the investigations' core masses with their covariance (Table 13).

Pure numpy: no bus, no simulator. SI units inside (kg, m, m^3, kg/mol, 1/m^3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kibble.services.analysis.comparison import correlated_mean
from kibble.services.analysis.constants import ATOMIC_MASS_CONSTANT_KG, N_A_PER_MOL

__all__ = ["Quantity", "Layer", "PointDefect", "Investigation", "Sphere", "XrcdResult",
           "GROUPS", "OUTPUTS", "analyze_sphere", "monte_carlo", "budget", "core_mass_mean",
           "M28_U"]

M28_U = 27.9769265350
"""Relative atomic mass of 28Si (AME 2016)."""

GROUPS = ("molar mass", "lattice parameter", "surface", "sphere volume", "sphere mass", "point defects")
"""The rows of the budget (seed 003 Table 15), each input's group."""

OUTPUTS = ("surface_layer_mass_kg", "core_mass_kg", "mass_deficit_kg", "mass_kg", "density_kg_m3",
           "avogadro_per_mol", "realized_mass_kg")
"""The figures of one investigation, in the order of the model's outputs."""


@dataclass(frozen=True)
class Quantity:
    """A measured input: value and standard uncertainty in SI ``unit``, its budget ``group``."""

    name: str
    value: float
    u: float
    unit: str
    group: str


@dataclass(frozen=True)
class Layer:
    """A surface layer: its mass, or its thickness and density."""

    name: str
    mass: Quantity | None = None
    thickness: Quantity | None = None
    density: Quantity | None = None


@dataclass(frozen=True)
class PointDefect:
    """A point defect: its concentration (1/m^3) and the mass on its site (u)."""

    name: str
    concentration: Quantity
    site_mass_u: float


@dataclass(frozen=True)
class Investigation:
    """One laboratory's sphere measurements: volume (m^3), mass in vacuum (kg), surface layers."""

    name: str
    volume: Quantity
    sphere_mass: Quantity
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class Sphere:
    """A sphere: the crystal's molar mass (kg/mol) and lattice parameter (m), the sphere's
    point defects, its investigations and the correlation coefficients between inputs (by
    :class:`Quantity` name)."""

    name: str
    crystal: str
    molar_mass: Quantity
    lattice_parameter: Quantity
    defects: tuple[PointDefect, ...]
    investigations: tuple[Investigation, ...]
    correlations: tuple[tuple[str, str, float], ...] = ()

    def inputs(self) -> list[Quantity]:
        """Every input, in the order of the model's input vector."""
        q = [self.molar_mass, self.lattice_parameter] + [d.concentration for d in self.defects]
        for inv in self.investigations:
            q += [inv.volume, inv.sphere_mass]
            for layer in inv.layers:
                q += [x for x in (layer.mass, layer.thickness, layer.density) if x is not None]
        return q

    def covariance(self) -> np.ndarray:
        """The inputs' covariance matrix, shape (n, n); ``ValueError`` naming an unknown input
        of a correlation or a matrix that is not positive semi-definite."""
        q = self.inputs()
        index = {x.name: i for i, x in enumerate(q)}
        u = np.array([x.u for x in q])
        r = np.eye(len(q))
        for a, b, rho in self.correlations:
            for name in (a, b):
                if name not in index:
                    raise ValueError(f"correlation of unknown input {name!r} (inputs: {', '.join(index)})")
            r[index[a], index[b]] = r[index[b], index[a]] = rho
        if np.linalg.eigvalsh(r).min() < -1e-12:
            raise ValueError("the inputs' correlation matrix is not positive semi-definite")
        return r * np.outer(u, u)

    def model(self) -> Callable[[np.ndarray], np.ndarray]:
        """The measurement model: inputs, shape (n,) or (n, k), to outputs, shape
        (len(investigations) * len(OUTPUTS),) or (..., k): per investigation :data:`OUTPUTS`."""
        n_def = len(self.defects)
        dm_kg = np.array([(M28_U - d.site_mass_u) * ATOMIC_MASS_CONSTANT_KG for d in self.defects])
        layout = []
        i = 2 + n_def
        for inv in self.investigations:
            kinds = []
            j = i + 2
            for layer in inv.layers:
                kinds.append(("mass", j) if layer.mass is not None else ("film", j))
                j += 1 if layer.mass is not None else 2
            layout.append((i, kinds))
            i = j

        def f(x: np.ndarray) -> np.ndarray:
            molar, a = x[0], x[1]
            conc = x[2:2 + n_def]
            out = []
            for start, kinds in layout:
                volume, m_sphere = x[start], x[start + 1]
                area = np.cbrt(36.0 * math.pi * volume**2)
                m_sl = 0.0 * volume
                for kind, j in kinds:
                    m_sl = m_sl + (x[j] if kind == "mass" else area * x[j] * x[j + 1])
                core = m_sphere - m_sl
                deficit = volume * np.tensordot(dm_kg, conc, axes=(0, 0)) if n_def else 0.0 * volume
                mass = core + deficit
                crystal = 8.0 * molar * volume / a**3
                out += [m_sl, core, deficit, mass, mass / volume, crystal / mass,
                        crystal / N_A_PER_MOL - deficit + m_sl]
            return np.array(out)

        return f


def _jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """df/dx by central differences at x +- step (shape (n_out, n_in))."""
    cols = []
    for j in range(x.size):
        h = step[j]
        xp, xm = x.copy(), x.copy()
        xp[j] += h
        xm[j] -= h
        cols.append((f(xp) - f(xm)) / (2 * h))
    return np.array(cols).T


@dataclass
class XrcdResult:
    """A sphere's figures by first-order propagation.

    names: the inputs; x, cov: their values and covariance; y, cov_y: the outputs (per
    investigation :data:`OUTPUTS`) and their covariance; jacobian (n_out, n_in); groups of the
    inputs. :meth:`figures` gives one investigation's figures and uncertainties."""

    sphere: Sphere
    names: list[str]
    groups: list[str]
    x: np.ndarray
    cov: np.ndarray
    y: np.ndarray
    cov_y: np.ndarray
    jacobian: np.ndarray

    def _slot(self, k: int, name: str) -> int:
        return k * len(OUTPUTS) + OUTPUTS.index(name)

    def figures(self, k: int) -> dict[str, float]:
        """Investigation k's figures (SI) and their standard uncertainties: ``NAME`` and
        ``u_NAME`` for each of :data:`OUTPUTS`, ``u_avogadro_rel`` and ``u_realized_mass_rel``."""
        d: dict[str, float] = {}
        for name in OUTPUTS:
            i = self._slot(k, name)
            d[name] = float(self.y[i])
            d["u_" + name] = math.sqrt(max(float(self.cov_y[i, i]), 0.0))
        d["u_avogadro_rel"] = d["u_avogadro_per_mol"] / d["avogadro_per_mol"]
        d["u_realized_mass_rel"] = d["u_realized_mass_kg"] / d["realized_mass_kg"]
        return d


def analyze_sphere(sphere: Sphere) -> XrcdResult:
    """First-order propagation (JCGM 100) of every input through :meth:`Sphere.model`."""
    q = sphere.inputs()
    x = np.array([v.value for v in q])
    u = np.array([v.u for v in q])
    cov = sphere.covariance()
    f = sphere.model()
    step = np.where(u > 0, u, np.maximum(np.abs(x) * 1e-9, 1e-30))
    jac = _jacobian(f, x, step)
    return XrcdResult(sphere, [v.name for v in q], [v.group for v in q], x, cov, f(x),
                      jac @ cov @ jac.T, jac)


def monte_carlo(result: XrcdResult, n: int = 200_000, seed: int = 1) -> dict[str, np.ndarray]:
    """JCGM 101: the inputs drawn from their joint normal distribution (``n`` draws), the
    outputs' mean and standard deviation (arrays like ``result.y``)."""
    rng = np.random.default_rng(seed)
    w, v = np.linalg.eigh(result.cov)
    root = v * np.sqrt(np.clip(w, 0.0, None))
    draws = result.x[:, None] + root @ rng.standard_normal((result.x.size, n))
    y = result.sphere.model()(draws)
    return {"mean": y.mean(axis=1), "std": y.std(axis=1, ddof=1), "n": n}


def budget(result: XrcdResult, k: int, output: str = "avogadro_per_mol") -> list[tuple[str, float]]:
    """Relative uncertainty contributions to an output of investigation k by input group
    (seed 003 Table 15): [(group, u_rel), ..., ("total", u_rel)]; within a group the inputs'
    correlations count, the total counts all of them."""
    i = result._slot(k, output)
    row = result.jacobian[i]
    value = abs(result.y[i])
    rows = []
    for g in GROUPS:
        sel = np.array([gg == g for gg in result.groups])
        if sel.any():
            var = float(row[sel] @ result.cov[np.ix_(sel, sel)] @ row[sel])
            rows.append((g, math.sqrt(max(var, 0.0)) / value))
    rows.append(("total", math.sqrt(max(float(result.cov_y[i, i]), 0.0)) / value))
    return rows


def core_mass_mean(result: XrcdResult) -> tuple[float, float, np.ndarray]:
    """The weighted mean of the investigations' core masses with their covariance (Table 13),
    kg: (mean, u, covariance (n, n))."""
    idx = [result._slot(k, "core_mass_kg") for k in range(len(result.sphere.investigations))]
    cov = result.cov_y[np.ix_(idx, idx)]
    mean, u = correlated_mean(result.y[idx], cov)
    return mean, u, cov
