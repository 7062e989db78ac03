"""The daemons describe the hardware the simulator models (issue 14 item 2): every setting or
parameter of a daemon that describes a simulated device (DAC bits and full scale, driver gain,
coil and plate geometry, the mass lift's masses and ramp) equals the simulator's parameter of
it, as ``kibble up --sim MODEL`` configures the daemon. The pairs are the instruments' one
table, :attr:`kibble.services.instruments.Instrument.simulated`. A change on one side only
fails here, not as a loop that quietly mis-scales its outputs."""

import pytest

from kibble.hil_sim.params import load_params
from kibble.services.instruments import DEFINITIONS, instrument
from kibble.services.runtime.registry import service_class
from kibble.services.runtime.service import load_config

SAME_HARDWARE = {(model, daemon): names for model, inst in DEFINITIONS.items()
                 for daemon, names in inst.simulated.items()}
"""(instrument, daemon) -> daemon setting or parameter -> the simulator's parameter."""


def configured(model: str, daemon: str, state_dir):
    """The daemon as ``kibble up --sim MODEL`` configures it (``services/instruments/<model>.toml``)."""
    cfg = load_config(daemon, instrument(model).config, instrument=model, state_dir=state_dir, restore=False)
    return service_class(daemon)(cfg)


def test_every_daemon_of_the_table_belongs_to_its_instrument():
    assert all(daemon in DEFINITIONS[model].daemons for model, daemon in SAME_HARDWARE)


@pytest.mark.parametrize("model,daemon", list(SAME_HARDWARE))
def test_the_daemons_describe_the_simulated_hardware(model, daemon, tmp_path):
    svc, plant = configured(model, daemon, tmp_path), load_params(model)
    settings, values = svc.settings, svc.params.values

    def value(name):
        return getattr(settings, name) if name in type(settings).__struct_fields__ else values[name]

    differ = {name: (value(name), plant[sim]) for name, sim in SAME_HARDWARE[model, daemon].items()
              if value(name) != plant[sim]}
    assert not differ, f"{daemon} settings differ from hil_sim/{model}.toml: {differ}"
