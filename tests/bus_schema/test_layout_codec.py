import math
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, strategies as st

from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import (
    COUNTER_MAX, FRAME_MAX, MESSAGE_TYPES, DaqFrame, HwSensorFrame, Setpoint, Status, field_limits,
    frame_fields,
)
from kibble.hil_sim.params import load_params

ROOT = Path(__file__).resolve().parents[2]


def test_bare_control_is_python_control():
    out = subprocess.run([sys.executable, "-c", "import control, kibble.control, os; "
                          "print(control.__file__); print(list(kibble.control.__path__)[0])"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "site-packages" in out[0]
    assert Path(out[1]).resolve() == ROOT / "control"


def test_daq_frame_round_trip_and_msgpack_compat():
    f = DaqFrame(frame=7, coil_z_m=1.5e-9, pressure_pa=1e-3)
    assert decode(encode(f), DaqFrame) == f
    raw = msgpack.unpackb(encode(f))
    assert raw[frame_fields(DaqFrame).index("coil_z_m")] == 1.5e-9


def test_setpoint_switches_are_booleans_on_the_wire():
    """A switch travels as a MessagePack boolean; a number where a switch belongs (the 0.0/1.0
    floats the switches were carried as) fails decoding, naming the field."""
    sp = Setpoint(frame=3, values={"main_coil_current_a": 1e-3}, switches={"main_coil_connected": False})
    assert decode(encode(sp), Setpoint) == sp
    raw = msgpack.unpackb(encode(sp))
    assert raw[frame_fields(Setpoint).index("switches")] == {"main_coil_connected": False}
    for number in (0.0, 1.0, 0, 1, 0.5, "true", None):
        wire = [1, 0, 0.0, 0.0, 3, {}, {"main_coil_connected": number}]
        with pytest.raises(DecodeError, match=r"switches"):
            decode(msgpack.packb(wire), Setpoint)


def test_status_map_compat():
    s = Status(service="servo", state="idle", online=True, session=3)
    assert msgpack.unpackb(encode(s))["session"] == 3


def test_nonfinite_rejected_with_field_name():
    raw = msgpack.packb([1, 0, 0.0, 0.0, 5, 0.0, math.nan])
    with pytest.raises(DecodeError, match=r"coil_x_m.*finite"):
        decode(raw, DaqFrame)


UNITS = {"_m": "m", "_rad": "rad", "_m_per_s": "m/s", "_rad_per_s": "rad/s", "_v": "V", "_a": "A",
         "_f": "F", "_k": "K", "_pa": "Pa"}


def test_every_reading_of_the_frames_has_plausibility_limits_with_unit_and_source():
    for msg_type in (HwSensorFrame, DaqFrame):
        limits = field_limits(msg_type)
        header = ("schema", "seq", "t_mono_s", "t_utc_s", "frame", "sim_time_s", "session")
        readings = [f for f in frame_fields(msg_type) if f not in header]
        assert sorted(limits) == sorted(readings), msg_type
        for name, lim in limits.items():
            suffix = max((s for s in UNITS if name.endswith(s)), key=len, default=None)
            assert lim.unit == (UNITS[suffix] if suffix else "fringes"), name
            assert lim.lo < lim.hi and len(lim.source) > 20, name


def test_the_limits_cover_what_the_modelled_instruments_produce():
    """The limits are those of hil_sim/nist4.toml and efb.toml: what the hardware produces lies
    within them, with the daq's origin anywhere within +-50 mm / mrad."""
    nist4, efb = load_params("nist4"), load_params("efb")
    lim = field_limits(DaqFrame)
    stop_m = max(nist4["wheel.stop_rad"] * nist4["wheel.radius_m"], efb["linkage.stop_m"])
    assert stop_m + 0.05 <= lim["coil_z_m"].hi and stop_m <= lim["counter_mass_z_m"].hi
    assert (2 * nist4["sim.g_m_per_s2"] * 2 * stop_m) ** 0.5 <= lim["coil_vz_m_per_s"].hi
    assert nist4["main_source.full_scale_A"] < lim["main_coil_current_a"].hi
    assert nist4["cm_source.full_scale_A"] < lim["counter_mass_current_a"].hi
    assert max(nist4["dvm.range_V"] + 20.0, efb["dvm.range_V"]) <= lim["coil_voltage_v"].hi
    for p in (nist4, efb):
        t_k = p["temperature.initial_C"] + 273.15
        assert lim["temperature_k"].lo <= t_k <= lim["temperature_k"].hi
        assert p["pressure.initial_Pa"] <= lim["pressure_pa"].hi
    raw = field_limits(HwSensorFrame)
    assert nist4.spec("psd.adc_full_scale_V").max <= raw["psd_v"].hi
    assert efb.spec("dvm.range_V").max <= raw["dvm_v"].hi


@pytest.mark.parametrize("field, value, text", [
    ("coil_z_m", 1.0, "$.coil_z_m is 1 m, beyond its plausibility limits [-0.1, 0.1] m"),
    ("coil_z_m", 1e300, "$.coil_z_m is 1e+300 m, beyond its plausibility limits"),
    ("coil_vz_m_per_s", math.nan, "$.coil_vz_m_per_s must be a finite number (got nan)"),
    ("main_coil_current_a", -0.5, "$.main_coil_current_a is -0.5 A, beyond"),
])
def test_an_implausible_reading_fails_decoding_naming_the_field_and_its_limits(field, value, text):
    """Issue 17 finding 8: a daq/frame with coil_z_m = 1.0 moved the coil 548 um, 1e300 drove
    the servo to its limit; no reader takes such a frame now."""
    with pytest.raises(DecodeError, match=re.escape(text)):
        decode(encode(DaqFrame(frame=1, **{field: value})), DaqFrame)
    with pytest.raises(DecodeError, match=re.escape("$.psd_v[1] is 200 V, beyond")):
        decode(encode(HwSensorFrame(frame=1, psd_v=[0.0, 200.0])), HwSensorFrame)


def test_frame_tags_and_counters_are_bounded():
    """Issue 17 finding 3: a frame tag of 2^63 - 1 crashed the daq downstream of the decode."""
    for frame in (FRAME_MAX + 1, (1 << 63) - 1, (1 << 64) - 1):
        with pytest.raises(DecodeError, match="frame"):
            decode(encode(HwSensorFrame(frame=frame)), HwSensorFrame)
    with pytest.raises(DecodeError, match="counters"):
        decode(encode(Status(service="daq", state="running", online=True, session=1,
                             counters={"late": COUNTER_MAX + 1})), Status)


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_decode_error(data):
    for t in MESSAGE_TYPES:
        try:
            decode(data, t)
        except DecodeError:
            pass


def test_one_topic_to_type_map_for_the_export_and_kibble_watch():
    """``kibble watch`` decoded the servo's loop frame and the simulator's truth as bare
    MessagePack (its own map lacked them); it and the export now read the one in bus_schema."""
    from kibble.bus_schema.codec import encode
    from kibble.bus_schema.messages import LoopFrame, SimTruth
    from kibble.bus_schema.topics import Topics, message_type_for
    from kibble.services.cli.main import decode_for_display

    t = Topics("nist4")
    assert decode_for_display(t.frame("servo"), encode(LoopFrame(frame=3, mode="force")))[0] == "LoopFrame"
    assert decode_for_display(t.sim("truth"), encode(SimTruth(frame=3, model="nist4")))[0] == "SimTruth"
    kinds = {t.frame("daq"): "DaqFrame", t.frame("servo"): "LoopFrame", t.hw("sensors"): "HwSensorFrame",
             t.hw("main_source"): "HwActuatorCommand", t.setpoint("servo"): "Setpoint",
             t.status("servo"): "Status", t.params("servo"): "ParamList", t.cmd("servo"): "Command",
             t.reply("servo"): "Reply", t.event("servo"): "Event", t.sim("truth"): "SimTruth"}
    assert {topic: message_type_for(topic).__name__ for topic in kinds} == kinds
