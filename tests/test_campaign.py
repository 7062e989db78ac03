"""End to end, offline (the real daemons + the simulated plant in process): shortened EFB
weighings recover the 1 mg mass within 3 stated standard uncertainties in every seed, and the
stated uncertainties match the scatter across seeds within a factor of 2 (RMS of the normalized
errors (value - truth) / u between 1/2 and 2).

The seeds run in a pool of two processes (the machine has two cores). Type A uncertainties
only. Per seed: 4 runs of the weighing plan (3 trials, 5 s windows, 200 Hz; ~240 s simulated).

The NIST-4 counterpart (h from a shortened run) is not asserted yet: in some seeds the
velocity-mode Bl reads ~6e-8 high, far outside its type A uncertainty, while the simulator's
true induced voltage equals Bl v to 1e-11; the cause is in the measurement chain and is being
tracked in issue 6."""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from kibble.services import campaign as C

pytestmark = pytest.mark.slow

EFB_SEEDS = (1, 2, 3, 4, 5, 6)
EFB_KW = {"rate_hz": 200.0, "runs": 4, "settle_s": 5.0, "window_s": 5.0}


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    jobs = [("efb", s, EFB_KW) for s in EFB_SEEDS]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(kind, pool.submit(C.offline_summary, kind, seed, kw)) for kind, seed, kw in jobs]
        out: dict[str, list[dict]] = {"efb": []}
        for kind, f in futures:
            out[kind].append(f.result())
    for r in out["efb"]:
        print(f"efb seed {r['seed']}: m/m_true - 1 = {r['mass_rel_err']:+.2e}, u_rel = {r['u_mass_rel']:.2e}, "
              f"z = {r['z_score']:+.2f}, {r['wall_s']:.0f} s")
    return out


def _normalized_rms(z: list[float]) -> float:
    return math.sqrt(float(np.mean(np.square(z))))


def test_efb_1_mg_within_3u_in_every_seed(results):
    for r in results["efb"]:
        assert r["exit_status"] == "success"
        assert r["n_trials"] == 3
        assert 0 < r["u_mass_rel"] < 1e-4
        assert abs(r["z_score"]) <= 3.0, r
        # the polarity reversal removed the 40 mV surface potential
        assert r["surface_potential_v"] == pytest.approx(0.04, abs=2e-3)


def test_efb_stated_uncertainty_matches_the_scatter(results):
    z = [r["z_score"] for r in results["efb"]]
    assert 0.5 <= _normalized_rms(z) <= 2.0, z
    err = np.array([r["mass_rel_err"] for r in results["efb"]])
    u = np.array([r["u_mass_rel"] for r in results["efb"]])
    ratio = math.sqrt(float(np.mean(err**2))) / math.sqrt(float(np.mean(u**2)))
    assert 0.5 <= ratio <= 2.0, (err, u)


def test_cli_and_plots(tmp_path, capsys):
    """The offline CLI path end to end on the cheapest plan (EFB), with the JSON and a plot."""
    out = tmp_path / "efb.json"
    rc = C.cli_measure_offline("efb", {"runs": "2", "settle_s": "5", "window_s": "3"}, 7,
                               str(out), str(tmp_path / "plots"))
    text = capsys.readouterr().out
    assert rc in (0, 1) and "m / m_true - 1" in text and "plot:" in text
    assert out.exists() and (tmp_path / "plots" / "efb_mass.png").exists()
    assert C.cli_measure_offline("nope", {}, 1, None, None) == 2
