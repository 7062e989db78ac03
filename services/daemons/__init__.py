"""The daemons, one module each: daq, current_source, servo, damping, theta_z, hv_source, recorder,
sequencer."""
