"""The one codec: ``encode(msg) -> bytes`` and ``decode(data, Type) -> msg``.

Decoding validates types, ranges (the plausibility limits of the frames' fields among them) and
finiteness and raises :class:`DecodeError` (and nothing else) with a text that names the message
type, the field and what was wrong with it.
"""

from __future__ import annotations

import math
import re
from typing import TypeVar

import msgspec

from kibble.bus_schema.messages import SCHEMA_VERSION, Limits, Message, field_limits

M = TypeVar("M", bound=Message)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}
_NONFINITE = re.compile(r"Expected `float` [<>]= [-]?1\.7976931348623157e\+308")
_TOP_INDEX = re.compile(r"^\$\[(\d+)\]")
_BOUND = re.compile(r"^Expected `(?:float|int)` [<>]= \S+ - at `\$\[(\d+)\](?:\[(\d+)\])?`$")
"""A bound violated in an array-encoded frame, at a field or at one element of a list field."""
_limits: dict[type, dict[str, Limits]] = {}


class DecodeError(ValueError):
    """A payload that is not a valid message of the expected type.

    ``str(err)`` says which type, which field (``$.field`` path) and why, e.g.
    ``DaqFrame: $.coil_z_m must be a finite number (got NaN or inf)``.
    """

    def __init__(self, type_name: str, reason: str) -> None:
        super().__init__(f"{type_name}: {reason}")
        self.type_name = type_name
        self.reason = reason


def encode(msg: Message) -> bytes:
    """Serialize a message to MessagePack bytes (a map keyed by field name)."""
    return _encoder.encode(msg)


def _new_decoder(msg_type: type[M]) -> msgspec.msgpack.Decoder:
    dec = _decoders[msg_type] = msgspec.msgpack.Decoder(msg_type)
    return dec


def _name_array_fields(text: str, msg_type: type) -> str:
    """Rewrite the ``$[i]`` path of an array-encoded frame as ``$.field_name``."""
    head, sep, path = text.rpartition(" - at `")
    if not sep:
        return text
    fields = msg_type.__struct_fields__
    match = _TOP_INDEX.match(path)
    if match and int(match.group(1)) < len(fields):
        path = f"$.{fields[int(match.group(1))]}" + path[match.end():]
    return f"{head} - at `{path}"


def _beyond_limits(text: str, data: bytes | bytearray | memoryview, msg_type: type) -> str | None:
    """The rejection text for a value beyond a field's plausibility limits (or None if ``text``
    is about something else): the field, the value and the limits with their unit."""
    match = _BOUND.match(text)
    if match is None:
        return None
    fields = msg_type.__struct_fields__
    i = int(match.group(1))
    lim = _limits.get(msg_type)
    if lim is None:
        lim = _limits[msg_type] = field_limits(msg_type)
    if i >= len(fields) or fields[i] not in lim:
        return None
    name, (lo, hi, unit, _) = fields[i], lim[fields[i]]
    value = msgspec.msgpack.decode(data)[i]  # the error path only: the payload decoded, untyped
    if match.group(2) is not None:
        name, value = f"{name}[{match.group(2)}]", value[int(match.group(2))]
    if isinstance(value, float) and not math.isfinite(value):
        return f"$.{name} must be a finite number (got {value})"
    return (f"$.{name} is {_number(value)} {unit}, beyond its plausibility limits "
            f"[{_number(lo)}, {_number(hi)}] {unit}")


def _number(x: float) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def decode(data: bytes | bytearray | memoryview, msg_type: type[M]) -> M:
    """Decode and validate ``data`` as ``msg_type``.

    Raises :class:`DecodeError` for anything that is not a valid message of that type and
    schema version: truncated or random bytes, a wrong field type, a value out of range, a
    non-finite float in a :data:`~kibble.bus_schema.messages.Finite` field, an unknown schema.
    """
    dec = _decoders.get(msg_type)  # inlined lookup: this runs for every frame at 1 kHz
    if dec is None:
        dec = _new_decoder(msg_type)
    try:
        msg = dec.decode(data)
    except msgspec.ValidationError as exc:
        beyond = _beyond_limits(str(exc), data, msg_type)
        if beyond is not None:
            raise DecodeError(msg_type.__name__, beyond) from None
        text = _name_array_fields(str(exc), msg_type)
        if _NONFINITE.search(text):
            where = text.rsplit(" - at ", 1)[-1] if " - at " in text else "a field"
            text = f"{where} must be a finite number (got NaN or inf)"
        raise DecodeError(msg_type.__name__, text) from None
    except (msgspec.DecodeError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise DecodeError(msg_type.__name__, f"not valid MessagePack: {exc}") from None
    if msg.schema != SCHEMA_VERSION:
        raise DecodeError(
            msg_type.__name__,
            f"$.schema is {msg.schema}, this software speaks schema {SCHEMA_VERSION}",
        )
    return msg
