"""The one codec: ``encode(msg) -> bytes`` and ``decode(data, Type) -> msg``.

Decoding validates types, ranges (the plausibility limits of the frames' fields among them) and
finiteness and raises :class:`DecodeError` (and nothing else) with a text that names the message
type, the field and what was wrong with it. Whether a payload decodes depends on its bytes
alone: a field typed ``Any`` (``Reply.result``, ``Event.data``) is accepted at most
:data:`MAX_ANY_DEPTH` levels deep, because msgspec counts nesting against Python's recursion
limit, so without a bound of its own the same reply nested ~980 deep decoded at the top of a
stack and was refused 20 calls further down (issue 17, found by ``tests/services/harness/test_fuzz_bus.py``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, TypeVar, cast

import msgspec

from kibble.bus_schema.messages import SCHEMA_VERSION, Limits, Message, field_limits

M = TypeVar("M", bound=Message)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, "msgspec.msgpack.Decoder | _BoundedDecoder"] = {}
MAX_ANY_DEPTH = 32
"""Deepest nesting of lists and maps accepted in a field typed ``Any``, counted from the field
(a reply's ``result`` of ``{"params": [{...}]}`` is 3 deep)."""
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


def _admits_any(t: msgspec.inspect.Type) -> bool:
    if isinstance(t, msgspec.inspect.AnyType):
        return True
    if isinstance(t, msgspec.inspect.UnionType):
        return any(_admits_any(x) for x in t.types)
    if isinstance(t, msgspec.inspect.DictType):
        return _admits_any(t.key_type) or _admits_any(t.value_type)
    if isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.SetType,
                      msgspec.inspect.FrozenSetType, msgspec.inspect.VarTupleType)):
        return _admits_any(t.item_type)
    if isinstance(t, msgspec.inspect.TupleType):
        return any(_admits_any(x) for x in t.item_types)
    return False


class _BoundedDecoder:
    """The decoder of a type with fields typed ``Any``: msgspec's, then the nesting bound."""

    __slots__ = ("_dec", "_fields")

    def __init__(self, msg_type: type, fields: tuple[str, ...]) -> None:
        self._dec: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(msg_type)
        self._fields = fields

    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        msg = self._dec.decode(data)
        for name in self._fields:
            if _too_deep(getattr(msg, name), MAX_ANY_DEPTH):
                raise msgspec.ValidationError(f"Nested deeper than {MAX_ANY_DEPTH} levels - at `$.{name}`")
        return msg


def _new_decoder(msg_type: type[M]) -> "msgspec.msgpack.Decoder | _BoundedDecoder":
    info = msgspec.inspect.type_info(msg_type)
    deep = tuple(f.name for f in getattr(info, "fields", ()) if _admits_any(f.type))
    dec = _decoders[msg_type] = (_BoundedDecoder(msg_type, deep) if deep
                                 else msgspec.msgpack.Decoder(msg_type))
    return dec


def _too_deep(value: object, limit: int) -> bool:
    """Whether lists and maps nest deeper than ``limit`` in ``value`` (iterative: no recursion)."""
    stack = [(value, 0)]
    children: Iterable[Any]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _name_array_fields(text: str, msg_type: type[Message]) -> str:
    """Rewrite the ``$[i]`` path of an array-encoded frame as ``$.field_name``."""
    head, sep, path = text.rpartition(" - at `")
    if not sep:
        return text
    fields = msg_type.__struct_fields__
    match = _TOP_INDEX.match(path)
    if match and int(match.group(1)) < len(fields):
        path = f"$.{fields[int(match.group(1))]}" + path[match.end():]
    return f"{head} - at `{path}"


def _beyond_limits(text: str, data: bytes | bytearray | memoryview, msg_type: type[Message]) -> str | None:
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
    return cast(M, msg)  # _decoders[msg_type] decodes to msg_type: a lookup mypy cannot follow
