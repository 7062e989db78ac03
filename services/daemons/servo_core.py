"""The servo's pure core (issue 14 item 3): :class:`ServoCore` holds the loop's state; a DAQ
frame in, the actuator setpoint out. No bus, no asyncio, no clock of its own: time is the DAQ
frame's index times the frame period, as in :class:`~kibble.services.runtime.safety.ActuatorGuard`.
The daemon (:class:`~kibble.services.daemons.servo.Servo`) is the shell: it checks the frames' tags,
hands the frames and commands to the core, and publishes what the core returns and the
effects it lists (events, the service state, the persisted operating state, the mass lift).

The loop works in force units; the instrument's :class:`ActuatorMap` (a strategy chosen by
the instrument's definition, :mod:`kibble.services.instruments`) turns the loop's force into
its actuators' setpoint and back, and knows the instrument's moving mode: :class:`CurrentMap`
(NIST-4: main coil in force mode, counter-mass motor in velocity mode) and :class:`VoltageMap`
(EFB: main electrodes in force mode, the auxiliary electrode in gradient mode); the table of
their laws is in :mod:`kibble.services.daemons.servo`.

The modes and commands are described in :mod:`kibble.services.daemons.servo`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from kibble.bus_schema.messages import DaqFrame
from kibble.control import pid as P
from kibble.control.electrostatic import efb_force_to_voltage
from kibble.control.trajectory import (
    erase_duration_s, erase_eval, load_step_feedforward, load_step_feedforward_at,
    sweep_duration_s, sweep_eval,
)

Effect = tuple
"""What the shell does for the core, in order: ``("event", kind, text, data, severity)``,
``("state", state)`` (the service's state), ``("save",)`` (persist :meth:`ServoCore.operating`),
``("mass_lift", [test_on, aux_on])`` (drive the mass lift)."""


def _clip(v: float, limit: float) -> float:
    return min(max(v, -limit), limit)


class ActuatorMap:
    """How the loop's force (N) reaches an instrument's actuators: a strategy of
    :class:`ServoCore`. ``settings`` is the servo's :class:`~kibble.services.daemons.servo.ServoSettings`,
    ``ref`` the core's reference row array (m, m/s, m/s^2), read for the setpoint."""

    moving_mode: str = ""
    """The mode that moves the reference (command ``move``)."""
    sweeps: bool = False
    """Whether command ``sweep`` exists (a velocity-mode sweep of ``sweep_travel_m``)."""

    def __init__(self, settings: Any, dt_s: float, ref: np.ndarray) -> None:
        self.settings = settings
        self.dt_s = dt_s
        self.ref = ref

    def setpoint(self, mode: str, force_n: float,
                 values: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
        """The setpoint's values and switches for ``force_n`` in ``mode`` (its state follows)."""
        raise NotImplementedError

    def force(self, values: Mapping[str, Any], motor_too: bool = False) -> float:
        """The force (N) the actuators produce now, from the last setpoint (``motor_too``: with
        the moving mode's own actuator)."""
        raise NotImplementedError

    def switch(self, mode: str) -> None:
        """The core enters ``mode`` (after :meth:`force` has been read)."""

    def take_up(self, saved_mode: str, daq: DaqFrame, z_ref_m: float) -> float:
        """Hold what the actuators produce, from their readback in ``daq``, with the relays of
        ``saved_mode``; the reference (m) to hold."""
        raise NotImplementedError

    def move_profile(self, kind: str, end_m: float, values: Mapping[str, Any]) -> tuple[float, float, float]:
        """(top speed m/s, acceleration m/s^2, jerk m/s^3) of a move in the moving mode that
        ends at ``end_m``; ``ValueError`` if it may not go there."""
        raise NotImplementedError


class CurrentMap(ActuatorMap):
    """NIST-4: force mode drives the main coil, ``I = F / Bl``; velocity mode hands the force
    to the counter-mass motor (``I = -F / Bl_m``) while the main-coil current ramps to zero at
    ``handover_slew_a_per_s``, then opens the switchbox."""

    moving_mode = "velocity"
    sweeps = True

    def __init__(self, settings: Any, dt_s: float, ref: np.ndarray) -> None:
        super().__init__(settings, dt_s, ref)
        self.main_limit, self.cm_limit = settings.main_limit_a, settings.cm_limit_a
        self.main_a = 0.0
        self.cm_a = 0.0
        self.cm_hold_a = 0.0
        self.coil_connected = True
        """The last setpoint's main-coil and counter-mass currents (A) and switchbox."""

    def setpoint(self, mode: str, force_n: float,
                 values: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
        if mode == "force" or mode == "erase":  # (_clip inline: the frame path's one call less)
            lim = self.main_limit
            self.main_a, self.cm_a = min(max(force_n / values["bl_t_m"], -lim), lim), self.cm_hold_a
            self.coil_connected = True
        elif mode == "velocity":
            # the main-coil current ramps to zero, the motor takes the rest of the force
            step = values["handover_slew_a_per_s"] * self.dt_s
            main = self.main_a = self.main_a - _clip(self.main_a, step)
            self.cm_a = _clip(-(force_n - values["bl_t_m"] * main) / values["motor_bl_t_m"], self.cm_limit)
            self.coil_connected = main != 0.0
        elif mode == "idle":
            self.main_a = self.cm_a = 0.0
            self.coil_connected = True
        return ({"main_coil_current_a": self.main_a, "counter_mass_current_a": self.cm_a},
                {"main_coil_connected": self.coil_connected})

    def force(self, values: Mapping[str, Any], motor_too: bool = False) -> float:
        f = values["bl_t_m"] * self.main_a
        return f - values["motor_bl_t_m"] * self.cm_a if motor_too else f

    def switch(self, mode: str) -> None:
        self.cm_hold_a = self.cm_a

    def take_up(self, saved_mode: str, daq: DaqFrame, z_ref_m: float) -> float:
        self.coil_connected = saved_mode != "velocity"
        self.main_a = _clip(daq.main_coil_current_a, self.main_limit) if self.coil_connected else 0.0
        self.cm_a = _clip(daq.counter_mass_current_a, self.cm_limit)
        return daq.coil_z_m

    def move_profile(self, kind: str, end_m: float, values: Mapping[str, Any]) -> tuple[float, float, float]:
        if abs(end_m) > 0.045:
            raise ValueError(f"{kind} would end at {end_m * 1e3:.1f} mm, beyond +-45 mm")
        return values["sweep_speed_m_per_s"], values["sweep_accel_m_per_s2"], values["sweep_jerk_m_per_s3"] or math.inf


class VoltageMap(ActuatorMap):
    """EFB: force mode drives the main electrodes, ``V = V_s + p sqrt(F / kappa)`` (``p`` the
    polarity); gradient mode the auxiliary electrode, ``V = V_s,aux + sqrt(F / kappa_aux)``
    (:func:`~kibble.control.electrostatic.efb_force_to_voltage`). The setpoint carries the
    reference (``z_ref_m``) for hv_source's watchdog."""

    moving_mode = "gradient"

    def __init__(self, settings: Any, dt_s: float, ref: np.ndarray) -> None:
        super().__init__(settings, dt_s, ref)
        self.v_out = 0.0
        self.to_main = True
        """The relay: the amplifier on the main electrodes (True) or on the auxiliary one."""
        self._v = np.zeros(1)
        self._v_out = np.zeros(1)

    def setpoint(self, mode: str, force_n: float,
                 values: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
        if mode == "idle":
            self.v_out = 0.0
        elif mode != "hold":
            self._v[0] = force_n
            if self.to_main:
                kappa, v_s = values["kappa_f_per_m"], values["surface_potential_v"]
                sign = 1.0 if values["polarity"] == "+" else -1.0
            else:
                kappa, v_s, sign = values["aux_kappa_f_per_m"], values["aux_surface_potential_v"], 1.0
            efb_force_to_voltage(self._v, kappa, v_s, sign, self.settings.hv_limit_v, self.v_out, self._v_out)
            self.v_out = float(self._v_out[0])
        return {"hv_voltage_v": self.v_out, "z_ref_m": float(self.ref[0, 0])}, {"hv_to_main": self.to_main}

    def force(self, values: Mapping[str, Any], motor_too: bool = False) -> float:
        if self.to_main:
            return values["kappa_f_per_m"] * (self.v_out - values["surface_potential_v"]) ** 2
        return values["aux_kappa_f_per_m"] * (self.v_out - values["aux_surface_potential_v"]) ** 2

    def switch(self, mode: str) -> None:
        if mode in ("force", "gradient"):
            self.to_main = mode == "force"

    def take_up(self, saved_mode: str, daq: DaqFrame, z_ref_m: float) -> float:
        self.to_main = saved_mode != "gradient"
        self.v_out = _clip(daq.coil_voltage_v, self.settings.hv_limit_v)
        # the setpoint's reference (hv_source's watchdog centre) within hv_source's travel
        return z_ref_m + _clip(daq.coil_z_m - z_ref_m, self.settings.gradient_travel_m)

    def move_profile(self, kind: str, end_m: float, values: Mapping[str, Any]) -> tuple[float, float, float]:
        limit, z_ref = self.settings.gradient_travel_m, values["z_ref_m"]
        if not abs(end_m - z_ref) <= limit:
            raise ValueError(f"{kind} would end at {end_m * 1e3:.4f} mm, beyond +-{limit * 1e3:g} mm "
                             f"of the weighing position {z_ref * 1e3:g} mm (gradient_travel_m)")
        return values["gradient_speed_m_per_s"], values["gradient_accel_m_per_s2"], math.inf


class ServoCore:
    """The servo's state and control law (see the module docstring).

    :param settings: the servo's settings (``frame_rate_hz``, force limits, initial masses).
    :param values: the parameters' values (the registry's dict, read live: a tuned value
        applies from the next frame; call :meth:`param_changed` after a change).
    :param actuator_map: the class of the instrument's :class:`ActuatorMap`.
    :param modes: the instrument's modes (``erase`` among them for the force loop's erase).
    :param saved: the operating state persisted by the previous session (validated), taken up
        at the first DAQ frame; None: none.
    """

    def __init__(self, settings: Any, values: dict[str, Any], actuator_map: type[ActuatorMap],
                 modes: tuple[str, ...], saved: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.values = values
        self.modes = modes
        self.dt_s = 1.0 / settings.frame_rate_hz
        self.effects: list[Effect] = []
        self.mode = "idle"
        f_min = -settings.force_limit_n if settings.force_min_n is None else settings.force_min_n
        self.pid_par = P.pid_params(1, dt_s=self.dt_s, u_min=f_min, u_max=settings.force_limit_n)
        self.load_gains()
        self.pid_st = P.pid_state(self.pid_par)
        self.force_n = 0.0
        self.z_m = math.nan
        """The last measured position (m)."""
        self.frame = -1
        self.mass_on = [settings.initial_test_mass_on, settings.initial_aux_on]
        self.resume = saved
        """The persisted operating state, taken up at the first DAQ frame (None: none)."""
        if saved is not None:
            self.mass_on = [saved["test_mass_on"], saved["aux_on"]]
            if saved["mode"] != "idle":
                self.mode = "hold"
        self.load_steps: list[tuple[float, float]] = []
        """(start time s, delta mass kg) of every announced load change since force mode began."""
        self.traj: tuple[str, float, float, tuple[float, ...]] | None = None
        """(kind, start time s, duration s, arguments) of the running trajectory."""
        self.ref = np.zeros((1, 3))
        self.ref[0, 0] = values["z_ref_m"]
        self._t = np.zeros(1)
        self.err_sq = 0.0
        self.err_n = 0
        self.actuators = actuator_map(settings, self.dt_s, self.ref)

    # ---------------------------------------------------------------- parameters

    def load_gains(self) -> None:
        par, v = self.pid_par, self.values
        par[0, P.KP], par[0, P.KI], par[0, P.KD] = v["kp_n_per_m"], v["ki_n_per_m_s"], v["kd_n_s_per_m"]
        par[0, P.TF_S], par[0, P.SLEW] = v["derivative_filter_s"], v["force_slew_n_per_s"]

    def param_changed(self, name: str, new: Any) -> None:
        """Gains change between frames; the kernel absorbs the step (bumpless)."""
        self.load_gains()
        if name == "z_ref_m" and self.mode == "force" and self.traj is None:
            self.ref[0] = (new, 0.0, 0.0)

    @staticmethod
    def warm_up() -> None:
        """Compile (or load) every kernel the core runs."""
        par = P.pid_params(1, dt_s=1e-3, u_min=-1.0, u_max=1.0)
        st, io = P.pid_state(par), P.io_block(1, 1)
        P.pid_run(par, st, io)
        P.pid_sample(par, st, 0, 0.0, 0.0, 0.0)
        P.pid_reset(par, st, u0=0.0)
        t, ref, out = np.zeros(1), np.zeros((1, 3)), np.zeros(1)
        erase_eval(t, 0.0, 1e-6, 1.0, 0.1, 10.0, ref)
        sweep_eval(t, 0.0, 1.0, 1e-3, 1e-3, math.inf, 1e-3, ref)
        load_step_feedforward(t, 0.0, 1.0, 1.0, 9.8, 1.0, 0.0, out)
        efb_force_to_voltage(np.ones(1), 1e-9, 0.0, 1.0, 1000.0, 0.0, out)

    # ---------------------------------------------------------------- the loop

    @property
    def t_s(self) -> float:
        return self.frame * self.dt_s

    def step(self, daq: DaqFrame) -> tuple[dict[str, float], dict[str, bool], float]:
        """One frame (its tag already checked): the setpoint's values and switches, and the
        feedforward (N)."""
        frame = self.frame = daq.frame
        t = frame * self.dt_s
        z = self.z_m = daq.coil_z_m
        if self.resume is not None:
            self._take_up(daq)
        if self.traj is not None:
            self._advance_reference(t)
        mode = self.mode
        if mode == "idle" or mode == "hold":
            return *self.actuators.setpoint(mode, self.force_n if mode != "idle" else 0.0, self.values), 0.0
        ff = self._feedforward(t)
        r = float(self.ref[0, 0])
        # pid_run's one sample of one axis, without the io block (the same kernel sample)
        f = self.force_n = P.pid_sample(self.pid_par, self.pid_st, 0, r, z, ff)
        err = r - z
        if math.isfinite(err):
            self.err_sq += err * err
            self.err_n += 1
        return *self.actuators.setpoint(mode, f, self.values), ff

    def _advance_reference(self, t: float) -> None:
        assert self.traj is not None  # the caller checked
        kind, t0, duration, args = self.traj
        self._t[0] = t - t0
        # unpacked by name: the kernels' signatures are typed, a tuple of any length is not
        if kind == "erase":
            centre_m, amplitude_m, decay_s, freq_hz, duration_s = args
            erase_eval(self._t, centre_m, amplitude_m, decay_s, freq_hz, duration_s, self.ref)
        else:
            start_m, direction, speed_m_per_s, accel_m_per_s2, jerk_m_per_s3, travel_m = args
            sweep_eval(self._t, start_m, direction, speed_m_per_s, accel_m_per_s2, jerk_m_per_s3, travel_m,
                       self.ref)
        if t - t0 >= duration:
            self.traj = None
            self._event("trajectory_done", f"{kind} finished at frame {self.frame}",
                        {"kind": kind, "frame": self.frame, "z_m": float(self.ref[0, 0])})
            if kind == "erase":
                self._switch("force")

    def _feedforward(self, t: float) -> float:
        """Force (N): announced load steps in force/erase modes, inertia + spring in velocity."""
        values = self.values
        if self.mode == "velocity":
            return float(values["effective_mass_kg"] * self.ref[0, 2] + values["spring_n_per_m"] * self.ref[0, 0])
        ff = values["tare_force_n"]
        if self.load_steps:
            ramp, g, lag = values["lift_ramp_s"], values["g_m_per_s2"], values["current_lag_s"]
            for t0, dm in self.load_steps:  # load_step_feedforward, one sample in Python
                ff += load_step_feedforward_at(t, t0, ramp, dm, g, 1.0, lag)
        return ff

    def _event(self, kind: str, text: str, data: dict[str, Any], severity: str = "info") -> None:
        self.effects.append(("event", kind, text, data, severity))

    # ---------------------------------------------------------------- modes

    def _switch(self, mode: str) -> None:
        """Bumpless: the loop starts from the force the actuators produce now. Into velocity
        mode the loop's force is the main coil's and the motor's together (the motor takes the
        main coil's over); out of it the motor keeps what it produces and the main coil's loop
        starts from the current it still carries."""
        if mode == self.mode:
            return
        old = self.mode
        force_now = self.actuators.force(self.values, motor_too=mode == "velocity")
        self.actuators.switch(mode)
        if mode == "force" or (mode == "velocity" and old == "idle"):
            self.load_steps = []
        if old == "hold" and mode == "velocity":
            self.ref[0] = (self.z_m, 0.0, 0.0)   # hold the coil where it is now
        self.mode = mode
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
        self.effects.append(("state", "running" if mode != "idle" else "idle"))
        self._event("mode", f"{old} -> {mode} at frame {self.frame}", {"old": old, "new": mode, "frame": self.frame})
        self.effects.append(("save",))

    def _reference_to_weighing(self) -> None:
        """Force mode's reference: ``z_ref_m`` at once with the coil within ``step_limit_m`` of
        it (or not yet measured); else an ``approach`` from where the coil is."""
        target, start = self.values["z_ref_m"], self.z_m
        if not abs(target - start) > self.values["step_limit_m"]:
            self.ref[0] = (target, 0.0, 0.0)
            return
        self.ref[0] = (start, 0.0, 0.0)
        self._trajectory("approach", start, math.copysign(1.0, target - start), abs(target - start),
                         self.values["approach_speed_m_per_s"], self.values["approach_accel_m_per_s2"], math.inf)

    # ---------------------------------------------------------------- restart

    def operating(self) -> dict[str, Any] | None:
        """The operating state to persist: the mode (``erase`` as ``force``) and the masses;
        None in ``hold`` (nothing new to persist)."""
        if self.mode == "hold":
            return None
        return {"mode": "force" if self.mode == "erase" else self.mode,
                "test_mass_on": self.mass_on[0], "aux_on": self.mass_on[1]}

    def _take_up(self, daq: DaqFrame) -> None:
        """First DAQ frame after a start with a persisted state: hold what the actuators produce,
        then resume force mode if that is safe (see :mod:`kibble.services.daemons.servo`)."""
        saved, self.resume = self.resume, None
        assert saved is not None  # the caller checked
        s = self.settings
        if daq.frame < saved["frame"]:
            self.mode = "idle"
            self.mass_on = [s.initial_test_mass_on, s.initial_aux_on]
            self._event("restore", f"persisted state not taken up: the hardware's frame clock restarted "
                                   f"(frame {daq.frame}, saved at frame {saved['frame']}); idle, masses "
                                   f"test={self.mass_on[0]} aux={self.mass_on[1]} as configured",
                        {"frame": daq.frame, "saved": saved}, "warning")
            self.effects.append(("save",))
            return
        z_ref = self.values["z_ref_m"]
        if saved["mode"] != "idle":
            self.ref[0] = (self.actuators.take_up(saved["mode"], daq, z_ref), 0.0, 0.0)
            self.force_n = self.actuators.force(self.values)
            self.effects.append(("state", "running"))
            if saved["mode"] == "force" and abs(daq.coil_z_m - z_ref) <= self.values["step_limit_m"]:
                self._switch("force")
        held = f", holding {self.force_n:.6g} N from the readback" if self.mode == "hold" else ""
        self._event("restore", f"took up the persisted state at frame {daq.frame}: {saved['mode']} "
                               f"mode, masses test={self.mass_on[0]} aux={self.mass_on[1]}; now "
                               f"{self.mode}{held}",
                    {"frame": daq.frame, "saved": saved, "mode": self.mode, "force_n": self.force_n})

    # ---------------------------------------------------------------- commands

    def state(self) -> dict[str, Any]:
        """Mode, running trajectory (if any, with the seconds it has left) and masses."""
        left = 0.0
        if self.traj is not None:
            left = max(self.traj[1] + self.traj[2] - self.t_s, 0.0)
        return {"mode": self.mode, "trajectory": self.traj[0] if self.traj else "",
                "trajectory_left_s": left, "z_ref_m": self.values["z_ref_m"], "frame": self.frame,
                "test_mass_on": self.mass_on[0], "aux_on": self.mass_on[1]}

    def set_mode(self, mode: str) -> dict[str, Any]:
        """Command ``mode``; ``ValueError`` saying why not."""
        allowed = self.modes
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
        values = self.values
        if mode == "gradient" and self.mode != "force":
            raise ValueError(f"gradient mode starts from force mode with the link held (mode {self.mode})")
        if mode == "gradient":
            if any(self.mass_on):
                raise ValueError("gradient mode needs the masses off the holder (mass test=false aux=false)")
            ramp_end = max((t0 + values["lift_ramp_s"] for t0, _ in self.load_steps), default=-math.inf)
            if self.t_s < ramp_end:
                raise ValueError(f"a load ramp runs until {ramp_end:.3f} s (now {self.t_s:.3f} s)")
        z_ref = values["z_ref_m"]
        if mode == "force" and abs(self.ref[0, 0] - z_ref) > 1e-12:
            raise ValueError(f"move back to the weighing position z_ref_m = {z_ref:.6g} m first "
                             f"(reference at {self.ref[0, 0]:.6g} m)")
        err = self.ref[0, 0] - self.z_m
        tolerance = values["switch_tolerance_m"]
        if not abs(err) <= tolerance:
            raise ValueError(f"the link is not held: |z_ref - z| = {abs(err):.3g} m exceeds "
                             f"switch_tolerance_m = {tolerance:.3g} m")

    def mass(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Command ``mass``: ``test``, ``aux`` true or false (either or both)."""
        if self.mode != "force" or self.traj is not None:
            raise ValueError(f"mass exchange needs force mode at rest (mode {self.mode})")
        new = list(self.mass_on)
        for i, key in enumerate(("test", "aux")):
            if key in args:
                value = args[key]
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false, got {value!r}")
                new[i] = value
        masses = (self.values["test_mass_kg"], self.values["aux_mass_kg"])
        delta = sum(m * (n - o) for m, n, o in zip(masses, new, self.mass_on))
        self.mass_on = new
        self.effects.append(("save",))
        self.effects.append(("mass_lift", list(new)))
        t0 = self.t_s + self.dt_s
        if delta:
            self.load_steps.append((t0, delta))
        self._event("mass", f"masses on pan: test={new[0]} aux={new[1]} (load {delta:+g} kg) at frame {self.frame}",
                    {"test": new[0], "aux": new[1], "delta_kg": delta, "frame": self.frame})
        return {"test": new[0], "aux": new[1], "delta_kg": delta, "ramp_end_frame":
                self.frame + 1 + int(math.ceil(self.values["lift_ramp_s"] / self.dt_s))}

    def erase(self) -> dict[str, Any]:
        """Command ``erase``: the erase motion about ``z_ref_m`` (force loop), then force mode."""
        if self.mode != "force" or self.traj is not None:
            raise ValueError(f"erase needs force mode at rest (mode {self.mode})")
        v = self.values
        duration = erase_duration_s(v["erase_decay_s"], v["erase_freq_hz"], v["erase_n_decay"])
        self.traj = ("erase", self.t_s + self.dt_s, duration,
                     (v["z_ref_m"], v["erase_amplitude_m"], v["erase_decay_s"], v["erase_freq_hz"], duration))
        self.mode = "erase"
        self._event("mode", f"force -> erase at frame {self.frame} for {duration:g} s",
                    {"old": "force", "new": "erase", "frame": self.frame})
        return {"duration_s": duration, "end_frame": self.frame + 1 + int(math.ceil(duration / self.dt_s))}

    def _moving_mode(self, kind: str) -> None:
        """ValueError unless the servo is in the moving mode with no trajectory running."""
        moving = self.actuators.moving_mode
        if self.mode != moving or self.traj is not None:
            raise ValueError(f"{kind} needs {moving} mode at rest (mode {self.mode})")

    def _start_move(self, start: float, direction: float, travel: float, kind: str) -> dict[str, Any]:
        self._moving_mode(kind)
        top, accel, jerk = self.actuators.move_profile(kind, start + direction * travel, self.values)
        return self._trajectory(kind, start, direction, travel, top, accel, jerk)

    def _trajectory(self, kind: str, start: float, direction: float, travel: float, top: float,
                    accel: float, jerk: float) -> dict[str, Any]:
        """Start a sweep-shaped reference trajectory from ``start``, ``travel`` in ``direction``
        (its top speed capped at 0.9 sqrt(accel travel), so that it always cruises)."""
        end = start + direction * travel
        speed = min(top, 0.9 * math.sqrt(accel * travel))
        duration = sweep_duration_s(speed, accel, travel, jerk)
        self.traj = (kind, self.t_s + self.dt_s, duration, (start, direction, speed, accel, jerk, travel))
        self._event(kind, f"{kind} from {start * 1e3:.3f} mm to {end * 1e3:.3f} mm at {speed * 1e3:g} mm/s "
                          f"({duration:.1f} s) from frame {self.frame}",
                    {"start_m": start, "end_m": end, "speed_m_per_s": speed, "frame": self.frame})
        return {"start_m": start, "end_m": end, "speed_m_per_s": speed, "duration_s": duration,
                "end_frame": self.frame + 1 + int(math.ceil(duration / self.dt_s))}

    def sweep(self, direction: Any) -> dict[str, Any]:
        """Command ``sweep``: ``sweep_travel_m`` from the present reference, ``down`` or ``up``."""
        if not self.actuators.sweeps:
            raise ValueError("sweep is a NIST-4 velocity-mode command (EFB: move in gradient mode)")
        sign = {"down": -1.0, "up": 1.0}.get(str(direction))
        if sign is None:
            raise ValueError("sweep needs direction=down or direction=up")
        return self._start_move(float(self.ref[0, 0]), sign, self.values["sweep_travel_m"], "sweep")

    def move(self, target: float) -> dict[str, Any]:
        """Command ``move``: the reference to ``target`` (m) along a sweep-shaped profile."""
        if not math.isfinite(target):
            raise ValueError(f"move target {target} is not finite")
        self._moving_mode("move")
        start = float(self.ref[0, 0])
        travel = abs(target - start)
        if travel < 1e-9:
            return {"start_m": start, "end_m": target, "duration_s": 0.0, "end_frame": self.frame}
        return self._start_move(start, math.copysign(1.0, target - start), travel, "move")

    def status(self) -> dict[str, Any]:
        """The status detail; the error RMS since the last call."""
        rms = math.sqrt(self.err_sq / self.err_n) if self.err_n else 0.0
        self.err_sq, self.err_n = 0.0, 0
        return {"mode": self.mode, "frame": self.frame, "error_rms_m": rms, "force_n": self.force_n,
                "trajectory": self.traj[0] if self.traj else "", "test_mass_on": self.mass_on[0],
                "aux_on": self.mass_on[1]}
