"""``sequencer``: runs measurement plans (:mod:`kibble.services.plans.engine`) on the live stack.

The run engine drives the other daemons exactly as an operator would, over the bus, on the
harness's :class:`~kibble.services.plans.mqtt_loop.BusLoop` riding on this daemon's connection: commands
with request/reply, time counted in DAQ frames (``daq/frame``: simulated time in lockstep, real
time on hardware), measurements as the DAQ frames of a window. The run's documents (start,
descriptor, event, stop) go out on ``kb/<instrument>/sequencer/run`` (QoS 1, format of
:func:`kibble.services.data.recordfile.encode_document`), where the recorder picks them up.

Commands (besides ``param.*``):

- ``run plan=NAME [run_id=ID] [ARG=VALUE ...]``: start plan ``NAME`` of :data:`kibble.services.instruments.PLANS`;
  every other argument is the plan's (``weighings=5``; ``velocity.sweeps=4`` for the nested
  arguments of ``nist4_run``); with ``run_id`` the recorder is asked to record the run into
  ``ID`` first (and to stop after). Refused while a plan runs, for an unknown plan or a wrong
  argument.
- ``pause``, ``resume``: hold the plan between steps (the balance keeps doing what it does).
- ``abort [reason=TEXT]``: end the plan at the next step boundary through its safe ending
  (NIST-4: trajectory finished, back at the weighing position, force mode, damping closed).
- ``state``: plan, state, step, simulated seconds done and planned, ETA, the last stop.

Progress (step, ETA) is in the status detail and in a ``progress`` event every
``progress_every_s`` of wall time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec

from kibble.bus_schema.messages import Command, DaqFrame, Reply, Severity
from kibble.services.plans import engine as P
from kibble.services.plans.mqtt_loop import BusLoop
from kibble.services.instruments import PLANS
from kibble.services.data.recordfile import encode_document, run_document_topic
from kibble.services.runtime.actuator import typed_settings
from kibble.services.runtime.service import Service, command


class SequencerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    frame_rate_hz: float = 1000.0
    """DAQ frame rate (frames per second of plan time)."""
    command_timeout_s: float = 10.0
    """Wall time a daemon has to answer one of the plan's commands."""
    frame_timeout_s: float = 10.0
    """Wall time without a DAQ frame after which the plan fails (the stack is not running)."""
    progress_every_s: float = 5.0
    """Wall-time period of the ``progress`` event."""


class Sequencer(Service):
    name = "sequencer"

    def setup(self) -> None:
        self.settings = typed_settings(self.config.settings, SequencerSettings, self.name)
        self.loop = BusLoop.on_node(self.request, self.settings.frame_rate_hz,
                                    self.settings.frame_timeout_s)
        self.subscribe(self.topics.frame("daq"), DaqFrame, self.loop.take_daq_frame, newest_only=False)
        self.subscribe(self.topics.reply(self.name), Reply, self.on_reply, is_frame=False)
        self.engine = P.RunEngine(self.loop, emit=self.emit_document, progress=self.on_progress)
        self.run_task: asyncio.Task | None = None
        self.plan_name = ""
        self.run_id = ""
        self.progress = P.Progress(0, 0.0, 0.0, None)
        self.last_stop: dict[str, Any] = {}
        self._pending: dict[str, asyncio.Future] = {}
        self._last_progress_event = 0.0

    # ---------------------------------------------------------------- bus plumbing

    def on_reply(self, reply: Reply) -> None:
        fut = self._pending.pop(reply.id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    async def request(self, service: str, command_name: str, args: dict[str, Any]) -> Reply:
        cid = f"{self.name}-{uuid.uuid4().hex[:12]}"
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        self.publish(self.topics.cmd(service), Command(
            id=cid, command=command_name, args=args, reply_to=self.topics.reply(self.name),
            client_id=self.client_id), qos=1)
        try:
            return await asyncio.wait_for(fut, self.settings.command_timeout_s)
        except asyncio.TimeoutError:
            raise ValueError(f"no reply from {service!r} to {command_name!r} within "
                             f"{self.settings.command_timeout_s} s") from None
        finally:
            self._pending.pop(cid, None)

    def emit_document(self, name: str, doc: dict[str, Any]) -> None:
        self.publish_bytes(run_document_topic(self.topics.instrument), encode_document(name, doc), qos=1)

    def on_progress(self, progress: P.Progress) -> None:
        self.progress = progress
        now = time.monotonic()
        if now - self._last_progress_event >= self.settings.progress_every_s:
            self._last_progress_event = now
            eta = "?" if progress.eta_s is None else f"{progress.eta_s:.0f} s"
            self.event("progress", f"{self.plan_name}: step {progress.step}, {progress.sim_s:.0f} of "
                                   f"{progress.total_s:.0f} s, ETA {eta}",
                       data={"step": progress.step, "sim_s": progress.sim_s,
                             "total_s": progress.total_s, "eta_s": progress.eta_s or -1.0})

    # ---------------------------------------------------------------- running plans

    @command("run")
    def cmd_run(self, cmd: Command) -> dict[str, Any]:
        if self.run_task is not None and not self.run_task.done():
            raise ValueError(f"plan {self.plan_name!r} is running; abort it first")
        name = str(cmd.args.get("plan", ""))
        if name not in PLANS:
            raise ValueError(f"unknown plan {name!r}; one of {', '.join(PLANS)}")
        args: dict[str, Any] = {}
        for key, value in cmd.args.items():
            if key in ("plan", "run_id"):
                continue
            head, dot, tail = key.partition(".")
            if dot:
                args.setdefault(head, {})[tail] = value
            else:
                args[key] = value
        try:
            PLANS[name](**args).close()           # a wrong argument is refused now
        except TypeError as exc:
            raise ValueError(f"plan {name}: {exc}") from None
        run_id = str(cmd.args.get("run_id", ""))
        self.plan_name, self.run_id = name, run_id
        self.progress = P.Progress(0, 0.0, 0.0, None)
        self.last_stop = {}
        self.run_task = asyncio.get_running_loop().create_task(self._run(name, args, run_id))
        self.set_state("running")
        return {"plan": name, "args": args, "run_id": run_id}

    async def _run(self, name: str, args: dict[str, Any], run_id: str) -> None:
        try:
            if run_id:
                reply = await self.request("recorder", "start", {"run_id": run_id})
                if not reply.ok:
                    self.last_stop = {"exit_status": "fail", "reason": f"recorder: {reply.error}"}
                    self.event("run_failed", f"{name}: the recorder refused: {reply.error}",
                               severity="alarm")
                    return
            self.last_stop = await self.engine.run(name, args, config={"plan": name, "args": args})
            severity: Severity = "info" if self.last_stop["exit_status"] == "success" else "warning"
            self.event("run_end", f"{name}: {self.last_stop['exit_status']} {self.last_stop['reason']}",
                       severity=severity, data={"exit_status": self.last_stop["exit_status"]})
        finally:
            if run_id:
                try:
                    await self.request("recorder", "stop", {})
                except ValueError as exc:
                    self.event("run_failed", f"{name}: stopping the recorder: {exc}", severity="alarm")
            self.set_state("idle")

    @command("pause")
    def cmd_pause(self, cmd: Command) -> dict[str, Any]:
        self._running_or_refuse("pause")
        self.engine.pause()
        self.set_state("paused")
        return {"state": self.engine.state}

    @command("resume")
    def cmd_resume(self, cmd: Command) -> dict[str, Any]:
        self._running_or_refuse("resume")
        self.engine.resume()
        self.set_state("running")
        return {"state": self.engine.state}

    @command("abort")
    def cmd_abort(self, cmd: Command) -> dict[str, Any]:
        self._running_or_refuse("abort")
        self.engine.abort(str(cmd.args.get("reason", "aborted by the operator")))
        return {"state": "aborting"}

    def _running_or_refuse(self, what: str) -> None:
        if self.run_task is None or self.run_task.done():
            raise ValueError(f"{what}: no plan is running")

    @command("state")
    def cmd_state(self, cmd: Command) -> dict[str, Any]:
        return self.status_detail() | {"last_stop": self.last_stop}

    def status_detail(self) -> dict[str, Any]:
        p = self.progress
        return {"plan": self.plan_name, "run_id": self.run_id, "engine": self.engine.state,
                "step": p.step, "sim_s": p.sim_s, "total_s": p.total_s,
                "eta_s": -1.0 if p.eta_s is None else p.eta_s,
                "last_exit": self.last_stop.get("exit_status", "")}

    async def on_stop(self) -> None:
        if self.run_task is not None and not self.run_task.done():
            self.engine.abort("sequencer stopping")
            await asyncio.wait([self.run_task], timeout=30.0)
