"""The operator's views of the bus, with no change to the daemons: ``kibble dashboard`` (a live
web page, :mod:`.dashboard`) and ``kibble epics`` (a Channel Access server, :mod:`.epics`),
both on one follower of the bus (:mod:`.model`)."""

DEFAULT_FIELDS = ("daq.coil_z_m", "daq.coil_x_m", "daq.coil_y_m", "daq.coil_theta_x_rad",
                  "daq.coil_theta_y_rad", "daq.coil_theta_z_rad", "daq.main_coil_current_a",
                  "daq.counter_mass_current_a", "daq.coil_voltage_v", "daq.temperature_k",
                  "daq.pressure_pa", "servo.error_m", "servo.force_n", "servo.z_ref_m")
"""The frame fields ``kibble epics`` publishes unless told others (``SERVICE.FIELD``: a field of
the DAQ frame, or a key of a loop frame's ``values``)."""
DEFAULT_RATE_HZ = 10.0
"""How often ``kibble epics`` updates the frame-field PVs (Hz)."""
PROCESS = {"sched_policy": "idle"}
"""The views' process settings unless told others (``--process``, as for ``kibble service``):
Linux's ``SCHED_IDLE``, so that a view runs on what CPU the daemons leave and a daemon that
wakes takes the CPU from it at once (measured with ``kibble bench --only views``)."""
