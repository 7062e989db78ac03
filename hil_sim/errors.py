"""Exceptions raised by the HIL plant models."""

from __future__ import annotations

from .params import ParamError

__all__ = ["ActuatorError", "ParamError", "PlantError"]


class ActuatorError(ValueError):
    """An actuator command was malformed, non-finite or out of range.

    ``channel`` names the offending channel (e.g. ``"damping[3]"``), ``value`` is what was sent.
    The plant state is untouched when this is raised.
    """

    def __init__(self, channel: str, value: object, why: str):
        self.channel = channel
        self.value = value
        super().__init__(f"actuator channel {channel!r}: {why} (got {value!r})")


class PlantError(RuntimeError):
    """The integration produced a non-finite state (should never happen; the step is rolled back)."""
