"""DAC conversions agree with the simulator's own decoding of the codes (independent code)."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from kibble.hil_sim.nist4 import Nist4Plant
from kibble.services.runtime.dac import CoarseFineDac, Dac


@pytest.fixture(scope="module")
def plant():
    return Nist4Plant(seed=0)


@pytest.fixture(scope="module")
def main_dac(plant):
    p = plant.params
    return CoarseFineDac(p["main_source.full_scale_A"], int(p["main_source.coarse_bits"]),
                         int(p["main_source.fine_bits"]), p["main_source.fine_span_lsb"])


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-0.0199, max_value=0.0199))
def test_coarse_fine_matches_plant(plant, main_dac, current_a):
    codes = main_dac.to_codes(current_a)
    assert codes == plant.current_to_codes(current_a, "main")
    back = main_dac.to_value(*codes)
    assert back == pytest.approx(plant.codes_to_current(*codes, "main"), rel=1e-15, abs=1e-18)
    assert abs(back - current_a) <= main_dac.fine_lsb / 2 * (1 + 1e-9)


def test_coarse_fine_resolution_and_clamp(main_dac):
    # 20 mA full scale, 16 + 16 bits, fine range spans 4 coarse LSB: 610 nA coarse, 37 pA fine
    assert main_dac.coarse_lsb == pytest.approx(0.02 / 32768)
    assert main_dac.fine_lsb == pytest.approx(0.02 / 32768 * 4 / 65536)
    assert main_dac.fine_lsb == pytest.approx(37.25e-12, rel=1e-3)
    assert main_dac.to_codes(1.0)[0] == 32767
    assert main_dac.to_codes(-1.0)[0] == -32768
    with pytest.raises(ValueError, match="non-finite"):
        main_dac.to_codes(math.nan)


def test_single_dac_round_trip():
    dac = Dac(16, 10.0)
    assert dac.to_code(10.0) == 32767          # clamps at the top code
    assert dac.to_code(-10.0) == -32768
    assert dac.to_value(dac.to_code(1.2345)) == pytest.approx(1.2345, abs=dac.lsb / 2)
    with pytest.raises(ValueError):
        Dac(16, 0.0)
