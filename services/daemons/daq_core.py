"""The daq's conversions per instrument (issue 14 item 3): a small strategy object, chosen by
the instrument's definition (:mod:`kibble.services.instruments`), that turns one raw
``hw/sensors`` frame into the pose and the electrical readings of a ``daq/frame``. Pure: no
bus, no clock; the daemon (:class:`~kibble.services.daemons.daq.Daq`) keeps the frame clock, the
velocities, the origin and the publishing.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kibble.bus_schema.messages import HwSensorFrame
from kibble.control.geometry import ifo_fusion_matrix, psd_matrix

Conversion = tuple[list[float], float, float, float, float, float]
"""(pose [x, y, z m, theta_x, theta_y, theta_z rad], counter-mass z m, coil voltage V, main-coil
current A, counter-mass current A, capacitance F)."""


class SensorMap:
    """How an instrument's sensor channels become a DAQ frame. ``settings`` is the daq's
    :class:`~kibble.services.daemons.daq.DaqSettings`."""

    n_fringe: int
    """Interferometer channels needed in ``fringe_count`` and ``fringe_phase_rad``."""
    n_psd: int
    """PSD channels needed in ``psd_v``."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def convert(self, hw: HwSensorFrame, disp: list[float], pose: list[float], cm_z_m: float,
                values: Mapping[str, Any]) -> Conversion:
        """The readings of ``hw`` whose interferometers read ``disp`` (m, one per channel);
        ``pose`` and ``cm_z_m`` are the last frame's (what this instrument does not measure
        stays); ``values`` the daq's parameters."""
        raise NotImplementedError


class Nist4Sensors(SensorMap):
    """NIST-4: the three main-coil interferometers fused into z, theta-x, theta-y at the
    optical centre (Abbe weights, :func:`~kibble.control.geometry.ifo_fusion_matrix`), the
    fourth is the counter-mass; the two beam-translation PSDs give x, y, theta-z
    (:func:`~kibble.control.geometry.psd_matrix`); the DVM reading gets the PJVS voltage
    (``pjvs_voltage_v``) added back; the source monitors are divided by their transimpedance."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        s = settings
        self.fusion = ifo_fusion_matrix(np.radians(s.ifo_angles_deg), s.ifo_radius_m,
                                        s.optical_centre_x_m, s.optical_centre_y_m)
        self.psd = psd_matrix(np.radians(s.psd_retro_angles_deg), s.psd_radius_m,
                              s.psd_gain_v_per_m, s.psd_lever_arm_m)
        self.n_fringe = len(s.ifo_angles_deg) + 1
        self.n_psd = 2 * len(s.psd_retro_angles_deg) + 2
        self.main_v_per_a, self.cm_v_per_a = s.main_monitor_v_per_a, s.cm_monitor_v_per_a

    def convert(self, hw: HwSensorFrame, disp: list[float], pose: list[float], cm_z_m: float,
                values: Mapping[str, Any]) -> Conversion:
        # the matrix products stay numpy's (BLAS): the same bits as always
        z = (self.fusion @ np.asarray(disp[:3])).tolist()
        xyt = (self.psd @ np.asarray(hw.psd_v[:self.n_psd])).tolist()
        dvm = (hw.dvm_v[0] if hw.dvm_v else 0.0) + values["pjvs_voltage_v"]
        mon = hw.current_monitor_v
        if len(mon) >= 2:
            i_main, i_cm = mon[0] / self.main_v_per_a, mon[1] / self.cm_v_per_a
        else:
            i_main = i_cm = 0.0
        return [xyt[0], xyt[1], z[0], z[1], z[2], xyt[4]], disp[3], dvm, i_main, i_cm, 0.0


class EfbSensors(SensorMap):
    """EFB: one interferometer gives z; the DVM (the applied high voltage) and the capacitance
    bridge are passed on."""

    n_fringe = 1
    n_psd = 0

    def convert(self, hw: HwSensorFrame, disp: list[float], pose: list[float], cm_z_m: float,
                values: Mapping[str, Any]) -> Conversion:
        pose = list(pose)
        pose[2] = disp[0]
        dvm = hw.dvm_v[0] if hw.dvm_v else 0.0
        cap = hw.capacitance_f[0] if hw.capacitance_f else 0.0
        return pose, cm_z_m, dvm, 0.0, 0.0, cap
