"""The completion marker: ``RUN_DIR/done.json`` is the only proof that a ``fit`` ran to its end.

``checkpoints/last.ckpt`` is rewritten every ``logging.ckpt_every`` steps, so its presence says nothing
about whether a run finished. ``fit`` writes the marker after ``trainer.fit`` returns, on global rank 0
only, and only when the trainer finished normally at ``max_steps`` (an early stop or a crash writes
none; Ctrl-C makes Lightning exit inside ``trainer.fit``). The marker holds the last value of every
logged metric, which is what a sweep's ``results.csv`` reports.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

DONE_FILE = "done.json"


def mark_finished(run_dir: str | Path, trainer: Any) -> Path | None:
    """Write the marker if ``trainer`` reached ``max_steps``; returns its path, or None if not written."""
    from lightning.pytorch.trainer.states import TrainerStatus

    from lightning_entropy.report import read_metrics

    if not trainer.is_global_zero:
        return None
    if trainer.state.status != TrainerStatus.FINISHED or trainer.global_step < trainer.max_steps:
        return None
    run_dir = Path(run_dir)
    series = read_metrics(run_dir)  # the CSV logger has flushed: trainer.fit finalised it
    marker = {
        # RL steps completed (each is updates_per_step optimizer steps); metrics carry their own steps
        "rl_steps": trainer.global_step // trainer.lightning_module.updates_per_step,
        "optimizer_steps": trainer.global_step,
        "metrics": {k: _json_float(pts[-1][1]) for k, pts in sorted(series.items()) if pts},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = run_dir / DONE_FILE
    # temp file + os.replace: a reader sees either no marker or a whole one, never half a JSON
    tmp = path.with_name(f".{DONE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_marker(run_dir: str | Path) -> dict[str, Any] | None:
    """The marker of a finished run, or None when the run has not finished."""
    path = Path(run_dir) / DONE_FILE
    if not path.is_file():
        return None
    marker = json.loads(path.read_text())
    marker["metrics"] = {k: math.nan if v is None else v for k, v in marker["metrics"].items()}
    return marker


def _json_float(v: float) -> float | None:
    # strict JSON has no NaN; None stands for a metric that was logged as NaN
    return None if math.isnan(v) else v
