"""Typed bus messages (msgspec Structs, MessagePack on the wire).

Every message carries the header of :class:`Message`: the schema version, a per-publisher
sequence number, a monotonic timestamp (s, the publisher's ``time.monotonic()``) and a UTC
timestamp (s since the Unix epoch). Floats are declared :data:`Finite` so that decoding rejects
NaN and +-inf in C, at no cost; a field that may legitimately be non-finite says so by being a
plain ``float``. Units are SI and are in every field name. Integers are bounded too: counters
by :data:`COUNTER_MAX` (the wire's int64), frame tags by :data:`FRAME_MAX`.

The fields of the hardware and DAQ frames carry *plausibility limits* as data
(:func:`limits`: bounds, unit and where they come from, ophyd-async style): a reading beyond
what the instruments can produce (positions beyond the stops, velocities, currents and
voltages beyond the hardware) fails decoding like a malformed message, in C at no cost per
frame, and is dropped, counted and reported by whoever receives it (a missing frame; several
in a row are stale input). :func:`field_limits` lists them.

Low-rate messages (status, params, commands, replies, events) are MessagePack maps keyed by
field name. The high-rate frames (``HwSensorFrame``, ``HwActuatorCommand``, ``DaqFrame``,
``Setpoint``) are MessagePack arrays in field-declaration order (header first): half the bytes
and half the codec time of a map, and still readable by any MessagePack library given the field
order, which ``frame_fields(Type)`` returns and the README lists.
"""

from __future__ import annotations

import math
import sys
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import msgspec

SCHEMA_VERSION = 1
"""Incremented on every incompatible change; decoders reject other versions."""

COUNTER_MAX = (1 << 63) - 1
"""Counters stop here (saturate) instead of overflowing the wire format's int64."""
FRAME_MAX = (1 << 53) - 1
"""The largest frame tag: frame numbers stay exact as floats (2^53 frames are 285 years at
1 MHz), and no arithmetic on a tag comes near the wire's int64."""

_FMAX = sys.float_info.max
Finite = Annotated[float, msgspec.Meta(ge=-_FMAX, le=_FMAX)]
"""A float that must be finite: the bounds reject exactly NaN, +inf and -inf."""
NonNegative = Annotated[float, msgspec.Meta(ge=0.0, le=_FMAX)]
Count = Annotated[int, msgspec.Meta(ge=0, le=COUNTER_MAX)]
Frame = Annotated[int, msgspec.Meta(ge=-1, le=FRAME_MAX)]
"""Hardware frame index k of the lockstep clock; -1 where no frame applies."""
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
Scalar = Union[bool, int, Finite, str, None]
"""A parameter or command-argument value."""


class Limits(NamedTuple):
    """The plausibility limits of one field (see :func:`limits`)."""

    lo: float
    hi: float
    unit: str
    source: str


def limits(lo: float, hi: float, unit: str, source: str) -> msgspec.Meta:
    """Plausibility limits of a field, as its type's metadata: decoding rejects a value outside
    ``[lo, hi]`` (and NaN, inf). ``unit`` is the field's SI unit, ``source`` says where the
    bounds come from (the plant's TOML, a data sheet, an estimate and why)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"limits must be finite with lo < hi, got [{lo}, {hi}]")
    return msgspec.Meta(ge=lo, le=hi, extra={"unit": unit, "source": source})


def field_limits(msg_type: type["Message"]) -> dict[str, Limits]:
    """The plausibility limits of a message type's fields (of a list's elements for a list
    field), by field name."""
    out: dict[str, Limits] = {}
    for f in msgspec.structs.fields(msg_type):
        t = f.type
        if get_origin(t) is list:
            t = get_args(t)[0]
        if get_origin(t) is not Annotated:
            continue
        for meta in get_args(t)[1:]:
            extra = getattr(meta, "extra", None)
            if isinstance(meta, msgspec.Meta) and extra and "source" in extra:
                # only limits() writes a "source", and it sets both bounds
                assert meta.ge is not None and meta.le is not None
                out[f.name] = Limits(meta.ge, meta.le, extra["unit"], extra["source"])
    return out


class Message(msgspec.Struct, kw_only=True, gc=False, forbid_unknown_fields=False):
    """Header common to every message."""

    schema: int = SCHEMA_VERSION
    seq: Count = 0
    t_mono_s: NonNegative = 0.0
    t_utc_s: NonNegative = 0.0


# --------------------------------------------------------------------------- plausibility
# Limits of the modelled instruments (hil_sim/nist4.toml, hil_sim/efb.toml): the widest of the
# two wherever they share a field. A simulator configured beyond them (wider stops, ADCs of
# another range) needs them widened here.

Position = Annotated[float, limits(
    -0.1, 0.1, "m", "the NIST-4 coil's stops are 45.75 mm from level (nist4.toml wheel.stop_rad "
    "0.15 rad x wheel.radius_m 0.305 m; the EFB's 1.5 mm, efb.toml linkage.stop_m), x and y move "
    "less; the origin (daq zero) lies within +-50 mm, so no reading is further than 0.1 m")]
Angle = Annotated[float, limits(
    -0.1, 0.1, "rad", "estimate: a coil tilted or turned by 50 mrad (2.9 deg) would touch the "
    "magnet; theta-z reads at most 10 mm of PSD spot at 0.25 m (nist4.toml psd), 40 mrad; the "
    "origin (daq zero) lies within +-50 mrad")]
Velocity = Annotated[float, limits(
    -2.0, 2.0, "m/s", "a balance side accelerates slower than g: falling freely across the "
    "NIST-4 stops (2 x 45.75 mm) it would reach sqrt(2 g d) = 1.34 m/s (the EFB's 3 mm: 0.24 m/s)")]
AngularVelocity = Annotated[float, limits(
    -2.0, 2.0, "rad/s", "estimate: a 0.1 rad swing of the fastest suspension mode, 1.2 Hz "
    "(nist4.toml suspension.freq_hz), peaks at 2 pi 1.2 Hz 0.1 rad = 0.75 rad/s")]
CoilVoltage = Annotated[float, limits(
    -1200.0, 1200.0, "V", "the EFB DVM's range, 1200 V (efb.toml dvm.range_V); NIST-4's is 12 V "
    "(nist4.toml dvm.range_V) plus the PJVS voltage the daq adds back (at most 20 V)")]
MainCurrent = Annotated[float, limits(
    -0.025, 0.025, "A", "the main source's full scale, 20 mA (nist4.toml main_source.full_scale_A; "
    "its monitor reads 10 V at 500 V/A), with 25 % margin")]
CounterMassCurrent = Annotated[float, limits(
    -0.0625, 0.0625, "A", "the counter-mass source's full scale, 50 mA (nist4.toml "
    "cm_source.full_scale_A), with 25 % margin")]
Capacitance = Annotated[float, limits(
    0.0, 1e-6, "F", "estimate: the EFB's cylinders are 28 pF (efb.toml capacitor.c0_pF, at most "
    "1e4 pF as configured); a bridge reading of 1 uF is beyond any configuration")]
Temperature = Annotated[float, limits(
    223.15, 373.15, "K", "the simulators' range, -50 to 100 degC (nist4.toml, efb.toml "
    "temperature.initial_C)")]
Pressure = Annotated[float, limits(
    0.0, 2.0e5, "Pa", "vacuum to two atmospheres (nist4.toml, efb.toml pressure.initial_Pa)")]
FringeCount = Annotated[int, limits(
    -(1 << 31), (1 << 31) - 1, "fringes", "a 32-bit up/down fringe counter")]
FringePhase = Annotated[float, limits(
    -1e-9, 2 * math.pi + 1e-9, "rad", "the phase within one fringe, [0, 2 pi) (hil_sim/README.md), "
    "give or take the rounding at its edges")]
AdcVoltage = Annotated[float, limits(
    -100.0, 100.0, "V", "the ADCs' full scale is at most 100 V (nist4.toml psd.adc_full_scale_V, "
    "monitor.adc_full_scale_V ranges; 10 V as modelled)")]
DvmVoltage = Annotated[float, limits(
    -1.0e5, 1.0e5, "V", "the DVM ranges the simulators accept reach 1e5 V (efb.toml dvm.range_V; "
    "1200 V as modelled)")]

# --------------------------------------------------------------------------- hardware I/O


class HwSensorFrame(Message, kw_only=True, array_like=True):
    """One raw sensor frame from the hardware (or the HIL simulator), topic ``hw/sensors``.

    Channel counts depend on the instrument model; unused channel lists are empty.
    """

    frame: Frame
    """Hardware frame index k (lockstep clock) or running count (realtime)."""
    sim_time_s: NonNegative = 0.0
    """Time of the sample on the hardware clock (s)."""
    fringe_count: list[FringeCount] = []
    """Integer fringe counts, one per heterodyne interferometer."""
    fringe_phase_rad: list[FringePhase] = []
    """Interpolated fringe phase within the count, one per interferometer (rad, [0, 2 pi))."""
    psd_v: list[AdcVoltage] = []
    """Position-sensitive-detector / optical-lever voltages (V)."""
    dvm_v: list[DvmVoltage] = []
    """Digital voltmeter readings (V), e.g. coil voltage minus the PJVS reference."""
    current_monitor_v: list[AdcVoltage] = []
    """Current-monitor voltages across sense resistors (V)."""
    capacitance_f: list[Capacitance] = []
    """Capacitance-bridge readings (F)."""
    temperature_k: Temperature = 293.15
    """Magnet / capacitor temperature (K)."""
    pressure_pa: Pressure = 0.0
    """Vacuum-chamber pressure (Pa)."""
    session: Count = 0
    """The hardware's session: a restart of the simulator (or of the hardware's driver) that
    starts the frame count again starts a new session; 0 where the publisher gives none. Frame
    tags never go back within a session (:class:`kibble.bus_schema.realtime.FrameClock`)."""


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
    position, electrical readings and environment; every field within its plausibility limits
    (:func:`field_limits`).
    """

    frame: Frame
    sim_time_s: NonNegative = 0.0
    coil_x_m: Position = 0.0
    coil_y_m: Position = 0.0
    coil_z_m: Position = 0.0
    coil_theta_x_rad: Angle = 0.0
    coil_theta_y_rad: Angle = 0.0
    coil_theta_z_rad: Angle = 0.0
    coil_vx_m_per_s: Velocity = 0.0
    coil_vy_m_per_s: Velocity = 0.0
    coil_vz_m_per_s: Velocity = 0.0
    coil_wx_rad_per_s: AngularVelocity = 0.0
    coil_wy_rad_per_s: AngularVelocity = 0.0
    coil_wz_rad_per_s: AngularVelocity = 0.0
    counter_mass_z_m: Position = 0.0
    coil_voltage_v: CoilVoltage = 0.0
    main_coil_current_a: MainCurrent = 0.0
    counter_mass_current_a: CounterMassCurrent = 0.0
    capacitance_f: Capacitance = 0.0
    temperature_k: Temperature = 293.15
    pressure_pa: Pressure = 0.0
    session: Count = 0
    """The hardware session of the sensor frame (``HwSensorFrame.session``)."""


class Setpoint(Message, kw_only=True, array_like=True):
    """Commands flowing down the loop, topic ``<service>/setpoint``.

    ``values`` maps a physical quantity, unit in its name, to its value, e.g.
    ``{"main_coil_current_a": 1.2e-2}``; ``switches`` maps a relay or switchbox to the state
    asked for (True = closed / connected), e.g. ``{"main_coil_connected": True}``: a boolean on
    the wire, so a number there (``1.0``) fails decoding. A switch that is absent keeps its state.
    """

    frame: Frame
    values: dict[Name, Finite]
    switches: dict[Name, bool] = {}


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
