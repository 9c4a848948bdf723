"""Recipe schema and loading: one dataclass per section, composed YAML, `key=value` overrides, validation.

A recipe is a YAML file. Its optional `defaults:` list names other YAML files (relative to the recipe, each may
have its own `defaults:`) that are merged first, in order; the recipe's own keys go on top, then the command
line's `key=value` overrides (OmegaConf dotlist, e.g. `model.dim=256 model.window=null`). `${...}` interpolation
is resolved after the merge.

Each section is a dataclass with a docstring per field and a `__post_init__` that raises `ValueError` naming
the key. `section_from_dict` builds one from a plain mapping: an unknown key is an error that suggests the closest
valid one, and values are type-checked. Sections register in `SECTIONS` (`model` here, `data` from
`titans_train/data/config.py`, `eval` from
`titans_train/eval/config.py`, the training sections from `titans_train/train/config.py`); `recipe_config` checks
the whole recipe, where an unknown top-level key is an error too.

    cfg = load_recipe("recipes/mag_170m.yaml", ["model.n_layers=2"])   # plain dict, merged and resolved
    model_cfg = model_config(cfg)                                      # ModelConfig, validated
    recipe = recipe_config(cfg)                                        # every section, validated (Recipe)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VARIANTS = ("lmm", "mac", "mag", "mal", "transformer")
"""Known values of `model.variant` (TITANS.md section 3)."""

GATES = ("sigmoid", "silu")
MAC_POOLS = ("mean", "last")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


@dataclass
class MemoryConfig:
    """`model.memory`: the neural long-term memory (TITANS.md section 1). Field names are `NeuralMemory` kwargs."""

    depth: int = 2
    """Layers of the memory MLP (L_M; paper 2). 1 with `residual` and `layer_norm` off is the linear memory."""
    expansion: int = 4
    """Hidden width of the memory MLP as a multiple of the memory head dim (paper 4)."""
    heads: int | None = None
    """Memory heads; null: the model's `heads`. The memory head dim is `dim // heads`."""
    chunk_size: int = 16
    """Memory chunk: tokens whose inner gradients share one anchor (paper 16; smaller is better and slower)."""
    max_lr: float = 0.1
    """Upper bound of the inner learning rate: theta_t = max_lr * sigmoid(linear(x_t))."""
    per_layer_theta: bool = False
    """One theta per memory-MLP layer (NeurIPS version) instead of one per head and token."""
    channel_alpha: bool = False
    """Channel-wise forgetting gate: one alpha per channel of the memory head (head dim of them per head and token)
    instead of one. Row r of the first memory-MLP layer (key/query feature r) decays with alpha[r], the later layers
    with the channel mean. Runs the memory op's autograd step (the CPU and Triton kernels have no channel-wise form)."""
    residual: bool = True
    """Memory output form M(x) = x + LN(f(x)): the residual part."""
    layer_norm: bool = True
    """Memory output form M(x) = x + LN(f(x)): the LayerNorm (no affine) part."""
    ln_eps: float = 0.1
    """Epsilon of that LayerNorm, on the scale of f(k) (std ~init_std at init). It bounds LN's Jacobian by
    1 / sqrt(ln_eps) when the fast weights shrink inside a sequence (the forgetting gate decays them and LN hides it
    in the forward); 1e-5, a standard LN's, made the late gradient spikes (recipes/README.md, "The memory's
    gradient scale")."""
    conv_kernel: int = 4
    """Causal depthwise conv on q, k, v before SiLU (paper 4); 1 switches it off. Initialised to the identity."""
    init_std: float = 1.0
    """Memory init: the learned initial fast weights W_0 are normal with std init_std / sqrt(fan_in)."""
    init_scale: str = "input_norm"
    """How W_0's std is set: `input_norm` (pre-activations of std init_std given the L2-normalised keys, so f(k)
    starts at unit scale and the LayerNorm's Jacobian near 1) or `fan_in` (init_std / sqrt(fan_in): with unit-norm
    keys f(k) starts at std ~0.06 and LN multiplies every inner gradient by ~16). See NeuralMemory's docstring."""
    value_norm: bool = True
    """RMS-normalise the values v per head: targets on the scale of M(k) = k + LN(f(k)) (LN's output has unit
    RMS and cannot shrink to meet small values)."""
    inner_step: str = "normalized"
    """`normalized`: each memory layer's theta is divided by the expected squared norm of its input (1 for the
    first layer, expansion x head dim x E[gelu^2] for later ones), so theta's [0, max_lr] range is the same bounded
    step on every layer; `plain`: theta as is (the second layer's step is then ~100x past its stability limit:
    step-1 gradient norms 1e5-1e7x the transformer's). Keep `normalized` unless you study it."""
    momentum_form: str = "ema"
    """`ema` (default): theta_t is scaled by (1 - eta_t), so the momentum is an average of the gradients (gain 1);
    `plain`: the paper's S_t = eta_t S_(t-1) - theta_t grad_t, whose gain 1 / (1 - eta_t) is ~8 at init and is
    what the outer loop raises to get writes stronger than max_lr allows (measured: eta learnt to 0.999-0.9998 on
    some tokens, a 1,000-5,600x step, with theta pinned at max_lr). `ema` gave a lower validation loss in 9 of 10
    runs measured (every variant, tiny recipes and mini, one seed each; the exception tiny_mac at lr 1e-3) and
    fewer late gradient spikes; recipes/README.md ("Late spikes") has the numbers."""
    theta_bias: float = 0.0
    """Rate parameterisation: initial bias of theta's linear map in sigmoid space (0: theta = max_lr / 2)."""
    eta_bias: float = 2.0
    """Initial bias of the momentum decay eta = sigmoid(linear(x)) (2.0: eta ~ 0.88)."""
    alpha_bias: float = -6.0
    """Initial bias of the forgetting gate alpha = sigmoid(linear(x)) (-6.0: alpha ~ 0.0025, ~400-token memory)."""
    forget_target: str = "initial"
    """What the forgetting gate decays the fast weights towards: `initial` (default: the learned W_0, M_t = (1 -
    alpha_t) M_(t-1) + alpha_t W_0 + S_t) or `zero` (the paper's M_t = (1 - alpha_t) M_(t-1) + S_t). With `zero` a
    long stream forgets a bias-free memory MLP towards zero, where the inner gradient of each layer (a product with
    the others' weights) vanishes: trained on 512-token windows, the mini MAG's fast weights fell to 1/8 of W_0 in
    a stream and streamed text scored worse than isolated windows (+0.07 bits/byte; LMM +0.25). With `initial` the
    memory forgets back to the prior the outer loop learnt, and streaming beats isolated windows (MAG -0.03, LMM
    -0.02, MAL -0.03 bits/byte; recipes/README.md, "Long streams"). Every implementation of the memory op has it; it costs
    one more small matmul per memory layer and chunk (an LMM training step at T = 32K: 7.6-9%, BENCHMARKS.md)."""
    compile: bool = False
    """Run the memory op's per-chunk autograd step through torch.compile (fewer kernels on GPU; compiles once per
    process and shape, tens of seconds). On CPU leave it off: the default there is the op's C++ kernel, 2.2x faster
    than the compiled step at chunk 16 (BENCHMARKS.md). Same results up to float rounding."""

    def __post_init__(self):
        for key in ("depth", "expansion", "chunk_size", "conv_kernel"):
            _require_positive(self, key, "model.memory")
        if self.heads is not None:
            _require_positive(self, "heads", "model.memory")
        if not self.max_lr > 0:
            raise ValueError(f"model.memory.max_lr={self.max_lr} must be > 0")
        for key, choices in (("init_scale", ("input_norm", "fan_in")), ("inner_step", ("normalized", "plain")),
                             ("momentum_form", ("plain", "ema")), ("forget_target", ("zero", "initial"))):
            if getattr(self, key) not in choices:
                raise ValueError(f"model.memory.{key}={getattr(self, key)!r} must be one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """`model`: which network and its sizes (TITANS.md sections 3-4). Derived numbers are methods."""

    variant: str = ""
    """One of lmm, mac, mag, mal, transformer (Transformer++)."""
    vocab_size: int = 32000
    """Embedding rows and output logits (Llama-2 tokenizer: 32000)."""
    dim: int = 768
    """Model width."""
    n_layers: int = 12
    """Number of blocks."""
    heads: int = 16
    """Attention heads; must divide `dim`."""
    mlp_hidden: int | None = None
    """SwiGLU hidden width; null: 8/3 * dim rounded up to a multiple of 64. Recipes set it to reach their size."""
    max_seq_len: int = 4096
    """Training length (tokens per sequence chunk). RoPE has no table, so longer streams still work; used for
    validation (window, segment) and as the default length of FLOP counting."""
    window: int | None = 2048
    """Sliding-window size of the attention in MAG, MAL and (optionally) Transformer++: a query sees itself and
    the `window - 1` tokens before it. null: full causal attention (Transformer++ only)."""
    n_persistent: int = 128
    """Persistent memory: learned, input-independent tokens per attention layer, projected by its key/value maps
    and always visible to every query (paper 128). Their keys get no RoPE (position-free, like attention sinks)."""
    segment_len: int = 512
    """MAC: attention segment length C (paper 512). The memory is updated once per segment."""
    mac_memory_tokens: int = 256
    """MAC: memory tokens per full segment; must divide `segment_len`. The retrieved h of the segment's tokens is
    pooled in groups of `segment_len // mac_memory_tokens` consecutive tokens; token i sees the memory token of
    group m only when the whole group is at or before i (no future leaks)."""
    mac_memory_pool: str = "mean"
    """MAC: how a group of retrieved h forms one memory token: mean (average) or last (the group's last token)."""
    mac_output_norm: bool = True
    """MAC: combine as MAG does, out = norm_a(y) * g(norm_m(o)) (each an RMSNorm with a learned vector scale);
    false: the paper's bare product out = y * g(o), which trained 0.24 bits/byte worse at the mini scale (seed 0)
    (recipes/README.md, "MAC's output")."""
    gate: str = "sigmoid"
    """Non-linearity of the memory gate: MAC's o = norm(y) * g(norm(M(y))) (y * g(M(y)) without
    `mac_output_norm`) and MAG's o = norm(attn) * g(norm(memory))."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the output head (Llama: no)."""
    init_std: float | None = 0.02
    """Std of the normal init of linear layers and embeddings; null: each linear map 1/sqrt(fan_in) and embeddings
    1. Either way the output projections of residual branches (attention, MLP, memory) get that std divided by
    sqrt(2 * n_layers). The memory's fast-weight init, conv and rate maps are set by `model.memory`."""
    attention_backend: str = "auto"
    """auto (flex attention on CUDA for masked attention of >= 128 queries, SDPA otherwise), sdpa, or flex (CUDA
    only; SDPA elsewhere). Both evaluate the same mask functions, so results agree to float tolerance."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The neural memory (ignored by transformer)."""

    def __post_init__(self):
        if isinstance(self.memory, dict):
            self.memory = section_from_dict(MemoryConfig, self.memory, "model.memory")
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant={self.variant!r} is not a known variant; choose one of {', '.join(VARIANTS)}")
        for key in ("vocab_size", "dim", "n_layers", "heads", "max_seq_len"):
            _require_positive(self, key, "model")
        if self.dim % self.heads:
            raise ValueError(f"model.heads={self.heads} does not divide model.dim={self.dim}")
        if self.head_dim() % 2:
            raise ValueError(f"model.dim / model.heads = {self.head_dim()} must be even (RoPE rotates pairs)")
        if self.mlp_hidden is not None:
            _require_positive(self, "mlp_hidden", "model")
        if self.n_persistent < 0:
            raise ValueError(f"model.n_persistent={self.n_persistent} must be >= 0")
        if self.gate not in GATES:
            raise ValueError(f"model.gate={self.gate!r} is not one of {', '.join(GATES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend={self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if self.variant in ("mag", "mal") or (self.variant == "transformer" and self.window is not None):
            if self.window is None:
                raise ValueError(f"model.window must be set for variant {self.variant} (sliding-window attention)")
            _require_positive(self, "window", "model")
            if self.window > self.max_seq_len:
                raise ValueError(
                    f"model.window={self.window} is larger than model.max_seq_len={self.max_seq_len}: the sliding "
                    f"window would cover the whole training sequence (use window <= max_seq_len, or null for full "
                    f"attention with variant transformer)")
        if self.variant == "mac":
            _require_positive(self, "segment_len", "model")
            if self.segment_len > self.max_seq_len:
                raise ValueError(f"model.segment_len={self.segment_len} is larger than model.max_seq_len={self.max_seq_len}")
            if self.mac_memory_tokens < 1 or self.segment_len % self.mac_memory_tokens:
                raise ValueError(
                    f"model.mac_memory_tokens={self.mac_memory_tokens} must be >= 1 and divide "
                    f"model.segment_len={self.segment_len}")
            if self.mac_memory_pool not in MAC_POOLS:
                raise ValueError(f"model.mac_memory_pool={self.mac_memory_pool!r} is not one of {', '.join(MAC_POOLS)}")
        if self.variant != "transformer":
            heads = self.memory_heads()
            if self.dim % heads:
                raise ValueError(f"model.memory.heads={heads} does not divide model.dim={self.dim}")

    def head_dim(self) -> int:
        return self.dim // self.heads

    def mlp_hidden_size(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-(8 * self.dim // 3) // 64) * 64

    def memory_heads(self) -> int:
        return self.memory.heads if self.memory.heads is not None else self.heads

    def mac_stride(self) -> int:
        """MAC: segment tokens per memory token."""
        return self.segment_len // self.mac_memory_tokens


from titans_train.data.config import DataConfig  # noqa: E402  (plain dataclasses, no heavy imports)
from titans_train.eval.config import EvalConfig  # noqa: E402
from titans_train.train.config import (  # noqa: E402
    CheckpointConfig, LaunchConfig, LoggingConfig, OptimConfig, TrainConfig, TrainerConfig,
)

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "logging": LoggingConfig,
    "checkpoint": CheckpointConfig,
    "launch": LaunchConfig,
    "eval": EvalConfig,
}
"""Top-level recipe sections, each with its schema."""


@dataclass
class Recipe:
    """A whole validated recipe: one typed section each; derived paths and numbers are methods."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    trainer: TrainerConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    launch: LaunchConfig
    eval: EvalConfig

    def out_dir(self) -> str:
        return self.logging.out_dir or f"runs/{self.logging.run_name}"

    def ckpt_dir(self) -> str:
        return self.checkpoint.dir or f"{self.out_dir()}/checkpoints"

    def decay_steps(self) -> int:
        return self.optim.decay_steps or self.trainer.max_steps


# --- building dataclasses from mappings, with errors that name the key -------------------------------------------


def section_from_dict(cls: type, data: Any, prefix: str):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ValueError naming `prefix.key`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{prefix} must be a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}.{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ValueError(f"unknown key {prefix}.{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return section_from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r} must be a list")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ValueError(f"{key}={value!r} must be of type {tp.__name__}, got {type(value).__name__}")


def _require_positive(obj: Any, key: str, prefix: str) -> None:
    value = getattr(obj, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{prefix}.{key}={value!r} must be a positive integer")


# --- loading ---------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> dict:
    """Load a recipe: compose its `defaults:`, apply `key=value` overrides, resolve `${...}`; a plain dict."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {path} does not exist")
    cfg = _compose(path, ())
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"override {bad[0]!r} is not of the form key=value")
    try:
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ValueError(f"recipe {path}: {e}") from None


def _compose(path: Path, seen: tuple[Path, ...]):
    from omegaconf import OmegaConf

    path = path.resolve()
    if path in seen:
        raise ValueError(f"recipe {path}: `defaults` form a cycle")
    cfg = OmegaConf.load(path)
    defaults = cfg.pop("defaults", None) or []
    if not isinstance(defaults, typing.Sequence) and not OmegaConf.is_list(defaults):
        raise ValueError(f"recipe {path}: `defaults` must be a list of YAML files")
    parts = []
    for name in defaults:
        base = path.parent / str(name)
        if not base.is_file():
            raise ValueError(f"recipe {path}: default {name!r} not found (looked at {base})")
        parts.append(_compose(base, seen + (path,)))
    return OmegaConf.merge(*parts, cfg) if parts else cfg


def model_config(recipe: dict) -> ModelConfig:
    """The validated `model:` section of a loaded recipe (other sections are not looked at)."""
    if "model" not in recipe:
        raise ValueError("the recipe has no `model:` section")
    return section_from_dict(ModelConfig, recipe["model"], "model")


def recipe_config(recipe: dict) -> Recipe:
    """Every section of a loaded recipe, validated: unknown sections/keys and wrong types name the key."""
    for key in recipe:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; valid sections: {', '.join(SECTIONS)}"
            raise ValueError(f"unknown recipe section {key}{hint}")
    model = model_config(recipe)
    r = Recipe(model=model, **{k: section_from_dict(cls, recipe.get(k), k) for k, cls in SECTIONS.items() if k != "model"})
    if r.data.chunk_len > model.max_seq_len:
        raise ValueError(f"data.chunk_len={r.data.chunk_len} is larger than model.max_seq_len={model.max_seq_len}")
    if model.variant == "mac" and r.data.chunk_len % model.segment_len:
        raise ValueError(f"data.chunk_len={r.data.chunk_len} must be a multiple of model.segment_len="
                         f"{model.segment_len} for MAC (its memory state is exact at segment boundaries)")
    return r


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> tuple[Recipe, dict]:
    """Load and validate a recipe file: (Recipe, the resolved plain dict that is saved with checkpoints)."""
    raw = load_recipe(path, overrides)
    return recipe_config(raw), raw
