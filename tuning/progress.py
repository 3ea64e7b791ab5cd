"""The search's live progress: one JSON line per trial event in ``<search folder>/progress.jsonl``, appended by the
driver while Tune runs (``tuning.tune.TrialProgress``) and read incrementally by whoever watches the search (the
fine-tuning queue's poller turns each line into a job event while the job runs).

    log = ProgressLog(run_dir / PROGRESS)                      # the writer (Tune's driver)
    log.write({"event": "epoch", "trial_id": "a1b2c3d4", "epoch": 3, "planned_epochs": 8, "loss": 0.14})
    lines, offset = read_progress(run_dir / PROGRESS, offset)  # the reader: complete lines after byte ``offset``

Lines (every one has ``event``, ``trial_id`` and ``time``, Unix seconds):

- ``{"event": "start", "params": {...}, "n": 1, "total": 4}``: a trial started with these values (n of total)
- ``{"event": "epoch", "epoch": 3, "planned_epochs": 8, "loss": 0.14, "val_loss": 0.19, "time_total_s": 41.3}``:
  an epoch ended; ``loss`` is the epoch's mean training loss, the search metric (``val_loss`` in
  configs/tune.yaml) is there when the trial measured it
- ``{"event": "end", "status": "completed" | "stopped", "epochs": 8, "planned_epochs": 8, "metric": "val_loss",
  "value": 0.18}``: the trial ended (stopped: early, by the scheduler)
- ``{"event": "error"}``: the trial failed (its error is in results.json once the search ends)

A line is written whole (one ``write`` of at most a few hundred bytes to a file opened for appending) and flushed;
a reader takes only lines that end with a newline, so it never sees half of one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

PROGRESS = "progress.jsonl"
MAX_READ = 1 << 20  # bytes one read_progress call takes at most: a poll stays short however long the search ran


class ProgressLog:
    """Appends progress lines to ``path`` (see the module docstring); never raises: progress is a side channel."""

    def __init__(self, path: Path, clock=time.time):
        self.path, self.clock = Path(path), clock

    def write(self, line: dict[str, Any]) -> None:
        """Append ``line`` with ``time`` added; non-finite numbers become null (JSON has no NaN)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}
        text = json.dumps(clean | {"time": round(self.clock(), 3)}, default=str) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            pass  # a full disk must not fail the search; the trial results still land in results.json


def read_progress(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of ``path`` after byte ``offset`` (at most ``MAX_READ`` bytes), and the offset after them.

    A file shorter than ``offset`` was replaced (a search started again): it is read from the start. Lines that are
    not JSON objects, and a line longer than ``MAX_READ``, are skipped. No file yet: ``([], offset)``.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < offset:
                offset = 0
            f.seek(offset)
            chunk = f.read(MAX_READ)
            if len(chunk) == MAX_READ and b"\n" not in chunk:  # a line longer than one read: skipped whole
                return [], _past_line(f, offset + len(chunk))
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n") + 1  # only whole lines; the rest is read next time
    lines = []
    for raw in chunk[:end].splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines, offset + end


def _past_line(f, position: int) -> int:
    """The offset just past the newline that ends the line running through ``position``; while that line is still
    being written (no newline yet), ``position`` is kept at the line's start so it is looked at again."""
    start = position - MAX_READ
    while piece := f.read(MAX_READ):
        if (i := piece.find(b"\n")) >= 0:
            return position + i + 1
        position += len(piece)
    return start
