"""Topology-free checkpoints, written atomically and read without unpickling.

Layout of ``RUN/checkpoints/step_000100/``::

    manifest.json            format, step, sha256 of every file below
    dense.safetensors        dense parameters and their AdamW state
    router.safetensors       gate parameters of every MoE layer ("moe{L}.<name>") and state
    experts/L{L}_E{e}.safetensors   one shard per (MoE layer, expert) with its AdamW state
    train_state.json         step and the run's skip counts
    rng.safetensors          torch CPU RNG state
    config.yaml, tokenizer.json

Shards are keyed by what a parameter *is* (layer, expert), never by which process holds it, so
a run can resume with any placement of experts. A checkpoint is first written to a temporary
directory and renamed into place; ``latest`` is replaced last, so a crash mid-write leaves the
previous checkpoint as the latest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from .names import RNG_FILE
from .owners import CheckpointError, Shards

log = logging.getLogger("expertpar")
FORMAT = "expertpar-checkpoint/1"

__all__ = ["CheckpointError", "latest_checkpoint", "read_shards", "read_train_state",
           "restore_rng", "verify", "write_checkpoint"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(ckpt_root: Path, step: int, shards: Shards,
                     *, train_state: dict[str, Any], text_files: dict[str, str],
                     keep: int = 2) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    for stale in ckpt_root.glob(".tmp-*"):  # left by a writer killed mid-write (one writer a run)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp-step_{step:06d}-{os.getpid()}"
    (tmp / "experts").mkdir(parents=True)
    for rel, tensors in shards.items():
        save_file(tensors, str(tmp / rel))
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / RNG_FILE))
    (tmp / "train_state.json").write_text(json.dumps({"step": step, **train_state}, indent=1))
    for rel, text in text_files.items():
        (tmp / rel).write_text(text)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    for rel in files:
        with (tmp / rel).open("rb") as f:
            os.fsync(f.fileno())
    manifest = {"format": FORMAT, "step": step, "files": {r: _sha256(tmp / r) for r in files}}
    _write_synced(tmp / "manifest.json", json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # a rerun of the same step: move the old one aside, never half-merge
        os.replace(final, ckpt_root / f".tmp-replaced-{final.name}-{os.getpid()}")
    os.replace(tmp, final)
    latest_tmp = ckpt_root / f".tmp-latest-{os.getpid()}"
    _write_synced(latest_tmp, final.name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    _fsync_dir(ckpt_root)
    _prune(ckpt_root, keep, final)
    return final


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prune(ckpt_root: Path, keep: int, newest: Path) -> None:
    """Keep the ``keep`` newest checkpoints up to ``newest`` (the one ``latest`` names)."""
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name <= newest.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-replaced-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint to resume from: what ``latest`` names if it verifies, else the newest
    older one that does (with a warning naming what was wrong); None when there is none."""
    candidates = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = ckpt_root / "latest"
    named = pointer.read_text().strip() if pointer.exists() else ""
    if named:
        candidates = ([ckpt_root / named] +
                      [p for p in candidates if p.name < named])
    problems = []
    for path in candidates:
        try:
            verify(path)
            if problems:
                log.warning("resuming from %s: newer checkpoints are unusable: %s", path,
                            "; ".join(problems))
            return path
        except CheckpointError as err:
            problems.append(str(err))
    if problems:
        raise CheckpointError("no usable checkpoint in " + str(ckpt_root) + ": " +
                              "; ".join(problems))
    return None


def verify(path: Path) -> dict[str, Any]:
    """Read the manifest and check every file's checksum; raise naming the first bad file."""
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {path} has no manifest.json (incomplete write?)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    for rel, digest in manifest["files"].items():
        f = path / rel
        if not f.exists() or _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is missing or its checksum differs "
                                  f"from {manifest_path}")
    return manifest


def read_shards(path: Path, files: Iterable[str] | None = None, *,
                verified: bool = False) -> Shards:
    """The tensor files of a checkpoint (all of them, or just ``files`` that it has), checked
    against the manifest unless the caller has just verified it."""
    manifest = json.loads((path / "manifest.json").read_text()) if verified else verify(path)
    wanted = set(files) if files is not None else None
    return {rel: load_file(str(path / rel)) for rel in manifest["files"]
            if rel.endswith(".safetensors") and rel != RNG_FILE
            and (wanted is None or rel in wanted)}


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "train_state.json").read_text())


def restore_rng(path: Path) -> None:
    torch.set_rng_state(load_file(str(path / RNG_FILE))["torch_cpu"])
