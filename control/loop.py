"""One control loop per axis: filter module on the measurement, then the PID (numba kernel).

Signal path per axis ``a`` and sample ``k`` (``io[n, n_axes, NIO]``, layout of
``kibble.control.pid``)::

    y_f = filter_module_a(io[k, a, IO_Y], io[k, a, IO_EXC])    notches, low-pass, lead/lag, gain
    io[k, a, IO_U] = pid_a(io[k, a, IO_R], y_f, io[k, a, IO_FF])

The filter module shapes the measurement (so notches and low-passes also act on the derivative
term), and the PID's output clamp is the actuator limit seen by its anti-windup. The excitation
is injected at the filter-module input. ``kibble.control.design.kernel_tfs`` gives the
equivalent transfer functions.
"""

from __future__ import annotations

import math

from numba import njit

from .filters import FM_FLAGS, fm_sample
from .pid import IO_EXC, IO_FF, IO_R, IO_U, IO_Y, pid_sample

__all__ = ["loop_run"]


@njit(cache=True, error_model="numpy")
def loop_run(pid_par, pid_st, fm_par, fm_sos, fm_st, io):
    """Run ``n`` samples of ``n_axes`` loops (filter module + PID) in one compiled call.

    ``pid_par[n_axes, NPAR]``, ``pid_st[n_axes, NST]``, ``fm_par[n_axes, NFP]``,
    ``fm_sos[n_axes, n_stages, 5]``, ``fm_st[n_axes, NFS + 2 n_stages]`` (states updated in
    place); ``io[n, n_axes, NIO]``: reads ``IO_R`` (setpoint), ``IO_Y`` (measurement), ``IO_FF``
    (feedforward, output units), ``IO_EXC`` (excitation, measurement units), writes ``IO_U``
    (output, e.g. A). A filter module that holds (non-finite input or overflow) makes the PID hold too."""
    for a in range(io.shape[1]):
        for k in range(io.shape[0]):
            x = io[k, a, IO_Y]
            e = io[k, a, IO_EXC]
            yf = fm_sample(fm_par, fm_sos, fm_st, a, x, e)
            if fm_st[a, FM_FLAGS] != 0.0:
                yf = math.nan
            io[k, a, IO_U] = pid_sample(pid_par, pid_st, a, io[k, a, IO_R], yf, io[k, a, IO_FF])
