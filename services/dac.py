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
from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        if not (2 <= self.bits <= 32) or not (math.isfinite(self.full_scale) and self.full_scale > 0):
            raise ValueError(f"DAC needs 2..32 bits and a positive full scale, got {self.bits}, {self.full_scale}")

    @property
    def lsb(self) -> float:
        return self.full_scale / (1 << (self.bits - 1))

    def to_code(self, value: float) -> int:
        _check(value, "DAC")
        return _clamp_code(int(round(value / self.lsb)), self.bits)

    def to_value(self, code: int) -> float:
        return code * self.lsb


@dataclass(frozen=True)
class CoarseFineDac:
    """Coarse + fine DAC pair of a precision current source (full scale in A)."""

    full_scale: float
    coarse_bits: int = 16
    fine_bits: int = 16
    fine_span_lsb: float = 4.0

    def __post_init__(self) -> None:
        Dac(self.coarse_bits, self.full_scale)
        if not (2 <= self.fine_bits <= 32) or not (self.fine_span_lsb > 0):
            raise ValueError("fine DAC needs 2..32 bits and a positive span")

    @property
    def coarse_lsb(self) -> float:
        return self.full_scale / (1 << (self.coarse_bits - 1))

    @property
    def fine_lsb(self) -> float:
        return self.coarse_lsb * self.fine_span_lsb / (1 << self.fine_bits)

    def to_codes(self, value: float) -> tuple[int, int]:
        """Nearest ``(coarse, fine)`` codes: coarse rounds, fine takes the remainder."""
        _check(value, "current source DAC")
        coarse = _clamp_code(int(round(value / self.coarse_lsb)), self.coarse_bits)
        fine = _clamp_code(int(round((value - coarse * self.coarse_lsb) / self.fine_lsb)), self.fine_bits)
        return coarse, fine

    def to_value(self, coarse: int, fine: int) -> float:
        return coarse * self.coarse_lsb + fine * self.fine_lsb
