"""The report's figures, one function each, drawn with matplotlib and saved as PNG.

They take plain numbers (steps, named series, counts), never metric key names or files: which
metric feeds which figure is ``report.py``'s business. matplotlib's object API is used
(``Figure``, no ``pyplot``): no global figure state and no backend to choose, so drawing works
in a process without a display and leaves any pyplot session of the caller alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

DPI = 110
Series = dict[str, Sequence[float]]  # label -> one value per step


def loss_figure(steps: Sequence[int], losses: Series, aux_terms: Series, path: Path) -> None:
    """Left: the loss that was minimised and its parts (contrastive, weighted auxiliary);
    right: each auxiliary term before weighting, on its own scale (weighted, they would lie
    flat along the left panel's axis)."""
    fig = Figure(figsize=(10, 3.6), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    _lines(left, steps, losses, "training loss", "loss")
    _lines(right, steps, aux_terms, "auxiliary terms, unweighted", "value")
    if not aux_terms:
        right.text(0.5, 0.5, "no auxiliary loss (no MoE layer)", ha="center", va="center",
                   transform=right.transAxes)
    fig.savefig(path)


def eval_figure(steps: Sequence[int], zero_shot: Series, chance: float | None,
                retrieval: Series, path: Path) -> None:
    """Held-out accuracy at each evaluation: zero-shot top-K beside chance, retrieval
    recall@K both ways."""
    fig = Figure(figsize=(10, 3.6), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    _lines(left, steps, zero_shot, "zero-shot classification", "accuracy", marker="o")
    if chance is not None:
        left.axhline(chance, color="grey", linestyle=":", label=f"chance top-1 ({chance:.3g})")
        left.legend(fontsize="small")
    _lines(right, steps, retrieval, "retrieval", "recall", marker="o")
    for ax in (left, right):
        ax.set_ylim(0, 1.02)
    fig.savefig(path)


def expert_load_figure(steps: Sequence[int], shares: dict[tuple[str, str], list[list[float]]],
                       path: Path) -> None:
    """One panel per (MoE layer, modality): how that modality's kept assignments split over
    the experts at each logged step, stacked to 1 (LIMoE's per-modality routing plots).

    ``shares[(layer, modality)][t][e]``: expert e's share at ``steps[t]``."""
    layers = sorted({layer for layer, _ in shares}, key=natural_key)
    modalities = sorted({m for _, m in shares})
    experts = max(len(row) for rows in shares.values() for row in rows)
    colours = _colours(experts)
    fig = Figure(figsize=(5 * len(modalities), 2.8 * len(layers) + 0.6), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(len(layers), len(modalities), squeeze=False)
    for i, layer in enumerate(layers):
        for j, modality in enumerate(modalities):
            ax = axes[i][j]
            rows = shares.get((layer, modality))
            ax.set_title(f"{layer}: {modality} tokens", fontsize="medium")
            if not rows:
                ax.text(0.5, 0.5, f"no {modality} tokens", ha="center", va="center")
                continue
            per_expert = [[row[e] for row in rows] for e in range(experts)]
            labels = [f"expert {e}" for e in range(experts)]
            if len(steps) > 1:
                ax.stackplot(steps, per_expert, labels=labels, colors=colours)
                ax.set_xlim(steps[0], steps[-1])
            else:  # one logged step: an area needs two, so a stacked bar
                bottom = 0.0
                for e, col in enumerate(per_expert):
                    ax.bar(steps, col, bottom=bottom, color=colours[e], label=labels[e])
                    bottom += col[0]
            ax.set_ylim(0, 1)
            ax.set_xlabel("step")
            ax.set_ylabel("share of assignments")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(experts, 8),
               fontsize="small")
    fig.savefig(path)


def routing_figure(steps: Sequence[int], drop_rate: Series, entropy: Series,
                   max_entropy: float | None, path: Path) -> None:
    """Per MoE layer (and modality): the share of assignments dropped at capacity, and the
    mean router entropy against its maximum ln E (a router that has not specialised)."""
    fig = Figure(figsize=(10, 3.6), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    _lines(left, steps, drop_rate, "drop rate", "share dropped")
    left.set_ylim(bottom=0)
    _lines(right, steps, entropy, "router entropy", "nats")
    if max_entropy is not None:
        right.axhline(max_entropy, color="grey", linestyle=":",
                      label=f"uniform, ln E = {max_entropy:.3f}")
        right.legend(fontsize="small")
    fig.savefig(path)


def confusion_figure(counts: list[list[int]], classes: Sequence[str], title: str,
                     path: Path) -> None:
    """Rows: true class; columns: the class zero-shot picked. Shaded by the share of the row,
    so classes with few images read as clearly as the rest; counts written in the cells."""
    C = len(classes)
    shares = [[c / max(1, sum(row)) for c in row] for row in counts]
    size = max(4.5, 0.45 * C + 2.5)
    fig = Figure(figsize=(size + 1, size), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true class", shrink=0.8)
    ax.set_xticks(range(C), [_short(c, 18) for c in classes], rotation=60, ha="right",
                  fontsize="small")
    ax.set_yticks(range(C), [_short(c, 18) for c in classes], fontsize="small")
    ax.set_xlabel("predicted (zero-shot top-1)")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize="medium")
    if C <= 20:  # beyond that the numbers no longer fit in the cells
        for i, row in enumerate(counts):
            for j, c in enumerate(row):
                if c:
                    ax.text(j, i, str(c), ha="center", va="center", fontsize="x-small",
                            color="white" if shares[i][j] > 0.5 else "black")
    fig.savefig(path)


def retrieval_figure(examples: Sequence, path: Path) -> None:
    """One row per held-out image: the image, its own caption, and the captions the model
    ranks nearest, with their cosine similarity; green where it is the image's own caption.

    ``examples``: objects with ``image`` (PIL), ``key``, ``caption`` and ``top`` ([(caption,
    similarity)], best first)."""
    n = len(examples)
    fig = Figure(figsize=(10, 1.7 * n + 0.3), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(n, 2, width_ratios=(1, 5))
    for i, ex in enumerate(examples):
        ax_img = fig.add_subplot(grid[i, 0])
        ax_img.imshow(ex.image, interpolation="nearest")
        ax_img.set_axis_off()
        ax_img.set_title(_short(ex.key, 24), fontsize="x-small")
        ax_txt = fig.add_subplot(grid[i, 1])
        ax_txt.set_axis_off()
        ax_txt.text(0, 0.95, "caption: " + _short(ex.caption, 90), fontsize="small",
                    va="top", style="italic")
        for r, (caption, sim) in enumerate(ex.top):
            own = caption == ex.caption
            ax_txt.text(0, 0.70 - 0.22 * r, f"{r + 1}. ({sim:+.3f}) {_short(caption, 85)}",
                        fontsize="small", va="top", color="green" if own else "black",
                        weight="bold" if own else "normal")
    fig.savefig(path)


def _lines(ax, steps: Sequence[int], series: Series, title: str, ylabel: str, *,
           marker: str | None = None) -> None:
    for label, values in series.items():
        ax.plot(steps, values, label=label, marker=marker or ("o" if len(steps) == 1 else None))
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


def natural_key(name: str) -> tuple:
    """Numbers in names compared as numbers: moe2 before moe10, R@5 before R@10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _short(text: str, width: int) -> str:
    """One line of at most ``width`` characters (captions can be paragraphs)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
