"""``kibble analyze RUN``: a recorded run (:mod:`kibble.services.data.recordfile`) to a result.

The run file holds the run documents the sequencer published (start, descriptor, event, stop
on ``sequencer/run``) and, first, the parameters of every daemon as the run started (the
recorder writes the latest ``params`` of each service when it opens a run). The documents and
the servo's parameters go to the analysis the offline campaign uses,
:func:`kibble.services.analysis.analyze_run` (the plan in the start document picks it); this
module imports neither the simulator nor the in-process stack. A run recorded before names
were renamed (:data:`kibble.bus_schema.units.RENAMED`) reads under the new names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import ParamList
from kibble.bus_schema.units import renamed_to
from kibble.services import analysis as an
from kibble.services.data.recordfile import RUN_DOCUMENT_LEAF, RunFileError, decode_document, read_run


class RecordedRun(an.RunDocuments):
    """What a run file says: its documents in order, each daemon's parameters at the start
    (service -> name -> value) and, for a file cut short, what was wrong with its tail."""

    def __init__(self, path: str | Path, documents: Iterable[tuple[str, dict[str, Any]]] = (),
                 params: dict[str, dict[str, Any]] | None = None, torn: str = "") -> None:
        super().__init__(documents)
        self.path = Path(path)
        self.params: dict[str, dict[str, Any]] = dict(params or {})
        self.torn = torn


def _current(name: str) -> str:
    """A name as it is called now (a recording made before a rename holds the old one)."""
    return renamed_to(name) or name


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
                name, doc = decode_document(record.payload)
                if name == "event" and isinstance(doc.get("data"), dict):
                    doc["data"] = {_current(k): v for k, v in doc["data"].items()}
                run.append(name, doc)
            elif leaf[-1] == "params":
                try:
                    plist = decode(record.payload, ParamList)
                except DecodeError:
                    continue
                run.params[plist.service] = {_current(p.name): p.value for p in plist.params}
    except RunFileError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if reader.tail is not None:
        run.torn = f"torn tail at byte {reader.tail.offset}: {reader.tail.reason}"
    return run


def analyze(run: RecordedRun, budget: str | None = None) -> an.Nist4Analysis | an.EfbAnalysis:
    """The result of a recorded run, analysed with the servo's recorded parameters. ``budget``:
    ``table3`` (NIST-4) / ``table1`` (EFB) adds the papers' type B lines; None, type A only.
    ``ValueError`` with the file and the reason for a run that cannot be analysed, or one with
    too few determinations for a type A uncertainty."""
    try:
        result = an.analyze_run(run, run.params.get("servo", {}), budget=budget)
    except ValueError as exc:
        raise ValueError(f"{run.path}: {exc}") from None
    u = result.u_h_j_s if isinstance(result, an.Nist4Analysis) else result.u_mass_kg
    if not np.isfinite(u):
        raise ValueError(f"{run.path}: too few determinations for a type A uncertainty (an EFB "
                         "trial needs two weighing runs, two trials three; a NIST-4 triplet "
                         "needs a velocity set on each side of a force set)")
    return result


def cli_analyze(run_path: str, json_out: str | None, plots_dir: str | None,
                budget: str | None) -> int:
    """``kibble analyze RUN [--json OUT] [--plots DIR] [--budget table3|table1]``."""
    try:
        run = load_run(run_path)
        result = analyze(run, budget)
    except ValueError as exc:
        print(f"kibble analyze: {exc}", file=sys.stderr)
        return 1
    summary = {"run": str(run.path), "plan": run.plans[0], "torn": run.torn, **result.summary()}
    for key, value in summary.items():
        print(f"{key:>20}: {value:.12g}" if isinstance(value, float) else f"{key:>20}: {value}")
    if result.uncertainty.budget:
        print(result.uncertainty.table())
    if plots_dir:
        for path in an.write_plots(result, plots_dir):
            print(f"{'plot':>20}: {path}")
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"wrote {json_out}")
    return 0
