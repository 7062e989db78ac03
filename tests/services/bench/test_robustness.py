"""Robustness over plants nobody tuned on (issue 13 point 6): NIST-4 plants drawn, seeded,
inside the tolerance bands of :data:`kibble.services.bench.robustness.BANDS` (Bl +-10 %, wheel
inertia 1/2 .. 1 M R^2, knife-edge stiffness through zero, pendulum frequencies +-20 %, every
noise amplitude x0.5 .. x3), each run closed loop in process with the default tuning: no trip,
the null and every exchange within the bounds stated in that module."""

import pytest

from kibble.hil_sim.params import load_params
from kibble.services.bench import robustness as R

N_PLANTS = 20
SEED = 2013


def test_the_draws_fill_the_bands():
    plants = R.draw_plants(N_PLANTS, SEED)
    assert plants == R.draw_plants(N_PLANTS, SEED)             # seeded
    nominal = load_params("nist4")
    for band in R.BANDS:
        values = nominal[band.name] if isinstance(nominal[band.name], list) else [nominal[band.name]]
        factors = [[d / v for d, v in zip(p[band.name] if isinstance(p[band.name], list)
                                          else [p[band.name]], values)] for p in plants]
        flat = [f for row in factors for f in row]
        assert band.low <= min(flat) and max(flat) <= band.high, band.name
        # spread over most of the band, not bunched at the nominal
        assert max(flat) - min(flat) >= 0.6 * (band.high - band.low), band.name
    stiffness = [p["wheel.knife_stiffness_N_m_per_rad"] for p in plants]
    assert min(stiffness) < 0 < max(stiffness)                 # through zero


@pytest.mark.slow
async def test_the_default_tuning_holds_every_drawn_plant():
    results = await R.run_plants(N_PLANTS, SEED)
    missed = {k: r["missed"] for k, r in enumerate(results) if r["missed"]}
    assert not missed, missed
    assert all(r["exchanges"] == ["aux off", "1 kg on", "1 kg off"] for r in results)
