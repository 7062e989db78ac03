"""The :class:`~kibble.services.plans.Loop` interface over MQTT.

:class:`BusLoop` drives a running stack (``kibble up``, or :class:`~kibble.services.up.Stack`)
the way an operator's script would: commands to the daemons and to the simulator go over the
bus with request/reply, and the simulated time is read from the simulator's ground truth
(``sim/truth``, one message per frame), so "run 10 s" means ten simulated seconds whatever the
clock. The scenarios of :mod:`kibble.services.scenarios` run on it unchanged.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

import numpy as np

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import DaqFrame, SimTruth
from kibble.services.bus import BusClient, BusError, Subscription, result_of
from kibble.services.plans import daq_arrays


class BusLoop:
    """Operate a stack over the bus. Use as ``async with BusLoop(url, instrument, rate_hz)``.

    :param frame_timeout_s: wall time allowed between two truth frames before giving up.
    :param progress: called with the simulated time (s) about once per simulated second.
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
        self._truth: Subscription | None = None
        self._daq: Subscription | None = None
        self._daq_ahead: list[DaqFrame] = []

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
        assert self.bus is not None
        return result_of(await self.bus.request(service, command, args, timeout_s=10.0), service, command)

    async def sim(self, command: str, **args: Any) -> dict[str, Any]:
        return await self.command("sim", command, **args)

    async def run_seconds(self, seconds: float, record: bool = True) -> dict[str, np.ndarray]:
        """Wait for ``seconds`` of simulated time (frames counted on ``sim/truth``); the truth
        of those frames as arrays (``t_s`` and every truth value) if ``record``."""
        out = await self._run(seconds, record)
        self._drop_old_daq()
        return out

    async def _run(self, seconds: float, record: bool) -> dict[str, np.ndarray]:
        assert self._truth is not None
        n = int(math.ceil(seconds * self.rate_hz - 1e-9))
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
