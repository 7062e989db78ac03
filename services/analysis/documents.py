"""The documents of a run: what the analysis reads.

A plan run by the :class:`~kibble.services.plans.engine.RunEngine` emits bluesky-style documents:
``start`` (the plan's name and arguments), a ``descriptor`` per stream (``sweep``,
``weighing``, ``gradient``), an ``event`` per measurement (``info`` from the plan, ``data``:
the DAQ frames of the window, one list per field, SI units as the field names say) and
``stop`` (the exit status). The offline campaign collects them as the engine emits them, a
recording holds them as the sequencer published them; either way they are a
:class:`RunDocuments`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

__all__ = ["RunDocuments", "event_arrays", "split_at"]


class RunDocuments:
    """The documents of one or more runs in the order they were emitted: ``(name, doc)``."""

    def __init__(self, documents: Iterable[tuple[str, dict[str, Any]]] = ()) -> None:
        self.documents: list[tuple[str, dict[str, Any]]] = []
        self._stream_names: dict[str, str] = {}
        for name, doc in documents:
            self.append(name, doc)

    def append(self, name: str, doc: dict[str, Any]) -> None:
        """Add a document (the engine's ``emit``)."""
        self.documents.append((name, doc))
        if name == "descriptor":
            self._stream_names[doc["uid"]] = doc["name"]

    def stream(self, event: dict[str, Any]) -> str | None:
        """The name of an event's stream (None if its descriptor is not among the documents)."""
        return self._stream_names.get(event["descriptor"])

    def events(self, stream: str) -> list[dict[str, Any]]:
        """The events of the stream named ``stream``, in order."""
        return [d for n, d in self.documents if n == "event" and self.stream(d) == stream]

    @property
    def plans(self) -> list[str]:
        """The plan of every start document, in order."""
        return [d["plan_name"] for n, d in self.documents if n == "start"]

    @property
    def stops(self) -> list[dict[str, Any]]:
        return [d for n, d in self.documents if n == "stop"]


def event_arrays(event: dict[str, Any]) -> dict[str, np.ndarray]:
    """An event's data as float arrays, one per field (shape (n,) for n frames)."""
    return {k: np.asarray(v, dtype=float) for k, v in event["data"].items()}


def split_at(events: list[dict[str, Any]],
             starts: Callable[[dict[str, Any]], bool]) -> list[list[dict[str, Any]]]:
    """Events grouped into consecutive groups (the sets of a run, the runs of a weighing, the
    gradient determinations): a new group begins at each event whose ``info`` satisfies
    ``starts``."""
    groups: list[list[dict[str, Any]]] = []
    for e in events:
        if starts(e["info"]) or not groups:
            groups.append([])
        groups[-1].append(e)
    return groups
