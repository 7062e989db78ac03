"""Units as data: the unit of every numeric name that travels on the bus, declared once.

Whoever stores or shows a value (``kibble export``'s HDF5 ``unit`` attributes, an operator's
view) reads its unit here; it is never guessed from the name's suffix, which cannot tell
``bl_t_m`` (T m) from ``dcdz_f_per_m`` (F/m) or a torque ``tau_hyst_n_m`` (N m) from a stiffness.
The table covers the fields of the message types (those of the frames from their plausibility
limits, :func:`~kibble.bus_schema.messages.field_limits`), the keys of their ``values`` and ``detail``
maps as the daemons and the simulator publish them, and the simulator's truth (a test ties it
to what the in-process stacks really publish). ``""`` is dimensionless (a count, a tag, a
code, a flag, a ratio); a name that is not declared has no unit (:func:`unit_of` is None),
never a guessed one. A ``counters`` map holds counts: :data:`COUNT_MAPS`.

Service parameters declare their units themselves (``ParamSpec.unit``).

A name whose unit divides says so (``kp_n_per_m``, N/m; ``bl_t_m`` is T m); names renamed to
say so are in :data:`RENAMED`, so that what was saved under an old name still finds its new one.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from kibble.bus_schema.messages import MESSAGE_TYPES, field_limits

_DIMENSIONLESS = (
    # header, tags, codes and flags
    "schema", "seq", "frame", "session", "heartbeat", "loop_overruns", "codes", "relays",
    "hold_frames", "decimation", "test_mass_on", "aux_on", "stale", "relays_closed", "paused",
    "seed", "step",
    # the setpoints' switches (Setpoint.switches, booleans) and their state in the status detail
    "main_coil_connected", "hv_to_main",
    "latency_n", "records", "record_hw",
    # Status.timing
    "frames", "skipped", "batch_max", "cpu_load",
)

_UNITS: dict[str, str] = {name: "" for name in _DIMENSIONLESS}
_UNITS.update({
    # times
    "t_mono_s": "s", "t_utc_s": "s", "t_recv_s": "s", "sim_time_s": "s", "uptime_s": "s",
    "loop_period_mean_s": "s", "loop_period_jitter_s": "s", "loop_period_max_s": "s",
    "last_flush_age_s": "s", "sim_s": "s", "total_s": "s", "eta_s": "s",
    "age_ms_p50": "ms", "age_ms_p99": "ms", "age_ms_max": "ms",
    "latency_p50_ms": "ms", "latency_p99_ms": "ms",
    "cpu_us_p50": "us", "cpu_us_p99": "us",
    "rate_hz": "Hz", "steps_per_s": "1/s",
    "bytes": "B", "pending_bytes": "B", "rx_backlog_bytes": "B",
    # setpoints, loop frames and the actuators' status details
    "hv_voltage_v": "V", "z_ref_m": "m", "v_ref_m_per_s": "m/s", "z_m": "m", "error_m": "m",
    "error_rms_m": "m", "force_n": "N", "feedforward_n": "N",
    "set0_v_a": "A", "set0_h_a": "A", "set1_v_a": "A", "set1_h_a": "A", "set2_v_a": "A",
    "set2_h_a": "A", "electrode_a_v": "V", "electrode_b_v": "V",
    # sim/truth, NIST-4
    "theta_rad": "rad", "omega_rad_per_s": "rad/s", "vz_m_per_s": "m/s", "i_main_a": "A", "i_cm_a": "A",
    "i_main_reg_a": "A", "i_cm_reg_a": "A", "x_m": "m", "y_m": "m", "theta_x_rad": "rad",
    "theta_y_rad": "rad", "theta_z_rad": "rad", "vx_m_per_s": "m/s", "vy_m_per_s": "m/s",
    "wx_rad_per_s": "rad/s", "wy_rad_per_s": "rad/s", "wz_rad_per_s": "rad/s", "bl_t_m": "T m", "emf_v": "V",
    "magnet_temperature_k": "K", "agx_m_per_s2": "m/s^2", "agy_m_per_s2": "m/s^2", "agz_m_per_s2": "m/s^2",
    "m_test_kg": "kg", "m_aux_kg": "kg", "tau_hyst_n_m": "N m",
    # sim/truth, EFB
    "v_amp_v": "V", "v_out_v": "V", "f_main_n": "N", "f_aux_n": "N", "dcdz_f_per_m": "F/m",
    "m_load_kg": "kg", "f_hyst_n": "N",
})

# the fields of the hardware and DAQ frames carry their unit with their plausibility limits
for _type in MESSAGE_TYPES:
    _UNITS.update({name: lim.unit for name, lim in field_limits(_type).items()})

UNITS: Mapping[str, str] = MappingProxyType(_UNITS)
"""Name -> unit of every numeric name on the bus (``""``: dimensionless)."""

COUNT_MAPS = frozenset({"counters"})
"""Fields whose map holds counts only (every key dimensionless)."""


def unit_of(name: str, within: str = "") -> str | None:
    """The unit of ``name`` (a field, or a key of the map field ``within``), ``""`` for a
    dimensionless one, None if it is not declared."""
    if within in COUNT_MAPS:
        return ""
    return UNITS.get(name)


RENAMED: Mapping[str, str] = MappingProxyType({
    # renamed: begin (old name -> new name; written by the renames script, do not edit by hand)
    "speed_threshold_m_s": "speed_threshold_m_per_s",  # m/s
    "molar_mass_kg_mol": "molar_mass_kg_per_mol",  # kg/mol
    "force_coeff_N_K": "force_coeff_N_per_K",  # N/K
    "ifo_path_m_K": "ifo_path_m_per_K",  # m/K
    "coil_vx_m_s": "coil_vx_m_per_s",  # m/s
    "coil_vy_m_s": "coil_vy_m_per_s",  # m/s
    "coil_vz_m_s": "coil_vz_m_per_s",  # m/s
    "coil_wx_rad_s": "coil_wx_rad_per_s",  # rad/s
    "coil_wy_rad_s": "coil_wy_rad_per_s",  # rad/s
    "coil_wz_rad_s": "coil_wz_rad_per_s",  # rad/s
    "vx_m_s": "vx_m_per_s",  # m/s
    "vy_m_s": "vy_m_per_s",  # m/s
    "vz_m_s": "vz_m_per_s",  # m/s
    "wx_rad_s": "wx_rad_per_s",  # rad/s
    "wy_rad_s": "wy_rad_per_s",  # rad/s
    "wz_rad_s": "wz_rad_per_s",  # rad/s
    "omega_rad_s": "omega_rad_per_s",  # rad/s
    "v_m_s": "v_m_per_s",  # m/s
    "v_ref_m_s": "v_ref_m_per_s",  # m/s
    "velocity_m_s": "velocity_m_per_s",  # m/s
    "speed_m_s": "speed_m_per_s",  # m/s
    "sweep_speed_m_s": "sweep_speed_m_per_s",  # m/s
    "approach_speed_m_s": "approach_speed_m_per_s",  # m/s
    "gradient_speed_m_s": "gradient_speed_m_per_s",  # m/s
    "watchdog_vz_rms_m_s": "watchdog_vz_rms_m_per_s",  # m/s
    "accel_m_s2": "accel_m_per_s2",  # m/s^2
    "sweep_accel_m_s2": "sweep_accel_m_per_s2",  # m/s^2
    "approach_accel_m_s2": "approach_accel_m_per_s2",  # m/s^2
    "gradient_accel_m_s2": "gradient_accel_m_per_s2",  # m/s^2
    "g_m_s2": "g_m_per_s2",  # m/s^2
    "agx_m_s2": "agx_m_per_s2",  # m/s^2
    "agy_m_s2": "agy_m_per_s2",  # m/s^2
    "agz_m_s2": "agz_m_per_s2",  # m/s^2
    "jerk_m_s3": "jerk_m_per_s3",  # m/s^3
    "sweep_jerk_m_s3": "sweep_jerk_m_per_s3",  # m/s^3
    "slew_a_s": "slew_a_per_s",  # A/s
    "main_slew_a_s": "main_slew_a_per_s",  # A/s
    "cm_slew_a_s": "cm_slew_a_per_s",  # A/s
    "safe_slew_a_s": "safe_slew_a_per_s",  # A/s
    "handover_slew_a_s": "handover_slew_a_per_s",  # A/s
    "slew_v_s": "slew_v_per_s",  # V/s
    "safe_slew_v_s": "safe_slew_v_per_s",  # V/s
    "force_slew_n_s": "force_slew_n_per_s",  # N/s
    "drift_n_s": "drift_n_per_s",  # N/s
    "drift_f_s": "drift_f_per_s",  # F/s
    "kp_n_m": "kp_n_per_m",  # N/m
    "ki_n_m_s": "ki_n_per_m_s",  # N/(m s)
    "kd_n_s_m": "kd_n_s_per_m",  # N s/m
    "spring_n_m": "spring_n_per_m",  # N/m
    "kp_n_m_rad": "kp_n_m_per_rad",  # N m/rad
    "ki_n_m_rad_s": "ki_n_m_per_rad_s",  # N m/(rad s)
    "kd_n_m_s_rad": "kd_n_m_s_per_rad",  # N m s/rad
    "gain_x_n_s_m": "gain_x_n_s_per_m",  # N s/m
    "gain_y_n_s_m": "gain_y_n_s_per_m",  # N s/m
    "gain_theta_x_n_m_s": "gain_theta_x_n_m_s_per_rad",  # N m s/rad
    "gain_theta_y_n_m_s": "gain_theta_y_n_m_s_per_rad",  # N m s/rad
    "stiffness_N_m": "stiffness_N_per_m",  # N/m
    "nominal_stiffness_N_m": "nominal_stiffness_N_per_m",  # N/m
    "stop_stiffness_N_m": "stop_stiffness_N_per_m",  # N/m
    "knife_stiffness_N_m_rad": "knife_stiffness_N_m_per_rad",  # N m/rad
    "nominal_stiffness_N_m_rad": "nominal_stiffness_N_m_per_rad",  # N m/rad
    "stop_stiffness_N_m_rad": "stop_stiffness_N_m_per_rad",  # N m/rad
    "kappa_f_m": "kappa_f_per_m",  # F/m
    "aux_kappa_f_m": "aux_kappa_f_per_m",  # F/m
    "kappa_trial_f_m": "kappa_trial_f_per_m",  # F/m
    "kappa_true_f_m": "kappa_true_f_per_m",  # F/m
    "dcdz_f_m": "dcdz_f_per_m",  # F/m
    "u_dcdz_f_m": "u_dcdz_f_per_m",  # F/m
    "dcdz_sweep_f_m": "dcdz_sweep_f_per_m",  # F/m
    "dcdz_before_f_m": "dcdz_before_f_per_m",  # F/m
    "dcdz_after_f_m": "dcdz_after_f_per_m",  # F/m
    "dcdz_F_m": "dcdz_F_per_m",  # F/m
    "aux_dcdz_F_m": "aux_dcdz_F_per_m",  # F/m
    "temp_coeff_F_m_K": "temp_coeff_F_per_m_K",  # F/(m K)
    "K_J90_HZ_V": "K_J90_HZ_PER_V",  # Hz/V
    "K_J_HZ_V": "K_J_HZ_PER_V",  # Hz/V
    # renamed: end
})
"""Names renamed since files were saved under them, old -> new (issue 14: a unit that divides
says so, ``kp_n_per_m`` -> ``kp_n_per_m``). A service's state file that names an old parameter is
restored under the new name with a notice; an old name in a configuration, an override or a
command is refused with a message naming the new one (:func:`renamed_to`)."""


def renamed_to(name: str) -> str | None:
    """The new name of a renamed ``name`` (of a dotted name, ``linkage.stiffness``, by its last
    part), None if it was not renamed."""
    head, dot, leaf = name.rpartition(".")
    new = RENAMED.get(leaf)
    return None if new is None else f"{head}{dot}{new}"
