"""The residual blocks of the five networks (TITANS.md section 3), each `forward(x, state, pos) -> (x, state)`.

Every block is pre-norm (RMSNorm) with a token mixer and a SwiGLU MLP; they differ in the mixer:

    TransformerBlock  attention (full causal, or sliding window)                 state: KVCache
    LMMBlock          neural memory alone                                        state: MemoryState
    MAGBlock          sliding-window attention || memory, combined by a gate     state: HybridState
    MALBlock          memory, then sliding-window attention                      state: HybridState
    MACBlock          per segment: retrieve -> attend [P || mem || seg] -> update memory with y -> gate
                                                                                 state: MACLayerState

`x` is (B, T, dim) at stream positions pos..pos+T-1; `state` is what the block carries from earlier tokens
(never None here: the model makes a fresh one); `reset` (B, T) bool or None marks document starts, where the
memory restarts from its initial state (attention is not reset: packed training without document masks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_train.config import ModelConfig
from titans_train.layers.attention import Attention
from titans_train.layers.mlp import SwiGLU
from titans_train.layers.neural_memory import MemoryState, NeuralMemory
from titans_train.layers.norm import RMSNorm
from titans_train.layers.state import KVCache, StateMixin
from titans_train.ops.attention_masks import mac_mod

GATES = {"sigmoid": torch.sigmoid, "silu": F.silu}


def make_memory(cfg: ModelConfig) -> NeuralMemory:
    """The block's NeuralMemory: `model.memory`'s fields are its keyword arguments (heads resolved by the model)."""
    kwargs = {f.name: getattr(cfg.memory, f.name) for f in dataclasses.fields(cfg.memory) if f.name != "heads"}
    return NeuralMemory(cfg.dim, cfg.memory_heads(), **kwargs)


def make_attention(cfg: ModelConfig, window: int | None) -> Attention:
    return Attention(cfg.dim, cfg.heads, window=window, n_persistent=cfg.n_persistent, rope_theta=cfg.rope_theta,
                     backend=cfg.attention_backend)


@dataclass
class HybridState(StateMixin):
    """MAG / MAL: the memory's state and the sliding-window attention cache of one block."""

    memory: MemoryState
    attn: KVCache


@dataclass
class MACLayerState(StateMixin):
    """MAC: what one block carries into the rest of the current segment and beyond.

    `retrieval`: the memory as it was before the current segment (memory tokens are read from it), its query conv
    tail advanced over the segment's inputs so far. `memory`: the memory after the attention outputs of the
    segment's tokens so far (the update stream). For the n < segment_len tokens of the current segment:
    `h_pending` (B, n % stride, dim) the retrieved values of the incomplete memory-token group, `k_mem`, `v_mem`
    (B, H, n // stride, D) the keys/values of its complete memory tokens, `k_seg`, `v_seg` (B, H, n, D) those of
    its tokens. At a segment boundary all of these are empty.
    """

    retrieval: MemoryState
    memory: MemoryState
    h_pending: Tensor
    k_mem: Tensor
    v_mem: Tensor
    k_seg: Tensor
    v_seg: Tensor


class TransformerBlock(nn.Module):
    """Transformer++ (Llama-style): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(cfg, cfg.window)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden_size())

    def init_state(self, batch: int, device=None, dtype=None) -> KVCache:
        return self.attn.init_cache(batch, device, dtype)

    def forward(self, x: Tensor, state: KVCache, pos: int, reset: Tensor | None = None) -> tuple[Tensor, KVCache]:
        a, state = self.attn(self.attn_norm(x), state, pos)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), state


class LMMBlock(nn.Module):
    """LMM: the neural memory is the token mixer: x + memory(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.memory_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.memory = make_memory(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden_size())

    def init_state(self, batch: int, device=None, dtype=None) -> MemoryState:
        return self.memory.init_state(batch, device, dtype)

    def forward(self, x: Tensor, state: MemoryState, pos: int,
                reset: Tensor | None = None) -> tuple[Tensor, MemoryState]:
        m, state = self.memory(self.memory_norm(x), state, reset)
        x = x + m
        return x + self.mlp(self.mlp_norm(x)), state


class MAGBlock(nn.Module):
    """MAG: sliding-window attention (persistent prefix visible) and the memory read the same normalised input;
    o = norm_a(attn) * gate(norm_m(memory)), each norm an RMSNorm with a learned vector scale, `gate` the
    configured non-linearity (sigmoid by default); then x + o and the MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(cfg, cfg.window)
        self.memory = make_memory(cfg)
        self.attn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.memory_out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate = GATES[cfg.gate]
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden_size())

    def init_state(self, batch: int, device=None, dtype=None) -> HybridState:
        return HybridState(self.memory.init_state(batch, device, dtype), self.attn.init_cache(batch, device, dtype))

    def forward(self, x: Tensor, state: HybridState, pos: int,
                reset: Tensor | None = None) -> tuple[Tensor, HybridState]:
        h = self.mixer_norm(x)
        a, kv = self.attn(h, state.attn, pos)
        m, mem = self.memory(h, state.memory, reset)
        x = x + self.attn_out_norm(a) * self.gate(self.memory_out_norm(m))
        return x + self.mlp(self.mlp_norm(x)), HybridState(mem, kv)


class MALBlock(nn.Module):
    """MAL: x + memory(norm(x)), then x + swa(norm(x)) (persistent prefix visible), then the MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.memory_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.memory = make_memory(cfg)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(cfg, cfg.window)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden_size())

    def init_state(self, batch: int, device=None, dtype=None) -> HybridState:
        return HybridState(self.memory.init_state(batch, device, dtype), self.attn.init_cache(batch, device, dtype))

    def forward(self, x: Tensor, state: HybridState, pos: int,
                reset: Tensor | None = None) -> tuple[Tensor, HybridState]:
        m, mem = self.memory(self.memory_norm(x), state.memory, reset)
        x = x + m
        a, kv = self.attn(self.attn_norm(x), state.attn, pos)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), HybridState(mem, kv)


class MACBlock(nn.Module):
    """MAC (memory as context), per segment s of `segment_len` tokens (TITANS.md section 3):

        h = M*_{s-1}(x)                         retrieval with the memory from before the segment (no update)
        c = pool(h)                             `mac_memory_tokens` memory tokens (mean or last of each group)
        y = attn([P || c || x])                 causal; token i sees a memory token only once its group <= i
        o, M_s = M_{s-1}(norm(y))               update the memory with y (RMS-normalised, as every block's
                                                memory input); o_t read with the weights after t
        out = norm_a(y) * gate(norm_m(o))       as in MAG (`mac_output_norm`, default); false: the paper's
                                                y * gate(o), whose small y trained slowly. Sigmoid gate by default

    then x + out and the MLP. `norm(y)` matters: y is the attention output on the residual stream's scale (|y|
    40-730 per token measured in a tiny MAC at step 200 where a normalised input has 16), and the memory's rate
    maps are linear in their input, so without it they saturated (eta = 1.0000, theta at max_lr, alpha 1.0 for
    most tokens: momentum that never decays and memories wiped every token) and gradient norms reached 1e4.
    Memory tokens sit at the RoPE position of their group's last token; persistent tokens have none. A stream may
    stop anywhere inside a segment: the state keeps the keys/values of the segment so far, so decoding one token
    costs one token's projections plus attention over at most n_persistent + mac_memory_tokens + segment_len keys.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.segment_len, self.stride, self.pool = cfg.segment_len, cfg.mac_stride(), cfg.mac_memory_pool
        self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(cfg, None)
        self.memory = make_memory(cfg)
        self.memory_norm = RMSNorm(cfg.dim, cfg.norm_eps)  # on y, the memory's update input
        self.gate = GATES[cfg.gate]
        if cfg.mac_output_norm:
            self.attn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.memory_out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        else:
            self.attn_out_norm = self.memory_out_norm = nn.Identity()
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden_size())

    def init_state(self, batch: int, device=None, dtype=None) -> MACLayerState:
        mem = self.memory.init_state(batch, device, dtype)
        kv = self.attn.init_cache(batch, device, dtype)
        h = torch.zeros(batch, 0, self.attn.dim, device=device, dtype=dtype)
        return MACLayerState(mem, mem, h, kv.k, kv.v, kv.k.clone(), kv.v.clone())

    def forward(self, x: Tensor, state: MACLayerState, pos: int,
                reset: Tensor | None = None) -> tuple[Tensor, MACLayerState]:
        h = self.mixer_norm(x)
        outs, start = [], 0
        while start < h.shape[1]:  # cut at segment boundaries of the stream
            room = self.segment_len - state.k_seg.shape[2]
            piece = h[:, start:start + room]
            piece_reset = reset[:, start:start + room] if reset is not None else None
            o, state = self._segment(piece, state, pos + start, piece_reset)
            outs.append(o)
            start += piece.shape[1]
        x = x + (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
        return x + self.mlp(self.mlp_norm(x)), state

    def _pool(self, h: Tensor) -> Tensor:
        """(B, m * stride, dim) retrieved values -> (B, m, dim) memory tokens, one per group of `stride`."""
        B, n, dim = h.shape
        groups = h.reshape(B, n // self.stride, self.stride, dim)
        return groups.mean(dim=2) if self.pool == "mean" else groups[:, :, -1]

    def _segment(self, x: Tensor, st: MACLayerState, pos: int,
                 reset: Tensor | None = None) -> tuple[Tensor, MACLayerState]:
        """x (B, t, dim): the next tokens of the current segment (at most what is left of it), at pos..pos+t-1.

        At a document start (`reset`) both memories restart: the segment's tokens from there on retrieve from the
        initial memory, and the update stream restarts at that token. The segment's attention still spans it."""
        B, t, _ = x.shape
        n_old = st.k_seg.shape[2]
        seg_start = pos - n_old
        # Memory tokens: the segment's own tokens read the memory from before the segment.
        h_new, retrieval = self.memory.retrieve(x, st.retrieval, reset)  # (B, t, dim)
        h = torch.cat([st.h_pending, h_new], dim=1) if st.h_pending.shape[1] else h_new
        complete = h.shape[1] // self.stride * self.stride
        m_old, m_new = st.k_mem.shape[2], complete // self.stride
        mem_pos = seg_start + (torch.arange(m_old, m_old + m_new, device=x.device) + 1) * self.stride - 1
        k_m, v_m = self.attn.kv(self._pool(h[:, :complete]), mem_pos)  # (B, H, m_new, D)
        k_mem, v_mem = torch.cat([st.k_mem, k_m], dim=2), torch.cat([st.v_mem, v_m], dim=2)
        q, k, v = self.attn.qkv(x, torch.arange(pos, pos + t, device=x.device))  # (B, H, t, D)
        k_seg, v_seg = torch.cat([st.k_seg, k], dim=2), torch.cat([st.v_seg, v], dim=2)
        keys, values = [k_mem, k_seg], [v_mem, v_seg]
        prefix = self.attn.persistent_kv(B)
        if prefix is not None:
            keys.insert(0, prefix[0])
            values.insert(0, prefix[1])
        n_prefix, n_mem = self.attn.n_persistent, k_mem.shape[2]
        mod = mac_mod(n_prefix=n_prefix, n_mem=n_mem, stride=self.stride, q_start=n_old)
        y = self.attn.attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), mod,
                             mask_key=("mac", n_prefix, n_mem, self.stride, n_old))  # (B, t, dim)
        o, memory = self.memory(self.memory_norm(y), st.memory, reset)  # o_t uses the weights after token t
        out = self.attn_out_norm(y) * self.gate(self.memory_out_norm(o))
        if n_old + t < self.segment_len:
            return out, MACLayerState(retrieval, memory, h[:, complete:], k_mem, v_mem, k_seg, v_seg)
        # Segment complete: the updated memory is what the next segment reads, with the query stream's conv tail.
        after = dataclasses.replace(memory, query_tail=retrieval.query_tail)
        empty = k_seg[:, :, :0]
        return out, MACLayerState(after, after, h[:, :0], empty, empty, empty, empty)


BLOCKS: dict[str, type[nn.Module]] = {
    "transformer": TransformerBlock,
    "lmm": LMMBlock,
    "mag": MAGBlock,
    "mal": MALBlock,
    "mac": MACBlock,
}
