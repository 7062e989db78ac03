"""Real time over a real broker: newest frame wins, honest timing, the age limit, and both
instruments held on the wall clock with an operator watching ``kb/#`` (issue 12)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from typing import Any

import numpy as np
import pytest

from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import (
    Command, Event, HwActuatorCommand, HwSensorFrame, Setpoint, SimTruth, Status,
)
from kibble.bus_schema.transport import make_client, publish_now
from kibble.services.daemons.current_source import CurrentSource
from kibble.services.runtime.service import Service, ServiceConfig
from kibble.services.harness.scenarios import band_rms
from kibble.services.instruments import instrument
from kibble.services.harness.up import Stack
from tests.services.runtime.test_runtime_bus import running

pytestmark = pytest.mark.broker

RATE_HZ = 500.0


def _config(broker, tmp_path, **settings: Any) -> ServiceConfig:
    return ServiceConfig(broker=broker.url, instrument=f"t{uuid.uuid4().hex[:10]}",
                         state_dir=tmp_path, heartbeat_s=0.5, settings=settings)


async def feed(url: str, frames: dict[str, Any], rate_hz: float, seconds: float,
               first: int = 0) -> int:
    """Publish one message per topic of ``frames`` (a frame index -> message function) every
    period on the wall clock, drift-free; returns the next frame index."""
    client = make_client(url, f"feed-{uuid.uuid4().hex[:6]}")
    async with client:
        loop = asyncio.get_running_loop()
        t0, k = loop.time(), first
        while k - first < seconds * rate_hz:
            for topic, make in frames.items():
                msg = make(k)
                msg.t_mono_s = time.monotonic()
                publish_now(client, topic, encode(msg))
            k += 1
            delay = t0 + (k - first) / rate_hz - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    return k


class SlowLoop(Service):
    """One frame topic; burns ``busy_s`` of CPU per frame: it cannot keep up at 500 Hz."""

    name = "slow"

    def setup(self) -> None:
        self.busy_s = 3e-3
        self.acted: list[int] = []
        self.subscribe(self.topics.setpoint("driver"), Setpoint, self.on_frame)
        self.frame_clock(self.topics.setpoint("driver"), 1.0 / RATE_HZ)

    def on_frame(self, sp: Setpoint) -> None:
        self.acted.append(sp.frame)
        t_end = time.thread_time() + self.busy_s
        while time.thread_time() < t_end:
            pass


async def test_a_slow_daemon_skips_frames_instead_of_building_a_backlog(broker, tmp_path):
    svc = SlowLoop(_config(broker, tmp_path))
    async with running(svc):
        statuses: list[Status] = []
        client = make_client(broker.url, "watch-slow")
        async with client:
            await client.subscribe(svc.topics.status("slow"))

            async def watch() -> None:
                async for message in client.messages:
                    statuses.append(decode(message.payload, Status))

            watcher = asyncio.create_task(watch())
            await feed(broker.url, {svc.topics.setpoint("driver"):
                                    lambda k: Setpoint(frame=k, values={"x_m": 1.0})}, RATE_HZ, 4.0)
            await asyncio.sleep(1.2)
            watcher.cancel()
    sent = int(4.0 * RATE_HZ)
    assert svc.acted[-1] >= sent - 3, "it must end on (almost) the newest frame, not in a backlog"
    skipped = svc.counters["frames_skipped"]
    assert skipped > 0.25 * sent  # 3 ms per 2 ms frame: at most 2/3 can be acted on
    assert len(svc.acted) + skipped >= sent - 5  # every frame acted on or counted skipped
    assert svc.counters["overruns"] > 0.5 * len(svc.acted)  # CPU per frame above the period
    busy = [s.timing for s in statuses if s.timing.frames > 100]
    assert busy, "the heartbeat must report the intervals it acted in"
    for timing in busy:
        assert timing.age_ms_p99 <= 2 * 1e3 / RATE_HZ + 1.0  # within 2 frames (+1 ms transit)
        assert timing.skipped > 0 and timing.cpu_us_p50 >= 3000


async def test_past_the_age_limit_the_actuator_holds_then_goes_safe_with_one_event(broker, tmp_path):
    cfg = _config(broker, tmp_path, frame_rate_hz=RATE_HZ, hold_s=0.2, stale_after_s=0.05)
    cs = CurrentSource(cfg)
    t = cs.topics
    sensors = lambda k: HwSensorFrame(frame=k)  # noqa: E731
    setpoint = lambda k: Setpoint(frame=k, values={"main_coil_current_a": 1e-3,  # noqa: E731
                                                   "counter_mass_current_a": 0.0})
    frames = {t.hw("sensors"): sensors, t.setpoint("servo"): setpoint}
    events: list[Event] = []
    async with running(cs):
        client = make_client(broker.url, "watch-cs")
        async with client:
            await client.subscribe(t.event("current_source"))

            async def watch() -> None:
                async for message in client.messages:
                    events.append(decode(message.payload, Event))

            watcher = asyncio.create_task(watch())
            # the frames come from another thread (its own event loop): the hardware goes on
            feeder = asyncio.create_task(asyncio.to_thread(asyncio.run, feed(broker.url, frames, RATE_HZ, 5.0)))
            await asyncio.sleep(0.5)
            cs.cmd_arm(Command(command="arm", id="1"))
            await asyncio.sleep(1.0)
            assert cs.guard.state == "armed" and cs.counters["too_old"] == 0
            # the daemon's event loop hangs for 1.5 s (this test's loop runs it): when it wakes
            # up its socket holds 750 frames of each topic (~105 kB), more than one read takes
            # (64 kB), so the newest frame of the first batches is ~0.7 s old (the limit is 20
            # frames, 40 ms): it must not apply them, and goes safe after its hold (0.2 s).
            # A shorter hang, whose backlog fits in one read, skips to the newest frame at once;
            # one of 2 s reaches the 2 s keepalive, and a lost broker disarms the daemon instead.
            time.sleep(1.5)
            await feeder
            await asyncio.sleep(0.3)
            watcher.cancel()
    kinds = [e.kind for e in events]
    assert "stale" in kinds and "safe" in kinds
    # one event for the backlog that put it safe, not one per old frame; a later batch of the
    # same backlog may again be just past the limit once a fresh frame got through (a CI
    # rehearsal on 2026-12-07: frame 1484 at 40.3 ms after going safe), a new episode
    assert kinds[:kinds.index("safe")].count("too_old") == 1, kinds
    assert cs.guard.state == "safe"  # stays safe: an operator arms again
    assert cs.counters["too_old"] >= 1
    assert cs.counters["late"] > 0  # the old frames were counted late
    assert cs.counters["frames_skipped"] > 100  # the backlog was skipped, not worked through


# ------------------------------------------------------------------ both instruments held

HOLD_S = 60.0
HOLD_RATE_HZ = 200.0
"""The rate of the held stacks: on 2026-12-02 this machine no longer held 500 Hz with margin
(answered 0.955-0.976 over five 60 s holds on a quiet machine, the code before and after that
day's changes alike; 0.998 on 2026-12-01); the 500 and 1000 Hz figures are the bench's
(``kibble bench --only realtime``)."""
SETTLE_S = 10.0
"""After force mode, as the lockstep figures settle (scenarios.force_null)."""


async def _observe(url: str, instrument: str, seconds: float) -> dict[str, Any]:
    """An operator's client on ``kb/<instrument>/#`` decoding every message for ``seconds``."""
    types = {"sensors": HwSensorFrame, "truth": SimTruth, "status": Status, "event": Event}
    got: dict[str, list] = {"sensors": [], "commands": [], "truth": [], "events": [], "status": {}}
    client = make_client(url, f"operator-{uuid.uuid4().hex[:6]}")
    async with client:
        await client.subscribe(f"kb/{instrument}/#", qos=0)
        deadline = time.monotonic() + seconds
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(seconds):
                async for message in client.messages:
                    now = time.monotonic()
                    parts = str(message.topic).split("/")
                    leaf = parts[-1]
                    try:
                        if parts[2] == "hw" and leaf != "sensors":
                            cmd = decode(message.payload, HwActuatorCommand)
                            got["commands"].append((now, cmd.device, cmd.frame, cmd.hold_frames))
                        elif leaf in types:
                            msg = decode(message.payload, types[leaf])
                            if leaf == "sensors":
                                got["sensors"].append((now, msg.frame))
                            elif leaf == "truth":
                                got["truth"].append((msg.sim_time_s, msg.values))
                            elif leaf == "event":
                                got["events"].append(msg)
                            else:
                                got["status"][msg.service] = msg
                    except DecodeError as exc:
                        raise AssertionError(f"{message.topic}: {exc}") from None
                    if now > deadline:
                        break
    return got


def _figures(model: str, got: dict[str, Any]) -> dict[str, float]:
    devices = instrument(model).devices
    t_sensor = {k: t for t, k in got["sensors"]}
    covered: dict[str, set[int]] = {d: set() for d in devices}
    last: dict[int, float] = {}
    for t, device, k, hold in got["commands"]:
        if device in covered and k in t_sensor:
            covered[device].update(range(k, k + hold))
            last[k] = max(last.get(k, 0.0), t)
    frames = sorted(t_sensor)[50:-50]  # away from the window's edges
    answered = np.mean([all(k in covered[d] for d in devices) for k in frames])
    lat = np.array([last[k] - t_sensor[k] for k in frames if k in last])
    truth = sorted(got["truth"], key=lambda x: x[0])
    z = np.array([v["z_m"] for _, v in truth])
    fs = (len(truth) - 1) / (truth[-1][0] - truth[0][0])
    return {"answered": float(answered), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "null_nm": band_rms(z, fs) * 1e9, "frames": len(frames),
            "lost": int(frames[-1] - frames[0] + 1 - len(frames))}


@pytest.mark.parametrize("model", ["nist4", "efb"])
async def test_both_instruments_hold_their_null_in_realtime_with_an_operator_watching(model, tmp_path):
    """The whole stack on the wall clock at :data:`HOLD_RATE_HZ` (a rate this 2-core machine
    holds with margin, see README 'Real time'), force mode, 60 s with an outside subscriber to kb/#:
    every sensor frame answered by every actuator, no trip, no stale input, frame ages bounded,
    the null held."""
    async with Stack(model, clock="realtime", rate_hz=HOLD_RATE_HZ, run_dir=tmp_path,
                     progress=lambda line: None) as stack:
        assert stack.broker_url is not None
        await stack.request("servo", "mode", {"mode": "force"})
        await asyncio.sleep(SETTLE_S)
        got = await _observe(stack.broker_url, stack.instrument, HOLD_S)
    kinds = [(e.service, e.kind) for e in got["events"]]
    assert not [k for k in kinds if k[1] in ("trip", "safe", "stale", "too_old")], kinds
    for name in instrument(model).actuators:
        assert got["status"][name].state == "armed", (name, got["status"][name].detail)
    fig = _figures(model, got)
    print(model, fig)
    assert fig["frames"] >= 0.95 * HOLD_S * HOLD_RATE_HZ and fig["lost"] == 0, fig
    # a frame the daemons skipped (woken late, two frames waiting: the newest wins) is never
    # answered; on this shared 2-core machine a few in a hundred are (README 'Real time')
    assert fig["answered"] >= 0.98, fig
    assert fig["p99_ms"] < 5.0, fig
    for status in got["status"].values():
        if status.service != "sim" and status.timing.frames:
            assert status.timing.age_ms_p99 < 5 * 1e3 / HOLD_RATE_HZ, (status.service, status.timing)
    # the null: NIST-4 holds ~0.005 nm and the EFB ~0.01 nm in 0.1 Hz in lockstep (docs/architecture.md
    # section 7 figures, quiet simulator noise); a lost balance sits at its stops, mm away
    assert math.isfinite(fig["null_nm"]) and fig["null_nm"] < 1.0, fig
