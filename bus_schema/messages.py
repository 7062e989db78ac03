"""Typed bus messages (msgspec Structs, MessagePack on the wire).

Every message carries the header of :class:`Message`: the schema version, a per-publisher
sequence number, a monotonic timestamp (s, the publisher's ``time.monotonic()``) and a UTC
timestamp (s since the Unix epoch). Floats are declared :data:`Finite` so that decoding rejects
NaN and +-inf in C, at no cost; a field that may legitimately be non-finite says so by being a
plain ``float``. Units are SI and are in every field name.

Low-rate messages (status, params, commands, replies, events) are MessagePack maps keyed by
field name. The high-rate frames (``HwSensorFrame``, ``HwActuatorCommand``, ``DaqFrame``,
``Setpoint``) are MessagePack arrays in field-declaration order (header first): half the bytes
and half the codec time of a map, and still readable by any MessagePack library given the field
order, which ``frame_fields(Type)`` returns and the README lists.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal, Union

import msgspec

SCHEMA_VERSION = 1
"""Incremented on every incompatible change; decoders reject other versions."""

_FMAX = sys.float_info.max
Finite = Annotated[float, msgspec.Meta(ge=-_FMAX, le=_FMAX)]
"""A float that must be finite: the bounds reject exactly NaN, +inf and -inf."""
NonNegative = Annotated[float, msgspec.Meta(ge=0.0, le=_FMAX)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Frame = Annotated[int, msgspec.Meta(ge=-1)]
"""Hardware frame index k of the lockstep clock; -1 where no frame applies."""
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
Scalar = Union[bool, int, Finite, str, None]
"""A parameter or command-argument value."""


class Message(msgspec.Struct, kw_only=True, gc=False, forbid_unknown_fields=False):
    """Header common to every message."""

    schema: int = SCHEMA_VERSION
    seq: Count = 0
    t_mono_s: Finite = 0.0
    t_utc_s: Finite = 0.0


# --------------------------------------------------------------------------- hardware I/O


class HwSensorFrame(Message, kw_only=True, array_like=True):
    """One raw sensor frame from the hardware (or the HIL simulator), topic ``hw/sensors``.

    Channel counts depend on the instrument model; unused channel lists are empty.
    """

    frame: Frame
    """Hardware frame index k (lockstep clock) or running count (realtime)."""
    sim_time_s: Finite = 0.0
    """Time of the sample on the hardware clock (s)."""
    fringe_count: list[int] = []
    """Integer fringe counts, one per heterodyne interferometer."""
    fringe_phase_rad: list[Finite] = []
    """Interpolated fringe phase within the count, one per interferometer (rad, [0, 2 pi))."""
    psd_v: list[Finite] = []
    """Position-sensitive-detector / optical-lever voltages (V)."""
    dvm_v: list[Finite] = []
    """Digital voltmeter readings (V), e.g. coil voltage minus the PJVS reference."""
    current_monitor_v: list[Finite] = []
    """Current-monitor voltages across sense resistors (V)."""
    capacitance_f: list[Finite] = []
    """Capacitance-bridge readings (F)."""
    temperature_k: Finite = 293.15
    """Magnet / capacitor temperature (K)."""
    pressure_pa: NonNegative = 0.0
    """Vacuum-chamber pressure (Pa)."""


class HwActuatorCommand(Message, kw_only=True, array_like=True):
    """Raw actuator command for one hardware device, topic ``hw/<device>``.

    In lockstep the simulator advances frame k only after every registered device has answered
    with ``frame == k``.
    """

    frame: Frame
    device: Name
    codes: list[int] = []
    """DAC codes, one per channel (device-specific width and full scale)."""
    relays: list[bool] = []
    """Relay states, one per relay (True = closed / output connected)."""
    hold_frames: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    """How many frames this command answers: ``frame .. frame + hold_frames - 1``. A loop
    decimated by n (damping, theta_z) answers every n-th frame with ``hold_frames = n``; the
    hardware holds the command (zero-order) until the next one."""


# --------------------------------------------------------------------------- service data


class DaqFrame(Message, kw_only=True, array_like=True):
    """The DAQ's frame in SI units, topic ``daq/frame``.

    Coil pose at the optical centre (m, rad), its velocities (m/s, rad/s), counter-mass
    position, electrical readings and environment.
    """

    frame: Frame
    sim_time_s: Finite = 0.0
    coil_x_m: Finite = 0.0
    coil_y_m: Finite = 0.0
    coil_z_m: Finite = 0.0
    coil_theta_x_rad: Finite = 0.0
    coil_theta_y_rad: Finite = 0.0
    coil_theta_z_rad: Finite = 0.0
    coil_vx_m_s: Finite = 0.0
    coil_vy_m_s: Finite = 0.0
    coil_vz_m_s: Finite = 0.0
    coil_wx_rad_s: Finite = 0.0
    coil_wy_rad_s: Finite = 0.0
    coil_wz_rad_s: Finite = 0.0
    counter_mass_z_m: Finite = 0.0
    coil_voltage_v: Finite = 0.0
    main_coil_current_a: Finite = 0.0
    counter_mass_current_a: Finite = 0.0
    capacitance_f: Finite = 0.0
    temperature_k: Finite = 293.15
    pressure_pa: NonNegative = 0.0


class Setpoint(Message, kw_only=True, array_like=True):
    """Commands flowing down the loop, topic ``<service>/setpoint``.

    ``values`` maps a physical quantity, unit in its name, to its value, e.g.
    ``{"main_coil_current_a": 1.2e-2}``.
    """

    frame: Frame
    values: dict[Name, Finite]


# --------------------------------------------------------------------------- runtime


State = Literal["starting", "idle", "armed", "running", "paused", "tripped", "safe", "stopping",
                "offline"]


class Timing(msgspec.Struct, kw_only=True, gc=False):
    """Real-time figures of one daemon over its last heartbeat interval (``Status.timing``).

    Measured by the runtime itself, per receive batch: a batch is everything one read of the
    socket brought; within it only the newest message of each frame topic is acted on (the
    others are *skipped*). CPU time is the thread's (``time.thread_time_ns``) from the read to
    the last publish of the batch; the age of a frame is the receive time minus the
    publisher's monotonic stamp (same host).
    """

    frames: Count = 0
    """Frames acted on in the interval."""
    skipped: Count = 0
    """Frames received in the interval and not acted on (a newer one came in the same batch)."""
    cpu_us_p50: NonNegative = 0.0
    cpu_us_p99: NonNegative = 0.0
    """Thread CPU per acted frame (us), median and 99th percentile."""
    cpu_load: NonNegative = 0.0
    """Process CPU seconds per wall second over the interval (1.0 = one core busy)."""
    age_ms_p50: NonNegative = 0.0
    age_ms_p99: NonNegative = 0.0
    age_ms_max: NonNegative = 0.0
    """Age of the frames acted on (ms)."""
    batch_max: Count = 0
    """Most messages one read brought (a backlog shows here first)."""
    rx_backlog_bytes: Count = 0
    """Bytes waiting in the socket's receive buffer at the heartbeat (queue depth)."""


class Status(Message, kw_only=True):
    """Retained service status, topic ``<service>/status``; the last will sets ``offline``."""

    service: Name
    state: State
    online: bool
    session: Count
    """Increases at every start of the service (a restart is visible)."""
    client_id: str = ""
    heartbeat: Count = 0
    uptime_s: NonNegative = 0.0
    counters: dict[str, Count] = {}
    """frames_in, frames_out, rejected, late, ... since this session started."""
    loop_period_mean_s: NonNegative = 0.0
    loop_period_jitter_s: NonNegative = 0.0
    """Standard deviation of the frame period over the last heartbeat interval (s)."""
    loop_period_max_s: NonNegative = 0.0
    loop_overruns: Count = 0
    timing: Timing = msgspec.field(default_factory=Timing)
    """Real-time figures over the last heartbeat interval."""
    detail: dict[str, Scalar] = {}
    """Service-specific telemetry (mode, armed, trip reason, ...)."""


ParamType = Literal["float", "int", "bool", "str"]


class ParamSpec(msgspec.Struct, kw_only=True, gc=False):
    """One tunable parameter: its type, unit, range, doc and current value."""

    name: Name
    type: ParamType
    value: Scalar
    default: Scalar
    unit: str = ""
    min: Union[Finite, None] = None
    max: Union[Finite, None] = None
    choices: list[str] = []
    doc: str = ""
    read_only: bool = False


class ParamList(Message, kw_only=True):
    """Retained list of a service's parameters, topic ``<service>/params``."""

    service: Name
    params: list[ParamSpec]


class Command(Message, kw_only=True):
    """A request to a service, topic ``<service>/cmd``.

    The correlation id and the reply topic travel in the payload, so request/reply works on
    MQTT 3.1.1 brokers too.
    """

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    command: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
    args: dict[str, Union[Scalar, list[Scalar]]] = {}
    reply_to: str = ""
    client_id: str = ""


class Reply(Message, kw_only=True):
    """The answer to a :class:`Command`, topic ``reply_to`` (default ``<service>/reply``)."""

    id: str
    ok: bool
    service: Name = "unknown"
    result: dict[str, Any] = {}
    error: str = ""


Severity = Literal["info", "warning", "alarm"]


class Event(Message, kw_only=True):
    """An alarm, trip, audit record or rejected message, topic ``<service>/event``."""

    service: Name
    kind: Name
    """e.g. ``audit``, ``rejected``, ``trip``, ``state``."""
    severity: Severity = "info"
    text: str = ""
    data: dict[str, Any] = {}


class SimTruth(Message, kw_only=True, array_like=True):
    """Ground truth of the HIL simulator for one frame, topic ``sim/truth`` (tests and
    benchmarks only; controllers never subscribe to it).

    ``values`` maps a true plant quantity, SI unit in its name (``z_m``, ``i_main_a``,
    ``m_test_kg``, ...), to its value at the end of frame ``frame``; the names per model are
    listed in ``hil_sim/README.md``.
    """

    frame: Frame
    sim_time_s: Finite = 0.0
    model: Name = ""
    values: dict[Name, Finite] = {}


class LoopFrame(Message, kw_only=True, array_like=True):
    """A control loop's monitor for one frame, topic ``<service>/frame`` (e.g. the servo).

    ``values`` maps a loop signal, SI unit in its name (``z_ref_m``, ``error_m``, ``force_n``,
    ``feedforward_n``, ...), to its value at frame ``frame``; ``mode`` is the loop's mode.
    """

    frame: Frame
    mode: Name
    values: dict[Name, Finite] = {}


def frame_fields(msg_type: type[Message]) -> tuple[str, ...]:
    """Field names of a message type in wire order (the array order of the high-rate frames)."""
    return msg_type.__struct_fields__


MESSAGE_TYPES: tuple[type[Message], ...] = (
    HwSensorFrame,
    HwActuatorCommand,
    DaqFrame,
    Setpoint,
    Status,
    ParamList,
    Command,
    Reply,
    Event,
    SimTruth,
    LoopFrame,
)
