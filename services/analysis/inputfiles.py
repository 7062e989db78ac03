"""Reading a metrologist's TOML input files with errors that name the file, the line and the field.

tomllib gives no line numbers, so :class:`TomlDocument` scans the text once and maps each key
to the line it is written on, by the table it is in: ``("participant", 2, "standard", 0,
"nmi_mg")`` is the key ``nmi_mg`` of the first ``[[participant.standard]]`` of the third
``[[participant]]`` (indices from 0). A key written inside an inline table (``{ value = 1,
u = 0.1 }``) is reported at the line of the table's key; a key that is missing, at the line of
its table's header.

A measured quantity is an inline table ``{ value = X, u = U }``: its value and its standard
uncertainty (k = 1), in the unit its key names (``nmi_mg``, ``volume_cm3``).

Two formats (documented in the README, examples in ``examples/``): :func:`load_comparison`,
a key comparison's submissions (seed 002), and :func:`load_sphere`, a 28Si sphere's
measurements for the XRCD route (seed 003).
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, overload

import numpy as np

from kibble.services.analysis.comparison import Comparison, Participant, Standard
from kibble.services.analysis.xrcd import Investigation, Layer, PointDefect, Quantity, Sphere

__all__ = ["InputFileError", "TomlDocument", "Table", "load_comparison", "load_sphere"]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")


class InputFileError(ValueError):
    """Bad input: ``str()`` is ``FILE:LINE: FIELD: what is wrong``."""

    def __init__(self, path: str | Path, line: int, field: str, message: str) -> None:
        self.path, self.line, self.field, self.message = str(path), line, field, message
        super().__init__(f"{path}:{line}: {field}: {message}")


def _depth(line: str) -> int:
    """Net count of open brackets and braces on a line, strings and comments removed."""
    code = _STRING.sub("", line).split("#", 1)[0]
    return code.count("[") + code.count("{") - code.count("]") - code.count("}")


class TomlDocument:
    """A TOML file parsed (tomllib) with the line of every key and table header."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.text = self.path.read_text()
        except OSError as exc:
            raise InputFileError(self.path, 0, "-", f"cannot read the file: {exc.strerror}") from None
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            at = re.search(r"at line (\d+)", str(exc))
            line = getattr(exc, "lineno", None) or (int(at.group(1)) if at else 0)
            raise InputFileError(self.path, line, "-", f"not valid TOML: {exc}") from None
        self.lines: dict[tuple, int] = {(): 1}
        self._scan()

    def _scan(self) -> None:
        counters: dict[tuple, int] = {}
        current: tuple = ()
        depth = 0
        for number, line in enumerate(self.text.splitlines(), start=1):
            if depth > 0:
                depth += _depth(line)
                continue
            header = _HEADER.match(line)
            if header:
                parts = [p.strip().strip('"') for p in header.group(2).split(".")]
                path: list[Any] = []
                for i, name in enumerate(parts):
                    path.append(name)
                    key = tuple(path)
                    last = i == len(parts) - 1
                    if last and header.group(1) == "[[":
                        counters[key] = counters.get(key, -1) + 1
                        path.append(counters[key])
                    elif key in counters:
                        path.append(counters[key])
                current = tuple(path)
                self.lines.setdefault(current, number)
                continue
            key_match = _KEY.match(line)
            if key_match:
                self.lines[current + (key_match.group(1).strip('"'),)] = number
                depth = _depth(line[key_match.end():])

    def line_of(self, where: tuple) -> int:
        """The line of the key or table at ``where``, or of its nearest enclosing one."""
        for n in range(len(where), -1, -1):
            if where[:n] in self.lines:
                return self.lines[where[:n]]
        return 1

    def error(self, where: tuple, message: str) -> InputFileError:
        """An :class:`InputFileError` at ``where`` (its field printed as ``a[2].b.c``)."""
        field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                        for i, p in enumerate(where)) or "-"
        return InputFileError(self.path, self.line_of(where), field, message)

    def table(self, where: tuple = ()) -> "Table":
        node: Any = self.data
        for p in where:
            node = node[p]
        return Table(self, where, node)


class Table:
    """One table of a :class:`TomlDocument`, with typed getters that raise
    :class:`InputFileError` at the right line."""

    def __init__(self, doc: TomlDocument, where: tuple, data: Mapping[str, Any]) -> None:
        self.doc, self.where, self.data = doc, where, data

    def error(self, key: str | None, message: str) -> InputFileError:
        return self.doc.error(self.where + ((key,) if key else ()), message)

    def only(self, allowed: Iterable[str]) -> None:
        """Refuse a key not in ``allowed``."""
        allowed = set(allowed)
        for key in self.data:
            if key not in allowed:
                raise self.error(key, f"unknown field (known: {', '.join(sorted(allowed))})")

    def has(self, key: str) -> bool:
        return key in self.data

    def sub(self, key: str) -> "Table":
        """A sub-table (``[a.key]``)."""
        if key not in self.data:
            raise self.error(key, "missing table")
        if not isinstance(self.data[key], dict):
            raise self.error(key, "must be a table")
        return Table(self.doc, self.where + (key,), self.data[key])

    def tables(self, key: str, *, required: bool = True) -> list["Table"]:
        """The tables of an array of tables (``[[a.key]]``)."""
        items = self.data.get(key)
        if items is None:
            if required:
                raise self.error(key, "missing (at least one [[...]] table)")
            return []
        if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
            raise self.error(key, "must be an array of tables ([[...]])")
        return [Table(self.doc, self.where + (key, i), t) for i, t in enumerate(items)]

    def string(self, key: str, default: str | None = None) -> str:
        if key not in self.data:
            if default is None:
                raise self.error(key, "missing")
            return default
        v = self.data[key]
        if not isinstance(v, str) or not v.strip():
            raise self.error(key, "must be a non-empty string")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.data.get(key, default)
        if not isinstance(v, bool):
            raise self.error(key, "must be true or false")
        return v

    def number(self, key: str, default: float | None = None, *, positive: bool = False,
               nonnegative: bool = False) -> float:
        if key not in self.data:
            if default is None:
                raise self.error(key, "missing")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(key, f"must be a finite number, not {v!r}")
        if positive and not v > 0:
            raise self.error(key, f"must be positive, not {v!r}")
        if nonnegative and v < 0:
            raise self.error(key, f"must not be negative, not {v!r}")
        return float(v)

    @overload
    def measured(self, key: str, *, required: Literal[True] = True) -> tuple[float, float]: ...
    @overload
    def measured(self, key: str, *, required: bool) -> tuple[float, float] | None: ...

    def measured(self, key: str, *, required: bool = True) -> tuple[float, float] | None:
        """A quantity ``{ value = X, u = U }``: (value, standard uncertainty); refused without
        its uncertainty, with a negative one, or with another field."""
        if key not in self.data:
            if required:
                raise self.error(key, "missing (write it as { value = ..., u = ... })")
            return None
        v = self.data[key]
        if not isinstance(v, dict):
            raise self.error(key, "needs its standard uncertainty: write { value = ..., u = ... }")
        t = Table(self.doc, self.where + (key,), v)
        t.only(("value", "u"))
        if "u" not in v:
            raise t.error("u", "missing standard uncertainty")
        return t.number("value"), t.number("u", nonnegative=True)

    def matrix(self, key: str, n: int) -> np.ndarray:
        """A correlation matrix (n x n, symmetric, unit diagonal, entries in [-1, 1], positive
        semi-definite)."""
        v = self.data.get(key)
        try:
            m = np.array(v, dtype=float)
        except (TypeError, ValueError):
            raise self.error(key, "must be a matrix of numbers ([[1.0, r], [r, 1.0]])") from None
        if m.shape != (n, n):
            raise self.error(key, f"must be {n} x {n} (one row per standard), not {m.shape}")
        if not np.all(np.isfinite(m)) or not np.allclose(m, m.T, rtol=0, atol=1e-12):
            raise self.error(key, "must be symmetric")
        if not np.allclose(np.diag(m), 1.0, rtol=0, atol=1e-12) or np.any(np.abs(m) > 1.0):
            raise self.error(key, "a correlation matrix has 1 on its diagonal and entries in [-1, 1]")
        smallest = float(np.linalg.eigvalsh(m).min())
        if smallest < -1e-12:
            raise self.error(key, f"is not positive semi-definite (smallest eigenvalue {smallest:.3g})")
        return m


# ============================================================================ comparison

_COMPARISON = ("name", "source", "u_reference_mg")
_PARTICIPANT = ("name", "in_kcrv", "r", "correlation", "bipm_covariance_mg2", "standard")
_STANDARD = ("id", "nmi_mg", "bipm_mg", "mass_change_ug", "u_stability_mg", "u_cleaning_mg")


def _standard(t: Table) -> Standard:
    t.only(_STANDARD)
    nmi = t.measured("nmi_mg")
    bipm = t.measured("bipm_mg")
    if t.has("mass_change_ug") == t.has("u_stability_mg"):
        raise t.error("u_stability_mg", "give the stability as mass_change_ug = { value, u } "
                      "(observed) or u_stability_mg (assumed), one of them")
    if t.has("mass_change_ug"):
        change, u_change = t.measured("mass_change_ug")
        u_stab = max(abs(change), u_change) * 1e-3
    else:
        u_stab = t.number("u_stability_mg", nonnegative=True)
    return Standard(id=t.string("id"), nmi_mg=nmi[0], u_nmi_mg=nmi[1], bipm_mg=bipm[0],
                    u_bipm_mg=bipm[1], u_stability_mg=u_stab,
                    u_cleaning_mg=t.number("u_cleaning_mg", 0.0, nonnegative=True))


def load_comparison(path: str | Path) -> Comparison:
    """A key comparison's submissions from a TOML file; :class:`InputFileError` (file, line,
    field) for anything missing, unknown, repeated or inconsistent."""
    doc = TomlDocument(path)
    top = doc.table()
    top.only(("comparison", "participant"))
    head = top.sub("comparison")
    head.only(_COMPARISON)
    participants: list[Participant] = []
    seen: set[str] = set()
    for t in top.tables("participant"):
        t.only(_PARTICIPANT)
        name = t.string("name")
        if name in seen:
            raise t.error("name", f"participant {name!r} appears twice")
        seen.add(name)
        standards = [_standard(s) for s in t.tables("standard")]
        ids = [s.id for s in standards]
        for k, sid in enumerate(ids):
            if sid in ids[:k]:
                raise doc.error(t.where + ("standard", k, "id"), f"standard {sid!r} appears twice")
        n = len(standards)
        if t.has("r") and t.has("correlation"):
            raise t.error("correlation", "give r (two standards) or correlation (a matrix), not both")
        if t.has("correlation"):
            corr = t.matrix("correlation", n)
        elif n == 1:
            corr = np.eye(1)
        elif n == 2 and t.has("r"):
            r = t.number("r")
            if abs(r) > 1:
                raise t.error("r", f"a correlation coefficient is in [-1, 1], not {r}")
            corr = np.array([[1.0, r], [r, 1.0]])
        else:
            raise t.error("r", f"{n} standards need their correlation: r = ... for two, "
                          "correlation = [[...], ...] for more")
        p = Participant(name, tuple(standards), corr, t.boolean("in_kcrv", True),
                        t.number("bipm_covariance_mg2", 0.0))
        try:
            np.linalg.cholesky(p.covariance_mg2())
        except np.linalg.LinAlgError:
            raise t.error("bipm_covariance_mg2", "the covariance of the standards' differences "
                          "is not positive definite") from None
        participants.append(p)
    u_ref = head.number("u_reference_mg", nonnegative=True) if head.has("u_reference_mg") else None
    return Comparison(head.string("name"), tuple(participants), u_ref)


# ================================================================================ sphere

_SPHERE = ("name", "crystal", "source", "molar_mass_g_mol", "lattice_parameter_pm", "d220_pm")
_DEFECT = ("name", "concentration_per_cm3", "site_mass_u")
_INVESTIGATION = ("name", "volume_cm3", "sphere_mass_kg", "layer")
_LAYER = ("name", "mass_ug", "thickness_nm", "density_g_cm3")


def _quantity(t: Table, key: str, name: str, unit: str, scale: float, group: str) -> Quantity:
    value, u = t.measured(key)
    return Quantity(name, value * scale, u * scale, unit, group)


def _layer(t: Table, prefix: str) -> Layer:
    t.only(_LAYER)
    name = t.string("name")
    if t.has("mass_ug"):
        if t.has("thickness_nm") or t.has("density_g_cm3"):
            raise t.error("thickness_nm", "give a layer's mass_ug or its thickness_nm and density_g_cm3, not both")
        return Layer(name, mass=_quantity(t, "mass_ug", f"{prefix}.{name}", "kg", 1e-9, "surface"))
    if not t.has("thickness_nm"):
        raise t.error("mass_ug", "a layer needs mass_ug, or thickness_nm and density_g_cm3")
    return Layer(name, thickness=_quantity(t, "thickness_nm", f"{prefix}.{name}.thickness", "m", 1e-9, "surface"),
                 density=_quantity(t, "density_g_cm3", f"{prefix}.{name}.density", "kg/m^3", 1e3, "surface"))


def load_sphere(path: str | Path) -> Sphere:
    """A 28Si sphere's measurements from a TOML file; :class:`InputFileError` (file, line,
    field) for anything missing, unknown, repeated or inconsistent."""
    doc = TomlDocument(path)
    top = doc.table()
    top.only(("sphere", "point_defect", "investigation", "correlation"))
    head = top.sub("sphere")
    head.only(_SPHERE)
    defects: list[PointDefect] = []
    for t in top.tables("point_defect", required=False):
        t.only(_DEFECT)
        name = t.string("name")
        if name in [d.name for d in defects]:
            raise t.error("name", f"point defect {name!r} appears twice")
        defects.append(PointDefect(name, _quantity(t, "concentration_per_cm3", f"defect.{name}", "1/m^3",
                                                   1e6, "point defects"),
                                   t.number("site_mass_u", nonnegative=True)))
    investigations: list[Investigation] = []
    for t in top.tables("investigation"):
        t.only(_INVESTIGATION)
        name = t.string("name")
        if name in [i.name for i in investigations]:
            raise t.error("name", f"investigation {name!r} appears twice")
        layers = [_layer(lt, f"{name}.layer") for lt in t.tables("layer", required=False)]
        investigations.append(Investigation(
            name, _quantity(t, "volume_cm3", f"{name}.volume", "m^3", 1e-6, "sphere volume"),
            _quantity(t, "sphere_mass_kg", f"{name}.sphere_mass", "kg", 1.0, "sphere mass"),
            tuple(layers)))
    if head.has("d220_pm") == head.has("lattice_parameter_pm"):
        raise head.error("lattice_parameter_pm", "give the lattice parameter a (lattice_parameter_pm) "
                         "or the (220) spacing (d220_pm, a = sqrt(8) d220), one of them")
    lattice = (_quantity(head, "d220_pm", "lattice_parameter", "m", math.sqrt(8.0) * 1e-12, "lattice parameter")
               if head.has("d220_pm") else
               _quantity(head, "lattice_parameter_pm", "lattice_parameter", "m", 1e-12, "lattice parameter"))
    sphere = Sphere(head.string("name"), head.string("crystal", "-"),
                    _quantity(head, "molar_mass_g_mol", "molar_mass", "kg/mol", 1e-3, "molar mass"),
                    lattice, tuple(defects), tuple(investigations))
    known = {q.name for q in sphere.inputs()}
    correlations = []
    for t in top.tables("correlation", required=False):
        t.only(("between", "r"))
        pair = t.data.get("between")
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise t.error("between", "must name two inputs: between = [\"A\", \"B\"]")
        for p in pair:
            if p not in known:
                raise t.error("between", f"unknown input {p!r} (inputs: {', '.join(sorted(known))})")
        r = t.number("r")
        if abs(r) > 1 or pair[0] == pair[1]:
            raise t.error("r", "a correlation of two different inputs, in [-1, 1]")
        correlations.append((pair[0], pair[1], r))
    sphere = Sphere(sphere.name, sphere.crystal, sphere.molar_mass, sphere.lattice_parameter,
                    sphere.defects, sphere.investigations, tuple(correlations))
    try:
        sphere.covariance()
    except ValueError as exc:
        raise doc.error(("correlation",), str(exc)) from None
    return sphere
