"""Seeded payload generators for the bus fuzz campaign (``tests/services/harness/test_fuzz_bus.py``, issue 17
item 9).

The campaign's topics are not listed here: :func:`targets_of` reads them from the daemons and
the simulator themselves (each node's :meth:`~kibble.bus_schema.node.BusNode.subscriptions`,
plus its ``cmd`` topic, as :meth:`BusNode._serve` subscribes them), with the message type each
subscriber decodes them as, so a new subscription is fuzzed without anyone listing it; a
subscription of a message type that no family here knows how to build fails loudly.

:class:`Campaign` turns one ``random.Random(seed)`` into payloads, per topic and family:

``random_bytes``  random byte strings (log-uniform lengths, 0 .. 4 kB) and a few special ones
``random_msgpack`` random MessagePack trees (every type, NaN, ints at the 64-bit edges)
``truncated``     a valid encoding cut short
``wrong_type``    one field at a time replaced by a value of another type
``non_finite``    NaN, +inf, -inf in each float field, list element and dict value
``extreme``       64-bit integer edges, +-1e308, the largest float, negative counts, other
                  schema versions; in setpoints, currents and voltages far beyond the limits
``oversize``      256 kB strings and lists, 10 000-key maps, 1 MB of random bytes
``deep_nesting``  arrays and maps nested 64 .. 100 000 deep in a field
``reply_to``      (commands) real commands whose ``reply_to`` is a wildcard, another tree,
                  another instrument, a setpoint, ``hw/`` or a status topic
``bad_args``      (commands) unknown commands and parameters, out-of-range values, NaN

The main campaign is *hostile but harmless by construction*: every payload is one that no
subscriber may act on, so any effect it has on the stack is a defect. A payload that decodes
is kept only if every subscriber must refuse it without a change of state
(:meth:`Campaign.verdict`): a sensor frame tagged -1 with too few channels, a setpoint that
lacks a current or asks beyond the limits, a device command naming another device, a command
with an unknown name, a bad parameter value or a refused ``reply_to``. A well-formed message
with plausible values on a data topic is a spoof, not fuzz (nothing ties a topic to its
publisher on the bus; the deploy ACL does), and is dropped (counted in ``dropped``).

The families that exercise open findings of issue 17 (future and past frame tags, implausible
values, relay fields) are built from live traffic by :meth:`Campaign.frame_tags`,
:meth:`Campaign.implausible` and :meth:`Campaign.relays`.
"""

from __future__ import annotations

import math
import random
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import msgspec

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import (
    Command, DaqFrame, HwActuatorCommand, HwSensorFrame, Message, Reply, Setpoint,
)
from kibble.bus_schema.node import BusNode
from kibble.bus_schema.topics import topic_matches

FMAX = sys.float_info.max
INT64_MIN, INT64_MAX, UINT64_MAX = -(2 ** 63), 2 ** 63 - 1, 2 ** 64 - 1
OVERSIZE_BYTES = 256 * 1024
"""Oversize strings and lists (mosquitto's default packet limit is 256 MB; deploy/ sets 64 kB)."""
HUGE_BYTES = 1024 * 1024
NESTING_DEPTHS = (64, 500, 900, 940, 960, 970, 980, 990, 995, 999, 1000, 1100, 10_000, 100_000)
"""Python's recursion limit is 1000; msgspec counts its nesting against it, so the depths
around it are where a decoder or a recursive check of the decoded value gives out."""

_pack = msgspec.msgpack.Encoder()


def encode_raw(value: Any) -> bytes:
    """MessagePack of plain Python values (floats stay float64, NaN and inf included)."""
    return _pack.encode(value)


def decodes(data: bytes, msg_type: type[Message]) -> Message | None:
    """The codec's own verdict: the decoded message, or None if it must be rejected."""
    try:
        return decode(data, msg_type)
    except DecodeError:
        return None


# ----------------------------------------------------------------------------- the targets


@dataclass(frozen=True)
class Subscriber:
    """One node that takes a topic: its name, what it decodes the topic as (None: raw bytes),
    and whether a receive batch is conflated to the newest message (then an older bad one may
    be skipped, not rejected)."""

    node: str
    msg_type: type[Message] | None
    conflated: bool


@dataclass(frozen=True)
class Target:
    """One topic of the campaign and everyone who takes it (``pattern``: the subscription,
    which for a wildcard is not the topic published on)."""

    topic: str
    pattern: str
    subscribers: tuple[Subscriber, ...]

    @property
    def msg_type(self) -> type[Message] | None:
        types = {s.msg_type for s in self.subscribers if s.msg_type is not None}
        if len(types) > 1:
            raise AssertionError(f"{self.topic} is decoded as {sorted(t.__name__ for t in types)}")
        return types.pop() if types else None

    @property
    def owner(self) -> str:
        """The one subscriber that decodes a ``cmd`` or ``hw/<device>`` topic."""
        (node,) = {s.node for s in self.subscribers if s.msg_type is not None}
        return node


def node_subscriptions(node: BusNode) -> list[tuple[str, type[Message] | None, bool]]:
    """``(pattern, message type or None, conflated)`` of everything ``node`` subscribes to:
    its :meth:`~BusNode.subscriptions` and its ``cmd`` topic (added as the node adds it)."""
    typed = getattr(node, "_subs", {})            # a Service: topic -> (type, handler, is_frame)
    newest = getattr(node, "_newest_only", set())
    devices = getattr(node, "_device_topics", {})  # the simulator: hw/<device> -> spec
    # the cmd topic and a Service's typed topics are decoded as such even where one of its
    # wildcard subscriptions is what brings them (the recorder's kb/<instrument>/#)
    out: list[tuple[str, type[Message] | None, bool]] = [(node.topics.cmd(node.name), Command, False)]
    out += [(topic, entry[0], topic in newest) for topic, entry in typed.items()]
    out += [(topic, HwActuatorCommand, False) for topic in devices]  # lockstep: each, in order
    for pattern, _ in node.subscriptions():
        if any(pattern == known for known, _, _ in out):
            continue
        if "+" not in pattern and "#" not in pattern:
            raise AssertionError(f"{node.name} subscribes to {pattern} with no known message type")
        out.append((pattern, None, False))
    return out


def targets_of(nodes: Iterable[BusNode]) -> list[Target]:
    """Every topic the nodes subscribe to, with its subscribers. A wildcard subscription is
    fuzzed on a topic of its own under it (``fuzz`` for each wildcard level) that nobody else
    takes; every node whose pattern matches a target topic is among its subscribers."""
    nodes = list(nodes)
    subs = {node.name: node_subscriptions(node) for node in nodes}
    topics: dict[str, str] = {}
    for entries in subs.values():
        for pattern, _, _ in entries:
            if "+" in pattern or "#" in pattern:
                # a frame nobody else takes, a status of nobody, and a real service's retained
                # parameters (a recorder keeps the newest params and status of every service)
                for leaf in ("fuzz/frame", "fuzz/status", "servo/params"):
                    concrete = "/".join("fuzz" if level == "+" else level for level in pattern.split("/"))
                    topics.setdefault(concrete.replace("#", leaf), pattern)
            else:
                topics.setdefault(pattern, pattern)
    targets = []
    for topic, pattern in sorted(topics.items()):
        found = []
        for name, entries in subs.items():
            exact = [e for e in entries if e[0] == topic]
            wild = [e for e in entries if e[0] != topic and topic_matches(e[0], topic)]
            for _, msg_type, conflated in exact or wild[:1]:
                found.append(Subscriber(name, msg_type, conflated))
        targets.append(Target(topic, pattern, tuple(found)))
    return targets


# ----------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Payload:
    topic: str
    data: bytes
    family: str
    note: str = ""
    rejecters: frozenset[str] = frozenset()
    """Nodes that must reject it (counted in their ``rejected``): the codec's verdict against
    each subscriber's type, plus the documented refusals of a well-formed message."""
    reply_id: str | None = None
    """A command that decodes: the id its one reply must carry."""
    reply_topic: str | None = None
    """Where that reply must go (the node's own reply topic when ``reply_to`` is refused)."""
    refused_reply_to: bool = False
    """A command that decodes with a ``reply_to`` the node must refuse (``replies_refused``)."""


@dataclass
class Verdict:
    """What a decodable payload does: ``harmless`` (every subscriber refuses it unchanged),
    who rejects it, and the reply it must get."""

    harmless: bool
    rejecters: set[str] = field(default_factory=set)
    reply_topic: str | None = None
    refused: bool = False


WRONG = ("text", "", 1.5, -1, 0, True, False, None, [], [1, "a"], {}, {"k": 1}, b"\x00\x01",
         2 ** 63 - 1, -(2 ** 63), 2 ** 64 - 1, 1e308, -1e308, math.nan, math.inf)
"""Values of every MessagePack type, one of which is wrong for any field."""


class Campaign:
    """Payload generators over ``targets`` for the nodes (built, not running) of one stack.

    :param seed: the campaign's seed (printed by the test).
    :param nodes: the stack's nodes by name: their configuration (limits, channel counts,
        devices, parameters, commands) decides which well-formed messages are harmless.
    :param tool_reply: a reply topic of the instrument that the test listens on.
    """

    def __init__(self, seed: int, nodes: dict[str, BusNode], targets: list[Target],
                 tool_reply: str) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.nodes = nodes
        self.targets = targets
        self.tool_reply = tool_reply
        self.instrument = next(iter(nodes.values())).topics.instrument
        self.dropped: dict[str, int] = {}
        """Generated payloads left out because they decode and are not harmless, per family."""
        self._ids = 0

    # ------------------------------------------------------------------ the main campaign

    def main(self) -> list[Payload]:
        """Every family on every target, shuffled (reproducibly); a few thousand payloads."""
        out: list[Payload] = []
        for target in self.targets:
            out.extend(self.for_target(target))
        self.rng.shuffle(out)
        return out

    def for_target(self, target: Target) -> list[Payload]:
        t = target.msg_type
        families: list[tuple[str, Callable[[], Iterable[bytes | tuple[bytes, str]]]]] = [
            ("random_bytes", self.random_bytes), ("random_msgpack", self.random_msgpack)]
        if t is not None:
            base = self.template(target)
            families += [
                ("truncated", lambda: self.truncated(base)),
                ("wrong_type", lambda: self.wrong_type(base)),
                ("non_finite", lambda: self.non_finite(base)),
                ("extreme", lambda: self.extreme(base)),
                ("oversize", lambda: self.oversize(base)),
                ("deep_nesting", lambda: self.deep_nesting(base)),
            ]
            if t is Command:
                families += [("reply_to", lambda: self.reply_tos(target)),
                             ("bad_args", lambda: self.bad_args(target))]
            elif t is Setpoint:
                families += [("refused_setpoints", lambda: self.refused_setpoints(target))]
            elif t is HwActuatorCommand:
                families += [("refused_devices", lambda: self.refused_devices(target))]
        else:
            families += [("oversize", lambda: [self.rng.randbytes(HUGE_BYTES)]),
                         ("deep_nesting", lambda: [b"\x91" * d + b"\xc0" for d in NESTING_DEPTHS])]
        out = []
        for family, make in families:
            for item in make():
                data, note = item if isinstance(item, tuple) else (item, "")
                payload = self.payload(target, data, family, note)
                if payload is None:
                    self.dropped[family] = self.dropped.get(family, 0) + 1
                else:
                    out.append(payload)
        return out

    def payload(self, target: Target, data: bytes, family: str, note: str = "") -> Payload | None:
        """The payload with what its subscribers must do, or None if it decodes and is not
        harmless (a spoof, left out of the main campaign)."""
        rejecters: set[str] = set()
        msg = None
        t = target.msg_type
        if t is not None:
            msg = decodes(data, t)
            if msg is None:
                rejecters = {s.node for s in target.subscribers if s.msg_type is not None}
        if msg is None:
            return Payload(target.topic, data, family, note, frozenset(rejecters))
        verdict = self.verdict(target, msg)
        if not verdict.harmless:
            return None
        reply_id = msg.id if isinstance(msg, Command) else None
        return Payload(target.topic, data, family, note, frozenset(verdict.rejecters), reply_id,
                       verdict.reply_topic, verdict.refused)

    # ------------------------------------------------------------------ harmless or not

    def verdict(self, target: Target, msg: Message) -> Verdict:
        """Whether a message that decodes is refused by every subscriber without a change of
        state, judged from the subscribers' own configuration."""
        v = Verdict(harmless=True)
        for sub in target.subscribers:
            node = self.nodes[sub.node]
            if sub.msg_type is None:
                continue
            if isinstance(msg, Command):
                ok, refused, topic = self._command_verdict(node, msg)
                v.harmless &= ok
                v.refused, v.reply_topic = refused, topic
            elif isinstance(msg, HwSensorFrame):
                check = getattr(node, "_check", None)   # the daq: too few channels is refused
                if check is not None:
                    if msg.frame != -1 or check(msg) is None:
                        v.harmless = False
                    v.rejecters.add(sub.node)
                elif msg.frame != -1:                   # an actuator's frame clock: -1 is no tick
                    v.harmless = False
            elif isinstance(msg, Setpoint):
                if _setpoint_refused(node, msg):
                    v.rejecters.add(sub.node)
                else:
                    v.harmless = False
            elif isinstance(msg, HwActuatorCommand):
                spec = node.devices.get(target.topic.rsplit("/", 1)[-1])
                # another device's name is refused before its tag is read; a command that only
                # fails the device's check still answers the frame it is tagged with
                if msg.device != spec.name or (msg.frame == -1 and spec.check(msg.codes, msg.relays)):
                    v.rejecters.add(sub.node)
                else:
                    v.harmless = False
            elif isinstance(msg, Reply):
                v.harmless &= not msg.id.startswith(node.name)  # never one of its own requests
            else:                                       # a DaqFrame that decodes: a spoof
                v.harmless = False
        return v

    def _command_verdict(self, node: BusNode, cmd: Command) -> tuple[bool, bool, str]:
        """(harmless, reply_to refused, where the reply goes) of a command that decodes."""
        own = node.topics.reply(node.name)
        if cmd.reply_to:
            try:
                node.topics.check_reply_to(cmd.reply_to)
            except ValueError:
                return True, True, own                  # refused before it is run
        where = cmd.reply_to or own
        if cmd.command not in node.commands:
            return True, False, where
        if cmd.command == "param.get":
            return True, False, where
        if cmd.command == "param.set":
            params = getattr(node, "params", None)
            name = cmd.args.get("name")
            if params is None or not isinstance(name, str) or name not in params.specs \
                    or "value" not in cmd.args:
                return True, False, where
            try:
                params.specs[name].validate(cmd.args["value"])
            except ValueError:
                return True, False, where
            return False, False, where
        if node.name == "sim":
            if cmd.command == "stats":
                return cmd.args.get("reset") is not True, False, where
            if cmd.command == "set_temperature":
                t = cmd.args.get("temperature_k")
                return not (isinstance(t, (int, float)) and not isinstance(t, bool)
                            and 173.15 <= t <= 373.15), False, where
        return False, False, where

    # ------------------------------------------------------------------ templates

    def next_id(self) -> str:
        self._ids += 1
        return f"fz-{self.seed}-{self._ids}"

    def template(self, target: Target) -> Message:
        """A message of the target's type that every subscriber refuses (the base of the
        mutating families; a mutation that makes it acceptable is dropped)."""
        t = target.msg_type
        if t is HwSensorFrame:
            return HwSensorFrame(frame=-1, sim_time_s=1.0, fringe_count=[], fringe_phase_rad=[],
                                 psd_v=[0.1], dvm_v=[0.2], current_monitor_v=[0.3, 0.4],
                                 capacitance_f=[1e-12], temperature_k=293.0, pressure_pa=1e-4)
        if t is DaqFrame:
            return DaqFrame(frame=-1, sim_time_s=1.0, coil_z_m=1e-9, pressure_pa=1e-4)
        if t is Setpoint:
            return Setpoint(frame=-1, values={"fuzz_only_a": 0.0})
        if t is HwActuatorCommand:
            return HwActuatorCommand(frame=-1, device="fuzz-device", codes=[1, 2], relays=[True])
        if t is Command:
            return Command(id=self.next_id(), command="fuzz.unknown", args={"a": 1.0},
                           reply_to=self.tool_reply, client_id="fuzz")
        if t is Reply:
            return Reply(id=self.next_id(), ok=True, service="fuzz", result={"a": 1})
        raise AssertionError(f"{target.topic}: no fuzz template for {t.__name__}: add one to tests/fuzz.py")

    def _builtins(self, msg: Message) -> Any:
        """The wire form of ``msg`` as plain values (a list for an array-like frame)."""
        out = msgspec.to_builtins(msg)
        if isinstance(msg, Command):
            out["id"] = self.next_id()
        return out

    def _fields(self, base: Message) -> list[Any]:
        """Where a field sits in the wire form: its index (array-like frames) or its key."""
        wire = msgspec.to_builtins(base)
        return list(range(len(wire))) if isinstance(wire, list) else list(wire)

    # ------------------------------------------------------------------ families

    def random_bytes(self) -> list[bytes]:
        rng = self.rng
        special = [b"", b"\x00", b"\xc1", b"\xc0", b"\x90", b"\x80", b"\xff" * 8, b"\xd4\x01\x00",
                   b"\xc7\xff\x05", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                   b"\xa2\xff\xfe", b"\xcb" + struct.pack(">d", math.nan)]
        return special + [rng.randbytes(int(math.exp(rng.uniform(0, math.log(4096))))) for _ in range(24)]

    def random_msgpack(self) -> list[bytes]:
        return [encode_raw(self._random_value(self.rng.randint(1, 4))) for _ in range(16)]

    def _random_value(self, depth: int) -> Any:
        rng = self.rng
        kind = rng.randrange(9 if depth > 0 else 7)
        if kind == 0:
            return rng.choice([0, -1, 1, INT64_MIN, INT64_MAX, UINT64_MAX, rng.randint(-1000, 1000)])
        if kind == 1:
            return rng.choice([math.nan, math.inf, -math.inf, FMAX, -FMAX, 5e-324, -0.0,
                               rng.uniform(-1e3, 1e3)])
        if kind == 2:
            return rng.choice(["", "x", "kb/#", "\u00e9\u2603", "a" * rng.randint(1, 300)])
        if kind == 3:
            return rng.randbytes(rng.randint(0, 64))
        if kind == 4:
            return rng.choice([True, False])
        if kind in (5, 6):
            return None
        if kind == 7:
            return [self._random_value(depth - 1) for _ in range(rng.randint(0, 20))]
        return {rng.choice(["schema", "frame", "id", "command", "args", "values", "reply_to",
                            "x" * rng.randint(1, 8)]): self._random_value(depth - 1)
                for _ in range(rng.randint(0, 8))}

    def truncated(self, base: Message) -> list[bytes]:
        data = encode_raw(self._builtins(base))
        cuts = sorted(set([0, 1, len(data) - 1] + [self.rng.randrange(len(data)) for _ in range(10)]))
        return [(data[:n], f"{n} of {len(data)} bytes") for n in cuts]

    def _mutated(self, base: Message, where: Any, value: Any) -> bytes:
        wire = self._builtins(base)
        wire[where] = value
        return encode_raw(wire)

    def wrong_type(self, base: Message) -> list[tuple[bytes, str]]:
        out = []
        for where in self._fields(base):
            for value in self.rng.sample(WRONG, 3):
                out.append((self._mutated(base, where, value), f"{where}={value!r}"[:80]))
        return out

    def non_finite(self, base: Message) -> list[tuple[bytes, str]]:
        out = []
        wire = msgspec.to_builtins(base)
        for where in self._fields(base):
            value = wire[where]
            for bad in (math.nan, math.inf, -math.inf):
                if isinstance(value, float):
                    out.append((self._mutated(base, where, bad), f"{where}={bad}"))
                elif isinstance(value, list) and value and isinstance(value[0], float):
                    out.append((self._mutated(base, where, value[:-1] + [bad]), f"{where}[-1]={bad}"))
                elif isinstance(value, dict) and value:
                    key = next(iter(value))
                    out.append((self._mutated(base, where, {**value, key: bad}), f"{where}.{key}={bad}"))
        return out

    def extreme(self, base: Message) -> list[tuple[bytes, str]]:
        out = []
        wire = msgspec.to_builtins(base)
        for where in self._fields(base):
            value = wire[where]
            if isinstance(value, bool):
                continue
            if isinstance(value, int):
                candidates = [-2, INT64_MIN, INT64_MAX, UINT64_MAX]
            elif isinstance(value, float):
                candidates = [FMAX, -FMAX, 1e308, -1e308, 5e-324]
            elif isinstance(value, list) and value and isinstance(value[0], int) and not isinstance(value[0], bool):
                candidates = [[UINT64_MAX] * len(value), [INT64_MIN] * len(value)]
            elif isinstance(value, list) and value and isinstance(value[0], float):
                candidates = [[FMAX] * len(value), [-1e308] * len(value)]
            else:
                continue
            for bad in candidates:
                out.append((self._mutated(base, where, bad), f"{where}={bad!r}"[:80]))
        return out

    def oversize(self, base: Message) -> list[tuple[bytes, str]]:
        rng = self.rng
        wire = msgspec.to_builtins(base)
        out = [(rng.randbytes(HUGE_BYTES), "1 MB of random bytes")]
        strings = [w for w in self._fields(base) if isinstance(wire[w], str)]
        lists = [w for w in self._fields(base) if isinstance(wire[w], list)]
        maps = [w for w in self._fields(base) if isinstance(wire[w], dict)]
        if strings:
            where = rng.choice(strings)
            out.append((self._mutated(base, where, "x" * OVERSIZE_BYTES), f"{where}: 256 kB string"))
        if lists:
            where = rng.choice(lists)
            item = wire[where][0] if wire[where] else 0.0
            out.append((self._mutated(base, where, [item] * (OVERSIZE_BYTES // 9)),
                        f"{where}: {OVERSIZE_BYTES // 9} items"))
        if maps:
            where = rng.choice(maps)
            big = {f"k{i:05d}": float(i) for i in range(10_000)}
            out.append((self._mutated(base, where, big), f"{where}: 10 000 keys"))
        return out

    def deep_nesting(self, base: Message) -> list[tuple[bytes, str]]:
        """A field replaced by nested arrays (or maps, in a map field) ``depth`` deep, built as
        raw bytes (the encoder itself gives out before the decoders do)."""
        wire = msgspec.to_builtins(base)
        fields = self._fields(base)
        out = []
        for depth in NESTING_DEPTHS:
            where = self.rng.choice(fields)
            if isinstance(wire[where], dict) and wire[where]:
                key = next(iter(wire[where]))
                nested = encode_raw({key: None})[:-1]          # fixmap of 1, the key, then...
                inner = (b"\x81\xa1k" * depth) + b"\xc0"
                value = nested + inner
            else:
                value = b"\x91" * depth + (b"\xcb" + struct.pack(">d", math.nan))
            marker = "\u0001fuzz-nested\u0001"
            data = self._mutated(base, where, marker)
            data = data.replace(encode_raw(marker), value, 1)
            out.append((data, f"{where} nested {depth} deep"))
        return out

    # ------------------------------------------------------------------ commands

    BAD_REPLY_TO = ("kb/#", "#", "+", "kb/{inst}/+/reply", "kb/{inst}/#", "outside/tree/x",
                    "kb/other-instrument/tool/reply", "kb/{inst}/hw/main_source",
                    "kb/{inst}/hw/sensors", "kb/{inst}/servo/setpoint", "kb/{inst}/daq/frame",
                    "kb/{inst}/{node}/status", "kb/{inst}/{node}/cmd", "kb/{inst}/tool/reply/deeper",
                    "kb/{inst}/sim/cmd", "$SYS/broker/x", "/", "kb//x/reply", "kb/{inst}/to ol/reply",
                    "kb/{inst}/tool/reply\u0000", "kb/{inst}/" + "y" * 1000 + "/reply")

    def reply_tos(self, target: Target) -> list[tuple[bytes, str]]:
        """Real commands of the node (and a harmless one) with a ``reply_to`` it must refuse:
        a refused command is never run, so even ``disarm`` or ``pause`` must change nothing."""
        node = self.nodes[target.owner]
        names = sorted(node.commands)
        out = []
        for i, pattern in enumerate(self.BAD_REPLY_TO):
            reply_to = pattern.format(inst=self.instrument, node=node.name)
            command = names[i % len(names)] if i % 3 else "param.get"
            args = {"name": "fuzz_nothing"} if command == "param.get" else {}
            cmd = Command(id=self.next_id(), command=command, args=args, reply_to=reply_to,
                          client_id="fuzz")
            out.append((encode_raw(msgspec.to_builtins(cmd)), f"{command} reply_to={reply_to[:40]!r}"))
        return out

    def bad_args(self, target: Target) -> list[tuple[bytes, str]]:
        """Commands that decode and must be refused with a reply: unknown commands, unknown
        parameters, every parameter of the node set to a value it refuses, wrong types; and
        NaN/inf arguments (which do not decode, and are answered with the argument's name)."""
        rng = self.rng
        node = self.nodes[target.owner]
        reply_to = lambda: rng.choice([self.tool_reply, ""])  # noqa: E731
        cmds = [Command(id=self.next_id(), command=c, args=a, reply_to=reply_to(), client_id="fuzz")
                for c, a in (("no.such.command", {}), ("x", {"a": [1, 2, 3]}),
                             ("param.get", {"name": "no_such_param"}), ("param.get", {}),
                             ("param.get", {"name": 17}),
                             ("param.set", {"name": "no_such_param", "value": 1.0}),
                             ("param.set", {"value": 1.0}), ("param.set", {"name": ["a", "b"]}))]
        params = getattr(node, "params", None)
        for name, spec in (params.specs.items() if params is not None else ()):
            for value in rng.sample(_refused_values(spec), 2):
                cmds.append(Command(id=self.next_id(), command="param.set",
                                    args={"name": name, "value": value}, reply_to=reply_to(),
                                    client_id="fuzz"))
        if node.name == "sim":
            for args in ({"temperature_k": 1e308}, {"temperature_k": -1e308}, {"temperature_k": "hot"},
                         {"temperature_k": True}, {"temperature_k": [295.0]}, {"temperature_k": 5e-324}):
                cmds.append(Command(id=self.next_id(), command="set_temperature", args=args,
                                    reply_to=reply_to(), client_id="fuzz"))
            for args in ({"reset": "yes"}, {"reset": 1e308}, {"bogus": 1}):
                cmds.append(Command(id=self.next_id(), command="stats", args=args,
                                    reply_to=reply_to(), client_id="fuzz"))
        out = [(encode_raw(msgspec.to_builtins(c)), f"{c.command} {c.args}"[:80]) for c in cmds]
        for bad in (math.nan, math.inf, -math.inf, [1.0, math.nan]):
            wire = msgspec.to_builtins(Command(id=self.next_id(), command="param.set",
                                               args={"name": "kp", "value": 0.0},
                                               reply_to=self.tool_reply, client_id="fuzz"))
            wire["args"]["value"] = bad
            out.append((encode_raw(wire), f"param.set value={bad}"))
        return out

    # ------------------------------------------------------------------ setpoints, devices

    def refused_setpoints(self, target: Target) -> list[tuple[bytes, str]]:
        """Setpoints every subscriber must refuse unchanged: a current or voltage missing or far
        beyond its limit, a switch carried as a number among the values, or a switch that is
        not a boolean (fails decoding; the switch itself left as it is: on, the force-mode
        state)."""
        out = []
        for node_name in sorted({s.node for s in target.subscribers if s.msg_type is not None}):
            for values, switches in _refused_setpoint_values(self.nodes[node_name]):
                sp = Setpoint(frame=-1, values=values, switches=switches)
                out.append((encode_raw(msgspec.to_builtins(sp)), f"{values} {switches}"[:80]))
        return out

    def refused_devices(self, target: Target) -> list[tuple[bytes, str]]:
        """Device commands the simulator must refuse (tagged -1, so no lockstep answer):
        another device's name, too many or too few codes or relays, codes beyond the DAC."""
        sim = self.nodes[target.owner]
        spec = sim.devices[target.topic.rsplit("/", 1)[-1]]
        n, r = len(spec.codes), len(spec.relays)
        zero = [0] * n
        cases = [("main_source" if spec.name != "main_source" else "damping", zero, [True] * r),
                 (spec.name, zero + [0], [True] * r), (spec.name, zero, [True] * (r + 1)),
                 (spec.name, [0] * 64, [True] * r)]
        if n:
            cases.append((spec.name, zero[:-1], [True] * r))
            for bits_name, bits in spec.codes:
                for code in (1 << (bits - 1), -(1 << (bits - 1)) - 1, INT64_MAX, INT64_MIN, UINT64_MAX):
                    codes = list(zero)
                    codes[[c for c, _ in spec.codes].index(bits_name)] = code
                    cases.append((spec.name, codes, [True] * r))
        if r:
            cases.append((spec.name, zero, []))
        out = []
        for device, codes, relays in cases:
            msg = HwActuatorCommand(frame=-1, device=device, codes=codes, relays=relays)
            out.append((encode_raw(msgspec.to_builtins(msg)), f"{device} codes={codes[:3]} relays={relays}"[:80]))
        return out

    # ------------------------------------------------------------------ live families (findings)

    def frame_tags(self, latest: dict[str, bytes], frame: int) -> list[Payload]:
        """Copies of the newest real ``hw/sensors``, ``daq/frame``, setpoint and device commands,
        tagged in the future (``frame`` + 1e9, + 1000, 2^63 - 1, 2^64 - 1) and in the past
        (``frame`` - 100, 0) of the simulator's ``frame`` (issue 17 findings 1-3)."""
        tags = [frame + 10 ** 9, INT64_MAX, UINT64_MAX, max(0, frame - 100), 0, frame + 1000]
        return self._live(latest, lambda msg, i: {"frame": tags[i % len(tags)]}, len(tags), "frame_tags")

    def implausible(self, latest: dict[str, bytes], frame: int) -> list[Payload]:
        """Copies of the newest real sensor and DAQ frames with values no hardware produces
        (issue 17 finding 8): positions beyond the stops, huge velocities, pressures, counts."""
        daq = [{"coil_z_m": 1.0}, {"coil_z_m": -1.0}, {"coil_z_m": 1e300}, {"coil_vz_m_per_s": 1e300},
               {"coil_x_m": 1e300}, {"coil_theta_z_rad": 1e300}, {"pressure_pa": 1e308},
               {"main_coil_current_a": 1e300}, {"temperature_k": 1e308}]
        hw = [{"psd_v": "x1e300"}, {"fringe_count": "+2**40"}, {"pressure_pa": 1e308},
              {"temperature_k": 1e308}, {"current_monitor_v": "x1e300"}]

        def change(msg: Message, i: int) -> dict[str, Any]:
            table = daq if isinstance(msg, DaqFrame) else hw
            out = {}
            for key, value in table[i % len(table)].items():
                if value == "x1e300":
                    out[key] = [1e300] * len(getattr(msg, key))
                elif value == "+2**40":
                    out[key] = [c + 2 ** 40 for c in getattr(msg, key)]
                else:
                    out[key] = value
            return out
        return self._live({k: v for k, v in latest.items() if k.endswith(("/hw/sensors", "/daq/frame"))},
                          change, max(len(daq), len(hw)), "implausible")

    def relays(self, latest: dict[str, bytes], frame: int) -> list[Payload]:
        """Copies of the newest real setpoint with the switch flipped (``main_coil_connected``
        or ``hv_to_main`` off), the rest as the servo sent it, and with the currents or voltage
        far beyond the limits as well (a refused setpoint must not flip the switch either;
        issue 17 finding 7)."""
        def change(msg: Message, i: int) -> dict[str, Any]:
            values = dict(msg.values)
            if i % 2:
                for key in ("main_coil_current_a", "counter_mass_current_a", "hv_voltage_v"):
                    if key in values:
                        values[key] = 1e308
            return {"values": values, "switches": {key: False for key in msg.switches}}
        return self._live({k: v for k, v in latest.items() if k.endswith("/setpoint")}, change, 2,
                          "relays", repeat=10)

    def _live(self, latest: dict[str, bytes], change: Callable[[Message, int], dict[str, Any]],
              n: int, family: str, repeat: int = 1) -> list[Payload]:
        by_topic = {t.topic: t for t in self.targets}
        out = []
        for topic, data in sorted(latest.items()):
            target = by_topic.get(topic)
            if target is None or target.msg_type is None:
                continue
            msg = decode(data, target.msg_type)
            for _ in range(repeat):
                for i in range(n):
                    fields = change(msg, i)
                    new = msgspec.structs.replace(msg, **fields)
                    out.append(Payload(topic, encode_raw(msgspec.to_builtins(new)), family,
                                       f"{fields}"[:80]))
        return out


def _refused_values(spec: Any) -> list[Any]:
    """Values a parameter must refuse (type, range, choices, finiteness)."""
    if spec.type is bool:
        return ["maybe", 2, 1.5, None, [True]]
    if spec.type is str:
        return [1.0, "\u0000" * 3, "x" * 300, None, ["+"]]
    values: list[Any] = ["abc", True, None, [1.0], "nan", "inf", "1e309"]
    if spec.max is not None:
        values += [1e308, FMAX, spec.max * 2 + 1]
    if spec.min is not None:
        values += [-1e308, -FMAX]
    if spec.type is int:
        values += [1.5]
    return values


NOT_A_SWITCH: tuple[Any, ...] = (0.5, 2.0, -1.0, 1e308, 5e-324, 0, 1, 0.0, 1.0, "true", None)
"""Switch states that are not booleans: a setpoint carrying one fails decoding."""


def _refused_setpoint_values(node: BusNode) -> list[tuple[dict[str, float], dict[str, Any]]]:
    """(values, switches) of setpoints ``node`` must refuse."""
    s = getattr(node, "settings", None)
    if hasattr(s, "main_limit_a") and hasattr(node, "main_dac"):      # current_source
        far = [1e308, -1e308, FMAX, 10 * s.main_limit_a]
        zero = {"main_coil_current_a": 0.0, "counter_mass_current_a": 0.0}
        out = [({"counter_mass_current_a": 0.0}, {}), ({"main_coil_current_a": 0.0}, {}), ({}, {})]
        out += [(zero, {"main_coil_connected": v}) for v in NOT_A_SWITCH]
        out += [(zero | {"main_coil_connected": v}, {}) for v in (0.0, 1.0)]
        out += [({"main_coil_current_a": v, "counter_mass_current_a": 0.0}, {"main_coil_connected": True})
                for v in far]
        out += [({"main_coil_current_a": 0.0, "counter_mass_current_a": v}, {}) for v in far]
        out += [({f"k{i:04d}": 0.0 for i in range(5000)} | {"main_coil_current_a": 1e308,
                                                             "counter_mass_current_a": 0.0}, {})]
        return out
    if hasattr(s, "travel_limit_m"):                                   # hv_source
        far = [1e308, -1e308, FMAX, 10 * s.limit_v]
        out = [({"z_ref_m": 0.0}, {}), ({}, {}), ({}, {"hv_to_main": True})]
        out += [({"hv_voltage_v": 0.0}, {"hv_to_main": v}) for v in NOT_A_SWITCH]
        out += [({"hv_voltage_v": 0.0, "hv_to_main": v}, {}) for v in (0.0, 1.0)]
        out += [({"hv_voltage_v": 0.0, "z_ref_m": v}, {}) for v in (1.0, -1.0, 1e308, 2 * s.travel_limit_m)]
        out += [({"hv_voltage_v": v}, {"hv_to_main": True}) for v in far]
        return out
    raise AssertionError(f"{node.name}: no refused setpoints known: add them to tests/fuzz.py")


def _setpoint_refused(node: BusNode, sp: Setpoint) -> bool:
    """Whether ``node`` refuses ``sp`` before any change of state (judged from its settings)."""
    s = node.settings
    v = sp.values
    if hasattr(node, "main_dac"):                                     # current_source
        currents = ("main_coil_current_a", "counter_mass_current_a")
        if any(k not in v for k in currents):
            return True
        if "main_coil_connected" in v:
            return True                                                 # a switch as a value
        if sp.switches.get("main_coil_connected") is False:
            return False                                                # flips the switch
        return abs(v[currents[0]]) > s.main_limit_a or abs(v[currents[1]]) > s.cm_limit_a
    if hasattr(s, "travel_limit_m"):                                   # hv_source
        if "hv_voltage_v" not in v:
            return True
        if "hv_to_main" in v:
            return True                                                 # a switch as a value
        z_ref = v.get("z_ref_m")
        if z_ref is not None and not abs(z_ref) <= s.travel_limit_m:
            return True
        if sp.switches.get("hv_to_main") is False or z_ref is not None:
            return False
        return abs(v["hv_voltage_v"]) > s.limit_v
    return False
