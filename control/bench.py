"""Control-kernel benchmark behind ``kibble bench --only control``. ``run()`` returns (ns):

* ``pid_ns_per_axis_sample`` -- ``pid_run`` on a block of 1000 samples x 6 axes (PID with
  derivative filter, limits, slew), per axis-sample;
* ``sos_ns_per_sample``      -- one second-order section inside the filter module
  (``fm_run``, 1 module, 8 engaged stages, 10000 samples), per stage-sample;
* ``pid_call_overhead_ns``   -- one single-sample ``pid_run`` call for 6 axes from Python;
* ``loop_ns_per_axis_sample`` -- ``loop_run`` (filter module with 4 stages + PID), block of
  1000 x 6, per axis-sample;
* ``loop_call_overhead_ns``  -- one single-sample ``loop_run`` call for 6 axes from Python.

Warm-up (compile / load the numba cache) first, then best of ``repeats``.
"""

from __future__ import annotations

import time

import numpy as np

from . import filters as F
from . import pid as P
from .loop import loop_run

__all__ = ["run"]


def _best_ns(fn, number: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / number)
    return best


def _setup(n: int, n_axes: int, n_stages: int):
    dt = 1e-3
    par = P.pid_params(n_axes, dt_s=dt, kp=2.0, ki_per_s=5.0, kd_s=0.02, tf_s=0.005, u_min=-1.0,
                       u_max=1.0, slew_per_s=1e3)
    st = P.pid_state(par)
    sos = np.stack([F.lowpass_sos(100.0 + 10 * i, 0.8, 1 / dt) if i % 2 == 0
                    else F.notch_sos(20.0 + 5 * i, 5.0, 1 / dt) for i in range(n_stages)])
    fm_par = F.fm_params(n_axes, dt_s=dt, mask=2 ** n_stages - 1)
    fm_sos = np.ascontiguousarray(np.broadcast_to(sos, (n_axes,) + sos.shape))
    fm_st = F.fm_state(fm_par, n_stages)
    io = P.io_block(n, n_axes)
    rng = np.random.default_rng(0)
    io[:, :, P.IO_R] = 0.1
    io[:, :, P.IO_Y] = 0.01 * rng.standard_normal((n, n_axes))
    return par, st, fm_par, fm_sos, fm_st, io


def run(repeats: int = 7) -> dict[str, float]:
    par, st, fm_par, fm_sos, fm_st, io = _setup(1000, 6, 4)
    pid_block = _best_ns(lambda: P.pid_run(par, st, io), 20, repeats) / io[:, :, 0].size
    loop_block = _best_ns(lambda: loop_run(par, st, fm_par, fm_sos, fm_st, io), 20, repeats) / io[:, :, 0].size
    one = io[:1].copy()
    pid_call = _best_ns(lambda: P.pid_run(par, st, one), 20000, repeats)
    loop_call = _best_ns(lambda: loop_run(par, st, fm_par, fm_sos, fm_st, one), 20000, repeats)
    _, _, fp8, fs8, fst8, io8 = _setup(10000, 1, 8)
    sos = _best_ns(lambda: F.fm_run(fp8, fs8, fst8, io8), 5, repeats) / (io8.shape[0] * 8)
    return {
        "pid_ns_per_axis_sample": pid_block,
        "sos_ns_per_sample": sos,
        "pid_call_overhead_ns": pid_call,
        "loop_ns_per_axis_sample": loop_block,
        "loop_call_overhead_ns": loop_call,
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run(), indent=2))
