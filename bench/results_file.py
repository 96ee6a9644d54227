"""Writing a results file whose figures a benchmark regenerates under a reading written
by hand: the reading (from a ``## Reading`` heading on) is kept, to be checked against
the new figures."""

from __future__ import annotations

from pathlib import Path

READING = "## Reading"


def write_keeping_reading(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if READING in old:
        text += "\n" + old[old.index(READING) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
