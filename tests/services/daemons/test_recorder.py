"""The recorder (issue 6, item 2): the run file (round trip, torn tails, flush policy, run
documents), the daemon over a real broker (bytes and order as published, hw/ filtering, run-id
rules, a broker restart recorded as a gap: issue 17, item 11), a SIGKILL mid-run (the file is a
readable prefix missing at most the last second), and the HDF5 export (values, units, configuration, parameters)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid

import h5py
import msgspec
import numpy as np
import pytest

from kibble.bus_schema.codec import encode
from kibble.bus_schema.messages import (
    DaqFrame, Event, HwSensorFrame, ParamList, ParamSpec, Setpoint, SimTruth, Status,
)
from kibble.bus_schema.transport import make_client
from kibble.services.runtime.client import BusClient
from kibble.bus_schema.units import unit_of
from kibble.services.data.export import cli_export, export_run
from kibble.services.daemons.recorder import Recorder, recorded_gaps
from kibble.services.data.recordfile import (
    MAGIC, RunFileError, RunWriter, config_hash, decode_document, encode_document, read_run,
    run_document_topic, write_start_document,
)
from kibble.services.runtime.service import ServiceConfig

# ------------------------------------------------------------------------------ the run file


def _messages(n: int) -> list[tuple[str, bytes, float]]:
    out = []
    for k in range(n):
        topic = f"kb/t/svc{k % 3}/frame"
        payload = bytes([k % 256]) * (k % 7) + f"msg{k}".encode()
        out.append((topic, payload, 1.7e9 + 0.001 * k))
    out.append(("kb/t/x/empty", b"", 1.7e9 + 1.0))  # an empty payload is a valid message
    return out


def test_round_trip(tmp_path):
    path = tmp_path / "a.kbrun"
    msgs = _messages(50)
    with RunWriter(path, {"run_id": "a", "instrument": "t"}) as w:
        for topic, payload, t in msgs:
            w.append(topic, payload, t)
        assert w.records == len(msgs)
    assert path.read_bytes()[:8] == MAGIC
    reader = read_run(path)
    assert reader.metadata["run_id"] == "a" and reader.metadata["format_version"] == 1
    got = [(r.topic, r.payload, r.t_s) for r in reader]
    assert got == msgs
    assert reader.tail is None and reader.records == len(msgs)
    assert reader.end == path.stat().st_size
    with pytest.raises(FileExistsError):
        RunWriter(path)  # never overwritten


def test_torn_tail_at_every_offset(tmp_path):
    path = tmp_path / "torn.kbrun"
    msgs = _messages(10)
    with RunWriter(path, {"run_id": "torn"}) as w:
        for topic, payload, t in msgs:
            w.append(topic, payload, t)
    data = path.read_bytes()
    last = list(read_run(path))[-1].offset
    cut_path = tmp_path / "cut.kbrun"
    for cut in range(last, len(data)):
        cut_path.write_bytes(data[:cut])
        reader = read_run(cut_path)
        got = [(r.topic, r.payload, r.t_s) for r in reader]
        assert got == msgs[:-1], cut
        if cut == last:
            assert reader.tail is None
        else:
            assert reader.tail is not None and reader.tail.offset == last
            assert reader.tail.size == cut - last
    # a damaged last record (CRC) and a tail of zeros (a file system extended the file)
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    cut_path.write_bytes(bytes(damaged))
    reader = read_run(cut_path)
    assert len(list(reader)) == len(msgs) - 1 and reader.tail.reason == "CRC mismatch"
    cut_path.write_bytes(data + bytes(100))
    reader = read_run(cut_path)
    assert len(list(reader)) == len(msgs) and reader.tail.offset == len(data)
    # not a run file at all: a clear error
    cut_path.write_bytes(b"hello world, not a run")
    with pytest.raises(RunFileError, match="not a kibble run file"):
        read_run(cut_path)


def test_writer_flushes_to_the_os_within_the_interval(tmp_path):
    path = tmp_path / "f.kbrun"
    with RunWriter(path, flush_interval_s=0.1) as w:
        header = path.stat().st_size
        w.append("kb/t/a/frame", b"x" * 10)
        assert path.stat().st_size == header and w.pending_bytes > 0  # buffered
        time.sleep(0.12)
        w.append("kb/t/a/frame", b"y" * 10)  # due: both reach the OS
        assert w.pending_bytes == 0 and path.stat().st_size == w.bytes_written > header
        assert len(list(read_run(path))) == 2  # readable while still open


def test_start_document_and_config_hash(tmp_path):
    config = {"plan": "force_set", "weighings": 17, "window_s": 58.0, "mass": {"nominal_kg": 1.0}}
    expected = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    assert config_hash(config) == expected
    assert config_hash(dict(reversed(list(config.items())))) == expected  # key order irrelevant
    path = tmp_path / "s.kbrun"
    with RunWriter(path) as w:
        doc = write_start_document(w, "nist4", config, plan_name="force_set", scan_id=3)
    (rec,) = list(read_run(path))
    assert rec.topic == run_document_topic("nist4") == "kb/nist4/sequencer/run"
    name, got = decode_document(rec.payload)
    assert name == "start" and got == doc
    assert got["config_hash"] == expected and got["configuration"] == config and got["scan_id"] == 3
    assert decode_document(msgspec.msgpack.encode(["stop", {"exit_status": "success"}]))[0] == "stop"
    with pytest.raises(ValueError):
        decode_document(b"\x01")
    with pytest.raises(ValueError):
        encode_document("begin", {})


# ------------------------------------------------------------------------------ the daemon

@contextlib.asynccontextmanager
async def running(service, timeout_s: float = 10.0):
    task = asyncio.create_task(service.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(service.connected.wait(), timeout_s)
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, timeout_s)


@pytest.mark.broker
async def test_recorder_records_what_was_published(broker, tmp_path):
    instrument = f"t{uuid.uuid4().hex[:10]}"
    data_dir = tmp_path / "runs"
    config = ServiceConfig(broker=broker.url, instrument=instrument, state_dir=tmp_path,
                           heartbeat_s=0.2, settings={"data_dir": str(data_dir)})
    p = f"kb/{instrument}"
    sent: dict[str, list[bytes]] = {f"{p}/daq/frame": [], f"{p}/servo/setpoint": [],
                                    f"{p}/servo/event": [], f"{p}/custom/blob": [],
                                    f"{p}/hw/sensors": []}
    raw = make_client(broker.url, f"pytest-pub-{uuid.uuid4().hex[:6]}")
    async with running(Recorder(config)) as rec, BusClient(broker.url, instrument) as bus, raw:
        async def publish_all(tag: int) -> None:
            for k in range(20):
                frame = DaqFrame(frame=k, seq=k, coil_z_m=1e-6 * k + 1e-3 * tag, coil_vz_m_per_s=-1e-3 * k)
                msgs = {f"{p}/daq/frame": encode(frame),
                        f"{p}/servo/setpoint": encode(Setpoint(frame=k, values={"main_coil_current_a": 0.01 * k})),
                        f"{p}/custom/blob": bytes([k, tag]) + b"\x00\xff not msgpack",
                        f"{p}/hw/sensors": encode(HwSensorFrame(frame=k))}
                if k % 5 == 0:
                    msgs[f"{p}/servo/event"] = encode(Event(service="servo", kind="test", text=f"{tag}.{k}"))
                for topic, payload in msgs.items():
                    await raw.publish(topic, payload, qos=1 if k % 2 else 0)
                    if tag == 1:
                        sent[topic].append(payload)

        await publish_all(0)  # before the run: not recorded
        reply = await bus.request("recorder", "start", {"run_id": "run1", "config_hash": "abc123"})
        assert reply.ok, reply.error
        assert reply.result["path"] == str(data_dir / "run1.kbrun")
        again = await bus.request("recorder", "start", {"run_id": "run2"})
        assert not again.ok and "stop it first" in again.error
        await publish_all(1)
        await asyncio.sleep(0.5)  # a heartbeat with the run's detail
        async with bus.listen(f"{p}/recorder/status") as sub:
            status = await sub.expect(Status, lambda s: s.detail.get("records", 0) > 0, timeout_s=3)
        assert status.state == "running" and status.detail["run_id"] == "run1"
        assert status.detail["last_flush_age_s"] <= 0.5 and status.detail["bytes"] > 0
        reply = await bus.request("recorder", "stop")
        assert reply.ok and reply.result["run_id"] == "run1" and reply.result["records"] >= 64
        await publish_all(2)  # after the run: not recorded
        assert not (await bus.request("recorder", "stop")).ok
        dup = await bus.request("recorder", "start", {"run_id": "run1"})
        assert not dup.ok and "exists already" in dup.error
        bad = await bus.request("recorder", "start", {"run_id": "../evil"})
        assert not bad.ok
        assert rec.counters["hw_skipped"] == 20

    reader = read_run(data_dir / "run1.kbrun")
    assert reader.metadata["run_id"] == "run1" and reader.metadata["config_hash"] == "abc123"
    records = list(reader)
    assert reader.tail is None
    got: dict[str, list[bytes]] = {}
    for r in records:
        got.setdefault(r.topic, []).append(r.payload)
    for topic in (f"{p}/daq/frame", f"{p}/servo/setpoint", f"{p}/servo/event", f"{p}/custom/blob"):
        assert got[topic] == sent[topic], topic  # bytes as published, in order, nothing else
    assert f"{p}/hw/sensors" not in got  # record_hw is off by default
    assert any(t.endswith("/recorder/status") for t in got)  # the rest of the tree is there too
    times = [r.t_s for r in records]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 30

    # and it exports: the daemon's own messages (status, params, events) decode too
    out = tmp_path / "run1.h5"
    summary = export_run(data_dir / "run1.kbrun", out)
    assert summary["records"] == len(records)
    with h5py.File(out) as f:
        z = f["daq/frame/coil_z_m"][:]
        np.testing.assert_allclose(z, 1e-6 * np.arange(20) + 1e-3, rtol=0, atol=0)
        assert f["daq/frame/coil_z_m"].attrs["unit"] == "m"
        assert f["servo/setpoint/values/main_coil_current_a"].attrs["unit"] == "A"
        assert f["recorder/status"].attrs["message_type"] == "Status"
        assert f["custom/blob"].attrs["undecodable"] == 20
        assert f.attrs["run_id"] == "run1"


@pytest.mark.broker
async def test_a_broker_restart_is_recorded_as_a_gap(broker, tmp_path):
    """Across a broker restart the file holds a ``gap`` event spanning the outage, nothing
    inside it, and what was published before and after it."""
    instrument = f"t{uuid.uuid4().hex[:10]}"
    data_dir = tmp_path / "runs"
    config = ServiceConfig(broker=broker.url, instrument=instrument, state_dir=tmp_path,
                           heartbeat_s=0.2, settings={"data_dir": str(data_dir)})
    topic = f"kb/{instrument}/test/frame"

    async def publish(first: int, n: int) -> None:
        async with make_client(broker.url, f"pytest-pub-{uuid.uuid4().hex[:6]}") as raw:
            for k in range(first, first + n):
                await raw.publish(topic, struct.pack("<I", k), qos=1)
                await asyncio.sleep(0.01)

    try:
        async with running(Recorder(config)) as rec, BusClient(broker.url, instrument) as bus:
            assert (await bus.request("recorder", "start", {"run_id": "restart"})).ok
            await publish(0, 50)
            await asyncio.to_thread(broker.stop)
            t_down = time.time()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(broker.start)
            t_up = time.time()
            await asyncio.wait_for(rec.connected.wait(), 10)
            async with BusClient(broker.url, instrument) as bus:
                await publish(50, 50)
                assert (await bus.request("recorder", "stop")).ok
    finally:
        if not broker.broker.running:
            await asyncio.to_thread(broker.start)
    path = data_dir / "restart.kbrun"
    gaps = recorded_gaps(path)
    assert len(gaps) == 1, gaps
    (t_from, t_to), = gaps
    assert t_from <= t_down and t_to >= t_up, (t_from, t_down, t_up, t_to)
    records = list(read_run(path))
    assert not [r for r in records if t_from < r.t_s < t_to], "records inside the gap"
    assert any(r.t_s == t_from for r in records), "the gap starts at the last record before it"
    got = [struct.unpack("<I", r.payload)[0] for r in records if r.topic == topic]
    assert got == list(range(100))


# ------------------------------------------------------------------------------ SIGKILL

RATE_HZ = 200.0
FLUSH_S = 0.2
LOSS_BOUND_S = 1.0
"""The issue's promise: a killed recorder loses at most the last second. The writer hands
records to the OS at least every FLUSH_S (0.2 s), so the loss is FLUSH_S plus the time a
message takes through the broker and the event loop; the bound tested is the promise itself,
1 s, which leaves 0.8 s for scheduling noise on a loaded test machine. The measured loss is
printed (typically ~0.1-0.25 s)."""


@pytest.mark.broker
async def test_sigkill_loses_at_most_the_last_second(broker, tmp_path, subprocess_env):
    instrument = f"t{uuid.uuid4().hex[:10]}"
    data_dir = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kibble.services.cli.main", "service", "recorder", "--broker", broker.url,
         "--instrument", instrument, "--state-dir", str(tmp_path / "state"),
         "--setting", f"data_dir={data_dir}", "--setting", f"flush_interval_s={FLUSH_S}"],
        env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    topic = f"kb/{instrument}/test/frame"
    sent_at: list[float] = []
    try:
        async with BusClient(broker.url, instrument) as bus:
            async with bus.listen(f"kb/{instrument}/recorder/status") as sub:
                await sub.expect(Status, lambda s: s.online, timeout_s=15)
            reply = await bus.request("recorder", "start", {"run_id": "killed"})
            assert reply.ok, reply.error
            raw = make_client(broker.url, f"pytest-pub-{uuid.uuid4().hex[:6]}")
            async with raw:
                t0 = time.monotonic()
                t_kill = None
                k = 0
                while True:
                    t_next = t0 + k / RATE_HZ
                    await asyncio.sleep(max(0.0, t_next - time.monotonic()))
                    now = time.monotonic()
                    if t_kill is None and now - t0 >= 2.5:
                        proc.send_signal(signal.SIGKILL)
                        t_kill = now
                    if t_kill is not None and now - t_kill >= 0.3:
                        break
                    await raw.publish(topic, struct.pack("<Id", k, now) + b"\x00" * 40, qos=0)
                    sent_at.append(time.monotonic())
                    k += 1
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

    reader = read_run(data_dir / "killed.kbrun")
    seqs = [struct.unpack_from("<I", r.payload)[0] for r in reader if r.topic == topic]
    assert seqs == list(range(len(seqs))), "the records are a prefix of what was sent"
    # everything sent more than LOSS_BOUND_S before the kill is in the file
    must = [k for k, t in enumerate(sent_at) if t < t_kill - LOSS_BOUND_S]
    assert len(must) > 250 and len(seqs) >= len(must)
    loss_s = t_kill - sent_at[seqs[-1]] if seqs else float("inf")
    print(f"SIGKILL: {len(seqs)} of {sum(t < t_kill for t in sent_at)} messages sent before the kill "
          f"are in the file; last recorded one sent {loss_s:.3f} s before the kill; "
          f"torn tail: {reader.tail}")
    assert loss_s < LOSS_BOUND_S


# ------------------------------------------------------------------------------ HDF5 export


def _param_list(service: str, kp: float) -> bytes:
    return encode(ParamList(service=service, params=[
        ParamSpec(name="kp", type="float", value=kp, default=1.0, unit="A/m"),
        ParamSpec(name="mode", type="str", value="force", default="idle")]))


def test_export_values_units_configuration_and_parameters(tmp_path, capsys):
    run = tmp_path / "e.kbrun"
    inst = "nist4"
    config = {"plan": "velocity_set", "sweeps": 30, "rate_hz": 1000.0}
    n = 50
    z = np.linspace(-1e-3, 1e-3, n)
    with RunWriter(run, {"run_id": "e", "instrument": inst}) as w:
        doc = write_start_document(w, inst, config, plan_name="velocity_set", t_s=1.0)
        w.append(f"kb/{inst}/servo/params", _param_list("servo", 1.0), 1.5)
        for k in range(n):
            t = 2.0 + k * 1e-3
            w.append(f"kb/{inst}/daq/frame", encode(DaqFrame(
                frame=k, coil_z_m=float(z[k]), coil_vz_m_per_s=1e-3, coil_voltage_v=0.5 + k,
                main_coil_current_a=0.01, temperature_k=295.0, pressure_pa=1e-4)), t)
            w.append(f"kb/{inst}/hw/sensors", encode(HwSensorFrame(
                frame=k, fringe_count=[k, 2 * k, 3 * k], psd_v=[0.1, 0.2])), t)
            if k % 10 == 0:
                w.append(f"kb/{inst}/servo/setpoint", encode(Setpoint(
                    frame=k, values={"main_coil_current_a": 0.001 * k} | ({"cm_current_a": 1.0} if k else {}))), t)
        w.append(f"kb/{inst}/servo/status", encode(Status(
            service="servo", state="running", online=True, session=2,
            counters={"frames_in": 7}, detail={"mode": "force", "error_m": 1e-9})), 3.0)
        w.append(f"kb/{inst}/servo/params", _param_list("servo", 2.5), 3.5)  # the last one counts
        w.append(f"kb/{inst}/servo/event", encode(Event(service="servo", kind="trip",
                                                        data={"why": ["a", 1]})), 3.6)
        w.append(f"kb/{inst}/servo/event", encode(Event(service="servo", kind="trip",
                                                        data={"why": {"deep": 1}})), 3.7)
        w.append(f"kb/{inst}/sim/truth", encode(SimTruth(frame=49, model="nist4", values={
            "bl_t_m": 693.2, "tau_hyst_n_m": 1e-6, "dcdz_f_per_m": 1e-9, "z_m": 1e-9})), 3.8)
        w.append(run_document_topic(inst), encode_document("stop", {"exit_status": "success"}), 4.0)
        w.append(f"kb/{inst}/misc/raw", b"\xc1", 4.1)  # not MessagePack: counted, not fatal
    with open(run, "ab") as f:  # and a torn tail
        f.write(b"\x10\x00\x00")

    out = tmp_path / "e.h5"
    assert cli_export(str(run), str(out)) == 0
    line = capsys.readouterr().out
    assert "records" in line and "torn tail" in line and line.count("\n") == 1
    with h5py.File(out) as f:
        assert f.attrs["run_id"] == "e" and f.attrs["instrument"] == inst
        assert f.attrs["config_hash"] == config_hash(config) == doc["config_hash"]
        assert json.loads(f.attrs["configuration"]) == config
        assert json.loads(f.attrs["start_document"])["uid"] == doc["uid"]
        assert "3 bytes" in f.attrs["torn_tail"]
        daq = f["daq/frame"]
        assert daq.attrs["message_type"] == "DaqFrame" and daq.attrs["count"] == n
        np.testing.assert_array_equal(daq["coil_z_m"][:], z)
        np.testing.assert_array_equal(daq["frame"][:], np.arange(n))
        np.testing.assert_array_equal(daq["t_recv_s"][:], 2.0 + np.arange(n) * 1e-3)
        np.testing.assert_array_equal(daq["coil_voltage_v"][:], 0.5 + np.arange(n))
        units = {name: daq[name].attrs.get("unit", "") for name in daq}
        assert units["coil_z_m"] == "m" and units["coil_vz_m_per_s"] == "m/s"
        assert units["coil_theta_x_rad"] == "rad" and units["coil_wx_rad_per_s"] == "rad/s"
        assert units["coil_voltage_v"] == "V" and units["main_coil_current_a"] == "A"
        assert units["temperature_k"] == "K" and units["pressure_pa"] == "Pa"
        assert units["capacitance_f"] == "F" and units["t_recv_s"] == "s" and units["frame"] == ""
        hw = f["hw/sensors"]
        assert hw["fringe_count"].shape == (n, 3) and hw["fringe_count"][7].tolist() == [7, 14, 21]
        assert hw["psd_v"].attrs["unit"] == "V"
        sp = f["servo/setpoint/values"]
        np.testing.assert_array_equal(sp["main_coil_current_a"][:], 0.001 * np.arange(0, n, 10))
        cm = sp["cm_current_a"][:]
        assert np.isnan(cm[0]) and (cm[1:] == 1.0).all()
        st = f["servo/status"]
        assert st["state"][0].decode() == "running" and st["counters/frames_in"][0] == 7
        assert st["detail/error_m"].attrs["unit"] == "m" and st["detail/mode"][0].decode() == "force"
        assert json.loads(f["servo/event/data/why_value"][0]) == ["a", 1]  # a dict elsewhere
        assert np.isnan(f["servo/event/data/why/deep"][0]) and f["servo/event/data/why/deep"][1] == 1
        assert f["parameters/servo"].attrs["kp"] == 2.5
        assert f["parameters/servo"].attrs["kp.unit"] == "A/m"
        assert f["parameters/servo"].attrs["mode"] == "force"
        assert [s.decode() for s in f["documents/name"][:]] == ["start", "stop"]
        assert f["misc/raw"].attrs["undecodable"] == 1
        truth = f["sim/truth/values"]  # units from the table, not from suffixes ("m" for all three)
        assert truth["bl_t_m"].attrs["unit"] == "T m" and truth["dcdz_f_per_m"].attrs["unit"] == "F/m"
        assert truth["tau_hyst_n_m"].attrs["unit"] == "N m" and truth["z_m"].attrs["unit"] == "m"
        assert "unit" not in sp["cm_current_a"].attrs  # not a name of the bus: no unit guessed
        assert st["counters/frames_in"].attrs.get("unit", "") == ""
    assert unit_of("seq") == "" and unit_of("_m") is None and unit_of("gain_x_n_s_per_m") is None
    assert unit_of("frames_in", "counters") == "" and unit_of("age_ms_p99", "timing") == "ms"

    # missing and corrupt files: a clear message and a non-zero status
    assert cli_export(str(tmp_path / "nope.kbrun"), str(tmp_path / "x.h5")) == 1
    assert "no such run file" in capsys.readouterr().err
    bad = tmp_path / "bad.kbrun"
    bad.write_bytes(os.urandom(64))
    assert cli_export(str(bad), str(tmp_path / "y.h5")) == 1
    assert "not a kibble run file" in capsys.readouterr().err
