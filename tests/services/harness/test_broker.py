"""The broker launcher: both backends accept MQTT clients, stop and start on the same port,
and ``kibble broker`` serves in the foreground until SIGTERM."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from kibble.bus_schema.messages import Event
from kibble.services.harness.broker import Broker, resolve_backend
from kibble.services.runtime.client import BusClient, BusError

pytestmark = pytest.mark.broker


async def roundtrip(url: str) -> Event:
    async with BusClient(url, "brokertest") as bus:
        async with bus.listen("kb/brokertest/x/event") as sub:
            await bus.publish("kb/brokertest/x/event", Event(service="x", kind="ping"))
            return await sub.expect(Event, timeout_s=5)


@pytest.mark.parametrize("backend", ["mosquitto", "amqtt"])
async def test_backend_serves_and_restarts_on_the_same_port(backend):
    if backend == "mosquitto" and not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not on PATH (the amqtt run hides it)")
    async with Broker(backend=backend) as broker:
        assert broker.backend == backend and broker.port not in (0, 1883)
        assert (await roundtrip(broker.url)).kind == "ping"
        port = broker.port
        await broker.stop()
        assert not broker.running
        with pytest.raises(BusError, match="cannot connect to the broker"):
            await roundtrip(broker.url)
        await broker.start()
        assert broker.port == port and broker.running
        assert (await roundtrip(broker.url)).kind == "ping"


def test_resolve_backend_follows_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_backend("auto") == "amqtt"
    with pytest.raises(FileNotFoundError, match="mosquitto was asked for but is not on PATH"):
        resolve_backend("mosquitto")


def test_kibble_broker_command_serves_until_sigterm(python_exe, subprocess_env):
    exe = str(Path(python_exe).with_name("kibble"))
    proc = subprocess.Popen([exe, "broker", "--port", "0"], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "broker listening on mqtt://127.0.0.1:" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        assert (asyncio.run(roundtrip(url))).kind == "ping"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
