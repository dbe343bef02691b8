"""Configuration: one frozen dataclass per concern, loaded strictly from YAML.

Every error names the offending key path (``model.moe.top_k``) and value. Unknown keys are
refused, values are type-checked (an int is accepted where a float is expected, nothing else is
coerced), and ``--set a.b=c`` overrides go through the same checks as the file.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key path and the value."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"  # run name: the directory under out_dir, and the Ray Train run name
    out_dir: str = "runs"  # the run directory is out_dir/name
    seed: int = 0  # seeds initialisation, data order, augmentation and gate noise

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if not self.name or "/" in self.name:
            bad.append(("name", "must be a non-empty name without '/'"))
        return bad


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # shards dir, .tar, glob, or .csv/.tsv manifest
    eval: Optional[str] = None  # held-out split for zero-shot and retrieval
    image_size: int = 32  # images are resized/cropped to this square side
    hflip: bool = False  # off by default: captions say "left of" / "right of"
    max_train_samples: Optional[int] = None  # keep only the first N valid training samples
    max_eval_samples: Optional[int] = None  # keep only the first N valid held-out samples

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if not self.train:
            bad.append(("train", "is required (a shard directory, .tar, glob or .csv/.tsv)"))
        if self.image_size < 8:
            bad.append(("image_size", "must be >= 8"))
        for key in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                bad.append((key, "must be positive or null"))
        return bad


@dataclass(frozen=True)
class TokenizerConfig:
    path: Optional[str] = None  # a tokenizer.json to load; null trains one on the train captions
    vocab_size: int = 1000  # WordPiece vocabulary trained on the training captions
    context_length: int = 16  # tokens per caption, [BOS] and [EOS] included
    # a GloVe text file (`word v1 ... vd`, gzipped or not): whole-word tokens found in it start
    # from their vector (projected to model.dim by a seeded map when d differs); a trained
    # vocabulary takes GloVe's words, in file order, into the slots the captions leave
    glove: Optional[str] = None

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if self.glove is not None and not self.glove.strip():
            bad.append(("glove", "must be a path to a GloVe file, or null"))
        if self.vocab_size < 16:
            bad.append(("vocab_size", "must be >= 16"))
        if self.context_length < 3:
            bad.append(("context_length", "must be >= 3 (BOS, one token, EOS)"))
        return bad


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 4  # E experts per MoE layer
    routing: Literal["token_choice", "expert_choice"] = "token_choice"  # token_choice: each token picks top_k experts; expert_choice: each expert picks its top ceil(capacity_factor*T/E) tokens (Zhou et al. 2022)
    top_k: int = 1  # experts chosen per token (1: Switch, 2: GShard); token_choice only
    every: int = 2  # every n-th FFN (counting from the n-th) is a sparse MoE layer
    expert_hidden: int = 128  # F of each expert FFN
    activation: Literal["gelu", "relu", "silu"] = "gelu"  # the expert FFNs' nonlinearity (and the dense variant's FFNs where MoE layers would be)
    temperature: float = 1.0  # alpha in softmax(alpha * logits)
    noise_std: float = 0.0  # std of Gaussian noise added to gate logits while training
    renormalize: bool = True  # top-k weights sum to 1 (only for top_k > 1; top-1 keeps p)
    capacity_factor: float = 1.25  # slots per expert = ceil(factor * tokens * top_k / E), training
    eval_capacity_factor: float = 2.0  # the same at evaluation
    dropless: bool = False  # no capacity limit: no token is ever dropped
    drop_policy: Literal["probability", "position"] = "probability"  # over capacity, drop lowest-probability (or latest-position) first
    batch_prioritized_images: bool = False  # V-MoE BPR: text first, image tokens by top-1 probability
    load_balance_weight: float = 0.01  # Switch load-balancing loss weight
    z_loss_weight: float = 0.001  # ST-MoE router z-loss weight
    # LIMoE's entropy losses, per modality. Without them the gates stay flat (mean entropy ~ln E:
    # top-1 rests on tiny logit gaps and each output is scaled by p ~ 1/E); local at 0.05 with
    # global at twice it gives decisive gates with balanced experts (README, "Routers that decide")
    local_entropy_weight: float = 0.05  # pushes each token to be decisive
    global_entropy_weight: float = 0.10  # pushes experts to be used evenly
    # the expert FFNs' matmuls: float32, or bfloat16 under autocast (weights, gradients and
    # optimizer state stay float32; the gate and routing always run in float32)
    expert_precision: Literal["float32", "bfloat16"] = "float32"
    # GShard routing groups: a training batch is routed in this many groups of whole samples
    # (capacity and noise per group; losses and statistics over the batch). On Ray each
    # router actor routes one group: it must equal experts.num_routers
    routing_groups: int = 1

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if self.routing_groups < 1:
            bad.append(("routing_groups", "must be >= 1"))
        if self.num_experts < 1:
            bad.append(("num_experts", "must be >= 1"))
        if self.top_k < 1:
            bad.append(("top_k", "must be >= 1"))
        elif self.top_k > self.num_experts:
            bad.append(("top_k", f"must be <= model.moe.num_experts ({self.num_experts})"))
        if self.every < 1:
            bad.append(("every", "must be >= 1"))
        if self.expert_hidden < 1:
            bad.append(("expert_hidden", "must be >= 1"))
        if not self.temperature > 0:
            bad.append(("temperature", "must be > 0"))
        if self.noise_std < 0:
            bad.append(("noise_std", "must be >= 0"))
        if self.routing == "expert_choice":
            # Token-choice knobs that expert choice would silently ignore are refused.
            why = "with model.moe.routing 'expert_choice' (each expert takes its top-C tokens)"
            for key, default in (("dropless", False), ("top_k", 1), ("drop_policy", "probability"),
                                 ("batch_prioritized_images", False)):
                if getattr(self, key) != default:
                    bad.append((key, f"must be {default!r} {why}"))
        if not self.dropless:
            for key in ("capacity_factor", "eval_capacity_factor"):
                if not getattr(self, key) > 0:
                    bad.append((key, "must be > 0 unless model.moe.dropless is true"))
        for key in ("load_balance_weight", "z_loss_weight", "local_entropy_weight",
                    "global_entropy_weight"):
            if getattr(self, key) < 0:
                bad.append((key, "must be >= 0"))
        return bad


@dataclass(frozen=True)
class ModelConfig:
    variant: Literal["moe", "dense"] = "moe"  # dense: FFNs of top_k*expert_hidden where MoE layers were (same active FFN parameters per token)
    towers: Literal["shared", "separate"] = "shared"  # LIMoE one tower, or CLIP two towers
    stem: Literal["patch", "conv", "cnn"] = "patch"  # patch: ViT patch embedding; conv: 3x3 convs; cnn: ResNet-18 stem
    patch_size: int = 4  # patch side for the patch stem
    dim: int = 64  # D, the transformer width
    depth: int = 4  # transformer blocks per tower
    heads: int = 4  # attention heads
    ffn_hidden: int = 128  # hidden width of the dense FFNs
    embed_dim: int = 64  # joint image-text space
    init_temperature: float = 0.07  # CLIP logit scale starts at 1/this
    # contrastive: CLIP's loss on the pooled embeddings; captioning: a text decoder that
    # attends to the image tokens learns to write the caption (autoregressive cross-entropy);
    # both: CoCa, the sum (the captioning term weighted by caption_loss_weight)
    objective: Literal["contrastive", "captioning", "both"] = "contrastive"
    decoder_depth: int = 2  # blocks of the caption decoder; its every n-th FFN is MoE too
    caption_loss_weight: float = 2.0  # objective both: the captioning term's weight (CoCa: 2, contrastive 1)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def check(self) -> list[tuple[str, str]]:
        bad = []
        for key in ("patch_size", "dim", "depth", "heads", "ffn_hidden", "embed_dim"):
            if getattr(self, key) < 1:
                bad.append((key, "must be >= 1"))
        if self.heads >= 1 and self.dim % self.heads:
            bad.append(("heads", f"must divide model.dim ({self.dim})"))
        if not 0 < self.init_temperature < 1:
            bad.append(("init_temperature", "must be in (0, 1)"))
        if self.decoder_depth < 1:
            bad.append(("decoder_depth", "must be >= 1"))
        if not self.caption_loss_weight > 0:
            bad.append(("caption_loss_weight", "must be > 0"))
        if self.has_decoder and self.variant == "moe" and self.moe.routing == "expert_choice":
            # Each expert picks its tokens among the whole batch's: a caption token's output
            # would depend on the tokens after it, which generation (one token at a time)
            # cannot reproduce. Token choice routes each token on its own.
            bad.append(("moe.routing", f"is refused with model.objective "
                        f"'{self.objective}': the caption decoder generates one token at a "
                        f"time, so its routing must not look at later tokens; use "
                        f"'token_choice'"))
        if self.variant == "moe" and self.moe.every > self.depth:
            bad.append(("moe.every", f"must be <= model.depth ({self.depth}) or no layer is MoE"))
        return bad

    @property
    def has_decoder(self) -> bool:
        return self.objective != "contrastive"

    @property
    def has_contrastive(self) -> bool:
        """The text tower and the projections train (captioning alone leaves them be)."""
        return self.objective != "captioning"

    @property
    def decoder_moe_layers(self) -> int:
        """MoE layers of the caption decoder (numbered after the encoder's)."""
        if not self.has_decoder or self.variant != "moe":
            return 0
        return self.decoder_depth // self.moe.every


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # optimizer steps in the whole run
    batch_size: int = 64  # global batch (split evenly over Ray Train workers)
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.05  # AdamW decay on weight matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    log_every: int = 10  # steps between metrics lines and progress prints
    # also write every metrics line's numbers as TensorBoard scalars (event files in the run
    # directory, lead process only): `tensorboard --logdir runs` then shows every run
    tensorboard: bool = True
    eval_every: int = 100  # 0: only at the end
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    # losses (an expert actor, router, train worker or node gone, or a call past its deadline)
    # the Ray job recovers from by itself, from the newest checkpoint that verifies
    max_recoveries: int = 3
    # steps in a row with a NaN or inf loss or gradient (each is skipped everywhere) before
    # the job stops, keeping the checkpoint from before the first of them
    max_skipped_in_a_row: int = 5
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where the dense part runs; auto: CUDA when present

    def check(self) -> list[tuple[str, str]]:
        bad = []
        for key in ("steps", "batch_size", "log_every", "keep_checkpoints",
                    "max_skipped_in_a_row"):
            if getattr(self, key) < 1:
                bad.append((key, "must be >= 1"))
        if not self.lr > 0:
            bad.append(("lr", "must be > 0"))
        if not 0 <= self.min_lr_ratio <= 1:
            bad.append(("min_lr_ratio", "must be in [0, 1]"))
        for key in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "checkpoint_every",
                    "max_recoveries"):
            if getattr(self, key) < 0:
                bad.append((key, "must be >= 0"))
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                bad.append((key, "must be in [0, 1)"))
        return bad


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 256  # evaluation batch size
    recall_at: tuple[int, ...] = (1, 5, 10)  # K values of retrieval recall@K
    zero_shot_top: tuple[int, ...] = (1, 5)  # K values of zero-shot top-K accuracy

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if self.batch_size < 1:
            bad.append(("batch_size", "must be >= 1"))
        for key in ("recall_at", "zero_shot_top"):
            if not getattr(self, key) or min(getattr(self, key)) < 1:
                bad.append((key, "must be a non-empty list of positive integers"))
        return bad


@dataclass(frozen=True)
class DistributedConfig:
    backend: Literal["local", "ray"] = "local"  # local: one process; ray: expert actors
    address: Optional[str] = None  # Ray address ("auto", "ray://..."); null: RAY_ADDRESS or embedded
    num_workers: int = 1  # Ray Train workers running the data-parallel dense part
    use_gpu: bool = False  # train workers on GPUs (gpus_per_worker each)
    # GPU share of a train worker when use_gpu; a fraction (one worker only: NCCL refuses two
    # workers on one GPU) lets the worker and GPU expert actors share one GPU (a one-GPU
    # workstation: 0.5 here, 0.25 per expert actor)
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0  # CPUs reserved per train worker
    embedded_num_cpus: Optional[int] = None  # logical CPUs of an embedded Ray (null: enough)
    # torch threads of a train worker's dense part; null: its node's cores shared by the
    # workers there (Ray's OMP_NUM_THREADS=1 would starve it while the expert actors idle)
    threads_per_worker: Optional[int] = None

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if self.num_workers < 1:
            bad.append(("num_workers", "must be >= 1"))
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            bad.append(("threads_per_worker", "must be >= 1 or null"))
        if self.cpus_per_worker < 0:
            bad.append(("cpus_per_worker", "must be >= 0"))
        if not self.gpus_per_worker > 0 or (self.gpus_per_worker > 1 and
                                            self.gpus_per_worker != int(self.gpus_per_worker)):
            bad.append(("gpus_per_worker", "must be a fraction in (0, 1] or a whole number"))
        elif self.gpus_per_worker != 1.0 and not self.use_gpu:
            bad.append(("gpus_per_worker", "is set but use_gpu is false: the workers would "
                        "hold no GPU; set distributed.use_gpu: true"))
        elif self.gpus_per_worker < 1 and self.num_workers > 1:
            bad.append(("gpus_per_worker", f"a fraction with num_workers {self.num_workers} "
                        "could put two workers on one GPU, which NCCL refuses ('Duplicate GPU "
                        "detected'); give each worker a whole GPU, or use one worker"))
        if self.embedded_num_cpus is not None and self.embedded_num_cpus < 1:
            bad.append(("embedded_num_cpus", "must be >= 1 or null"))
        return bad


@dataclass(frozen=True)
class ExpertsConfig:
    # expert actors hosting the (MoE layer, expert) shards: a count, or [min, max] to grow
    # onto nodes that join and shrink off nodes that leave (re-placed at a checkpoint)
    num_actors: Union[int, tuple[int, ...]] = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # fractional shares allowed, e.g. 0.25
    placement: Literal["spread", "pack"] = "spread"  # placement-group strategy over nodes
    router_cpus: float = 0.0  # the router only gates and moves tokens; experts compute
    # GPU share of the router, taken beside the first expert actor on its GPU: the gate and
    # dispatch run there, and tokens between processes on that GPU stay on it (CUDA IPC)
    router_gpus: float = 0.0
    # torch threads of the router; null: its node's cores (it works while the others wait)
    router_threads: Optional[int] = None
    # torch threads of an expert actor; null: its node's cores shared by the actors there
    threads_per_actor: Optional[int] = None
    # same-node token batches through shared-memory buffers (false: Ray's object store)
    shared_memory: bool = True
    # router actors; each routes the tokens of num_workers / num_routers train workers as one
    # group (model.moe.routing_groups must match), so no single router serves every worker
    num_routers: int = 1
    # the token payload's way: through the router (it dispatches to the expert actors and
    # combines), or direct (the router routes and sends each worker its plan and combine
    # weights; the worker calls the expert actors itself and combines)
    transport: Literal["router", "direct"] = "router"
    # how same-node forward and backward calls travel: a Unix socket per actor (~50 us a
    # call), or Ray actor calls (~1 ms); other calls, and peers on other nodes, use Ray
    calls: Literal["socket", "ray"] = "socket"
    # seconds a MoE call may take before its peer counts as stuck, a loss the job recovers
    # from (train.max_recoveries); the deadline of every wait on the hot path
    call_timeout_s: float = 600.0

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if not self.call_timeout_s > 0:
            bad.append(("call_timeout_s", "must be > 0"))
        if isinstance(self.num_actors, tuple) and not (
                len(self.num_actors) == 2 and 1 <= self.num_actors[0] <= self.num_actors[1]):
            bad.append(("num_actors", "must be a count or a [min, max] pair with "
                        "1 <= min <= max"))
        elif self.min_actors < 1:
            bad.append(("num_actors", "must be >= 1"))
        if self.num_routers < 1:
            bad.append(("num_routers", "must be >= 1"))
        for key in ("router_threads", "threads_per_actor"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad.append((key, "must be >= 1 or null"))
        for key in ("cpus_per_actor", "gpus_per_actor", "router_cpus", "router_gpus"):
            if getattr(self, key) < 0:
                bad.append((key, "must be >= 0"))
        # routers beside one actor, at the fewest actors
        per_gpu = -(-self.num_routers // max(1, self.min_actors))
        if self.router_gpus > 0 and self.gpus_per_actor + per_gpu * self.router_gpus > 1:
            bad.append(("router_gpus", f"with gpus_per_actor {self.gpus_per_actor} must leave "
                        f"gpus_per_actor + router_gpus <= 1: the router shares the first expert "
                        f"actor's GPU" + (f" (router r shares actor r mod num_actors', so "
                                          f"{per_gpu} routers share one GPU)"
                                          if per_gpu > 1 else "")))
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            bad.append(("gpus_per_actor", "must be a fraction <= 1 or a whole number"))
        return bad

    @property
    def min_actors(self) -> int:
        return self.num_actors[0] if isinstance(self.num_actors, tuple) else self.num_actors

    @property
    def max_actors(self) -> int:
        return self.num_actors[-1] if isinstance(self.num_actors, tuple) else self.num_actors

    @property
    def elastic(self) -> bool:
        """The actor count follows the cluster (``num_actors: [min, max]`` with min < max)."""
        return self.min_actors < self.max_actors


def check_num_actors(num_actors: int, num_layers: int, num_experts: int) -> str | None:
    """None when the actor count works, else why not (for the config error)."""
    shards = num_layers * num_experts
    if num_actors < 1:
        return "must be >= 1"
    if shards and num_actors > shards:
        return (f"must be <= the number of expert shards ({num_layers} MoE layers x "
                f"{num_experts} experts = {shards}); an actor with no expert would idle "
                f"(expert replicas are not built yet)")
    return None



@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)

    def check(self) -> list[tuple[str, str]]:
        bad = []
        p = self.model.patch_size
        if self.model.stem == "conv" and p & (p - 1):
            bad.append(("model.patch_size", "must be a power of two for model.stem 'conv'"))
        if self.model.stem in ("patch", "conv") and self.data.image_size % self.model.patch_size:
            bad.append(("model.patch_size",
                        f"must divide data.image_size ({self.data.image_size})"))
        W = self.distributed.num_workers
        if self.distributed.backend == "ray" and self.train.batch_size % W:
            bad.append(("train.batch_size",
                        f"must be divisible by distributed.num_workers ({W})"))
        if self.distributed.backend == "ray" and self.model.variant == "moe":
            problem = check_num_actors(self.experts.max_actors, self.num_moe_layers,
                                       self.model.moe.num_experts)
            if problem:
                bad.append(("experts.num_actors", problem))
            R = self.experts.num_routers
            if W % R:
                bad.append(("experts.num_routers", f"{R} must divide distributed.num_workers "
                            f"({W}): each router serves num_workers / num_routers workers"))
            if self.model.moe.routing_groups != R:
                bad.append(("model.moe.routing_groups", f"{self.model.moe.routing_groups} must "
                            f"equal experts.num_routers ({R}) on Ray: each router routes one "
                            f"group, the tokens of its workers"))
        if self.distributed.use_gpu and self.train.device == "cpu":
            bad.append(("distributed.use_gpu", "is true but train.device is 'cpu': the workers "
                        "would hold a GPU and not use it; set train.device: cuda (or auto), "
                        "or use_gpu: false"))
        return bad

    @property
    def num_moe_layers(self) -> int:
        if self.model.variant != "moe":
            return 0
        towers = 1 if self.model.towers == "shared" else 2
        return towers * (self.model.depth // self.model.moe.every) + self.model.decoder_moe_layers

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# ---------------------------------------------------------------- loading and checking


_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert_value(tp: Any, value: Any, path: str, what: str = "config key") -> Any:
    """Check ``value`` against the annotation ``tp``; return it (tuples for list fields). Errors
    name ``path`` as ``what``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(arg, value, path, what)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{what} '{path}': {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{what} '{path}': {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{what} '{path}': {value!r} is not a list")
        return tuple(convert_value(item_tp, v, f"{path}[{i}]", what) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, path, what)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} '{path}': {value!r} is not a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what} '{path}': {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{what} '{path}': {value!r} is not a number")
        if not math.isfinite(value):
            raise ConfigError(f"{what} '{path}': {value!r} is not finite")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} '{path}': {value!r} is not a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def build_section(cls: type, data: Any, path: str = "", what: str = "config key") -> Any:
    """``cls`` built strictly from the mapping ``data`` at ``path``; every error names the key
    and value, as ``what`` ("config key", or "sweep key" for a sweep file)."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {what} '{prefix}{unknown[0]}' = {data[unknown[0]]!r} "
                          f"(known keys under '{path or '<root>'}': {sorted(names)})")
    kwargs = {k: convert_value(hints[k], v, f"{prefix}{k}", what) for k, v in data.items()}
    for f in dataclasses.fields(cls):  # absent sections are still checked (data.train!)
        if f.name not in kwargs and dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build_section(hints[f.name], {}, f"{prefix}{f.name}", what)
    obj = cls(**kwargs)
    for key, message in obj.check():
        value = obj
        for part in key.split("."):
            value = getattr(value, part)
        full = key if "." in key and cls is Config else f"{prefix}{key}"
        raise ConfigError(f"{what} '{full}': {value!r} {message}")
    return obj


def get_path(tree: dict, dotted: str) -> Any:
    """The value at ``dotted`` ("model.moe.top_k") in a config tree; None where a section or
    key is absent."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` in a config tree, making absent (or empty) sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if node.get(part) is None:  # an absent or empty (`model:`) section
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.moe.top_k=2"`` -> ``("model.moe.top_k", 2)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. model.moe.num_experts=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err})") from None
    return key.strip(), value


def config_from_dict(data: dict, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    tree = dict(data or {})
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy of plain data
    for text in overrides:
        key, value = parse_override(text)
        set_path(tree, key, value)
    return build_section(Config, tree)


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The YAML mapping in ``path`` (an empty file is an empty one); errors name ``what``
    ("config file", "sweep file") and the path."""
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}': top level must be a mapping")
    return dict(data or {})


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    path = Path(path)
    data = read_yaml_mapping(path, "config file")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_to_dict(cfg: Any) -> dict:
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
