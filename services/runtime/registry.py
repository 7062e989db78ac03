"""Names of the daemons ``kibble service NAME`` can run, and how to find a service class."""

from __future__ import annotations

import importlib

from kibble.services.runtime.service import Service

SERVICES: dict[str, str] = {
    "daq": "kibble.services.daemons.daq:Daq",
    "current_source": "kibble.services.daemons.current_source:CurrentSource",
    "servo": "kibble.services.daemons.servo:Servo",
    "damping": "kibble.services.daemons.damping:Damping",
    "theta_z": "kibble.services.daemons.theta_z:ThetaZ",
    "hv_source": "kibble.services.daemons.hv_source:HvSource",
    "recorder": "kibble.services.daemons.recorder:Recorder",
    "sequencer": "kibble.services.daemons.sequencer:Sequencer",
}
"""Service name -> ``module:Class`` of every daemon (docs/architecture.md section 5)."""


def service_class(name: str) -> type[Service]:
    """The class of a registered service, or of ``module:Class`` for any other one."""
    target = SERVICES.get(name, name)
    if ":" not in target:
        known = ", ".join(sorted(SERVICES)) or "none registered yet"
        raise ValueError(f"unknown service {name!r} (known: {known}; or give module:Class)")
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load service {target!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise ValueError(f"{target!r} is not a kibble Service class")
    return cls
