"""Measurement procedures as plans, the engine that runs them, and the Loop over MQTT."""
