"""``kibble analyze RUN``: a recorded run (:mod:`kibble.services.recordfile`) to a result.

The run file holds the run documents the sequencer published (start, descriptor, event, stop
on ``sequencer/run``) and, first, the parameters of every daemon as the run started (the
recorder writes the latest ``params`` of each service when it opens a run). The plan named in
the start document picks the analysis of :mod:`kibble.services.campaign`:

- ``nist4_run`` (velocity sets bracketing force sets): h and the mass, with the servo's
  ``test_mass_kg`` and ``g_m_s2``;
- ``efb_weighing`` (one or more runs of it): the mass of the artifact, with the servo's
  ``kappa_f_m`` and ``g_m_s2``;
- ``efb_run`` (gradient determinations bracketing weighings): the mass of the artifact with the
  measured dC/dz, and the servo's ``g_m_s2``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import ParamList
from kibble.services import analysis as an
from kibble.services import campaign as C
from kibble.services.recordfile import RUN_DOCUMENT_LEAF, RunFileError, decode_document, read_run


@dataclass
class RecordedRun:
    """What a run file says: its documents in order and each daemon's parameters at the start."""

    path: Path
    documents: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    torn: str = ""

    def events(self, stream: str) -> list[dict[str, Any]]:
        names = {d["uid"]: d["name"] for n, d in self.documents if n == "descriptor"}
        return [d for n, d in self.documents if n == "event" and names.get(d["descriptor"]) == stream]

    @property
    def plans(self) -> list[str]:
        return [d["plan_name"] for n, d in self.documents if n == "start"]

    @property
    def stops(self) -> list[dict[str, Any]]:
        return [d for n, d in self.documents if n == "stop"]

    def param(self, service: str, name: str) -> Any:
        try:
            return self.params[service][name]
        except KeyError:
            raise ValueError(f"{self.path}: no {service} parameter {name!r} recorded "
                             "(was the recorder started after the daemons?)") from None


def load_run(path: str | Path) -> RecordedRun:
    """Read a run file's documents and parameters; ``ValueError`` if it is not a run file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such run file: {path}")
    run = RecordedRun(path)
    try:
        reader = read_run(path)
        for record in reader:
            leaf = record.topic.split("/")[-2:]
            if tuple(leaf) == RUN_DOCUMENT_LEAF:
                run.documents.append(decode_document(record.payload))
            elif leaf[-1] == "params":
                try:
                    plist = decode(record.payload, ParamList)
                except DecodeError:
                    continue
                run.params[plist.service] = {p.name: p.value for p in plist.params}
    except RunFileError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if reader.tail is not None:
        run.torn = f"torn tail at byte {reader.tail.offset}: {reader.tail.reason}"
    return run


def analyze(run: RecordedRun, budget: str | None = None) -> dict[str, Any]:
    """The result of a recorded run (a flat, JSON-able summary plus the analysis objects under
    ``"_objects"`` for plots). ``budget``: ``table3`` (NIST-4) / ``table1`` (EFB) adds the
    papers' type B lines; None, type A only."""
    if not run.plans:
        raise ValueError(f"{run.path}: no run documents (was the sequencer running?)")
    failed = [s for s in run.stops if s["exit_status"] != "success"]
    if failed:
        raise ValueError(f"{run.path}: the plan ended {failed[0]['exit_status']}: {failed[0]['reason']}")
    plan = run.plans[0]
    g = float(run.param("servo", "g_m_s2"))
    if plan == "nist4_run":
        res = C.analyze_nist4(run.events("sweep"), run.events("weighing"),
                              mass_kg=float(run.param("servo", "test_mass_kg")), g_m_s2=g,
                              budget=an.NIST4_TABLE_III_BUDGET if budget == "table3" else None)
        keys = ("h_j_s", "u_h_j_s", "u_a_h_j_s", "u_b_h_j_s", "h_rel_err", "u_h_rel", "mass_kg",
                "u_mass_kg", "bl_v_t_m", "bl_f_t_m", "n_sweeps", "n_weighings", "n_triplets")
    elif plan in ("efb_weighing", "efb_run"):
        kappa = ({"gradients": run.events("gradient")} if plan == "efb_run"
                 else {"kappa_f_m": float(run.param("servo", "kappa_f_m"))})
        res = C.analyze_efb(run.events("weighing"), g_m_s2=g,
                            budget=an.EFB_TABLE_1_BUDGET_1MG if budget == "table1" else None, **kappa)
        keys = tuple(k for k, v in res.items() if isinstance(v, (int, float, str)))
    else:
        raise ValueError(f"{run.path}: no analysis for plan {plan!r} (nist4_run, efb_weighing, efb_run)")
    u_key = "u_h_j_s" if plan == "nist4_run" else "u_mass_kg"
    if not np.isfinite(res[u_key]):
        raise ValueError(f"{run.path}: too few determinations for a type A uncertainty (an EFB "
                         "trial needs two weighing runs, two trials three; a NIST-4 triplet "
                         "needs a velocity set on each side of a force set)")
    summary: dict[str, Any] = {"run": str(run.path), "plan": plan, "torn": run.torn}
    summary.update({k: (float(res[k]) if isinstance(res[k], (float, np.floating)) else res[k])
                    for k in keys})
    summary["_objects"] = res
    return summary


def cli_analyze(run_path: str, json_out: str | None, plots_dir: str | None,
                budget: str | None) -> int:
    """``kibble analyze RUN [--json OUT] [--plots DIR] [--budget table3|table1]``."""
    try:
        result = analyze(load_run(run_path), budget)
    except ValueError as exc:
        print(f"kibble analyze: {exc}", file=sys.stderr)
        return 1
    objects = result.pop("_objects")
    for key, value in result.items():
        print(f"{key:>14}: {value:.12g}" if isinstance(value, float) else f"{key:>14}: {value}")
    if plots_dir:
        out = Path(plots_dir)
        out.mkdir(parents=True, exist_ok=True)
        if result["plan"] == "nist4_run":
            paths = [an.plot_bl_profile(objects["velocity_sets"][0], out / "bl_profile.png"),
                     an.plot_bl_time(objects["triplets"][0], out / "bl_time.png")]
            for p in paths:
                print(f"          plot: {p}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {json_out}")
    return 0
