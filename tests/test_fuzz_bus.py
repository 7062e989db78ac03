"""The bus fuzz campaign (issue 17, build item 9): what it found, as tests of their own (the
campaign itself, over a real broker, follows)."""

from __future__ import annotations

import msgspec
import pytest

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import Reply
from kibble.services.registry import service_class
from kibble.services.runtime import load_config
from kibble.services.up import stack_config

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


async def test_a_refused_newest_frame_falls_back_to_the_one_before_it(tmp_path):
    """Found by the campaign (a lockstep miss, 1 s of stall): in a receive batch of the
    current source holding the servo's setpoint for frame k and then a setpoint it refuses
    (one lacking a current, or beyond the limits), the refused one was acted on as the
    newest and the good one skipped, so frame k went unanswered. A frame its handler refuses
    now falls back like one that does not decode."""
    from kibble.bus_schema.codec import encode
    from kibble.bus_schema.messages import Setpoint

    cs = service_class("current_source")(load_config(
        "current_source", stack_config("nist4"), instrument="fz-unit", state_dir=tmp_path,
        restore=False, clock="lockstep"))
    cs.subscriptions()                         # as on connecting: the conflated frame topics
    topic = cs.topics.setpoint("servo")
    good = Setpoint(frame=7, values={"main_coil_current_a": 1e-3, "counter_mass_current_a": 0.0,
                                     "main_coil_connected": 1.0})
    for refused in ({"main_coil_current_a": 1e-3}, {"main_coil_current_a": 1.0, "counter_mass_current_a": 0.0}):
        cs.last_input_frame = -1
        rejected = cs.counters["rejected"]
        cs.batch_begin()
        cs.message(topic, encode(good))
        cs.message(topic, encode(Setpoint(frame=-1, values=refused)))
        cs.batch_end()
        cs.batch_flushed()
        assert cs.counters["rejected"] == rejected + 1
        assert cs.last_input_frame == 7, refused
