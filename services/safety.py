"""The safety core every actuator service wraps its outputs in (DESIGN.md section 8).

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
    """Arm/disarm, limits, slew, stale-input hold and ramp, excess-motion watchdog."""

    config: GuardConfig
    state: GuardState = field(default="safe", init=False)
    trip_reason: str = field(default="", init=False)
    stale: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        c = self.config
        self._limits = np.asarray(c.limits, dtype=float)
        self._step = np.asarray(c.slew_per_s, dtype=float) * c.frame_period_s
        self._safe_step = np.asarray(c.safe_slew_per_s, dtype=float) * c.frame_period_s
        self.out = np.zeros(len(c.names))
        self.request_values = np.zeros(len(c.names))
        self._request_frame: int | None = None
        self._stale_since: int | None = None
        n_win = max(1, int(round(c.watchdog_window_s / c.frame_period_s)))
        self._win = np.zeros((n_win, len(c.watch_names)))
        self._win_i = 0
        self._win_n = 0
        self._rms_limit = np.asarray(c.watchdog_rms, dtype=float)

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
        self._win[:] = 0.0
        self._win_n = 0

    # ------------------------------------------------------------------ per frame

    def request(self, frame: int, values: Sequence[float]) -> None:
        """Accept a requested output vector for ``frame``; ``ValueError`` if any is bad."""
        arr = np.asarray(values, dtype=float)
        names = self.config.names
        if arr.shape != self._limits.shape:
            raise ValueError(f"expected {len(names)} values ({', '.join(names)}), got {arr.size}")
        for i, v in enumerate(arr):
            if not math.isfinite(v):
                raise ValueError(f"{names[i]}: {v} is not finite")
            if abs(v) > self._limits[i]:
                raise ValueError(f"{names[i]}: {v:.6g} is beyond the limit +-{self._limits[i]:.6g}")
        self.request_values = arr
        self._request_frame = frame

    def observe(self, motion: Sequence[float]) -> str | None:
        """Feed one frame of the watched motion; trips and returns the reason on excess RMS.

        A non-finite reading trips at once (the sensor can no longer be trusted).
        """
        if not self.config.watch_names:
            return None
        m = np.asarray(motion, dtype=float)
        if not np.all(np.isfinite(m)):
            reason = f"non-finite motion reading {m.tolist()}"
        else:
            self._win[self._win_i] = np.minimum(np.abs(m), _ABS_MAX) ** 2
            self._win_i = (self._win_i + 1) % len(self._win)
            self._win_n = min(self._win_n + 1, len(self._win))
            if self._win_n < len(self._win):
                return None
            rms = np.sqrt(self._win.sum(axis=0) / self._win_n)
            over = np.nonzero(rms > self._rms_limit)[0]
            if over.size == 0:
                return None
            i = int(over[0])
            reason = (f"{self.config.watch_names[i]} RMS {rms[i]:.4g} over "
                      f"{self.config.watchdog_window_s:g} s exceeds {self._rms_limit[i]:.4g}")
        if self.state == "armed":
            self.trip(reason)
            return reason
        return None

    def output(self, frame: int) -> np.ndarray:
        """The outputs to apply at ``frame`` (always finite and within the limits)."""
        c = self.config
        if self.state == "armed":
            age_s = math.inf if self._request_frame is None else (frame - self._request_frame) * c.frame_period_s
            if age_s > c.stale_after_s:
                if self._stale_since is None:
                    self._stale_since = frame
                self.stale = True
                if (frame - self._stale_since) * c.frame_period_s >= c.hold_s:
                    self.state = "safe"
                else:
                    return self.out.copy()
            else:
                self.stale = False
                self._stale_since = None
                target = np.clip(self.request_values, -self._limits, self._limits)
                self.out = self.out + np.clip(target - self.out, -self._step, self._step)
                return self.out.copy()
        self.out = self.out - np.clip(self.out, -self._safe_step, self._safe_step)
        return self.out.copy()

    @property
    def at_zero(self) -> bool:
        return not np.any(self.out)

    @property
    def live(self) -> bool:
        """Whether the output stage should be enabled: armed, or still ramping down."""
        return self.state == "armed" or not self.at_zero


def pressure_interlock(pressure_pa: float, limit_pa: float) -> str | None:
    """Why high voltage is not allowed at ``pressure_pa`` (corona region), or None."""
    if not pressure_pa < limit_pa:
        return f"pressure {pressure_pa:.3g} Pa is not below the HV limit {limit_pa:.3g} Pa"
    return None
