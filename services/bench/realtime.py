"""``kibble bench --only realtime``: the whole stack in real time, seen from outside.

For each case (instrument and frame rate; by default ``nist4`` at 1000, 500 and 200 Hz and
``efb`` at 1000 Hz) the whole stack is started in real time
(:class:`~kibble.services.harness.up.Stack` with ``clock="realtime"`` on a private broker started
first: the simulator and every daemon as child processes, actuators armed) and put in force
mode as ``kibble demo`` does it (NIST-4: ``servo mode force``; EFB: ``servo mode force``, then the 1 mg artifact on
with ``servo mass test=true``). After ``settle_s`` the measured window of ``seconds`` of wall
clock starts.

Every figure comes from an *outside observer*: a separate OS process (spawned) with a plain
paho-mqtt client (TCP_NODELAY) subscribed to ``kb/<instrument>/#`` that decodes every message it
receives into the type of its topic, as an operator's tool would, and stamps its receipt with
``time.monotonic()`` (the same clock on the same host as the parent's window). CPU figures come
from ``/proc/<pid>/stat`` of every child process; the only numbers the daemons report about
themselves (``..._cpu_us_per_frame_<daemon>``) are labelled as such.

Flat JSON keys, per case, prefix ``rt_<model>_<rate>`` (e.g. ``rt_nist4_1000``):

- ``_p50_ms``, ``_p99_ms``, ``_max_ms``: per sensor frame k, from the observer's receipt of
  ``hw/sensors`` frame k to its receipt of the last lockstep actuator command tagged k (each
  device counted only at the frames it tags; its first command tagged k);
- ``_answered``: fraction of the window's sensor frames covered (``frame .. frame +
  hold_frames - 1``) by a command of every lockstep device;
- ``_answered_<device>``, ``_p99_ms_<device>``: the same per lockstep device;
- ``_trips`` (``trip`` and ``safe`` events of any daemon in the window), ``_stale_events``
  (``stale`` events), ``_actuators_safe_at_start`` / ``_actuators_safe_at_end`` (actuator
  daemons whose last status state at the start / end of the window is ``tripped`` or ``safe``);
- ``_null_nm``: RMS of the true coil z (``sim/truth`` ``z_m``) in 0.1 Hz bandwidth;
- ``_frames_lost``: sensor frames missing in the sequence the observer received;
  ``_frames``: sensor frames in the window; ``_observer_msgs_per_s``: every message it received;
  ``_observer_lag_p50_ms``, ``_observer_lag_p99_ms``: from the simulator's publish stamp of a
  sensor frame to the observer's receipt (broker hop plus the observer's own backlog: when it
  is large, the observer is behind and its latencies are suspect);
- ``_cpu_us_per_frame_<daemon>``: the daemon's own ``Status.timing.cpu_us_p50``, median over
  its heartbeats in the window (NaN while the runtime does not fill it);
- ``_cpu_outside_load_<name>`` (fraction of one core) and ``_cpu_outside_us_per_frame_<name>``
  (CPU over the window / sensor frames) of every OS process: each daemon's (``servo``) or, where
  daemons share one (:attr:`~kibble.services.harness.up.Stack.together`, the stack's default above
  250 Hz), the group's (``daq+servo+hv_source``), ``sim``, ``broker`` and the ``observer``;
  ``_cpu_outside_us_per_frame_stack`` sums all but the observer; ``_daemon_processes``;
- ``_restarts``: child restarts by the supervisor during the case;
- ``_loadavg_start``, ``_loadavg_end``: ``os.getloadavg()[0]`` around the window;
- ``_window_s`` (the window as measured), ``_observer_decode_errors`` (only if any);
- ``_error``: the error text of a case that could not run (the other cases still run).

And ``rt_seconds``, ``rt_wall_s`` for the group. About 22 minutes at the defaults (4 cases of
300 s plus ~20 s each), so the group is not in ``bench.DEFAULT_GROUPS``.

``kibble bench --only soak`` (:func:`run_soak`) is built of the same parts: one case
(:data:`SOAK_CASE`, NIST-4 at 200 Hz) with the recorder and the sequencer too, the recorder
recording, for ``seconds`` (an hour by default) with the broker stopped for
:data:`SOAK_OUTAGE_S` in the middle and started again on its port (every child then
reconnects by itself; the actuators, disarmed by the lost broker, are armed again), the
resident memory of every process sampled from ``/proc/<pid>/status``. Keys, prefix
``soak_<model>`` (e.g. ``soak_nist4``): ``_frames_lost`` (sensor frames missing while the
observer was connected: lost by the stack or the broker), ``_frames_unseen_at_restart``
(published while the observer was away), ``_reconnects`` and ``_reconnects_<service>`` (seen
from outside: an online status after the service's will or after :data:`RECONNECT_SILENCE_S`
of silence), ``_observer_reconnects``, ``_restarts`` (by the supervisor), ``_trips``,
``_stale_events``, ``_actuators_safe_at_end``, ``_frames``, ``_answered``, ``_p50_ms``,
``_p99_ms``, ``_max_ms`` (as above, over the whole window, the outage included),
``_rss_growth_mb_per_h_<name>`` (least-squares slope after the first tenth of the window) and
``_rss_mb_<name>`` (at the end) per process (each daemon or group, ``sim``, ``broker``),
``_outage_s``, ``_recovery_s`` (broker back to every child online and the actuators armed),
``_window_s``; ``soak_recorder_gap_recorded`` (the run file records the outage as a gap: a
``gap`` event of the recorder spanning it, no record inside), ``soak_recorder_gap_s``,
``soak_recorder_records_in_gap``, ``soak_recorder_records``; ``soak_seconds``, ``soak_wall_s``.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from kibble.bus_schema.instruments import INSTRUMENTS

DEFAULT_CASES: tuple[tuple[str, float], ...] = (("nist4", 1000.0), ("nist4", 500.0),
                                                ("nist4", 200.0), ("efb", 1000.0))
DEFAULT_SECONDS = 300.0
"""Measured window per case (wall clock)."""
DEFAULT_SETTLE_S = 5.0
"""After force mode (and, for the EFB, again after the artifact is loaded) before the window."""
OVERHEAD_S = 20.0
"""Rough wall time of one case besides its window: start-up, settling, stopping."""
OBSERVER_READY_S = 30.0
OBSERVER_DRAIN_S = 1.0
"""After the window, how long the observer keeps listening (commands answering its last frames)."""
OBSERVER_STOP_S = 30.0
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 1.0
"""The observer reconnects at once after a lost broker (0.1 s, doubling to 1 s), so that it is
blind only briefly after a broker restart."""
CASE_MARGIN_S = 300.0
"""A case is abandoned (error recorded) this long after its window should have ended."""
STOP_EVENTS = ("trip", "safe")
STALE_EVENTS = ("stale",)


def parse_cases(text: str | None) -> list[tuple[str, float]]:
    """``"nist4:1000,efb:200"`` -> ``[("nist4", 1000.0), ("efb", 200.0)]``; None or empty: the
    default cases."""
    if not text:
        return list(DEFAULT_CASES)
    cases = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        model, sep, rate = item.partition(":")
        if model not in INSTRUMENTS or not sep:
            raise ValueError(f"realtime case {item!r}: expected MODEL:RATE with MODEL nist4 or efb")
        try:
            rate_hz = float(rate)
        except ValueError:
            raise ValueError(f"realtime case {item!r}: rate {rate!r} is not a number") from None
        if not 1.0 <= rate_hz <= 10000.0:
            raise ValueError(f"realtime case {item!r}: rate outside 1..10000 Hz")
        cases.append((model, rate_hz))
    if not cases:
        raise ValueError(f"no realtime case in {text!r}")
    return cases


def case_prefix(model: str, rate_hz: float) -> str:
    return f"rt_{model}_{rate_hz:g}"


# ============================================================================ the observer


def _observer_main(host: str, port: int, instrument: str, devices: Sequence[str], out_path: str,
                   ready, stop, live) -> None:
    """The outside observer (a spawned process): subscribe to ``kb/<instrument>/#``, decode
    every message by its topic, store receipt times; on ``stop`` write everything to
    ``out_path`` (pickle of arrays and lists). ``live[0..2]``: messages, sensor frames, last k."""
    import socket
    from array import array

    import msgspec
    import paho.mqtt.client as mqtt

    from kibble.bus_schema.codec import decode
    from kibble.bus_schema.messages import Event, HwActuatorCommand, HwSensorFrame, SimTruth, Status

    prefix = f"kb/{instrument}/"
    dev_index = {f"{prefix}hw/{d}": i for i, d in enumerate(devices)}
    t_sensors = f"{prefix}hw/sensors"
    t_truth = f"{prefix}sim/truth"
    all_t = array("d")
    s_t, s_k, s_pub = array("d"), array("q"), array("d")
    c_t, c_k, c_h, c_d = array("d"), array("q"), array("q"), array("b")
    tr_t, tr_k, tr_sim, tr_z = array("d"), array("q"), array("d"), array("d")
    statuses: list[tuple] = []
    events: list[tuple] = []
    counts: dict[str, int] = {}
    errors: dict[str, list] = {}
    kinds: dict[str, int] = {}
    SENSORS, COMMAND, TRUTH, STATUS, EVENT, OTHER = range(6)
    plain = msgspec.msgpack.Decoder()
    failure: list[str] = []
    connections: list[tuple[float, bool]] = []

    def kind_of(topic: str) -> int:
        if topic == t_sensors:
            return SENSORS
        if topic == t_truth:
            return TRUTH
        if topic.startswith(prefix + "hw/"):
            return COMMAND
        if topic.endswith("/status"):
            return STATUS
        if topic.endswith("/event"):
            return EVENT
        return OTHER

    def on_message(_client, _userdata, message) -> None:
        t = time.monotonic()
        topic = message.topic
        payload = message.payload
        all_t.append(t)
        live[0] += 1
        kind = kinds.get(topic)
        if kind is None:
            kind = kinds[topic] = kind_of(topic)
        counts[topic] = counts.get(topic, 0) + 1
        try:
            if kind == SENSORS:
                m = decode(payload, HwSensorFrame)
                s_t.append(t)
                s_k.append(m.frame)
                s_pub.append(m.t_mono_s)
                live[1] += 1
                live[2] = m.frame
            elif kind == COMMAND:
                c = decode(payload, HwActuatorCommand)
                d = dev_index.get(topic)
                if d is not None:
                    c_t.append(t)
                    c_k.append(c.frame)
                    c_h.append(c.hold_frames)
                    c_d.append(d)
            elif kind == TRUTH:
                tr = decode(payload, SimTruth)
                tr_t.append(t)
                tr_k.append(tr.frame)
                tr_sim.append(tr.sim_time_s)
                tr_z.append(tr.values.get("z_m", math.nan))
            elif kind == STATUS:
                st = decode(payload, Status)
                tm = st.timing
                statuses.append((t, st.service, st.state, st.online, tm.frames, tm.cpu_us_p50,
                                 tm.cpu_load, st.session, str(st.detail.get("guard", "")),
                                 st.t_utc_s))
            elif kind == EVENT:
                ev = decode(payload, Event)
                events.append((t, ev.service, ev.kind, ev.severity,
                               int(ev.data.get("suppressed_since_last", 0) or 0), ev.text[:200],
                               ev.data))
            elif payload:
                plain.decode(payload)
        except Exception as exc:  # DecodeError and anything else: counted, never fatal
            # (an exception escaping a paho callback would end its network thread)
            e = errors.setdefault(topic, [0, str(exc)[:200]])
            e[0] += 1

    def on_socket_open(_client, _userdata, sock) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def on_connect(client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            failure.append(f"connect refused: {reason_code}")
            return
        connections.append((time.monotonic(), True))
        client.subscribe(prefix + "#", qos=1)

    def on_disconnect(_client, _userdata, _flags, _reason_code, _properties) -> None:
        connections.append((time.monotonic(), False))

    def on_subscribe(_client, _userdata, _mid, _reason_codes, _properties) -> None:
        ready.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"kibble-rtbench-observer-{os.getpid()}")
    client.on_message = on_message
    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    # paho annotates the delays int; it keeps and sleeps them as floats
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)  # type: ignore[arg-type]
    t_start = time.monotonic()
    try:
        client.connect(host, port, keepalive=10)
        client.loop_start()
        while not stop.wait(0.2):
            pass
        client.disconnect()
        client.loop_stop()
    except Exception as exc:  # reported through the output file
        failure.append(f"{type(exc).__name__}: {exc}")
    out = {
        "all_t": np.array(all_t, dtype=np.float64),
        "s_t": np.array(s_t, dtype=np.float64), "s_k": np.array(s_k, dtype=np.int64),
        "s_pub": np.array(s_pub, dtype=np.float64),
        "c_t": np.array(c_t, dtype=np.float64), "c_k": np.array(c_k, dtype=np.int64),
        "c_h": np.array(c_h, dtype=np.int64), "c_d": np.array(c_d, dtype=np.int64),
        "tr_t": np.array(tr_t, dtype=np.float64), "tr_k": np.array(tr_k, dtype=np.int64),
        "tr_sim": np.array(tr_sim, dtype=np.float64), "tr_z": np.array(tr_z, dtype=np.float64),
        "statuses": statuses, "events": events, "counts": counts, "errors": errors,
        "failure": failure, "connections": connections, "t_start": t_start,
        "t_end": time.monotonic(),
    }
    with open(out_path, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)


class Observer:
    """The outside observer (:func:`_observer_main`), a spawned process subscribed to
    ``kb/<instrument>/#`` on ``broker_url``, as an async context manager: entered once it has
    subscribed; :meth:`records` stops it and returns what it recorded (receipt times on
    ``time.monotonic()``), leaving it kills it if it is still there.

    ``live`` counts while it runs: messages received, sensor frames, the last frame tag."""

    def __init__(self, broker_url: str, instrument: str, devices: Sequence[str],
                 out_path: str | os.PathLike) -> None:
        from kibble.bus_schema.transport import parse_broker_url

        host, port = parse_broker_url(broker_url)
        self.out_path = Path(out_path)
        ctx = multiprocessing.get_context("spawn")
        self._ready, self._stop = ctx.Event(), ctx.Event()
        self.live = ctx.Array("q", 3, lock=False)
        self.process = ctx.Process(target=_observer_main, name="kibble-rt-observer",
                                   args=(host, port, instrument, list(devices), str(self.out_path),
                                         self._ready, self._stop, self.live), daemon=True)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def __aenter__(self) -> "Observer":
        self.process.start()
        try:
            deadline = time.monotonic() + OBSERVER_READY_S
            while not self._ready.is_set():
                if not self.process.is_alive():
                    raise RuntimeError(f"the observer exited with code {self.process.exitcode} "
                                       "before it subscribed")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the observer did not subscribe within {OBSERVER_READY_S:g} s")
                await asyncio.sleep(0.05)
        except BaseException:
            await self._halt()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._halt()

    async def _halt(self) -> None:
        self._stop.set()
        if self.process.pid is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, self.process.join, OBSERVER_STOP_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)

    async def records(self) -> dict[str, Any]:
        """Stop the observer and load its records (``RuntimeError`` if it failed)."""
        await self._halt()
        if not self.out_path.exists():
            raise RuntimeError(f"the observer wrote no records (exit code {self.process.exitcode})")
        rec = await asyncio.to_thread(_load_pickle, self.out_path)  # ~100 MB after 10 min
        if rec["failure"]:
            raise RuntimeError(f"observer: {'; '.join(rec['failure'])}")
        return rec


# ============================================================================ pure analysis


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def frame_latencies(s_k: np.ndarray, s_t: np.ndarray, c_dev: np.ndarray, c_k: np.ndarray,
                    c_hold: np.ndarray, c_t: np.ndarray, n_devices: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per sensor frame (``s_k`` received at ``s_t``): the latency to the last device's
    command tagged k (NaN where no device tags k) and whether every device answered it.

    A device's command (``c_dev``, tag ``c_k``, ``c_hold`` frames, received at ``c_t``) answers
    frames ``c_k .. c_k + c_hold - 1``; its latency counts only at the frame it tags (its
    first command with that tag). Commands with a negative tag (the hello) are ignored.
    """
    s_k = np.asarray(s_k, dtype=np.int64)
    s_t = np.asarray(s_t, dtype=np.float64)
    latency = np.full(s_k.size, np.nan)
    answered = np.ones(s_k.size, dtype=bool)
    for d in range(n_devices):
        mine = (np.asarray(c_dev) == d) & (np.asarray(c_k) >= 0)
        k = np.asarray(c_k, dtype=np.int64)[mine]
        t = np.asarray(c_t, dtype=np.float64)[mine]
        h = np.maximum(np.asarray(c_hold, dtype=np.int64)[mine], 1)
        if k.size == 0:
            answered[:] = False
            continue
        # latency: the first command (earliest receipt) per tag
        order = np.lexsort((t, k))
        k_sorted, t_sorted = k[order], t[order]
        tags, first = np.unique(k_sorted, return_index=True)
        t_first = t_sorted[first]
        pos = np.searchsorted(tags, s_k)
        pos_c = np.minimum(pos, tags.size - 1)
        hit = tags[pos_c] == s_k
        lat_d = np.where(hit, t_first[pos_c] - s_t, np.nan)
        latency = np.fmax(latency, lat_d)
        # coverage: the interval with the largest start <= k, with the running maximum end
        order = np.argsort(k, kind="stable")
        starts = k[order]
        ends = np.maximum.accumulate(k[order] + h[order] - 1)
        idx = np.searchsorted(starts, s_k, side="right") - 1
        covered = (idx >= 0) & (ends[np.maximum(idx, 0)] >= s_k)
        answered &= covered
    return latency, answered


def latency_summary(latency_s: np.ndarray) -> dict[str, float]:
    """p50, p99 and max (ms) of the finite latencies; NaN if none."""
    got = latency_s[np.isfinite(latency_s)]
    if got.size == 0:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    return {"p50_ms": float(np.percentile(got, 50) * 1e3), "p99_ms": float(np.percentile(got, 99) * 1e3),
            "max_ms": float(got.max() * 1e3)}


def frames_lost(k: np.ndarray) -> int:
    """Frames missing from the sequence ``k`` (between its first and last)."""
    if k.size == 0:
        return 0
    u = np.unique(k)
    return int(u[-1] - u[0] + 1 - u.size)


def _band_rms(x: np.ndarray, fs_hz: float, f_hz: float) -> float:
    from kibble.services.harness.scenarios import band_rms  # imports python-control: only when needed

    return band_rms(x, fs_hz, f_hz)


def null_rms_m(sim_t: np.ndarray, z: np.ndarray, f_hz: float = 0.1) -> float:
    """RMS of ``z`` in ``f_hz`` bandwidth (:func:`~kibble.services.harness.scenarios.band_rms`), its
    sample rate taken from the hardware clock ``sim_t`` (samples sorted, duplicates dropped,
    gaps filled linearly onto the median interval)."""
    ok = np.isfinite(sim_t) & np.isfinite(z)
    sim_t, z = np.asarray(sim_t)[ok], np.asarray(z)[ok]
    if sim_t.size < 32:
        return math.nan
    sim_t, idx = np.unique(sim_t, return_index=True)
    z = z[idx]
    dt = float(np.median(np.diff(sim_t)))
    if not dt > 0:
        return math.nan
    grid = sim_t[0] + dt * np.arange(int(round((sim_t[-1] - sim_t[0]) / dt)) + 1)
    zz = np.interp(grid, sim_t, z)
    try:
        return _band_rms(zz, 1.0 / dt, f_hz)
    except ValueError:
        return math.nan


def count_events(events: Sequence[tuple], t0: float, t1: float) -> dict[str, int]:
    """``trips`` (kinds trip, safe) and ``stale`` events received in ``[t0, t1]``, each with
    the count its publisher suppressed before it (``suppressed_since_last``)."""
    trips = stale = 0
    for t, _service, kind, _severity, suppressed, *_ in events:
        if not t0 <= t <= t1:
            continue
        if kind in STOP_EVENTS:
            trips += 1 + suppressed
        elif kind in STALE_EVENTS:
            stale += 1 + suppressed
    return {"trips": trips, "stale": stale}


def own_cpu_us(statuses: Sequence[tuple], t0: float, t1: float) -> dict[str, float]:
    """Per service: median of its own ``timing.cpu_us_p50`` over the heartbeats received in
    ``[t0, t1]`` that counted frames (NaN if none did: the runtime does not fill it yet)."""
    per: dict[str, list[float]] = {}
    for t, service, _state, _online, frames, cpu_us_p50, *_ in statuses:
        per.setdefault(service, [])
        if t0 <= t <= t1 and frames > 0:
            per[service].append(cpu_us_p50)
    return {s: (float(np.median(v)) if v else math.nan) for s, v in per.items()}


def end_states(statuses: Sequence[tuple], services: Sequence[str],
               until: float = math.inf) -> dict[str, str]:
    """The last status state received per service up to ``until`` (``?`` if none)."""
    last = {s: "?" for s in services}
    for t, service, state, *_ in statuses:
        if service in last and t <= until:
            last[service] = state
    return last


def _proc_text(pid: int | None, name: str) -> str | None:
    """``/proc/<pid>/<name>``, None if there is no such process (or no pid)."""
    if pid is None:
        return None
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return None


def proc_cpu_s(pid: int | None) -> float:
    """utime + stime (s) of process ``pid`` from ``/proc/<pid>/stat``; NaN if unreadable."""
    text = _proc_text(pid, "stat")
    if text is None:
        return math.nan
    fields = text[text.rindex(")") + 2:].split()
    # after the comm: state(3) ppid(4) ... utime(14) stime(15), 1-based in proc(5)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def analyze(rec: dict[str, Any], t0: float, t1: float, devices: Sequence[str],
            services: Sequence[str], actuators: Sequence[str]) -> dict[str, float]:
    """The observer's records over the window ``[t0, t1]`` to the case's figures (unprefixed
    keys: ``p50_ms`` ...)."""
    out: dict[str, float] = {}
    win = (rec["s_t"] >= t0) & (rec["s_t"] <= t1)
    s_k, s_t = rec["s_k"][win], rec["s_t"][win]
    latency, answered = frame_latencies(s_k, s_t, rec["c_d"], rec["c_k"], rec["c_h"], rec["c_t"],
                                        len(devices))
    out.update(latency_summary(latency))
    out["answered"] = float(answered.mean()) if answered.size else math.nan
    for d, device in enumerate(devices):
        mine = rec["c_d"] == d
        lat_d, ans_d = frame_latencies(s_k, s_t, np.zeros(int(mine.sum()), dtype=np.int64),
                                       rec["c_k"][mine], rec["c_h"][mine], rec["c_t"][mine], 1)
        out[f"answered_{device}"] = float(ans_d.mean()) if ans_d.size else math.nan
        out[f"p99_ms_{device}"] = latency_summary(lat_d)["p99_ms"]
    lag = latency_summary(s_t - rec["s_pub"][win])
    out["observer_lag_p50_ms"], out["observer_lag_p99_ms"] = lag["p50_ms"], lag["p99_ms"]
    out["frames"] = int(np.unique(s_k).size)
    out["frames_lost"] = frames_lost(s_k)
    n_all = int(((rec["all_t"] >= t0) & (rec["all_t"] <= t1)).sum())
    out["observer_msgs_per_s"] = n_all / (t1 - t0) if t1 > t0 else math.nan
    ev = count_events(rec["events"], t0, t1)
    out["trips"] = ev["trips"]
    out["stale_events"] = ev["stale"]
    for when, until in (("start", t0), ("end", t1)):
        states = end_states(rec["statuses"], actuators, until)
        out[f"actuators_safe_at_{when}"] = sum(1 for s in states.values() if s in ("tripped", "safe"))
    tw = (rec["tr_t"] >= t0) & (rec["tr_t"] <= t1)
    out["null_nm"] = null_rms_m(rec["tr_sim"][tw], rec["tr_z"][tw]) * 1e9
    own = own_cpu_us(rec["statuses"], t0, t1)
    for name in services:
        out[f"cpu_us_per_frame_{name}"] = own.get(name, math.nan)
    return out


# ============================================================================ one case


def _format_table(prefix: str, fig: dict[str, Any]) -> str:
    rows = []
    for key in sorted(fig):
        if not key.startswith(prefix + "_"):
            continue
        value = fig[key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append((key[len(prefix) + 1:], text))
    width = max((len(r[0]) for r in rows), default=10)
    return "\n".join(f"    {name.ljust(width)}  {text}" for name, text in rows)


async def force_mode(stack: Any, model: str, settle_s: float, say: Callable[[str], None]) -> None:
    """Force mode as ``kibble demo`` does it (the EFB then loads its 1 mg artifact), settled."""
    say("    force mode (servo mode force)")
    await stack.request("servo", "mode", {"mode": "force"})
    if model == "efb":
        await asyncio.sleep(settle_s)
        say("    EFB: 1 mg artifact on (servo mass test=true)")
        await stack.request("servo", "mass", {"test": True})
    say(f"    settling {settle_s:g} s")
    await asyncio.sleep(settle_s)


def process_pids(stack: Any, broker: Any, observer: Observer) -> dict[str, int | None]:
    """The PID of every OS process of a case: each child of the stack (``sim``, a daemon, or a
    group of daemons sharing one: ``daq+servo+hv_source``), the ``broker`` and the ``observer``."""
    pids = {name: (c.proc.pid if c.proc is not None else None) for name, c in stack.children.items()}
    broker_proc = getattr(broker, "_proc", None)
    pids["broker"] = broker_proc.pid if broker_proc is not None else None
    pids["observer"] = observer.pid
    return pids


async def measure_window(label: str, seconds: float, observer: Observer, say: Callable[[str], None],
                         during: Callable[[float], Awaitable[None]] | None = None) -> tuple[float, float]:
    """Wait out a window of ``seconds`` of wall clock with a progress line every 10 s (what
    the observer has seen), awaiting ``during(elapsed_s)`` about twice a second; ``(t0, t1)``
    on ``time.monotonic()``."""
    t0 = time.monotonic()
    f0 = observer.live[1]
    t_end = t0 + seconds
    say(f"    measuring {seconds:g} s")
    next_line = t0 + min(10.0, seconds / 2)
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        await asyncio.sleep(min(0.5, t_end - now))
        if during is not None:
            await during(time.monotonic() - t0)
        now = time.monotonic()
        if now >= next_line or now >= t_end:
            next_line = now + 10.0
            n = observer.live[1] - f0
            say(f"    {label}  {now - t0:5.0f}/{seconds:g} s, {max(0.0, t_end - now):4.0f} s left: "
                f"{n} sensor frames seen ({n / max(now - t0, 1e-9):.0f}/s), "
                f"{observer.live[0]} messages")
    return t0, time.monotonic()


async def run_case(model: str, rate_hz: float, seconds: float, settle_s: float,
                   say: Callable[[str], None], tmp: str) -> dict[str, Any]:
    """One case: a private broker, the observer subscribed to it, the stack up in real time on
    it, force mode, settling, the window; the figures (prefixed)."""
    from kibble.services.harness.broker import Broker
    from kibble.services.instruments import instrument
    from kibble.services.harness.up import Stack

    prefix = case_prefix(model, rate_hz)
    spec = instrument(model)
    devices = spec.devices
    out: dict[str, Any] = {}
    run_dir = Path(tmp) / f"{model}-{rate_hz:g}"
    run_dir.mkdir(parents=True, exist_ok=True)
    async with Broker() as broker:
        say(f"    broker: {broker.backend} on {broker.url}")
        # the observer subscribes before the stack starts: it sees the whole run (the window
        # is cut afterwards), and the stack goes to force mode as soon as it is armed
        async with Observer(broker.url, model, devices, run_dir / "observer.pkl") as obs:
            say(f"    observer subscribed to kb/{model}/# (pid {obs.pid})")
            async with Stack(model, clock="realtime", rate_hz=rate_hz, broker_url=broker.url,
                             run_dir=run_dir, progress=lambda s: say(f"    {s}")) as stack:
                await force_mode(stack, model, settle_s, say)
                pids = process_pids(stack, broker, obs)
                restarts0 = sum(c.restarts for c in stack.children.values())
                out[f"{prefix}_loadavg_start"] = os.getloadavg()[0]
                cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
                t0, t1 = await measure_window(f"{model}:{rate_hz:g}", seconds, obs, say)
                cpu1 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
                out[f"{prefix}_loadavg_end"] = os.getloadavg()[0]
                pids1 = {name: (c.proc.pid if c.proc is not None else None)
                         for name, c in stack.children.items()}
                out[f"{prefix}_restarts"] = sum(c.restarts for c in stack.children.values()) - restarts0
                await asyncio.sleep(OBSERVER_DRAIN_S)
                rec = await obs.records()  # before the stack stops: its shutdown is not part of the run
    fig = analyze(rec, t0, t1, devices, spec.daemons, spec.actuators)
    frames = fig["frames"] + fig["frames_lost"]
    dt = t1 - t0
    stack_total = 0.0
    # one entry per OS process: "sim", each daemon alone ("servo") or each group of daemons
    # sharing a process ("daq+servo+hv_source", see up.Stack.together), "broker", "observer"
    for name in pids:
        used = cpu1.get(name, math.nan) - cpu0.get(name, math.nan)
        if name in pids1 and pids1[name] != pids.get(name):
            used = math.nan  # restarted during the window: its CPU is not comparable
        fig[f"cpu_outside_load_{name}"] = used / dt
        fig[f"cpu_outside_us_per_frame_{name}"] = used / frames * 1e6 if frames else math.nan
        if name != "observer":
            stack_total += fig[f"cpu_outside_us_per_frame_{name}"]
    fig["cpu_outside_us_per_frame_stack"] = stack_total
    fig["daemon_processes"] = len(pids) - 3
    fig["window_s"] = dt
    if rec["errors"]:
        n_err = sum(e[0] for e in rec["errors"].values())
        fig["observer_decode_errors"] = n_err
        topic, (count, text) = next(iter(rec["errors"].items()))
        say(f"    observer: {n_err} undecodable messages, e.g. {count} on {topic}: {text}")
    for key, value in fig.items():
        out[f"{prefix}_{key}"] = value
    for when, until in (("start", t0), ("end", t1)):
        states = end_states(rec["statuses"], spec.actuators, until)
        say(f"  {prefix}: actuator states at the {when} of the window: "
            + ", ".join(f"{s} {v}" for s, v in states.items()))
    return out


def run(seconds: float | None = None, cases: str | Sequence[tuple[str, float]] | None = None,
        settle_s: float | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every case in turn (flat dict). ~22 minutes at the defaults (4 x (300 s + ~20 s))."""
    import functools
    import sys

    seconds = DEFAULT_SECONDS if seconds is None else float(seconds)
    settle_s = DEFAULT_SETTLE_S if settle_s is None else float(settle_s)
    if not seconds > 0 or settle_s < 0:
        raise ValueError(f"realtime: --rt-seconds must be > 0 (got {seconds}) and the settle >= 0")
    case_list = parse_cases(cases) if cases is None or isinstance(cases, str) else list(cases)
    say = say or functools.partial(print, file=sys.stderr, flush=True)
    results: dict[str, Any] = {"rt_seconds": seconds}
    t_group = time.monotonic()

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="kibble-rtbench-") as tmp:
            for i, (model, rate_hz) in enumerate(case_list):
                left = (len(case_list) - i) * (seconds + OVERHEAD_S)
                prefix = case_prefix(model, rate_hz)
                say(f"  realtime case {i + 1}/{len(case_list)}: {model} at {rate_hz:g} Hz, "
                    f"{seconds:g} s window (group: ~{left / 60:.1f} min left)")
                t_case = time.monotonic()
                try:
                    fig = await asyncio.wait_for(
                        run_case(model, rate_hz, seconds, settle_s, say, tmp),
                        seconds + settle_s * 2 + CASE_MARGIN_S)
                except asyncio.TimeoutError:
                    fig = {f"{prefix}_error": f"timed out after {time.monotonic() - t_case:.0f} s"}
                except Exception as exc:  # the case failed: record it, go on
                    fig = {f"{prefix}_error": f"{type(exc).__name__}: {exc}"}
                results.update(fig)
                if f"{prefix}_error" in fig:
                    say(f"  {prefix}: FAILED: {fig[f'{prefix}_error']}")
                else:
                    say(f"  {prefix} ({time.monotonic() - t_case:.0f} s):\n{_format_table(prefix, fig)}")

    asyncio.run(main())
    results["rt_wall_s"] = time.monotonic() - t_group
    return results


# ============================================================================ the soak


SOAK_SECONDS = 3600.0
SOAK_CASE = "nist4:200"
"""The soak's instrument and rate: NIST-4, the larger stack, at the rate ``make run`` uses
(every daemon a process of its own); a busy machine may need a lower one (``--soak-case``)."""
SOAK_MIN_SECONDS = 30.0
SOAK_OUTAGE_S = 5.0
"""How long the broker is down in the middle of the soak."""
SOAK_RECOVERY_S = 60.0
"""After the broker is back, the time allowed for every child to reconnect and be armed."""
RECONNECT_SILENCE_S = 3.0
"""A service's statuses (1 Hz heartbeats) silent this long, then online again: a reconnect."""
RSS_WARMUP = 0.1
"""Memory growth is fitted over the window after its first tenth (start-up caches filling)."""


def proc_rss_mb(pid: int | None) -> float:
    """Resident set size (MB) of process ``pid`` from ``/proc/<pid>/status``; NaN if unreadable."""
    text = _proc_text(pid, "status")
    if text is None:
        return math.nan
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return math.nan


def rss_growth_mb_per_h(samples: Sequence[tuple[float, int | None, float]], t0: float,
                        t1: float) -> float:
    """Slope (MB per hour) of a least-squares line through one process's ``(t, pid, rss_mb)``
    samples after the first :data:`RSS_WARMUP` of ``[t0, t1]``, of its last PID only (a
    restarted process starts again); NaN with fewer than 3 such samples."""
    if not samples:
        return math.nan
    pid = samples[-1][1]
    t_from = t0 + RSS_WARMUP * (t1 - t0)
    pts = np.array([(t, mb) for t, p, mb in samples
                    if p == pid and t_from <= t <= t1 and math.isfinite(mb)], dtype=float).reshape(-1, 2)
    if pts.shape[0] < 3 or np.ptp(pts[:, 0]) <= 0:
        return math.nan
    return float(np.polyfit(pts[:, 0], pts[:, 1], 1)[0] * 3600.0)


def episodes(connections: Sequence[tuple[float, bool]], t_end: float) -> list[tuple[float, float]]:
    """The observer's connected intervals ``[(t_connected, t_lost), ...]`` (the last one open
    until ``t_end``)."""
    out: list[tuple[float, float]] = []
    up = None
    for t, connected in connections:
        if connected and up is None:
            up = t
        elif not connected and up is not None:
            out.append((up, t))
            up = None
    if up is not None:
        out.append((up, t_end))
    return out


def frames_lost_by_episode(s_k: np.ndarray, s_t: np.ndarray,
                           spans: Sequence[tuple[float, float]]) -> tuple[int, int]:
    """``(lost, unseen)``: sensor frames missing within each connected interval of the observer,
    summed (lost by the stack or the broker while all were connected), and those missing
    between one interval's last frame and the next one's first (published while the observer
    was away: not a loss of the stack)."""
    lost = unseen = 0
    last = None
    for a, b in spans:
        k = np.unique(s_k[(s_t >= a) & (s_t <= b)])
        if k.size == 0:
            continue
        lost += frames_lost(k)
        if last is not None:
            unseen += max(0, int(k[0] - last - 1))
        last = int(k[-1])
    return lost, unseen


def reconnects(statuses: Sequence[tuple], services: Sequence[str], t0: float, t1: float,
               silence_s: float = RECONNECT_SILENCE_S) -> dict[str, int]:
    """Per service, from its statuses received in ``[t0, t1]``: how often an online status
    followed an offline one (its will) or a silence of at least ``silence_s``."""
    out = {s: 0 for s in services}
    last: dict[str, tuple[float, bool]] = {}
    for t, service, _state, online, *_ in statuses:
        if service not in out or not t0 <= t <= t1:
            continue
        prev = last.get(service)
        if online and prev is not None and (not prev[1] or t - prev[0] >= silence_s):
            out[service] += 1
        last[service] = (t, online)
    return out


def gap_recorded(gaps: Sequence[tuple[float, float]], records_t: Sequence[float],
                 down_utc_s: float, up_utc_s: float) -> tuple[bool, float, int]:
    """Whether a run file records a broker outage ``[down_utc_s, up_utc_s]`` as a gap: one of
    its ``gaps`` spans the outage and no record (receipt times ``records_t``) is inside that
    gap; with the gap's length (NaN if none spans it) and the records inside it."""
    spanning = [(a, b) for a, b in gaps if a <= down_utc_s and b >= up_utc_s]
    if not spanning:
        return False, math.nan, 0
    a, b = spanning[0]
    inside = int(sum(1 for t in records_t if a < t < b))
    return inside == 0, b - a, inside


async def restart_broker(broker: Any, stack: Any, outage_s: float,
                         say: Callable[[str], None]) -> dict[str, float]:
    """Stop the broker for ``outage_s``, start it on the same port, wait until every child is
    online again and arm the actuators (a lost broker disarmed them); the times (UTC and
    monotonic) of the outage and of the recovery."""
    say(f"    broker restart: down for {outage_s:g} s")
    await broker.stop()
    down_utc, down = time.time(), time.monotonic()
    await asyncio.sleep(outage_s)
    await broker.start()
    up_utc, up = time.time(), time.monotonic()
    await stack.wait_online(SOAK_RECOVERY_S, {"sim", *stack.daemons}, since_utc_s=up_utc)
    await stack.arm_all()
    rearmed = time.monotonic()
    say(f"    broker back; every child online and the actuators armed {rearmed - up:.1f} s later")
    return {"down_utc": down_utc, "down": down, "up_utc": up_utc, "up": up, "rearmed": rearmed}


async def soak_case(model: str, rate_hz: float, seconds: float, settle_s: float, outage_s: float,
                    say: Callable[[str], None], tmp: str) -> dict[str, Any]:
    """The soak: a private broker, the observer, the stack in real time with the recorder
    recording, force mode, ``seconds`` of wall clock with the broker restarted in the middle,
    the resident memory of every process sampled; the figures (prefixed)."""
    from kibble.services.harness.broker import Broker
    from kibble.services.daemons.recorder import recorded_gaps
    from kibble.services.data.recordfile import read_run
    from kibble.services.instruments import instrument
    from kibble.services.harness.up import MEASUREMENT_DAEMONS, Stack

    prefix = f"soak_{model}"
    spec = instrument(model)
    run_dir = Path(tmp) / f"soak-{model}"
    run_dir.mkdir(parents=True, exist_ok=True)
    rss: dict[str, list[tuple[float, int | None, float]]] = {}
    restart: dict[str, float] = {}
    every_s = max(1.0, min(10.0, seconds / 30.0))
    async with Broker() as broker:
        say(f"    broker: {broker.backend} on {broker.url}")
        async with Observer(broker.url, model, spec.devices, run_dir / "observer.pkl") as obs:
            async with Stack(model, clock="realtime", rate_hz=rate_hz, broker_url=broker.url,
                             run_dir=run_dir, measurement=True,
                             progress=lambda s: say(f"    {s}")) as stack:
                await force_mode(stack, model, settle_s, say)
                run = await stack.request("recorder", "start", {"run_id": f"soak-{model}"})
                restarts0 = sum(c.restarts for c in stack.children.values())
                next_sample = [0.0]

                async def during(elapsed_s: float) -> None:
                    if elapsed_s >= next_sample[0]:
                        next_sample[0] = elapsed_s + every_s
                        now = time.monotonic()
                        for name, pid in process_pids(stack, broker, obs).items():
                            rss.setdefault(name, []).append((now, pid, proc_rss_mb(pid)))
                    if not restart and elapsed_s >= seconds / 2:
                        restart.update(await restart_broker(broker, stack, outage_s, say))

                t0, t1 = await measure_window(f"soak {model}:{rate_hz:g}", seconds, obs, say, during)
                next_sample[0] = 0.0
                await during(t1 - t0)  # the last memory sample, at the window's end
                restarts = sum(c.restarts for c in stack.children.values()) - restarts0
                closed = await stack.request("recorder", "stop")
                await asyncio.sleep(OBSERVER_DRAIN_S)
                rec = await obs.records()
    say(f"  {prefix}: broker down {restart['down'] - t0:.1f} s into the window, the actuators "
        f"armed again at {restart['rearmed'] - t0:.1f} s")
    for t, service, kind, _severity, _suppressed, text, *_ in rec["events"]:
        if kind in STOP_EVENTS and t0 <= t <= t1:
            say(f"  {prefix}: {t - t0:.1f} s: {service} {kind}: {text}")
    states = end_states(rec["statuses"], spec.actuators, t1)
    say(f"  {prefix}: actuator states at the end: " + ", ".join(f"{a} {v}" for a, v in states.items()))
    fig = analyze(rec, t0, t1, spec.devices, spec.daemons, spec.actuators)
    out: dict[str, Any] = {f"{prefix}_{key}": fig[key] for key in (
        "frames", "answered", "p50_ms", "p99_ms", "max_ms", "trips", "stale_events",
        "actuators_safe_at_end")}
    win = (rec["s_t"] >= t0) & (rec["s_t"] <= t1)
    spans = episodes(rec["connections"], rec["t_end"])
    lost, unseen = frames_lost_by_episode(rec["s_k"][win], rec["s_t"][win], spans)
    out[f"{prefix}_frames_lost"] = lost
    out[f"{prefix}_frames_unseen_at_restart"] = unseen
    services = ("sim", *spec.daemons, *MEASUREMENT_DAEMONS)
    per = reconnects(rec["statuses"], services, t0, t1)
    out[f"{prefix}_reconnects"] = sum(per.values())
    for name, n in per.items():
        out[f"{prefix}_reconnects_{name}"] = n
    out[f"{prefix}_observer_reconnects"] = max(0, len(spans) - 1)
    out[f"{prefix}_restarts"] = restarts
    for name, samples in rss.items():
        if name == "observer":
            continue
        out[f"{prefix}_rss_growth_mb_per_h_{name}"] = rss_growth_mb_per_h(samples, t0, t1)
        out[f"{prefix}_rss_mb_{name}"] = samples[-1][2]
    out[f"{prefix}_outage_s"] = restart["up"] - restart["down"]
    out[f"{prefix}_recovery_s"] = restart["rearmed"] - restart["up"]
    out[f"{prefix}_window_s"] = t1 - t0
    path = run["path"]
    recorded, gap_s, inside = gap_recorded(recorded_gaps(path), [r.t_s for r in read_run(path)],
                                           restart["down_utc"], restart["up_utc"])
    out["soak_recorder_gap_recorded"] = recorded
    out["soak_recorder_gap_s"] = gap_s
    out["soak_recorder_records_in_gap"] = inside
    out["soak_recorder_records"] = closed["records"]
    return out


def run_soak(seconds: float | None = None, case: str | None = None,
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``kibble bench --only soak`` (flat dict): :func:`soak_case` for ``case``
    (``MODEL:HZ``, default :data:`SOAK_CASE`) over ``seconds`` (default an hour)."""
    import functools
    import sys

    seconds = SOAK_SECONDS if seconds is None else float(seconds)
    if not seconds >= SOAK_MIN_SECONDS:
        raise ValueError(f"soak: --soak-seconds must be at least {SOAK_MIN_SECONDS:g} (the broker "
                         f"restart in the middle needs the time to recover), got {seconds:g}")
    cases = parse_cases(case or SOAK_CASE)
    if len(cases) != 1:
        raise ValueError(f"soak: one case MODEL:HZ, got {case!r}")
    (model, rate_hz), = cases
    say = say or functools.partial(print, file=sys.stderr, flush=True)
    say(f"  soak: {model} at {rate_hz:g} Hz in real time for {seconds:g} s, the broker down for "
        f"{SOAK_OUTAGE_S:g} s in the middle")
    t_group = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kibble-soak-") as tmp:
        out = asyncio.run(asyncio.wait_for(
            soak_case(model, rate_hz, seconds, DEFAULT_SETTLE_S, SOAK_OUTAGE_S, say, tmp),
            seconds + DEFAULT_SETTLE_S * 2 + SOAK_RECOVERY_S + CASE_MARGIN_S))
    out["soak_seconds"] = seconds
    out["soak_wall_s"] = time.monotonic() - t_group
    say(f"  soak ({out['soak_wall_s']:.0f} s):\n{_format_table('soak', out)}")
    return out
