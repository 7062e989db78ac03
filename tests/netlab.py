"""Several hosts on one machine: network namespaces joined by veth pairs to a bridge.

:class:`Lab` gives each named host a network namespace with one interface, ``eth0``, at
``10.X.Y.<n>/24``; the other end of its veth pair is a port of a bridge in the root namespace,
which has ``10.X.Y.254`` (:attr:`Lab.root_address`): the root namespace is one more host (the
one the test runs on). A program runs on a host under :meth:`Lab.exec` (``ip netns exec``).
:meth:`Lab.netem` puts a ``tc netem`` qdisc on both ends of every link (each direction of each
link delayed or lossy); :meth:`Lab.partition` takes a host's link down, :meth:`Lab.heal` brings
it back.

Needs root and iproute2 (:func:`unavailable` says why not, for a skip). Every name carries a
tag unique to the run (a leftover of a killed run never collides) and everything is removed
on exit, after a failure too.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from typing import Sequence


class LabError(RuntimeError):
    """An ``ip`` or ``tc`` command failed (the text has the command and its stderr)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit code {proc.returncode}'}")
    return proc


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (None if they can)."""
    if shutil.which("ip") is None:
        return "ip (iproute2) is not on PATH"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"kibble-probe-{secrets.token_hex(4)}"
    probe = _run("ip", "netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"'ip netns add' refused: {probe.stderr.strip()}"
    _run("ip", "netns", "del", name, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no interface of the root namespace is on."""
    used = []
    for line in _run("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{200 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise LabError("no free 10.200.0.0/13 subnet for the lab")


class Lab:
    """The hosts ``hosts`` (names), each in its own network namespace (see the module docstring)."""

    def __init__(self, hosts: Sequence[str]) -> None:
        if not hosts or len(set(hosts)) != len(hosts) or len(hosts) > 250:
            raise ValueError(f"a lab needs 1..250 distinct host names, got {list(hosts)}")
        self.hosts = list(hosts)
        self.tag = secrets.token_hex(3)
        self.bridge = f"kb{self.tag}br"
        self.netns = {h: f"kibble-{self.tag}-{h}" for h in self.hosts}
        self.port = {h: f"kb{self.tag}p{i}" for i, h in enumerate(self.hosts)}
        """The root namespace's end of each host's veth pair (a bridge port)."""
        self.subnet: ipaddress.IPv4Network | None = None
        self._made: list[tuple[str, ...]] = []
        """Undo commands, in the order they are to run."""

    def __enter__(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self.subnet = _free_subnet()
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.insert(0, ("ip", "link", "del", self.bridge))
        _run("ip", "addr", "add", f"{self.root_address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for host in self.hosts:
            ns, port = self.netns[host], self.port[host]
            _run("ip", "netns", "add", ns)
            self._made.append(("ip", "netns", "del", ns))
            _run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._made.insert(0, ("ip", "link", "del", port))  # takes its peer with it
            _run("ip", "link", "set", port, "master", self.bridge, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")

    def close(self) -> None:
        """Remove every veth, namespace and the bridge made (errors collected, raised at the end)."""
        errors = []
        made, self._made = self._made, []
        for argv in made:
            proc = _run(*argv, check=False)
            if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
                errors.append(f"{' '.join(argv)}: {proc.stderr.strip()}")
        if errors:
            raise LabError("lab clean-up: " + "; ".join(errors))

    # ------------------------------------------------------------------ addresses, programs

    @property
    def root_address(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 254)

    def address(self, host: str) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1 + self.hosts.index(host))

    def exec(self, host: str) -> tuple[str, ...]:
        """The command prefix that runs a program on ``host``."""
        return ("ip", "netns", "exec", self.netns[host])

    # ------------------------------------------------------------------ the links

    def _ends(self) -> list[tuple[tuple[str, ...], str]]:
        """Both ends of every link: (command prefix of its namespace, device)."""
        return [end for host in self.hosts for end in (((), self.port[host]), (self.exec(host), "eth0"))]

    def netem_unavailable(self) -> str | None:
        """Why ``tc netem`` cannot be used on the links (None if it can), tried on one of them."""
        if shutil.which("tc") is None:
            return "tc (iproute2) is not on PATH"
        port = self.port[self.hosts[0]]
        probe = _run("tc", "qdisc", "replace", "dev", port, "root", "netem", "delay", "0.2ms", check=False)
        if probe.returncode != 0:
            return f"tc netem refused ({probe.stderr.strip()}): this kernel has no sch_netem"
        _run("tc", "qdisc", "del", "dev", port, "root")
        return None

    def netem(self, *spec: str) -> None:
        """``tc qdisc replace ... root netem SPEC`` on both ends of every link, e.g.
        ``netem("delay", "0.2ms")``: each direction of each link gets it."""
        for prefix, dev in self._ends():
            _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "netem", *spec)

    def partition(self, host: str) -> None:
        """Cut ``host`` off: its link goes down (nothing in or out, no reset sent)."""
        _run("ip", "link", "set", self.port[host], "down")

    def heal(self, host: str) -> None:
        _run("ip", "link", "set", self.port[host], "up")
