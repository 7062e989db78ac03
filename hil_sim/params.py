"""Plant parameters: loaded from a TOML file per model, every value with unit, range and source.

File format (``hil_sim/nist4.toml``, ``hil_sim/efb.toml``)::

    [wheel]
    radius_m = { value = 0.305, unit = "m", min = 0.1, max = 1.0, source = "seed 001: ..." }

A leaf is an inline table with at least ``value`` and ``source``; ``unit``, ``min``, ``max``
and ``doc`` are optional. A value is a bool, an int, a float, a string or a list of numbers
(fixed length: an override must keep the length). Parameters are addressed by dotted names
(``"wheel.radius_m"``). Overrides come as a dict ``{dotted_name: value}`` (tests) or as
``"name=value"`` strings (command line, the value parsed as TOML). Unknown names, wrong types,
non-finite numbers and out-of-range values raise :class:`ParamError` naming the parameter.

Noise profiles (:data:`NOISE_PROFILES`): the base values of the file are the ``quiet`` profile.
A table ``[profiles.<name>]`` holds a profile's values over the base, each with the reason for
its value::

    [profiles.published]
    "interferometer.flicker_asd_m" = { value = 3e-11, source = "seed 001 Fig. 12: ..." }

``published`` applies ``[profiles.published]``; ``off`` sets every ``noise.*`` switch false and
then applies ``[profiles.off]`` (amplitudes no switch covers). Overrides are applied last, so a
user's value always wins over the profile's.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from kibble.bus_schema.instruments import INSTRUMENTS
from kibble.bus_schema.units import renamed_to

__all__ = ["NOISE_PROFILES", "DEFAULT_NOISE", "ParamError", "ParamSpec", "Params", "MODELS", "load_params",
           "parse_override", "load_overrides_file", "frame_overrides"]

_HERE = Path(__file__).resolve().parent

MODELS = INSTRUMENTS
"""The plant models (the bus contract's instruments), each with its parameter file
``hil_sim/<model>.toml``."""

NOISE_PROFILES: tuple[str, ...] = ("published", "quiet", "off")
"""``published``: as noisy as the seeds' instruments (the default wherever a user runs the
simulator); ``quiet``: the file's base values (tests that need small, known noise); ``off``: every
noise switch off (exactness tests)."""

DEFAULT_NOISE = "published"


class ParamError(ValueError):
    """A plant parameter name or value was rejected; the message names it and says why."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    value: Any
    unit: str
    min: float | None
    max: float | None
    source: str
    doc: str


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Params:
    """Validated, flat (dotted-name) view of one model's parameters. Read-only mapping."""

    def __init__(self, model: str, specs: dict[str, ParamSpec], noise: str = "quiet"):
        self.model = model
        self.noise = noise
        """The noise profile the values started from (:data:`NOISE_PROFILES`)."""
        self._specs = specs

    def __getitem__(self, name: str) -> Any:
        try:
            return self._specs[name].value
        except KeyError:
            raise ParamError(f"{self.model}: unknown parameter {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ParamSpec:
        if name not in self._specs:
            raise ParamError(f"{self.model}: unknown parameter {name!r}")
        return self._specs[name]

    def as_dict(self) -> dict[str, Any]:
        return {k: s.value for k, s in self._specs.items()}

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str] | None) -> "Params":
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            overrides = dict(parse_override(s) for s in overrides)
        specs = dict(self._specs)
        for name, value in overrides.items():
            if name not in specs:
                new = renamed_to(name)
                if new in specs:
                    raise ParamError(f"{self.model}: parameter {name!r} in overrides is called {new!r} now")
                raise ParamError(f"{self.model}: unknown parameter {name!r} in overrides")
            old = specs[name]
            spec = ParamSpec(name, value, old.unit, old.min, old.max, old.source + " [overridden]", old.doc)
            specs[name] = _checked(self.model, spec, old.value)
        return Params(self.model, specs, self.noise)


def parse_override(text: str) -> tuple[str, Any]:
    """``"wheel.q=300"`` -> ``("wheel.q", 300)``; the value is parsed as TOML, else a string."""
    if "=" not in text:
        raise ParamError(f"override {text!r} is not of the form name=value")
    name, raw = text.split("=", 1)
    name, raw = name.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return name, value


def _checked(model: str, spec: ParamSpec, template: Any) -> ParamSpec:
    v, name = spec.value, spec.name

    def check_num(x: Any, where: str) -> float:
        if not _is_num(x):
            raise ParamError(f"{model}: parameter {where} must be a number, got {x!r}")
        if not math.isfinite(x):
            raise ParamError(f"{model}: parameter {where} must be finite, got {x!r}")
        if spec.min is not None and x < spec.min:
            raise ParamError(f"{model}: parameter {where} = {x!r} below minimum {spec.min} {spec.unit}")
        if spec.max is not None and x > spec.max:
            raise ParamError(f"{model}: parameter {where} = {x!r} above maximum {spec.max} {spec.unit}")
        return x

    if isinstance(template, bool):
        if not isinstance(v, bool):
            raise ParamError(f"{model}: parameter {name} must be a bool, got {v!r}")
    elif isinstance(template, str):
        if not isinstance(v, str):
            raise ParamError(f"{model}: parameter {name} must be a string, got {v!r}")
    elif isinstance(template, list):
        if not isinstance(v, (list, tuple)) or len(v) != len(template):
            raise ParamError(f"{model}: parameter {name} must be a list of {len(template)} numbers, got {v!r}")
        v = [check_num(x, f"{name}[{i}]") for i, x in enumerate(v)]
    elif _is_num(template):
        check_num(v, name)
        if isinstance(template, float):
            v = float(v)
        elif not isinstance(v, int):
            if float(v).is_integer():
                v = int(v)
            else:
                raise ParamError(f"{model}: parameter {name} must be an integer, got {v!r}")
    else:  # pragma: no cover - TOML gives nothing else
        raise ParamError(f"{model}: parameter {name} has unsupported type {type(template)}")
    return ParamSpec(name, v, spec.unit, spec.min, spec.max, spec.source, spec.doc)


def _walk(model: str, table: dict, prefix: str, out: dict[str, ParamSpec]) -> None:
    for key, val in table.items():
        name = f"{prefix}{key}"
        new = renamed_to(name)
        if new is not None:
            raise ParamError(f"{model}: parameter {name} is called {new} now: rename it in the file")
        if isinstance(val, dict) and "value" in val:
            if "source" not in val:
                raise ParamError(f"{model}: parameter {name} has no source")
            extra = set(val) - {"value", "unit", "min", "max", "source", "doc"}
            if extra:
                raise ParamError(f"{model}: parameter {name} has unknown keys {sorted(extra)}")
            spec = ParamSpec(name, val["value"], val.get("unit", ""), val.get("min"), val.get("max"),
                             val["source"], val.get("doc", ""))
            out[name] = _checked(model, spec, val["value"])
        elif isinstance(val, dict):
            _walk(model, val, name + ".", out)
        else:
            raise ParamError(f"{model}: {name} is neither a parameter table nor a section")


def _profile(model: str, base: Params, name: str, table: Any) -> Params:
    """``base`` with the values of ``[profiles.<name>]``, each source replaced by the profile's."""
    if not isinstance(table, dict):
        raise ParamError(f"{model}: [profiles.{name}] is not a table")
    specs = dict(base._specs)
    for key, val in table.items():
        where = f"[profiles.{name}] {key!r}"
        if key not in specs:
            raise ParamError(f"{model}: {where} names no parameter")
        if not isinstance(val, dict) or set(val) != {"value", "source"}:
            raise ParamError(f"{model}: {where} must be {{ value = ..., source = \"why\" }}")
        old = specs[key]
        spec = ParamSpec(key, val["value"], old.unit, old.min, old.max,
                         f"{val['source']} [profile {name}; quiet: {old.value!r}, {old.source}]", old.doc)
        specs[key] = _checked(model, spec, old.value)
    return Params(model, specs, name)


def load_params(model: str, overrides: Mapping[str, Any] | Iterable[str] | None = None,
                path: str | Path | None = None, noise: str = DEFAULT_NOISE) -> Params:
    """Load ``hil_sim/<model>.toml`` (or ``path``), take the noise profile ``noise``
    (:data:`NOISE_PROFILES`), then apply ``overrides``."""
    if noise not in NOISE_PROFILES:
        raise ParamError(f"{model}: unknown noise profile {noise!r}; one of {', '.join(NOISE_PROFILES)}")
    p = Path(path) if path is not None else _HERE / f"{model}.toml"
    with open(p, "rb") as fh:
        raw = tomllib.load(fh)
    profiles = raw.pop("profiles", {})
    if not isinstance(profiles, dict) or set(profiles) - {"published", "off"}:
        raise ParamError(f"{model}: [profiles] may hold only the tables published and off "
                         "(quiet is the file's base values)")
    specs: dict[str, ParamSpec] = {}
    _walk(model, raw, "", specs)
    params = Params(model, specs)
    if noise == "off":
        switches = {n: False for n, s in specs.items() if n.startswith("noise.") and isinstance(s.value, bool)}
        params = Params(model, params.with_overrides(switches)._specs, "off")
    if noise != "quiet":
        params = _profile(model, params, noise, profiles.get(noise, {}))
    return params.with_overrides(overrides)


def load_overrides_file(path: str | Path) -> dict[str, Any]:
    """Plant parameter overrides from a TOML file, as ``{dotted.name: value}``.

    Accepts nested tables (``[wheel]`` / ``q = 300``), dotted keys (``"wheel.q" = 300``) and
    the full parameter format (``q = { value = 300, ... }``: the value is taken), so a copy of
    ``hil_sim/nist4.toml`` with edited values works too.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read simulator parameters {path}: {exc}") from None
    out: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and "value" in value:
                out[name] = value["value"]
            elif isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = value

    walk(data, "")
    return out


def frame_overrides(model: str, rate_hz: float, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``overrides`` plus ``sim.frame_rate_hz = rate_hz``, checked: a frame must be a whole
    number of integration steps (``sim.rate_hz``, 10 kHz by default)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
    merged = dict(overrides or {})
    merged["sim.frame_rate_hz"] = float(rate_hz)
    step_hz = float(merged.get("sim.rate_hz", load_params(model)["sim.rate_hz"]))
    if not (math.isfinite(rate_hz) and 0 < rate_hz <= step_hz):
        raise ValueError(f"frame rate {rate_hz!r} Hz must be > 0 and <= the {step_hz:g} Hz "
                         "integration rate")
    n_sub = step_hz / rate_hz
    if abs(n_sub - round(n_sub)) > 1e-9:
        raise ValueError(f"frame rate {rate_hz:g} Hz is not a whole number of {step_hz:g} Hz "
                         f"integration steps (use e.g. 1000, 500, 250, 200 or 100 Hz)")
    return merged
