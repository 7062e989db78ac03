"""DAC code conversions of the actuator drivers (physical value <-> signed integer codes).

Two kinds of converter, both bipolar two's-complement DACs:

- :class:`Dac`: one DAC, ``value = code * full_scale / 2^(bits-1)``, codes clamped to
  ``[-2^(bits-1), 2^(bits-1) - 1]``.
- :class:`CoarseFineDac`: a current source with a coarse and a fine DAC summed,
  ``I = FS / 2^(cb-1) * (coarse + fine * span / 2^fb)``, where the fine DAC's full range
  (all ``2^fb`` codes, i.e. +-span/2) covers ``fine_span_lsb`` coarse LSB.

Values beyond the range clamp to the end codes; a non-finite value raises ``ValueError``
(the services' guards never pass one, this is the last line of defence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _clamp_code(code: int, bits: int) -> int:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return lo if code < lo else hi if code > hi else code


def _check(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{what}: refusing to convert non-finite value {value}")


@dataclass(frozen=True)
class Dac:
    """One bipolar DAC of ``bits`` bits whose code ``2^(bits-1)`` would be ``full_scale``."""

    bits: int
    full_scale: float
    # per-frame constants, derived in __post_init__ (the conversions run for every channel of
    # every frame): not arguments, not in repr or comparisons
    _lsb: float = field(init=False, repr=False, compare=False)
    _lo: int = field(init=False, repr=False, compare=False)
    _hi: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (2 <= self.bits <= 32) or not (math.isfinite(self.full_scale) and self.full_scale > 0):
            raise ValueError(f"DAC needs 2..32 bits and a positive full scale, got {self.bits}, {self.full_scale}")
        object.__setattr__(self, "_lsb", self.full_scale / (1 << (self.bits - 1)))
        object.__setattr__(self, "_lo", -(1 << (self.bits - 1)))
        object.__setattr__(self, "_hi", (1 << (self.bits - 1)) - 1)

    @property
    def lsb(self) -> float:
        return self._lsb

    def to_code(self, value: float) -> int:
        if not math.isfinite(value):
            _check(value, "DAC")
        code = int(round(value / self._lsb))
        return self._lo if code < self._lo else self._hi if code > self._hi else code

    def to_value(self, code: int) -> float:
        return code * self._lsb


@dataclass(frozen=True)
class CoarseFineDac:
    """Coarse + fine DAC pair of a precision current source (full scale in A)."""

    full_scale: float
    coarse_bits: int = 16
    fine_bits: int = 16
    fine_span_lsb: float = 4.0
    # derived in __post_init__, as Dac's
    _coarse_lsb: float = field(init=False, repr=False, compare=False)
    _fine_lsb: float = field(init=False, repr=False, compare=False)
    _clo: int = field(init=False, repr=False, compare=False)
    _chi: int = field(init=False, repr=False, compare=False)
    _flo: int = field(init=False, repr=False, compare=False)
    _fhi: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        Dac(self.coarse_bits, self.full_scale)
        if not (2 <= self.fine_bits <= 32) or not (self.fine_span_lsb > 0):
            raise ValueError("fine DAC needs 2..32 bits and a positive span")
        coarse_lsb = self.full_scale / (1 << (self.coarse_bits - 1))
        object.__setattr__(self, "_coarse_lsb", coarse_lsb)
        object.__setattr__(self, "_fine_lsb", coarse_lsb * self.fine_span_lsb / (1 << self.fine_bits))
        object.__setattr__(self, "_clo", -(1 << (self.coarse_bits - 1)))
        object.__setattr__(self, "_chi", (1 << (self.coarse_bits - 1)) - 1)
        object.__setattr__(self, "_flo", -(1 << (self.fine_bits - 1)))
        object.__setattr__(self, "_fhi", (1 << (self.fine_bits - 1)) - 1)

    @property
    def coarse_lsb(self) -> float:
        return self._coarse_lsb

    @property
    def fine_lsb(self) -> float:
        return self._fine_lsb

    def to_codes(self, value: float) -> tuple[int, int]:
        """Nearest ``(coarse, fine)`` codes: coarse rounds, fine takes the remainder."""
        if not math.isfinite(value):
            _check(value, "current source DAC")
        coarse_lsb = self._coarse_lsb
        coarse = int(round(value / coarse_lsb))
        coarse = self._clo if coarse < self._clo else self._chi if coarse > self._chi else coarse
        fine = int(round((value - coarse * coarse_lsb) / self._fine_lsb))
        fine = self._flo if fine < self._flo else self._fhi if fine > self._fhi else fine
        return coarse, fine

    def to_value(self, coarse: int, fine: int) -> float:
        return coarse * self._coarse_lsb + fine * self._fine_lsb
