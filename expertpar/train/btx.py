"""Branch-Train-MiX (BTX, Sukhbaatar et al. 2024): one MoE run from N dense runs trained apart.

``branch_train_mix([run_1, ..., run_N], out)`` reads each dense run's newest checkpoint that
verifies and writes a new run directory ``out`` as ``upcycle`` does (``config.yaml``,
``tokenizer.json``, ``upcycled_from.json``, ``checkpoints/step_000000``; ``expertpar train
out/config.yaml`` trains it on either backend). In that checkpoint:

- expert i of every MoE layer is run i's dense FFN at that block: one expert per run, E = N;
- every other parameter and buffer (attention, norms, embeddings, stems and their BatchNorm
  statistics, projection heads, logit scale, and the dense FFNs of the blocks that stay dense)
  is the elementwise mean over the runs, as BTX merges the branches' non-expert weights;
- the gates are fresh, as a MoE run of the first run's ``run.seed`` initialises them;
- no optimizer state, step 0: the mixed run has its own schedule (see ``upcycle``'s doc).

The branches may differ in anything that does not shape a parameter (data, data order,
learning rate, steps: that is what makes them branches), but not in a key of ``BRANCH_KEYS``,
and they must share one vocabulary: the token embeddings are averaged row by row, so token i
must be the same word in every run (train the branches with one ``tokenizer.path``). The MoE
run's config is the first run's (its data, seed, schedule), with ``model.variant: moe``, N
experts of the dense FFNs' width, ``--top-k`` (default 2) and the ``--set`` overrides, checked
as ``upcycle`` checks them. Averaging assumes the branches stayed close to one another, as branches of one
seed run do (BTX trains every branch from one seed model); two runs from different random
initialisations share no coordinates, and nothing here can tell.

Why exactly one expert per branch: the expert i of BTX is what branch i learnt, and a gate
that routes to it is a choice of branch. Copies of one branch's FFN would add experts that
start equal and must be told apart by the gates alone, which is sparse upcycling's question,
not BTX's; ``--experts`` other than N is refused rather than guessed at.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from ..config import Config, config_to_dict, get_path
from ..data import vocab_size
from .checkpoint import read_train_state
from .setup import SHAPING_KEYS, build_model
from .upcycle import (UpcycleError, check_out_dir, load_dense_model, mix_into_experts,
                      read_dense_run, upcycled_config, write_new_run)

# The config keys that shape a dense run's parameters: setup.SHAPING_KEYS (what a resumption
# must keep) less the variant (every branch is dense) and the number of experts (no dense
# parameter has it), plus top_k (a dense FFN where a MoE layer would be has top_k x
# expert_hidden units).
BRANCH_KEYS = (*(k for k in SHAPING_KEYS if k not in ("model.variant", "model.moe.num_experts")),
               "model.moe.top_k")


@dataclass(frozen=True)
class Branch:
    run: Path  # the dense run directory, as given
    checkpoint: Path  # its newest checkpoint that verifies
    config: Config  # the config saved with that checkpoint
    tokenizer_json: str
    step: int


@dataclass(frozen=True)
class Mixed:
    run_dir: Path  # the new run directory
    checkpoint: Path  # its step-0 checkpoint
    config: Config
    branches: list[Branch]  # expert i of every MoE layer is branches[i]'s FFN
    moe_layers: list[str]  # module names of the blocks' FFNs that became MoE layers


def branch_train_mix(runs: Sequence[Path], out: Path, *, experts: int | None = None,
                     top_k: int | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> Mixed:
    """Write a new MoE run at ``out`` that mixes the dense runs ``runs`` (see the module doc).
    Nothing is written unless everything checks; ``out`` appears whole or not at all."""
    runs, out = [Path(r) for r in runs], Path(out)
    if len(runs) < 2:
        raise UpcycleError(f"BTX mixes 2 or more dense runs, got {len(runs)}; one dense run is "
                           f"upcycled (--experts E copies of its FFNs)")
    check_out_dir(out)
    if experts is not None and experts != len(runs):
        raise UpcycleError(f"--experts {experts} with {len(runs)} dense runs: BTX makes one "
                           f"expert of each run's FFN, so {len(runs)} experts per MoE layer "
                           f"(leave --experts out)")
    _check_distinct(runs)
    branches = [Branch(run, ckpt, cfg, tok, read_train_state(ckpt)["step"])
                for run, (ckpt, cfg, tok) in ((r, read_dense_run(r)) for r in runs)]
    _check_same_architecture(branches)
    first = branches[0]
    cfg = upcycled_config(first.config, out, experts=len(runs), top_k=top_k,
                          overrides=overrides)

    vocab = vocab_size(Tokenizer.from_str(first.tokenizer_json))
    dense = [load_dense_model(b.run, b.checkpoint, b.config, vocab) for b in branches]
    moe = build_model(cfg, vocab)  # gates (and experts, overwritten below) seeded as a MoE run
    moe_layers = mix_into_experts(dense, moe)

    origin = {"method": "btx",
              "runs": [{"run": str(b.run.resolve()), "checkpoint": str(b.checkpoint.resolve()),
                        "step": b.step} for b in branches],
              "config_from": str(first.run.resolve()), "moe_layers": moe_layers,
              "experts": cfg.model.moe.num_experts, "top_k": cfg.model.moe.top_k}
    written = write_new_run(out, cfg, moe, first.tokenizer_json, origin)
    return Mixed(out, written, cfg, branches, moe_layers)


def _check_distinct(runs: list[Path]) -> None:
    seen: dict[Path, Path] = {}
    for run in runs:
        where = run.resolve()
        if where in seen:
            raise UpcycleError(f"dense run '{run}' is given twice (as '{seen[where]}' too): "
                               f"BTX makes one expert of each run, so each run once")
        seen[where] = run


def _check_same_architecture(branches: list[Branch]) -> None:
    """Refuse a branch whose parameters the first branch's model cannot hold, or whose token
    ids mean other words, naming the key, both values and both runs."""
    a = branches[0]
    was = config_to_dict(a.config)
    vocabulary = Tokenizer.from_str(a.tokenizer_json).to_str()
    for b in branches[1:]:
        now = config_to_dict(b.config)
        for key in BRANCH_KEYS:
            here, there = get_path(now, key), get_path(was, key)
            if here != there:
                raise UpcycleError(
                    f"dense run '{b.run}' has {key} {here!r} but dense run '{a.run}' has "
                    f"{there!r}: BTX averages the runs' parameters and stacks their FFNs, so "
                    f"every key that shapes them must be equal ({', '.join(BRANCH_KEYS)})")
        if Tokenizer.from_str(b.tokenizer_json).to_str() != vocabulary:
            raise UpcycleError(
                f"dense run '{b.run}' has another tokenizer than dense run '{a.run}' (their "
                f"tokenizer.json differ): BTX averages the token embeddings row by row, so a "
                f"token id must mean the same in every run; train the branches with one "
                f"tokenizer (--set tokenizer.path=FILE)")
