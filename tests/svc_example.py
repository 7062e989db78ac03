"""A small service for the runtime tests: run in-process or as ``kibble service
tests.svc_example:ExampleService``.

It reads ``<instrument>/driver/setpoint`` (a :class:`Setpoint` with ``x_m``) and answers every
one on ``<instrument>/example/frame`` with ``coil_z_m = gain * x_m`` (0 when disabled), so a test
sees a parameter change take effect on the bus; a ``boom`` value makes the handler raise. It
records what the runtime's hooks saw.
"""

from __future__ import annotations

import time
from typing import Any

from kibble.bus_schema.messages import Command, DaqFrame, Setpoint
from kibble.services.runtime.params import Param
from kibble.services.runtime.service import Service, command


class ExampleService(Service):
    name = "example"

    gain = Param(1.0, unit="V/m", min=0.0, max=10.0, doc="output per metre of input")
    window = Param(5, unit="frames", min=1, max=100, doc="averaging window")
    mode = Param("normal", choices=("normal", "hold"), doc="operating mode")
    enabled = Param(True, doc="answer setpoints with a frame")
    firmware = Param("1.0", read_only=True, doc="reported firmware version")

    def setup(self) -> None:
        self.applied: list[tuple[str, Any, Any]] = []
        self.disconnects: list[float] = []
        self.connects: list[float] = []
        self.stopped = False
        self.subscribe(self.topics.setpoint("driver"), Setpoint, self.on_setpoint)

    def on_setpoint(self, sp: Setpoint) -> None:
        self.loop_timer.tick(time.monotonic())
        if "boom" in sp.values:
            raise RuntimeError("boom requested")
        x = sp.values.get("x_m", 0.0)
        out = DaqFrame(frame=sp.frame, coil_z_m=self.gain * x if self.enabled else 0.0)
        if self.publish(self.topics.frame(self.name), out):
            self.counters["frames_out"] += 1

    def on_param_changed(self, name: str, old: Any, new: Any) -> None:
        self.applied.append((name, old, new))

    async def on_connected(self) -> None:
        self.connects.append(time.monotonic())

    async def on_disconnect(self) -> None:
        self.disconnects.append(time.monotonic())

    async def on_stop(self) -> None:
        self.stopped = True

    def status_detail(self) -> dict[str, Any]:
        return {"mode": self.mode, "gain": self.gain}

    @command("echo")
    def echo(self, cmd: Command) -> dict[str, Any]:
        return {"args": dict(cmd.args)}

    @command("fail")
    async def fail(self, cmd: Command) -> dict[str, Any]:
        raise ValueError("fail was asked to fail")
