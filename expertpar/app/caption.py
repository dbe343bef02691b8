"""``expertpar caption``: a caption for each image file, from a run's newest checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import make_transform
from ..data.decode import decode_image
from ..data.errors import SampleError
from ..eval.generate import generate
from ..train.setup import pick_device
from .evaluate import load_run_config, load_run_model


def caption_images(run_dir: Path, images: list[Path], *, beam: int = 1) -> list[str]:
    """One caption per file of ``images``, in order: greedy (``beam`` 1) or the best of a beam
    search. Every file is read before the model runs, so a bad one is named at once."""
    if beam < 1:
        raise ValueError(f"--beam {beam}: must be >= 1 (1 is greedy)")
    cfg = load_run_config(run_dir)
    if not cfg.model.has_decoder:
        raise ValueError(f"{run_dir / 'config.yaml'}: model.objective is 'contrastive', a model "
                         f"without a caption decoder; train with model.objective captioning or "
                         f"both to caption images")
    transform = make_transform(cfg.data.image_size, train=False)
    pixels = []
    for path in images:
        if not path.is_file():
            raise FileNotFoundError(f"image '{path}' does not exist")
        try:
            pixels.append(transform(decode_image(path.read_bytes(), key=str(path))))
        except SampleError as err:
            raise ValueError(f"image '{path}' cannot be read: {err}") from None
    model, tokenizer, _ = load_run_model(run_dir, cfg)
    device = pick_device(cfg.train.device)
    model = model.to(device)
    out = []
    for start in range(0, len(pixels), cfg.eval.batch_size):
        batch = torch.stack(pixels[start:start + cfg.eval.batch_size]).to(device)
        ids = generate(model, batch, max_tokens=cfg.tokenizer.context_length - 1, beam=beam)
        out.extend(tokenizer.decode_batch(ids, skip_special_tokens=True))
    return out
