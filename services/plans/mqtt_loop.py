"""The :class:`~kibble.services.plans.engine.Loop` interface over MQTT: the one implementation for the
bus, used by the harness and by the sequencer daemon alike.

:class:`BusLoop` drives a running stack (``kibble up``, or :class:`~kibble.services.harness.up.Stack`)
the way an operator's script would: commands to the daemons and to the simulator go over the
bus with request/reply. Time is counted by one of two clocks:

- ``BusLoop(url, instrument, rate_hz)`` (the harness, tools, tests) opens its own connection and
  reads the simulated time from the simulator's ground truth (``sim/truth``, one message per
  frame), so "run 10 s" means ten simulated seconds whatever the clock, and ``run_seconds``
  returns the truth. The scenarios of :mod:`kibble.services.harness.scenarios` run on it unchanged.
- ``BusLoop.on_node(request, rate_hz)`` (the sequencer) rides on a daemon's own connection: its
  requests go out through the daemon, and time is counted in the DAQ frames the daemon hands it
  (:meth:`BusLoop.take_daq_frame`; simulated time in lockstep, real time on hardware, which has
  no truth). A wait or a measurement counts the frames that arrive after it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from typing import Any, Awaitable, Callable

import numpy as np

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import DaqFrame, Reply, SimTruth
from kibble.services.runtime.client import BusClient, BusError, Subscription, result_of
from kibble.services.plans.engine import daq_arrays

Request = Callable[[str, str, dict[str, Any]], Awaitable[Reply]]
"""Send ``command`` with ``args`` to ``service`` and return its reply (the transport's request)."""


class DaqClock:
    """Time in DAQ frames as a daemon receives them (:meth:`take`): waits for the next n."""

    def __init__(self, frame_timeout_s: float) -> None:
        self.frame_timeout_s = frame_timeout_s
        self._count = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._kept: list[DaqFrame] | None = None
        self._keep_until = 0

    def take(self, frame: DaqFrame) -> None:
        """One DAQ frame arrived."""
        self._count += 1
        if self._kept is not None and self._count <= self._keep_until:
            self._kept.append(frame)
        while self._waiters and self._waiters[0][0] <= self._count:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    async def frames(self, n: int, keep: bool = False) -> list[DaqFrame]:
        """Wait for the next ``n`` DAQ frames (the returned list is empty unless ``keep``: then
        exactly those, even if more arrive in the same receive batch); ``BusError`` once no
        frame came for ``frame_timeout_s``."""
        kept: list[DaqFrame] = []
        target = self._count + n
        if keep:
            self._kept, self._keep_until = kept, target
        try:
            while self._count < target:
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append((target, fut))
                seen = self._count
                try:
                    await asyncio.wait_for(fut, self.frame_timeout_s)
                except asyncio.TimeoutError:
                    if self._count == seen:
                        raise BusError(f"no DAQ frame for {self.frame_timeout_s} s: "
                                       "is the stack running?") from None
        finally:
            if keep:
                self._kept = None
        return kept


class BusLoop:
    """Operate a stack over the bus. Use as ``async with BusLoop(url, instrument, rate_hz)``
    (own connection, truth clock) or ``BusLoop.on_node(request, rate_hz)`` (a daemon's).

    :param frame_timeout_s: wall time allowed between two clock frames before giving up.
    :param progress: called with the simulated time (s) about once per simulated second
        (truth clock).
    """

    def __init__(self, broker_url: str, instrument: str, rate_hz: float,
                 frame_timeout_s: float = 10.0,
                 progress: Callable[[float], None] | None = None) -> None:
        self.broker_url = broker_url
        self.instrument = instrument
        self.rate_hz = float(rate_hz)
        self.frame_timeout_s = frame_timeout_s
        self.progress = progress
        self.frame = -1
        self.sim_time_s = 0.0
        self._stack = contextlib.AsyncExitStack()
        self.bus: BusClient | None = None
        self._request: Request | None = None
        self._daq_clock: DaqClock | None = None
        self._truth: Subscription | None = None
        self._daq: Subscription | None = None
        self._daq_ahead: list[DaqFrame] = []

    @classmethod
    def on_node(cls, request: Request, rate_hz: float, frame_timeout_s: float = 10.0) -> "BusLoop":
        """The loop of a daemon (the sequencer) on its own connection: ``request`` sends its
        commands, and the daemon hands every DAQ frame it receives to :meth:`take_daq_frame`."""
        loop = cls("", "", rate_hz, frame_timeout_s)
        loop._request = request
        loop._daq_clock = DaqClock(frame_timeout_s)
        return loop

    def take_daq_frame(self, frame: DaqFrame) -> None:
        """A DAQ frame the daemon received (the clock of :meth:`on_node`)."""
        assert self._daq_clock is not None, "take_daq_frame is for a loop made by BusLoop.on_node"
        self._daq_clock.take(frame)

    async def __aenter__(self) -> "BusLoop":
        self.bus = await self._stack.enter_async_context(BusClient(self.broker_url, self.instrument))
        self._truth = await self._stack.enter_async_context(
            self.bus.listen(self.bus.topics.sim("truth"), qos=0))
        self._daq = await self._stack.enter_async_context(
            self.bus.listen(self.bus.topics.frame("daq"), qos=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def command(self, service: str, command: str, **args: Any) -> dict[str, Any]:
        if self._request is not None:
            reply = await self._request(service, command, args)
        else:
            assert self.bus is not None, "enter the BusLoop (async with) first"
            reply = await self.bus.request(service, command, args, timeout_s=10.0)
        return result_of(reply, service, command)

    async def sim(self, command: str, **args: Any) -> dict[str, Any]:
        return await self.command("sim", command, **args)

    def _frames_in(self, seconds: float) -> int:
        return int(math.ceil(seconds * self.rate_hz - 1e-9))

    async def run_seconds(self, seconds: float, record: bool = True) -> dict[str, np.ndarray]:
        """Wait for ``seconds`` of time in clock frames. On the truth clock, the truth of those
        frames as arrays (``t_s`` and every truth value) if ``record``; on the DAQ clock,
        nothing (a daemon sees no truth)."""
        if self._daq_clock is not None:
            await self._daq_clock.frames(self._frames_in(seconds))
            return {}
        out = await self._run(seconds, record)
        self._drop_old_daq()
        return out

    async def _run(self, seconds: float, record: bool) -> dict[str, np.ndarray]:
        assert self._truth is not None
        n = self._frames_in(seconds)
        rows: list[SimTruth] = []
        next_report = self.sim_time_s + 1.0
        while len(rows) < n:
            _, payload = await self._truth.get(self.frame_timeout_s)
            try:
                truth = decode(payload, SimTruth)
            except DecodeError as exc:
                raise BusError(f"undecodable sim/truth frame: {exc}") from None
            if truth.frame <= self.frame:
                continue
            if self.frame >= 0 and truth.frame != self.frame + 1:
                raise BusError(f"sim/truth skipped from frame {self.frame} to {truth.frame} "
                               "(publish truth every frame, and keep up with it)")
            self.frame = truth.frame
            self.sim_time_s = truth.sim_time_s
            rows.append(truth)
            if self.progress is not None and self.sim_time_s >= next_report:
                self.progress(self.sim_time_s)
                next_report = self.sim_time_s + 1.0
        if not record:
            return {}
        names = list(rows[0].values) if rows else []
        out = {"t_s": np.array([r.sim_time_s for r in rows])}
        for name in names:
            out[name] = np.array([r.values[name] for r in rows])
        return out

    async def measure(self, seconds: float) -> dict[str, np.ndarray]:
        """The DAQ frames of the next ``seconds`` of simulated time (what a measurement sees,
        not the truth): one array per :class:`DaqFrame` field."""
        if self._daq_clock is not None:
            return daq_arrays(await self._daq_clock.frames(self._frames_in(seconds), keep=True))
        first = self.frame + 1
        await self._run(seconds, record=False)
        return daq_arrays(await self._daq_frames(first, self.frame))

    async def _daq_frames(self, first: int, last: int) -> list[DaqFrame]:
        """DAQ frames ``first..last`` from the DAQ subscription (older ones are dropped)."""
        assert self._daq is not None
        out = [f for f in self._daq_ahead if first <= f.frame <= last]
        self._daq_ahead = [f for f in self._daq_ahead if f.frame > last]
        newest = max((f.frame for f in out), default=first - 1)
        while newest < last:
            _, payload = await self._daq.get(self.frame_timeout_s)
            try:
                frame = decode(payload, DaqFrame)
            except DecodeError as exc:
                raise BusError(f"undecodable daq/frame: {exc}") from None
            if frame.frame > last:
                self._daq_ahead.append(frame)
                break
            newest = frame.frame
            if frame.frame >= first:
                out.append(frame)
        missing = (last - first + 1) - len(out)
        if missing:
            raise BusError(f"{missing} DAQ frames of {first}..{last} not received")
        return out

    def _drop_old_daq(self) -> None:
        """Discard queued DAQ frames up to the present frame (nobody is measuring them)."""
        assert self._daq is not None
        queue = self._daq.queue
        while not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, Exception):
                raise item
            try:
                frame = decode(item[1], DaqFrame)
            except DecodeError:
                continue
            if frame.frame > self.frame:
                self._daq_ahead.append(frame)
                break
        self._daq_ahead = [f for f in self._daq_ahead if f.frame > self.frame]

    async def wait_frames(self, timeout_s: float = 30.0) -> None:
        """Wait until truth frames flow (the simulator is publishing)."""
        deadline = time.monotonic() + timeout_s
        while self.frame < 0:
            if time.monotonic() > deadline:
                raise BusError(f"no sim/truth frame within {timeout_s} s")
            await self.run_seconds(1.0 / self.rate_hz, record=False)
