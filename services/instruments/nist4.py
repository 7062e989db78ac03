"""The NIST-4 wheel balance (seed 001): five daemons, the servo's current map, the daq's
interferometer and PSD conversions, the velocity and force sets."""

from kibble.services.plans import engine as plans
from kibble.services.daemons.daq_core import Nist4Sensors
from kibble.services.instruments import Instrument
from kibble.services.daemons.servo_core import CurrentMap

NIST4 = Instrument(
    name="nist4",
    daemons=("daq", "current_source", "servo", "damping", "theta_z"),
    actuators=("current_source", "damping", "theta_z"),
    drives={"current_source": ("main_source", "cm_source"), "damping": ("damping",), "theta_z": ("theta_z_hv",)},
    together=(("daq", "servo", "current_source"), ("damping", "theta_z")),
    modes=("idle", "force", "velocity", "erase"),
    actuator_map=CurrentMap,
    sensor_map=Nist4Sensors,
    plans=(plans.velocity_set, plans.force_set, plans.nist4_run),
    safe_ending=plans.nist4_safe_ending,
    simulated={
        "current_source": {
            "main_full_scale_a": "main_source.full_scale_A", "main_coarse_bits": "main_source.coarse_bits",
            "main_fine_bits": "main_source.fine_bits", "main_fine_span_lsb": "main_source.fine_span_lsb",
            "cm_full_scale_a": "cm_source.full_scale_A", "cm_coarse_bits": "cm_source.coarse_bits",
            "cm_fine_bits": "cm_source.fine_bits", "cm_fine_span_lsb": "cm_source.fine_span_lsb"},
        "damping": {
            "angles_deg": "damping_coils.angles_deg", "radius_m": "damping_coils.radius_m",
            "kv_n_per_a": "damping_coils.kv_N_per_A", "kh_n_per_a": "damping_coils.kh_N_per_A",
            "dac_bits": "damping_coils.dac_bits", "dac_full_scale_v": "damping_coils.dac_full_scale_V",
            "driver_a_per_v": "damping_coils.driver_A_per_V"},
        "theta_z": {
            "radius_m": "theta_z.radius_m", "gap_m": "theta_z.gap_m",
            "plate_area_m2": "theta_z.plate_area_m2", "dac_bits": "theta_z.dac_bits",
            "full_scale_v": "theta_z.full_scale_V", "limit_v": "theta_z.hv_limit_V",
            "pressure_limit_pa": "theta_z.pressure_limit_Pa"},
        "servo": {
            "lift_ramp_s": "main_side.lift_ramp_s", "test_mass_kg": "main_side.test_mass_kg",
            "aux_mass_kg": "main_side.aux_mass_kg"},
    },
)
