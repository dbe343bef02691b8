"""The vision-language model: stems -> tower(s) with sparse-MoE FFNs -> pooled joint embeddings,
and (model.objective captioning or both) a caption decoder over the image tokens.

Knows nothing of Ray: MoE layers come from a backend (expertpar.moe.backend), and every MoE
layer is called the same way whichever backend built it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..moe import IMAGE, TEXT, LocalBackend, MoEBackend, RouteContext, RoutingStats
from .stems import CNNStem, ConvStem, PatchStem, TextEmbedding
from ..moe.experts import FFN
from .tower import Block, DecoderBlock, Seq


@dataclass
class Encoded:
    image_BE: torch.Tensor | None  # L2-normalised joint-space embeddings
    text_BE: torch.Tensor | None
    aux_loss: torch.Tensor  # sum over MoE layers of their weighted auxiliary losses
    image_tokens_BND: torch.Tensor | None = None  # the image tower's output tokens (decoder)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # "moe{L}/name" -> value
    stats: dict[int, RoutingStats] = field(default_factory=dict)  # MoE layer -> stats


def is_moe_layer(cfg: ModelConfig, depth_index: int) -> bool:
    return cfg.variant == "moe" and (depth_index + 1) % cfg.moe.every == 0


def dense_ffn_hidden(cfg: ModelConfig, depth_index: int) -> int:
    """The hidden width of a dense FFN at block ``depth_index``: where the MoE variant puts a
    MoE layer, the dense variant has ``top_k x expert_hidden`` units (equal active parameters
    per token)."""
    if cfg.variant == "dense" and (depth_index + 1) % cfg.moe.every == 0:
        return cfg.moe.top_k * cfg.moe.expert_hidden
    return cfg.ffn_hidden


def dense_ffn_activation(cfg: ModelConfig, depth_index: int) -> str:
    """The nonlinearity of a dense FFN at block ``depth_index``: GELU, except where the dense
    variant stands in for a MoE layer, which has the experts' (``model.moe.activation``)."""
    if cfg.variant == "dense" and (depth_index + 1) % cfg.moe.every == 0:
        return cfg.moe.activation
    return "gelu"


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, image_size: int, vocab_size: int,
                 context_length: int, backend: MoEBackend | None = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        backend = backend or LocalBackend()
        D = cfg.dim
        stems = {"patch": lambda: PatchStem(image_size, cfg.patch_size, D),
                 "conv": lambda: ConvStem(image_size, cfg.patch_size, D),
                 "cnn": lambda: CNNStem(image_size, D)}
        self.image_stem = stems[cfg.stem]()
        self.image_pos = nn.Parameter(torch.randn(1, self.image_stem.num_tokens, D) * 0.02)
        self.text_embed = TextEmbedding(vocab_size, context_length, D)
        self.modality_embed = nn.Parameter(torch.randn(2, D) * 0.02)
        self.num_moe_layers = 0
        if cfg.towers == "shared":
            self.towers = nn.ModuleDict({"shared": self._tower(backend, seed)})
        else:
            self.towers = nn.ModuleDict({"image": self._tower(backend, seed),
                                         "text": self._tower(backend, seed)})
        self.image_norm = nn.LayerNorm(D)
        self.text_norm = nn.LayerNorm(D)
        self.image_proj = nn.Linear(D, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(D, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        if cfg.has_decoder:
            # Built last: a contrastive model's parameters (and their initial values) are the
            # same as before decoders existed, and its MoE layers are numbered after the
            # encoder's.
            self.memory_norm = nn.LayerNorm(D)  # the image tokens the decoder attends to
            self.decoder = self._tower(backend, seed, cfg.decoder_depth, DecoderBlock)
            self.decoder_norm = nn.LayerNorm(D)
            self.lm_head = nn.Linear(D, vocab_size, bias=False)

    def _tower(self, backend: MoEBackend, seed: int, depth: int | None = None,
               block=Block) -> nn.ModuleList:
        cfg = self.cfg
        blocks = []
        for i in range(cfg.depth if depth is None else depth):
            if is_moe_layer(cfg, i):
                # MoE layers seed themselves; fork so the global RNG stream that initialises the
                # dense part is the same whatever the backend builds.
                with torch.random.fork_rng(devices=[]):
                    ffn = backend.build_layer(self.num_moe_layers, cfg.dim, cfg.moe, seed)
                self.num_moe_layers += 1
                blocks.append(block(cfg.dim, cfg.heads, ffn, is_moe=True))
            else:
                ffn = FFN(cfg.dim, dense_ffn_hidden(cfg, i), dense_ffn_activation(cfg, i))
                blocks.append(block(cfg.dim, cfg.heads, ffn, is_moe=False))
        return nn.ModuleList(blocks)

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        """(module name, layer) of every MoE layer, in MoE-layer-index order."""
        found = [(f"{n}.ffn", m.ffn) for n, m in self.named_modules()
                 if isinstance(m, Block) and m.is_moe]
        return sorted(found, key=lambda item: item[1].layer_index)

    def _run(self, tower: nn.ModuleList, seqs: list[Seq], ctx: RouteContext,
             enc: Encoded, *memory: torch.Tensor) -> list[Seq]:
        for block in tower:
            seqs, moe_out = block(seqs, ctx, *memory)
            if moe_out is not None:
                L = block.ffn.layer_index
                enc.aux_loss = enc.aux_loss + moe_out.aux_loss
                enc.aux.update({f"moe{L}/{k}": v for k, v in moe_out.aux.items()})
                enc.stats[L] = moe_out.stats
        return seqs

    def encode(self, images_BCHW: torch.Tensor | None = None, ids_BL: torch.Tensor | None = None,
               mask_BL: torch.Tensor | None = None,
               ctx: RouteContext = RouteContext()) -> Encoded:
        seqs = []
        if images_BCHW is not None:
            x = self.image_stem(images_BCHW) + self.image_pos + self.modality_embed[IMAGE]
            seqs.append(Seq(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), IMAGE))
        if ids_BL is not None:
            x = self.text_embed(ids_BL) + self.modality_embed[TEXT]
            seqs.append(Seq(x, mask_BL, TEXT))
        device = seqs[0].x_BND.device
        enc = Encoded(None, None, torch.zeros((), device=device))
        if "shared" in self.towers:
            seqs = self._run(self.towers["shared"], seqs, ctx, enc)
        else:
            seqs = [self._run(self.towers["image" if s.modality == IMAGE else "text"], [s], ctx,
                              enc)[0] for s in seqs]
        for s in seqs:
            # Mean over real tokens: padding never leaks into the embedding.
            m = s.mask_BN.unsqueeze(-1).to(s.x_BND.dtype)
            pooled_BD = (s.x_BND * m).sum(1) / m.sum(1).clamp_min(1.0)
            if s.modality == IMAGE:
                enc.image_BE = F.normalize(self.image_proj(self.image_norm(pooled_BD)), dim=-1)
                enc.image_tokens_BND = s.x_BND
            else:
                enc.text_BE = F.normalize(self.text_proj(self.text_norm(pooled_BD)), dim=-1)
        return enc

    def decode(self, image_tokens_BND: torch.Tensor, ids_BL: torch.Tensor,
               mask_BL: torch.Tensor, ctx: RouteContext = RouteContext(),
               enc: Encoded | None = None) -> torch.Tensor:
        """Next-token logits (B, L, V) of the caption decoder: position l predicts token l+1
        from tokens 0..l and the image tokens. Its MoE layers' auxiliary losses and statistics
        go into ``enc`` (with the encoder's, when it is the same forward's)."""
        if not self.cfg.has_decoder:
            raise ValueError("this model has no caption decoder (model.objective is "
                             "'contrastive'; 'captioning' or 'both' adds one)")
        enc = enc if enc is not None else Encoded(None, None, image_tokens_BND.new_zeros(()))
        x = self.text_embed(ids_BL) + self.modality_embed[TEXT]
        memory_BND = self.memory_norm(image_tokens_BND)
        (s,) = self._run(self.decoder, [Seq(x, mask_BL, TEXT)], ctx, enc, memory_BND)
        return self.lm_head(self.decoder_norm(s.x_BND))


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters and parameters active per token (one top-k share of each MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    expert_params, active_expert = 0, 0
    for _, layer in getattr(model, "moe_layers", lambda: [])():
        per_expert = [sum(p.numel() for p in e.parameters()) for e in layer.experts.experts]
        expert_params += sum(per_expert)
        active_expert += layer.cfg.top_k * per_expert[0] if per_expert else 0
    return {"total": total, "active_per_token": total - expert_params + active_expert}
