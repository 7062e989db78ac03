"""The ``campaign`` benchmark group: registered, opt-in, and its figures from two campaign
summaries (the campaigns themselves take 20 to 40 minutes: ``kibble bench --only campaign``)."""

from __future__ import annotations

import math

import pytest

from kibble.services.bench import suite as bench
from kibble.services.bench import campaign as CB

NIST4 = {"h_rel_err": 3e-9, "u_h_rel": 2e-8, "z_score": 0.15, "u_master_rel": 1e-8, "n_sweeps": 60,
         "n_weighings": 17, "n_triplets": 1, "sim_s": 8950.0, "wall_s": 1200.0, "seed": 1,
         "rate_hz": 200.0}
EFB = {"mass_rel_err": -2e-6, "u_mass_rel": 3e-6, "z_score": -0.67, "n_trials": 5, "sim_s": 1080.0,
       "wall_s": 200.0, "seed": 1, "kappa_rel_err": 1e-6, "n_gradients": 3}


def test_group_is_registered_and_opt_in():
    assert "campaign" in bench.GROUPS
    assert "campaign" not in bench.DEFAULT_GROUPS


def test_figures():
    f = CB.figures(NIST4, EFB, 1234.0)
    for key in ("campaign_h_rel_err", "campaign_h_rel_u", "efb_mass_rel_err", "efb_mass_rel_u",
                "campaign_wall_s"):
        assert math.isfinite(f[key]), key
    assert f["campaign_h_rel_err"] == 3e-9 and f["campaign_h_rel_u"] == 2e-8
    assert f["efb_mass_rel_err"] == -2e-6 and f["efb_mass_rel_u"] == 3e-6
    assert f["campaign_wall_s"] == 1234.0 and f["campaign_sim_s"] == 8950.0
    # type B of the published budgets in quadrature: 22.6e-9 (seed 001 Table III), and for the
    # 1 mg the published combined 7.3e-6 with the published type A 3.8e-6 (seed 000 Table 1)
    assert CB.NIST4_TYPE_B_REL == pytest.approx(22.6e-9, rel=0.01)
    assert math.hypot(3.8e-6, CB.EFB_TYPE_B_REL) == pytest.approx(7.3e-6, rel=0.02)
    assert f["campaign_h_rel_u_combined"] == pytest.approx(math.hypot(2e-8, CB.NIST4_TYPE_B_REL))
    assert f["efb_mass_rel_u_combined"] == pytest.approx(math.hypot(3e-6, CB.EFB_TYPE_B_REL))
    assert all(isinstance(v, (int, float)) for v in f.values())
    # the measured capacitance gradient
    assert f["efb_kappa_rel_err"] == 1e-6 and f["efb_n_gradients"] == 3
