"""The bus fuzz campaign (issue 17, build item 9): what it found, as tests of their own (the
campaign itself, over a real broker, follows)."""

from __future__ import annotations

import msgspec
import pytest

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import Reply

pytestmark = [pytest.mark.asyncio]


# ============================================================================ the campaign's findings, alone


async def test_codec_verdict_does_not_depend_on_the_callers_stack():
    """Found by the campaign: msgspec counts nesting against Python's recursion limit, so a
    reply whose ``result`` nested ~980 deep decoded at the top of a stack and was refused 20
    calls further down (the sequencer took what the test's codec verdict refused). The codec
    bounds ``Any`` fields itself now: the verdict is the bytes'."""
    from kibble.bus_schema.codec import MAX_ANY_DEPTH
    from kibble.bus_schema.messages import Event

    def deeper(n, f):
        return f() if n == 0 else deeper(n - 1, f)

    def decodes_at(data, msg_type, extra):
        try:
            deeper(extra, lambda: decode(data, msg_type))
            return True
        except DecodeError:
            return False

    head = {"reply": (Reply, {"schema": 1, "id": "x", "ok": True}, "result"),
            "event": (Event, {"schema": 1, "service": "s", "kind": "k"}, "data")}
    for msg_type, fields, where in head.values():
        for depth in (1, MAX_ANY_DEPTH, MAX_ANY_DEPTH + 1, 500, 960, 980, 990, 999, 1000, 10_000):
            data = msgspec.msgpack.encode({**fields, where: {}})[:-1] + b"\x81\xa1k" * depth + b"\xc0"
            verdicts = {decodes_at(data, msg_type, extra) for extra in (0, 20, 100, 400)}
            assert verdicts == {depth <= MAX_ANY_DEPTH}, (msg_type.__name__, depth, verdicts)
