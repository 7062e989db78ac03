"""``kibble up``: the whole stack on the simulator, supervised.

:class:`Stack` starts (in this order) a broker unless one is given, the HIL simulator
(``kibble sim``) and every daemon of the instrument (``kibble service NAME``) as child
processes, waits until each one is online on the bus, arms the actuators, and supervises them:
a child that exits unexpectedly is reported and restarted with back-off. Leaving the context
stops the daemons first (SIGTERM: actuators go safe, status goes offline), then the simulator,
then the broker. Each child's output goes to ``<run_dir>/logs/<name>.log``.

::

    async with Stack("nist4", clock="lockstep", rate_hz=200) as stack:
        async with BusClient(stack.broker_url, stack.instrument) as bus:
            await bus.request("servo", "mode", {"mode": "force"})
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import Status
from kibble.bus_schema.realtime import AGE_TOO_OLD_FRAMES, cannot_keep_up
from kibble.bus_schema.transport import broker_spec, without_password
from kibble.services.harness.broker import Broker
from kibble.services.runtime.client import BusClient, BusError, follow, result_of
from kibble.services.instruments import DEFINITIONS, Instrument, instrument

log = logging.getLogger(__name__)

TOGETHER_ABOVE_HZ = 250.0
"""Frame rate above which ``kibble up`` runs each instrument's ``together`` groups in one
process each (measured in issue 12: at 500 Hz and more, five processes and three broker hops
per frame do not keep up on a 2-core controller; at 200 Hz separate processes hold)."""

MEASUREMENT_DAEMONS = ("recorder", "sequencer")
"""Daemons of measurements, common to both instruments (``Stack(measurement=True)``)."""


@dataclass
class Child:
    """One supervised child process."""

    name: str
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    given_up: bool = False

    async def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                start_new_session=True)
        finally:
            logf.close()
        self.started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, timeout_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.0f s: killing it", self.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@dataclass
class Stack:
    """Broker + simulator + daemons of one simulated instrument (see the module docstring).

    :param model: ``nist4`` or ``efb`` (also the instrument id unless ``instrument`` is given).
    :param clock: the simulator's clock, ``lockstep`` or ``realtime``.
    :param rate_hz: frame (loop) rate of the simulator and every daemon.
    :param broker_url: use this broker; None starts an embedded one on a free port.
    :param run_dir: logs and the daemons' state files.
    :param progress: called with one line of text at every step of the start-up.
    """

    model: str = "nist4"
    clock: str = "lockstep"
    rate_hz: float = 1000.0
    broker_url: str | None = None
    instrument: str = ""
    seed: int = 0
    noise: str = "published"
    """The simulator's noise profile (``kibble sim --noise``)."""
    run_dir: Path = field(default_factory=lambda: Path(".state") / "up")
    sim_args: list[str] = field(default_factory=list)
    measurement: bool = False
    """Also start the recorder and the sequencer (measurements: ``kibble measure``)."""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings per daemon, ``{"damping": {"watchdog_xy_rms_m": 1e-4}}`` (``--setting``)."""
    arm: bool = True
    together: tuple[tuple[str, ...], ...] | None = None
    """Daemons that share a process (their frames to each other pass in process); None: the
    instrument's ``together`` groups above :data:`TOGETHER_ABOVE_HZ`, else one process each;
    ``()``: one process each."""
    process: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Process settings per daemon or ``sim`` (``--process SERVICE.NAME=VALUE``, see
    :mod:`kibble.bus_schema.process`); a group of daemons takes its members' together."""
    launchers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """A command prefix per process, keyed ``sim`` or by daemon (daemons that share a process
    must agree): the child runs as ``prefix + argv``, e.g. ``("ip", "netns", "exec", "lab-d")``
    starts it in that network namespace, another host of a lab on one machine
    (tests/services/harness/test_multihost.py)."""
    credentials_dir: Path | None = None
    """With ``broker_url``: every child connects as ``kibble-<name>`` with the password in
    ``<credentials_dir>/kibble-<name>.password`` (``kibble deploy-credentials``); the stack's
    own requests (waiting, arming) keep ``broker_url``'s identity, an operator's."""
    progress: Callable[[str], None] = print
    startup_timeout_s: float = 60.0
    max_restarts: int = 5
    children: dict[str, Child] = field(default_factory=dict, init=False)
    _broker: Broker | None = field(default=None, init=False)
    _supervisor: asyncio.Task | None = field(default=None, init=False)
    _timing_watch: asyncio.Task | None = field(default=None, init=False)
    overloaded: dict[str, str] = field(default_factory=dict, init=False)
    """Daemons that said they cannot keep up with the rate, with the line printed for each."""
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.model not in DEFINITIONS:
            raise ValueError(f"unknown simulated instrument {self.model!r}; one of {', '.join(DEFINITIONS)}")
        if self.clock not in ("lockstep", "realtime"):
            raise ValueError(f"unknown clock {self.clock!r}; lockstep or realtime")
        if not 1.0 <= self.rate_hz <= 10000.0:
            raise ValueError(f"rate {self.rate_hz} Hz outside 1..10000 Hz")
        unknown = set(self.process) - set(self.daemons) - {"sim"}
        if unknown:
            raise ValueError(f"process settings for {', '.join(sorted(unknown))}: not the sim or "
                             f"daemons of the {self.model} stack ({', '.join(self.daemons)})")
        unknown = set(self.launchers) - set(self.daemons) - {"sim"}
        if unknown:
            raise ValueError(f"launchers for {', '.join(sorted(unknown))}: not the sim or "
                             f"daemons of the {self.model} stack ({', '.join(self.daemons)})")
        unknown = set(self.settings) - set(self.daemons)
        if unknown:
            raise ValueError(f"settings for {', '.join(sorted(unknown))}: not daemons of the "
                             f"{self.model} stack ({', '.join(self.daemons)})")
        self.instrument = self.instrument or self.model
        self.run_dir = Path(self.run_dir)
        if self.together is None:
            self.together = self.spec.together if self.rate_hz > TOGETHER_ABOVE_HZ else ()
        seen: set[str] = set()
        for group in self.together:
            bad = [n for n in group if n not in self.daemons or n in seen]
            if bad or len(group) < 2:
                raise ValueError(f"together group {','.join(group)}: needs two or more daemons of "
                                 f"the {self.model} stack ({', '.join(self.daemons)}), each in one "
                                 "group only")
            seen.update(group)

    @property
    def processes(self) -> list[tuple[str, ...]]:
        """The daemons' processes: each ``together`` group, then every other daemon alone."""
        grouped = {n for g in self.together or () for n in g}
        return list(self.together or ()) + [(n,) for n in self.daemons if n not in grouped]

    @property
    def spec(self) -> Instrument:
        """The instrument's definition: its daemons, actuators, devices, process groups."""
        return instrument(self.model)

    @property
    def daemons(self) -> tuple[str, ...]:
        """Every daemon started: the instrument's, then the recorder and the sequencer if
        ``measurement``."""
        return self.spec.daemons + (MEASUREMENT_DAEMONS if self.measurement else ())

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.broker_url is not None and self.credentials_dir is None:
            password = broker_spec(self.broker_url, env={}).password
            if password is not None:  # not on the children's command lines (ps shows those)
                env["KIBBLE_BROKER_PASSWORD"] = password
        return env

    def _kibble(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kibble.services.cli.main", *args]

    def _launcher(self, *names: str) -> list[str]:
        """The command prefix of the process that runs ``names`` (``ValueError`` if two members
        ask for different ones)."""
        prefixes = {tuple(self.launchers.get(name, ())) for name in names}
        if len(prefixes) > 1:
            raise ValueError(f"launchers: {', '.join(names)} share a process but ask for "
                             f"{' and '.join(repr(' '.join(p)) for p in sorted(prefixes))}")
        return list(prefixes.pop())

    def _process_args(self, *names: str) -> list[str]:
        """The ``--process`` arguments of the process that runs ``names`` (their settings
        merged; ``ValueError`` if two members ask for different values)."""
        merged: dict[str, Any] = {}
        for name in names:
            for key, value in self.process.get(name, {}).items():
                if merged.get(key, value) != value:
                    raise ValueError(f"process setting {key}: {', '.join(names)} share a process "
                                     f"but ask for {merged[key]!r} and {value!r}")
                merged[key] = value
        return [f"--process={key}={value}" for key, value in merged.items()]

    def _bus_args(self, child: str | None = None) -> list[str]:
        assert self.broker_url is not None
        url = self.broker_url
        if child == "sim" and self.credentials_dir is not None:
            from kibble.services.runtime.credentials import child_url
            url = child_url(url, child, self.credentials_dir)
        elif child is not None and self.credentials_dir is not None:
            # each daemon of the process connects as itself (kibble service --credentials)
            return ["--broker", without_password(url), "--credentials", str(self.credentials_dir),
                    "--instrument", self.instrument]
        elif child is not None:
            url = without_password(url)  # a password given in the URL goes by environment (_env)
        return ["--broker", url, "--instrument", self.instrument]

    async def __aenter__(self) -> "Stack":
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        from kibble.services.harness.inprocess import warm_kernels

        t0 = time.monotonic()
        self.progress("loading the numba kernels (compiled once per machine, cached after)")
        await warm_kernels()
        self.progress(f"kernels ready in {time.monotonic() - t0:.1f} s")
        if self.broker_url is None:
            self._broker = Broker()
            await self._broker.__aenter__()
            self.broker_url = self._broker.url
            self.progress(f"broker: {self._broker.backend} on {self.broker_url}")
        logs = self.run_dir / "logs"
        rate = f"{self.rate_hz:g}"
        sim = Child("sim", self._launcher("sim") + self._kibble(
                        "sim", "--model", self.model, "--clock", self.clock, "--rate", rate,
                        "--seed", str(self.seed), "--noise", self.noise,
                        "--expect", ",".join(self.spec.devices),
                        *self._process_args("sim"), *self.sim_args, *self._bus_args("sim")),
                    logs / "sim.log")
        self.children["sim"] = sim
        daemons = self.daemons
        for group in self.processes:
            child = "+".join(group)
            qualify = (lambda n, k: f"{n}.{k}") if len(group) > 1 else (lambda n, k: k)
            frame_rate = [f"--setting={qualify(n, 'frame_rate_hz')}={rate}" for n in group
                          if n != "recorder"]
            own = [f"--setting={qualify(n, key)}={value}" for n in group
                   for key, value in self.settings.get(n, {}).items()]
            self.children[child] = Child(child, self._launcher(*group) + self._kibble(
                "service", ",".join(group), "--config", str(self.spec.config),
                "--clock", self.clock, *frame_rate, "--state-dir", str(self.run_dir / "state"),
                *own, *self._process_args(*group), *self._bus_args(child)),
                logs / f"{child}.log")
        env = self._env()
        # the simulator first: the actuators' hello (their registration with the lockstep
        # clock) must find it subscribed
        await sim.start(env)
        await self.wait_online(self.startup_timeout_s, {"sim"})
        for group in self.processes:
            await self.children["+".join(group)].start(env)
        shared = "; ".join("+".join(g) for g in self.together or ()) or "none"
        self.progress(f"started sim ({self.model}, {self.clock}, {rate} Hz) and "
                      f"{', '.join(daemons)} (sharing a process: {shared}); logs in {logs}")
        await self.wait_online(self.startup_timeout_s, set(daemons))
        if self.arm:
            await self.arm_all()
        self._supervisor = asyncio.create_task(self._supervise())
        self._timing_watch = asyncio.create_task(self._watch_timing())

    async def wait_online(self, timeout_s: float, want: set[str],
                          since_utc_s: float | None = None) -> None:
        """Wait until every child named in ``want`` publishes an online status; with
        ``since_utc_s``, one stamped after it (a status retained from before a reconnect, which
        may still say online, does not count; the hosts' clocks must agree)."""
        seen: set[str] = set()
        assert self.broker_url is not None
        deadline = time.monotonic() + timeout_s
        async with BusClient(self.broker_url, self.instrument) as bus:
            pattern = f"kb/{self.instrument}/+/status"
            async for _, payload in _with_deadline(bus.subscribe(pattern), deadline):
                try:
                    status = decode(payload, Status)
                except DecodeError:
                    continue
                if status.online and (since_utc_s is None or status.t_utc_s > since_utc_s):
                    seen.add(status.service)
                if want <= seen:
                    break
                self._check_alive(want)
        missing = want - seen
        if missing:
            raise TimeoutError(f"not online after {timeout_s:.0f} s: {', '.join(sorted(missing))} "
                               f"(see {self.run_dir / 'logs'})")
        self.progress(f"online: {', '.join(sorted(seen))}")

    def child_of(self, daemon: str) -> Child:
        """The child process that runs ``daemon`` (alone or in a group)."""
        for name, child in self.children.items():
            if daemon in name.split("+"):
                return child
        raise KeyError(daemon)

    def _check_alive(self, names: set[str]) -> None:
        for child in {self.child_of(n).name: self.child_of(n) for n in names}.values():
            if not child.running:
                code = child.proc.returncode if child.proc else None
                raise RuntimeError(f"{child.name} exited with code {code} during start-up; "
                                   f"its log: {child.log_path}")

    async def request(self, service: str, command: str, args: dict | None = None,
                      timeout_s: float = 10.0) -> dict:
        """Send one command; the reply's result, or ``BusError`` with the service's reason."""
        assert self.broker_url is not None
        async with BusClient(self.broker_url, self.instrument) as bus:
            reply = await bus.request(service, command, args or {}, timeout_s=timeout_s)
        return result_of(reply, service, command)

    async def wait_flowing(self, names: set[str], timeout_s: float = 30.0) -> None:
        """Wait until each daemon in ``names`` reports (in its status timing) that it acts on
        the frames, and in realtime that they are fresh (p99 age within
        ``AGE_TOO_OLD_FRAMES`` periods): the processes have settled after their start."""
        assert self.broker_url is not None
        limit_ms = AGE_TOO_OLD_FRAMES * 1e3 / self.rate_hz
        ready: set[str] = set()
        deadline = time.monotonic() + timeout_s
        async with BusClient(self.broker_url, self.instrument) as bus:
            async for _, payload in _with_deadline(bus.subscribe(f"kb/{self.instrument}/+/status"), deadline):
                try:
                    status = decode(payload, Status)
                except DecodeError:
                    continue
                t = status.timing
                if status.service in names and t.frames > 0 and (
                        self.clock == "lockstep" or t.age_ms_p99 <= limit_ms):
                    ready.add(status.service)
                if names <= ready:
                    return
        late = ", ".join(sorted(names - ready))
        raise TimeoutError(f"{late}: frames not flowing, or older than {limit_ms:.1f} ms, "
                           f"{timeout_s:.0f} s after the start (see {self.run_dir / 'logs'})")

    async def arm_all(self) -> None:
        """Arm every actuator daemon once its frames flow fresh (retrying while their
        interlocks still lack readings)."""
        await self.wait_flowing(set(self.spec.actuators))
        for name in self.spec.actuators:
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    await self.request(name, "arm")
                    break
                except BusError as exc:
                    if time.monotonic() > deadline:
                        raise
                    log.info("arming %s: %s; retrying", name, exc)
                    await asyncio.sleep(0.2)
        self.progress(f"armed: {', '.join(self.spec.actuators)}")

    async def _supervise(self) -> None:
        env = self._env()
        while not self._stopping:
            for child in self.children.values():
                if child.running or self._stopping:
                    continue
                code = child.proc.returncode if child.proc else None
                if child.restarts >= self.max_restarts:
                    if not child.given_up:
                        child.given_up = True
                        self.progress(f"supervisor: {child.name} exited (code {code}) and has been "
                                      f"restarted {child.restarts} times: giving up, see {child.log_path}")
                    continue
                delay = min(5.0, 0.5 * 2 ** child.restarts)
                self.progress(f"supervisor: {child.name} exited with code {code}; "
                              f"restarting in {delay:.1f} s (see {child.log_path})")
                await asyncio.sleep(delay)
                child.restarts += 1
                child.given_up = False
                await child.start(env)
            await asyncio.sleep(0.5)

    async def _watch_timing(self) -> None:
        """Say once per daemon, clearly, when it cannot hold the frame rate (from the timing
        in its status: frames too old or too many skipped)."""
        assert self.broker_url is not None
        async for _, payload in follow(self.broker_url, self.instrument, f"kb/{self.instrument}/+/status"):
            try:
                status = decode(payload, Status)
            except DecodeError:
                continue
            if status.service in self.overloaded or not status.online:
                continue
            line = cannot_keep_up(status.service, status.timing, self.rate_hz)
            if line is not None:
                self.overloaded[status.service] = line
                self.progress(f"supervisor: {line}")

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        for task in (self._supervisor, self._timing_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        services = [c for n, c in self.children.items() if n != "sim"]
        await asyncio.gather(*(c.stop() for c in services))
        if "sim" in self.children:
            await self.children["sim"].stop()
        if self._broker is not None:
            await self._broker.__aexit__(None, None, None)
            self._broker = None


async def _with_deadline(agen, deadline: float):
    """Iterate ``agen`` until ``deadline`` (monotonic), then stop quietly."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            item = await asyncio.wait_for(agen.__anext__(), remaining)
        except (asyncio.TimeoutError, StopAsyncIteration):
            return
        yield item
