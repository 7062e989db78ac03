"""Measurement procedures as plans, run by an engine (the bluesky idea).

A plan is a generator of :class:`Msg`; the :class:`RunEngine` carries each one out on a
:class:`Loop` (the in-process closed loop for offline runs and tests, or the real daemons over
MQTT) and sends the result back into the generator, so a procedure reads like the paper::

    def force_set(weighings=17, window_s=58.0):
        yield from cmd("servo", "mass", aux=False)
        for k in range(weighings):
            yield from cmd("servo", "mass", test=k % 2 == 0)
            yield from cmd("servo", "erase")
            data = yield from measure("weighing", window_s)

The engine emits the run's documents as bluesky's event model does: ``start`` (plan name,
arguments, a SHA-256 of the configuration), one ``descriptor`` per stream, one ``event`` per
measurement, ``stop`` (``success``, ``abort`` or ``fail`` and the reason). Between messages it
honours ``pause``, ``resume`` and ``abort``; an abort runs the plan's safe ending (the NIST-4 at
the null in force mode, damping closed) before the ``stop`` document.

Counts and durations default to the papers' (seed 001, NIST-4: 30 sweeps per velocity set, 17
weighings of 78 readings in 58 s; seed 000, EFB: 11 gradient points within 2 mm, held by the
auxiliary electrode, gradient determinations bracketing the weighings).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generator, Mapping, Protocol

import numpy as np

from kibble.bus_schema.messages import DaqFrame
from kibble.control.trajectory import sweep_duration_s
from kibble.services.data.recordfile import config_hash

Plan = Generator["Msg", Any, Any]


def daq_arrays(frames: list[DaqFrame]) -> dict[str, np.ndarray]:
    """DAQ frames as one array per field (``frame``, ``sim_time_s``, ``coil_z_m``, ...)."""
    names = [n for n in DaqFrame.__struct_fields__ if n not in ("schema", "seq", "t_mono_s", "t_utc_s")]
    return {n: np.array([getattr(f, n) for f in frames]) for n in names}


class Loop(Protocol):
    """What the engine drives: one implementation per transport, in process
    (:class:`~kibble.services.harness.inprocess.InProcessStack`) and over the bus
    (:class:`~kibble.services.plans.mqtt_loop.BusLoop`, the harness's and the sequencer's)."""

    rate_hz: float

    async def command(self, service: str, command: str, **args: Any) -> dict[str, Any]: ...

    async def sim(self, command: str, **args: Any) -> dict[str, Any]: ...

    async def run_seconds(self, seconds: float, record: bool = True) -> dict[str, np.ndarray]: ...

    async def measure(self, seconds: float) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Msg:
    """One step of a plan, shaped like bluesky's: ``command``, the name the engine looks its
    handler up by (:attr:`RunEngine.commands`: ``cmd``, ``sim``, ``wait``, ``measure``,
    ``estimate``), the object it acts on (``obj``: a service for ``cmd``, a stream for
    ``measure``), the daemon's own command for ``cmd`` and ``sim`` (``request``: ``mode``,
    ``mass``, ``place_mass``, ...) and the keyword arguments."""

    command: str
    obj: str = ""
    request: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)


def cmd(service: str, command: str, **args: Any) -> Plan:
    """Send ``command`` to ``service``; the plan gets the reply's result."""
    return (yield Msg("cmd", service, command, args))


def sim(command: str, **args: Any) -> Plan:
    """A simulator control command (offline runs only; a real balance has no ``sim``)."""
    return (yield Msg("sim", "sim", command, args))


def wait(seconds: float) -> Plan:
    """Let the balance run for ``seconds`` (simulated or real)."""
    yield Msg("wait", args={"seconds": float(seconds)})


def measure(stream: str, seconds: float, **info: Any) -> Plan:
    """Record the DAQ frames of the next ``seconds`` as one event of ``stream``; the plan gets
    the frames (arrays of the DAQ frame's fields, SI)."""
    return (yield Msg("measure", stream, args={"seconds": float(seconds), "info": info}))


def estimate(seconds: float) -> Plan:
    """Announce the plan's nominal duration (s) for the engine's progress and ETA."""
    yield Msg("estimate", args={"seconds": float(seconds)})


def force_mode() -> Plan:
    """The servo in force mode, with the coil (link) at ``z_ref_m``: where it was away from it,
    the servo approaches from where it is (its reply names the ``approach`` and its
    ``duration_s``), and the plan waits that out, since a mass exchange or an erase needs force
    mode at rest. The plan gets the reply."""
    reply = yield from cmd("servo", "mode", mode="force")
    if reply.get("trajectory"):
        yield from wait(reply["duration_s"] + 0.5)
    return reply


# ================================================================================ NIST-4 plans


def velocity_set(sweeps: int = 30, travel_m: float = 0.08, margin_s: float = 1.0,
                 settle_s: float = 5.0) -> Plan:
    """NIST-4 velocity set: ``sweeps`` sweeps of ``travel_m`` alternating in direction, down
    first; the damping is on before each sweep and opened once the coil moves at constant
    velocity. Each sweep's constant-velocity part less ``margin_s`` at either end is one event
    of stream ``sweep``. The sweeps run at the servo's own speed, acceleration and jerk
    (``sweep_speed_m_per_s``, ``sweep_accel_m_per_s2``, ``sweep_jerk_m_per_s3``); the windows are timed
    from the servo's reply to each sweep, so they hold whatever those are set to."""
    speed = (yield from cmd("servo", "param.get", name="sweep_speed_m_per_s"))["value"]
    accel = (yield from cmd("servo", "param.get", name="sweep_accel_m_per_s2"))["value"]
    jerk = (yield from cmd("servo", "param.get", name="sweep_jerk_m_per_s3"))["value"]
    sweep_s = sweep_duration_s(speed, accel, travel_m, jerk or math.inf)
    if sweep_s - 2 * (sweep_s - travel_m / speed) - 2 * margin_s <= 0:
        raise ValueError(f"a {travel_m} m sweep has no constant-velocity part to measure")
    yield from estimate(sweeps * (sweep_s + 1.0) + 2 * travel_m / speed)
    yield from force_mode()
    lift = yield from cmd("servo", "mass", aux=True)
    if lift["delta_kg"]:
        # the force loop carries the auxiliary mass's load ramp; only then may the counter-mass
        # motor take over (it cannot hold the 5 N the main coil holds with the mass off)
        yield from wait(settle_s)
    yield from cmd("servo", "mode", mode="velocity")
    yield from cmd("servo", "param.set", name="sweep_travel_m", value=travel_m)
    move = yield from cmd("servo", "move", z_m=travel_m / 2)
    yield from wait(move["duration_s"] + 0.5)
    for k in range(sweeps):
        direction = "down" if k % 2 == 0 else "up"
        yield from cmd("damping", "close")
        sweep = yield from cmd("servo", "sweep", direction=direction)
        t_acc = sweep["duration_s"] - travel_m / sweep["speed_m_per_s"]   # either end (symmetric)
        cruise_s = sweep["duration_s"] - 2 * t_acc - 2 * margin_s
        yield from wait(t_acc + margin_s)
        yield from cmd("damping", "open")
        yield from measure("sweep", cruise_s, direction=direction, index=k)
        yield from wait(t_acc + margin_s + 0.5)
        yield from cmd("damping", "close")
    back = yield from cmd("servo", "move", z_m=0.0)
    yield from wait(back["duration_s"] + 0.5)
    yield from force_mode()


def force_set(weighings: int = 17, window_s: float = 58.0, settle_s: float = 5.0,
              erase: bool = True, erase_s: float = 170.0) -> Plan:
    """NIST-4 force set: the auxiliary mass removed, then ``weighings`` weighings alternating
    mass on / mass off, on first (9 on, 8 off for 17), an erase after every exchange, each
    weighing averaging over ``window_s`` (the paper: 78 readings in 58 s). Stream ``weighing``."""
    yield from estimate(settle_s + weighings * (window_s + settle_s + (erase_s if erase else 0.0)))
    yield from force_mode()
    yield from cmd("servo", "mass", aux=False)
    yield from wait(settle_s)
    for k in range(weighings):
        on = k % 2 == 0
        yield from cmd("servo", "mass", test=on)
        yield from wait(settle_s)
        if erase:
            info = yield from cmd("servo", "erase")
            yield from wait(info["duration_s"] + 1.0)
        yield from measure("weighing", window_s, mass_on=on, index=k)
    yield from cmd("servo", "mass", test=False)
    yield from wait(settle_s)


def nist4_run(force_sets: int = 1, velocity: Mapping[str, Any] | None = None,
              force: Mapping[str, Any] | None = None) -> Plan:
    """A run: velocity and force sets alternating, each force set bracketed by velocity sets."""
    yield from velocity_set(**(velocity or {}))
    for _ in range(force_sets):
        yield from force_set(**(force or {}))
        yield from velocity_set(**(velocity or {}))


def nist4_safe_ending() -> Plan:
    """Where an aborted NIST-4 plan leaves the balance: damping closed, a running trajectory
    (sweep, move, erase) finished, the coil moved back to the weighing position if it was in
    velocity mode, then at the null in force mode."""
    yield from cmd("damping", "close")
    state = yield from cmd("servo", "state")
    if state["trajectory"]:
        yield from wait(state["trajectory_left_s"] + 0.5)
    if state["mode"] == "velocity":
        back = yield from cmd("servo", "move", z_m=state["z_ref_m"])
        yield from wait(back["duration_s"] + 0.5)
    yield from force_mode()


# ================================================================================ EFB plans


def efb_weighing(settle_s: float = 10.0, window_s: float = 20.0) -> Plan:
    """EFB weighing: unloaded, loaded, unloaded, for each polarity (+ then -); stream
    ``weighing``."""
    yield from estimate(2 * 3 * (settle_s + window_s))
    yield from force_mode()
    for polarity in ("+", "-"):
        yield from cmd("servo", "param.set", name="polarity", value=polarity)
        for k, loaded in enumerate((False, True, False)):
            yield from cmd("servo", "mass", test=loaded)
            yield from wait(settle_s)
            yield from measure("weighing", window_s, loaded=loaded, polarity=polarity, index=k)
    yield from cmd("servo", "param.set", name="polarity", value="+")


def gradient_move_s(travel_m: float, speed_m_per_s: float, accel_m_per_s2: float) -> float:
    """Duration (s) of the servo's gradient-mode ``move`` over ``travel_m``: a trapezoid whose
    top speed is capped at 0.9 sqrt(accel travel), so that it always cruises."""
    if travel_m < 1e-9:
        return 0.0
    speed = min(speed_m_per_s, 0.9 * math.sqrt(accel_m_per_s2 * travel_m))
    return sweep_duration_s(speed, accel_m_per_s2, travel_m)


def efb_gradient(points: int = 11, span_m: float = 2e-3, sweeps: int = 2, settle_s: float = 5.0,
                 window_s: float = 10.0) -> Plan:
    """EFB capacitance-gradient determination (seed 000 section 3.1, figure 4): the servo hands
    the floating link to the auxiliary electrode (gradient mode; the main cylinders go on the
    capacitance bridge; first into force mode for ``settle_s`` if the link was not held) and
    holds it at ``points`` equidistant positions spanning ``span_m`` about the weighing
    position, ``sweeps`` sweeps alternating in direction (up first; with time no longer
    collinear with position the analysis can remove the capacitance's drift). At each point,
    after the move and ``settle_s``, the DAQ frames of ``window_s`` (the bridge reads about once
    a second) are one event of stream ``gradient`` (info: ``sweep``, ``index``, ``z_set_m``,
    ``z_weigh_m``). Then back to the weighing position and to the main electrodes (force mode).
    The paper gives no durations: settle 5 s, 10 readings per point."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 7:
        raise ValueError(f"points must be an integer >= 7 (the 5th-order fit), got {points!r}")
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 2:
        raise ValueError(f"sweeps must be an integer >= 2 (the drift removal), got {sweeps!r}")
    for name, value in (("span_m", span_m), ("window_s", window_s)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(settle_s, (int, float)) and math.isfinite(settle_s) and settle_s >= 0):
        raise ValueError(f"settle_s must be a number >= 0, got {settle_s!r}")
    state = yield from cmd("servo", "state")
    z_w = float(state["z_ref_m"])
    speed = (yield from cmd("servo", "param.get", name="gradient_speed_m_per_s"))["value"]
    accel = (yield from cmd("servo", "param.get", name="gradient_accel_m_per_s2"))["value"]
    positions = z_w + np.linspace(-0.5 * span_m, 0.5 * span_m, points)
    step_s = gradient_move_s(span_m / (points - 1), speed, accel)
    yield from estimate(2 * gradient_move_s(0.5 * span_m, speed, accel)
                        + sweeps * (points - 1) * step_s + (sweeps * points + 1) * settle_s
                        + sweeps * points * window_s)
    if state["mode"] != "force":
        yield from force_mode()
        yield from wait(settle_s)
    yield from cmd("servo", "mode", mode="gradient")
    for s in range(sweeps):
        for i, z in enumerate(positions if s % 2 == 0 else positions[::-1]):
            move = yield from cmd("servo", "move", z_m=float(z))
            yield from wait(move["duration_s"] + settle_s)
            yield from measure("gradient", window_s, sweep=s, index=i, z_set_m=float(z), z_weigh_m=z_w)
    yield from _efb_back_to_weighing(z_w, settle_s)


def _efb_back_to_weighing(z_w: float, settle_s: float) -> Plan:
    """Gradient mode -> the link at the weighing position ``z_w``, then force mode."""
    back = yield from cmd("servo", "move", z_m=z_w)
    yield from wait(back["duration_s"] + settle_s)
    yield from force_mode()


def efb_run(runs: int = 6, gradient_every: int = 3, gradient: Mapping[str, Any] | None = None,
            weighing: Mapping[str, Any] | None = None) -> Plan:
    """EFB run (seed 000 section 4.1): capacitance-gradient determinations bracketing the
    weighings at a regular interval: a determination, then ``runs`` weighing runs
    (:func:`efb_weighing`) with a determination after every ``gradient_every`` of them and after
    the last. ``gradient`` / ``weighing``: the arguments of :func:`efb_gradient` /
    :func:`efb_weighing`. The analysis gives each eq. (17) trial the average dC/dz of the
    determinations before and after its weighing run (n runs, n - 1 trials)."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an integer >= 1, got {runs!r}")
    if isinstance(gradient_every, bool) or not isinstance(gradient_every, int) or gradient_every < 1:
        raise ValueError(f"gradient_every must be an integer >= 1, got {gradient_every!r}")
    yield from efb_gradient(**(gradient or {}))
    for k in range(runs):
        yield from efb_weighing(**(weighing or {}))
        if (k + 1) % gradient_every == 0 or k == runs - 1:
            yield from efb_gradient(**(gradient or {}))


def efb_safe_ending() -> Plan:
    """Where an aborted EFB plan leaves the balance: a running move finished, the link brought
    back to the weighing position and handed back to the main electrodes if it was in gradient
    mode, then at the null in force mode."""
    state = yield from cmd("servo", "state")
    if state["trajectory"]:
        yield from wait(state["trajectory_left_s"] + 0.5)
    if state["mode"] == "gradient":
        yield from _efb_back_to_weighing(float(state["z_ref_m"]), 5.0)
    yield from cmd("servo", "param.set", name="z_ref_m", value=0.0)
    yield from force_mode()


def safe_ending_wrapper(plan: Plan, ending: Callable[[], Plan]) -> Plan:
    """``plan``, and if it fails or is aborted (the engine throws :class:`Aborted` into it at a
    message boundary), ``ending``'s messages, carried out like the plan's, before the exception
    goes on: bluesky's ``finalize_wrapper`` for the failure path (a plan that succeeds leaves
    the balance where its procedure ends, as the paper describes it)."""
    try:
        return (yield from plan)
    except Exception:
        yield from ending()
        raise


def with_safe_ending(plan_fn: Callable[..., Plan], ending: Callable[[], Plan]) -> Callable[..., Plan]:
    """``plan_fn`` as the engine runs it: wrapped in ``ending`` (:func:`safe_ending_wrapper`);
    the instruments' plans so wrapped are :data:`kibble.services.instruments.PLANS`."""
    @functools.wraps(plan_fn)
    def plan(**kwargs: Any) -> Plan:
        return safe_ending_wrapper(plan_fn(**kwargs), ending)  # a wrong argument: TypeError now
    return plan


# ================================================================================ the engine


class Aborted(Exception):
    """Raised inside :meth:`RunEngine.run` when the run was aborted."""


@dataclass
class Progress:
    step: int
    sim_s: float
    total_s: float
    eta_s: float | None


Handler = Callable[["Msg", "_Run"], Awaitable[tuple[Any, float]]]
"""A command's handler: ``(the reply the plan gets, the seconds of the balance it used)``."""


@dataclass
class _Run:
    """What the handlers of one run share."""

    uid: str
    descriptors: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    total_s: float = 0.0


class RunEngine:
    """Runs plans on a :class:`Loop` and emits the run documents.

    Each message is carried out by the handler its ``command`` names in :attr:`commands` (add
    one with :meth:`register_command`, as bluesky's ``RE.register_command``); a handler's
    failure (a daemon refusing a command) is thrown into the plan, and so is an abort, so that
    the plan's safe ending runs (:func:`safe_ending_wrapper`).

    :param emit: called with ``(name, document)`` for every document.
    :param progress: called with a :class:`Progress` after every message.
    """

    def __init__(self, loop: Loop, emit: Callable[[str, dict[str, Any]], None] = lambda n, d: None,
                 progress: Callable[[Progress], None] = lambda p: None) -> None:
        self.loop = loop
        self.emit = emit
        self.progress = progress
        self._running = asyncio.Event()
        self._running.set()
        self._abort: str | None = None
        self.state = "idle"
        self.commands: dict[str, Handler] = {
            "cmd": self._cmd, "sim": self._sim, "wait": self._wait, "measure": self._measure,
            "estimate": self._estimate}

    def register_command(self, name: str, handler: Handler) -> None:
        """Carry out the messages of command ``name`` with ``handler`` (replacing any)."""
        self.commands[name] = handler

    def pause(self) -> None:
        """Stop before the next message (the balance keeps holding where it is)."""
        if self.state == "running":
            self._running.clear()
            self.state = "paused"

    def resume(self) -> None:
        if self.state == "paused":
            self._running.set()
            self.state = "running"

    def abort(self, reason: str = "aborted by the operator") -> None:
        """End the run at the next message boundary; the plan's safe ending runs."""
        self._abort = reason
        self._running.set()

    async def run(self, name: str, plan_args: Mapping[str, Any] | None = None,
                  config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run plan ``name`` of :data:`kibble.services.instruments.PLANS` with ``plan_args``;
        the stop document."""
        from kibble.services.instruments import PLANS  # (the instruments' definitions import the plans)
        if name not in PLANS:
            raise ValueError(f"unknown plan {name!r}; one of {', '.join(PLANS)}")
        plan = PLANS[name](**(plan_args or {}))          # TypeError for a wrong argument: at once
        run = _Run(uid=str(uuid.uuid4()))
        self.emit("start", {"uid": run.uid, "time": time.time(), "plan_name": name,
                            "plan_args": dict(plan_args or {}), "config_hash": config_hash(config or {}),
                            "rate_hz": self.loop.rate_hz})
        self.state, self._abort = "running", None
        step, sim_s, t0 = 0, 0.0, time.monotonic()
        exit_status, reason = "success", ""
        reply: Any = None
        error: Exception | None = None
        aborted = False
        try:
            while True:
                await asyncio.sleep(0)   # a checkpoint: pause/abort requests get their turn
                await self._running.wait()
                if self._abort is not None and not aborted:
                    aborted, error = True, Aborted(self._abort)  # once: the safe ending runs on
                try:
                    msg = plan.throw(error) if error is not None else plan.send(reply)
                except StopIteration:
                    break
                reply, error = None, None
                handler = self.commands.get(msg.command)
                try:
                    if handler is None:
                        raise ValueError(f"unknown plan message {msg.command!r}")
                    reply, dt = await handler(msg, run)
                except Exception as exc:
                    error = exc
                    continue
                sim_s += dt
                step += 1
                wall = time.monotonic() - t0
                eta = wall / sim_s * max(run.total_s - sim_s, 0.0) if sim_s > 0 and run.total_s else None
                self.progress(Progress(step, sim_s, run.total_s, eta))
        except Aborted as exc:
            exit_status, reason = "abort", str(exc)
        except Exception as exc:
            exit_status, reason = "fail", f"{type(exc).__name__}: {exc}"
        finally:
            self.state = "idle"
        stop = {"uid": str(uuid.uuid4()), "run_start": run.uid, "time": time.time(),
                "exit_status": exit_status, "reason": reason,
                "num_events": dict(run.counts), "sim_s": sim_s}
        self.emit("stop", stop)
        return stop

    # ------------------------------------------------------------------ the commands

    async def _cmd(self, msg: Msg, run: _Run) -> tuple[Any, float]:
        return await self.loop.command(msg.obj, msg.request, **msg.args), 0.0

    async def _sim(self, msg: Msg, run: _Run) -> tuple[Any, float]:
        return await self.loop.sim(msg.request, **msg.args), 0.0

    async def _wait(self, msg: Msg, run: _Run) -> tuple[Any, float]:
        seconds = msg.args["seconds"]
        if seconds > 0:
            await self.loop.run_seconds(seconds, record=False)
        return None, max(seconds, 0.0)

    async def _estimate(self, msg: Msg, run: _Run) -> tuple[Any, float]:
        run.total_s += msg.args["seconds"]
        return None, 0.0

    async def _measure(self, msg: Msg, run: _Run) -> tuple[Any, float]:
        seconds = msg.args["seconds"]
        data = await self.loop.measure(seconds)
        stream = msg.obj
        if stream not in run.descriptors:
            run.descriptors[stream] = str(uuid.uuid4())
            self.emit("descriptor", {"uid": run.descriptors[stream], "run_start": run.uid,
                                     "name": stream, "time": time.time(), "data_keys": sorted(data)})
        run.counts[stream] = run.counts.get(stream, 0) + 1
        self.emit("event", {"uid": str(uuid.uuid4()), "descriptor": run.descriptors[stream],
                            "seq_num": run.counts[stream], "time": time.time(),
                            "info": dict(msg.args["info"]),
                            "data": {k: v.tolist() for k, v in data.items()}})
        return data, seconds
