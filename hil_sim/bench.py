"""Plant-simulation benchmark: simulated seconds per wall second, in-process, default
parameters (10 kHz integration, 1 kHz frames, every noise source on), one long block after a
warm-up (numba compile + caches). ``run()`` returns

* ``sim_nist4_x_realtime`` -- NIST-4 plant, force mode, damping coils and theta-z HV active
* ``sim_efb_x_realtime``   -- EFB plant holding the null voltage
* ``sim_nist4_force_only_x_realtime`` -- NIST-4, force mode, damping relays open, HV off

Best of three timed blocks of ``seconds`` simulated seconds each.
"""

from __future__ import annotations

import time

__all__ = ["run"]


def _rate(plant, act, seconds: float, repeats: int = 3) -> float:
    n = int(round(seconds * plant.params["sim.frame_rate_hz"]))
    plant.run(act, 100, record_truth=False)  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        plant.run(act, n, record_truth=False)
        best = min(best, time.perf_counter() - t0)
    return seconds / best


def run(seconds: float = 20.0) -> dict[str, float]:
    import math

    from .efb import EfbActuators, EfbPlant
    from .nist4 import Nist4Actuators, Nist4Plant

    n4 = Nist4Plant(seed=1)
    c, f = n4.current_to_codes(6.9e-3)
    a4 = Nist4Actuators(main_coarse=c, main_fine=f, main_force_mode=True,
                        damping=(100, -100, 50, 0, -50, 20), damping_enable=True,
                        hv=(8000, 8000, 8000, 8000, 8000, 8000), hv_enable=True)
    efb = EfbPlant(seed=1)
    v = efb.params["capacitor.surface_potential_V"] + math.sqrt(efb.params["linkage.tare_force_N"] / efb.kappa())
    ae = EfbActuators(hv_code=efb.volts_to_code(v), hv_to_main=True, hv_enable=True)
    efb.set_state(v_amp=ae.hv_code * efb._V_per_code)
    n4b = Nist4Plant(seed=2)
    a4b = Nist4Actuators(main_coarse=c, main_fine=f, main_force_mode=True)
    return {
        # full force-mode configuration: main coil current, six damping coils, theta-z HV
        "sim_nist4_x_realtime": _rate(n4, a4, seconds),
        "sim_efb_x_realtime": _rate(efb, ae, seconds),
        # force mode without damping coils and HV plates (the plates cost ~25 %)
        "sim_nist4_force_only_x_realtime": _rate(n4b, a4b, seconds),
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run(), indent=2))
