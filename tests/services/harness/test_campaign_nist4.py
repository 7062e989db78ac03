"""End to end, offline (the real daemons + the simulated NIST-4 in process): a shortened run
(velocity set, force set, velocity set) recovers h = 6.62607015e-34 J s within 3 stated
standard uncertainties in every seed, and the stated uncertainties match the scatter across
seeds within a factor of 2.

What the simulator gives the analysis is only what a real run gives it: DAQ frames (DVM,
interferometer, magnet thermometer) and the plan's events; the true mass and g define Bl_F as
the mass calibration and the gravimeter would (``services/harness/campaign.py``). The seeds run in a
pool of two processes (the machine has two cores). Type A uncertainties only. Per seed: 10
sweeps of 10 mm per velocity set, 9 weighings of 5 s, 200 Hz, ~420 s simulated. Four seeds
keep ``make test`` under 15 minutes; 12 more (11-16, 21-26) were checked once by hand: RMS
z 1.18, largest |z| 2.4, RMS error / RMS u 0.99."""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from kibble.services.harness import campaign as C

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3, 4)
# quiet: one triplet's stated u is its regression's, which cannot show the published profile's
# set-to-set trajectory error (one draw per velocity set, common to its sweeps); the paper
# states the one-triplet scatter from many triplets (Fig. 14), as kibble bench --only fidelity
# measures it. Here the analysis's uncertainty statement is checked against the scatter it can see.
KW = {"rate_hz": 200.0, "velocity": C.NIST4_TEST_VELOCITY, "force": C.NIST4_TEST_FORCE,
      "servo": C.NIST4_TEST_SERVO, "noise": "quiet"}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        out = list(pool.map(C.offline_summary, ["nist4"] * len(SEEDS), SEEDS, [KW] * len(SEEDS)))
    for r in out:
        print(f"nist4 seed {r['seed']}: h/h_SI - 1 = {r['h_rel_err']:+.2e}, u_rel = {r['u_h_rel']:.2e} "
              f"(master {r['u_master_rel']:.1e}), z = {r['z_score']:+.2f}, {r['wall_s']:.0f} s")
    return out


def test_h_within_3u_in_every_seed(results):
    for r in results:
        assert r["exit_status"] == "success"
        assert r["n_triplets"] == 1
        assert r["n_sweeps"] == 2 * C.NIST4_TEST_VELOCITY["sweeps"]
        assert r["n_weighings"] == C.NIST4_TEST_FORCE["weighings"]
        # a type A uncertainty of the size the noise of a 7-minute run implies, not a padded one
        assert 5e-9 < r["u_h_rel"] < 1e-7, r
        assert abs(r["z_score"]) <= 3.0, r


def test_stated_uncertainty_matches_the_scatter(results):
    err = np.array([r["h_rel_err"] for r in results])
    u = np.array([r["u_h_rel"] for r in results])
    ratio = math.sqrt(float(np.mean(err**2))) / math.sqrt(float(np.mean(u**2)))
    assert 0.5 <= ratio <= 2.0, (err, u)
