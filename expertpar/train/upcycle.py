"""Sparse upcycling (Komatsuzaki et al. 2023): a MoE run whose experts start as copies of a
dense run's FFNs.

``upcycle(dense_run, out, experts=E)`` reads the dense run's newest checkpoint that verifies,
builds the MoE model its config describes with ``model.variant: moe`` (the same dims; block i
is a MoE layer where ``(i + 1) % model.moe.every == 0``, as the MoE variant places them, in
each tower), and writes a new run directory ``out`` with ``config.yaml``, ``tokenizer.json``,
``upcycled_from.json`` and ``checkpoints/step_000000``, which ``expertpar train out/config.yaml`` resumes from on
either backend. In that checkpoint:

- every expert of a MoE layer is a copy of the dense FFN of that block (so
  ``model.moe.expert_hidden`` is that FFN's width: ``top_k x expert_hidden`` of the dense
  config, which is how the dense variant sizes the FFNs where MoE layers would be);
- the gates are initialised as a MoE run initialises them (``run.seed``);
- every other parameter (and the CNN stem's BatchNorm statistics) is the dense run's;
- no optimizer state: AdamW starts afresh for every parameter, and the step counter at 0.

Why fresh AdamW state and step 0: the upcycled run is a new run with its own learning-rate
schedule (warmup, then cosine over its own ``train.steps``); the dense run's schedule has
usually decayed to its floor, and its moments belong to it. Copying the FFN's moments into
every expert would give all copies the same momentum, pushing them the same way while the
fresh gates have to break their symmetry; fresh moments under a new warmup avoid both. The
data order is a function of (seed, step), so with the dense run's ``run.seed`` the upcycled
run reads the data in the dense run's order from its start (``--set run.seed=...`` changes
it, and the gates' initialisation with it).

With every expert an exact copy, the upcycled model computes the dense model's function as long
as a token's expert weights sum to 1 and no token is dropped: top-k >= 2 with
``model.moe.renormalize`` (the default), or one expert; and capacity to spare
(``model.moe.dropless``). Top-1 routing of E > 1 experts weights the copy by its gate
probability (about 1/E at the start), and Expert Choice may give a token no expert or several:
both start elsewhere, and ``upcycle`` warns.

``btx.py`` builds on this module: several dense runs, one expert each, the rest averaged
(``mix_into_experts``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer

from ..config import (Config, ConfigError, config_from_dict, config_to_dict, dump_config,
                      get_path, load_config, parse_override)
from ..data import vocab_size
from ..model.vlm import dense_ffn_hidden, is_moe_layer
from .checkpoint import (CheckpointError, latest_checkpoint, read_shards, read_train_state,
                         write_checkpoint)
from .loop import dense_owner
from .setup import build_model

log = logging.getLogger("expertpar")

ORIGIN_FILE = "upcycled_from.json"  # in the new run directory: what it was upcycled from
# Keys the command sets itself: a --set of one of them is refused, naming the option instead.
SET_BY_COMMAND = {"model.variant": "the upcycled run is always 'moe'",
                  "model.moe.num_experts": "use --experts",
                  "model.moe.top_k": "use --top-k",
                  "run.name": "use --out", "run.out_dir": "use --out"}
# Keys whose value the copied parameters (and the copied tokenizer) were made for.
COPIED_KEYS = ("model.towers", "model.stem", "model.patch_size", "model.dim", "model.depth",
               "model.heads", "model.embed_dim", "model.init_temperature", "tokenizer.path",
               "tokenizer.vocab_size", "tokenizer.context_length", "data.image_size",
               "model.moe.activation", "model.objective", "model.decoder_depth")


class UpcycleError(ValueError):
    """A dense run, output directory or option that cannot be upcycled; names what is wrong."""


@dataclass(frozen=True)
class Upcycled:
    run_dir: Path  # the new run directory
    checkpoint: Path  # its step-0 checkpoint
    config: Config
    source: Path  # the dense checkpoint read
    source_step: int
    moe_layers: list[str]  # module names of the blocks' FFNs that became MoE layers


def upcycle(dense_run: Path, out: Path, *, experts: int, top_k: int | None = None,
            overrides: list[str] | tuple[str, ...] = ()) -> Upcycled:
    """Write a new MoE run at ``out`` from the dense run ``dense_run`` (see the module doc).
    Nothing is written unless everything checks; ``out`` appears whole or not at all."""
    dense_run, out = Path(dense_run), Path(out)
    check_out_dir(out)
    ckpt, dense_cfg, tokenizer_json = read_dense_run(dense_run)
    cfg = upcycled_config(dense_cfg, out, experts=experts, top_k=top_k, overrides=overrides)
    _warn_if_not_exact(cfg)

    vocab = vocab_size(Tokenizer.from_str(tokenizer_json))
    dense = load_dense_model(dense_run, ckpt, dense_cfg, vocab)
    moe = build_model(cfg, vocab)  # gates (and experts, overwritten below) seeded as a MoE run
    moe_layers = copy_into_experts(dense, moe)

    step = read_train_state(ckpt)["step"]
    origin = {"method": "upcycle", "checkpoint": str(ckpt.resolve()), "step": step,
              "moe_layers": moe_layers, "experts": cfg.model.moe.num_experts,
              "top_k": cfg.model.moe.top_k}
    written = write_new_run(out, cfg, moe, tokenizer_json, origin)
    return Upcycled(out, written, cfg, ckpt, step, moe_layers)


def load_dense_model(run: Path, ckpt: Path, cfg: Config, vocab: int) -> torch.nn.Module:
    """The dense model of ``cfg`` with the weights and buffers of the checkpoint ``ckpt`` (read
    verified: every file against the manifest's checksums)."""
    dense = build_model(cfg, vocab)
    try:
        dense_owner(dense, cfg).load(read_shards(ckpt, verified=True), where=str(ckpt),
                                     optimizer_state=False)
    except CheckpointError as err:
        raise UpcycleError(f"dense run '{run}': {err}") from None
    return dense


def write_new_run(out: Path, cfg: Config, moe: torch.nn.Module, tokenizer_json: str,
                  origin: dict) -> Path:
    """Write the run directory ``out`` (config, tokenizer, ``upcycled_from.json`` = ``origin``
    and the step-0 checkpoint of ``moe``) into a temporary sibling, then rename it onto
    ``out``: it appears whole or not at all. Returns the checkpoint's path."""
    tmp = out.parent / f".tmp-upcycle-{out.name}-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # ours: a name with our pid, from a failed attempt
    try:
        tmp.mkdir()
        config_text = dump_config(cfg)
        (tmp / "config.yaml").write_text(config_text)
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        # Kept beside the checkpoints, which pruning removes in time.
        (tmp / ORIGIN_FILE).write_text(json.dumps(origin, indent=1))
        # The model has taken no step, so its owner exports parameters and buffers and no
        # AdamW state: every owner (in process, router, expert actors) starts its own afresh.
        written = write_checkpoint(
            tmp / "checkpoints", 0, dense_owner(moe, cfg).export(),
            train_state={"upcycled_from": origin},
            text_files={"config.yaml": config_text, "tokenizer.json": tokenizer_json},
            keep=cfg.train.keep_checkpoints)
        try:
            os.rename(tmp, out)  # onto a missing or empty directory only
        except OSError as err:
            raise UpcycleError(f"--out {out}: could not be created ({err.strerror}); "
                               f"nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "checkpoints" / written.name


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"--out {out} is a file; upcycling writes a new run directory")
    if out.is_dir():
        held = sorted(p.name for p in out.iterdir())
        if held:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            raise UpcycleError(f"--out {out} already holds files ({shown}): upcycling writes a "
                               f"new run and never into an existing directory; choose another")


def read_dense_run(run: Path) -> tuple[Path, Config, str]:
    """The dense run's newest checkpoint that verifies, its config and its tokenizer."""
    if not run.is_dir():
        raise UpcycleError(f"dense run '{run}' is not a directory")
    try:
        ckpt = latest_checkpoint(run / "checkpoints")
    except CheckpointError as err:
        raise UpcycleError(f"dense run '{run}': {err}") from None
    if ckpt is None:
        raise UpcycleError(f"dense run '{run}' has no checkpoint in {run / 'checkpoints'}: "
                           f"is it a run directory, and has it trained past its first "
                           f"checkpoint?")
    # The checkpoint's own copies: the config and vocabulary its weights were made with.
    cfg_path = next((p for p in (ckpt / "config.yaml", run / "config.yaml") if p.is_file()), None)
    tok_path = next((p for p in (ckpt / "tokenizer.json", run / "tokenizer.json")
                     if p.is_file()), None)
    if cfg_path is None or tok_path is None:
        raise UpcycleError(f"dense run '{run}': checkpoint {ckpt} has no "
                           f"{'config.yaml' if cfg_path is None else 'tokenizer.json'} (nor "
                           f"has the run directory)")
    try:
        cfg = load_config(cfg_path)  # its errors name the file
    except ConfigError as err:
        raise UpcycleError(f"dense run '{run}': {err}") from None
    if cfg.model.variant != "dense":
        raise UpcycleError(f"dense run '{run}' is already a MoE run (model.variant "
                           f"'{cfg.model.variant}' in {cfg_path}); upcycling starts from a dense "
                           f"run (model.variant: dense)")
    return ckpt, cfg, tok_path.read_text()


def upcycled_config(dense: Config, out: Path, *, experts: int, top_k: int | None = None,
                    overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The MoE run's config: the dense run's, with ``model.variant: moe``, ``experts``
    experts of top-``top_k`` (default 2, or 1 for one expert), the expert width of the
    dense FFNs they copy, the run directory ``out``, then ``overrides`` (``--set``)."""
    if experts < 1:
        raise UpcycleError(f"--experts must be >= 1, got {experts}")
    parsed = [parse_override(text) for text in overrides]
    keys = [key for key, _ in parsed]
    for key in keys:
        for reserved, why in SET_BY_COMMAND.items():
            if key == reserved or reserved.startswith(key + "."):
                raise UpcycleError(f"--set {key}: {reserved} is set by `expertpar upcycle` "
                                   f"({why})")
    tree = config_to_dict(dense)
    routing = next((v for k, v in reversed(parsed) if k == "model.moe.routing"),
                   dense.model.moe.routing)  # the last --set of it wins, as in config_from_dict
    if routing == "expert_choice":
        if top_k not in (None, 1):
            raise UpcycleError(f"--top-k {top_k}: model.moe.routing 'expert_choice' has no "
                               f"top-k (each expert takes its top tokens); leave --top-k out")
        top_k = 1
    elif top_k is None:
        top_k = min(2, experts)
    elif not 1 <= top_k <= experts:
        raise UpcycleError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    out = out.resolve()
    tree["run"].update(name=out.name, out_dir=str(out.parent))
    tree["model"]["variant"] = "moe"
    tree["model"]["moe"].update(num_experts=experts, top_k=top_k)
    cfg = _build(tree, overrides)
    now, was = config_to_dict(cfg), config_to_dict(dense)
    for key in COPIED_KEYS:
        a, b = get_path(now, key), get_path(was, key)
        if a != b:
            raise UpcycleError(f"--set {key}={a!r} conflicts with the dense run ({key} {b!r}): "
                               f"the upcycled run copies its parameters and tokenizer, made for "
                               f"{b!r}")
    # Every expert copies its block's dense FFN, so the experts are as wide as those FFNs.
    width = {i: dense_ffn_hidden(dense.model, i) for i in range(dense.model.depth)}
    moe_blocks = [i for i in range(cfg.model.depth) if is_moe_layer(cfg.model, i)]
    needed = {width[i] for i in moe_blocks}
    if len(needed) > 1:
        raise UpcycleError(_misfit(keys, f"the dense FFNs of the blocks that would become MoE "
                                         f"layers have different widths "
                                         f"({ {i: width[i] for i in moe_blocks} }), and every "
                                         f"expert has model.moe.expert_hidden units"))
    (hidden,) = needed
    if "model.moe.expert_hidden" in keys and cfg.model.moe.expert_hidden != hidden:
        raise UpcycleError(_misfit(keys, f"model.moe.expert_hidden "
                                         f"{cfg.model.moe.expert_hidden}, but the dense FFNs the "
                                         f"experts copy have {hidden} units"))
    tree["model"]["moe"]["expert_hidden"] = hidden
    cfg = _build(tree, overrides)
    for i in range(cfg.model.depth):
        if i not in moe_blocks and width[i] != cfg.model.ffn_hidden:
            raise UpcycleError(_misfit(keys, f"block {i} stays dense with model.ffn_hidden "
                                             f"{cfg.model.ffn_hidden} units, but the dense run's "
                                             f"FFN there has {width[i]}"))
    return cfg


def _build(tree: dict, overrides) -> Config:
    try:
        return config_from_dict(tree, list(overrides))
    except ConfigError as err:
        raise UpcycleError(f"the upcycled run's config: {err}") from None


def _misfit(keys: list[str], what: str) -> str:
    shaping = [k for k in keys if k in ("model.ffn_hidden", "model.moe.every",
                                        "model.moe.expert_hidden")]
    by = f" (after --set {', '.join(shaping)})" if shaping else ""
    return f"the upcycled model does not fit the dense run's FFNs{by}: {what}"


def _warn_if_not_exact(cfg: Config) -> None:
    """Say when the upcycled model will not start as the dense model's function."""
    m = cfg.model.moe
    if m.routing == "expert_choice":
        log.warning("upcycle: with model.moe.routing 'expert_choice' a token may be taken by no "
                    "expert or by several, so the upcycled model does not start as the dense "
                    "model's function")
    elif m.top_k == 1 and m.num_experts > 1:
        log.warning("upcycle: top-1 routing weights each expert's output by its gate probability "
                    "(about 1/%d at the start), so the MoE layers start at that fraction of the "
                    "dense FFNs' outputs; --top-k 2 (with model.moe.renormalize) starts as the "
                    "dense model", m.num_experts)
    elif m.top_k > 1 and not m.renormalize:
        log.warning("upcycle: model.moe.renormalize is false, so a token's expert weights sum to "
                    "less than 1 and the upcycled model does not start as the dense model")
    if not m.dropless:
        log.info("upcycle: tokens over an expert's capacity are dropped (capacity_factor %s, "
                 "eval_capacity_factor %s); where none is, the first forward is the dense "
                 "model's (--set model.moe.dropless=true drops none)", m.capacity_factor,
                 m.eval_capacity_factor)


def copy_into_experts(dense: torch.nn.Module, moe: torch.nn.Module) -> list[str]:
    """Copy ``dense``'s parameters and buffers into ``moe``: each expert of a MoE layer gets
    the dense FFN at that layer's place, the gates keep their initialisation, everything else
    is copied by name. Returns the MoE layers' module names. Every dense tensor is used."""
    return mix_into_experts([dense], moe)


def mix_into_experts(branches: Sequence[torch.nn.Module], moe: torch.nn.Module) -> list[str]:
    """Fill ``moe`` from N dense models of one architecture (N = 1: upcycling; N = the number
    of experts: BTX): expert e of every MoE layer is branch e's dense FFN at that layer's place
    (every expert is branch 0's when N = 1), the gates keep their initialisation, and every
    other parameter and buffer is the elementwise mean of the branches' (integer buffers, the
    BatchNorm batch counters, rounded down; with N = 1 an exact copy). Returns the MoE layers'
    module names. Every dense tensor is used."""
    sources = [b.state_dict() for b in branches]
    target = moe.state_dict()
    layers = [name for name, _ in moe.moe_layers()]
    assert len(sources) == 1 or all(len(layer.experts.experts) == len(sources)
                                    for _, layer in moe.moe_layers()), len(sources)
    used, state = set(), {}
    for key, mine in target.items():
        layer = next((n for n in layers if key.startswith(n + ".")), None)
        if layer is not None and key.startswith(f"{layer}.gate."):
            state[key] = mine  # a new parameter: the MoE model's own initialisation
            continue
        if layer is not None:  # "{layer}.experts.experts.{e}.fc1.weight" <- "{layer}.fc1.weight"
            expert_prefix = f"{layer}.experts.experts."
            if not key.startswith(expert_prefix):
                raise UpcycleError(f"MoE layer {layer} has a tensor {key} that is neither its "
                                   f"gate nor an expert: no dense counterpart")
            e, rest = key[len(expert_prefix):].split(".", 1)
            src, pick = f"{layer}.{rest}", [sources[int(e) if len(sources) > 1 else 0]]
        else:
            src, pick = key, sources
        for source in pick:
            if src not in source or source[src].shape != mine.shape:
                found = tuple(source[src].shape) if src in source else "no such tensor"
                raise UpcycleError(f"the dense model's {src} ({found}) cannot initialise the "
                                   f"MoE model's {key} {tuple(mine.shape)}")
        state[key] = _mean([source[src] for source in pick])
        used.add(src)
    unused = sorted(set().union(*sources) - used)
    if unused:
        raise UpcycleError(f"the MoE model has no place for the dense model's {unused}")
    moe.load_state_dict(state, strict=True)
    return layers


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    stacked = torch.stack(tensors)  # [N, *shape]
    if stacked.is_floating_point():
        return stacked.mean(0)
    return stacked.sum(0) // len(tensors)
