"""``servo``: holds the balance. DAQ frames in, actuator setpoints out, one per frame.

The control law is the numba loop of :mod:`kibble.control` (filter module + PID) working in
force units: the PID turns the coil-position error (m) into a force on the coil (N), which the
instrument's actuator map turns into the setpoint of its actuator service. The loop, the modes
and the commands' rules are the pure :class:`~kibble.services.daemons.servo_core.ServoCore`; this
daemon is its shell on the bus. The actuator maps (:mod:`kibble.services.daemons.servo_core`, chosen by
the instrument's definition, :mod:`kibble.services.instruments`):

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
              ``z_ref`` (trajectory ``approach``: ``approach_speed_m_per_s``, ``approach_accel_m_per_s2``).
``velocity``  track a trajectory with the velocity loop (command ``sweep`` or ``move``); the
              feedforward is inertia + knife-edge spring. The counter-mass motor takes the main
              coil's force over while the main-coil current ramps to zero (``handover_slew_a_per_s``);
              then the switchbox opens the coil (current_source switches it only at zero current).
``erase``     the force loop tracks a damped sinusoid about ``z_ref`` (command ``erase``), then
              returns to ``force`` by itself.
``gradient``  EFB only (seed 000 section 3.1, capacitance-gradient mode): the same force loop holds
              the floating link with the auxiliary electrode (``hv_to_main`` off: the amplifier
              on the auxiliary electrode, the main cylinders on the capacitance bridge) at a
              reference that command ``move`` slews (trapezoid of ``gradient_speed_m_per_s`` and
              ``gradient_accel_m_per_s2``, never a step) within ``gradient_travel_m`` of ``z_ref``.
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
from typing import Any, Callable

import msgspec
import numpy as np

from kibble.bus_schema.messages import Command, DaqFrame, HwActuatorCommand, LoopFrame, Setpoint
from kibble.bus_schema.realtime import FrameClock
from kibble.services.runtime.actuator import typed_settings
from kibble.services.instruments import instrument
from kibble.services.runtime.params import Param
from kibble.services.runtime.service import Service, command
from kibble.services.daemons.servo_core import ServoCore


class ServoSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which instrument and its fixed limits (configuration, not live-tunable)."""

    kind: str = "nist4"
    """The instrument (:mod:`kibble.services.instruments`): its modes and actuator map."""
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
    kp_n_per_m = Param(5.33e4, unit="N/m", min=0.0, max=1e7, doc="proportional gain")
    ki_n_per_m_s = Param(2.78e5, unit="N/(m s)", min=0.0, max=1e8, doc="integral gain")
    kd_n_s_per_m = Param(2.54e3, unit="N s/m", min=0.0, max=1e6, doc="derivative gain (on the measurement)")
    derivative_filter_s = Param(3.2e-3, unit="s", min=0.0, max=1.0, doc="derivative low-pass time constant")
    force_slew_n_per_s = Param(50.0, unit="N/s", min=1e-9, max=1e4, doc="slew limit of the loop force")
    step_limit_m = Param(1e-5, unit="m", min=0.0, max=0.09,
                         doc="farthest the coil may be from z_ref_m for force mode to take the reference "
                             "there at once (and for a restarted servo to resume force mode); from "
                             "farther the reference slews there from where the coil is")
    approach_speed_m_per_s = Param(1e-3, unit="m/s", min=1e-7, max=0.01,
                               doc="speed of the force-mode reference from where the coil is to z_ref_m "
                                   "(the current source's watchdog trips at 5 mm/s RMS)")
    approach_accel_m_per_s2 = Param(5e-4, unit="m/s^2", min=1e-9, max=0.1,
                                doc="acceleration of the force-mode reference from where the coil is to z_ref_m")
    # ---- actuator maps and feedforward (calibrated constants of the instrument)
    bl_t_m = Param(710.2, unit="T m", min=1.0, max=5000.0, doc="main-coil Bl used to turn force into current")
    motor_bl_t_m = Param(20.0, unit="T m", min=0.01, max=500.0, doc="counter-mass motor force per ampere at the coil")
    effective_mass_kg = Param(89.6, unit="kg", min=1e-3, max=1000.0,
                              doc="wheel inertia referred to the coil (velocity feedforward)")
    spring_n_per_m = Param(3.76, unit="N/m", min=-1e3, max=1e3,
                       doc="knife-edge stiffness referred to the coil (velocity feedforward)")
    kappa_f_per_m = Param(4.735e-10, unit="F/m", min=1e-15, max=1e-6, doc="EFB kappa = dC/dz / 2")
    surface_potential_v = Param(0.0, unit="V", min=-10.0, max=10.0, doc="EFB surface potential estimate")
    aux_kappa_f_per_m = Param(1.0e-10, unit="F/m", min=1e-15, max=1e-6,
                          doc="EFB auxiliary electrode's dC/dz / 2 (gradient mode force to voltage)")
    aux_surface_potential_v = Param(0.0, unit="V", min=-10.0, max=10.0,
                                    doc="EFB auxiliary electrode's surface potential estimate")
    gradient_speed_m_per_s = Param(5e-5, unit="m/s", min=1e-7, max=1e-3, doc="EFB gradient-mode move speed")
    gradient_accel_m_per_s2 = Param(4e-6, unit="m/s^2", min=1e-9, max=1e-4,
                                doc="EFB gradient-mode move acceleration: the electrodes only pull up, so "
                                    "the link's downward acceleration is at most (preload - spring force) "
                                    "/ mass, ~7.5e-6 m/s^2 at -1 mm for the simulated 0.5 kg link")
    switch_tolerance_m = Param(1e-6, unit="m", min=1e-9, max=1e-4,
                               doc="EFB: largest |z_ref - z| at which the link is handed between the main "
                                   "and the auxiliary electrode")
    polarity = Param("+", choices=("+", "-"), doc="EFB electrode polarity (reversed between weighings)")
    tare_force_n = Param(0.0, unit="N", min=-10.0, max=10.0, doc="force feedforward at zero load (EFB preload)")
    current_lag_s = Param(1e-3, unit="s", min=0.0, max=1.0, doc="source lag cancelled by the load feedforward")
    handover_slew_a_per_s = Param(5e-3, unit="A/s", min=1e-6, max=0.1,
                              doc="NIST-4 velocity mode: ramp of the main-coil current to zero while the "
                                  "counter-mass motor takes its force over, before the switchbox opens; no "
                                  "faster than the motor can take it (current_source's 0.2 A/s through "
                                  "20 T m: 4 N/s, 5.6 mA/s of main-coil current)")
    # ---- masses and procedures
    g_m_per_s2 = Param(9.801031394, unit="m/s^2", min=9.7, max=9.9, doc="local gravity at the mass centre")
    test_mass_kg = Param(1.0, unit="kg", min=0.0, max=5.0, doc="test mass (NIST-4) or small artifact (EFB)")
    aux_mass_kg = Param(0.5, unit="kg", min=0.0, max=5.0, doc="auxiliary mass (NIST-4) or large artifact (EFB)")
    lift_ramp_s = Param(2.0, unit="s", min=0.01, max=100.0,
                        doc="duration of every mass-lift event's load ramp, whatever its mass (the "
                            "mass lift's own; the simulator's main_side.lift_ramp_s, EFB "
                            "masses.lift_ramp_s)")
    sweep_speed_m_per_s = Param(1e-3, unit="m/s", min=1e-6, max=0.01, doc="velocity-mode speed")
    sweep_accel_m_per_s2 = Param(5e-4, unit="m/s^2", min=1e-6, max=0.1, doc="velocity-mode acceleration")
    sweep_jerk_m_per_s3 = Param(0.0, unit="m/s^3", min=0.0, max=100.0, doc="jerk limit of sweeps (0: none, trapezoid)")
    sweep_travel_m = Param(0.08, unit="m", min=1e-4, max=0.09, doc="sweep travel")
    erase_amplitude_m = Param(380e-6, unit="m", min=0.0, max=2e-3, doc="erase amplitude")
    erase_decay_s = Param(20.0, unit="s", min=0.1, max=1000.0, doc="erase decay time")
    erase_freq_hz = Param(0.1, unit="Hz", min=0.001, max=10.0, doc="erase oscillation frequency")
    erase_n_decay = Param(8.0, min=1.0, max=20.0, doc="erase length in decay times")
    frame_decimation = Param(1, min=1, max=100000, doc="publish servo/frame every n-th frame")

    def setup(self) -> None:
        s = self.settings = typed_settings(self.config.settings, ServoSettings, self.name)
        self.definition = instrument(s.kind)
        """The instrument's definition (its modes and actuator map)."""
        self.dt_s = 1.0 / s.frame_rate_hz
        self.core = ServoCore(s, self.params.values, self.definition.actuator_map,
                              self.definition.modes, self._saved_state())
        self.mass_topic = self.topics.hw(s.mass_lift_device)
        self.clock = FrameClock(self.dt_s, realtime=self.config.clock == "realtime")
        """The DAQ frames' tags, checked: the trajectory and the load-step feedforward run on
        them, so a frame tagged in the past (before a mass was placed) would step the force."""
        self.subscribe(self.topics.frame("daq"), DaqFrame, self.on_frame)
        self.frame_clock(self.topics.frame("daq"), self.dt_s)

    # The core's state, as the tests and the in-process stack read it.
    @property
    def mode(self) -> str:
        return self.core.mode

    @property
    def ref(self) -> np.ndarray:
        return self.core.ref

    @property
    def mass_on(self) -> list[bool]:
        return self.core.mass_on

    def on_param_changed(self, name: str, old: Any, new: Any) -> None:
        self.core.param_changed(name, new)

    def warm_up(self) -> None:
        ServoCore.warm_up()

    # ---------------------------------------------------------------- the loop

    _fast: tuple | None = None
    """Constants of the frame path, built at the first frame (settings are fixed)."""

    def on_frame(self, daq: DaqFrame) -> None:
        why = self.clock.advance(daq.frame, daq.session, daq.t_mono_s, time.monotonic())
        if why is not None:
            self.reject(self.topics.frame("daq"), why)
            return
        fast = self._fast
        if fast is None:
            fast = self._fast = (self.core, self.topics.setpoint(self.name), self.topics.frame(self.name),
                                 self.params.values)
        core, t_setpoint, t_frame, values = fast
        sp, switches, ff = core.step(daq)
        if core.effects:
            self._apply_effects()
        frame, z, mode = daq.frame, daq.coil_z_m, core.mode
        self.publish(t_setpoint, Setpoint(frame=frame, values=sp, switches=switches))
        self.counters["frames_out"] += 1
        if frame % values["frame_decimation"] == 0:
            ref = core.ref[0].tolist()
            finite = math.isfinite(z)
            self.publish(t_frame, LoopFrame(frame=frame, mode=mode, values={
                "z_ref_m": ref[0], "v_ref_m_per_s": ref[1], "z_m": z if finite else 0.0,
                "error_m": ref[0] - z if finite else 0.0,
                "force_n": core.force_n if mode != "idle" else 0.0, "feedforward_n": ff}))

    def _apply_effects(self) -> None:
        """Carry out what the core asked for, in its order (see :data:`servo_core.Effect`)."""
        effects, self.core.effects = self.core.effects, []
        for effect in effects:
            what = effect[0]
            if what == "event":
                _, kind, text, data, severity = effect
                self.event(kind, text, severity=severity, data=data)
            elif what == "state":
                self.set_state(effect[1])
            elif what == "save":
                self._save_state()
            elif what == "mass_lift":
                self.publish(self.mass_topic, HwActuatorCommand(
                    frame=self.core.frame, device=self.settings.mass_lift_device, relays=effect[1]), qos=1)

    def _run(self, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """A command of the core, its effects carried out (also when it refuses)."""
        try:
            return fn(*args)
        finally:
            if self.core.effects:
                self._apply_effects()

    # ---------------------------------------------------------------- restart

    def _saved_state(self) -> dict[str, Any] | None:
        """The operating state persisted by the previous session, validated (None: none, or
        not usable, with a warning event at connect)."""
        saved = self.params.operating
        if not saved:
            return None
        modes = self.definition.modes
        ok = (saved.get("mode") in modes
              and all(type(saved.get(k)) is bool for k in ("test_mass_on", "aux_on"))
              and type(saved.get("frame")) is int)
        if not ok:
            self._restore_warnings.append(f"operating state {saved} not restored: expected a mode of "
                                          f"{', '.join(modes)}, test_mass_on, aux_on and frame")
            return None
        return dict(saved)

    def _save_state(self) -> None:
        """Persist the core's operating state (mode and masses), if changed."""
        state = self.core.operating()
        if state is None:
            return
        if {k: self.params.operating.get(k) for k in state} != state:
            self.params.operating = {**state, "frame": self.core.frame}
            self.params.save()

    # ---------------------------------------------------------------- commands

    @command("state")
    def cmd_state(self, cmd: Command) -> dict[str, Any]:
        """Mode, running trajectory (if any, with the seconds it has left) and masses."""
        return self.core.state()

    @command("mode")
    def cmd_mode(self, cmd: Command) -> dict[str, Any]:
        return self._run(self.core.set_mode, str(cmd.args.get("mode", "")))

    @command("mass")
    def cmd_mass(self, cmd: Command) -> dict[str, Any]:
        """Put masses on or off: ``test=true|false``, ``aux=true|false`` (either or both).

        The servo drives the mass lift and feeds the load change forward over ``lift_ramp_s``;
        allowed only in force mode with no trajectory running."""
        return self._run(self.core.mass, cmd.args)

    @command("erase")
    def cmd_erase(self, cmd: Command) -> dict[str, Any]:
        """Run the erase motion about ``z_ref_m`` (force loop), then hold the null again."""
        return self._run(self.core.erase)

    @command("sweep")
    def cmd_sweep(self, cmd: Command) -> dict[str, Any]:
        """One velocity-mode sweep of ``sweep_travel_m`` from the present reference,
        ``direction=down|up``."""
        return self._run(self.core.sweep, cmd.args.get("direction", ""))

    @command("move")
    def cmd_move(self, cmd: Command) -> dict[str, Any]:
        """Move the reference to ``z_m`` along a sweep-shaped (trapezoidal) profile: the NIST-4
        coil in velocity mode, the EFB floating link in gradient mode (within
        ``gradient_travel_m`` of the weighing position)."""
        z_m = cmd.args.get("z_m")
        try:
            if not isinstance(z_m, (int, float, str)):  # missing, None or a list
                raise TypeError
            target = float(z_m)
        except (TypeError, ValueError):
            raise ValueError("move needs z_m=<position in m>") from None
        return self._run(self.core.move, target)

    # ---------------------------------------------------------------- status

    def status_detail(self) -> dict[str, Any]:
        return self.core.status()
