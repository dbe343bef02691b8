"""What a sweep leaves: the table of its trials (results.csv and the console), the best trial's
job file (best.yaml) and the metric against each knob (sweep.png).

It takes plain rows, one per trial (``trial``, each knob, the metric, ``steps``, ``seconds``,
``stopped_early``, ``error``), never Tune objects: app/sweep.py makes the rows.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from ..config import Config, config_to_dict, dump_config
from .sweep_config import SearchDim, describe, trial_config

DPI = 110
COLUMNS_AFTER_KNOBS = ("steps", "seconds", "stopped_early", "error")


def columns(knobs: Sequence[str], metric: str) -> list[str]:
    return ["trial", *knobs, metric, *COLUMNS_AFTER_KNOBS]


def has_value(row: dict, metric: str) -> bool:
    value = row.get(metric)
    return isinstance(value, (int, float)) and math.isfinite(value)


def ranked(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Best first by the metric (``mode`` max or min); trials without a value last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (0, sign * r[metric]) if has_value(r, metric) else (1, 0))


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    top = ranked(rows, metric, mode)
    return top[0] if top and has_value(top[0], metric) else None


def write_csv(rows: list[dict], knobs: Sequence[str], metric: str, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(knobs, metric))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in writer.fieldnames})


def table(rows: list[dict], knobs: Sequence[str], metric: str) -> str:
    """The rows as aligned text; a knob's column is headed by the last part of its key when
    that names it alone (``top_k`` for ``model.moe.top_k``)."""
    short = [k.rsplit(".", 1)[-1] for k in knobs]
    heads = dict(zip(knobs, short if len(set(short)) == len(short) else knobs))
    cols = columns(knobs, metric)
    lines = [[heads.get(c, c) for c in cols]]
    for row in rows:
        cells = [cell(row.get(c)) for c in cols]
        cells[cols.index("stopped_early")] = "yes" if row.get("stopped_early") else "no"
        error = row.get("error") or ""
        cells[-1] = error if len(error) <= 60 else error[:57] + "..."
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip()
                     for line in lines)


def cell(value: Any) -> str:
    """A table cell: 4 significant digits for a float, '-' for no value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_job(base: Config, row: dict, knobs: Sequence[str], *, sweep_file: Path,
             metric: str) -> str:
    """best.yaml: the base job with the best trial's knob values, as a job file that
    ``expertpar train`` runs (a fresh run, ``<base run name>-best``)."""
    values = {k: row[k] for k in knobs}
    cfg = trial_config(config_to_dict(base), {**values, "run.name": f"{base.run.name}-best"})
    return (f"# The best trial ({row['trial']}) of the sweep {sweep_file}: {metric} "
            f"{row[metric]:.4g} at step {row['steps']}.\n"
            f"# Its base job with {describe(values)}.\n"
            f"# Train it:  expertpar train <this file>\n" + dump_config(cfg))


def sweep_figure(rows: list[dict], space: Sequence[SearchDim], metric: str, mode: str,
                 path: Path) -> None:
    """One panel per knob: each trial's last value of the metric against the knob's value;
    trials ASHA stopped early apart, the best one starred. Log x for loguniform knobs, the
    values as categories where they are not numbers."""
    done = [r for r in rows if has_value(r, metric)]
    best = best_row(rows, metric, mode)
    cols = min(3, len(space))
    nrows = -(-len(space) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, dim in zip(axes, space):
        values = [r[dim.key] for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            position = float
        else:  # categories, in the spec's order
            order = [str(v) for v in dim.values] if dim.kind == "choice" else []
            order += sorted({str(v) for v in values} - set(order))
            ax.set_xticks(range(len(order)), order)
            position = lambda v, order=order: order.index(str(v))  # noqa: E731
        for stopped, style in ((False, dict(marker="o", color="tab:blue", label="ran to the end")),
                               (True, dict(marker="x", color="tab:grey",
                                           label="stopped early (ASHA)"))):
            pts = [(position(r[dim.key]), r[metric]) for r in done
                   if bool(r.get("stopped_early")) == stopped]
            if pts:
                ax.scatter(*zip(*pts), **style)
        if best is not None:
            ax.scatter([position(best[dim.key])], [best[metric]], marker="*", s=220,
                       color="tab:orange", zorder=3, label=f"best ({best['trial']})")
        if numeric and dim.kind == "loguniform":
            ax.set_xscale("log")
        if numeric and dim.kind == "choice":  # the choices themselves, not 1.95, 2.05...
            ax.set_xticks(sorted(set(dim.values)))
        elif numeric:  # the whole range searched, so one sees where the trials fell in it
            lo, hi = dim.values
            pad = (hi / lo) ** 0.04 if dim.kind == "loguniform" else None
            ax.set_xlim(*((lo / pad, hi * pad) if pad else (lo - 0.04 * (hi - lo),
                                                             hi + 0.04 * (hi - lo))))
        ax.set_title(dim.key, fontsize="medium")
        ax.set_xlabel(dim.key.rsplit(".", 1)[-1])
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(space):]:
        ax.set_visible(False)
    if done:
        axes[0].legend(fontsize="small")
    fig.suptitle(f"{metric} ({mode}) of {len(done)} trial{'s' if len(done) != 1 else ''}, "
                 f"each at its last report")
    fig.savefig(path)
