"""The daq's conversions per instrument without a bus (issue 14 item 3): the strategies the
instruments' definitions choose, against the geometry and the scalings they stand for."""

import math

import numpy as np
import pytest

from kibble.bus_schema.messages import HwSensorFrame
from kibble.services.runtime.actuator import typed_settings
from kibble.services.daemons.daq import DaqSettings
from kibble.services.daemons.daq_core import EfbSensors, Nist4Sensors
from kibble.services.instruments import instrument
from kibble.services.runtime.service import load_config

VALUES = {"pjvs_voltage_v": 1.25}


def settings(model: str) -> DaqSettings:
    cfg = load_config("daq", instrument(model).config, instrument=model, restore=False)
    return typed_settings(cfg.settings, DaqSettings, "daq")


def test_the_instruments_choose_their_conversions():
    assert instrument("nist4").sensor_map is Nist4Sensors and instrument("efb").sensor_map is EfbSensors
    nist4, efb = Nist4Sensors(settings("nist4")), EfbSensors(settings("efb"))
    assert (nist4.n_fringe, nist4.n_psd, efb.n_fringe, efb.n_psd) == (4, 6, 1, 0)


def test_nist4_fuses_a_tilted_plane_to_its_height_at_the_optical_centre():
    """The three coil interferometers sit on a circle of ``ifo_radius_m`` about the optical
    centre (the origin here); a plane z = z0 + a x + b y read at them gives z0 at the centre,
    whatever the tilt. The counter-mass is the fourth channel; PSDs at 0 V read no x, y or
    theta-z; the DVM gets the PJVS voltage back; the monitors are divided by their V/A."""
    s = settings("nist4")
    conv = Nist4Sensors(s)
    angles = np.radians(s.ifo_angles_deg)
    z0, a, b = 2.5e-6, 3e-5, -4e-5
    disp = [z0 + a * s.ifo_radius_m * math.cos(t) + b * s.ifo_radius_m * math.sin(t) for t in angles]
    hw = HwSensorFrame(frame=1, psd_v=[0.0] * 6, dvm_v=[0.5], current_monitor_v=[1.0, 2.0])
    pose, cm_z, dvm, i_main, i_cm, cap = conv.convert(hw, disp + [7e-3], [0.0] * 6, 0.0, VALUES)
    assert pose[2] == pytest.approx(z0, abs=1e-18)
    assert (pose[0], pose[1], pose[5]) == (0.0, 0.0, 0.0)
    assert math.hypot(pose[3], pose[4]) == pytest.approx(math.hypot(a, b), rel=1e-12)   # the tilt's size
    assert cm_z == 7e-3 and cap == 0.0
    assert dvm == 0.5 + 1.25
    assert (i_main, i_cm) == (1.0 / s.main_monitor_v_per_a, 2.0 / s.cm_monitor_v_per_a)


def test_efb_takes_z_from_its_interferometer_and_passes_the_hv_and_the_bridge_on():
    conv = EfbSensors(settings("efb"))
    hw = HwSensorFrame(frame=1, dvm_v=[101.5], capacitance_f=[28e-12])
    last = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    pose, cm_z, dvm, i_main, i_cm, cap = conv.convert(hw, [4e-6], last, 0.25, VALUES)
    assert pose == [1.0, 2.0, 4e-6, 4.0, 5.0, 6.0] and last[2] == 3.0       # the last pose is kept
    assert (cm_z, dvm, i_main, i_cm, cap) == (0.25, 101.5, 0.0, 0.0, 28e-12)  # no PJVS on the EFB


@pytest.mark.parametrize("model", ["nist4", "efb"])
def test_an_instrument_measures_the_daq_fields_it_declares(model):
    """``bus_schema.instruments.DAQ_FIELDS`` (what the views show of an instrument) against its
    conversion: from a zero last pose, random readings on every channel reach exactly the
    declared fields among those the conversion fills."""
    from kibble.bus_schema.instruments import DAQ_FIELDS

    rng = np.random.default_rng(3)
    conv = instrument(model).sensor_map(settings(model))
    hw = HwSensorFrame(frame=1, psd_v=rng.uniform(-1, 1, conv.n_psd).tolist(), dvm_v=[0.5],
                       current_monitor_v=[1.0, 2.0], capacitance_f=[28e-12])
    disp = rng.uniform(-1e-6, 1e-6, conv.n_fringe).tolist()
    pose, cm_z, dvm, i_main, i_cm, cap = conv.convert(hw, disp, [0.0] * 6, 0.0, VALUES)
    filled = dict(zip(("coil_x_m", "coil_y_m", "coil_z_m", "coil_theta_x_rad", "coil_theta_y_rad",
                       "coil_theta_z_rad"), pose))
    filled.update(counter_mass_z_m=cm_z, coil_voltage_v=dvm, main_coil_current_a=i_main,
                  counter_mass_current_a=i_cm, capacitance_f=cap)
    assert {name for name, value in filled.items() if value != 0.0} == set(DAQ_FIELDS[model]) & set(filled)
