"""Each instrument defined once (issue 14 item 2): :class:`Instrument`, one per module
(:mod:`.nist4`, :mod:`.efb`), read by ``kibble up`` and the in-process stack (daemons, process
groups, devices), the servo (modes, actuator map), the daq (sensor conversions), the plans (an
instrument's plans and their safe ending) and the tests that tie the daemons' configuration to
the simulator's parameters (:attr:`Instrument.simulated`).

The part the simulator shares (instrument ids, ``hw/`` devices and sensor channels) is the bus
contract, :mod:`kibble.bus_schema.instruments`; the daemons' configuration (what differs from
their settings' and parameters' defaults, which are NIST-4's) is :attr:`Instrument.config`.

::

    from kibble.services.instruments import instrument
    nist4 = instrument("nist4")
    nist4.daemons, nist4.devices, nist4.modes     # ('daq', ...), ('main_source', ...), ('idle', ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from kibble.bus_schema.instruments import INSTRUMENTS
from kibble.services.daemons.daq_core import SensorMap
from kibble.services.plans.engine import Plan, with_safe_ending
from kibble.services.daemons.servo_core import ActuatorMap

__all__ = ["DEFINITIONS", "Instrument", "PLANS", "instrument"]


@dataclass(frozen=True)
class Instrument:
    """One instrument as the software runs it."""

    name: str
    """Its id (:data:`kibble.bus_schema.instruments.INSTRUMENTS`), also the simulated model's."""
    daemons: tuple[str, ...]
    """Its daemons (:data:`kibble.services.runtime.registry.SERVICES`), in start order."""
    actuators: tuple[str, ...]
    """The daemons that drive hardware and must be armed."""
    drives: Mapping[str, tuple[str, ...]]
    """Actuator daemon -> the ``hw/`` devices it answers every frame (the lockstep devices of
    :mod:`kibble.bus_schema.instruments`, each driven by one daemon)."""
    together: tuple[tuple[str, ...], ...]
    """Daemons that share a process above ``kibble up``'s ``TOGETHER_ABOVE_HZ`` (the hot path:
    sensor frame to DAQ frame to setpoint to the source in one process; the decimated loops in
    another)."""
    modes: tuple[str, ...]
    """The servo's modes (``erase`` is entered by its own command)."""
    actuator_map: type[ActuatorMap]
    """The servo's map from the loop's force to the actuators' setpoint."""
    sensor_map: type[SensorMap]
    """The daq's conversions of the raw sensor channels."""
    plans: tuple[Callable[..., Plan], ...]
    """Its measurement plans (:mod:`kibble.services.plans.engine`)."""
    safe_ending: Callable[[], Plan]
    """What a failed or aborted plan of it ends with."""
    simulated: Mapping[str, Mapping[str, str]]
    """Daemon -> setting or parameter -> the simulator's parameter (``hil_sim/<name>.toml``) of
    the same hardware, which it must equal as ``kibble up`` configures the daemon (DAC widths
    and full scales, driver gains, geometry, the mass lift)."""

    @property
    def devices(self) -> tuple[str, ...]:
        """The ``hw/`` devices its actuators drive, which the lockstep clock waits for."""
        return tuple(d for name in self.actuators for d in self.drives[name])

    @property
    def config(self) -> Path:
        """The configuration of its daemons (``services/instruments/<name>.toml``), which ``kibble up``
        passes them (a lab copies it to /etc/kibble/kibble.toml and adjusts)."""
        return Path(__file__).parent / f"{self.name}.toml"


def _instruments() -> dict[str, Instrument]:
    from kibble.services.instruments import efb, nist4
    found = {i.name: i for i in (nist4.NIST4, efb.EFB)}
    if tuple(found) != INSTRUMENTS:
        raise RuntimeError(f"instrument definitions {tuple(found)} differ from the bus's {INSTRUMENTS}")
    return found


DEFINITIONS: dict[str, Instrument] = _instruments()
"""Instrument id -> its definition."""


def instrument(name: str) -> Instrument:
    """The definition of instrument ``name`` (``ValueError`` naming the known ones)."""
    try:
        return DEFINITIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown instrument {name!r}; one of {', '.join(DEFINITIONS)}") from None


PLANS: dict[str, Callable[..., Plan]] = {
    fn.__name__: with_safe_ending(fn, inst.safe_ending) for inst in DEFINITIONS.values() for fn in inst.plans}
"""Plan name -> the plan as the engine runs it: wrapped in its instrument's safe ending
(:func:`~kibble.services.plans.engine.safe_ending_wrapper`; the plain plans compose into larger ones
without it)."""
