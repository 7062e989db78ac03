"""The real-time receive path shared by the daemons and the simulator (docs/architecture.md section 7a).

Sans-I/O: the transport (:func:`kibble.bus_schema.transport.deliver_directly`) hands every
message of one socket read to :meth:`FrameIntake.offer` and calls :meth:`FrameIntake.take` at
the end of the read; this module decides what is acted on and measures how late it was.

- :class:`FrameIntake`: *newest frame wins*. Within one receive batch only the newest message of
  each frame topic is kept; the older ones are counted as skipped, never acted on. A daemon that
  falls behind therefore catches up in one batch instead of working through a backlog of stale
  frames. Other topics (commands, status) pass straight through, in order.
- :class:`FrameTiming`: the honest telemetry of a loop over one heartbeat interval: thread CPU
  per frame (from :func:`time.thread_time_ns`, measured from the socket read to the last
  publish of the batch), the age of every frame acted on (receive time minus the publisher's
  monotonic stamp; same host), skipped frames, late frames (older than ``late_after_frames``
  periods), overruns (a frame whose CPU exceeded its period), the largest batch and the process
  CPU load. :meth:`FrameTiming.snapshot` returns a :class:`~kibble.bus_schema.messages.Timing`
  and starts a new interval; the counters run for the whole session and saturate.
- :class:`FrameClock`: frame tags checked, not trusted. A loop's clock follows the frame tags
  of one stream only as far as they are plausible (a few frames, plus what the wall clock
  allows in realtime; never back within a session), and maps the tags of its inputs onto its
  own count, which never goes back and never stops for a tag.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import time
from typing import Any, Coroutine, Iterable

import numpy as np

from kibble.bus_schema.messages import COUNTER_MAX, Timing

__all__ = ["FrameIntake", "FrameTiming", "FrameClock", "saturating_add", "COUNTER_MAX",
           "SLACK_FRAMES", "RESYNC_FRAMES", "LOCKSTEP_MAX_HZ", "cannot_keep_up",
           "precise_event_loop", "run"]


def saturating_add(value: int, increment: int) -> int:
    """``value + increment``, never beyond :data:`COUNTER_MAX` nor below 0."""
    return max(0, min(COUNTER_MAX, value + increment))


class FrameIntake:
    """Conflates each receive batch to the newest message per frame topic.

    ::

        intake = FrameIntake({"kb/nist4/hw/sensors", "kb/nist4/daq/frame"})
        for topic, payload in batch:
            if not intake.offer(topic, payload):
                handle_now(topic, payload)           # not a frame topic: in order, at once
        for topic, payloads in intake.take():        # per topic, in order of the newest arrival
            for i in range(len(payloads) - 1, -1, -1):   # newest first
                if act_on(topic, payloads[i]):       # False: invalid, rejected; try the one before
                    intake.skip(i)                   # the older ones are never looked at
                    break

    A malformed frame therefore never hides a valid one that came before it in the same batch
    (a spoofer publishing garbage after every frame cannot starve the loop), and every frame
    is either acted on, rejected or counted as skipped.
    """

    __slots__ = ("frame_topics", "_held", "skipped")

    def __init__(self, frame_topics: Iterable[str] = ()) -> None:
        self.frame_topics = frozenset(frame_topics)
        self._held: dict[str, list[bytes]] = {}
        self.skipped = 0
        """Frames never looked at because a newer one of the same topic came in the same
        batch (this session)."""

    def offer(self, topic: str, payload: bytes) -> bool:
        """Hold a frame until :meth:`take` (True), or False if ``topic`` is not a frame topic."""
        if topic not in self.frame_topics:
            return False
        held = self._held
        queue = held.pop(topic, None)
        if queue is None:
            queue = [payload]
        else:
            queue.append(payload)
        held[topic] = queue  # re-inserted: the order is that of the newest arrivals
        return True

    def take(self) -> list[tuple[str, list[bytes]]]:
        """The held frames per topic (oldest to newest), topics in order of their newest
        arrival; the intake is empty after."""
        if not self._held:
            return []
        out = list(self._held.items())
        self._held.clear()
        return out

    def skip(self, n: int) -> None:
        """Count ``n`` frames as skipped."""
        self.skipped = saturating_add(self.skipped, n)


SLACK_FRAMES = 4
"""How far a frame tag may advance at once with no wall time to allow for it (a lost frame,
frames conflated in one read), and how far an input's tag may lead its loop's clock (a frame
passed in process may overtake the clock frame on the socket)."""
RESYNC_FRAMES = 3
"""Rejected clock frames in a row that agree with one another after which the clock follows
them: the stream itself moved (a restart that named no new session, a jump while this loop was
away); one message never moves the clock that way."""
REALTIME_LATE_S = 0.1
"""How late a realtime publisher may publish a frame: the simulator restarts its schedule once
it is more than max(0.1 s, 2 periods) behind (hil_sim.clock.RealtimeSchedule), so the frames
it owes until then may come in a burst, stamped close together."""
LOCKSTEP_MAX_HZ = 20_000.0
"""The fastest a lockstep simulator publishes frames (per wall second): each waits for its
devices' answers over the broker, a round trip of 0.6-0.9 ms here (docs/architecture.md section
3); ten times the fastest round trip."""


class FrameClock:
    """A loop's frame clock from the tags of one frame stream: checked, not trusted.

    ::

        clock = FrameClock(1e-3, realtime=True)
        why = clock.advance(msg.frame, msg.session, msg.t_mono_s, time.monotonic())
        if why is not None:
            reject(topic, why)                   # never moves the clock
        local = tag + clock.offset               # an input's tag on the loop's own count

    A frame of the current session is accepted if its tag advances by 1 to ``slack_frames``, or
    by no more than the frames the wall clock allows from the newest publisher stamp seen to
    this frame's (no later than now): one per period in realtime, plus the frames a late
    publisher may owe (:data:`REALTIME_LATE_S`), :data:`LOCKSTEP_MAX_HZ` in lockstep (a loop
    that fell behind skips frames). A ``lockstep_device`` (an actuator the lockstep simulator
    waits for) sees every frame, so a longer jump of its clock counts only once confirmed, as
    below. A tag that does not advance, or jumps further, is rejected with the reason. In
    realtime the count advances by no more than the stamps allow (plus the slack) whatever
    the tag: a frame tagged far ahead but stamped now moves it by a few frames only.

    A frame of another session starts a new numbering at once (a simulator restart); so do
    :data:`RESYNC_FRAMES` rejected frames in a row that agree with one another. Either way the
    loop's own count, :attr:`local`, goes on from where it was: it never goes back and a tag
    moves it by no more than the checks allow, so the stale-input and watchdog clocks driven by
    it can be neither stopped nor rushed by a tag. :meth:`stall` advances it without a frame (a
    realtime loop whose frames stopped coming).

    Inputs tagged by the same clock (setpoints, DAQ frames) map onto the count with
    :attr:`offset`; :meth:`check_input` refuses one that leads the clock by more than
    :attr:`lead_frames`, and :meth:`cap` keeps one that leads it from counting as later than
    the clock plus the slack (an input's stream may be read before the clock's).
    """

    __slots__ = ("period_s", "rate_hz", "direct_rate_hz", "late_frames", "lead_frames",
                 "slack_frames", "align", "frame", "session", "local", "offset", "step", "t_s",
                 "t_stamp_s", "note", "_realtime", "_run", "_run_frame", "_run_session",
                 "_run_stamp_s", "_rejoined")

    def __init__(self, period_s: float, realtime: bool, lockstep_device: bool = False,
                 slack_frames: int = SLACK_FRAMES, align: int = 1) -> None:
        if not period_s > 0:
            raise ValueError(f"frame period must be > 0 s, got {period_s!r}")
        if slack_frames < 1 or align < 1:
            raise ValueError(f"slack ({slack_frames}) and alignment ({align}) must be >= 1 frame")
        self.period_s = period_s
        self.rate_hz = 1.0 / period_s if realtime else LOCKSTEP_MAX_HZ
        """The most frames per wall second the stream can advance."""
        self.direct_rate_hz = 0.0 if lockstep_device and not realtime else self.rate_hz
        """The same for a frame taken on its own (not confirmed by a run)."""
        self.late_frames = int(max(REALTIME_LATE_S / period_s, 2.0)) if realtime else 0
        """Frames a late realtime publisher may owe, allowed on top."""
        self.lead_frames = slack_frames + self.late_frames
        """How far an input's tag may lead the clock (its stream read before the clock's)."""
        self._realtime = realtime
        self.slack_frames = slack_frames
        self.align = align
        """A new numbering keeps ``local`` congruent to the tags modulo ``align`` (a decimated
        loop's periods begin where the hardware's do)."""
        self.frame = -1
        """Tag of the last accepted frame (-1: none yet)."""
        self.session = 0
        self.local = -1
        """The loop's own frame count: the last accepted frame, plus any :meth:`stall`."""
        self.offset = 0
        """``tag + offset`` is the local count of a tag of the current numbering."""
        self.step = 0
        """Frames the last accepted frame advanced the count by; 0 if it began a numbering
        (the first frame, a new session, a resynchronisation: :attr:`note` says which)."""
        self.t_s = -math.inf
        """Receive time of the last accepted frame (s, monotonic)."""
        self.t_stamp_s = 0.0
        """The newest publisher stamp of an accepted frame, never later than its receipt."""
        self.note = ""
        self._run = 0
        """Rejected frames in a row that agree with one another (see :data:`RESYNC_FRAMES`)."""
        self._run_frame = -1
        self._run_session = 0
        self._run_stamp_s = 0.0
        self._rejoined = False
        """Set by :meth:`rejoin`: the next frame may jump forward any number of frames."""

    def advance(self, frame: int, session: int, stamp_s: float, now_s: float) -> str | None:
        """Take the next frame of the stream: None if accepted, else why it was rejected.
        ``stamp_s`` is the publisher's monotonic stamp, ``now_s`` the receipt time."""
        step = frame - self.frame
        if session == self.session and self.frame >= 0:
            if 0 < step <= self.slack_frames:  # the every-frame path: two comparisons
                self._accept(frame, step, step, stamp_s, now_s)
                return None
            allowed = self._allowed(stamp_s, now_s, self.t_stamp_s, self.direct_rate_hz)
            allowed += self.late_frames
            if 0 < step <= allowed or (self._rejoined and step > 0):
                count = step
                if self._realtime:  # no faster than the stamps say, whatever the tag
                    short = step - self._allowed(stamp_s, now_s, self.t_stamp_s, self.rate_hz)
                    if short > 0:  # (by whole periods of the loop: its ticks stay aligned)
                        count -= -(-short // self.align) * self.align
                self._accept(frame, step, count, stamp_s, now_s)
                return None
        elif frame < 0:
            return f"frame {frame}: a clock frame must have a frame number"
        elif self.frame < 0:
            self._begin(frame, session, stamp_s, now_s, 0,
                        f"clock from frame {frame} of session {session}")
            return None
        else:
            self._begin(frame, session, stamp_s, now_s, 1,
                        f"session {session} from frame {frame} (session {self.session} ended at "
                        f"frame {self.frame})")
            return None
        if step <= 0:
            why = (f"frame {frame} is not after frame {self.frame}: a frame tag does not go back "
                   f"within a session (session {session})")
        else:
            why = (f"frame {frame} is {step} frames after frame {self.frame}, more than the "
                   f"{allowed} the clock allows")
        if (self._run and session == self._run_session
                and 0 < frame - self._run_frame
                <= self._allowed(stamp_s, now_s, self._run_stamp_s, self.rate_hz)):
            self._run += 1
        else:
            self._run = 1
        self._run_frame, self._run_session = frame, session
        self._run_stamp_s = min(stamp_s, now_s)
        if self._run >= RESYNC_FRAMES:
            self._begin(frame, session, stamp_s, now_s, self._run,
                        f"clock resynchronised at frame {frame} (was at frame {self.frame}): "
                        f"{self._run} frames in a row agreed with one another, not with it")
            return None
        return why

    def _allowed(self, stamp_s: float, now_s: float, since_stamp_s: float, rate_hz: float) -> int:
        """The largest step allowed after a frame stamped ``since_stamp_s``: the slack, plus the
        frames at ``rate_hz`` from then to this frame's stamp (no later than now)."""
        if not rate_hz:
            return self.slack_frames
        return self.slack_frames + int(max(0.0, min(stamp_s, now_s) - since_stamp_s) * rate_hz)

    def _accept(self, frame: int, step: int, count: int, stamp_s: float, now_s: float) -> None:
        """Take ``frame``, ``step`` tags after the last; the count advances by ``count``."""
        self.frame = frame
        self.local += count
        self.offset = self.local - frame
        self.step = step
        self.t_s = now_s
        stamp = min(stamp_s, now_s)
        if stamp > self.t_stamp_s:
            self.t_stamp_s = stamp
        self._run = 0
        self._rejoined = False

    def _begin(self, frame: int, session: int, stamp_s: float, now_s: float, advance: int,
               note: str) -> None:
        if self.frame < 0:
            local = frame
        else:
            local = self.local + advance
            local += (frame - local) % self.align
        self._accept(frame, local - self.local, local - self.local, stamp_s, now_s)
        self.session = session
        self.step = 0
        self.note = note

    def rejoin(self) -> None:
        """The loop was away from the stream (its connection was lost): the frames went on
        without it, so the next frame of the session may be any number of frames ahead (once;
        a lockstep device would otherwise wait for three of them to agree)."""
        self._rejoined = True

    def stall(self, frames: int) -> None:
        """Advance the count by ``frames`` (a multiple of ``align``) with no frame: the frames
        stopped coming. Inputs tagged since keep their place and grow older; the next accepted
        frame goes on from here."""
        self.local += frames

    def check_input(self, frame: int) -> str | None:
        """Why an input tagged ``frame`` cannot be taken (it leads the clock by more than
        :attr:`lead_frames`, or names no frame), or None. Before the clock's first frame there
        is nothing to check it against."""
        if frame < 0:
            return f"frame {frame}: an input must name the frame it is for"
        if self.frame >= 0 and frame - self.frame > self.lead_frames:
            return (f"frame {frame} is ahead of the hardware clock (frame {self.frame}) by more "
                    f"than {self.lead_frames} frames")
        return None

    def cap(self, local: int) -> int:
        """A local count as an input may claim it: no later than the clock's plus the slack."""
        limit = self.local + self.slack_frames
        return local if local < limit else limit


_ACTIVE: list["FrameTiming"] = []
"""The batches being timed on this (the event loop's) thread, innermost last."""


class FrameTiming:
    """Timing statistics of one loop (see the module docstring).

    :param period_s: the nominal frame period (s); late and overrun thresholds are in periods.
    :param late_after_frames: a frame acted on older than this many periods is *late*.
    :param ring: how many samples per interval the percentiles keep (the newest).
    """

    def __init__(self, period_s: float, late_after_frames: float = 2.0, ring: int = 4096) -> None:
        if not period_s > 0:
            raise ValueError(f"frame period must be > 0 s, got {period_s!r}")
        self.period_s = period_s
        self.late_after_s = late_after_frames * period_s
        self._cpu = np.zeros(ring)
        self._age = np.zeros(ring)
        self._n_cpu = 0
        self._n_age = 0
        self.frames = 0
        """Frames acted on (this session)."""
        self.late = 0
        self.overruns = 0
        self._interval_frames = 0
        self._interval_skipped = 0
        self._batch_max = 0
        self._batch_t0 = 0
        self._bucket_ns = 0
        self._t_wall = time.monotonic()
        self._t_proc = time.process_time()

    # ------------------------------------------------------------------ per batch

    def batch_begin(self) -> None:
        """A socket read (or an in-process delivery) starts. Batches nest: a loop that hands a
        frame to another loop of the same process is not charged for the other's work."""
        now = time.thread_time_ns()
        if _ACTIVE:
            outer = _ACTIVE[-1]
            outer._bucket_ns += now - outer._batch_t0
        _ACTIVE.append(self)
        self._batch_t0 = now

    def batch_end(self, messages: int, skipped: int) -> None:
        """The read and everything it caused (handlers, publishes) are done."""
        now = time.thread_time_ns()
        self._bucket_ns += now - self._batch_t0
        if _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()
            if _ACTIVE:
                _ACTIVE[-1]._batch_t0 = now
        if messages > self._batch_max:
            self._batch_max = messages
        self._interval_skipped += skipped

    # ------------------------------------------------------------------ per frame

    def acted(self, t_stamp_s: float, now_s: float) -> None:
        """A frame stamped ``t_stamp_s`` (the publisher's monotonic clock) is acted on now."""
        age = now_s - t_stamp_s
        if age < 0.0:
            age = 0.0
        if age > self.late_after_s:
            self.late = saturating_add(self.late, 1)
        self._age[self._n_age % len(self._age)] = age
        self._n_age += 1

    def frame_done(self) -> None:
        """One frame of the loop's clock has been handled: the CPU spent since the previous
        one is this frame's."""
        cpu_s = self._bucket_ns * 1e-9
        self._bucket_ns = 0
        if cpu_s > self.period_s:
            self.overruns = saturating_add(self.overruns, 1)
        self._cpu[self._n_cpu % len(self._cpu)] = cpu_s
        self._n_cpu += 1
        self.frames = saturating_add(self.frames, 1)
        self._interval_frames += 1

    # ------------------------------------------------------------------ per interval

    def snapshot(self, rx_backlog_bytes: int = 0) -> Timing:
        """The interval's :class:`Timing`; starts the next interval."""
        now, proc = time.monotonic(), time.process_time()
        wall = now - self._t_wall
        load = (proc - self._t_proc) / wall if wall > 0 else 0.0
        cpu = self._cpu[:min(self._n_cpu, len(self._cpu))]
        age = self._age[:min(self._n_age, len(self._age))]
        cpu_p50, cpu_p99 = (np.percentile(cpu, (50, 99)) * 1e6) if cpu.size else (0.0, 0.0)
        age_p50, age_p99 = (np.percentile(age, (50, 99)) * 1e3) if age.size else (0.0, 0.0)
        out = Timing(frames=self._interval_frames, skipped=self._interval_skipped,
                     cpu_us_p50=float(cpu_p50), cpu_us_p99=float(cpu_p99), cpu_load=max(0.0, load),
                     age_ms_p50=float(age_p50), age_ms_p99=float(age_p99),
                     age_ms_max=float(age.max() * 1e3) if age.size else 0.0,
                     batch_max=self._batch_max, rx_backlog_bytes=max(0, rx_backlog_bytes))
        self._n_cpu = self._n_age = 0
        self._interval_frames = self._interval_skipped = self._batch_max = 0
        self._t_wall, self._t_proc = now, proc
        return out


SKIPPED_TOO_MANY = 0.5
"""Fraction of frames skipped over a heartbeat interval beyond which a loop cannot keep up.
(On a busy 2-core machine a loop that keeps up still skips some: it is woken late and finds
two frames waiting; the age tells the two apart.)"""
AGE_TOO_OLD_FRAMES = 5.0
"""99th-percentile frame age, in frame periods, beyond which a loop cannot keep up."""


class LoopTimer:
    """Frame-period statistics over one heartbeat interval (telemetry, not logs).

    ``tick(t_s)`` once per frame with a monotonic time; ``snapshot()`` returns mean, standard
    deviation (jitter) and maximum of the period since the last snapshot.
    """

    def __init__(self) -> None:
        self._last: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self._max = 0.0

    def tick(self, t_s: float) -> None:
        if self._last is not None:
            period = t_s - self._last
            self._n += 1
            self._sum += period
            self._sumsq += period * period
            self._max = max(self._max, period)
        self._last = t_s

    def snapshot(self) -> tuple[float, float, float]:
        if self._n == 0:
            return 0.0, 0.0, 0.0
        mean = self._sum / self._n
        var = max(0.0, self._sumsq / self._n - mean * mean)
        out = (mean, math.sqrt(var), self._max)
        self._reset()
        return out


def cannot_keep_up(service: str, timing: Timing, rate_hz: float) -> str | None:
    """One line saying that ``service`` cannot run ``rate_hz`` (from one interval's
    :class:`Timing`), with a lower rate to try; None while it keeps up."""
    seen = timing.frames + timing.skipped
    if seen == 0 or not rate_hz > 0:
        return None
    skipped = timing.skipped / seen
    period_ms = 1e3 / rate_hz
    if skipped <= SKIPPED_TOO_MANY and timing.age_ms_p99 <= AGE_TOO_OLD_FRAMES * period_ms:
        return None
    budget = max(timing.cpu_us_p50 * 1e-6, 1.0 / rate_hz) / max(1e-3, 1.0 - skipped)
    suggest = max(10.0, min(rate_hz / 2, 100.0 * math.floor(0.5 / budget / 100.0)) or rate_hz / 2)
    return (f"{service}: frames {timing.age_ms_p99:.1f} ms old (p99), {100 * skipped:.0f} % "
            f"skipped, {timing.cpu_us_p50:.0f} us CPU per frame: the controller cannot run "
            f"{rate_hz:g} Hz; try --rate {suggest:g}")


def precise_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers keep sub-millisecond deadlines.

    asyncio's default selector on Linux is epoll, whose timeout has a resolution of one
    millisecond and is rounded up: every ``asyncio.sleep`` until a frame deadline overshoots
    by up to a millisecond, and at 1 kHz the simulator's clock missed 12 % of its frames by
    more than a period (then published two at once), measured here: p50 558 us late. With
    ``select(2)`` (microsecond timeouts) the same schedule is p50 111 us, 0.5 % missed. A kibble
    process watches a handful of sockets, where select's cost per descriptor does not matter.
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run(main)`` on a :func:`precise_event_loop` (every kibble process)."""
    with asyncio.Runner(loop_factory=precise_event_loop) as runner:
        return runner.run(main)
