"""The whole loop in one process, without a broker: plant + every daemon of an instrument.

:class:`InProcessStack` runs the real service classes (the same code as ``kibble service``)
against the simulator's plant and its hardware adapter (the same code as ``kibble sim``); only
MQTT is replaced, by an in-memory queue that keeps the wire format (every message is encoded
and decoded as on the bus) and the bus's order (first published, first delivered). The
simulator's lockstep clock is reproduced exactly: frame k is published, every message it causes
is delivered, then the plant advances with the commands it holds. Long simulated durations
(the closed-loop tests and the loop benchmark) run here, at a few thousand frames per second.

::

    stack = InProcessStack("nist4", rate_hz=1000, seed=1)
    await stack.start()                         # hello, arm the actuators
    await stack.command("servo", "mode", mode="force")
    truth = await stack.run_seconds(60.0)       # dict of true plant signals, one row per frame
"""

from __future__ import annotations

import asyncio
import itertools
import math
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import Command, DaqFrame, HwActuatorCommand, Reply
from kibble.bus_schema.topics import Topics
from kibble.hil_sim.adapter import PLANTS, adapter_for, plant_control
from kibble.hil_sim.params import DEFAULT_NOISE, frame_overrides
from kibble.services.runtime.client import result_of
from kibble.services.instruments import DEFINITIONS, instrument
from kibble.services.plans.engine import daq_arrays
from kibble.services.runtime.registry import service_class
from kibble.services.runtime.service import Service, load_config



class InProcessStack:
    """Plant + daemons of ``model`` at ``rate_hz`` frames per second, seeded.

    :param plant_overrides: plant parameters (dotted names, see ``hil_sim/<model>.toml``).
    :param params: initial parameter values per service, ``{"servo": {"kp_n_per_m": 1e4}}``.
    :param settings: settings per service (``frame_rate_hz`` is always ``rate_hz``).
    :param services: the daemons to run (default: all of the instrument's).
    :param noise: the plant's noise profile (``hil_sim.params.NOISE_PROFILES``): ``published``
        (as noisy as the seeds' instruments, the default), ``quiet`` or ``off``.
    """

    def __init__(self, model: str = "nist4", rate_hz: float = 1000.0, seed: int = 0,
                 plant_overrides: Mapping[str, Any] | None = None,
                 params: Mapping[str, Mapping[str, Any]] | None = None,
                 settings: Mapping[str, Mapping[str, Any]] | None = None,
                 services: tuple[str, ...] | None = None, state_dir: Path | None = None,
                 noise: str = DEFAULT_NOISE) -> None:
        if model not in DEFINITIONS:
            raise ValueError(f"unknown instrument model {model!r}; one of {', '.join(DEFINITIONS)}")
        self.model = model
        self.rate_hz = float(rate_hz)
        self.dt_s = 1.0 / self.rate_hz
        self.plant = PLANTS[model](overrides=frame_overrides(model, rate_hz, plant_overrides), seed=seed,
                                   noise=noise)
        self.adapter = adapter_for(self.plant)
        self.topics = Topics(model)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is not None:
            state = Path(state_dir)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="kibble-inproc-")
            state = Path(self._tmp.name)
        self.queue: deque[tuple[str, bytes]] = deque()
        self.routes: dict[str, list[Service]] = {}
        self.services: dict[str, Service] = {}
        for name in services or instrument(model).daemons:
            cls = service_class(name)
            # lockstep: the plant advances as fast as the daemons answer; wall-clock frame
            # ages mean nothing here (a kernel compiled mid-frame must not make input "too old")
            cfg = load_config(cls.name, instrument(model).config, instrument=model, state_dir=state,
                              restore=False, clock="lockstep", params=dict((params or {}).get(name, {})),
                              settings={**dict((settings or {}).get(name, {})), "frame_rate_hz": self.rate_hz})
            svc = cls(cfg)
            self.services[name] = svc
            for topic in svc.attach_local(self._post):
                self.routes.setdefault(topic, []).append(svc)
        self.hw_prefix = self.topics.hw("sensors").rsplit("/", 1)[0] + "/"
        self.t_sensors = self.topics.hw("sensors")
        self.reply_topic = self.topics.reply("inprocess")
        self.replies: dict[str, Reply] = {}
        self.taps: dict[str, list[bytes]] = {}
        self.rejected_hw: list[str] = []
        self.frame = -1
        self._ids = itertools.count(1)

    # ---------------------------------------------------------------- the in-memory bus

    def _post(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.queue.append((topic, payload))

    def tap(self, topic: str) -> list[bytes]:
        """Collect every payload published on ``topic`` from now on (a list that grows)."""
        return self.taps.setdefault(topic, [])

    async def _drain(self) -> None:
        queue = self.queue
        while queue:
            topic, payload = queue.popleft()
            if topic.startswith(self.hw_prefix) and topic != self.t_sensors:
                self._to_hardware(topic, payload)
            elif topic == self.reply_topic:
                reply = decode(payload, Reply)
                self.replies[reply.id] = reply
            tapped = self.taps.get(topic)
            if tapped is not None:
                tapped.append(payload)
            for svc in self.routes.get(topic, ()):
                await svc.dispatch(topic, payload)

    def _to_hardware(self, topic: str, payload: bytes) -> None:
        device = topic.rsplit("/", 1)[1]
        spec = self.adapter.devices.get(device)
        try:
            cmd = decode(payload, HwActuatorCommand)
        except DecodeError as exc:
            self.rejected_hw.append(f"{topic}: {exc}")
            return
        problem = "unknown device" if spec is None else spec.check(cmd.codes, cmd.relays)
        if problem:
            self.rejected_hw.append(f"{topic}: {problem}")
            return
        self.adapter.apply(device, list(cmd.codes), list(cmd.relays))

    # ---------------------------------------------------------------- operating it

    async def start(self, arm: bool = True) -> None:
        """Connect every daemon (actuators say hello), publish frame 0, arm the actuators."""
        for svc in self.services.values():
            await svc.on_connected()
        await self._drain()
        await self.run_frames(1)
        if arm:
            for name in instrument(self.model).actuators:
                if name in self.services:
                    await self.command(name, "arm")

    async def command(self, service: str, command: str, **args: Any) -> dict[str, Any]:
        """Send a command as an operator would; the reply's result, or ``ValueError``."""
        cid = f"inproc-{next(self._ids)}"
        cmd = Command(id=cid, command=command, args=args, reply_to=self.reply_topic,
                      client_id="inprocess")
        self._post(self.topics.cmd(service), encode(cmd))
        await self._drain()
        reply = self.replies.pop(cid, None)
        if reply is None:
            raise ValueError(f"no reply from {service!r} to {command!r} (not running here?)")
        return result_of(reply, service, command)

    async def sim(self, command: str, **args: Any) -> dict[str, Any]:
        """A plant-level simulator control command (``place_mass``, ``inject_impulse``, ...)
        exactly as ``kibble cmd sim`` would run it; ``ValueError`` if it is refused."""
        return {"frame": self.frame, **plant_control(self.adapter, command, args)}

    async def run_frames(self, n: int, record: bool = True) -> dict[str, np.ndarray]:
        """Advance ``n`` frames through the whole loop; the true plant signals per frame
        (``t_s`` and the plant's truth fields, SI) if ``record``."""
        rows = np.empty((n, len(self.adapter.truth_columns) + 1)) if record else None
        t_sensors = self.t_sensors
        for i in range(n):
            k = self.frame + 1
            block = self.adapter.run_held(1, record_truth=record)
            self.frame = k
            msg = self.adapter.sensor_frame(k, block.sensors[0].tolist())
            self._post(t_sensors, encode(msg))
            await self._drain()
            if record:
                assert rows is not None  # allocated above when recording
                tr = block.truth[0]
                rows[i, 0] = msg.sim_time_s
                for j, (_, col, off) in enumerate(self.adapter.truth_columns):
                    rows[i, j + 1] = tr[col] + off
        if rows is None:
            return {}
        names = ["t_s"] + [name for name, _, _ in self.adapter.truth_columns]
        return {name: rows[:, j] for j, name in enumerate(names)}

    async def run_seconds(self, seconds: float, record: bool = True) -> dict[str, np.ndarray]:
        return await self.run_frames(int(math.ceil(seconds * self.rate_hz - 1e-9)), record)

    async def measure(self, seconds: float) -> dict[str, np.ndarray]:
        """The DAQ frames of the next ``seconds`` (what a measurement sees, not the truth):
        one array per :class:`DaqFrame` field."""
        topic = self.topics.frame("daq")
        frames = self.taps[topic] = []
        try:
            await self.run_seconds(seconds, record=False)
        finally:
            del self.taps[topic]
        return daq_arrays([decode(p, DaqFrame) for p in frames])

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


async def warm_kernels() -> None:
    """Compile (or load from numba's on-disk cache) every kernel the plants and the daemons
    use, by running two frames of each instrument's whole loop.

    The first run on a machine compiles for half a minute or so; later runs load the cache in
    under a second. Run it once before starting several processes that would each compile the
    same kernels at the same time (``kibble up``, the test session)."""
    for model in DEFINITIONS:
        stack = InProcessStack(model, rate_hz=1000.0)
        try:
            await stack.start()
            await stack.run_frames(2)
        finally:
            stack.close()


def compile_kernels() -> float:
    """:func:`warm_kernels` outside an event loop; the seconds it took."""
    t0 = time.perf_counter()
    asyncio.run(warm_kernels())
    return time.perf_counter() - t0
