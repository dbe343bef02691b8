"""Command line: ``expertpar train|eval|data``. ``main(argv)`` is callable from tests."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertpar", description=__doc__)
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

    b = sub.add_parser("bench", help="step time of the Ray path vs in process, side by side")
    b.add_argument("config", help="job YAML whose model is measured")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--out", default="bench-results")
    b.add_argument("--steps", type=int, default=30)

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
    from .config import load_config
    from .train import train

    overrides = list(args.overrides)
    if args.address:
        overrides += ["distributed.backend=ray", f"distributed.address={args.address}"]
    if args.local:
        overrides.append("distributed.backend=local")
    cfg = load_config(args.config, overrides)
    result = train(cfg, resume=not args.no_resume)
    print(f"run directory: {result.run_dir.resolve()}")
    print(f"  metrics: {result.run_dir / 'metrics.jsonl'}\n  checkpoints: "
          f"{result.run_dir / 'checkpoints'}\n  tokenizer: {result.run_dir / 'tokenizer.json'}")
    if result.eval:
        print(f"  eval: {result.run_dir / 'eval.json'}")
    return 0


def _eval(args) -> int:
    from .evaluate_run import evaluate_run

    metrics = evaluate_run(Path(args.run_dir), data=args.data)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0


def _bench(args) -> int:
    from .bench import run_bench
    from .config import load_config

    cfg = load_config(args.config, list(args.overrides) + ["distributed.backend=ray"])
    r = run_bench(cfg, Path(args.out), steps=args.steps)
    print(f"in-process step {r['in_process_step_s'] * 1e3:.1f} ms | Ray path step "
          f"{r['ray_step_s'] * 1e3:.1f} ms | ratio {r['ray_over_in_process']:.2f}x | "
          f"{r['ray_calls_per_step_total']:.1f} Ray calls per step")
    print(f"wrote {Path(args.out) / 'step_time.json'}")
    return 0


def _data(args) -> int:
    from .data import convert_fashion_mnist, write_synthetic

    if args.data_command == "synth":
        if args.n < 1:
            raise ValueError(f"--n must be positive, got {args.n}")
        n_test = args.n_test if args.n_test is not None else max(1, args.n // 5)
        out = write_synthetic(args.out, n_train=args.n, n_test=n_test, seed=args.seed,
                              image_size=args.image_size)
    else:
        out = convert_fashion_mnist(args.out, source=args.source, limit=args.limit)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler = {"train": _train, "eval": _eval, "data": _data, "bench": _bench}[args.command]
    try:
        return handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"expertpar {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
