"""``kibble export RUN HDF5_PATH``: a run file (:mod:`kibble.services.data.recordfile`) to HDF5.

Layout of the HDF5 file:

- ``/`` attributes: ``run_id``, ``instrument``, ``config_hash``, ``format_version``,
  ``created_utc_s`` (from the run file's header), ``records``, ``torn_tail`` (the reader's
  note, "" for a clean file), and, when the run holds a ``start`` document, ``start_document``
  and ``configuration`` (JSON text) and the start document's ``config_hash``.
- one group per topic, named by the topic below ``kb/<instrument>/`` (``/daq/frame``,
  ``/servo/status``, ``/hw/sensors``, ``/sequencer/run``); its attributes ``topic``,
  ``message_type``, ``count``, ``undecodable``. Its datasets, one row per message in order of
  receipt: ``t_recv_s`` and every field of the decoded message (types by topic leaf:
  ``daq/frame`` DaqFrame, ``hw/sensors`` HwSensorFrame, other ``hw/`` HwActuatorCommand,
  ``<service>/frame`` LoopFrame, ``sim/truth`` SimTruth, ``status``, ``params``, ``cmd``,
  ``reply``, ``event``, ``setpoint`` by leaf). A dict of scalars (``values``, ``counters``,
  ``detail``) becomes a subgroup with one dataset per key (NaN / "" where a message lacks the
  key; nested dicts nest further; a value that is a dict in other messages is ``NAME_value``);
  lists of equal length become 2-D datasets; anything else is JSON text per row.
  A numeric dataset whose name has a unit in the bus's table of units
  (:mod:`kibble.bus_schema.units`: ``bl_t_m`` is T m, ``dcdz_f_per_m`` F/m) carries it in the
  attribute ``unit``; dimensionless and undeclared names carry none (a unit is never guessed
  from a name's suffix).
- ``/parameters/<service>``: the values of the service's last ``params`` message as
  attributes (``NAME``), with ``NAME.unit`` where the parameter has a unit.
- ``/documents``: the run documents (``name``, ``doc`` as JSON text, ``t_recv_s``).

Everything is held in memory while converting (fine for runs of hours at the DAQ rate on a
workstation; the run file itself is the archive).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from kibble.bus_schema.codec import DecodeError, decode
from kibble.bus_schema.messages import ParamList
from kibble.bus_schema.topics import message_type_for
from kibble.bus_schema.units import unit_of
from kibble.services.data.recordfile import RUN_DOCUMENT_LEAF, RunFileError, decode_document, read_run


def _key(k: Any) -> str:
    """A dict key as an HDF5 name (no ``/``, not empty, not ``.``)."""
    k = str(k).replace("/", "_")
    return k if k not in ("", ".", "..") else f"_{k}"


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``a/b/c`` keys (an empty dict gives no column); other values as they are."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{_key(key)}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


class _Table:
    """Columns of one topic, filled row by row (missing cells None)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.msg_type = ""
        self.rows = 0
        self.undecodable = 0
        self.columns: dict[str, list[Any]] = {"t_recv_s": []}

    def add(self, t_s: float, row: dict[str, Any]) -> None:
        row = {"t_recv_s": t_s, **row}
        for key, value in row.items():
            col = self.columns.get(key)
            if col is None:
                col = self.columns[key] = [None] * self.rows
            col.append(value)
        self.rows += 1
        for col in self.columns.values():
            if len(col) < self.rows:
                col.append(None)


def _json(v: Any) -> str:
    return json.dumps(v, default=str, separators=(",", ":"))


def _column_array(values: list[Any]) -> np.ndarray:
    present = [v for v in values if v is not None]
    missing = len(present) < len(values)
    if present and all(isinstance(v, bool) for v in present):
        if not missing:
            return np.array(values, dtype=bool)
        return np.array([math.nan if v is None else float(v) for v in values])
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present) and not missing:
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    if present and all(isinstance(v, str) for v in present):
        return np.array(["" if v is None else v for v in values], dtype=object)
    if present and not missing and all(isinstance(v, list) for v in present):
        lengths = {len(v) for v in present}
        flat = [x for v in present for x in v]
        if len(lengths) == 1 and lengths != {0} and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
            kind = np.int64 if all(isinstance(x, int) for x in flat) else np.float64
            try:
                return np.array(values, dtype=kind)
            except OverflowError:
                pass
    return np.array(["" if v is None else _json(v) for v in values], dtype=object)


def _attr_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (bool, int, float, str)):
        return v
    return _json(v)


def export_run(run_path: str | Path, hdf5_path: str | Path) -> dict[str, Any]:
    """Write the HDF5 file of a run; returns a summary (records, topics, torn tail).

    ``RunFileError`` (a ``ValueError``) for a file that is not a run file; a torn tail is not
    an error (it is noted in the root attribute ``torn_tail``).
    """
    import h5py

    reader = read_run(run_path)
    meta = reader.metadata
    instrument = str(meta.get("instrument", ""))
    tables: dict[str, _Table] = {}
    params: dict[str, ParamList] = {}
    documents: list[tuple[float, str, dict[str, Any]]] = []
    for rec in reader:
        parts = rec.topic.split("/")
        if not instrument and len(parts) >= 2 and parts[0] == "kb":
            instrument = parts[1]
        prefix = f"kb/{instrument}/"
        name = rec.topic[len(prefix):] if rec.topic.startswith(prefix) else rec.topic
        table = tables.get(name)
        if table is None:
            table = tables[name] = _Table(rec.topic)
        if tuple(parts[2:]) == RUN_DOCUMENT_LEAF:
            table.msg_type = "run_document"
            try:
                doc_name, doc = decode_document(rec.payload)
            except ValueError:
                table.undecodable += 1
                continue
            documents.append((rec.t_s, doc_name, doc))
            table.add(rec.t_s, {"name": doc_name, "uid": doc.get("uid", ""), "doc": _json(doc)})
            continue
        msg_type = message_type_for(rec.topic)
        row: Any = None
        if msg_type is not None:
            try:
                msg = decode(rec.payload, msg_type)
            except DecodeError:
                msg = None
            if msg is not None:
                table.msg_type = msg_type.__name__
                if isinstance(msg, ParamList):
                    params[msg.service] = msg
                row = msgspec.to_builtins(msgspec.structs.asdict(msg))  # frames are arrays on the wire
        if row is None:  # an untyped topic, or not the expected type: whatever MessagePack says
            try:
                row = msgspec.msgpack.decode(rec.payload)
            except msgspec.DecodeError:
                table.undecodable += 1
                continue
            table.msg_type = table.msg_type or "msgpack"
            if not isinstance(row, dict):
                row = {"value": row}
        table.add(rec.t_s, _flatten(row))

    tail = reader.tail
    hdf5_path = Path(hdf5_path)
    with h5py.File(hdf5_path, "w") as f:
        f.attrs["source"] = str(run_path)
        for key in ("run_id", "config_hash", "format_version", "created_utc_s"):
            if key in meta:
                f.attrs[key] = _attr_value(meta[key])
        f.attrs["header"] = _json(meta)
        f.attrs["instrument"] = instrument
        f.attrs["records"] = reader.records
        f.attrs["torn_tail"] = "" if tail is None else f"{tail.size} bytes at {tail.offset}: {tail.reason}"
        start = next((doc for _, n, doc in documents if n == "start"), None)
        if start is not None:
            f.attrs["start_document"] = _json(start)
            if "configuration" in start:
                f.attrs["configuration"] = _json(start["configuration"])
            if start.get("config_hash"):
                f.attrs["config_hash"] = str(start["config_hash"])
        str_dtype = h5py.string_dtype()
        for name, table in tables.items():
            group = f.require_group(name)
            group.attrs.update({"topic": table.topic, "message_type": table.msg_type,
                                "count": table.rows, "undecodable": table.undecodable})
            for col_name, values in table.columns.items():
                data = _column_array(values)
                if any(other.startswith(col_name + "/") for other in table.columns):
                    col_name += "_value"  # a dict in other messages: its keys are a group
                if data.dtype == object:
                    ds = group.create_dataset(col_name, data=data.astype(str_dtype) if len(data) else data,
                                              dtype=str_dtype)
                else:
                    ds = group.create_dataset(col_name, data=data)
                *within, leaf = col_name.split("/")
                unit = unit_of(leaf, within[-1] if within else "")
                if unit and data.dtype != object:
                    ds.attrs["unit"] = unit
        pgroup = f.require_group("parameters")
        for service, plist in params.items():
            g = pgroup.require_group(service)
            for spec in plist.params:
                g.attrs[spec.name] = _attr_value(spec.value)
                if spec.unit:
                    g.attrs[f"{spec.name}.unit"] = spec.unit
        if documents:
            d = f.require_group("documents")
            d.create_dataset("t_recv_s", data=np.array([t for t, _, _ in documents]))
            d.create_dataset("name", data=[n for _, n, _ in documents], dtype=str_dtype)
            d.create_dataset("doc", data=[_json(doc) for _, _, doc in documents], dtype=str_dtype)
    return {"run": str(run_path), "hdf5": str(hdf5_path), "records": reader.records,
            "topics": len(tables), "documents": len(documents),
            "torn_tail": None if tail is None else tail._asdict()}


def cli_export(run: str, out: str) -> int:
    """``kibble export RUN HDF5_PATH``: one line of summary; exit status 1 with a message on a
    missing or unreadable run file."""
    try:
        summary = export_run(run, out)
    except FileNotFoundError:
        print(f"kibble export: no such run file: {run}", file=sys.stderr)
        return 1
    except (RunFileError, OSError) as exc:
        print(f"kibble export: {exc}", file=sys.stderr)
        return 1
    torn = summary["torn_tail"]
    note = (f"; ignored a torn tail of {torn['size']} bytes ({torn['reason']})" if torn else "")
    print(f"{run} -> {out}: {summary['records']} records, {summary['topics']} topics, "
          f"{summary['documents']} run documents{note}")
    return 0
