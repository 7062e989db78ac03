"""Service parameters declared as typed, documented class attributes (caproto style).

::

    class Damping(Service):
        name = "damping"
        gain_x_n_s_per_m = Param(2.0, unit="N s/m", min=0.0, max=50.0, doc="x velocity gain")

Reading ``self.gain_x_n_s_per_m`` gives the current value. Values change only through the
service's :class:`ParamRegistry` (``param.set`` over the bus, a restored state file, or CLI
overrides), which validates type and range, keeps an undo history and an audit trail, and
persists the values.
"""

from __future__ import annotations

import builtins
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import msgspec

from kibble.bus_schema.messages import ParamSpec, ParamType, Scalar
from kibble.bus_schema.units import renamed_to

_TYPES: dict[type, ParamType] = {bool: "bool", int: "int", float: "float", str: "str"}


class ParamError(ValueError):
    """A parameter value, name or state file was rejected; the text says why."""


class Param:
    """A typed, documented, range-checked service parameter (a descriptor).

    :param default: the boot value; its Python type (bool, int, float, str) is the type.
    :param unit: SI unit text, e.g. ``"A"``, ``"N s/m"``; empty for dimensionless.
    :param min, max: inclusive limits for numbers (``None``: unbounded, still finite).
    :param choices: allowed values for a string parameter.
    :param doc: one sentence a metrologist understands.
    :param read_only: published but not settable over the bus.
    """

    def __init__(self, default: Scalar, *, unit: str = "", min: float | None = None,
                 max: float | None = None, choices: Iterable[str] = (), doc: str = "",
                 read_only: bool = False) -> None:
        if type(default) not in _TYPES:
            raise TypeError(f"parameter default must be bool, int, float or str, not {type(default)}")
        self.type = type(default)
        self.unit = unit
        self.min = min
        self.max = max
        self.choices = tuple(choices)
        self.doc = doc
        self.read_only = read_only
        self.name = ""
        self.default = default
        self.default = self.validate(default)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance.params.values[self.name]

    def __set__(self, instance: Any, value: Any) -> None:
        raise AttributeError(f"parameter {self.name!r} is set through the service's params registry")

    def validate(self, value: Any) -> Scalar:
        """Return ``value`` converted to this parameter's type, or raise :class:`ParamError`."""
        name = self.name or "parameter"
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "on", "off"):
                return value.lower() in ("true", "1", "on")
            raise ParamError(f"{name}: expected true or false, got {value!r}")
        if self.type is str:
            if not isinstance(value, str):
                raise ParamError(f"{name}: expected a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise ParamError(f"{name}: {value!r} is not one of {', '.join(self.choices)}")
            return value
        if isinstance(value, bool):
            raise ParamError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ParamError(f"{name}: expected a number, got {value!r}") from None
        if not isinstance(number, (int, float)):
            raise ParamError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ParamError(f"{name}: {value!r} is not a finite number")
        if self.type is int:
            if float(number) != int(number):
                raise ParamError(f"{name}: expected an integer, got {value!r}")
            number = int(number)
        else:
            number = float(number)
        unit = f" {self.unit}" if self.unit else ""
        if self.min is not None and number < self.min:
            raise ParamError(f"{name}: {number}{unit} is below the minimum {self.min}{unit}")
        if self.max is not None and number > self.max:
            raise ParamError(f"{name}: {number}{unit} is above the maximum {self.max}{unit}")
        return number

    def spec(self, value: Scalar) -> ParamSpec:
        return ParamSpec(name=self.name, type=_TYPES[self.type], value=value, default=self.default,
                         unit=self.unit, min=self.min, max=self.max, choices=list(self.choices),
                         doc=self.doc, read_only=self.read_only)


def declared_params(cls: type) -> dict[str, Param]:
    """Every :class:`Param` declared on ``cls`` and its bases, in declaration order."""
    out: dict[str, Param] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            if isinstance(attr, Param):
                out[name] = attr
    return out


@dataclass
class Change:
    """One accepted parameter change (the audit record and the undo history entry)."""

    name: str
    old: Scalar
    new: Scalar
    client_id: str
    t_utc_s: float


class StateFile(msgspec.Struct):
    """What a service persists between runs."""

    service: str
    session: int = 0
    params: dict[str, Any] = {}
    operating: dict[str, Scalar] = {}
    """What the service was doing (the servo: its mode and the masses on the pan), for a
    restarted service to take up again; restored and validated by the service itself."""


@dataclass
class ParamRegistry:
    """Current values of a service's parameters, with validation, undo and persistence.

    ``state_path`` (optional) is a JSON file written atomically after every change.
    ``renamed`` gives the new name of a renamed parameter (None if it was not renamed): an old
    name in the state file is restored under the new one with a notice, anywhere else it is
    refused with a message naming the new one.
    """

    specs: dict[str, Param]
    service: str
    state_path: Path | None = None
    values: dict[str, Scalar] = field(default_factory=dict)
    history: list[Change] = field(default_factory=list)
    session: int = 0
    operating: dict[str, Scalar] = field(default_factory=dict)
    """The service's operating state (:attr:`StateFile.operating`), persisted by :meth:`save`."""
    renamed: Callable[[str], str | None] = renamed_to

    def __post_init__(self) -> None:
        self.values = {name: spec.default for name, spec in self.specs.items()}

    def spec(self, name: str) -> Param:
        try:
            return self.specs[name]
        except KeyError:
            new = self.renamed(name)
            if new in self.specs:
                raise ParamError(f"no parameter {name!r}: it is called {new!r} now") from None
            known = ", ".join(sorted(self.specs)) or "none"
            raise ParamError(f"no parameter {name!r} (known: {known})") from None

    def set(self, name: str, value: Any, client_id: str, t_utc_s: float,
            allow_read_only: bool = False) -> Change:
        """Validate and apply one value; persist; return the change. Raises :class:`ParamError`."""
        spec = self.spec(name)
        if spec.read_only and not allow_read_only:
            raise ParamError(f"{name} is read-only")
        new = spec.validate(value)
        change = Change(name, self.values[name], new, client_id, t_utc_s)
        self.values[name] = new
        self.history.append(change)
        self.save()
        return change

    def revert(self, client_id: str, t_utc_s: float) -> Change:
        """Undo the last change (itself recorded as a change, not undoable twice)."""
        if not self.history:
            raise ParamError("no parameter change to revert")
        last = self.history.pop()
        self.values[last.name] = last.old
        self.save()
        return Change(last.name, last.new, last.old, client_id, t_utc_s)

    def apply_overrides(self, overrides: dict[str, Any]) -> None:
        """Apply configuration or CLI values at start-up (validated; not undoable)."""
        for name, value in overrides.items():
            self.values[name] = self.spec(name).validate(value)

    def list(self) -> list[ParamSpec]:
        return [spec.spec(self.values[name]) for name, spec in self.specs.items()]

    # ----------------------------------------------------------------- persistence

    # builtins.list: in the class body, `list` is the method above
    def load(self, restore_values: bool = True) -> builtins.list[str]:
        """Read the state file: the session number and (``restore_values``) the tuned values,
        each validated again, and the operating state.

        Returns one warning per value that was not restored (unknown name, now out of range)
        and one notice per value restored under its new name (a file saved before a rename).
        A missing file is a first start. An unreadable one raises :class:`ParamError` when
        values are to be restored, else it is a warning (the session count starts again).
        """
        if self.state_path is None or not self.state_path.exists():
            return []
        try:
            state = msgspec.json.decode(self.state_path.read_bytes(), type=StateFile)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            text = f"state file {self.state_path} is unreadable: {exc}"
            if not restore_values:
                return [f"{text}; it will be overwritten"]
            raise ParamError(f"{text}; move it away to start from the configured values") from None
        self.session = state.session
        if not restore_values:
            return []
        self.operating = dict(state.operating)
        warnings = []
        for name, value in state.params.items():
            new = self.renamed(name)
            if name not in self.specs and new in self.specs and new not in state.params:
                warnings.append(f"{self.state_path.name}: {name} is called {new} now: restored as {new}")
                name = new
            try:
                spec = self.spec(name)
                if not spec.read_only:
                    self.values[name] = spec.validate(value)
            except ParamError as exc:
                warnings.append(f"not restored from {self.state_path.name}: {exc}")
        return warnings

    def save(self) -> None:
        """Write the state file atomically (temporary file, fsync, rename)."""
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        persisted = {n: v for n, v in self.values.items() if not self.specs[n].read_only}
        data = msgspec.json.encode(StateFile(self.service, self.session, persisted, self.operating))
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".state-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
