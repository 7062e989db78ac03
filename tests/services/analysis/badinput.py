"""A published input file with one text edit, and where the edit landed: the refusals of
``kibble xrcd`` and ``kibble compare`` files (``tests/services/analysis``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from kibble.services.analysis.inputfiles import InputFileError


def refused(tmp_path: Path, source: Path, old: str, new: str,
            load: Callable[[Path], Any]) -> InputFileError:
    """The error ``load`` raises for ``source`` with its first ``old`` replaced by ``new``
    (written to ``tmp_path / "bad.toml"``)."""
    text = source.read_text()
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(InputFileError) as info:
        load(path)
    return info.value


def line_of(tmp_path: Path, needle: str) -> int:
    """The first line (1-based) of ``tmp_path / "bad.toml"`` holding ``needle``."""
    return next(i for i, line in enumerate((tmp_path / "bad.toml").read_text().splitlines(), 1) if needle in line)
