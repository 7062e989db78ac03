"""Process settings of a daemon (or the simulator) on a lab controller: CPU affinity,
scheduling policy, niceness. Beside the schema because the simulator applies them too and
imports nothing from the services.

Configured per daemon in the TOML file (``[services.servo.process]``) or on the command line
(``kibble service servo --process cpu_affinity=1 --process sched_policy=fifo
--process sched_priority=50``), and applied once at start-up, before the daemon connects. A
setting the operating system refuses (no privilege for ``SCHED_FIFO``, a CPU that does not exist)
stops the daemon with a message that says which setting and why, rather than running it
silently without what the configuration promised. Under systemd the same is usually done by
the unit (``CPUAffinity=``, ``CPUSchedulingPolicy=``, ``CPUSchedulingPriority=``, ``Nice=``; see
``deploy/kibble-realtime.conf``), and then none is needed here.
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

__all__ = ["ProcessSettings", "process_settings", "apply_process_settings"]

_POLICIES = {"other": "SCHED_OTHER", "batch": "SCHED_BATCH", "idle": "SCHED_IDLE",
             "fifo": "SCHED_FIFO", "rr": "SCHED_RR"}


class ProcessSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How the daemon's process is scheduled (Linux)."""

    cpu_affinity: list[int] = []
    """CPUs the process may run on (empty: all)."""
    sched_policy: Literal["other", "batch", "idle", "fifo", "rr"] = "other"
    """Scheduling policy; ``fifo`` and ``rr`` are real-time (need CAP_SYS_NICE or an rtprio limit)."""
    sched_priority: int = 0
    """Real-time priority 1..99 for ``fifo``/``rr``; 0 for the others."""
    nice: int | None = None
    """Niceness -20..19 for the non-real-time policies (None: leave as inherited)."""

    @property
    def is_default(self) -> bool:
        return not self.cpu_affinity and self.sched_policy == "other" and self.nice is None


def process_settings(table: dict) -> ProcessSettings:
    """Validate a ``[process]`` table; ``ValueError`` saying what is wrong."""
    table = dict(table)
    cpus = table.get("cpu_affinity")
    if isinstance(cpus, str):  # "0,1" from a command line
        try:
            table["cpu_affinity"] = [int(c) for c in cpus.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"process settings: cpu_affinity {cpus!r} is not a list of CPU numbers") from None
    elif isinstance(cpus, int):
        table["cpu_affinity"] = [cpus]
    try:
        settings = msgspec.convert(table, ProcessSettings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"process settings: {exc}") from None
    realtime = settings.sched_policy in ("fifo", "rr")
    if realtime and not 1 <= settings.sched_priority <= 99:
        raise ValueError(f"process settings: sched_policy {settings.sched_policy} needs "
                         f"sched_priority 1..99, got {settings.sched_priority}")
    if not realtime and settings.sched_priority != 0:
        raise ValueError(f"process settings: sched_priority applies to fifo/rr only, not "
                         f"{settings.sched_policy}")
    if settings.nice is not None and not -20 <= settings.nice <= 19:
        raise ValueError(f"process settings: nice must be within -20..19, got {settings.nice}")
    if any(cpu < 0 for cpu in settings.cpu_affinity):
        raise ValueError(f"process settings: cpu_affinity {settings.cpu_affinity} has a negative CPU")
    return settings


def apply_process_settings(settings: ProcessSettings, pid: int = 0) -> list[str]:
    """Apply ``settings`` to process ``pid`` (0: this one). Returns what was done, one line
    each; ``ValueError`` naming the setting when the system refuses it."""
    done: list[str] = []
    if settings.cpu_affinity:
        cpus = set(settings.cpu_affinity)
        available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        missing = sorted(cpus - available) if available else []
        if missing:
            raise ValueError(f"cpu_affinity {sorted(cpus)}: CPU(s) {missing} not available "
                             f"(this process may use {sorted(available)})")
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError as exc:
            raise ValueError(f"cpu_affinity {sorted(cpus)} refused: {exc.strerror}") from None
        done.append(f"cpu_affinity {sorted(cpus)}")
    if settings.sched_policy != "other":
        policy = getattr(os, _POLICIES[settings.sched_policy], None)
        if policy is None:
            raise ValueError(f"sched_policy {settings.sched_policy}: not supported on this system")
        try:
            os.sched_setscheduler(pid, policy, os.sched_param(settings.sched_priority))
        except PermissionError:
            raise ValueError(f"sched_policy {settings.sched_policy} (priority "
                             f"{settings.sched_priority}) refused: not permitted (needs "
                             "CAP_SYS_NICE, an rtprio limit, or systemd's CPUSchedulingPolicy=)") from None
        except OSError as exc:
            raise ValueError(f"sched_policy {settings.sched_policy} refused: {exc.strerror}") from None
        done.append(f"sched_policy {settings.sched_policy} priority {settings.sched_priority}")
    if settings.nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, settings.nice)
        except PermissionError:
            raise ValueError(f"nice {settings.nice} refused: not permitted (lowering the niceness "
                             "needs CAP_SYS_NICE)") from None
        done.append(f"nice {settings.nice}")
    return done
