import math
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, strategies as st

from kibble.bus_schema.codec import DecodeError, decode, encode
from kibble.bus_schema.messages import MESSAGE_TYPES, DaqFrame, Status, frame_fields

ROOT = Path(__file__).resolve().parents[1]


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


def test_status_map_compat():
    s = Status(service="servo", state="idle", online=True, session=3)
    assert msgpack.unpackb(encode(s))["session"] == 3


def test_nonfinite_rejected_with_field_name():
    raw = msgpack.packb([1, 0, 0.0, 0.0, 5, 0.0, math.nan])
    with pytest.raises(DecodeError, match=r"coil_x_m.*finite"):
        decode(raw, DaqFrame)


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_decode_error(data):
    for t in MESSAGE_TYPES:
        try:
            decode(data, t)
        except DecodeError:
            pass
