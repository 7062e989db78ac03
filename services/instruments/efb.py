"""The NIST electrostatic force balance (seed 000): three daemons, the servo's voltage map
(main and auxiliary electrodes), the daq's one interferometer, the weighings and the
capacitance-gradient sets."""

from kibble.services.plans import engine as plans
from kibble.services.daemons.daq_core import EfbSensors
from kibble.services.instruments import Instrument
from kibble.services.daemons.servo_core import VoltageMap

EFB = Instrument(
    name="efb",
    daemons=("daq", "servo", "hv_source"),
    actuators=("hv_source",),
    drives={"hv_source": ("hv",)},
    together=(("daq", "servo", "hv_source"),),
    modes=("idle", "force", "gradient"),
    actuator_map=VoltageMap,
    sensor_map=EfbSensors,
    plans=(plans.efb_weighing, plans.efb_gradient, plans.efb_run),
    safe_ending=plans.efb_safe_ending,
    simulated={
        "hv_source": {"dac_bits": "hv.dac_bits", "full_scale_v": "hv.full_scale_V"},
        "servo": {"lift_ramp_s": "masses.lift_ramp_s", "test_mass_kg": "masses.small_kg",
                  "aux_mass_kg": "masses.large_kg"},
    },
)
