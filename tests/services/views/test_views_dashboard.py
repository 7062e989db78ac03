"""``kibble dashboard`` in a real browser (Debian's chromium, driven by Playwright) against a
NIST-4 stack in lockstep: the page loads and its z trace moves, a daemon's panel says armed,
a parameter set from the page changes it on the bus (read back with ``kibble param get``), an
out-of-range value shows the daemon's refusal and changes nothing, a command asks for a
confirmation, and a browser that stops reading loses display pushes while the dashboard keeps
reading the bus."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.viewstack import eventually, make_stack, proportional_gain, request, start_view, stop_view

pytestmark = [pytest.mark.broker, pytest.mark.asyncio(loop_scope="module")]
CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(broker, tmp_path_factory):
    async with make_stack(broker, tmp_path_factory.mktemp("views-dash")) as stack:
        await request(stack, "servo", "mode", mode="force")
        yield stack


@pytest.fixture(scope="module")
def dashboard_process(stack, subprocess_env):
    proc, line = start_view(["dashboard", "--broker", stack.broker_url, "--instrument", stack.instrument,
                             "--port", "0"], subprocess_env, "http://")
    yield proc, line.split()[1]
    stop_view(proc)


@pytest.fixture(scope="module")
def dashboard(dashboard_process):
    return dashboard_process[1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def page(dashboard):
    if not HAVE_CHROMIUM:
        pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium as root; "
                    "this machine could not")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1500, "height": 1300})
        await page.goto(dashboard)
        yield page
        await browser.close()


async def test_the_page_loads_and_the_z_trace_moves(page, tmp_path):
    n0 = await eventually(lambda: page.evaluate("(state.data.daq || {t: []}).t.length"))
    t0 = await page.evaluate("state.data.daq.t[state.data.daq.t.length - 1]")
    await asyncio.sleep(1.0)
    t1 = await page.evaluate("state.data.daq.t[state.data.daq.t.length - 1]")
    assert t1 > t0 and n0 > 0
    z = await page.evaluate("state.charts[0].plot.data[1].filter(v => v !== null)")
    assert z and all(abs(v) < 1e-6 for v in z)     # the null held: within a micrometre
    assert "m" in await page.inner_text(".chart h3 .now")
    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


async def test_a_daemon_panel_shows_armed(page):
    state = page.locator('.panel[data-service="current_source"] .state')
    await state.wait_for()
    assert (await state.inner_text()).lower() == "armed"
    # the simulator's node has its panel too (its status is a Status like any daemon's)
    assert await page.locator('.panel[data-service="sim"]').count() == 1


async def param_get(stack, name: str) -> float:
    """``kibble param get servo NAME`` as a user types it (the CLI's main, in a thread: it runs
    its own event loop), its printed value."""
    from kibble.services.cli.main import main

    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return main(["param", "get", "servo", name, "--broker", stack.broker_url,
                         "--instrument", stack.instrument])

    assert await asyncio.get_running_loop().run_in_executor(None, run) == 0
    return float(out.getvalue().split("=")[1].split()[0])


async def set_from_page(page, name: str, value: str) -> str:
    await page.click('button[data-tab="servo"]')
    box = page.locator(f'input[data-param="{name}"]')
    await box.fill(value)
    before = await page.inner_text("#param-reply")
    await page.click(f'button[data-set="{name}"]')

    async def changed() -> bool:
        return await page.inner_text("#param-reply") != before

    await eventually(changed)
    return await page.inner_text("#param-reply")


async def test_a_parameter_set_from_the_page(page, stack):
    kp = await proportional_gain(stack)
    new = kp["value"] * 1.05
    assert kp["min"] <= new <= kp["max"]
    reply = await set_from_page(page, kp["name"], f"{new:.6g}")
    assert "refused" not in reply and kp["name"] in reply
    assert await param_get(stack, kp["name"]) == pytest.approx(float(f"{new:.6g}"))
    # the audit event reaches the log
    await eventually(lambda: page.locator("#events li", has_text="audit").count())

    beyond = kp["max"] * 10 if kp["max"] else -1.0
    reply = await set_from_page(page, kp["name"], f"{beyond:g}")
    assert reply.startswith("refused:") and ("maximum" in reply or "minimum" in reply), reply
    assert await param_get(stack, kp["name"]) == pytest.approx(float(f"{new:.6g}"))
    await request(stack, "servo", "param.set", name=kp["name"], value=kp["value"])


async def test_a_command_asks_first(page, stack):
    button = page.locator('button[data-cmd]', has_text="idle")
    await button.click()
    dialog = page.locator("#confirm")
    assert await dialog.is_visible()
    assert "moves or energizes" in await page.inner_text("#confirm-text")
    await page.click('#confirm button[value="cancel"]')
    assert (await request(stack, "servo", "state"))["mode"] == "force"


async def test_a_browser_that_stops_reading_stalls_nothing(dashboard):
    """A websocket whose reader never reads (a 4 kB receive buffer): its pushes pile up at the
    server until they are dropped, and the dashboard goes on reading the bus: its newest
    trace bin stays within a second of now."""
    host, port = dashboard.split("//")[1].strip("/").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert b"101" in sock.recv(200)
    try:
        async with aiohttp.ClientSession() as http:
            async def state() -> dict:
                async with http.get(f"{dashboard}api/state") as r:
                    return await r.json()

            async def dropped() -> dict | None:
                s = await state()
                return s if s["dropped_total"] > 0 else None

            t0 = time.monotonic()
            s = await eventually(dropped, timeout_s=30.0, every_s=0.5)
            assert s["now_utc_s"] - s["traces"]["daq"]["t"][-1] < 1.0, time.monotonic() - t0
            frames = s["counters"]["frames"]
            await asyncio.sleep(1.0)
            s = await state()
            assert s["counters"]["frames"] > frames
            assert s["now_utc_s"] - s["traces"]["daq"]["t"][-1] < 1.0
    finally:
        sock.close()


@pytest.mark.parametrize("auth, good, bad", [
    (("token", "s3cret"), {"params": {"token": "s3cret"}}, {"params": {"token": "wrong"}}),
    (("basic", "op", "pw"), {"headers": {"Authorization": "Basic " + base64.b64encode(b"op:pw").decode()}},
     {"headers": {"Authorization": "Basic " + base64.b64encode(b"op:no").decode()}}),
])
async def test_auth_when_configured(auth, good, bad):
    """With a token or basic auth configured, a request without it or with a wrong one is
    refused (401), with it answered (the view need not be connected for that)."""
    from aiohttp.test_utils import TestClient, TestServer

    from kibble.services.views.dashboard import Dashboard
    from kibble.services.views.model import BusView

    dash = Dashboard(BusView("mqtt://127.0.0.1:1", "authtest"), auth)
    async with TestClient(TestServer(dash.app)) as client:
        assert (await client.get("/api/state")).status == 401
        assert (await client.get("/api/state", **bad)).status == 401
        assert (await client.get("/api/state", **good)).status == 200
        assert (await client.get("/", **good)).status == 200


async def test_read_auth_refuses_half_a_configuration(tmp_path):
    from kibble.services.views.dashboard import read_auth

    (tmp_path / "pw").write_text("pw\n")
    (tmp_path / "empty").write_text("")
    assert read_auth("op", str(tmp_path / "pw"), None) == ("basic", "op", "pw")
    with pytest.raises(ValueError, match="both --user and --password-file"):
        read_auth("op", None, None)
    with pytest.raises(ValueError, match="not both"):
        read_auth("op", str(tmp_path / "pw"), str(tmp_path / "pw"))
    with pytest.raises(ValueError, match="is empty"):
        read_auth(None, None, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot read"):
        read_auth(None, None, str(tmp_path / "missing"))


async def test_a_view_runs_on_what_cpu_the_daemons_leave(dashboard_process, subprocess_env):
    """A view's process is SCHED_IDLE unless told otherwise (``--process``), and a setting the
    system refuses stops it with a message naming the setting."""
    proc, _ = dashboard_process
    assert os.sched_getscheduler(proc.pid) == os.SCHED_IDLE
    refused = subprocess.run([str(Path(sys.executable).with_name("kibble")), "dashboard", "--process",
                              "sched_policy=fifo", "--broker", "mqtt://127.0.0.1:1"],
                             env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "sched_priority" in refused.stderr, refused.stderr
