"""End to end, offline (the real daemons + the simulated plant in process): shortened EFB
runs (efb_run: gradient determinations bracketing the weighings) recover the 1 mg mass with the
measured dC/dz within 3 stated standard uncertainties in every seed, and the stated
uncertainties match the scatter across seeds within a factor of 2 (RMS of the normalized
errors (value - truth) / u between 1/2 and 2).

The seeds run in a pool of two processes (the machine has two cores). Type A uncertainties
only. Per seed: a gradient determination (the paper's 11 points within 2 mm, 2 sweeps, 3 bridge
readings per point), 6 runs of the weighing plan (5 trials, 5 s windows), a gradient
determination; ~1280 s simulated at 100 Hz (the gradient tests of test_plans.py run there too:
the loop holds the gradient points within 4 nm and follows the moves within 2 um).

Why 5 trials: the weighing's type A is the standard deviation of the mean of the trials; from
3 trials (2 degrees of freedom) even an exact analysis keeps 6 seeds all within 3 u only about
half the time. Chosen on seeds 101-120 (weighings only, the plant's kappa): 3 trials put 3 of
20 seeds beyond 3 u, 5 trials 1 of 20 (RMS z 1.7: the trials' scatter does not show a part of
the error, ~2e-6, common to a seed's trials).

Four seeds (not six) keep ``make test`` under its 15 minutes; the NIST-4 counterpart is
``test_campaign_nist4.py``."""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from kibble.services.harness import campaign as C

pytestmark = pytest.mark.slow

EFB_SEEDS = (1, 2, 3, 4)
EFB_KW = {"rate_hz": 100.0, "runs": 6, "settle_s": 5.0, "window_s": 5.0,
          "gradient": C.EFB_TEST_GRADIENT, "gradient_every": 6}


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    jobs = [("efb", s, EFB_KW) for s in EFB_SEEDS]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(kind, pool.submit(C.offline_summary, kind, seed, kw)) for kind, seed, kw in jobs]
        out: dict[str, list[dict]] = {"efb": []}
        for kind, f in futures:
            out[kind].append(f.result())
    for r in out["efb"]:
        print(f"efb seed {r['seed']}: m/m_true - 1 = {r['mass_rel_err']:+.2e}, u_rel = {r['u_mass_rel']:.2e} "
              f"(dC/dz {r['u_a_dcdz_kg'] / r['mass_kg']:.1e}), z = {r['z_score']:+.2f}; kappa / kappa_plant - 1 = "
              f"{r['kappa_rel_err']:+.2e}; {r['wall_s']:.0f} s")
    return out


def _normalized_rms(z: list[float]) -> float:
    return math.sqrt(float(np.mean(np.square(z))))


def test_efb_1_mg_within_3u_in_every_seed(results):
    for r in results["efb"]:
        assert r["exit_status"] == "success"
        assert r["n_trials"] == 5 and r["n_gradients"] == 2
        assert 0 < r["u_mass_rel"] < 1e-4
        assert abs(r["z_score"]) <= 3.0, r
        # the polarity reversal removed the 40 mV surface potential
        assert r["surface_potential_v"] == pytest.approx(0.04, abs=2e-3)


def test_efb_measured_kappa_matches_the_plant_within_its_uncertainty(results):
    """kappa = (dC/dz_before + dC/dz_after) / 4 against the plant's dC/dz(0) / 2; its type A
    uncertainty is in the mass's (u_a_dcdz_kg, the same relative size: the mass is linear in
    kappa)."""
    for r in results["efb"]:
        d, u = np.array(r["dcdz_f_per_m"]), np.array(r["u_dcdz_f_per_m"])
        u_kappa_rel = math.hypot(*u) / d.sum()
        assert abs(r["kappa_rel_err"]) <= 3.0 * u_kappa_rel, r
        assert r["kappa_trial_f_per_m"] == pytest.approx([d.sum() / 4] * 5, rel=1e-15)
        assert r["u_a_dcdz_kg"] / r["mass_kg"] == pytest.approx(u_kappa_rel, rel=0.05)
        assert r["u_a_kg"] == pytest.approx(math.hypot(r["u_a_weighing_kg"], r["u_a_dcdz_kg"]), rel=1e-12)


def test_efb_stated_uncertainty_matches_the_scatter(results):
    z = [r["z_score"] for r in results["efb"]]
    assert 0.5 <= _normalized_rms(z) <= 2.0, z
    err = np.array([r["mass_rel_err"] for r in results["efb"]])
    u = np.array([r["u_mass_rel"] for r in results["efb"]])
    ratio = math.sqrt(float(np.mean(err**2))) / math.sqrt(float(np.mean(u**2)))
    assert 0.5 <= ratio <= 2.0, (err, u)


def test_cli_and_plots(tmp_path, capsys):
    """The offline CLI path end to end on the cheapest plan (EFB: 7 gradient points within
    0.5 mm, 2 weighing runs at 100 Hz), with the JSON and a plot."""
    out = tmp_path / "efb.json"
    rc = C.cli_measure_offline("efb", {"runs": "2", "settle_s": "5", "window_s": "3", "rate_hz": "100",
                                       "gradient.points": "7", "gradient.span_m": "5e-4",
                                       "gradient.settle_s": "1", "gradient.window_s": "1.5"}, 7,
                               str(out), str(tmp_path / "plots"))
    text = capsys.readouterr().out
    assert rc in (0, 1) and "m / m_true - 1" in text and "plot:" in text and "dC/dz = " in text
    assert out.exists() and (tmp_path / "plots" / "efb_mass.png").exists()
    assert C.cli_measure_offline("nope", {}, 1, None, None) == 2
