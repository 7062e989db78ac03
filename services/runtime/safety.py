"""The safety core every actuator service wraps its outputs in (docs/architecture.md section 8).

:class:`ActuatorGuard` is pure (no I/O, no clock of its own): the service feeds it the frame
index k of the hardware clock, the requested outputs and the measured motion, and applies what
:meth:`ActuatorGuard.output` returns. Time is ``k * frame_period_s``, so in lockstep every
timeout counts simulated time and a paused or slow simulation trips nothing.

States (``guard.state``):

``safe``
    Disarmed: outputs ramp to zero at ``safe_slew_per_s`` (they boot at zero) and stay there.
    Requests are checked and remembered but not applied. ``arm()`` leaves it.
``armed``
    Outputs follow the last accepted request, clamped to ``limits`` and slew-limited to
    ``slew_per_s``. A request older than ``stale_after_s`` makes the input *stale*: the output
    is held for ``hold_s`` (a fresh request within the hold resumes bumplessly), then the guard
    drops to ``safe`` and ramps down; it needs a new ``arm()``.
``tripped``
    The excess-motion watchdog fired (RMS of a watched DOF over ``watchdog_window_s`` above its
    limit) or :meth:`trip` was called: outputs ramp to zero and stay there until ``reset()``,
    which returns to ``safe`` (an ``arm()`` is still needed).

A rejected request (wrong length, non-finite, beyond the limits) raises ``ValueError`` with a
text naming the channel, the value and the limit; the last good request stays in force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

GuardState = Literal["safe", "armed", "tripped"]

_ABS_MAX = 1e150
"""Cap of one motion sample's magnitude, so a huge reading trips without overflowing the window."""
_U = 2.0 ** -53
"""Unit roundoff of float64."""
_U2 = 2.3e-16
"""Bound (> 2 u) on the rounding error of one running-sum update, per unit of its results."""


@dataclass
class GuardConfig:
    """Limits and timing of one actuator's guard. Arrays are per output channel.

    :param names: channel names, used in error texts, e.g. ``("main_coil_current_a",)``.
    :param limits: symmetric output limit per channel (output units, > 0).
    :param slew_per_s: slew limit while armed (output units per second, > 0).
    :param safe_slew_per_s: ramp rate toward zero when going safe or tripped.
    :param frame_period_s: the hardware frame period (s).
    :param stale_after_s: a request older than this is stale (s).
    :param hold_s: how long a stale output is held before ramping to zero (s; 0: at once).
    :param watch_names: names of the watched motion DOF (may be empty).
    :param watchdog_rms: RMS limit per watched DOF (their units).
    :param watchdog_window_s: RMS window (s).
    """

    names: Sequence[str]
    limits: Sequence[float]
    slew_per_s: Sequence[float]
    safe_slew_per_s: Sequence[float]
    frame_period_s: float
    stale_after_s: float
    hold_s: float = 0.0
    watch_names: Sequence[str] = ()
    watchdog_rms: Sequence[float] = ()
    watchdog_window_s: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.names)
        for label in ("limits", "slew_per_s", "safe_slew_per_s"):
            arr = np.asarray(getattr(self, label), dtype=float)
            if arr.shape != (n,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                raise ValueError(f"guard {label} must be {n} finite positive numbers, got {arr.tolist()}")
        if len(self.watchdog_rms) != len(self.watch_names):
            raise ValueError("guard watchdog_rms needs one limit per watched DOF")
        if not self.frame_period_s > 0 or not self.stale_after_s > 0 or self.hold_s < 0:
            raise ValueError("guard timing must be positive (frame period, stale time) and hold >= 0")
        if not self.watchdog_window_s >= self.frame_period_s:
            raise ValueError("guard watchdog window must be at least one frame")


@dataclass
class ActuatorGuard:
    """Arm/disarm, limits, slew, stale-input hold and ramp, excess-motion watchdog.

    The per-frame methods work on plain Python floats (the channels are few, and a numpy call
    costs about a microsecond each); the arithmetic is the same IEEE operations in the same
    order as the array form, so the outputs are the same to the bit. The watchdog keeps a
    running sum of each DOF's window with a rigorous bound on its rounding error: while every
    DOF is clearly below its limit (by far more than that bound) nothing is summed; otherwise
    the window is summed exactly as before, so a trip and its reason are the same too.
    """

    config: GuardConfig
    state: GuardState = field(default="safe", init=False)
    trip_reason: str = field(default="", init=False)
    stale: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        c = self.config
        n = len(c.names)
        self._n = n
        self._limits = np.asarray(c.limits, dtype=float)
        self._lim = self._limits.tolist()
        self._stp = (np.asarray(c.slew_per_s, dtype=float) * c.frame_period_s).tolist()
        self._sstp = (np.asarray(c.safe_slew_per_s, dtype=float) * c.frame_period_s).tolist()
        self._out = [0.0] * n
        self._req: list[float] = [0.0] * n
        self._req_arr: np.ndarray | None = None
        """An array request is kept as the array itself (as ``np.asarray`` keeps it)."""
        self._request_frame: int | None = None
        self._stale_since: int | None = None
        n_win = max(1, int(round(c.watchdog_window_s / c.frame_period_s)))
        n_dof = len(c.watch_names)
        self._n_win = n_win
        self._n_dof = n_dof
        self._wbuf = [0.0] * (n_win * n_dof)
        """The window, row-major (n_win, n_dof): squared, capped motion samples."""
        self._win_i = 0
        self._win_n = 0
        self._rms_limit = np.asarray(c.watchdog_rms, dtype=float)
        self._wsum = [0.0] * n_dof
        self._werr = [0.0] * n_dof
        self._wsync = 0
        # "clearly below": running sum + its error bound under limit^2 n_win (1 - rel), rel far
        # above the rounding of any summation order of n_win terms, the division and the sqrt
        rel = 1e-6 + 8.0 * n_win * _U
        self._wthr = [lim * lim * n_win * (1.0 - rel) if 0.0 < lim <= math.inf else -math.inf
                      for lim in self._rms_limit.tolist()]

    @property
    def out(self) -> np.ndarray:
        """The outputs applied last (a new array)."""
        return np.array(self._out, dtype=float)

    @out.setter
    def out(self, value: Sequence[float]) -> None:
        self._out = np.asarray(value, dtype=float).tolist()

    @property
    def request_values(self) -> np.ndarray:
        """The last accepted request."""
        if self._req_arr is not None:
            return self._req_arr
        return np.array(self._req, dtype=float)

    # ------------------------------------------------------------------ operator actions

    def arm(self) -> None:
        """Start following requests (from ``safe`` only; a trip needs ``reset`` first)."""
        if self.state == "tripped":
            raise ValueError(f"tripped ({self.trip_reason}): reset before arming")
        self.state = "armed"
        self.stale = False
        self._stale_since = None

    def disarm(self) -> None:
        if self.state == "armed":
            self.state = "safe"

    def trip(self, reason: str) -> None:
        self.state = "tripped"
        self.trip_reason = reason

    def reset(self) -> None:
        """Clear a trip and the watchdog history; the guard is ``safe`` (disarmed) after."""
        if self.state == "tripped":
            self.state = "safe"
        self.trip_reason = ""
        self._wbuf = [0.0] * (self._n_win * self._n_dof)
        self._wsum = [0.0] * self._n_dof
        self._werr = [0.0] * self._n_dof
        self._wsync = 0
        self._win_n = 0

    # ------------------------------------------------------------------ per frame

    def request(self, frame: int, values: Sequence[float] | np.ndarray) -> None:
        """Accept a requested output vector for ``frame``; ``ValueError`` if any is bad."""
        arr = None
        vals: Sequence[float] | None
        if type(values) is list or type(values) is tuple:
            vals = values
            for v in vals:
                if type(v) is not float:
                    vals = None
                    break
            if vals is not None and len(vals) != self._n:
                vals = None
        else:
            vals = None
        if vals is None:
            arr = np.asarray(values, dtype=float)
            names = self.config.names
            if arr.shape != self._limits.shape:
                raise ValueError(f"expected {len(names)} values ({', '.join(names)}), got {arr.size}")
            vals = arr.tolist()
        lim = self._lim
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise ValueError(f"{self.config.names[i]}: {v} is not finite")
            if abs(v) > lim[i]:
                raise ValueError(f"{self.config.names[i]}: {v:.6g} is beyond the limit +-{lim[i]:.6g}")
        self._req_arr = arr  # an array request is kept as np.asarray gave it (it may be the caller's)
        if arr is None:
            self._req = list(vals)
        self._request_frame = frame

    def observe(self, motion: Sequence[float]) -> str | None:
        """Feed one frame of the watched motion; trips and returns the reason on excess RMS.

        A non-finite reading trips at once (the sensor can no longer be trusted).
        """
        n_dof = self._n_dof
        if not n_dof:
            return None
        vals = None
        if type(motion) is tuple or type(motion) is list:
            if len(motion) == n_dof:
                vals = motion
                for v in vals:
                    if type(v) is not float:
                        vals = None
                        break
        sq: list[float] | None = None
        if vals is None:
            m = np.asarray(motion, dtype=float)
            if np.all(np.isfinite(m)):
                row = np.zeros(n_dof)
                row[...] = np.minimum(np.abs(m), _ABS_MAX) ** 2  # broadcasts (or fails) as before
                sq = row.tolist()
            else:
                bad = m.tolist()
        else:
            for v in vals:
                if not math.isfinite(v):
                    bad = list(vals)
                    break
            else:
                sq = []
                for v in vals:
                    a = abs(v)
                    if a > _ABS_MAX:
                        a = _ABS_MAX
                    sq.append(a * a)
        if sq is None:
            if self.state == "armed":
                reason = f"non-finite motion reading {bad}"
                self.trip(reason)
                return reason
            return None
        # ---- the window (ring) and its running sums
        buf, sums, errs = self._wbuf, self._wsum, self._werr
        base = self._win_i * n_dof
        for j in range(n_dof):
            s1 = sums[j] + sq[j]
            s2 = s1 - buf[base + j]
            buf[base + j] = sq[j]
            sums[j] = s2
            errs[j] += _U2 * (abs(s1) + abs(s2))
        n_win = self._n_win
        self._win_i = (self._win_i + 1) % n_win
        if self._win_n < n_win:
            self._win_n += 1
        self._wsync += 1
        if self._wsync >= n_win:
            self._resync()
        if self._win_n < n_win or self.state != "armed":
            return None  # (not armed: the old code found any excess but returned None)
        thr = self._wthr
        for j in range(n_dof):
            if not sums[j] + errs[j] < thr[j]:
                break
        else:
            return None
        # ---- near or over a limit: the RMS exactly as it always was computed
        win = np.array(buf, dtype=float).reshape(n_win, n_dof)
        rms = np.sqrt(win.sum(axis=0) / self._win_n)
        over = np.nonzero(rms > self._rms_limit)[0]
        if over.size == 0:
            return None
        i = int(over[0])
        reason = (f"{self.config.watch_names[i]} RMS {rms[i]:.4g} over "
                  f"{self.config.watchdog_window_s:g} s exceeds {self._rms_limit[i]:.4g}")
        self.trip(reason)
        return reason

    def _resync(self) -> None:
        """Recompute the running sums (correctly rounded) so their error bound stays small."""
        n_dof, buf = self._n_dof, self._wbuf
        for j in range(n_dof):
            try:
                s = math.fsum(buf[j::n_dof])
            except OverflowError:
                s = math.inf
            self._wsum[j] = s
            self._werr[j] = _U2 * s
        self._wsync = 0

    def output(self, frame: int) -> np.ndarray:
        """The outputs to apply at ``frame`` (always finite and within the limits).

        A request tagged after ``frame`` counts as made at ``frame``: its age runs from now, so
        no tag from the future keeps the input fresh."""
        c = self.config
        if self.state == "armed":
            if self._request_frame is not None and self._request_frame > frame:
                self._request_frame = frame
            age_s = math.inf if self._request_frame is None else (frame - self._request_frame) * c.frame_period_s
            if age_s > c.stale_after_s:
                if self._stale_since is None:
                    self._stale_since = frame
                self.stale = True
                if (frame - self._stale_since) * c.frame_period_s >= c.hold_s:
                    self.state = "safe"
                else:
                    return np.array(self._out, dtype=float)
            else:
                self.stale = False
                self._stale_since = None
                req = self._req if self._req_arr is None else self._req_arr.tolist()
                new = []
                for r, o, lim, step in zip(req, self._out, self._lim, self._stp):
                    # out + np.clip(np.clip(request, -limit, limit) - out, -step, step), where
                    # np.clip(x, lo, hi) is min(max(x, lo), hi) with NaN kept and the bound
                    # taken on a tie: exactly the two comparisons below
                    if r <= -lim:
                        r = -lim
                    if r >= lim:
                        r = lim
                    d = r - o
                    if d <= -step:
                        d = -step
                    if d >= step:
                        d = step
                    new.append(o + d)
                self._out = new
                return np.array(new, dtype=float)
        new = []
        for o, step in zip(self._out, self._sstp):
            d = o                   # out - np.clip(out, -safe_step, safe_step)
            if d <= -step:
                d = -step
            if d >= step:
                d = step
            new.append(o - d)
        self._out = new
        return np.array(new, dtype=float)

    @property
    def at_zero(self) -> bool:
        return not any(self._out)

    @property
    def live(self) -> bool:
        """Whether the output stage should be enabled: armed, or still ramping down."""
        return self.state == "armed" or not self.at_zero


def pressure_interlock(pressure_pa: float, limit_pa: float) -> str | None:
    """Why high voltage is not allowed at ``pressure_pa`` (corona region), or None."""
    if not pressure_pa < limit_pa:
        return f"pressure {pressure_pa:.3g} Pa is not below the HV limit {limit_pa:.3g} Pa"
    return None
