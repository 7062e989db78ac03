"""deploy/: the broker ACL enforces the three roles on a real mosquitto."""

import asyncio
import getpass
import shutil
import subprocess

import aiomqtt
import pytest

from kibble.services.broker import free_port, wait_for_port

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
PASSWORDS = {"kibble-services": "s3rv", "kibble-operator": "0per", "kibble-viewer": "v1ew"}

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not (shutil.which("mosquitto") and shutil.which("mosquitto_passwd")),
                                 reason="needs mosquitto and mosquitto_passwd")]


@pytest.fixture
async def acl_broker(tmp_path):
    pwfile = tmp_path / "passwd"
    for i, (user, pw) in enumerate(PASSWORDS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(pwfile), user, pw],
                       check=True, capture_output=True)
    pwfile.chmod(0o600)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # started as root, mosquitto would drop to user "mosquitto", who cannot read tmp_path
    conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
                    f"password_file {pwfile}\nacl_file {DEPLOY / 'mosquitto.acl'}\n")
    proc = await asyncio.create_subprocess_exec("mosquitto", "-c", str(conf),
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_for_port("127.0.0.1", port, 10.0, proc)
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


def client(port, user, role):
    return aiomqtt.Client("127.0.0.1", port, username=user, password=PASSWORDS[user],
                          identifier=f"acl-test-{role}")


async def delivered(port, publisher, topic):
    """Whether a publish by ``publisher`` on ``topic`` reaches a services subscriber."""
    async with client(port, "kibble-services", "sub") as sub, client(port, publisher, "pub") as pub:
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, b"x", qos=1)
        try:
            async with asyncio.timeout(0.5):
                async for _ in sub.messages:
                    return True
        except TimeoutError:
            return False


async def test_operator_commands_but_never_drives_hardware(acl_broker):
    assert await delivered(acl_broker, "kibble-operator", "kb/nist4/servo/cmd")
    assert not await delivered(acl_broker, "kibble-operator", "kb/nist4/hw/main_source")
    assert not await delivered(acl_broker, "kibble-operator", "kb/nist4/servo/params")


async def test_viewer_reads_only(acl_broker):
    assert not await delivered(acl_broker, "kibble-viewer", "kb/nist4/servo/cmd")


async def test_services_drive_hardware(acl_broker):
    assert await delivered(acl_broker, "kibble-services", "kb/nist4/hw/main_source")
