"""``kibble epics`` with Channel Access clients nobody here wrote (caproto's, and pyepics on
EPICS base's libca) against a NIST-4 stack in lockstep, on a free loopback port: a parameter
read with its unit, limits and DESC, a valid put changes it on the bus, an invalid one is a put
error with the daemon's reason and changes nothing, ``STATE`` goes MAJOR when a watchdog trips,
and the z PV updates with its frame's UTC time."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
import pytest_asyncio

from tests.viewstack import eventually, make_stack, proportional_gain, request, start_view, stop_view

pytestmark = [pytest.mark.broker, pytest.mark.asyncio(loop_scope="module")]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ca_env():
    """The EPICS environment of the server and the clients: one free port on loopback only,
    beacons to loopback only. Set in this process too (the clients read it)."""
    env = {"EPICS_CA_SERVER_PORT": str(free_port()), "EPICS_CA_ADDR_LIST": "127.0.0.1",
           "EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
           "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO", "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
           "EPICS_CA_REPEATER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(broker, tmp_path_factory):
    async with make_stack(broker, tmp_path_factory.mktemp("views-epics"),
                          settings={"damping": {"watchdog_xy_rms_m": 2e-6}}) as stack:
        await request(stack, "servo", "mode", mode="force")
        yield stack


@pytest.fixture(scope="module")
def epics(stack, subprocess_env, ca_env):
    proc, _ = start_view(["epics", "--broker", stack.broker_url, "--instrument", stack.instrument],
                         {**subprocess_env, **ca_env}, "epics: PVs")
    yield f"KB:{stack.instrument}:"
    stop_view(proc)


def ca_read(name: str, data_type: str = "native"):
    from caproto.sync.client import read

    return read(name, data_type=data_type, timeout=5.0, repeater=False)


async def caproto_read(name: str, data_type: str = "native"):
    return await asyncio.get_running_loop().run_in_executor(None, ca_read, name, data_type)


async def test_a_parameter_with_unit_limits_and_doc(epics, stack):
    kp = await proportional_gain(stack)
    pv = f"{epics}servo:{kp['name']}"
    got = await eventually(lambda: _try(caproto_read(pv, "control")), timeout_s=15.0)
    assert got.data[0] == pytest.approx(kp["value"])
    assert got.metadata.units.decode() == kp["unit"]
    assert (got.metadata.lower_ctrl_limit, got.metadata.upper_ctrl_limit) == (kp["min"], kp["max"])
    desc = await caproto_read(f"{pv}.DESC")
    assert desc.data[0].decode() == kp["doc"][:40]


async def _try(coro):
    try:
        return await coro
    except Exception:
        return None


async def test_puts_through_param_set_with_caproto_and_pyepics(epics, stack):
    from caproto import ErrorResponseReceived
    from caproto.sync.client import write

    kp = await proportional_gain(stack)
    pv = f"{epics}servo:{kp['name']}"
    await eventually(lambda: _try(caproto_read(pv)), timeout_s=15.0)
    loop = asyncio.get_running_loop()
    new = kp["value"] * 1.1
    await loop.run_in_executor(None, lambda: write(pv, [new], notify=True, timeout=10.0, repeater=False))
    got = await request(stack, "servo", "param.get", name=kp["name"])
    assert got["value"] == pytest.approx(new)

    with pytest.raises(ErrorResponseReceived) as refused:
        await loop.run_in_executor(None, lambda: write(pv, [kp["max"] * 10], notify=True, timeout=10.0,
                                                       repeater=False))
    assert "maximum" in str(refused.value.args[0].error_message)
    assert (await request(stack, "servo", "param.get", name=kp["name"]))["value"] == pytest.approx(new)

    def with_pyepics() -> tuple[float, str]:
        import epics as pyepics

        chan = pyepics.PV(pv, connection_timeout=5.0)
        assert chan.wait_for_connection(5.0)
        chan.get_ctrlvars()
        chan.put(kp["value"], wait=True, timeout=10.0)
        chan.put(kp["max"] * 10, wait=True, timeout=10.0)  # refused: pyepics reports no reason
        return chan.get(use_monitor=False), chan.units

    value, units = await loop.run_in_executor(None, with_pyepics)
    assert value == pytest.approx(kp["value"]) and units == kp["unit"]
    assert (await request(stack, "servo", "param.get", name=kp["name"]))["value"] == pytest.approx(kp["value"])


async def test_z_updates_with_its_frame_time(epics):
    first = await eventually(lambda: _try(caproto_read(f"{epics}daq:frame:coil_z_m", "time")), timeout_s=15.0)
    await asyncio.sleep(0.5)
    second = await caproto_read(f"{epics}daq:frame:coil_z_m", "time")
    assert second.metadata.timestamp > first.metadata.timestamp
    assert abs(second.metadata.timestamp - time.time()) < 10.0  # UTC, not the simulated time
    assert abs(second.data[0]) < 1e-6                      # the null held


async def test_z_monitor_updates_at_the_rate(epics):
    """A monitor of the z PV sees the default 10 Hz (each update a newer frame)."""
    from caproto.threading.client import Context

    ctx = Context()
    try:
        (z,) = await asyncio.to_thread(ctx.get_pvs, f"{epics}daq:frame:coil_z_m", timeout=10.0)
        stamps: list[float] = []

        def on_update(sub, response) -> None:
            stamps.append(response.metadata.timestamp)

        sub = await asyncio.to_thread(z.subscribe, data_type="time")
        sub.add_callback(on_update)
        await asyncio.sleep(1.0)
        n0 = len(stamps)
        await asyncio.sleep(3.0)
        rate = (len(stamps) - n0) / 3.0
        sub.clear()
    finally:
        ctx.disconnect()
    print(f"z monitor: {rate:.1f} Hz")
    assert 8.0 <= rate <= 11.0
    assert all(b > a for a, b in zip(stamps, stamps[1:]))


async def test_state_goes_major_on_a_trip(epics, stack):
    from caproto import AlarmSeverity

    pv = f"{epics}damping:STATE"
    got = await eventually(lambda: _try(caproto_read(pv, "time")), timeout_s=15.0)
    assert got.metadata.severity == AlarmSeverity.NO_ALARM
    await request(stack, "sim", "inject_impulse", dof="x", impulse=3e-4)  # ~7 um ring-down

    async def tripped():
        r = await _try(caproto_read(pv, "time"))
        return r if r is not None and r.metadata.severity == AlarmSeverity.MAJOR_ALARM else None

    got = await eventually(tripped, timeout_s=20.0, every_s=0.3)
    assert (await caproto_read(pv, "control")).metadata.enum_strings[got.data[0]] == b"tripped"
    await request(stack, "damping", "reset")
    await request(stack, "damping", "arm")


def stalled_monitors(names: list[str], copies: int) -> socket.socket:
    """A Channel Access client (caproto's sans-I/O circuit over a plain socket with a 4 kB
    receive buffer) that connects to ``names``, subscribes to each ``copies`` times, and then
    never reads again."""
    import caproto as ca

    port = int(os.environ["EPICS_CA_SERVER_PORT"])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5.0)
    circuit = ca.VirtualCircuit(our_role=ca.CLIENT, address=("127.0.0.1", port), priority=0)

    def send(*commands) -> None:
        sock.sendall(b"".join(bytes(b) for b in circuit.send(*commands)))

    send(ca.VersionRequest(priority=0, version=13), ca.HostNameRequest("stalled"),
         ca.ClientNameRequest("stalled"))
    channels = [ca.ClientChannel(name, circuit) for name in names]
    send(*(chan.create() for chan in channels))
    while not all(chan.states[ca.CLIENT] is ca.CONNECTED for chan in channels):
        commands, _ = circuit.recv(sock.recv(65536))
        for command in commands:
            circuit.process_command(command)
    send(*(chan.subscribe() for chan in channels for _ in range(copies)))
    return sock


async def test_a_client_that_stops_reading_stalls_nothing(epics, stack):
    """700 monitors of the frame PVs (7000 updates/s) on a client that never reads: its
    socket fills, and still the server goes on reading the bus: another client reads z stamped
    with ever newer frames."""
    fields = [f"{epics}daq:frame:coil_z_m", f"{epics}servo:frame:error_m", f"{epics}daq:frame:coil_x_m"]
    await eventually(lambda: _try(caproto_read(fields[0])), timeout_s=15.0)
    sock = await asyncio.get_running_loop().run_in_executor(None, stalled_monitors, fields, 250)
    try:
        await asyncio.sleep(5.0)
        import fcntl
        import termios
        unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        assert int.from_bytes(unread, "little") > 2000    # the stalled client's buffer is full
        stamps = []
        for _ in range(3):
            stamps.append((await caproto_read(fields[0], "time")).metadata.timestamp)
            await asyncio.sleep(1.0)
        assert stamps == sorted(set(stamps)), stamps
        assert time.time() - stamps[-1] < 10.0
    finally:
        sock.close()
