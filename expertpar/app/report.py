"""``expertpar report RUN_DIR``: a run's figures as PNG and one HTML page that shows them beside
the numbers, all in ``RUN_DIR/report/`` (``index.html`` names the PNGs by file name, so the
folder opens from disk and can be copied whole).

| figure | from |
|---|---|
| ``loss.png`` | metrics.jsonl: ``loss/…`` and the unweighted ``aux/…`` terms |
| ``eval.png`` | metrics.jsonl's evaluation records: ``zero_shot/…``, ``retrieval/…`` |
| ``expert_load.png`` | metrics.jsonl: ``moe{L}/{image,text}/tokens_expert{e}`` |
| ``routing.png`` | metrics.jsonl: ``moe{L}/…drop_rate``, ``moe{L}/…router_entropy`` |
| ``confusion.png`` | the newest checkpoint that verifies, on the held-out split, on the CPU |
| ``retrieval.png`` | the same pass: the captions nearest to a few held-out images |

What the run directory cannot supply is skipped, not fatal: a run still training, one
interrupted before its first checkpoint, or one whose held-out split has moved still gets the
figures it can have. Each skipped figure is named with the reason (the file it needed) in a
warning and on the page, and a stale PNG of that name is removed so the folder matches the
page. Refused, naming the input: a RUN_DIR that is not a directory, a local ``--data`` that
does not exist, ``--examples`` below 1, and a run from which no figure at all can be made.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from ..data import SampleIndex, decode_image, is_remote
from ..eval.retrieval import top_captions
from ..eval.run import embed_classes, embed_split
from ..eval.zeroshot import confusion_matrix
from ..train.checkpoint import CheckpointError
from . import report_figures as figures
from .evaluate import load_run_config, load_run_model
from .report_page import Cell, Section, Table, render

log = logging.getLogger("expertpar")

TOP_CAPTIONS = 3  # retrieved captions shown per held-out image
LOAD_KEY = re.compile(r"^(moe\d+)/([a-z]+)/tokens_expert(\d+)$")
# What a missing or unreadable part of a run directory raises (ConfigError is a ValueError).
UNAVAILABLE = (FileNotFoundError, ValueError, CheckpointError)


class Skip(Exception):
    """A figure the run directory cannot supply; the message says which file and why."""


@dataclass(frozen=True)
class Report:
    page: Path
    figures: list[Path]  # written, in page order
    skipped: dict[str, str]  # figure file name -> why


@dataclass(frozen=True)
class Example:
    """One held-out image and the captions the model ranks nearest to it."""
    key: str
    image: Image.Image
    caption: str
    top: list[tuple[str, float]]  # (caption, cosine similarity), best first


@dataclass(frozen=True)
class HeldOut:
    """The report's own evaluation pass over the held-out split."""
    step: int  # of the checkpoint
    source: str
    samples: int
    classes: tuple[str, ...]
    confusion: list[list[int]] | None  # None: no classes or no labels (see no_confusion)
    no_confusion: str
    examples: list[Example]


def write_report(run_dir: Path, *, data: str | None = None, examples: int = 6) -> Report:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory '{run_dir}' not found (or not a directory)")
    if examples < 1:
        raise ValueError(f"--examples must be >= 1, got {examples}")
    if data and not is_remote(data) and not Path(data).exists():
        raise FileNotFoundError(f"--data '{data}' not found")
    out = run_dir / "report"
    existed = out.exists()
    out.mkdir(exist_ok=True)

    metrics = _attempt(lambda: _read_metrics(run_dir / "metrics.jsonl"))
    held_out = _attempt(lambda: evaluate_held_out(run_dir, data, examples))
    plan: list[tuple[str, str, Callable[[], Section]]] = [
        ("loss.png", "Training loss", lambda: _loss(_need(metrics)[0], out / "loss.png")),
        ("eval.png", "Evaluation", lambda: _evals(_need(metrics)[1], out / "eval.png")),
        ("expert_load.png", "Expert load by modality",
         lambda: _expert_load(_need(metrics)[0], out / "expert_load.png")),
        ("routing.png", "Drop rate and router entropy",
         lambda: _routing(_need(metrics)[0], out / "routing.png")),
        ("confusion.png", "Zero-shot confusion matrix",
         lambda: _confusion(_need(held_out), run_dir, out / "confusion.png")),
        ("retrieval.png", "Captions retrieved for held-out images",
         lambda: _retrieval(_need(held_out), out / "retrieval.png")),
    ]
    sections, written, skipped = [], [], {}
    for name, title, build in plan:
        try:
            sections.append(build())
            written.append(out / name)
        except Skip as why:
            skipped[name] = str(why)
            sections.append(Section(title, None, note=f"Skipped: {why}"))
            (out / name).unlink(missing_ok=True)  # a stale one would contradict the page
            log.warning("report: %s skipped: %s", name, why)
    if not written:
        if not existed:
            out.rmdir()
        raise ValueError(f"nothing to report from '{run_dir}': " + "; ".join(
            dict.fromkeys(skipped.values())))  # each reason once
    page = out / "index.html"
    page.write_text(render(f"expertpar report: {run_dir.resolve().name}",
                           f"run directory {run_dir.resolve()}; figures in this folder",
                           sections, skipped))
    return Report(page, written, skipped)


# ---- reading the run -----------------------------------------------------------------------

def _attempt(read: Callable[[], Any]) -> Any:
    """What ``read`` returns, or the Skip saying why the run cannot supply it."""
    try:
        return read()
    except Skip as why:
        return why
    except UNAVAILABLE as err:
        return Skip(str(err))


def _need(value: Any) -> Any:
    if isinstance(value, Skip):
        raise value
    return value


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of metrics.jsonl, each in step order."""
    if not path.exists():
        raise Skip(f"{path} not found")
    train, evals = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise Skip(f"{path}:{n} is not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise Skip(f"{path}:{n} is not a metrics record (an object with an integer step)")
        if "event" in record:
            continue
        if "eval/samples" in record:
            evals.append(record)
        elif "loss/total" in record:
            train.append(record)
    if not train:
        raise Skip(f"{path} has no training record yet (one is written every "
                   f"train.log_every steps)")
    return sorted(train, key=_step), sorted(evals, key=_step)


def evaluate_held_out(run_dir: Path, data: str | None, n_examples: int) -> HeldOut:
    """Zero-shot confusion counts and retrieved captions from the run's newest checkpoint,
    evaluated in this process on the CPU as ``expertpar eval`` evaluates it."""
    cfg = load_run_config(run_dir)
    source = data or cfg.data.eval
    if not source:
        raise Skip(f"{run_dir / 'config.yaml'} has no data.eval (pass --data PATH)")
    if not cfg.model.has_contrastive:
        raise Skip("model.objective is 'captioning': the text tower never trained, so there is "
                   "no zero-shot confusion or retrieved caption to show")
    model, tokenizer, step = load_run_model(run_dir, cfg)
    index = SampleIndex.build(source, max_samples=cfg.data.max_eval_samples)
    if not len(index):
        raise Skip(f"the held-out split {source} has no sample")
    cpu = torch.device("cpu")
    emb = embed_split(model, index, tokenizer, cfg, cpu)
    info, classes, counts, no_confusion = index.info, (), None, ""
    if info is None or not info.classes:
        no_confusion = f"the held-out split {source} has no dataset.json naming its classes"
    elif not bool((emb.labels_N >= 0).any()):
        no_confusion = f"no held-out image of {source} has a label"
    else:
        classes = info.classes
        class_CE = embed_classes(model, tokenizer, cfg, info, cpu)
        counts = confusion_matrix(emb.image_NE, emb.labels_N, class_CE).tolist()
    n = min(n_examples, len(index))
    queries = [i * len(index) // n for i in range(n)]  # spread over the split, deterministic
    tops = top_captions(emb.image_NE, emb.text_NE, emb.captions, queries, TOP_CAPTIONS)
    picked = []
    for i, top in zip(queries, tops):
        sample = index.sample(i)
        picked.append(Example(sample.key, decode_image(sample.image, key=sample.key),
                              emb.captions[i], top))
    return HeldOut(step, source, len(index), tuple(classes), counts, no_confusion, picked)


def _step(record: dict) -> int:
    return record["step"]


def _series(records: list[dict], key: str) -> list[float]:
    return [float(r.get(key, math.nan)) for r in records]


def _keys(records: list[dict], pattern: str) -> list[str]:
    """Keys of any record matching ``pattern``, in a stable order."""
    rx = re.compile(pattern)
    return sorted({k for r in records for k in r if rx.fullmatch(k)}, key=figures.natural_key)


# ---- sections: one figure and its numbers each ---------------------------------------------

def _loss(train: list[dict], path: Path) -> Section:
    steps = [_step(r) for r in train]
    losses = {k: _series(train, k) for k in _keys(train, r"loss/.+")}
    aux = {k.removeprefix("aux/"): _series(train, k) for k in _keys(train, r"aux/.+")}
    figures.loss_figure(steps, losses, aux, path)
    rows = [[k, v[0], v[-1], min(v)] for k, v in {**losses, **{f"aux/{k}": v
                                                                for k, v in aux.items()}}.items()]
    return Section("Training loss", path.name,
                   note=f"{len(steps)} logged steps ({steps[0]}..{steps[-1]}); loss/total = "
                        f"loss/clip + loss/aux; the aux/ terms are each MoE layer's auxiliary "
                        f"losses before weighting.",
                   tables=[Table(["metric", f"step {steps[0]}", f"step {steps[-1]}", "min"],
                                 rows)])


def _evals(evals: list[dict], path: Path) -> Section:
    if not evals:
        raise Skip("metrics.jsonl has no evaluation record (written every train.eval_every "
                   "steps and at the end of the run, when data.eval is set)")
    steps = [_step(r) for r in evals]
    zero_shot = {k: _series(evals, k) for k in _keys(evals, r"zero_shot/top\d+")}
    retrieval = {k.removeprefix("retrieval/").replace("_to_", "→"): _series(evals, k)
                 for k in _keys(evals, r"retrieval/\w+_to_\w+/R@\d+")}
    chance = evals[-1].get("zero_shot/chance_top1")
    figures.eval_figure(steps, zero_shot, chance, retrieval, path)
    last = evals[-1]
    rows = [[k, last[k]] for k in sorted(last, key=figures.natural_key)
            if k != "step" and not k.startswith("eval/moe")]
    return Section("Evaluation", path.name,
                   note=f"held-out evaluation at {len(steps)} step(s); the table is the last, "
                        f"at step {steps[-1]}.",
                   tables=[Table(["metric", f"step {steps[-1]}"], rows)])


def _moe_layout(train: list[dict]) -> dict[tuple[str, str], int]:
    """(MoE layer, modality) -> number of experts, from the tokens_expert keys."""
    layout: dict[tuple[str, str], int] = {}
    for key in {k for r in train for k in r}:
        m = LOAD_KEY.match(key)
        if m:
            where = (m.group(1), m.group(2))
            layout[where] = max(layout.get(where, 0), int(m.group(3)) + 1)
    if not layout:
        raise Skip("metrics.jsonl has no moe{L}/… routing statistics (a dense model, "
                   "model.variant: dense, has no MoE layer)")
    return layout


def _expert_load(train: list[dict], path: Path) -> Section:
    layout = _moe_layout(train)
    experts = max(layout.values())
    steps = [_step(r) for r in train]
    shares: dict[tuple[str, str], list[list[float]]] = {}
    for (layer, modality), _ in sorted(layout.items()):
        rows = []
        for r in train:
            counts = [float(r.get(f"{layer}/{modality}/tokens_expert{e}", 0.0))
                      for e in range(experts)]
            total = sum(counts)
            rows.append([c / total if total else 0.0 for c in counts])
        shares[(layer, modality)] = rows
    figures.expert_load_figure(steps, shares, path)
    table = Table(["layer", "modality", *[f"expert {e}" for e in range(experts)]],
                  [[layer, modality, *[f"{s:.1%}" for s in rows[-1]]]
                   for (layer, modality), rows in shares.items()],
                  caption=f"shares at step {steps[-1]}")
    return Section("Expert load by modality", path.name,
                   note="Each panel: how one modality's kept assignments at a MoE layer split "
                        "over its experts, per logged step (that step's batch, not a running "
                        "total). Dropped assignments are not in the shares; see the drop rate.",
                   tables=[table])


def _routing(train: list[dict], path: Path) -> Section:
    layout = _moe_layout(train)
    layers = sorted({layer for layer, _ in layout}, key=figures.natural_key)
    modalities = sorted({m for _, m in layout})
    experts = max(layout.values())
    steps = [_step(r) for r in train]
    drop, entropy = {}, {}
    for layer in layers:
        for part in ("", *[f"{m}/" for m in modalities]):
            label = f"{layer} {part.rstrip('/') or 'all'}"
            drop[label] = _series(train, f"{layer}/{part}drop_rate")
            entropy[label] = _series(train, f"{layer}/{part}router_entropy")
    max_entropy = math.log(experts) if experts > 1 else None
    figures.routing_figure(steps, drop, entropy, max_entropy, path)
    rows = [[label, drop[label][-1], entropy[label][-1]] for label in drop]
    return Section("Drop rate and router entropy", path.name,
                   note=f"Per MoE layer, over all tokens and per modality. The drop rate is the "
                        f"share of assignments the capacity limit dropped (under expert choice: "
                        f"of tokens no expert chose); the entropy is the mean per-token entropy "
                        f"of the router's probabilities, at most ln E = "
                        f"{math.log(experts):.4f} for E = {experts}.",
                   tables=[Table(["layer", "drop rate", "router entropy"], rows,
                                 caption=f"at step {steps[-1]}")])


def _confusion(held: HeldOut, run_dir: Path, path: Path) -> Section:
    if held.confusion is None:
        raise Skip(held.no_confusion)
    counts, classes = held.confusion, held.classes
    total = sum(map(sum, counts))
    top1 = sum(counts[i][i] for i in range(len(classes))) / total if total else 0.0
    figures.confusion_figure(counts, classes, f"zero-shot top-1 {top1:.1%} on {total} images "
                             f"(checkpoint step {held.step})", path)
    rows = []
    for i, name in enumerate(classes):
        n = sum(counts[i])
        wrong = max(((c, j) for j, c in enumerate(counts[i]) if j != i), default=(0, i))
        rows.append([name, n, counts[i][i] / n if n else math.nan,
                     f"{classes[wrong[1]]} ({wrong[0]})" if wrong[0] else ""])
    note = (f"The newest checkpoint that verifies (step {held.step}), evaluated here on the "
            f"CPU over {held.source} ({held.samples} samples): rows are the true class, "
            f"columns the class whose prompts are nearest; top-1 = {top1:.4f}.")
    ran = _eval_json_top1(run_dir, held.step)
    if ran is not None:
        note += f" The run's eval.json at the same step says {ran:.4f}."
    return Section("Zero-shot confusion matrix", path.name, note=note,
                   tables=[Table(["class", "images", "top-1", "most often taken for"], rows)])


def _eval_json_top1(run_dir: Path, step: int) -> float | None:
    """The run's own zero-shot top-1 when eval.json is of the same checkpoint step."""
    try:
        ran = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(ran, dict) or ran.get("step") != step:
        return None
    value = ran.get("zero_shot/top1")
    return float(value) if isinstance(value, (int, float)) else None


def _retrieval(held: HeldOut, path: Path) -> Section:
    figures.retrieval_figure(held.examples, path)
    rows = []
    for ex in held.examples:
        for rank, (caption, sim) in enumerate(ex.top, 1):
            own = caption == ex.caption
            rows.append([ex.key if rank == 1 else "", ex.caption if rank == 1 else "", rank,
                         Cell(caption, "own" if own else ""), sim])
    return Section("Captions retrieved for held-out images", path.name,
                   note=f"{len(held.examples)} held-out images spread over {held.source}, and "
                        f"the {TOP_CAPTIONS} captions of the split nearest to each (each "
                        f"caption text once); the image's own caption in bold green.",
                   tables=[Table(["image", "its caption", "rank", "retrieved caption",
                                  "cosine"], rows)])
