"""Clock bookkeeping of the HIL simulator on the bus (pure logic, no I/O; see ``server.py``).

- :class:`RealtimeSchedule`: the drift-free frame schedule of ``--clock realtime``: deadline k is
  ``t0 + k * period`` on the monotonic clock, never "now + period", so late wake-ups do not
  accumulate; a lag of more than ``max_lag_s`` restarts the schedule (counted as a slip).
- :class:`LockstepGate`: which actuator devices are registered, which of them have answered the
  current frame, misses (a timeout counted per device) and dropping a device after
  ``drop_after`` consecutive misses.
- :class:`LatencyTracker`: publish time of each sensor frame and, per device, the latency from
  publishing frame k to receiving that device's first command tagged k (p50/p99 over a window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RealtimeSchedule", "LockstepGate", "LatencyTracker", "LatencySummary"]


class RealtimeSchedule:
    """Absolute frame deadlines ``t0 + k * period_s`` (monotonic seconds)."""

    def __init__(self, period_s: float, max_lag_s: float = 0.1) -> None:
        if not period_s > 0:
            raise ValueError(f"frame period must be > 0 s, got {period_s!r}")
        self.period_s = period_s
        self.max_lag_s = max(max_lag_s, 2 * period_s)
        self.t0 = 0.0
        self.k = 0
        self.slips = 0
        """How often the schedule fell more than ``max_lag_s`` behind and was restarted."""
        self.late = 0
        """Frames started more than one period after their deadline."""

    def start(self, now_s: float) -> None:
        """(Re)start the schedule: the next deadline is ``now_s``."""
        self.t0 = now_s
        self.k = 0

    @property
    def deadline_s(self) -> float:
        return self.t0 + self.k * self.period_s

    def frame_started(self, now_s: float) -> None:
        """Record that the frame due at :attr:`deadline_s` started at ``now_s``; move on."""
        lag = now_s - self.deadline_s
        if lag > self.period_s:
            self.late += 1
        self.k += 1
        if lag > self.max_lag_s:
            self.slips += 1
            self.start(now_s + self.period_s)


@dataclass
class LockstepGate:
    """Registration and answers of the lockstep clock.

    A device is *registered* by :meth:`register` (its first command, or a ``register`` control
    command). :meth:`open` starts frame k: every device registered at that moment must answer
    it. :meth:`answer` with the frame tag of a command returns True when that was the last
    missing answer. :meth:`timeout` counts a miss for every device still missing, drops a
    device after ``drop_after`` consecutive misses (0: never) and returns (missed, dropped).
    """

    drop_after: int = 3
    registered: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    frame: int = -1
    misses: dict[str, int] = field(default_factory=dict)
    consecutive: dict[str, int] = field(default_factory=dict)
    answered_through: dict[str, int] = field(default_factory=dict)
    """Per device, the last frame its commands answer (a decimated loop's command tagged k
    with ``hold_frames`` n answers k .. k + n - 1): it is not waited for until after it."""

    def register(self, device: str) -> bool:
        """Register ``device``; True if it was not registered before. It is waited for from
        the next :meth:`open` on."""
        if device in self.registered:
            return False
        self.registered.add(device)
        self.consecutive[device] = 0
        self.misses.setdefault(device, 0)
        return True

    def unregister(self, device: str) -> bool:
        """Stop waiting for ``device`` (also for the current frame); True if it was registered."""
        if device not in self.registered:
            return False
        self.registered.discard(device)
        self.pending.discard(device)
        return True

    def open(self, frame: int) -> None:
        self.frame = frame
        through = self.answered_through
        self.pending = {d for d in self.registered if through.get(d, -1) < frame}

    @property
    def complete(self) -> bool:
        """Every device registered at :meth:`open` has answered (or was unregistered)."""
        return not self.pending

    def answer(self, device: str, frame: int, hold_frames: int = 1) -> bool:
        """A command of ``device`` tagged ``frame`` (answering ``hold_frames`` frames from
        there) arrived; True if it completed the open frame."""
        if frame != self.frame or device not in self.pending:
            return False
        self.answered_through[device] = frame + hold_frames - 1
        self.pending.discard(device)
        self.consecutive[device] = 0
        return not self.pending

    def timeout(self) -> tuple[list[str], list[str]]:
        missed = sorted(self.pending)
        dropped = []
        for device in missed:
            self.misses[device] = self.misses.get(device, 0) + 1
            self.consecutive[device] = self.consecutive.get(device, 0) + 1
            if self.drop_after and self.consecutive[device] >= self.drop_after:
                self.registered.discard(device)
                dropped.append(device)
        self.pending.clear()
        return missed, dropped


@dataclass(frozen=True)
class LatencySummary:
    """Latency percentiles (ms) over the samples in the window; NaN-free: 0.0 when empty."""

    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms}


class LatencyTracker:
    """Sensor-frame-to-command latency per device.

    :meth:`published` stores the monotonic publish time of frame k in a ring of ``ring``
    frames; :meth:`answered` records, for the first command of a device tagged k, the time
    since frame k was published (commands tagged with frames older than the ring, or a second
    command for the same frame, are not counted). The last ``window`` samples are kept per device.
    """

    def __init__(self, ring: int = 4096, window: int = 20000) -> None:
        self._ring = ring
        self._t_pub = np.full(ring, np.nan)
        self._k_pub = np.full(ring, -1, dtype=np.int64)
        self._last_frame: dict[str, int] = {}
        self._window = window
        self._samples: dict[str, deque[float]] = {}

    def published(self, frame: int, t_s: float) -> None:
        i = frame % self._ring
        self._t_pub[i] = t_s
        self._k_pub[i] = frame

    def answered(self, device: str, frame: int, t_s: float) -> float | None:
        """Record the answer; return its latency (s) or None when it is not counted."""
        if frame < 0 or self._last_frame.get(device, -1) >= frame:
            return None
        i = frame % self._ring
        if self._k_pub[i] != frame:
            return None
        self._last_frame[device] = frame
        latency = t_s - float(self._t_pub[i])
        buf = self._samples.get(device)
        if buf is None:
            buf = self._samples[device] = deque(maxlen=self._window)
        buf.append(latency)
        return latency

    def reset(self) -> None:
        """Forget the samples (not the publish times)."""
        self._samples.clear()

    @staticmethod
    def _summary(values: np.ndarray) -> LatencySummary:
        if values.size == 0:
            return LatencySummary(0, 0.0, 0.0, 0.0)
        p50, p99 = np.percentile(values, [50.0, 99.0]) * 1e3
        return LatencySummary(int(values.size), float(p50), float(p99), float(values.max() * 1e3))

    def summary(self, device: str | None = None) -> LatencySummary:
        """Percentiles for one device, or over every device's samples (``device=None``)."""
        if device is not None:
            return self._summary(np.fromiter(self._samples.get(device, ()), dtype=float))
        parts = [np.fromiter(buf, dtype=float) for buf in self._samples.values()]
        return self._summary(np.concatenate(parts) if parts else np.empty(0))

    def devices(self) -> list[str]:
        return sorted(self._samples)
