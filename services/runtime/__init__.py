"""What every daemon stands on: the service base, parameters, the actuator base and its safety
guard, DAC conversions, broker identities, and the bus client of the tools."""
