"""The ``kibble`` command line and a service run as a child process, over a real broker:
status table, param list/get/set/revert, cmd, watch, timeouts, last will on SIGKILL and a
graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from kibble.bus_schema.messages import Status
from kibble.services.runtime.client import BusClient

pytestmark = pytest.mark.broker

SERVICE = "tests.svc_example:ExampleService"


@pytest.fixture(scope="module")
def kibble_exe(python_exe) -> str:
    exe = Path(python_exe).with_name("kibble")
    assert exe.exists(), f"the kibble entry point is not installed next to {python_exe}"
    return str(exe)


def bus_flags(broker, instrument: str) -> list[str]:
    return ["--broker", broker.url, "--instrument", instrument]


def run_cli(kibble_exe, subprocess_env, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([kibble_exe, *args], env=subprocess_env, capture_output=True, text=True,
                          timeout=timeout)


def read_status(broker, instrument: str, service: str = "example", wait_s: float = 0.3) -> Status | None:
    """The retained status of ``service`` right now (None if there is none)."""
    async def get() -> Status | None:
        async with BusClient(broker.url, instrument) as bus:
            async with bus.listen(bus.topics.status(service)) as sub:
                try:
                    return await sub.expect(Status, timeout_s=wait_s)
                except Exception:
                    return None
    return asyncio.run(get())


def wait_status(broker, instrument: str, predicate, timeout_s: float = 10.0) -> Status:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = read_status(broker, instrument)
        if last is not None and predicate(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"status never matched within {timeout_s} s; last: {last}")


class ServiceChild:
    """``kibble service tests.svc_example:ExampleService`` as a child process."""

    def __init__(self, kibble_exe, env, broker, instrument: str, state_dir: Path,
                 *extra: str) -> None:
        conf = state_dir / "service.toml"
        conf.write_text("heartbeat_s = 0.2\nreconnect_min_s = 0.05\n")
        self.proc = subprocess.Popen(
            [kibble_exe, "service", SERVICE, "--config", str(conf), "--state-dir", str(state_dir),
             *bus_flags(broker, instrument), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.status = wait_status(broker, instrument, lambda s: s.online and s.client_id.endswith(
            f"-{self.proc.pid}"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture(scope="module")
def module_instrument() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def child(kibble_exe, subprocess_env, broker, module_instrument, tmp_path_factory):
    svc = ServiceChild(kibble_exe, subprocess_env, broker, module_instrument,
                       tmp_path_factory.mktemp("svc"))
    yield svc
    svc.stop()


@pytest.fixture
def cli(kibble_exe, subprocess_env, broker, module_instrument):
    def call(*args: str, timeout_flag: str = "3") -> subprocess.CompletedProcess:
        return run_cli(kibble_exe, subprocess_env, *args, *bus_flags(broker, module_instrument),
                       "--timeout", timeout_flag)
    return call


# ------------------------------------------------------------------------ against a running service


def test_status_table_lists_the_service(child, kibble_exe, subprocess_env, broker, module_instrument):
    time.sleep(0.5)  # a few heartbeats
    out = run_cli(kibble_exe, subprocess_env, "status", *bus_flags(broker, module_instrument),
                  "--wait", "0.5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:6] == ["service", "state", "online", "session", "hb", "age"]
    row = next(line for line in lines if line.startswith("example"))
    cells = row.split()
    assert cells[1:4] == ["idle", "true", str(child.status.session)]
    assert 0 <= float(cells[4]) < 1.0  # heartbeat age with a 0.2 s heartbeat
    assert cells[5:9] == ["0", "0", "0", "0"]  # frames in, out, rejected, late
    assert "mode=normal" in row and "gain=" in row


@pytest.mark.amqtt
def test_param_cli_list_get_set_reject_revert(child, cli):
    out = cli("param", "list", "example")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^gain\s+1\.0\s+V/m\s+\[0\.0, 10\.0\]\s+output per metre", out.stdout, re.M)
    assert re.search(r"^mode\s+normal", out.stdout, re.M)

    out = cli("param", "set", "example", "gain", "2.5", "--client-id", "alice")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gain: 1.0 -> 2.5"
    out = cli("param", "get", "example", "gain")
    assert out.returncode == 0 and out.stdout.strip() == "gain = 2.5 V/m"

    out = cli("param", "set", "example", "gain", "12")
    assert out.returncode == 1
    assert "gain" in out.stderr and "above the maximum 10.0 V/m" in out.stderr
    out = cli("param", "set", "example", "window", "fast")
    assert out.returncode == 1 and "window: expected a number" in out.stderr
    assert cli("param", "get", "example", "gain").stdout.strip() == "gain = 2.5 V/m"

    out = cli("param", "revert", "example")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gain: 2.5 -> 1.0"
    assert cli("param", "get", "example", "gain").stdout.strip() == "gain = 1.0 V/m"


def test_cmd_cli(child, cli):
    out = cli("cmd", "example", "echo", "x=1.5", "name=abc", "on=true")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"args": {"x": 1.5, "name": "abc", "on": True}}
    out = cli("cmd", "example", "fail")
    assert out.returncode == 1 and "example rejected the request: fail was asked to fail" in out.stderr
    out = cli("cmd", "example", "echo", "novalue")
    assert out.returncode != 0 and "expected NAME=VALUE" in out.stderr


def test_watch_prints_decoded_lines(child, kibble_exe, subprocess_env, broker, module_instrument, cli):
    proc = subprocess.Popen([kibble_exe, "watch", f"kb/{module_instrument}/example/#",
                             *bus_flags(broker, module_instrument)],
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        deadline = time.monotonic() + 10
        while len(lines) < 4 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                lines.append(line)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert len(lines) == 4
    decoded = {}
    for line in lines:
        topic, kind, body = line.split(" ", 2)
        decoded.setdefault(topic.rsplit("/", 1)[1], (kind, json.loads(body)))
    assert decoded["status"][0] == "Status" and decoded["status"][1]["service"] == "example"
    assert decoded["params"][0] == "ParamList"
    assert decoded["params"][1]["params"][0]["name"] == "gain"


def test_param_cli_times_out_without_service(cli):
    t0 = time.monotonic()
    out = cli("param", "get", "nobody", "gain", timeout_flag="0.5")
    assert out.returncode == 1
    assert "no reply from service 'nobody' to 'param.get' within 0.5 s" in out.stderr
    assert time.monotonic() - t0 < 5
    out = cli("param", "get", "example")  # usage error, no bus needed
    assert out.returncode != 0 and "needs a parameter NAME" in out.stderr


def test_cli_reports_missing_broker(kibble_exe, subprocess_env):
    out = run_cli(kibble_exe, subprocess_env, "param", "list", "example",
                  "--broker", "mqtt://127.0.0.1:1", "--timeout", "1")
    assert out.returncode == 1
    assert "cannot connect to the broker at mqtt://127.0.0.1:1" in out.stderr


# ------------------------------------------------------------------------ process death and stop


@pytest.mark.amqtt
def test_last_will_marks_killed_service_offline(kibble_exe, subprocess_env, broker, tmp_path):
    instrument = f"k{uuid.uuid4().hex[:10]}"
    svc = ServiceChild(kibble_exe, subprocess_env, broker, instrument, tmp_path)
    try:
        wait_status(broker, instrument, lambda s: s.heartbeat >= 2)
        t_kill = time.time()
        os.kill(svc.proc.pid, signal.SIGKILL)
        status = wait_status(broker, instrument, lambda s: not s.online, timeout_s=5)
        assert status.state == "offline"
        assert status.session == svc.status.session
        assert status.heartbeat == 0 and status.t_utc_s < t_kill  # the will, set at connect
    finally:
        svc.stop()
    assert svc.proc.returncode == -signal.SIGKILL


def test_sigterm_stops_gracefully_with_offline_status(kibble_exe, subprocess_env, broker, tmp_path):
    instrument = f"g{uuid.uuid4().hex[:10]}"
    first = ServiceChild(kibble_exe, subprocess_env, broker, instrument, tmp_path)
    wait_status(broker, instrument, lambda s: s.heartbeat >= 2)
    t_term = time.time()
    first.proc.send_signal(signal.SIGTERM)
    out, err = first.proc.communicate(timeout=10)
    assert first.proc.returncode == 0, err
    assert f"example: session {first.status.session} on {broker.url}" in out
    status = read_status(broker, instrument)
    assert status is not None and not status.online and status.state == "offline"
    assert status.t_utc_s >= t_term and status.heartbeat >= 2  # sent at the stop, not the will

    second = ServiceChild(kibble_exe, subprocess_env, broker, instrument, tmp_path,
                          "--param", "gain=3.5")
    try:
        assert second.status.session == first.status.session + 1
        assert second.status.detail["gain"] == 3.5
    finally:
        second.stop()
