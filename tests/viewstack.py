"""What the views' tests share: a NIST-4 stack in lockstep (``kibble up``'s :class:`Stack`) in
force mode, a view (``kibble dashboard`` or ``kibble epics``) as a child process as a user
starts it, and parameters looked up by what they are rather than by name."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from kibble.services.runtime.client import BusClient, result_of
from kibble.services.harness.up import Stack

RATE_HZ = 200.0


def make_stack(broker, tmp: Path, settings: dict | None = None) -> Stack:
    return Stack("nist4", clock="lockstep", rate_hz=RATE_HZ, broker_url=broker.url,
                 instrument=f"v{uuid.uuid4().hex[:8]}", seed=5, run_dir=tmp, settings=settings or {},
                 progress=lambda line: None)


async def request(stack: Stack, service: str, command: str, **args: Any) -> dict[str, Any]:
    async with BusClient(stack.broker_url, stack.instrument) as bus:
        return result_of(await bus.request(service, command, args, timeout_s=10.0), service, command)


async def proportional_gain(stack: Stack) -> dict[str, Any]:
    """The servo's proportional gain as its ``param.list`` declares it: the first parameter
    whose name starts with ``kp_``."""
    params = (await request(stack, "servo", "param.list"))["params"]
    return next(p for p in params if p["name"].startswith("kp_"))


def start_view(argv: list[str], env: dict[str, str], ready_word: str) -> tuple[subprocess.Popen, str]:
    """Start ``kibble ...`` and wait for the first line of its output that contains
    ``ready_word``; (the process, that line)."""
    proc = subprocess.Popen([str(Path(sys.executable).with_name("kibble")), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30.0
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if ready_word in line:
            return proc, line.strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"kibble {argv[0]} did not start: {proc.communicate()[0]}")


def stop_view(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def eventually(check, timeout_s: float = 10.0, every_s: float = 0.1):
    """``await check()`` until it returns something true (returned), else AssertionError with
    the last result."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every_s)
    raise AssertionError(f"not within {timeout_s} s; last: {last!r}")
