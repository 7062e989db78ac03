"""The MQTT topic tree (docs/architecture.md section 4), instrument id first.

::

    kb/<instrument>/hw/<device>             raw hardware I/O (simulator or real drivers)
    kb/<instrument>/<service>/frame         a service's periodic output          QoS 0
    kb/<instrument>/<service>/setpoint      commands flowing down the loop       QoS 0
    kb/<instrument>/<service>/status        retained, birth/death via last will  QoS 1
    kb/<instrument>/<service>/params        retained, every tunable parameter    QoS 1
    kb/<instrument>/<service>/cmd           requests                             QoS 1
    kb/<instrument>/<service>/reply         replies, matched by correlation id   QoS 1
    kb/<instrument>/<service>/event         alarms, trips, rejected messages     QoS 1
    kb/<instrument>/sim/<leaf>              simulator control and ground truth
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kibble.bus_schema.messages import (
    Command, DaqFrame, Event, HwActuatorCommand, HwSensorFrame, LoopFrame, Message, ParamList,
    Reply, Setpoint, SimTruth, Status,
)

ROOT = "kb"
SERVICE_LEAVES = ("frame", "setpoint", "status", "params", "cmd", "reply", "event")
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid topic level (letters, digits, ``_`` and ``-``).

    Raises ``ValueError`` naming ``kind`` otherwise: wildcards, ``/`` and empty levels would
    silently change what a topic matches.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid {kind} {name!r}: use 1-64 letters, digits, '_' or '-' "
            "(no '/', '+', '#' or spaces)"
        )
    return name


@dataclass(frozen=True)
class Topics:
    """Topic builder for one instrument.

    >>> t = Topics("nist4")
    >>> t.service("servo", "setpoint")
    'kb/nist4/servo/setpoint'
    >>> t.hw("main_coil_dac")
    'kb/nist4/hw/main_coil_dac'
    """

    instrument: str

    def __post_init__(self) -> None:
        check_name("instrument id", self.instrument)

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.instrument}"

    def service(self, service: str, leaf: str) -> str:
        check_name("service name", service)
        if leaf not in SERVICE_LEAVES:
            raise ValueError(f"unknown service topic leaf {leaf!r}; one of {SERVICE_LEAVES}")
        return f"{self.prefix}/{service}/{leaf}"

    def frame(self, service: str) -> str:
        return self.service(service, "frame")

    def setpoint(self, service: str) -> str:
        return self.service(service, "setpoint")

    def status(self, service: str) -> str:
        return self.service(service, "status")

    def params(self, service: str) -> str:
        return self.service(service, "params")

    def cmd(self, service: str) -> str:
        return self.service(service, "cmd")

    def reply(self, service: str) -> str:
        return self.service(service, "reply")

    def event(self, service: str) -> str:
        return self.service(service, "event")

    def hw(self, device: str) -> str:
        return f"{self.prefix}/hw/{check_name('hardware device', device)}"

    def sim(self, leaf: str) -> str:
        return f"{self.prefix}/sim/{check_name('simulator topic', leaf)}"

    def all_of(self, leaf: str) -> str:
        """Subscription pattern for one leaf of every service, e.g. every ``status``."""
        if leaf not in SERVICE_LEAVES:
            raise ValueError(f"unknown service topic leaf {leaf!r}; one of {SERVICE_LEAVES}")
        return f"{self.prefix}/+/{leaf}"

    def check_reply_to(self, topic: str) -> str:
        """Return ``topic`` if a node may publish a reply there: ``kb/<instrument>/<name>/reply``
        of this instrument, ``<name>`` a valid level (no wildcard). Nothing subscribes to a
        ``reply`` topic as control input, so a caller cannot make a node write a setpoint, a
        hardware command, a status or another instrument's tree. ``ValueError`` says why not."""
        parts = topic.split("/") if isinstance(topic, str) else []
        if len(parts) != 4 or parts[0] != ROOT or parts[1] != self.instrument or parts[3] != "reply" \
                or not _NAME.match(parts[2]):
            raise ValueError(f"reply_to {str(topic)[:200]!r} is not a reply topic of this "
                             f"instrument ({self.prefix}/<name>/reply, no wildcards)")
        return topic

    def parse(self, topic: str) -> tuple[str, str]:
        """Split ``kb/<instrument>/<a>/<b>`` into ``(a, b)``; ``ValueError`` if not ours."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != ROOT or parts[1] != self.instrument:
            raise ValueError(f"topic {topic!r} is not under {self.prefix}/<x>/<y>")
        return parts[2], parts[3]


_LEAF_TYPES: dict[str, type[Message]] = {
    "status": Status, "params": ParamList, "cmd": Command, "reply": Reply, "event": Event,
    "setpoint": Setpoint, "frame": LoopFrame}


def message_type_for(topic: str) -> type[Message] | None:
    """The message type published on ``kb/<instrument>/<a>/<b>`` (None: not a typed message):
    the tree above, in one place (the recorder's export, ``kibble watch``)."""
    parts = topic.split("/")
    if len(parts) != 4:
        return None
    a, b = parts[2], parts[3]
    if a == "hw":
        return HwSensorFrame if b == "sensors" else HwActuatorCommand
    if a == "daq" and b == "frame":
        return DaqFrame
    if a == "sim" and b in ("truth", "control"):
        return SimTruth if b == "truth" else Command
    return _LEAF_TYPES.get(b)  # the simulator's node too: sim/status, sim/params, sim/event, ...


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT wildcard match: ``+`` is one level, a final ``#`` the parent and every level below."""
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)
