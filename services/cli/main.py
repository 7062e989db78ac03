"""The ``kibble`` command line.

Every command that talks to the bus takes ``--broker mqtt[s]://[user@]host:port`` (with
``--broker-user``, ``--broker-password-file``, ``--broker-ca``, ``--broker-cert``,
``--broker-key``; see :mod:`kibble.bus_schema.transport`, "Broker URLs") and
``--instrument ID``. Exit status: 0 on success, 1 when a request was rejected or timed out,
2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import msgspec

from kibble.bus_schema import realtime
from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.instruments import INSTRUMENTS
from kibble.bus_schema.messages import Reply, Status
from kibble.bus_schema.topics import Topics, message_type_for
from kibble.bus_schema.transport import redact_url, with_options
from kibble.services.runtime.client import DEFAULT_BROKER, BusClient, BusError, follow


def _env_broker() -> str:
    return os.environ.get("KIBBLE_BROKER", DEFAULT_BROKER)


def _env_instrument() -> str:
    return os.environ.get("KIBBLE_INSTRUMENT", "nist4")


def parse_value(text: str) -> Any:
    """Turn a CLI word into a scalar: true/false, an int, a float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_assignments(items: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` words to ``{NAME: VALUE}`` (values left as text); ``ValueError`` naming
    the first word that is not of that form."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` words to ``{NAME: scalar}`` (:func:`parse_value`); exits on a bad word."""
    try:
        return {key: parse_value(value) for key, value in split_assignments(items).items()}
    except ValueError as exc:
        raise SystemExit(f"kibble: {exc}") from None


# ---------------------------------------------------------------------------- decoding for display

def decode_for_display(topic: str, payload: bytes) -> tuple[str, Any]:
    """Best-effort typed decode of any bus message from its topic; (type name, builtins)."""
    msg_type = message_type_for(topic)
    if msg_type is not None:
        try:
            return msg_type.__name__, msgspec.to_builtins(decode(payload, msg_type))
        except DecodeError:
            pass
    try:
        return "msgpack", msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return "bytes", payload.hex()


# ---------------------------------------------------------------------------- commands


def status_table(statuses: list[Status], stale_after_s: float = 3.0) -> str:
    """One line per service: state, heartbeat age, counters, real-time timing and its detail.

    A row whose heartbeat is older than ``stale_after_s`` is marked ``(stale)``: what it shows
    may no longer be true."""
    now = time.time()
    header = (f"{'service':<16}{'state':<10}{'online':<8}{'session':>8}{'hb age s':>9}{'in':>9}"
              f"{'out':>9}{'rej':>5}{'skip':>7}{'late':>7}{'ovr':>6}{'old':>5}{'cpu us':>8}"
              f"{'p99':>7}{'age ms':>8}{'p99':>7}{'load':>6}  detail")
    lines = [header, "-" * len(header)]
    for status in sorted(statuses, key=lambda s: s.service):
        c, t = status.counters, status.timing
        age = now - status.t_utc_s if status.t_utc_s else float("nan")
        state = status.state + (" (stale)" if status.online and not age <= stale_after_s else "")
        detail = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in status.detail.items())
        lines.append(f"{status.service:<16}{state:<10}{str(status.online).lower():<8}"
                     f"{status.session:>8}{age:>9.1f}{c.get('frames_in', 0):>9}"
                     f"{c.get('frames_out', 0):>9}{c.get('rejected', 0):>5}"
                     f"{c.get('frames_skipped', 0):>7}{c.get('late', 0):>7}{c.get('overruns', 0):>6}"
                     f"{c.get('too_old', 0):>5}{t.cpu_us_p50:>8.0f}{t.cpu_us_p99:>7.0f}"
                     f"{t.age_ms_p50:>8.2f}{t.age_ms_p99:>7.2f}{t.cpu_load:>6.2f}  {detail}")
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace) -> int:
    async with BusClient(args.broker, args.instrument) as bus:
        items = await bus.collect(bus.topics.all_of("status"), args.wait)
    rows = {}
    for topic, payload in items:
        try:
            rows[topic] = decode(payload, Status)
        except DecodeError as exc:
            print(f"kibble: {topic}: {exc}", file=sys.stderr)
    if not rows:
        print(f"no services seen on instrument {args.instrument!r} at {redact_url(args.broker)}")
        return 0
    print(status_table(list(rows.values())))
    return 0


def _print_reply(reply: Reply) -> int:
    if not reply.ok:
        print(f"kibble: {reply.service} rejected the request: {reply.error}", file=sys.stderr)
        return 1
    result = reply.result
    if "params" in result:
        print(f"{'name':<28}{'value':>16}  {'unit':<10}{'range':<26}doc")
        for p in result["params"]:
            rng = f"[{p['min']}, {p['max']}]" if p["min"] is not None or p["max"] is not None else ""
            print(f"{p['name']:<28}{p['value']!s:>16}  {p['unit']:<10}{rng:<26}{p['doc']}")
    elif "old" in result:
        print(f"{result['name']}: {result['old']!r} -> {result['value']!r}")
    elif "value" in result:
        print(f"{result['name']} = {result['value']!r} {result.get('unit', '')}".rstrip())
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


async def cmd_param(args: argparse.Namespace) -> int:
    if args.action in ("get", "set") and not args.name:
        raise SystemExit(f"kibble: param {args.action} needs a parameter NAME")
    if args.action == "set" and args.value is None:
        raise SystemExit("kibble: param set needs a VALUE")
    request = {"list": ("param.list", {}), "get": ("param.get", {"name": args.name}),
               "set": ("param.set", {"name": args.name, "value": parse_value(args.value or "")}),
               "revert": ("param.revert", {})}[args.action]
    async with BusClient(args.broker, args.instrument, client_id=args.client_id) as bus:
        reply = await bus.request(args.service, *request, timeout_s=args.timeout)
    return _print_reply(reply)


async def cmd_cmd(args: argparse.Namespace) -> int:
    async with BusClient(args.broker, args.instrument, client_id=args.client_id) as bus:
        reply = await bus.request(args.service, args.command, parse_assignments(args.args),
                                  timeout_s=args.timeout)
    return _print_reply(reply)


async def cmd_watch(args: argparse.Namespace) -> int:
    count = 0
    async with BusClient(args.broker, args.instrument) as bus:
        async for topic, payload in bus.subscribe(args.pattern):
            kind, body = decode_for_display(topic, payload)
            print(f"{topic} {kind} {json.dumps(body, default=str, separators=(',', ':'))}", flush=True)
            count += 1
            if args.count and count >= args.count:
                return 0
    return 0


async def cmd_service(args: argparse.Namespace) -> int:
    from kibble.services.runtime.registry import service_class
    from kibble.services.runtime.credentials import child_url
    from kibble.services.runtime.service import load_config, run_together

    names = [n for n in args.name.split(",") if n]
    # --broker, else $KIBBLE_BROKER, else the configuration's broker key, else the default
    broker = args.broker or os.environ.get("KIBBLE_BROKER") or None
    try:
        classes = [service_class(n) for n in names]
    except ValueError as exc:
        raise SystemExit(f"kibble: {exc}") from None
    group = [cls.name for cls in classes]
    params, settings = parse_assignments(args.param), parse_assignments(args.setting)
    services = []
    for cls in classes:
        try:
            url = broker if args.credentials is None else child_url(
                broker or DEFAULT_BROKER, cls.name, args.credentials)
            config = load_config(cls.name, args.config, broker=url, instrument=args.instrument,
                                 broker_user=args.broker_user,
                                 broker_password_file=args.broker_password_file,
                                 broker_ca_file=args.broker_ca, broker_cert_file=args.broker_cert,
                                 broker_key_file=args.broker_key,
                                 state_dir=args.state_dir, params=_for_member(params, cls.name, group),
                                 settings=_for_member(settings, cls.name, group),
                                 process=split_assignments(args.process) or None,
                                 restore=False if args.no_restore else None, clock=args.clock)
            services.append(cls(config))
        except ValueError as exc:
            raise SystemExit(f"kibble: {cls.name}: {exc}") from None
    for service in services:
        print(f"{service.name}: session {service.session} on {redact_url(service.config.broker)}, "
              f"instrument {service.config.instrument}", flush=True)
    try:
        if len(services) == 1:
            await services[0].run()
        else:
            await run_together(services)
    except ValueError as exc:  # e.g. process settings the system refused
        raise SystemExit(f"kibble: {args.name}: {exc}") from None
    return 0


def _for_member(values: dict[str, Any], name: str, group: list[str]) -> dict[str, Any]:
    """The ``NAME=VALUE`` items for daemon ``name`` of a group: unqualified ones apply to every
    member, ``SERVICE.NAME=VALUE`` only to that member (``ValueError`` for a non-member)."""
    out = {}
    for key, value in values.items():
        member, dot, rest = key.partition(".")
        if not dot:
            out[key] = value
        elif member not in group:
            raise ValueError(f"{key}: {member} is not one of the daemons run here ({', '.join(group)})")
        elif member == name:
            out[rest] = value
    return out


async def cmd_broker(args: argparse.Namespace) -> int:
    from kibble.services.harness.broker import serve_forever

    await serve_forever(args.host, args.port, args.backend)
    return 0


async def cmd_sim(args: argparse.Namespace) -> int:
    from kibble.hil_sim.params import load_overrides_file
    from kibble.hil_sim.server import SimServer
    from kibble.hil_sim.params import parse_override

    overrides = load_overrides_file(args.params) if args.params else {}
    overrides.update(dict(parse_override(item) for item in args.param))
    expect = [d for item in args.expect for d in item.split(",") if d]
    from kibble.bus_schema.process import apply_process_settings, process_settings

    try:
        for line in apply_process_settings(process_settings(split_assignments(args.process))):
            print(f"sim: process {line}", flush=True)
    except ValueError as exc:
        raise SystemExit(f"kibble sim: {exc}") from None
    server = SimServer(model=args.model, clock=args.clock, rate_hz=args.rate, seed=args.seed, noise=args.noise,
                       params=overrides, broker_url=args.broker, instrument=args.instrument,
                       expect=expect, lockstep_timeout_s=args.lockstep_timeout,
                       drop_after_misses=args.drop_after, truth_every=args.truth_every,
                       max_frames=args.frames, client_id=args.client_id)
    print(f"sim: {args.model} {args.clock} at {args.rate:g} Hz, seed {args.seed}, noise {args.noise}, "
          f"on {redact_url(args.broker)}, "
          f"instrument {args.instrument}", flush=True)
    await server.run()
    return 0


def _per_service(values: dict[str, Any], flag: str) -> dict[str, dict[str, Any]]:
    """``SERVICE.NAME=VALUE`` items of ``kibble up`` to ``{SERVICE: {NAME: VALUE}}``; exits
    naming ``flag`` on a word without a service."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        service, dot, name = key.partition(".")
        if not dot or not service or not name:
            raise SystemExit(f"kibble up: {flag} wants SERVICE.NAME=VALUE, got {key!r}")
        out.setdefault(service, {})[name] = value
    return out


async def cmd_up(args: argparse.Namespace) -> int:
    import signal

    from kibble.services.harness.up import Stack

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = _per_service(parse_assignments(args.setting), "--setting")
    try:
        process = _per_service(split_assignments(args.process), "--process")
        together = (() if args.separate else
                    None if args.together is None else
                    tuple(tuple(n for n in g.split(",") if n) for g in args.together))
        stack = Stack(args.sim, clock=args.clock, rate_hz=args.rate, broker_url=args.broker,
                      seed=args.seed, noise=args.noise, run_dir=args.run_dir, arm=not args.no_arm,
                      settings=settings,
                      measurement=args.measurement, together=together, process=process,
                      credentials_dir=args.credentials)
    except ValueError as exc:
        raise SystemExit(f"kibble up: {exc}") from None
    async with stack:
        assert stack.broker_url is not None
        print(f"up: {args.sim} on {redact_url(stack.broker_url)} (instrument {stack.instrument}); "
              f"Ctrl-C stops everything", flush=True)
        statuses: dict[str, Status] = {}

        def lost(text: str) -> None:
            print(f"up: {text}; reconnecting (the table rows go stale)", flush=True)

        broker_url = stack.broker_url  # not None (asserted above), kept so for the closure

        async def follow_statuses() -> None:
            async for topic, payload in follow(broker_url, stack.instrument,
                                               Topics(stack.instrument).all_of("status"), on_lost=lost):
                with contextlib.suppress(DecodeError):
                    statuses[topic] = decode(payload, Status)

        follower = asyncio.create_task(follow_statuses())
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), args.status_every)
            if statuses and not stop.is_set():
                print(status_table(list(statuses.values())), "\n", flush=True)
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    print("up: stopped", flush=True)
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from kibble.services.harness.demo import format_table, run_demo

    rows = await run_demo(rate_hz=args.rate, run_dir=args.run_dir, noise=args.noise,
                          say=lambda line: print(line, flush=True))
    print()
    print(format_table(rows))
    missed = [r[0] for r in rows if r[4] == "MISSED"]
    if missed:
        print(f"demo: missed the target of {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    try:
        params = split_assignments(args.param)
    except ValueError as exc:
        print(f"kibble measure: --param: {exc}", file=sys.stderr)
        return 2
    if not args.offline:
        from kibble.services.cli.measure import cli_measure_live

        typed = {key: parse_value(value) for key, value in params.items()}
        return asyncio.run(cli_measure_live(args.plan, typed, args.repeat, args.run_id,
                                            args.broker, args.instrument, args.timeout,
                                            args.json, args.plots))
    from kibble.services.harness.campaign import cli_measure_offline

    return cli_measure_offline(args.plan, params, args.seed, args.json, args.plots, noise=args.noise)


def cmd_analyze(args: argparse.Namespace) -> int:
    from kibble.services.data.runanalysis import cli_analyze

    return cli_analyze(args.run, args.json, args.plots, args.budget)


def cmd_realization(args: argparse.Namespace) -> int:
    from kibble.services.cli.realization import cli_compare, cli_xrcd

    if args.command == "xrcd":
        return cli_xrcd(args.file, args.json)
    return cli_compare(args.file, args.with_results, args.plots, args.json, args.consistent_subset,
                       args.reference_kg)


def cmd_export(args: argparse.Namespace) -> int:
    from kibble.services.data.export import cli_export

    return cli_export(args.run, args.hdf5_path)


def _view_process(args: argparse.Namespace) -> None:
    """Apply a view's process settings (:data:`kibble.services.views.PROCESS` under
    ``--process``); exits naming a setting the system refuses."""
    from kibble.bus_schema.process import apply_process_settings, process_settings
    from kibble.services.views import PROCESS

    try:
        for line in apply_process_settings(process_settings({**PROCESS, **split_assignments(args.process)})):
            print(f"{args.command}: process {line}", flush=True)
    except ValueError as exc:
        raise SystemExit(f"kibble {args.command}: {exc}") from None


async def cmd_dashboard(args: argparse.Namespace) -> int:
    from kibble.services.views.dashboard import read_auth, serve

    auth = read_auth(args.user, args.password_file, args.token_file)
    _view_process(args)
    await serve(args.broker, args.instrument, args.host, args.port, auth,
                ready=lambda port: print(f"dashboard: http://{args.host}:{port}/ (instrument "
                                         f"{args.instrument} on {redact_url(args.broker)})", flush=True))
    return 0


async def cmd_epics(args: argparse.Namespace) -> int:
    from kibble.services.views.epics import serve, split_fields

    fields = split_fields(args.fields) if args.fields is not None else None
    _view_process(args)
    await serve(args.broker, args.instrument, args.prefix, fields, args.rate,
                ready=lambda base: print(f"epics: PVs {base}<service>:<name> of instrument "
                                         f"{args.instrument} on {redact_url(args.broker)}", flush=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kibble.services.bench.suite import run_benchmarks

    realtime = {key: value for key, value in (("seconds", args.rt_seconds), ("cases", args.rt_cases),
                                              ("settle_s", args.rt_settle)) if value is not None}
    soak = {key: value for key, value in (("seconds", args.soak_seconds), ("case", args.soak_case))
            if value is not None}
    fidelity = {key: value for key, value in (("triplets", args.fidelity_triplets),
                                              ("seed", args.fidelity_seed)) if value is not None}
    results = run_benchmarks(args.only, broker=args.broker_url,
                             progress=lambda s: print(s, file=sys.stderr, flush=True),
                             group_args={"realtime": realtime, "soak": soak, "fidelity": fidelity})
    text = json.dumps(results, indent=2, sort_keys=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    print(text)
    return 0


# ---------------------------------------------------------------------------- parser


def _noise_profile(text: str) -> str:
    """``--noise``: one of the simulator's noise profiles (checked here, on parsing, so that a
    command without the option, ``kibble analyze``, never loads the simulator's package)."""
    from kibble.hil_sim.params import NOISE_PROFILES

    if text not in NOISE_PROFILES:
        raise argparse.ArgumentTypeError(f"unknown noise profile {text!r}; one of {', '.join(NOISE_PROFILES)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kibble", description=__doc__.splitlines()[0])

    def auth_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("broker identity and TLS (each also $KIBBLE_BROKER_USER, "
                                 "$KIBBLE_BROKER_PASSWORD_FILE, $KIBBLE_BROKER_PASSWORD, "
                                 "$KIBBLE_BROKER_CA, $KIBBLE_BROKER_CERT, $KIBBLE_BROKER_KEY)")
        g.add_argument("--broker-user", default=None, metavar="USER",
                       help="user name (the URL's user@ wins)")
        g.add_argument("--broker-password-file", default=None, metavar="PATH",
                       help="file whose first line is the password (keeps it off the command line)")
        g.add_argument("--broker-ca", default=None, metavar="PATH",
                       help="mqtts://: CA certificate(s) of the broker (default: the system's)")
        g.add_argument("--broker-cert", default=None, metavar="PATH",
                       help="mqtts://: client certificate")
        g.add_argument("--broker-key", default=None, metavar="PATH",
                       help="mqtts://: key of the client certificate")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def bus_args_no_timeout(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", default=_env_broker(),
                       help="broker URL mqtt[s]://[user@]host:port (default $KIBBLE_BROKER or %(default)s)")
        p.add_argument("--instrument", default=_env_instrument(),
                       help="instrument id, first topic level after kb/ (default %(default)s)")
        auth_args(p)

    def view_process_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--process", action="append", default=[], metavar="NAME=VALUE",
                       help="process setting, as for kibble service (repeatable; default "
                            "sched_policy=idle: the view runs on what CPU the daemons leave)")

    def noise_arg(p: argparse.ArgumentParser, where: str = "") -> None:
        p.add_argument("--noise", type=_noise_profile, default="published", metavar="PROFILE",
                       help=f"{where}the simulator's noise profile: published (as noisy as the "
                            "seeds' instruments), quiet (the small, known noise tests use) or off "
                            "(default %(default)s)")

    def bus_args(p: argparse.ArgumentParser) -> None:
        bus_args_no_timeout(p)
        p.add_argument("--timeout", type=float, default=5.0, help="reply timeout in s")
        p.add_argument("--client-id", default=None, help="client id recorded in audit events")

    p = sub.add_parser("deploy-credentials",
                       help="one broker identity per daemon: mosquitto password file, ACL, 0600 secrets")
    from kibble.services.runtime import credentials
    credentials.add_arguments(p)
    p.set_defaults(func=credentials.run, is_async=False)

    p = sub.add_parser("broker", help="run an MQTT broker in the foreground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883, help="TCP port, 0 for a free one")
    p.add_argument("--backend", choices=("auto", "mosquitto", "amqtt"), default="auto")
    p.set_defaults(func=cmd_broker, is_async=True)

    p = sub.add_parser("service", help="run one daemon (a registered NAME or module:Class), or "
                                       "several in one process: NAME,NAME,...")
    p.add_argument("name")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="initial parameter value (repeatable; wins over the state file)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="service setting (repeatable; wins over the configuration file)")
    p.add_argument("--state-dir", type=Path, default=None, help="where tuned values persist")
    p.add_argument("--no-restore", action="store_true", help="ignore the saved state file")
    p.add_argument("--clock", choices=("realtime", "lockstep"), default=None,
                   help="the hardware's clock (default realtime; lockstep: no wall-clock age limit)")
    p.add_argument("--credentials", type=Path, default=None, metavar="DIR",
                   help="connect each daemon as kibble-NAME with the password in "
                        "DIR/kibble-NAME.password (kibble deploy-credentials writes them)")
    p.add_argument("--process", action="append", default=[], metavar="NAME=VALUE",
                   help="process setting: cpu_affinity=0,1 sched_policy=fifo|rr|other|batch|idle "
                        "sched_priority=1..99 nice=-20..19 (repeatable)")
    bus_args(p)
    p.set_defaults(broker=None)  # so that the configuration's broker key counts
    p.set_defaults(func=cmd_service, is_async=True)

    p = sub.add_parser("status", help="table of every service seen on the bus")
    p.add_argument("--wait", type=float, default=0.5, help="how long to collect retained status (s)")
    bus_args(p)
    p.set_defaults(func=cmd_status, is_async=True)

    p = sub.add_parser("param", help="list, get, set or revert a service's parameters")
    p.add_argument("action", choices=("list", "get", "set", "revert"))
    p.add_argument("service")
    p.add_argument("name", nargs="?")
    p.add_argument("value", nargs="?")
    bus_args(p)
    p.set_defaults(func=cmd_param, is_async=True)

    p = sub.add_parser("cmd", help="send a command to a service: kibble cmd SERVICE COMMAND [k=v ...]")
    p.add_argument("service")
    p.add_argument("command")
    p.add_argument("args", nargs="*", metavar="NAME=VALUE")
    bus_args(p)
    p.set_defaults(func=cmd_cmd, is_async=True)

    p = sub.add_parser("watch", help="print every message on a topic pattern, decoded")
    p.add_argument("pattern", help="MQTT pattern, e.g. 'kb/nist4/+/status' or 'kb/#'")
    p.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    bus_args(p)
    p.set_defaults(func=cmd_watch, is_async=True)

    from kibble.services.views import DEFAULT_FIELDS, DEFAULT_RATE_HZ
    p = sub.add_parser("dashboard", help="serve the instrument's live web page (traces, daemons, "
                                         "parameters, commands, events)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="TCP port, 0 for a free one (default %(default)s)")
    p.add_argument("--user", default=None, help="HTTP basic auth: user name (with --password-file)")
    p.add_argument("--password-file", default=None, metavar="PATH", help="HTTP basic auth: password, first line")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="require this token (first line): open the page as /?token=TOKEN")
    view_process_arg(p)
    bus_args_no_timeout(p)
    p.set_defaults(func=cmd_dashboard, is_async=True)

    p = sub.add_parser("epics", help="serve the bus as EPICS Channel Access PVs (parameters, status, "
                                     "frame fields, commands)")
    p.add_argument("--prefix", default="KB:", help="PV name prefix (default %(default)s)")
    p.add_argument("--fields", default=None, metavar="SERVICE.FIELD,...",
                   help="frame fields published as PVs (default: those of " + ",".join(DEFAULT_FIELDS)
                        + " that the instrument measures)")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE_HZ,
                   help="update rate of the frame-field PVs in Hz (default %(default)s)")
    view_process_arg(p)
    bus_args_no_timeout(p)
    p.set_defaults(func=cmd_epics, is_async=True)

    p = sub.add_parser("sim", help="run the HIL simulator on the bus (speaks hw/ and sim/ topics)")
    p.add_argument("--model", choices=INSTRUMENTS, default="nist4")
    p.add_argument("--clock", choices=("realtime", "lockstep"), default="realtime")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="frame (loop) rate in Hz, a whole number of 10 kHz steps (default %(default)s)")
    p.add_argument("--params", type=Path, help="TOML file of plant parameter overrides")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="plant parameter override, e.g. wheel.q=300 (repeatable; wins over --params)")
    p.add_argument("--seed", type=int, default=0, help="random seed (lockstep runs are reproducible)")
    noise_arg(p)
    p.add_argument("--expect", action="append", default=[], metavar="DEV[,DEV]",
                   help="lockstep: devices that must register before frame 0")
    p.add_argument("--lockstep-timeout", type=float, default=1.0,
                   help="lockstep: wall-clock wait for the answers to a frame before a miss (s)")
    p.add_argument("--drop-after", type=int, default=3,
                   help="lockstep: unregister a device after N consecutive misses (0: never)")
    p.add_argument("--process", action="append", default=[], metavar="NAME=VALUE",
                   help="process setting, as for kibble service (repeatable)")
    p.add_argument("--truth-every", type=int, default=None,
                   help="publish sim/truth every N frames (0: never; default every frame in "
                        "lockstep, at most 100 Hz in realtime)")
    p.add_argument("--frames", type=int, default=0, help="stop after N frames (0: run until stopped)")
    bus_args_no_timeout(p)
    p.add_argument("--client-id", default=None, help="MQTT client id of the simulator")
    p.set_defaults(func=cmd_sim, is_async=True)

    p = sub.add_parser("up", help="start broker, simulator and every daemon; arm and supervise them")
    p.add_argument("--sim", choices=INSTRUMENTS, default="nist4", help="simulated instrument")
    p.add_argument("--clock", choices=("lockstep", "realtime"), default="lockstep")
    p.add_argument("--rate", type=float, default=1000.0, help="frame (loop) rate in Hz")
    p.add_argument("--broker", default=None,
                   help="use this broker (mqtt[s]://[user@]host:port: the identity of kibble up "
                        "itself, an operator); default: start an embedded one")
    auth_args(p)
    p.add_argument("--credentials", type=Path, default=None, metavar="DIR",
                   help="with --broker: give each daemon and the simulator its own identity "
                        "kibble-NAME, password from DIR/kibble-NAME.password "
                        "(kibble deploy-credentials writes them)")
    p.add_argument("--seed", type=int, default=0, help="simulator random seed")
    noise_arg(p)
    p.add_argument("--run-dir", type=Path, default=Path(".state") / "up",
                   help="logs and state files of the daemons")
    p.add_argument("--no-arm", action="store_true", help="leave the actuators disarmed")
    p.add_argument("--measurement", action="store_true",
                   help="also start the recorder and the sequencer (for kibble measure)")
    p.add_argument("--setting", action="append", default=[], metavar="SERVICE.NAME=VALUE",
                   help="a daemon's setting, e.g. damping.watchdog_xy_rms_m=1e-4 (repeatable)")
    p.add_argument("--status-every", type=float, default=5.0, help="status table period (s)")
    p.add_argument("--together", action="append", default=None, metavar="NAME,NAME[,...]",
                   help="daemons that share one process, their frames to each other passed in "
                        "process (repeatable; default: the instrument's hot path above 250 Hz)")
    p.add_argument("--separate", action="store_true", help="every daemon in its own process")
    p.add_argument("--process", action="append", default=[], metavar="SERVICE.NAME=VALUE",
                   help="process setting of a daemon (and so of the process it shares) or the "
                        "sim, e.g. servo.sched_policy=fifo servo.sched_priority=50 sim.cpu_affinity=0")
    p.set_defaults(func=cmd_up, is_async=True)

    p = sub.add_parser("demo", help="the main job: the whole stack on the simulator, scripted (make run)")
    p.add_argument("--rate", type=float, default=200.0, help="frame (loop) rate in Hz")
    p.add_argument("--run-dir", type=Path, default=Path(".state") / "demo",
                   help="logs and state files of the daemons")
    noise_arg(p)
    p.set_defaults(func=cmd_demo, is_async=True)

    p = sub.add_parser("measure", help="run a measurement plan and analyse it (--offline: in process)")
    p.add_argument("--plan", required=True,
                   help="nist4 (a run: velocity sets bracketing a force set) or efb (weighings)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="plan parameter (repeatable); test=true starts from the shortened test plans")
    p.add_argument("--offline", action="store_true",
                   help="run on the in-process closed loop (real daemons, simulated plant, no broker)")
    p.add_argument("--repeat", type=int, default=1,
                   help="live: run the plan N times into one recording (EFB trials need >= 3)")
    p.add_argument("--run-id", default=None, help="live: recording name (default: plan and time)")
    p.add_argument("--timeout", type=float, default=3600.0, help="live: give up after S seconds")
    p.add_argument("--seed", type=int, default=1, help="simulator seed (offline)")
    noise_arg(p, "offline: ")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    p.add_argument("--plots", default=None, metavar="DIR", help="write the analysis plots (PNG)")
    bus_args_no_timeout(p)
    p.set_defaults(func=cmd_measure, is_async=False)

    p = sub.add_parser("analyze", help="turn a recorded run (.kbrun) into a result: h or a mass with uncertainties")
    p.add_argument("run", help="run file written by the recorder")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    p.add_argument("--plots", default=None, metavar="DIR", help="write the analysis plots (PNG)")
    p.add_argument("--budget", choices=("table3", "table1"), default=None,
                   help="add the paper's type B budget (NIST-4 Table III, EFB Table 1)")
    p.set_defaults(func=cmd_analyze, is_async=False)

    p = sub.add_parser("xrcd", help="a 28Si sphere's density, N_A and mass with N_A fixed (XRCD, seed 003)")
    p.add_argument("file", help="sphere file (TOML; examples/si28kg01a.toml)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.set_defaults(func=cmd_realization, is_async=False)
    p = sub.add_parser("compare", help="a key comparison of realizations: KCRV, degrees of equivalence (seed 002)")
    p.add_argument("file", help="comparison file (TOML; examples/ccm-m-k8-2019.toml)")
    p.add_argument("--with", dest="with_results", action="append", default=[], metavar="RESULT.json",
                   help="add a kibble analyze / measure result as a participant outside the KCRV (repeatable)")
    p.add_argument("--reference-kg", type=float, default=None, metavar="KG",
                   help="the reference's mass of a --with result's standard, if the result has no mass_true_kg")
    p.add_argument("--consistent-subset", action="store_true",
                   help="KCRV of the largest consistent subset (95 %% chi-squared cut-off)")
    p.add_argument("--plots", default=None, metavar="DIR", help="write figures 2-4 of seed 002 (PNG)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON")
    p.set_defaults(func=cmd_realization, is_async=False)

    p = sub.add_parser("export", help="write a recorded run (.kbrun) to HDF5 with units and parameters")
    p.add_argument("run", help="run file written by the recorder (<data_dir>/<run_id>.kbrun)")
    p.add_argument("hdf5_path", help="HDF5 file to write")
    p.set_defaults(func=cmd_export, is_async=False)

    p = sub.add_parser("bench", help="run benchmarks and print (or write) flat JSON")
    p.add_argument("--only", action="append", default=None, metavar="GROUP",
                   help="bus, control, sim, loop, hil (the over-the-bus part of loop), campaign "
                        "(the offline campaigns at the paper's counts, ~30 min), robust (20 "
                        "NIST-4 plants drawn inside their tolerances, closed loop), realtime (the "
                        "whole stack in real time seen from outside, ~22 min), soak (an hour in "
                        "real time with a broker restart), views (what the dashboard and the EPICS "
                        "server cost a 1 kHz stack), fidelity (the simulator's scatter beside the "
                        "published instruments', ~80 min simulated); repeatable; default all but hil, "
                        "campaign, robust, realtime, soak, views and fidelity")
    p.add_argument("--json", metavar="PATH", help="also write the JSON to PATH")
    p.add_argument("--broker", dest="broker_url", default=None,
                   help="use this broker instead of starting a private mosquitto")
    p.add_argument("--rt-seconds", type=float, default=None, metavar="S",
                   help="realtime: measured wall-clock window per case (default 300)")
    p.add_argument("--rt-cases", default=None, metavar="MODEL:HZ,...",
                   help="realtime: cases to run (default nist4:1000,nist4:500,nist4:200,efb:1000)")
    p.add_argument("--rt-settle", type=float, default=None, metavar="S",
                   help="realtime: settling after force mode (and after the EFB's artifact) "
                        "before the window (default 5)")
    p.add_argument("--soak-seconds", type=float, default=None, metavar="S",
                   help="soak: its wall-clock window, the broker restarted in the middle "
                        "(default 3600, at least 30)")
    p.add_argument("--soak-case", default=None, metavar="MODEL:HZ",
                   help="soak: instrument and frame rate (default nist4:200)")
    p.add_argument("--fidelity-triplets", type=int, default=None, metavar="N",
                   help="fidelity: NIST-4 triplets of the run (default 8, at least 2; the triplet "
                        "scatter's uncertainty goes as 1/sqrt(N))")
    p.add_argument("--fidelity-seed", type=int, default=None, metavar="SEED",
                   help="fidelity: simulator seed (default 1)")
    auth_args(p)
    p.set_defaults(func=cmd_bench, is_async=False)
    return parser


def _fold_broker_options(args: argparse.Namespace) -> None:
    """``--broker-user`` ... join the broker URL (``args.broker`` or bench's ``broker_url``)."""
    if not hasattr(args, "broker_user"):
        return
    options = (args.broker_user, args.broker_password_file, args.broker_ca, args.broker_cert,
               args.broker_key)
    for attr in ("broker", "broker_url"):
        url = getattr(args, attr, None)
        if url is not None:
            setattr(args, attr, with_options(url, *options))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _fold_broker_options(args)
    except ValueError as exc:
        print(f"kibble: {exc}", file=sys.stderr)
        return 2
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.is_async:
            return realtime.run(args.func(args))
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (BusError, ValueError, FileNotFoundError) as exc:
        print(f"kibble: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
