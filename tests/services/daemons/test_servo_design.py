"""The servo's configured loops against the plants' own models (python-control): stable, with
the phase margin and crossover they were designed for."""

import math

import control as ct
import pytest

from kibble.control import design as D
from kibble.control import pid as P
from kibble.hil_sim.nist4 import Nist4Actuators, Nist4Plant
from kibble.hil_sim.params import load_params
from kibble.services.runtime.service import load_config
from kibble.services.daemons.servo import Servo
from kibble.services.instruments import instrument

DT_S = 1e-3


def servo_pid(model: str):
    """The PID parameter row of the servo as ``kibble up --sim MODEL`` configures it."""
    cfg = load_config("servo", instrument(model).config, restore=False)
    specs = {name: Servo.__dict__[name].default for name in ("kp_n_per_m", "ki_n_per_m_s", "kd_n_s_per_m",
                                                            "derivative_filter_s")}
    specs.update({k: v for k, v in cfg.params.items() if k in specs})
    return P.pid_params(1, dt_s=DT_S, kp=specs["kp_n_per_m"], ki_per_s=specs["ki_n_per_m_s"],
                        kd_s=specs["kd_n_s_per_m"], tf_s=specs["derivative_filter_s"])[0]


def figures(plant_force_to_z, par_row):
    _, c_y = D.pid_tfs(par_row)
    return D.loop_analysis(D.loop_gain(plant_force_to_z, c_y, delay_samples=1))


def test_nist4_force_loop_margins():
    plant = Nist4Plant(seed=0)
    ss = plant.linearize(Nist4Actuators(main_force_mode=True))
    # the wheel (theta, omega) and the main-coil current: the states this loop drives (the
    # five coil DOF couple in only weakly, and the 14-state transfer function is ill-conditioned)
    keep = [ss.state_labels.index(n) for n in ("theta", "omega", "i_main")]
    u, y = ss.input_labels.index("i_main_cmd"), ss.output_labels.index("z")
    wheel = ct.ss(ss.A[keep][:, keep], ss.B[keep, u:u + 1], ss.C[y:y + 1, keep], 0.0)
    bl = Servo.__dict__["bl_t_m"].default
    fig = figures(wheel * (1.0 / bl), servo_pid("nist4"))      # the servo's output is F, I = F / Bl
    assert fig.stable
    assert fig.phase_margin_deg >= 40
    assert 4.0 <= fig.crossover_hz <= 6.5


def test_efb_force_loop_margins():
    p = load_params("efb")
    m, k = p["linkage.mass_kg"], p["linkage.stiffness_N_per_m"]
    w0 = math.sqrt(k / m)
    plant = ct.tf([1.0], [m, m * w0 / p["linkage.q"], k]) * ct.tf([1.0], [p["hv.tau_s"], 1.0])
    fig = figures(plant, servo_pid("efb"))
    assert fig.stable
    assert fig.phase_margin_deg >= 40
    assert fig.crossover_hz == pytest.approx(1.0, rel=0.15)
