"""deploy/: one identity per daemon, on a real mosquitto with exactly the generated password
file and ACL (``kibble deploy-credentials``); TLS with a CA made here."""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import subprocess
import sys
import time

import pytest

from kibble.bus_schema.codec import decode
from kibble.bus_schema.messages import Status
from kibble.bus_schema.transport import (
    broker_spec, connect_error_text, deliver_directly, make_client, publish_now, corked, with_identity,
)
from kibble.services.harness.broker import free_port, wait_for_port
from kibble.services.runtime.client import BusClient, BusError
from kibble.services.runtime.credentials import DAEMONS, acl_text, secret_path, write_credentials

from tests.conftest import ROOT

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not shutil.which("mosquitto"), reason="needs mosquitto")]


async def start_mosquitto(tmp_path, creds, tls_files=None):
    port = free_port()
    listener = f"listener {port} 127.0.0.1\n"
    if tls_files:
        ca, cert, key = tls_files
        listener += f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    conf = tmp_path / "mosquitto.conf"
    # started as root, mosquitto would drop to user "mosquitto", who cannot read tmp_path
    conf.write_text(f"user {getpass.getuser()}\n{listener}allow_anonymous false\n"
                    f"password_file {creds / 'mosquitto.passwd'}\nacl_file {creds / 'mosquitto.acl'}\n"
                    "persistence false\nset_tcp_nodelay true\n")
    proc = await asyncio.create_subprocess_exec("mosquitto", "-c", str(conf),
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    await wait_for_port("127.0.0.1", port, 10.0, proc)
    return proc, port


async def stop(proc):
    if proc.returncode is None:
        proc.terminate()
        await proc.wait()


@pytest.fixture
async def deployed(tmp_path):
    """(base URL, credentials directory) of a mosquitto with the generated files."""
    creds = tmp_path / "creds"
    write_credentials(creds)
    proc, port = await start_mosquitto(tmp_path, creds)
    try:
        yield f"mqtt://127.0.0.1:{port}", creds
    finally:
        await stop(proc)


def as_user(base, creds, user):
    return with_identity(base, user, secret_path(creds, user))


def test_deploy_acl_is_the_generated_one(tmp_path):
    assert (ROOT / "deploy" / "mosquitto.acl").read_text() == acl_text()
    files = write_credentials(tmp_path)
    assert set(files) == {f"kibble-{d}" for d in DAEMONS} | {"kibble-operator", "kibble-viewer"}
    for path in files.values():
        assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "mosquitto.passwd").stat().st_mode & 0o777 == 0o600
    before = {u: p.read_text() for u, p in files.items()}
    write_credentials(tmp_path)                   # re-run: passwords kept
    assert {u: p.read_text() for u, p in files.items()} == before


async def test_anonymous_and_wrong_passwords_are_refused_clearly(deployed, tmp_path):
    base, creds = deployed
    with pytest.raises(BusError, match="refused an anonymous login.*not authorized"):
        async with BusClient(base, "nist4"):
            pass
    with pytest.raises(BusError, match="refused user 'kibble-viewer': not authorized") as info:
        async with BusClient("mqtt://kibble-viewer:hunter2@" + base[7:], "nist4"):
            pass
    assert "hunter2" not in str(info.value)
    # the command line: one line, no traceback, no password
    out = subprocess.run([sys.executable, "-m", "kibble.services.cli.main", "status", "--broker",
                          "mqtt://kibble-viewer:hunter2@" + base[7:]],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "refused user 'kibble-viewer': not authorized" in out.stderr
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr + out.stdout


# (identity, topic, allowed?) under kb/nist4/
PUBLISHES = [(f"kibble-{d}", f"{d}/status", True) for d in DAEMONS] + [
    ("kibble-daq", "daq/frame", True),
    ("kibble-servo", "servo/setpoint", True),
    ("kibble-servo", "hw/mass_lift", True),
    ("kibble-current_source", "hw/main_source", True),
    ("kibble-current_source", "hw/cm_source", True),
    ("kibble-damping", "hw/damping", True),
    ("kibble-theta_z", "hw/theta_z_hv", True),
    ("kibble-hv_source", "hw/hv", True),
    ("kibble-sim", "hw/sensors", True),
    ("kibble-sim", "sim/truth", True),
    ("kibble-damping", "tool-abc/reply", True),        # replies go to the caller's reply topic
    ("kibble-sequencer", "damping/cmd", True),
    ("kibble-operator", "servo/cmd", True),
    ("kibble-operator", "sim/cmd", True),
    # one daemon cannot write another's setpoint or hardware
    ("kibble-damping", "servo/setpoint", False),
    ("kibble-damping", "hw/main_source", False),
    ("kibble-current_source", "hw/damping", False),
    ("kibble-daq", "hw/sensors", False),
    ("kibble-daq", "daq/setpoint", False),
    ("kibble-servo", "servo/cmd", False),
    ("kibble-servo", "hw/main_source", False),
    ("kibble-sim", "hw/main_source", False),
    ("kibble-sim", "servo/setpoint", False),
    ("kibble-sim", "sim/cmd", False),
    ("kibble-recorder", "damping/cmd", False),
    # operators command, never drive hardware or speak for a daemon; viewers write nothing
    ("kibble-operator", "hw/main_source", False),
    ("kibble-operator", "servo/setpoint", False),
    ("kibble-operator", "servo/status", False),
    ("kibble-viewer", "servo/cmd", False),
    ("kibble-viewer", "hw/sensors", False),
    ("kibble-viewer", "viewer/status", False),
]


async def test_each_identity_writes_only_its_own_topics(deployed):
    base, creds = deployed
    got: list[str] = []
    sub = make_client(as_user(base, creds, "kibble-viewer"), f"acl-sub-{os.getpid()}")
    deliver_directly(sub, lambda topic, payload: got.append(topic))
    async with sub:
        await sub.subscribe("kb/#", qos=1)
        for i, (user, topic, _) in enumerate(PUBLISHES):
            async with make_client(as_user(base, creds, user), f"acl-pub-{i}") as pub:
                await pub.publish(f"kb/nist4/{topic}", f"{user} {i}".encode(), qos=1)
        async with make_client(as_user(base, creds, "kibble-operator"), "acl-end") as pub:
            await pub.publish("kb/nist4/end/cmd", b"end", qos=1)
        deadline = time.monotonic() + 5.0
        while "kb/nist4/end/cmd" not in got and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert "kb/nist4/end/cmd" in got
    arrived = {t[len("kb/nist4/"):] for t in got}
    wrong = [(u, t, ok) for u, t, ok in PUBLISHES if (t in arrived) != ok
             # a forbidden topic that an allowed publish of another identity also used
             and not any(t2 == t and ok2 for _, t2, ok2 in PUBLISHES)]
    assert not wrong
    for user, topic, ok in PUBLISHES:
        if ok:
            assert topic in arrived, (user, topic)
    for forbidden in ("servo/setpoint", "hw/main_source", "hw/sensors", "servo/cmd", "sim/cmd"):
        # each allowed once, forbidden for others: exactly one delivery
        assert got.count(f"kb/nist4/{forbidden}") == 1, forbidden
    for forbidden in ("daq/setpoint", "hw/damping_x", "viewer/status"):
        assert f"kb/nist4/{forbidden}" not in got


async def test_nist4_stack_holds_with_one_identity_per_daemon(deployed, tmp_path):
    from kibble.services.harness import scenarios as S
    from kibble.services.plans.mqtt_loop import BusLoop
    from kibble.services.harness.up import Stack

    base, creds = deployed
    operator = as_user(base, creds, "kibble-operator")
    async with Stack("nist4", clock="lockstep", rate_hz=200, broker_url=operator,
                     credentials_dir=creds, seed=1, run_dir=tmp_path / "run",
                     progress=lambda line: None) as stack:
        for name, child in stack.children.items():
            argv = " ".join(child.argv)
            if name == "sim":
                assert "kibble-sim@" in argv and "password_file=" in argv
            else:  # each daemon of the process connects as kibble-<daemon> from the directory
                assert f"--credentials {creds}" in argv, argv
        async with BusLoop(operator, "nist4", 200) as loop:
            await loop.wait_frames()
            null = await S.force_null(loop, 2.0, settle_s=2.0)
            assert null["null_rms_m"] <= 1e-8
            state = await loop.command("servo", "state")
            assert state["mode"] == "force"
        async with BusClient(operator, "nist4") as bus:
            items = await bus.collect(bus.topics.all_of("status"), 0.5)
        statuses = {s.service: s for s in (decode(p, Status) for _, p in items)}
        for name in ("sim", "daq", "servo", "current_source", "damping", "theta_z"):
            assert statuses[name].online, name
        for name in ("current_source", "damping", "theta_z"):
            assert statuses[name].state == "armed", (name, statuses[name].state)
        for name, child in stack.children.items():
            log = child.log_path.read_text()
            assert "not authorized" not in log.lower(), name
            assert child.restarts == 0, name


# ---------------------------------------------------------------------------- TLS


def make_tls(tmp_path):
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    d = tmp_path / "tls"
    d.mkdir()

    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
         "-days", "2", "-subj", "/CN=kibble test CA")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return d / "ca.crt", d / "server.crt", d / "server.key"


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
async def test_mqtts_fast_path_daemon_and_status(tmp_path):
    ca, cert, key = make_tls(tmp_path)
    creds = tmp_path / "creds"
    write_credentials(creds)
    proc, port = await start_mosquitto(tmp_path, creds, (ca, cert, key))
    base = f"mqtts://127.0.0.1:{port}?ca_file={ca}"
    try:
        # no CA: the self-signed chain is refused, said so
        with pytest.raises(BusError, match="(?i)certificate"):
            async with BusClient(f"mqtts://127.0.0.1:{port}", "nist4"):
                pass
        # QoS 0 through publish_now (corked and not) arrives whole and in order over TLS,
        # received by deliver_directly (paho reads the SSLSocket)
        got: list[bytes] = []
        rx = make_client(as_user(base, creds, "kibble-viewer"), "tls-rx")
        deliver_directly(rx, lambda topic, payload: got.append(payload))
        async with rx, make_client(as_user(base, creds, "kibble-daq"), "tls-tx") as tx:
            await rx.subscribe("kb/tls/daq/frame", qos=0)
            await asyncio.sleep(0.1)
            for i in range(300):
                assert publish_now(tx, "kb/tls/daq/frame", b"%d" % i + b"x" * (i % 50))
            with corked(tx):
                for i in range(300, 600):
                    assert publish_now(tx, "kb/tls/daq/frame", b"%d" % i)
            big = b"B" * 40000
            assert publish_now(tx, "kb/tls/daq/frame", big)
            deadline = time.monotonic() + 5.0
            while len(got) < 601 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        assert [int(p.rstrip(b"x")) for p in got[:600]] == list(range(600))
        assert got[600] == big
        # one daemon over TLS, its identity from a password file; kibble status as a viewer
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        daq = subprocess.Popen(
            [sys.executable, "-m", "kibble.services.cli.main", "service", "daq", "--instrument", "tls",
             "--broker", f"mqtts://kibble-daq@127.0.0.1:{port}", "--broker-ca", str(ca),
             "--broker-password-file", str(secret_path(creds, "kibble-daq")),
             "--state-dir", str(tmp_path / "state")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            viewer_env = dict(env, KIBBLE_BROKER_USER="kibble-viewer", KIBBLE_BROKER_CA=str(ca),
                              KIBBLE_BROKER_PASSWORD=secret_path(creds, "kibble-viewer").read_text().strip())
            deadline = time.monotonic() + 30.0
            while True:
                out = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "kibble.services.cli.main", "status",
                                     "--instrument", "tls", "--broker", f"mqtts://127.0.0.1:{port}"],
                    capture_output=True, text=True, timeout=30, env=viewer_env)
                assert out.returncode == 0, out.stderr
                if "daq" in out.stdout and "true" in out.stdout:
                    break
                assert time.monotonic() < deadline, out.stdout
                await asyncio.sleep(0.5)
        finally:
            daq.terminate()
            text = daq.communicate(timeout=15)[0].decode()
        assert "mqtts://kibble-daq@127.0.0.1" in text
        assert secret_path(creds, "kibble-daq").read_text().strip() not in text
    finally:
        await stop(proc)


def test_connect_error_text_names_the_user_never_the_password():
    import aiomqtt
    from paho.mqtt.reasoncodes import ReasonCode
    from paho.mqtt.packettypes import PacketTypes

    exc = aiomqtt.MqttCodeError(ReasonCode(PacketTypes.CONNACK, identifier=135))
    text = connect_error_text("mqtt://kibble-x:s3cret@h:1", exc)
    assert text == "broker mqtt://kibble-x@h:1 refused user 'kibble-x': not authorized"


def test_example_configuration_and_broker_keys(tmp_path):
    from kibble.services.runtime.registry import service_class
    from kibble.services.runtime.service import load_config

    example = ROOT / "deploy" / "kibble.example.toml"
    for name in ("daq", "servo", "current_source", "damping", "theta_z", "recorder", "sequencer"):
        cfg = load_config(name, example, state_dir=tmp_path)
        service_class(name)(cfg)                   # the settings fit the daemon
    conf = tmp_path / "k.toml"
    conf.write_text('broker = "mqtts://controller:8883"\nbroker_ca_file = "/etc/kibble/ca.crt"\n'
                    '[services.servo]\nbroker_user = "kibble-servo"\n'
                    'broker_password_file = "/etc/kibble/secrets/kibble-servo.password"\n')
    cfg = load_config("servo", conf, state_dir=tmp_path)
    spec = broker_spec(cfg.broker, env={})
    assert (spec.tls, spec.host, spec.port, spec.username, spec.password_file, spec.ca_file) == (
        True, "controller", 8883, "kibble-servo", "/etc/kibble/secrets/kibble-servo.password",
        "/etc/kibble/ca.crt")
    # the command line's URL wins over the file's broker, its user over broker_user
    cfg = load_config("servo", conf, state_dir=tmp_path, broker="mqtts://op@other")
    assert cfg.broker.startswith("mqtts://op@other?")
