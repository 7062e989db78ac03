"""Shared fixtures: a real MQTT broker on a free loopback port, started once per test session.

The broker is mosquitto when it is on PATH, else amqtt (``kibble.services.harness.broker.Broker``
decides). It runs in a thread of its own with its own event loop, so synchronous tests,
subprocess tests and every asyncio test (each on its own loop) can share it, and a test can
restart it on the same port with :meth:`BrokerHandle.restart`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from kibble.services.harness.broker import Broker
from kibble.services.harness.inprocess import compile_kernels

ROOT = Path(__file__).resolve().parents[1]


class BrokerHandle:
    """A :class:`Broker` running on a private event loop in a daemon thread."""

    def __init__(self, backend: str = "auto") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-broker",
                                        daemon=True)
        self._thread.start()
        self.broker = Broker(backend=backend)
        self._call(self.broker.__aenter__())

    def _call(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def backend(self) -> str:
        return self.broker.backend

    def stop(self, kill: bool = False) -> None:
        """Stop the broker process (the port stays reserved for :meth:`start`)."""
        self._call(self.broker.stop(kill=kill))

    def start(self) -> None:
        """Start it again on the same port."""
        self._call(self.broker.start())

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self._call(self.broker.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            self._loop.close()


@pytest.fixture(scope="session", autouse=True)
def numba_cache():
    """Every numba kernel compiled into the on-disk cache before the first test: a cold cache
    would otherwise make the first process to step a plant (a test's or a ``kibble sim``
    child's) slower than the test's timeouts."""
    compile_kernels()


@pytest.fixture(scope="session")
def broker():
    """The session's broker (``.url``, ``.backend``, ``.restart()``)."""
    handle = BrokerHandle()
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture(scope="session")
def subprocess_env():
    """Environment for child processes: the repository root importable (so ``tests.*``
    modules can be loaded as ``kibble service tests.x:Class``) and unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
