"""Benchmarks behind ``kibble bench`` (and ``make bench``): flat JSON of measured figures.

Groups:

- ``bus``: ``bus_hop_p50_ms``, ``bus_hop_p99_ms``, ``bus_frames_lost`` (a DAQ frame at 1 kHz
  for 30 s from one service process to another through a private mosquitto, both on the
  runtime's own publish/subscribe path; one hop = publish call to handler call, on the shared
  monotonic clock) and ``codec_roundtrip_ns`` (encode + decode of a DAQ frame).
- ``control``: ``kibble.control.bench``; ``sim``: ``kibble.hil_sim.bench``; ``loop``:
  ``kibble.services.bench.loop`` (closed loop in process and over the bus, ~10 minutes).
- ``campaign``: ``kibble.services.bench.campaign`` (h from one offline NIST-4 triplet at the
  paper's counts and the EFB's 1 mg, ``campaign_h_rel_err``, ``campaign_h_rel_u``,
  ``efb_mass_rel_err``, ``efb_mass_rel_u``, ``campaign_wall_s``). Not in
  :data:`DEFAULT_GROUPS`: it takes 20 to 40 minutes; ``--only campaign`` runs it.
- ``robust``: ``kibble.services.bench.robustness`` (20 seeded NIST-4 plants drawn inside their
  tolerance bands, each closed loop in process with the default tuning: the worst, median and
  least null RMS and exchange peaks over the plants, ``robust_plants_missed``). Not in
  :data:`DEFAULT_GROUPS`; ``--only robust`` runs it.
- ``fidelity``: ``kibble.services.bench.fidelity`` (the simulator's scatter on the published
  noise profile beside seed 001's: ``fidelity_h_triplet_scatter_rel``,
  ``fidelity_flux_velocity_rel``, ``fidelity_flux_force_rel``, and seed 000's EFB null
  ``fidelity_efb_null_nm`` beside our loop's ``efb_null_rms_nm``, each with ``_published``,
  ``_ratio`` and ``_u``). Not in :data:`DEFAULT_GROUPS`: 8 triplets take ~80 minutes
  simulated; ``--only fidelity`` runs it (``--fidelity-triplets``, ``--fidelity-seed``).
- ``realtime``: ``kibble.services.bench.realtime`` (the whole stack in real time, in force mode, seen
  by an outside observer process: sensor-to-actuator latency, frames answered, trips, null,
  CPU per frame per process, ``rt_<model>_<rate>_...``). Not in :data:`DEFAULT_GROUPS`: its
  default four cases of 300 s take about 22 minutes; ``--only realtime`` runs it
  (``--rt-seconds``, ``--rt-cases``, ``--rt-settle``).
- ``soak``: ``kibble.services.bench.realtime.run_soak`` (the NIST-4 stack in real time at 200 Hz for
  an hour with the recorder recording and the broker restarted in the middle, seen by the same
  observer: frames lost, reconnects, trips, memory growth per hour per process, whether the run
  file records the outage as a gap; ``soak_<model>_...``, ``soak_recorder_...``). Not in
  :data:`DEFAULT_GROUPS`; ``--only soak`` runs it (``--soak-seconds``, ``--soak-case``).
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kibble.bus_schema.codec import decode, encode
from kibble.bus_schema.messages import DaqFrame
from kibble.services.harness.broker import Broker
from kibble.services.runtime.service import Service, ServiceConfig

BUS_RATE_HZ = 1000.0
BUS_DURATION_S = 30.0


def bench_codec(repeats: int = 7, number: int = 100_000) -> float:
    """Best-of-``repeats`` time of one encode + decode of a full DAQ frame, in ns."""
    frame = DaqFrame(frame=123456, sim_time_s=123.456, coil_z_m=1.234e-9, coil_x_m=-2e-6,
                     coil_theta_x_rad=3e-7, main_coil_current_a=9.8e-3, pressure_pa=1e-3)
    best = min(timeit.repeat(lambda: decode(encode(frame), DaqFrame), number=number, repeat=repeats))
    return best / number * 1e9


READY_TIMEOUT_S = 30.0
"""How long the sink process may take to start, connect and subscribe."""
DRAIN_S = 2.0
"""After the last frame is sent, how long the sink waits for stragglers before it stops."""


class _HopSink(Service):
    name = "bench_sink"

    def __init__(self, config: ServiceConfig, n_frames: int, topic: str) -> None:
        self.n_frames = n_frames
        self.hop_topic = topic
        self.latency_s = np.full(n_frames, np.nan)
        super().__init__(config)

    def setup(self) -> None:
        self.subscribe(self.hop_topic, DaqFrame, self.on_frame, newest_only=False)

    def on_frame(self, frame: DaqFrame) -> None:
        if 0 <= frame.frame < self.n_frames:
            self.latency_s[frame.frame] = time.monotonic() - frame.t_mono_s
        if frame.frame == self.n_frames - 1:
            self.stop()


def _sink_main(broker: str, state_dir: str, n_frames: int, topic: str, out: str, ready, sent) -> None:
    """The receiving service, in a process of its own: ``ready`` once subscribed; it stops
    at the last frame, or ``DRAIN_S`` after the source set ``sent``, whichever comes first."""
    sink = _HopSink(ServiceConfig(broker=broker, instrument="bench", state_dir=Path(state_dir),
                                  restore=False), n_frames, topic)

    async def main() -> None:
        async def supervise() -> None:
            await sink.connected.wait()
            ready.set()
            while not sent.is_set():  # noqa: ASYNC110 (a multiprocessing.Event: nothing to await)
                await asyncio.sleep(0.1)
            await asyncio.sleep(DRAIN_S)
            sink.stop()
        watcher = asyncio.create_task(supervise())
        await sink.run(install_signal_handlers=False)
        watcher.cancel()
    asyncio.run(main())
    np.save(out, sink.latency_s)


class _HopSource(Service):
    name = "bench_source"


async def _bus_hop(broker: str, n_frames: int, rate_hz: float) -> np.ndarray:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kibble-bench-") as tmp:
        topic = "kb/bench/bench_source/frame"
        out = Path(tmp) / "latency.npy"
        ready, sent = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_sink_main, args=(broker, tmp, n_frames, topic, str(out), ready, sent),
                           daemon=True)
        proc.start()
        source = _HopSource(ServiceConfig(broker=broker, instrument="bench", state_dir=Path(tmp),
                                          restore=False))
        run = asyncio.create_task(source.run(install_signal_handlers=False))
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not (ready.is_set() and source.connected.is_set()):
                if not proc.is_alive():
                    raise RuntimeError(f"bus bench: the sink process exited with code {proc.exitcode} "
                                       "before it subscribed")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bus bench: sink ready {ready.is_set()}, source connected "
                                       f"{source.connected.is_set()} after {READY_TIMEOUT_S} s at {broker}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            period = 1.0 / rate_hz
            t0 = time.monotonic()
            for k in range(n_frames):
                delay = t0 + k * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                source.publish(topic, DaqFrame(frame=k, sim_time_s=k * period, coil_z_m=1e-9))
            sent.set()
            await asyncio.get_running_loop().run_in_executor(None, proc.join, DRAIN_S + 10.0)
        finally:
            source.stop()
            await run
            if proc.is_alive():
                proc.kill()
                proc.join()
        if proc.exitcode != 0 or not out.exists():
            raise RuntimeError(f"bus bench: the sink process failed (exit code {proc.exitcode})")
        return np.load(out)


def bench_bus(broker: str | None = None, duration_s: float = BUS_DURATION_S,
              rate_hz: float = BUS_RATE_HZ) -> dict[str, float]:
    """One-hop latency and loss at ``rate_hz`` for ``duration_s`` through the runtime."""
    n_frames = int(duration_s * rate_hz)

    async def main() -> np.ndarray:
        if broker is not None:
            return await _bus_hop(broker, n_frames, rate_hz)
        async with Broker(backend="mosquitto") as private:
            return await _bus_hop(private.url, n_frames, rate_hz)

    latency = asyncio.run(main())
    got = latency[np.isfinite(latency)]
    return {
        "bus_hop_p50_ms": float(np.percentile(got, 50) * 1e3) if got.size else float("nan"),
        "bus_hop_p99_ms": float(np.percentile(got, 99) * 1e3) if got.size else float("nan"),
        "bus_hop_max_ms": float(got.max() * 1e3) if got.size else float("nan"),
        "bus_frames_lost": int(n_frames - got.size),
        "bus_frames_sent": n_frames,
        "codec_roundtrip_ns": bench_codec(),
    }


def _external(target: str) -> Callable[..., dict[str, float]]:
    def run(**kwargs: Any) -> dict[str, float]:
        module_name, _, func = target.partition(":")
        return getattr(importlib.import_module(module_name), func)(**kwargs)
    return run


GROUPS: dict[str, Callable[..., dict[str, float]]] = {
    "bus": bench_bus,
    "control": _external("kibble.control.bench:run"),
    "sim": _external("kibble.hil_sim.bench:run"),
    "loop": _external("kibble.services.bench.loop:run"),
    "hil": _external("kibble.services.bench.loop:run_hil"),
    "campaign": _external("kibble.services.bench.campaign:run"),
    "robust": _external("kibble.services.bench.robustness:run"),
    "fidelity": _external("kibble.services.bench.fidelity:run"),
    "realtime": _external("kibble.services.bench.realtime:run"),
    "soak": _external("kibble.services.bench.realtime:run_soak"),
    "views": _external("kibble.services.views.bench:run"),
}
DEFAULT_GROUPS = ("bus", "control", "sim", "loop")
"""What ``kibble bench`` runs without ``--only`` (``hil`` is the over-the-bus part of ``loop``;
``campaign``, 20 to 40 minutes of offline campaigns, ``realtime``, about 22 minutes of the
whole stack in real time, and ``soak``, an hour, run only when asked for)."""


def run_benchmarks(only: list[str] | None = None, broker: str | None = None,
                   progress: Callable[[str], None] = print,
                   group_args: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """Run the named groups (default all) and merge their figures into one flat dict.

    ``group_args``: keyword arguments per group, e.g. ``{"realtime": {"seconds": 20}}``."""
    names = only or list(DEFAULT_GROUPS)
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {unknown}; known: {', '.join(GROUPS)}")
    results: dict[str, float] = {}
    for name in names:
        progress(f"bench {name} ...")
        t0 = time.monotonic()
        kwargs = (group_args or {}).get(name, {})
        figures = GROUPS[name](broker, **kwargs) if name == "bus" else GROUPS[name](**kwargs)
        results.update(figures)
        progress(f"bench {name}: done in {time.monotonic() - t0:.1f} s")
    return results
