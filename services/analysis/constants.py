"""The constants that tie a Kibble balance's electrical units to the Planck constant.

A voltage and a current measured against the Josephson and quantum Hall effects are numerical
values in the units those effects realize: the SI (K_J = 2e/h, R_K = h/e^2, exact since 2019)
or the conventional units of 1990 (K_J-90, R_K-90; seed 001 eq. 6). Measured in units that
realize the Planck constant ``h_units``, a Kibble balance gives ``h = h_units {Bl_F} / {Bl_V}``
(seed 001 eq. 13); ``h_units`` is :data:`H_J_S` in the SI and :data:`H90_J_S` in the
conventional units.
"""

from __future__ import annotations

__all__ = ["H_J_S", "E_C", "K_J90_HZ_PER_V", "R_K90_OHM", "H90_J_S", "K_J_HZ_PER_V", "R_K_OHM", "N_A_PER_MOL",
           "ATOMIC_MASS_CONSTANT_KG"]

H_J_S = 6.62607015e-34
"""Planck constant, J s (exact in the SI since 2019)."""
E_C = 1.602176634e-19
"""Elementary charge, C (exact)."""
K_J90_HZ_PER_V = 483597.9e9
"""Conventional Josephson constant K_J-90, Hz/V (seed 001, text before eq. 6)."""
R_K90_OHM = 25812.807
"""Conventional von Klitzing constant R_K-90, ohm (seed 001, text before eq. 6)."""
H90_J_S = 4.0 / (K_J90_HZ_PER_V**2 * R_K90_OHM)
"""h90 = 4 / (K_J-90^2 R_K-90), J s (seed 001 eqs. 5, 6: K_J^2 R_K = 4 / h)."""
K_J_HZ_PER_V = 2.0 * E_C / H_J_S
"""SI Josephson constant 2e/h, Hz/V."""
R_K_OHM = H_J_S / E_C**2
"""SI von Klitzing constant h/e^2, ohm."""
N_A_PER_MOL = 6.02214076e23
"""Avogadro constant, 1/mol (exact in the SI since 2019; the XRCD route realizes the kilogram with it)."""
ATOMIC_MASS_CONSTANT_KG = 1.66053906660e-27
"""Atomic mass constant m_u, kg (CODATA 2018; u(m_u) / m_u = 3e-10, far below the XRCD route's
uses of it: the masses of point defects, eq. 16 of seed 003)."""
