"""curves.png of a run: training loss, validation loss and validation BLEU against step."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from seq2seq.rundir import RunDir


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series per metric from the run's CSV logs, joined across resumes: each
    earlier attempt's rows count up to the step the next attempt resumed from (the later
    ones were trained again), so a resumed run reads like an uninterrupted one.

    Lightning logs the metrics of update k (and of the validation after it) at row step
    k - 1, so a resume from global step G keeps the earlier rows below G: the row at G
    belongs to update G + 1, which the next attempt trains and logs again."""
    run = RunDir(run_dir)
    parts = [*run.earlier_metrics(), (None, run.metrics)]
    if not any(path.is_file() for _, path in parts):
        raise FileNotFoundError(
            f"{run.metrics}: no metrics logged yet (is {run_dir} a run directory?)"
        )
    rows: list[tuple[int, str, float]] = []
    for until, path in parts:
        # The last attempt may have logged nothing: resumed at max_steps (killed while it
        # scored the test set), it trained no update.
        rows += _rows(path) if path.is_file() else []
        if until is not None:
            rows = [row for row in rows if row[0] < until]
    series: dict[str, list[tuple[int, float]]] = {}
    for step, key, value in rows:
        series.setdefault(key, []).append((step, value))
    return series


def _rows(path: Path) -> list[tuple[int, str, float]]:
    """(step, metric, value) of every value in one CSV log, in file order. A damaged row (a
    field that is no number, more fields than the header) is a ValueError naming the file
    and line."""
    found = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            line = reader.line_num
            if None in row:  # DictReader's key for the fields beyond the header
                raise ValueError(f"{path}:{line}: more fields than the header names")
            try:
                step = int(row.get("step") or 0)
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        found.append((step, key, float(value)))
            except ValueError as err:
                raise ValueError(f"{path}:{line}: not a number ({err})") from None
    return found


def plot_run(run_dir: str | os.PathLike) -> Path:
    """Draw run_dir/curves.png and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        if series.get(key):
            steps, values = zip(*series[key], strict=True)
            ax_loss.plot(steps, values, label=label, marker="o" if key == "val_loss" else None)
    ax_loss.set(xlabel="step", ylabel="label-smoothed cross-entropy", title="Loss")
    ax_loss.legend()
    if series.get("val_bleu"):
        steps, values = zip(*series["val_bleu"], strict=True)
        ax_bleu.plot(steps, values, marker="o", color="tab:green")
    ax_bleu.set(xlabel="step", ylabel="sacreBLEU", title="Validation BLEU (detokenized)")
    for ax in (ax_loss, ax_bleu):
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    out = RunDir(run_dir).curves
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
