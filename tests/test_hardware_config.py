"""The daemons describe the hardware the simulator models (issue 14 item 2): every setting of a
daemon that describes a simulated device (DAC bits and full scale, driver gain, coil and plate
geometry, force constants) equals the simulator's parameter of it, as ``kibble up --sim MODEL``
configures the daemon. A change on one side only fails here, not as a loop that quietly
mis-scales its outputs. (The mass-lift parameters: tests/test_mass_lift.py.)"""

import pytest

from kibble.hil_sim.params import load_params
from kibble.services.actuator import typed_settings
from kibble.services.current_source import CurrentSourceSettings
from kibble.services.damping import DampingSettings
from kibble.services.hv_source import HvSourceSettings
from kibble.services.runtime import load_config
from kibble.services.theta_z import ThetaZSettings
from kibble.services.up import stack_config

SAME_HARDWARE = {
    ("nist4", "current_source", CurrentSourceSettings): {
        "main_full_scale_a": "main_source.full_scale_A", "main_coarse_bits": "main_source.coarse_bits",
        "main_fine_bits": "main_source.fine_bits", "main_fine_span_lsb": "main_source.fine_span_lsb",
        "cm_full_scale_a": "cm_source.full_scale_A", "cm_coarse_bits": "cm_source.coarse_bits",
        "cm_fine_bits": "cm_source.fine_bits", "cm_fine_span_lsb": "cm_source.fine_span_lsb"},
    ("nist4", "damping", DampingSettings): {
        "angles_deg": "damping_coils.angles_deg", "radius_m": "damping_coils.radius_m",
        "kv_n_per_a": "damping_coils.kv_N_per_A", "kh_n_per_a": "damping_coils.kh_N_per_A",
        "dac_bits": "damping_coils.dac_bits", "dac_full_scale_v": "damping_coils.dac_full_scale_V",
        "driver_a_per_v": "damping_coils.driver_A_per_V"},
    ("nist4", "theta_z", ThetaZSettings): {
        "radius_m": "theta_z.radius_m", "gap_m": "theta_z.gap_m",
        "plate_area_m2": "theta_z.plate_area_m2", "dac_bits": "theta_z.dac_bits",
        "full_scale_v": "theta_z.full_scale_V", "limit_v": "theta_z.hv_limit_V",
        "pressure_limit_pa": "theta_z.pressure_limit_Pa"},
    ("efb", "hv_source", HvSourceSettings): {
        "dac_bits": "hv.dac_bits", "full_scale_v": "hv.full_scale_V"},
}
"""(instrument, daemon, its settings) -> daemon setting -> the simulator's parameter."""


@pytest.mark.parametrize("model,daemon,kind", list(SAME_HARDWARE), ids=lambda x: getattr(x, "__name__", x))
def test_the_daemons_describe_the_simulated_hardware(model, daemon, kind, tmp_path):
    cfg = load_config(daemon, stack_config(model), instrument=model, state_dir=tmp_path, restore=False)
    settings, plant = typed_settings(cfg.settings, kind, daemon), load_params(model)
    differ = {name: (getattr(settings, name), plant[sim])
              for name, sim in SAME_HARDWARE[model, daemon, kind].items()
              if getattr(settings, name) != plant[sim]}
    assert not differ, f"{daemon} settings differ from hil_sim/{model}.toml: {differ}"
