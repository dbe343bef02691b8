"""The sweep file the sweep tests start from."""
from __future__ import annotations

from pathlib import Path

import yaml

from conftest import tiny_config
from expertpar.config import dump_config


def write_sweep(tmp_path: Path, base: dict | None = None, **sweep) -> Path:
    """A tiny base job (evaluating at every checkpoint) and a sweep over it; ``sweep`` keys
    replace the defaults here."""
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs",
                      **{"train.eval_every": 10, **(base or {})})
    (tmp_path / "base.yaml").write_text(dump_config(cfg))
    doc = {"base": "base.yaml", "num_samples": 2, "scheduler": {"grace_period": 10},
           "space": {"model.moe.top_k": {"choice": [1, 2]}}, **sweep}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))  # the knobs in the order written
    return path
