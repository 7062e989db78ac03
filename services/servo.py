"""``servo``: holds the balance. DAQ frames in, actuator setpoints out, one per frame.

The control law is the numba loop of :mod:`kibble.control` (filter module + PID) working in
force units: the PID turns the coil-position error (m) into a force on the coil (N), which the
instrument's actuator map turns into the setpoint of its actuator service:

=========  ============================================  ======================================
kind       force mode (null)                             velocity / gradient mode
=========  ============================================  ======================================
nist4      main coil: ``I = F / Bl``                     counter-mass motor: ``I = -F / Bl_m``
efb        main electrodes: ``V = sqrt(F/kappa) + V_s``  aux. electrode: ``V = sqrt(F/kappa_aux) + V_s,aux``
=========  ============================================  ======================================

Modes (command ``mode``; every change is bumpless: the new loop starts from the force the
actuators produce now, as the last setpoint asked for it):

``idle``      no control; zero actuator setpoints (the actuator services slew to them).
``force``     hold ``z_ref`` (the weighing position, default 0) with the force loop plus the
              feedforward of announced load steps (command ``mass``: the servo drives the mass
              lift itself and ramps the feedforward ``delta_m g`` over ``lift_ramp_s``). Entered
              with the coil farther than ``step_limit_m`` from ``z_ref`` (at its stops, after a
              trip), the reference does not step there: it starts where the coil is and slews to
              ``z_ref`` (trajectory ``approach``: ``approach_speed_m_s``, ``approach_accel_m_s2``).
``velocity``  track a trajectory with the velocity loop (command ``sweep`` or ``move``); the
              feedforward is inertia + knife-edge spring. The counter-mass motor takes the main
              coil's force over while the main-coil current ramps to zero (``handover_slew_a_s``);
              then the switchbox opens the coil (current_source switches it only at zero current).
``erase``     the force loop tracks a damped sinusoid about ``z_ref`` (command ``erase``), then
              returns to ``force`` by itself.
``gradient``  EFB only (seed 000 section 3.1, capacitance-gradient mode): the same force loop holds
              the floating link with the auxiliary electrode (``hv_to_main`` off: the amplifier
              on the auxiliary electrode, the main cylinders on the capacitance bridge) at a
              reference that command ``move`` slews (trapezoid of ``gradient_speed_m_s`` and
              ``gradient_accel_m_s2``, never a step) within ``gradient_travel_m`` of ``z_ref``.
              Entered from ``force`` and left back to it only with the link held (within
              ``switch_tolerance_m`` of the reference), no trajectory running, the masses off and
              (back to ``force``) the reference at ``z_ref``. The handover keeps the loop's
              force: the voltage jumps from ``sqrt(F / kappa)`` on the main electrodes to
              ``sqrt(F / kappa_aux)`` on the auxiliary one (always positive; or back) in the same
              frame as the relay; hv_source ramps the output to zero, switches the relay at zero
              and slews to the new voltage (17 ms at 1 kHz, the link moves ~15 nm).
``hold``      after a restart (never commanded): the setpoints hold what the actuators produce,
              from their readback in the first DAQ frame (NIST-4 the source monitors, EFB the DVM
              on the HV), with the relays of the mode persisted before the restart; no loop. A
              servo that was in force mode resumes it in that frame (bumpless, from the held
              force) if the coil is within ``step_limit_m`` of ``z_ref``; otherwise, and after
              velocity or gradient mode (whose trajectory is lost), it holds until an operator
              chooses a mode.

Persistence: the mode (``erase`` as ``force``) and the masses on the pan are saved with the
parameters (state file, ``operating``) at every change, with the frame; a restarted servo takes
them up at its first DAQ frame unless the hardware's frame clock has restarted since (a new
simulator or hardware session: then it starts idle with the configured masses).

The EFB setpoint carries the reference (``z_ref_m``) beside the voltage and the relay, so that
hv_source's watchdog can watch the link's deviation from where the servo holds it.

Output: ``servo/setpoint`` each frame (tagged with the DAQ frame index), ``servo/frame``
(:class:`~kibble.bus_schema.messages.LoopFrame`: reference, error, force, feedforward) every
``frame_decimation`` frames, and the loop statistics in the status detail.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import msgspec
import numpy as np

from kibble.bus_schema.messages import Command, DaqFrame, HwActuatorCommand, LoopFrame, Setpoint
from kibble.bus_schema.realtime import FrameClock
from kibble.control import pid as P
from kibble.control.electrostatic import efb_force_to_voltage
from kibble.control.trajectory import (
    erase_duration_s, erase_eval, load_step_feedforward, load_step_feedforward_at,
    sweep_duration_s, sweep_eval,
)
from kibble.services.actuator import typed_settings
from kibble.services.params import Param
from kibble.services.runtime import Service, command

MODES: dict[str, tuple[str, ...]] = {"nist4": ("idle", "force", "velocity", "erase"),
                                     "efb": ("idle", "force", "gradient")}


class ServoSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which instrument and its fixed limits (configuration, not live-tunable)."""

    kind: Literal["nist4", "efb"] = "nist4"
    frame_rate_hz: float = 1000.0
    force_limit_n: float = 10.0
    """Largest force the loop may ask for (N): NIST-4 1 kg exchange needs 4.9 N either way."""
    force_min_n: float | None = None
    """Smallest force (N); None: -force_limit_n. The EFB's electrostatic force only pulls: 0."""
    main_limit_a: float = 0.015
    cm_limit_a: float = 0.045
    hv_limit_v: float = 1000.0
    mass_lift_device: str = "mass_lift"
    initial_test_mass_on: bool = False
    initial_aux_on: bool = True
    """NIST-4 boots in the velocity-mode configuration (auxiliary mass on the pan)."""
    gradient_travel_m: float = 1.2e-3
    """EFB gradient mode: farthest reference from the weighing position (m); the 2 mm gradient
    sweep of seed 000 needs +-1 mm, the simulated linkage's stops are at +-1.5 mm."""


class Servo(Service):
    name = "servo"

    # ---- the loop (force units; one PID, the mode picks the actuator)
    z_ref_m = Param(0.0, unit="m", min=-0.045, max=0.045, doc="weighing position held in force mode")
    kp_n_m = Param(5.33e4, unit="N/m", min=0.0, max=1e7, doc="proportional gain")
    ki_n_m_s = Param(2.78e5, unit="N/(m s)", min=0.0, max=1e8, doc="integral gain")
    kd_n_s_m = Param(2.54e3, unit="N s/m", min=0.0, max=1e6, doc="derivative gain (on the measurement)")
    derivative_filter_s = Param(3.2e-3, unit="s", min=0.0, max=1.0, doc="derivative low-pass time constant")
    force_slew_n_s = Param(50.0, unit="N/s", min=1e-9, max=1e4, doc="slew limit of the loop force")
    step_limit_m = Param(1e-5, unit="m", min=0.0, max=0.09,
                         doc="farthest the coil may be from z_ref_m for force mode to take the reference "
                             "there at once (and for a restarted servo to resume force mode); from "
                             "farther the reference slews there from where the coil is")
    approach_speed_m_s = Param(1e-3, unit="m/s", min=1e-7, max=0.01,
                               doc="speed of the force-mode reference from where the coil is to z_ref_m "
                                   "(the current source's watchdog trips at 5 mm/s RMS)")
    approach_accel_m_s2 = Param(5e-4, unit="m/s^2", min=1e-9, max=0.1,
                                doc="acceleration of the force-mode reference from where the coil is to z_ref_m")
    # ---- actuator maps and feedforward (calibrated constants of the instrument)
    bl_t_m = Param(710.2, unit="T m", min=1.0, max=5000.0, doc="main-coil Bl used to turn force into current")
    motor_bl_t_m = Param(20.0, unit="T m", min=0.01, max=500.0, doc="counter-mass motor force per ampere at the coil")
    effective_mass_kg = Param(89.6, unit="kg", min=1e-3, max=1000.0,
                              doc="wheel inertia referred to the coil (velocity feedforward)")
    spring_n_m = Param(3.76, unit="N/m", min=-1e3, max=1e3,
                       doc="knife-edge stiffness referred to the coil (velocity feedforward)")
    kappa_f_m = Param(4.735e-10, unit="F/m", min=1e-15, max=1e-6, doc="EFB kappa = dC/dz / 2")
    surface_potential_v = Param(0.0, unit="V", min=-10.0, max=10.0, doc="EFB surface potential estimate")
    aux_kappa_f_m = Param(1.0e-10, unit="F/m", min=1e-15, max=1e-6,
                          doc="EFB auxiliary electrode's dC/dz / 2 (gradient mode force to voltage)")
    aux_surface_potential_v = Param(0.0, unit="V", min=-10.0, max=10.0,
                                    doc="EFB auxiliary electrode's surface potential estimate")
    gradient_speed_m_s = Param(5e-5, unit="m/s", min=1e-7, max=1e-3, doc="EFB gradient-mode move speed")
    gradient_accel_m_s2 = Param(4e-6, unit="m/s^2", min=1e-9, max=1e-4,
                                doc="EFB gradient-mode move acceleration: the electrodes only pull up, so "
                                    "the link's downward acceleration is at most (preload - spring force) "
                                    "/ mass, ~7.5e-6 m/s^2 at -1 mm for the simulated 0.5 kg link")
    switch_tolerance_m = Param(1e-6, unit="m", min=1e-9, max=1e-4,
                               doc="EFB: largest |z_ref - z| at which the link is handed between the main "
                                   "and the auxiliary electrode")
    polarity = Param("+", choices=("+", "-"), doc="EFB electrode polarity (reversed between weighings)")
    tare_force_n = Param(0.0, unit="N", min=-10.0, max=10.0, doc="force feedforward at zero load (EFB preload)")
    current_lag_s = Param(1e-3, unit="s", min=0.0, max=1.0, doc="source lag cancelled by the load feedforward")
    handover_slew_a_s = Param(5e-3, unit="A/s", min=1e-6, max=0.1,
                              doc="NIST-4 velocity mode: ramp of the main-coil current to zero while the "
                                  "counter-mass motor takes its force over, before the switchbox opens; no "
                                  "faster than the motor can take it (current_source's 0.2 A/s through "
                                  "20 T m: 4 N/s, 5.6 mA/s of main-coil current)")
    # ---- masses and procedures
    g_m_s2 = Param(9.801031394, unit="m/s^2", min=9.7, max=9.9, doc="local gravity at the mass centre")
    test_mass_kg = Param(1.0, unit="kg", min=0.0, max=5.0, doc="test mass (NIST-4) or small artifact (EFB)")
    aux_mass_kg = Param(0.5, unit="kg", min=0.0, max=5.0, doc="auxiliary mass (NIST-4) or large artifact (EFB)")
    lift_ramp_s = Param(2.0, unit="s", min=0.01, max=100.0,
                        doc="duration of every mass-lift event's load ramp, whatever its mass (the "
                            "mass lift's own; the simulator's main_side.lift_ramp_s, EFB "
                            "masses.lift_ramp_s)")
    sweep_speed_m_s = Param(1e-3, unit="m/s", min=1e-6, max=0.01, doc="velocity-mode speed")
    sweep_accel_m_s2 = Param(5e-4, unit="m/s^2", min=1e-6, max=0.1, doc="velocity-mode acceleration")
    sweep_jerk_m_s3 = Param(0.0, unit="m/s^3", min=0.0, max=100.0, doc="jerk limit of sweeps (0: none, trapezoid)")
    sweep_travel_m = Param(0.08, unit="m", min=1e-4, max=0.09, doc="sweep travel")
    erase_amplitude_m = Param(380e-6, unit="m", min=0.0, max=2e-3, doc="erase amplitude")
    erase_decay_s = Param(20.0, unit="s", min=0.1, max=1000.0, doc="erase decay time")
    erase_freq_hz = Param(0.1, unit="Hz", min=0.001, max=10.0, doc="erase oscillation frequency")
    erase_n_decay = Param(8.0, min=1.0, max=20.0, doc="erase length in decay times")
    frame_decimation = Param(1, min=1, max=100000, doc="publish servo/frame every n-th frame")

    def setup(self) -> None:
        s = self.settings = typed_settings(self.config.settings, ServoSettings, self.name)
        self.dt_s = 1.0 / s.frame_rate_hz
        self.mode: str = "idle"
        f_min = -s.force_limit_n if s.force_min_n is None else s.force_min_n
        self.pid_par = P.pid_params(1, dt_s=self.dt_s, u_min=f_min, u_max=s.force_limit_n)
        self._load_gains()
        self.pid_st = P.pid_state(self.pid_par)
        self.io = P.io_block(1, 1)
        self.force_n = 0.0
        self.cm_hold_a = 0.0
        self.main_a = 0.0
        self.cm_a = 0.0
        self.coil_connected = True
        """NIST-4: the last setpoint's main-coil and counter-mass currents (A) and switchbox."""
        self.v_out = 0.0
        self.to_main = True
        """EFB relay: the amplifier on the main electrodes (True) or on the auxiliary one."""
        self.z_m = math.nan
        """The last measured position (m)."""
        self.frame = -1
        self.mass_on = [s.initial_test_mass_on, s.initial_aux_on]
        self.resume = self._saved_state()
        """The persisted operating state, taken up at the first DAQ frame (None: none)."""
        if self.resume is not None:
            self.mass_on = [self.resume["test_mass_on"], self.resume["aux_on"]]
            if self.resume["mode"] != "idle":
                self.mode = "hold"
        self.load_steps: list[tuple[float, float]] = []
        """(start time s, delta mass kg) of every announced load change since force mode began."""
        self.traj: tuple[str, float, float, tuple] | None = None
        """(kind, start time s, duration s, arguments) of the running trajectory."""
        self.ref = np.zeros((1, 3))
        self.ref[0, 0] = self.z_ref_m
        self._t = np.zeros(1)
        self._ff = np.zeros(1)
        self._v = np.zeros(1)
        self._v_out = np.zeros(1)
        self.err_sq = 0.0
        self.err_n = 0
        self.mass_topic = self.topics.hw(s.mass_lift_device)
        self.clock = FrameClock(self.dt_s, realtime=self.config.clock == "realtime")
        """The DAQ frames' tags, checked: the trajectory and the load-step feedforward run on
        them, so a frame tagged in the past (before a mass was placed) would step the force."""
        self.subscribe(self.topics.frame("daq"), DaqFrame, self.on_frame)
        self.frame_clock(self.topics.frame("daq"), self.dt_s)

    # ---------------------------------------------------------------- parameters

    def _load_gains(self) -> None:
        par = self.pid_par
        par[0, P.KP], par[0, P.KI], par[0, P.KD] = self.kp_n_m, self.ki_n_m_s, self.kd_n_s_m
        par[0, P.TF_S], par[0, P.SLEW] = self.derivative_filter_s, self.force_slew_n_s

    def on_param_changed(self, name: str, old: Any, new: Any) -> None:
        """Gains change between frames; the kernel absorbs the step (bumpless)."""
        self._load_gains()
        if name == "z_ref_m" and self.mode == "force" and self.traj is None:
            self.ref[0] = (new, 0.0, 0.0)

    # ---------------------------------------------------------------- the loop

    def warm_up(self) -> None:
        par, st, io = self.pid_par.copy(), self.pid_st.copy(), self.io.copy()
        P.pid_run(par, st, io)
        P.pid_sample(par, st, 0, 0.0, 0.0, 0.0)
        P.pid_reset(par, st, u0=0.0)
        t, ref, out = np.zeros(1), np.zeros((1, 3)), np.zeros(1)
        erase_eval(t, 0.0, 1e-6, 1.0, 0.1, 10.0, ref)
        sweep_eval(t, 0.0, 1.0, 1e-3, 1e-3, math.inf, 1e-3, ref)
        load_step_feedforward(t, 0.0, 1.0, 1.0, 9.8, 1.0, 0.0, out)
        efb_force_to_voltage(np.ones(1), 1e-9, 0.0, 1.0, 1000.0, 0.0, out)

    @property
    def t_s(self) -> float:
        return self.frame * self.dt_s

    def on_frame(self, daq: DaqFrame) -> None:
        why = self.clock.advance(daq.frame, daq.session, daq.t_mono_s, time.monotonic())
        if why is not None:
            self.reject(self.topics.frame("daq"), why)
            return
        frame = self.frame = daq.frame
        t = frame * self.dt_s
        z = self.z_m = daq.coil_z_m
        if self.resume is not None:
            self._take_up(daq)
        if self.traj is not None:
            self._advance_reference(t)
        if self.mode == "idle" or self.mode == "hold":
            self._publish(frame, z, 0.0)
            return
        ff = self._feedforward(t)
        r = float(self.ref[0, 0])
        # pid_run's one sample of one axis, without the io block (the same kernel sample)
        self.force_n = P.pid_sample(self.pid_par, self.pid_st, 0, r, z, ff)
        err = r - z
        if math.isfinite(err):
            self.err_sq += err * err
            self.err_n += 1
        self._publish(frame, z, ff)

    def _advance_reference(self, t: float) -> None:
        if self.traj is None:
            return
        kind, t0, duration, args = self.traj
        self._t[0] = t - t0
        if kind == "erase":
            erase_eval(self._t, *args, self.ref)
        else:
            sweep_eval(self._t, *args, self.ref)
        if t - t0 >= duration:
            self.traj = None
            self.event("trajectory_done", f"{kind} finished at frame {self.frame}",
                       data={"kind": kind, "frame": self.frame, "z_m": float(self.ref[0, 0])})
            if kind == "erase":
                self._switch("force")

    def _feedforward(self, t: float) -> float:
        """Force (N): announced load steps in force/erase modes, inertia + spring in velocity."""
        if self.mode == "velocity":
            return float(self.effective_mass_kg * self.ref[0, 2] + self.spring_n_m * self.ref[0, 0])
        values = self.params.values
        ff = values["tare_force_n"]
        if self.load_steps:
            ramp, g, lag = values["lift_ramp_s"], values["g_m_s2"], values["current_lag_s"]
            for t0, dm in self.load_steps:  # load_step_feedforward, one sample in Python
                ff += load_step_feedforward_at(t, t0, ramp, dm, g, 1.0, lag)
        return ff

    def _actuator_force(self, motor_too: bool = False) -> float:
        """The force (N) the actuators produce now, from the last setpoint: the main coil's
        (``motor_too``: and the counter-mass motor's), or the EFB electrodes'."""
        values = self.params.values
        if self.settings.kind == "nist4":
            f = values["bl_t_m"] * self.main_a
            return f - values["motor_bl_t_m"] * self.cm_a if motor_too else f
        if self.to_main:
            return values["kappa_f_m"] * (self.v_out - values["surface_potential_v"]) ** 2
        return values["aux_kappa_f_m"] * (self.v_out - values["aux_surface_potential_v"]) ** 2

    _fast: tuple | None = None
    """Constants of the frame path, built at the first frame (settings are fixed)."""

    def _publish(self, frame: int, z: float, ff: float) -> None:
        fast = self._fast
        if fast is None:
            s = self.settings
            fast = self._fast = (s.kind == "nist4", self.topics.setpoint(self.name),
                                 self.topics.frame(self.name), s.main_limit_a, s.cm_limit_a)
        nist4, t_setpoint, t_frame, main_limit, cm_limit = fast
        values = self.params.values
        mode = self.mode
        f = self.force_n if mode != "idle" else 0.0
        if nist4:
            if mode == "force" or mode == "erase":
                self.main_a, self.cm_a = _clip(f / values["bl_t_m"], main_limit), self.cm_hold_a
                self.coil_connected = True
            elif mode == "velocity":
                # the main-coil current ramps to zero, the motor takes the rest of the force
                step = values["handover_slew_a_s"] * self.dt_s
                main = self.main_a = self.main_a - _clip(self.main_a, step)
                self.cm_a = _clip(-(f - values["bl_t_m"] * main) / values["motor_bl_t_m"], cm_limit)
                self.coil_connected = main != 0.0
            elif mode == "idle":
                self.main_a = self.cm_a = 0.0
                self.coil_connected = True
            sp = {"main_coil_current_a": self.main_a, "counter_mass_current_a": self.cm_a}
            switches = {"main_coil_connected": self.coil_connected}
        else:
            if mode == "idle":
                self.v_out = 0.0
            elif mode != "hold":
                self._v[0] = f
                if self.to_main:
                    kappa, v_s = values["kappa_f_m"], values["surface_potential_v"]
                    sign = 1.0 if values["polarity"] == "+" else -1.0
                else:
                    kappa, v_s, sign = values["aux_kappa_f_m"], values["aux_surface_potential_v"], 1.0
                efb_force_to_voltage(self._v, kappa, v_s, sign, self.settings.hv_limit_v, self.v_out,
                                     self._v_out)
                self.v_out = float(self._v_out[0])
            sp = {"hv_voltage_v": self.v_out, "z_ref_m": float(self.ref[0, 0])}
            switches = {"hv_to_main": self.to_main}
        self.publish(t_setpoint, Setpoint(frame=frame, values=sp, switches=switches))
        self.counters["frames_out"] += 1
        if frame % values["frame_decimation"] == 0:
            ref = self.ref[0].tolist()
            finite = math.isfinite(z)
            self.publish(t_frame, LoopFrame(frame=frame, mode=mode, values={
                "z_ref_m": ref[0], "v_ref_m_s": ref[1], "z_m": z if finite else 0.0,
                "error_m": ref[0] - z if finite else 0.0, "force_n": f, "feedforward_n": ff}))

    # ---------------------------------------------------------------- modes

    def _switch(self, mode: str) -> None:
        """Bumpless: the loop starts from the force the actuators produce now. Into velocity
        mode the loop's force is the main coil's and the motor's together (the motor takes the
        main coil's over); out of it the motor keeps what it produces and the main coil's loop
        starts from the current it still carries."""
        if mode == self.mode:
            return
        old = self.mode
        force_now = self._actuator_force(motor_too=mode == "velocity")
        self.cm_hold_a = self.cm_a
        if mode == "force" or (mode == "velocity" and old == "idle"):
            self.load_steps = []
        if old == "hold" and mode == "velocity":
            self.ref[0] = (self.z_m, 0.0, 0.0)   # hold the coil where it is now
        self.mode = mode
        if mode in ("force", "gradient") and self.settings.kind == "efb":
            self.to_main = mode == "force"
        if mode != "idle":
            ff = self._feedforward(self.t_s + self.dt_s)
            P.pid_reset(self.pid_par, self.pid_st, u0=force_now - ff)
            # pid_reset's u0 leaves out the feedforward; the output slew starts from the force
            # itself (else the EFB's preload feedforward would restart the output from zero)
            self.pid_st[0, P.U] = self.pid_st[0, P.V] = force_now
        self.force_n = force_now
        if mode == "force" and self.traj is None:
            self._reference_to_weighing()
        elif mode == "idle":
            self.ref[0] = (self.ref[0, 0], 0.0, 0.0)
        self.set_state("running" if mode != "idle" else "idle")
        self.event("mode", f"{old} -> {mode} at frame {self.frame}",
                   data={"old": old, "new": mode, "frame": self.frame})
        self._save_state()

    def _reference_to_weighing(self) -> None:
        """Force mode's reference: ``z_ref_m`` at once with the coil within ``step_limit_m`` of
        it (or not yet measured); else an ``approach`` from where the coil is."""
        target, start = self.z_ref_m, self.z_m
        if not abs(target - start) > self.step_limit_m:
            self.ref[0] = (target, 0.0, 0.0)
            return
        self.ref[0] = (start, 0.0, 0.0)
        self._trajectory("approach", start, math.copysign(1.0, target - start), abs(target - start),
                         self.approach_speed_m_s, self.approach_accel_m_s2, math.inf)

    # ---------------------------------------------------------------- restart

    def _saved_state(self) -> dict[str, Any] | None:
        """The operating state persisted by the previous session, validated (None: none, or
        not usable, with a warning event at connect)."""
        saved = self.params.operating
        if not saved:
            return None
        modes = MODES[self.settings.kind]
        ok = (saved.get("mode") in modes
              and all(type(saved.get(k)) is bool for k in ("test_mass_on", "aux_on"))
              and type(saved.get("frame")) is int)
        if not ok:
            self._restore_warnings.append(f"operating state {saved} not restored: expected a mode of "
                                          f"{', '.join(modes)}, test_mass_on, aux_on and frame")
            return None
        return dict(saved)

    def _save_state(self) -> None:
        """Persist the mode (``erase`` as ``force``; not ``hold``) and the masses, if changed."""
        if self.mode == "hold":
            return
        state = {"mode": "force" if self.mode == "erase" else self.mode,
                 "test_mass_on": self.mass_on[0], "aux_on": self.mass_on[1]}
        if {k: self.params.operating.get(k) for k in state} != state:
            self.params.operating = {**state, "frame": self.frame}
            self.params.save()

    def _take_up(self, daq: DaqFrame) -> None:
        """First DAQ frame after a start with a persisted state: hold what the actuators produce,
        then resume force mode if that is safe (see the module docstring)."""
        saved, self.resume = self.resume, None
        s = self.settings
        if daq.frame < saved["frame"]:
            self.mode = "idle"
            self.mass_on = [s.initial_test_mass_on, s.initial_aux_on]
            self.event("restore", f"persisted state not taken up: the hardware's frame clock restarted "
                                  f"(frame {daq.frame}, saved at frame {saved['frame']}); idle, masses "
                                  f"test={self.mass_on[0]} aux={self.mass_on[1]} as configured",
                       severity="warning", data={"frame": daq.frame, "saved": saved})
            self._save_state()
            return
        if saved["mode"] != "idle":
            if s.kind == "nist4":
                self.coil_connected = saved["mode"] != "velocity"
                self.main_a = _clip(daq.main_coil_current_a, s.main_limit_a) if self.coil_connected else 0.0
                self.cm_a = _clip(daq.counter_mass_current_a, s.cm_limit_a)
                self.ref[0] = (daq.coil_z_m, 0.0, 0.0)
            else:
                self.to_main = saved["mode"] != "gradient"
                self.v_out = _clip(daq.coil_voltage_v, s.hv_limit_v)
                # the setpoint's reference (hv_source's watchdog centre) within hv_source's travel
                self.ref[0] = (self.z_ref_m + _clip(daq.coil_z_m - self.z_ref_m, s.gradient_travel_m),
                               0.0, 0.0)
            self.force_n = self._actuator_force()
            self.set_state("running")
            if saved["mode"] == "force" and abs(daq.coil_z_m - self.z_ref_m) <= self.step_limit_m:
                self._switch("force")
        held = f", holding {self.force_n:.6g} N from the readback" if self.mode == "hold" else ""
        self.event("restore", f"took up the persisted state at frame {daq.frame}: {saved['mode']} "
                              f"mode, masses test={self.mass_on[0]} aux={self.mass_on[1]}; now "
                              f"{self.mode}{held}",
                   data={"frame": daq.frame, "saved": saved, "mode": self.mode, "force_n": self.force_n})

    @command("state")
    def cmd_state(self, cmd: Command) -> dict[str, Any]:
        """Mode, running trajectory (if any, with the seconds it has left) and masses."""
        left = 0.0
        if self.traj is not None:
            left = max(self.traj[1] + self.traj[2] - self.t_s, 0.0)
        return {"mode": self.mode, "trajectory": self.traj[0] if self.traj else "",
                "trajectory_left_s": left, "z_ref_m": self.z_ref_m, "frame": self.frame,
                "test_mass_on": self.mass_on[0], "aux_on": self.mass_on[1]}

    @command("mode")
    def cmd_mode(self, cmd: Command) -> dict[str, Any]:
        mode = str(cmd.args.get("mode", ""))
        allowed = MODES[self.settings.kind]
        if mode not in allowed or mode == "erase":
            raise ValueError(f"mode must be one of {', '.join(m for m in allowed if m != 'erase')} "
                             f"(erase: use the erase command), got {mode!r}")
        if self.traj is not None:
            kind = self.traj[0]
            raise ValueError(f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} is running; wait for it to finish")
        if self.resume is not None:
            raise ValueError("no DAQ frame yet since the restart: the servo takes up its persisted "
                             "state from the actuators' readback in the first one")
        if mode != self.mode and "gradient" in (mode, self.mode) and mode != "idle":
            self._check_handover(mode)
        self._switch(mode)
        reply: dict[str, Any] = {"mode": self.mode, "frame": self.frame}
        if self.traj is not None:
            reply.update(trajectory=self.traj[0], duration_s=self.traj[2],
                         end_frame=self.frame + 1 + int(math.ceil(self.traj[2] / self.dt_s)))
        return reply

    def _check_handover(self, mode: str) -> None:
        """EFB force <-> gradient: the link must be held (ValueError saying why not)."""
        if mode == "gradient" and self.mode != "force":
            raise ValueError(f"gradient mode starts from force mode with the link held (mode {self.mode})")
        if mode == "gradient":
            if any(self.mass_on):
                raise ValueError("gradient mode needs the masses off the holder (mass test=false aux=false)")
            ramp_end = max((t0 + self.lift_ramp_s for t0, _ in self.load_steps), default=-math.inf)
            if self.t_s < ramp_end:
                raise ValueError(f"a load ramp runs until {ramp_end:.3f} s (now {self.t_s:.3f} s)")
        if mode == "force" and abs(self.ref[0, 0] - self.z_ref_m) > 1e-12:
            raise ValueError(f"move back to the weighing position z_ref_m = {self.z_ref_m:.6g} m first "
                             f"(reference at {self.ref[0, 0]:.6g} m)")
        err = self.ref[0, 0] - self.z_m
        if not abs(err) <= self.switch_tolerance_m:
            raise ValueError(f"the link is not held: |z_ref - z| = {abs(err):.3g} m exceeds "
                             f"switch_tolerance_m = {self.switch_tolerance_m:.3g} m")

    @command("mass")
    def cmd_mass(self, cmd: Command) -> dict[str, Any]:
        """Put masses on or off: ``test=true|false``, ``aux=true|false`` (either or both).

        The servo drives the mass lift and feeds the load change forward over ``lift_ramp_s``;
        allowed only in force mode with no trajectory running."""
        if self.mode != "force" or self.traj is not None:
            raise ValueError(f"mass exchange needs force mode at rest (mode {self.mode})")
        new = list(self.mass_on)
        for i, key in enumerate(("test", "aux")):
            if key in cmd.args:
                value = cmd.args[key]
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false, got {value!r}")
                new[i] = value
        masses = (self.test_mass_kg, self.aux_mass_kg)
        delta = sum(m * (n - o) for m, n, o in zip(masses, new, self.mass_on))
        self.mass_on = new
        self._save_state()
        self.publish(self.mass_topic, HwActuatorCommand(frame=self.frame, device=self.settings.mass_lift_device,
                                                        relays=list(new)), qos=1)
        t0 = self.t_s + self.dt_s
        if delta:
            self.load_steps.append((t0, delta))
        self.event("mass", f"masses on pan: test={new[0]} aux={new[1]} (load {delta:+g} kg) at frame {self.frame}",
                   data={"test": new[0], "aux": new[1], "delta_kg": delta, "frame": self.frame})
        return {"test": new[0], "aux": new[1], "delta_kg": delta, "ramp_end_frame":
                self.frame + 1 + int(math.ceil(self.lift_ramp_s / self.dt_s))}

    @command("erase")
    def cmd_erase(self, cmd: Command) -> dict[str, Any]:
        """Run the erase motion about ``z_ref_m`` (force loop), then hold the null again."""
        if self.mode != "force" or self.traj is not None:
            raise ValueError(f"erase needs force mode at rest (mode {self.mode})")
        duration = erase_duration_s(self.erase_decay_s, self.erase_freq_hz, self.erase_n_decay)
        self.traj = ("erase", self.t_s + self.dt_s, duration,
                     (self.z_ref_m, self.erase_amplitude_m, self.erase_decay_s, self.erase_freq_hz, duration))
        self.mode = "erase"
        self.event("mode", f"force -> erase at frame {self.frame} for {duration:g} s",
                   data={"old": "force", "new": "erase", "frame": self.frame})
        return {"duration_s": duration, "end_frame": self.frame + 1 + int(math.ceil(duration / self.dt_s))}

    def _moving_mode(self, kind: str) -> str:
        """The mode that moves the reference (NIST-4 velocity, EFB gradient); ValueError unless
        the servo is in it with no trajectory running."""
        moving = "gradient" if self.settings.kind == "efb" else "velocity"
        if self.mode != moving or self.traj is not None:
            raise ValueError(f"{kind} needs {moving} mode at rest (mode {self.mode})")
        return moving

    def _start_move(self, start: float, direction: float, travel: float, kind: str) -> dict[str, Any]:
        moving = self._moving_mode(kind)
        end = start + direction * travel
        if moving == "gradient":
            limit = self.settings.gradient_travel_m
            if not abs(end - self.z_ref_m) <= limit:
                raise ValueError(f"{kind} would end at {end * 1e3:.4f} mm, beyond +-{limit * 1e3:g} mm "
                                 f"of the weighing position {self.z_ref_m * 1e3:g} mm (gradient_travel_m)")
            top, accel, jerk = self.gradient_speed_m_s, self.gradient_accel_m_s2, math.inf
        else:
            if abs(end) > 0.045:
                raise ValueError(f"{kind} would end at {end * 1e3:.1f} mm, beyond +-45 mm")
            top, accel, jerk = self.sweep_speed_m_s, self.sweep_accel_m_s2, self.sweep_jerk_m_s3 or math.inf
        return self._trajectory(kind, start, direction, travel, top, accel, jerk)

    def _trajectory(self, kind: str, start: float, direction: float, travel: float, top: float,
                    accel: float, jerk: float) -> dict[str, Any]:
        """Start a sweep-shaped reference trajectory from ``start``, ``travel`` in ``direction``
        (its top speed capped at 0.9 sqrt(accel travel), so that it always cruises)."""
        end = start + direction * travel
        speed = min(top, 0.9 * math.sqrt(accel * travel))
        duration = sweep_duration_s(speed, accel, travel, jerk)
        self.traj = (kind, self.t_s + self.dt_s, duration, (start, direction, speed, accel, jerk, travel))
        self.event(kind, f"{kind} from {start * 1e3:.3f} mm to {end * 1e3:.3f} mm at {speed * 1e3:g} mm/s "
                         f"({duration:.1f} s) from frame {self.frame}",
                   data={"start_m": start, "end_m": end, "speed_m_s": speed, "frame": self.frame})
        return {"start_m": start, "end_m": end, "speed_m_s": speed, "duration_s": duration,
                "end_frame": self.frame + 1 + int(math.ceil(duration / self.dt_s))}

    @command("sweep")
    def cmd_sweep(self, cmd: Command) -> dict[str, Any]:
        """One velocity-mode sweep of ``sweep_travel_m`` from the present reference,
        ``direction=down|up``."""
        if self.settings.kind != "nist4":
            raise ValueError("sweep is a NIST-4 velocity-mode command (EFB: move in gradient mode)")
        direction = {"down": -1.0, "up": 1.0}.get(str(cmd.args.get("direction", "")))
        if direction is None:
            raise ValueError("sweep needs direction=down or direction=up")
        return self._start_move(float(self.ref[0, 0]), direction, self.sweep_travel_m, "sweep")

    @command("move")
    def cmd_move(self, cmd: Command) -> dict[str, Any]:
        """Move the reference to ``z_m`` along a sweep-shaped (trapezoidal) profile: the NIST-4
        coil in velocity mode, the EFB floating link in gradient mode (within
        ``gradient_travel_m`` of the weighing position)."""
        try:
            target = float(cmd.args["z_m"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("move needs z_m=<position in m>") from None
        if not math.isfinite(target):
            raise ValueError(f"move target {target} is not finite")
        self._moving_mode("move")
        start = float(self.ref[0, 0])
        travel = abs(target - start)
        if travel < 1e-9:
            return {"start_m": start, "end_m": target, "duration_s": 0.0, "end_frame": self.frame}
        return self._start_move(start, math.copysign(1.0, target - start), travel, "move")

    # ---------------------------------------------------------------- status

    def status_detail(self) -> dict[str, Any]:
        rms = math.sqrt(self.err_sq / self.err_n) if self.err_n else 0.0
        self.err_sq, self.err_n = 0.0, 0
        return {"mode": self.mode, "frame": self.frame, "error_rms_m": rms, "force_n": self.force_n,
                "trajectory": self.traj[0] if self.traj else "", "test_mass_on": self.mass_on[0],
                "aux_on": self.mass_on[1]}


def _clip(v: float, limit: float) -> float:
    return min(max(v, -limit), limit)
