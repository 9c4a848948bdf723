"""The language model shared by the five variants: embedding -> blocks -> RMSNorm -> output head.

    model = build_model(ModelConfig(variant="mag", ...))
    logits, state = model(tokens)                  # tokens (B, T) -> logits (B, T, vocab)
    logits, state = model(more_tokens, state)      # continues the stream: same as one call over both
    tokens = model.generate(prompt, max_new_tokens=50, temperature=0.8, top_k=40)

The state (`State`) holds each block's memory fast weights and momentum, attention cache and position; feeding
a sequence in pieces with the state carried equals one call (MAC included, at any split). Generation feeds one
token at a time through the same path, so its cost per token is bounded by the sliding window / segment (for
full-attention Transformer++ the key/value cache grows with the context, as it must).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_train.config import ModelConfig
from titans_train.layers.attention import Attention
from titans_train.layers.mlp import SwiGLU
from titans_train.layers.norm import RMSNorm
from titans_train.layers.state import StateMixin
from titans_train.models.blocks import BLOCKS


@dataclass
class State(StateMixin):
    """A model's streaming state: one entry per block (its type depends on the variant: `KVCache` for
    Transformer++, `MemoryState` for LMM, `HybridState` for MAG/MAL, `MACLayerState` for MAC) and the number of
    tokens seen (`pos`, the position of the next token)."""

    layers: list
    pos: int = 0
    _model: Any = field(default=None, repr=False, compare=False)  # weakref to the model, for `reset`

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out.pop("_model", None)
        return out

    def reset(self, rows: Tensor) -> "State":
        """The state with the memory of the rows in the boolean mask `rows` (B,) back to its initial value (at a
        document start). Attention caches are kept: a window that spans a document boundary attends across it,
        as in packed training without document masks."""
        model = self._model() if self._model is not None else None
        if model is None:
            raise RuntimeError("State.reset needs the model that made the state, and it is gone")
        return model.reset_rows(self, rows)


class TitansLM(nn.Module):
    """Token embedding, `n_layers` blocks of the configured variant, final RMSNorm, linear output head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList([BLOCKS[cfg.variant](cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    # --- parameters ---------------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Normal init of embeddings and linear maps (std `init_std`, or 1/sqrt(fan_in) with embeddings at 1 when it
        is null); the output projections of residual branches (attention `wo`, SwiGLU `w2`, the memory's `out_proj`)
        get that std / sqrt(2 n_layers) (GPT-2). The memory's fast-weight init, conv and rate maps keep their own."""
        from titans_train.layers.neural_memory import NeuralMemory

        depth_scale = 1 / math.sqrt(2 * self.cfg.n_layers)

        def std_of(linear: nn.Linear) -> float:
            return self.cfg.init_std if self.cfg.init_std is not None else linear.in_features ** -0.5

        def init(linear: nn.Linear, output: bool = False) -> None:
            nn.init.normal_(linear.weight, std=std_of(linear) * (depth_scale if output else 1.0))

        nn.init.normal_(self.embed.weight, std=self.cfg.init_std if self.cfg.init_std is not None else 1.0)
        if not self.cfg.tie_embeddings:
            init(self.head)
        for module in self.modules():
            if isinstance(module, Attention):
                init(module.wqkv)
                init(module.wo, output=True)
                if module.persistent is not None:
                    nn.init.normal_(module.persistent, std=std_of(module.wqkv))
            elif isinstance(module, SwiGLU):
                init(module.w13)
                init(module.w2, output=True)
            elif isinstance(module, NeuralMemory):
                init(module.qkv)
                init(module.gate)
                init(module.out_proj, output=True)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def count_params(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor once; `non_embedding` leaves out the token embedding table (the output
        head stays in unless it is tied to the embedding)."""
        from titans_train.models.counting import count_params

        return count_params(self, non_embedding)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at sequence length `seq_len` (default max_seq_len).
        See `titans_train.models.counting` for the formula."""
        from titans_train.models.counting import flops_per_token

        return flops_per_token(self, seq_len)

    # --- streaming ----------------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """A fresh state for `batch_size` streams (memory at its learned initial weights, empty caches)."""
        ref = self.embed.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        layers = [block.init_state(batch_size, device, dtype) for block in self.blocks]
        return State(layers, 0, weakref.ref(self))

    def reset_rows(self, state: State, rows: Tensor) -> State:
        """`state` with the memory of the rows in `rows` (B,) reset to a fresh one (see `State.reset`)."""
        layers = [_reset_memory(block, cur, rows) for block, cur in zip(self.blocks, state.layers)]
        return State(layers, state.pos, state._model)

    def forward(self, tokens: Tensor, state: State | None = None,
                reset: Tensor | None = None) -> tuple[Tensor, State]:
        """tokens (B, T) int -> logits (B, T, vocab), the state after the last token.

        reset: (B, T) bool, True at the first token of each document packed into a row: every memory restarts
        there from its initial state, exactly as if the document ran alone (LMM, MAG, MAL; MAC too when the
        document starts at a segment boundary). Attention is not reset (see `State.reset`).
        """
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B)
        if reset is not None and reset.shape != (B, T):
            raise ValueError(f"reset.shape={tuple(reset.shape)} must equal tokens.shape={(B, T)}")
        if reset is not None and not bool(reset.any()):
            reset = None  # one check here rather than one per layer
        x = self.embed(tokens)  # (B, T, dim)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block(x, layer_state, state.pos, reset)
            layers.append(layer_state)
        logits = self.head(self.norm(x))  # (B, T, vocab)
        return logits, State(layers, state.pos + T, weakref.ref(self))

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 *, state: State | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Continue `prompt` (B, T) by `max_new_tokens` tokens sampled one at a time through the streaming state.

        temperature 0 means greedy; `top_k` keeps the k most likely tokens. Returns the tokens (B, T + new), and
        with `return_logits` also the logits each new token was drawn from (B, new, vocab).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        logits, state = self(prompt, state)
        last = logits[:, -1]
        out, seen = [prompt], []
        for i in range(max_new_tokens):
            seen.append(last)
            nxt = sample(last, temperature, top_k, generator)  # (B, 1)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, state = self(nxt, state)
                last = logits[:, -1]
        tokens = torch.cat(out, dim=1)
        return (tokens, torch.stack(seen, dim=1)) if return_logits else tokens


def _reset_memory(block: nn.Module, cur: Any, rows: Tensor) -> Any:
    """Reset the memory parts of one block's state (`NeuralMemory.reset_state`); attention caches and MAC's
    segment caches are kept."""
    from titans_train.layers.neural_memory import MemoryState

    if isinstance(cur, MemoryState):
        return block.memory.reset_state(cur, rows)
    if hasattr(cur, "retrieval"):  # MACLayerState
        return dataclasses.replace(cur, retrieval=block.memory.reset_state(cur.retrieval, rows),
                                   memory=block.memory.reset_state(cur.memory, rows))
    if hasattr(cur, "memory"):  # HybridState
        return dataclasses.replace(cur, memory=block.memory.reset_state(cur.memory, rows))
    return cur  # KVCache


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from logits (B, vocab) -> (B, 1). temperature 0: argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def build_model(cfg: ModelConfig | dict) -> TitansLM:
    """The network of `cfg.variant` (one of `titans_train.config.VARIANTS`). Accepts a ModelConfig or the
    `model:` mapping of a recipe. Build under `torch.device("meta")` to count without allocating."""
    if isinstance(cfg, dict):
        from titans_train.config import section_from_dict

        cfg = section_from_dict(ModelConfig, cfg, "model")
    if cfg.variant not in BLOCKS:
        raise ValueError(f"model.variant={cfg.variant!r} is not a known variant; choose one of {', '.join(BLOCKS)}")
    return TitansLM(cfg)


__all__ = ["State", "TitansLM", "build_model", "sample"]
