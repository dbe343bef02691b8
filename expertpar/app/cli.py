"""Command line: ``expertpar train|eval|report|upcycle|sweep|bench|data``; ``main(argv)`` for tests.

Everything the package says goes through the ``expertpar`` logger to stderr (progress lines
included): ``--quiet`` keeps warnings and errors only, ``--verbose`` adds debug detail, and a
program that imports expertpar can silence or redirect it like any other logger. Standard output
carries results only (``expertpar eval`` prints its metrics as JSON there, ``expertpar report``
the path of its page, ``expertpar sweep`` its table of trials)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger("expertpar")


class _ConsoleFormat(logging.Formatter):
    """Progress and results as plain lines; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_console(level: int) -> None:
    """The ``expertpar`` logger to stderr at ``level`` (once; later calls change the level)."""
    log.setLevel(level)
    if not any(getattr(h, "_expertpar_console", False) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(_ConsoleFormat("%(message)s"))
        handler._expertpar_console = True
        log.addHandler(handler)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertpar", description=__doc__.split("\n")[0])
    level = p.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    level.add_argument("-v", "--verbose", action="store_true", help="debug detail too")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML job")
    t.add_argument("config", help="job YAML, e.g. jobs/quickstart.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.moe.num_experts=8")
    t.add_argument("--address", default=None,
                   help="run on this Ray cluster ('auto' after `ray start --head`); implies "
                        "distributed.backend=ray")
    t.add_argument("--local", action="store_true",
                   help="train in this process, without Ray (distributed.backend=local)")
    t.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if the run directory has a checkpoint")

    e = sub.add_parser("eval", help="evaluate a run's latest checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--data", help="held-out split to use instead of the run's data.eval")

    c = sub.add_parser("caption", help="caption images with a run's caption decoder "
                       "(model.objective captioning or both)")
    c.add_argument("run_dir")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    c.add_argument("--beam", type=int, default=1, metavar="K",
                   help="beam search over K hypotheses (default 1: greedy)")

    r = sub.add_parser("report", help="figures (PNG) and an HTML page of a run, in "
                       "RUN_DIR/report/")
    r.add_argument("run_dir")
    r.add_argument("--data", help="held-out split to use instead of the run's data.eval")
    r.add_argument("--examples", type=int, default=6, metavar="N",
                   help="held-out images whose retrieved captions are shown (default 6)")

    u = sub.add_parser("upcycle", help="a MoE run whose experts start as copies of a dense "
                       "run's FFNs (sparse upcycling), or as the FFNs of several dense runs "
                       "trained apart (branch-train-mix)")
    u.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directory of a dense run (model.variant: dense); with 2 or more, "
                        "BTX: expert i is run i's FFN, every other weight the runs' mean")
    u.add_argument("--experts", type=int, default=None, metavar="E",
                   help="experts per MoE layer, each a copy of the dense FFN at that layer "
                        "(required with one run; with N runs it is N, one per run)")
    u.add_argument("--out", required=True, metavar="DIR",
                   help="the new run directory (must not exist, or be empty)")
    u.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="experts per token (default 2, or 1 with one expert: with "
                        "renormalised top-2 the upcycled model starts as the dense one)")
    u.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the upcycled run's config, e.g. "
                        "--set model.moe.dropless=true --set train.steps=200")

    w = sub.add_parser("sweep", help="a Ray Tune search over the MoE's knobs: each trial a Ray "
                       "run, ASHA stops the weak ones early")
    w.add_argument("sweep", help="sweep YAML, e.g. jobs/sweep.yaml")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base job for every trial, e.g. "
                        "--set train.steps=200")
    w.add_argument("--address", default=None,
                   help="run on this Ray cluster ('auto' after `ray start --head`)")
    w.add_argument("--out", default="sweep-results", metavar="DIR",
                   help="results.csv, best.yaml, sweep.png and each trial's run in trials/ "
                        "(default sweep-results; not a directory that holds a sweep)")

    b = sub.add_parser("bench", help="step time of the Ray path vs in process, side by side")
    b.add_argument("config", help="job YAML whose model is measured")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--out", default="bench-results")
    b.add_argument("--steps", type=int, default=30)

    g = sub.add_parser("gpu-check", help="expert FFN TFLOP/s and the Ray/in-process ratio on "
                       "a CUDA GPU")
    g.add_argument("--out", default="bench-results")

    d = sub.add_parser("data", help="make datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="synthetic coloured-shapes image-caption pairs")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True, help="training samples")
    s.add_argument("--n-test", type=int, default=None, help="held-out samples (default n/5)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=32)
    f = dsub.add_parser("fashion-mnist", help="convert Fashion-MNIST IDX files to shards")
    f.add_argument("--out", required=True)
    f.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    f.add_argument("--limit", type=int, default=None, help="keep the first N of each split")
    return p


def _train(args) -> int:
    from ..config import load_config
    from . import train

    overrides = list(args.overrides)
    if args.address:
        overrides += ["distributed.backend=ray", f"distributed.address={args.address}"]
    if args.local:
        overrides.append("distributed.backend=local")
    cfg = load_config(args.config, overrides)
    result = train(cfg, resume=not args.no_resume)
    run_dir = result.run_dir.resolve()
    log.info("run directory: %s", run_dir)
    log.info("  metrics: %s\n  checkpoints: %s\n  tokenizer: %s", run_dir / "metrics.jsonl",
             run_dir / "checkpoints", run_dir / "tokenizer.json")
    if result.eval:
        log.info("  eval: %s", run_dir / "eval.json")
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_run

    metrics = evaluate_run(Path(args.run_dir), data=args.data)
    print(json.dumps(metrics, indent=1, sort_keys=True))  # the result itself, not a log line
    return 0


def _caption(args) -> int:
    from .caption import caption_images

    captions = caption_images(Path(args.run_dir), [Path(p) for p in args.images],
                              beam=args.beam)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")  # the result itself, not a log line
    return 0


def _report(args) -> int:
    from .report import write_report

    report = write_report(Path(args.run_dir), data=args.data, examples=args.examples)
    log.info("wrote %d figure%s%s", len(report.figures), "" if len(report.figures) == 1 else "s",
             f", skipped {', '.join(report.skipped)}" if report.skipped else "")
    print(report.page)  # the result itself, not a log line
    return 0


def _upcycle(args) -> int:
    from ..train.upcycle import UpcycleError, upcycle

    if len(args.runs) > 1:
        return _btx(args)
    if args.experts is None:
        raise UpcycleError("--experts is required with one dense run (the experts per MoE "
                           "layer, each a copy of its FFN); with several runs it is their number")
    up = upcycle(Path(args.runs[0]), Path(args.out), experts=args.experts, top_k=args.top_k,
                 overrides=args.overrides)
    m = up.config.model
    n = len(up.moe_layers)
    log.info("upcycled %s (step %d) into %s: %d MoE layer%s (%s) of %d experts, top-%d, each "
             "expert a copy of the dense FFN there (%d units); gates initialised with run.seed "
             "%d; fresh AdamW state, from step 0", up.source, up.source_step, up.run_dir, n,
             "" if n == 1 else "s", ", ".join(up.moe_layers), m.moe.num_experts, m.moe.top_k,
             m.moe.expert_hidden, up.config.run.seed)
    log.info("train it: expertpar train %s", Path(args.out) / "config.yaml")
    return 0


def _btx(args) -> int:
    from ..train.btx import branch_train_mix

    mix = branch_train_mix([Path(r) for r in args.runs], Path(args.out), experts=args.experts,
                           top_k=args.top_k, overrides=args.overrides)
    m = mix.config.model
    n = len(mix.moe_layers)
    log.info("mixed %d dense runs into %s (BTX): %d MoE layer%s (%s) of %d experts, top-%d, "
             "expert i the FFN of run i (%d units); every other weight the runs' mean; gates "
             "initialised with run.seed %d; fresh AdamW state, from step 0; the config is %s's",
             len(mix.branches), mix.run_dir, n, "" if n == 1 else "s", ", ".join(mix.moe_layers),
             m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden, mix.config.run.seed,
             mix.branches[0].run)
    for i, b in enumerate(mix.branches):
        log.info("  expert %d: %s (step %d)", i, b.checkpoint, b.step)
    log.info("train it: expertpar train %s", Path(args.out) / "config.yaml")
    return 0


def _sweep(args) -> int:
    from .sweep import run_sweep

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"distributed.address={args.address}")
    r = run_sweep(args.sweep, args.out, overrides)
    print(r.table)  # the result itself, not a log line
    log.info("wrote %s, %s and %s; each trial's run is in %s", r.out / "results.csv",
             r.out / "best.yaml", r.out / "sweep.png", r.out / "trials")
    log.info("train the best: expertpar train %s", r.out / "best.yaml")
    return 0


def _bench(args) -> int:
    from ..config import load_config
    from .bench import BenchPlan, run_bench

    cfg = load_config(args.config, list(args.overrides) + ["distributed.backend=ray"])
    r = run_bench(cfg, Path(args.out), BenchPlan(model_steps=args.steps))
    for line in (Path(args.out) / "results.md").read_text().splitlines():
        log.info("%s", line)
    log.info("wrote %s, results.md and growth.png (%.0f s)", Path(args.out) / "results.json",
             r["bench_seconds"])
    return 0


def _gpu_check(args) -> int:
    from .gpu_check import run_gpu_check

    r = run_gpu_check(Path(args.out))
    log.info("wrote %s (%.0f s)", Path(args.out) / "gpu_check.json", r["seconds"])
    return 0


def _data(args) -> int:
    from ..data import convert_fashion_mnist, write_synthetic

    if args.data_command == "synth":
        if args.n < 1:
            raise ValueError(f"--n must be positive, got {args.n}")
        n_test = args.n_test if args.n_test is not None else max(1, args.n // 5)
        out = write_synthetic(args.out, n_train=args.n, n_test=n_test, seed=args.seed,
                              image_size=args.image_size)
    else:
        out = convert_fashion_mnist(args.out, source=args.source, limit=args.limit)
    log.info("wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_console(logging.WARNING if args.quiet else logging.DEBUG if args.verbose
                  else logging.INFO)
    from ..train.owners import CheckpointError  # a checkpoint that does not verify, by name

    handler = {"train": _train, "eval": _eval, "caption": _caption, "report": _report,
               "upcycle": _upcycle, "data": _data, "sweep": _sweep, "bench": _bench,
               "gpu-check": _gpu_check}[args.command]
    try:
        return handler(args)
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as err:
        log.error("expertpar %s: error: %s", args.command, err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
