"""NeuralMemory: the Titans long-term memory as a sequence layer with a streaming state.

x -> q, k, v (linear, causal depthwise conv k=4, SiLU; q and k L2-normalised per head) and per-token, per-head
rates theta (inner lr, scaled by `max_lr`), eta (momentum decay), alpha (forgetting; optionally one per channel of
the head, `channel_alpha`), all sigmoid of linear maps of x. The memory op (`titans_train.ops.memory_update`)
writes k -> v into per-head fast weights and reads q back; the read-out goes through a per-head RMS norm, a SiLU
gate from x, and the output projection. The gate forgets towards the learned W_0 (`forget_target="initial"`), not
towards zero as in the paper, where a long stream leaves a bias-free memory MLP empty for good.

Scale of the inner step (why `inner_step`, `init_scale` and `value_norm` exist). The inner update is gradient
descent on ||M(k) - v||^2, unrolled through every memory chunk of the sequence, and the outer gradient flows back
through all of it. It is stable only while each chunk's step stays below the inner loss's curvature limit
(theta * lambda_max < 2 per step). Layer l's gradient is a_l^T delta_l, so its curvature grows with |a_l|^2, the
squared norm of that layer's input: 1 for the first layer (L2-normalised keys) but expansion * D * E[gelu(z)^2]
(~109 at D = 64) for the second. With theta ~ 0.05 that is a step ~10x past the limit on the second layer, and the
plain 1/sqrt(fan_in) init made it worse: with unit-norm keys it leaves f(k) at std ~0.06, and the LayerNorm of
M(k) = k + LN(f(k)) then multiplies every inner gradient by 1/std(f) ~ 16. The forward hides it (LN rescales
whatever the diverging fast weights produce), the backward does not: measured on real text at dim 256, 4 blocks,
the step-1 gradient norm of LMM / MAL was 2-3e7 and MAG's 2e5 against Transformer++'s 18, and the output's
sensitivity to the written values through the unrolled updates |d<y, r>/dv| was 1.2e6 (init fix alone: 1e4).
The defaults fix it at the cause: `inner_step="normalized"` divides layer l's theta by its input's expected
squared norm at init (normalised LMS: 1 for the first layer, expansion * D * E[gelu^2] for later ones), so
theta's sigmoid range [0, max_lr] means the same bounded step on every layer; `init_scale="input_norm"` scales W_0
so that pre-activations have std init_std given unit-norm keys (f(k) at std ~1, LN's Jacobian ~1); `value_norm`
puts the targets v on the scale of M(k) (unit RMS; LN's output cannot shrink to meet small v). With them the
step-1 norms are LMM 7, MAG 19 (Transformer++ 18), |d<y, r>/dv| ~1.5, and the memory still learns each chunk: the
inner loss on a chunk drops 67% after its update (plain: 38%). `recipes/README.md` has the measurements.

Why `ln_eps` is not 1e-5 (the late spikes). LN makes M(k) = k + LN(f(k)) invariant to the scale of f, so nothing in
the forward stops the fast weights from shrinking inside a sequence: the forgetting gate decays them every token
and the outer loop learns larger alpha on some tokens. The inner loss's curvature grows as 1 / std(f)^2 while they
do, so the same theta becomes a step far past the stability limit (weight decay plus a scale-invariant norm: the
effective step grows as 1 / |W|^2). Measured in the mini LMM at its first spike (step 113 of 500, block 0): the
fast weights of one head shrank 40x over a 512-token window (|W1| 128 -> 3), a chunk's theta-weighted curvature
reached 113 (stable below 1), and the gradient norm was 124, with spikes of 1e4 - 1e8 over the next 400 steps. At
the same trained weights and batch, ln_eps = 0.01 / 0.1 / 1 gives gradient norms 1.16 / 1.16 / 1.0 at equal loss
(2.474 -> 2.476 / 2.480 / 2.473): LN's Jacobian is at most 1 / sqrt(ln_eps), so a shrunk memory reads and writes
more weakly instead of amplifying. `ln_eps` is on f's scale (std ~init_std = 1 at init, where 0.1 changes LN's
output by 5%). Trained with 0.1, that LMM stays within 7.4x of Transformer++'s gradient norm over 500 steps.

Streaming: the state keeps the fast weights at the last memory-chunk boundary (the anchor of the current chunk)
and the inputs of the tokens seen since then (fewer than `chunk_size`). The next call replays those tokens from
the anchor, so feeding a sequence in pieces of any sizes gives exactly what one call gives, and the cost per
call stays bounded by the chunk size (token-by-token decoding costs O(chunk_size) per token, not O(context)).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import memory_apply, memory_update
from ..ops.fused import causal_conv_silu, gated_head_norm, head_norms
from .state import StateMixin


@dataclass
class MemoryState(StateMixin):
    """Streaming state of one NeuralMemory layer (batch size B, H heads, head dim D).

    weights, momentum: fast weights and momentum at the last memory-chunk boundary, L tensors (B, H, in, out).
    pending: inputs of the tokens seen since that boundary (n < chunk_size of them): k, v (B, H, n, D),
        theta (B, H, n, L), eta (B, H, n) and alpha (B, H, n), or (B, H, n, D) with `channel_alpha`.
    conv_tail: the last (kernel - 1) q/k/v projections before the causal conv, (B, kernel - 1, 3 * H * D),
        for the update stream; query_tail the same for `retrieve`'s read-only stream (q projections only).
        Projections from before a row's document start are zeros (the conv sees zeros before a document).
    pending_len: None when every row's n pending tokens are its own; after a document start inside a call each
        row's memory chunk started elsewhere, and row b's pending tokens are the last pending_len[b] of the n.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    pending: tuple[Tensor, ...]
    conv_tail: Tensor
    query_tail: Tensor
    pending_len: tuple[int, ...] | None = None

    @property
    def tokens_in_chunk(self) -> int:
        """Tokens seen since the last memory-chunk boundary."""
        return self.pending[0].shape[2]


INIT_SCALES = ("input_norm", "fan_in")
INNER_STEPS = ("normalized", "plain")
MOMENTUM_FORMS = ("plain", "ema")
FORGET_TARGETS = ("zero", "initial")
GELU_SQ = 0.4252  # E[gelu(z)^2] for z ~ N(0, 1) (quadrature)


def _input_norms2(dims: list[int], init_scale: str) -> list[float]:
    """Expected squared norm of each memory layer's input at init, for W_0's scale and the normalised step.

    The first layer reads L2-normalised keys/queries (norm 1). With `input_norm` each W_0 layer is scaled so its
    pre-activations have std init_std, so a later layer's input gelu(z) has E|a|^2 = fan_in * E[gelu(z)^2]
    (z ~ N(0, init_std^2); GELU_SQ at init_std 1). `fan_in` is the plain 1/sqrt(fan_in) rule, which assumes
    unit-variance inputs: with unit-norm keys it leaves the pre-activations at std init_std / sqrt(D).
    """
    if init_scale == "fan_in":
        return [float(d) for d in dims[:-1]]
    return [1.0] + [d * GELU_SQ for d in dims[1:-1]]


def _uniform(pending_len: tuple[int, ...], n: int) -> tuple[int, ...] | None:
    """`MemoryState.pending_len`: None when every row holds all n pending tokens."""
    return None if all(m == n for m in pending_len) else tuple(pending_len)


class NeuralMemory(nn.Module):
    """Multi-head Titans neural long-term memory.

    Args:
        dim: model width (input and output).
        heads: memory heads; each has its own fast weights.
        head_dim: per-head width D (default dim // heads).
        depth: layers L of the memory MLP (D -> expansion*D -> ... -> D); 1 is the linear memory.
        expansion: hidden width factor of the memory MLP.
        chunk_size: memory chunk (tokens sharing one anchor for the inner gradient); paper default 16.
        max_lr: theta = max_lr * sigmoid(.); the inner learning rate's ceiling.
        per_layer_theta: a separate theta per memory layer (NeurIPS version) instead of one per head.
        channel_alpha: a forgetting gate per channel of the head (D of them per head and token) instead of one:
            row r of the first memory layer's weights (key/query feature r) decays with alpha[r], the later layers
            with the channel mean (see `memory_update`). Same bias init for every channel.
        residual, layer_norm: M(x) = x + LN(f(x)); each part can be switched off.
        ln_eps: the LayerNorm's epsilon (on f's scale, ~init_std at init): LN's Jacobian is at most 1 / sqrt(ln_eps).
        conv_kernel: causal depthwise conv over q/k/v (0 or 1 disables it).
        init_std, init_scale: W_0 is normal with std init_std / sqrt(n), n the expected squared norm of the layer's
            input at init: `input_norm` (default) 1 for the first layer (unit-norm keys), fan_in * E[gelu(z)^2]
            for later ones; `fan_in` n = fan_in (assumes unit-variance inputs; f(k) then starts near zero).
        value_norm: RMS-normalise v per head (default on), the scale of M(k)'s LayerNorm output.
        inner_step: `normalized` (default) divides each memory layer's theta by the expected squared norm of its
            input (see above); `plain` passes theta as is.
        momentum_form: `ema` (default: theta_t scaled by 1 - eta_t, so the momentum averages the gradients instead
            of summing ~1 / (1 - eta_t) of them) or `plain` (the paper's S_t = eta_t S_(t-1) - theta_t grad_t).
        theta_bias, eta_bias, alpha_bias: initial biases of the rate maps (sigmoid space); defaults give
            theta = max_lr * 0.5, eta ~ 0.88, alpha ~ 0.0025 (forgetting over ~400 tokens) at init.
        forget_target: what the forgetting gate decays the fast weights towards: "initial" (default: the learned
            W_0; see `memory_update`'s `forget_to`) or "zero" (the paper). Zero is a fixed point of a bias-free
            memory MLP's inner gradient descent: forgotten that far, the memory cannot learn again, and a long
            stream gets there (recipes/README.md, "Long streams").
        compile: run the op's per-chunk step through torch.compile (faster; compiles once per process/shape).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        depth: int = 2,
        expansion: int = 4,
        chunk_size: int = 16,
        max_lr: float = 0.1,
        per_layer_theta: bool = False,
        channel_alpha: bool = False,
        residual: bool = True,
        layer_norm: bool = True,
        ln_eps: float = 0.1,
        conv_kernel: int = 4,
        init_std: float = 1.0,
        init_scale: str = "input_norm",
        value_norm: bool = True,
        inner_step: str = "normalized",
        momentum_form: str = "ema",
        theta_bias: float = 0.0,
        eta_bias: float = 2.0,
        alpha_bias: float = -6.0,
        forget_target: str = "initial",
        compile: bool = False,
    ):
        super().__init__()
        head_dim = head_dim or dim // heads
        if head_dim * heads == 0:
            raise ValueError(f"heads={heads} and head_dim={head_dim} must be positive")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dim, self.heads, self.head_dim, self.depth = dim, heads, head_dim, depth
        self.chunk_size, self.max_lr = chunk_size, max_lr
        self.residual, self.layer_norm, self.compile = residual, layer_norm, compile
        if ln_eps <= 0:
            raise ValueError(f"ln_eps must be positive, got {ln_eps}")
        self.ln_eps = ln_eps
        self.n_theta = depth if per_layer_theta else 1
        self.channel_alpha = channel_alpha
        self.n_alpha = head_dim if channel_alpha else 1
        self.conv_kernel = max(conv_kernel, 1)
        if init_scale not in INIT_SCALES:
            raise ValueError(f"init_scale={init_scale!r}: choose one of {', '.join(INIT_SCALES)}")
        if inner_step not in INNER_STEPS:
            raise ValueError(f"inner_step={inner_step!r}: choose one of {', '.join(INNER_STEPS)}")
        if momentum_form not in MOMENTUM_FORMS:
            raise ValueError(f"momentum_form={momentum_form!r}: choose one of {', '.join(MOMENTUM_FORMS)}")
        if forget_target not in FORGET_TARGETS:
            raise ValueError(f"forget_target={forget_target!r}: choose one of {', '.join(FORGET_TARGETS)}")
        self.value_norm, self.inner_step, self.momentum_form = value_norm, inner_step, momentum_form
        self.forget_target = forget_target
        inner = heads * head_dim

        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        # Depthwise causal conv; weight (C, 1, K). Identity at init so q/k/v start as plain projections.
        self.conv = nn.Conv1d(3 * inner, 3 * inner, self.conv_kernel, groups=3 * inner, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, -1] = 1.0
        n_rates = self.n_theta + 1 + self.n_alpha  # [theta (n_theta) | eta | alpha (n_alpha)] per head
        self.rates = nn.Linear(dim, heads * n_rates)
        with torch.no_grad():
            self.rates.weight.normal_(0.0, 0.02)
            bias = self.rates.bias.view(heads, n_rates)
            bias[:, : self.n_theta] = theta_bias
            bias[:, self.n_theta] = eta_bias
            bias[:, self.n_theta + 1 :] = alpha_bias
        dims = [head_dim] + [expansion * head_dim] * (depth - 1) + [head_dim]
        in_norm2 = _input_norms2(dims, init_scale)
        self.init_weights = nn.ParameterList(
            nn.Parameter(torch.randn(heads, dims[i], dims[i + 1]) * (init_std / math.sqrt(in_norm2[i])))
            for i in range(depth)
        )
        # Per memory layer: what theta is divided by under inner_step="normalized" (see _input_norms2).
        step_norm2 = _input_norms2(dims, "input_norm")
        self.register_buffer("theta_scale", torch.tensor([1.0 / n for n in step_norm2]), persistent=False)
        self.out_norm = nn.Parameter(torch.ones(heads, head_dim))  # per-head RMS norm scale
        self.gate = nn.Linear(dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    @property
    def theta_cols(self) -> int:
        """Inner learning rates per token and head given to the op: one per memory layer, or one for all."""
        return self.depth if self.n_theta > 1 or self.inner_step == "normalized" else 1

    # ---- state --------------------------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None) -> MemoryState:
        """The state before any token: learned W_0 for every row, zero momentum, nothing pending."""
        ref = self.init_weights[0]
        device = device or ref.device
        dtype = dtype or ref.dtype
        H, D, K = self.heads, self.head_dim, self.conv_kernel
        weights = self._initial(batch_size, device, dtype)
        momentum = tuple(torch.zeros(batch_size, *w.shape, device=device, dtype=dtype) for w in self.init_weights)
        empty = lambda *s: torch.zeros(batch_size, H, 0, *s, device=device, dtype=dtype)  # noqa: E731
        pending = (empty(D), empty(D), empty(self.theta_cols), empty(), empty(D) if self.channel_alpha else empty())
        conv_tail = torch.zeros(batch_size, K - 1, 3 * H * D, device=device, dtype=dtype)
        return MemoryState(weights, momentum, pending, conv_tail, conv_tail[..., : H * D].clone())

    def reset_state(self, state: MemoryState, rows: Tensor) -> MemoryState:
        """Reset the batch rows where `rows` (bool, (B,)) is True to the initial state (a document starts before
        the next token): W_0, zero momentum, no pending tokens (the next memory chunk starts at the document's
        first token) and zero conv tails. Same as `forward(..., reset=...)` with a reset at its first token."""
        fresh = self.init_state(rows.shape[0], state.conv_tail.device, state.conv_tail.dtype)

        def pick(new: Tensor, old: Tensor) -> Tensor:
            return torch.where(rows.view(-1, *([1] * (old.dim() - 1))), new.to(old.dtype), old)

        n = state.tokens_in_chunk
        lens = state.pending_len or (n,) * rows.shape[0]
        pending_len = tuple(0 if r else m for r, m in zip(rows.tolist(), lens))
        return MemoryState(
            tuple(map(pick, fresh.weights, state.weights)),
            tuple(map(pick, fresh.momentum, state.momentum)),
            state.pending,
            pick(fresh.conv_tail, state.conv_tail),
            pick(fresh.query_tail, state.query_tail),
            _uniform(pending_len, n),
        )

    # ---- projections ------------------------------------------------------------------------------------------------

    def _causal_conv(self, proj: Tensor, tail: Tensor, channels: slice,
                     reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """SiLU of a depthwise causal conv over time with the previous call's tail. proj: (B, T, C) -> (B, T, C).

        With `reset` (B, T) bool (document starts), a token sees zeros before its document's first token (a tap j
        tokens back counts only if no document starts in between), and the tail keeps zeros before the last start.
        The taps as one fused CPU kernel (or shifted multiply-adds), not F.conv1d: oneDNN's depthwise conv backward
        took 17% of a MAG training step at T = 2048 (`titans_train.ops.fused`).
        """
        seq = torch.cat([tail, proj], dim=1)  # (B, K - 1 + T, C)
        weight = self.conv.weight[channels, 0].t()  # (K, C); row K - 1 is the current token's tap
        K, T = self.conv_kernel, proj.shape[1]
        since = start = None
        if reset is not None:
            t = torch.arange(T, device=proj.device)
            start = torch.cummax(torch.where(reset, t, -K), dim=1).values  # (B, T) the last document start <= t
            since = t - start  # tokens since it (>= K where none in this call)
        out = causal_conv_silu(seq, weight, since)
        if reset is None:
            return out, seq[:, seq.shape[1] - (K - 1):]
        tail_pos = torch.arange(T - (K - 1), T, device=proj.device)  # positions of the new tail (< 0: old tail)
        keep = tail_pos[None, :] >= start[:, -1:]  # (B, K - 1)
        return out, seq[:, seq.shape[1] - (K - 1):] * keep[..., None]

    def _rates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """theta (B, H, T, n_theta), eta (B, H, T), alpha (B, H, T) or, channel-wise, (B, H, T, D)."""
        B, T, _ = x.shape
        r = self.rates(x)
        r = r.float() if r.dtype in (torch.float16, torch.bfloat16) else r  # rates always in >= fp32
        r = torch.sigmoid(r).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, n_theta + 1 + n_alpha)
        theta = self.max_lr * r[..., : self.n_theta]
        if self.inner_step == "normalized":
            theta = theta * self.theta_scale.to(theta.dtype)  # (B, H, T, depth)
        eta = r[..., self.n_theta]
        if self.momentum_form == "ema":  # S_t = eta S_(t-1) - (1 - eta) theta grad: momentum gain 1, not 1/(1-eta)
            theta = theta * (1.0 - eta)[..., None]
        alpha = r[..., self.n_theta + 1 :] if self.channel_alpha else r[..., -1]
        return theta, eta, alpha

    # ---- forward ---------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, state: MemoryState | None = None,
                reset: Tensor | None = None) -> tuple[Tensor, MemoryState]:
        """Write every token into the memory and read it back after its own update. x: (B, T, dim).

        reset: (B, T) bool, True at the first token of a document: from there on the row's memory is exactly what
        it would be with the document alone from the initial state (W_0, zero momentum, memory chunks from its
        first token, the conv seeing zeros before it).
        """
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
        if reset is not None and not bool(reset.any()):
            reset = None
        qkv, conv_tail = self._causal_conv(self.qkv(x), state.conv_tail.to(x.dtype), slice(None), reset)
        # (B, H, T, D) each: q and k L2-normalised per head; v at unit RMS (`value_norm`: targets on the scale of
        # M(k) = k + LN(f(k)))
        q, k, v = head_norms(qkv, self.heads, ("l2", "l2", "rms" if self.value_norm else None))
        # Under autocast the projections come out in bf16 but normalize runs in fp32: give the op one dtype (it
        # computes in fp32 anyway; the fast weights are fp32).
        dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), state.weights[0].dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        theta, eta, alpha = self._rates(x)

        # Replay the pending tokens of the current memory chunk from its anchor (their outputs are dropped).
        k_p, v_p, theta_p, eta_p, alpha_p = state.pending
        n_p = k_p.shape[2]
        if n_p:
            q = torch.cat([torch.zeros_like(k_p).to(q.dtype), q], dim=2)
            k, v = torch.cat([k_p.to(k.dtype), k], 2), torch.cat([v_p.to(v.dtype), v], 2)
            theta, eta, alpha = (torch.cat([a.to(b.dtype), b], 2) for a, b in ((theta_p, theta), (eta_p, eta), (alpha_p, alpha)))
        n = n_p + T
        n_full = n - n % self.chunk_size
        theta_arg = theta if self.theta_cols > 1 else theta[..., 0]
        kw = self._op_kw(q.device, state.weights[0].dtype)
        if reset is not None or state.pending_len is not None:
            y, weights, momentum, pending_len = self._documents(q, k, v, theta_arg, eta, alpha, state, reset, kw)
            m = max(pending_len)
            pending = tuple(t[:, :, n - m:] for t in (k, v, theta, eta, alpha))
            new_state = MemoryState(weights, momentum, pending, conv_tail, state.query_tail, _uniform(pending_len, m))
            return self._output(y, x), new_state
        weights, momentum, ys = state.weights, state.momentum, []
        if n_full:
            y, weights, momentum = memory_update(
                q[:, :, :n_full], k[:, :, :n_full], v[:, :, :n_full], theta_arg[:, :, :n_full],
                eta[:, :, :n_full], alpha[:, :, :n_full], weights, momentum, **kw,
            )
            ys.append(y)
        if n_full < n:  # the partial last memory chunk: read it now, keep its inputs for the next call
            y, _, _ = memory_update(
                q[:, :, n_full:], k[:, :, n_full:], v[:, :, n_full:], theta_arg[:, :, n_full:],
                eta[:, :, n_full:], alpha[:, :, n_full:], weights, momentum, **kw,
            )
            ys.append(y)
        y = torch.cat(ys, dim=2)[:, :, n_p:] if len(ys) > 1 or n_p else ys[0]
        pending = tuple(t[:, :, n_full:] for t in (k, v, theta, eta, alpha))
        new_state = MemoryState(weights, momentum, pending, conv_tail, state.query_tail)
        return self._output(y, x), new_state

    def _documents(self, q, k, v, theta, eta, alpha, state: MemoryState, reset: Tensor | None, kw: dict):
        """`forward`'s memory op over the n = n_p + T tokens (pending ones first) when documents start inside the
        call or the rows' memory chunks are not aligned (`pending_len`): per row, the tokens up to its last
        memory-chunk boundary in one op call with the resets (state = the anchor there), then the rest (its
        pending tokens) read from that anchor. Returns y (B, H, T, D) for the new tokens, the anchors and the
        pending count per row."""
        B, H, n, _ = q.shape
        n_p, b, dev = state.tokens_in_chunk, self.chunk_size, q.device
        pos = torch.arange(n, device=dev)
        present = self._own_pending(state, n)  # (B, n) the slots of other rows' longer pending are absent
        lens = present[:, :n_p].sum(dim=1)  # (B,) each row's own pending tokens
        starts = torch.zeros(B, n, dtype=torch.bool, device=dev)
        if reset is not None:
            starts[:, n_p:] = reset
        # Each row's last document starts at its last reset, else at its first own pending token (an old boundary).
        doc = torch.where(starts.any(dim=1), torch.where(starts, pos, -1).amax(dim=1), n_p - lens)
        m = (n - doc) % b  # (B,) tokens after the row's last memory-chunk boundary
        tail = pos[None, :] >= (n - m)[:, None]
        initial = self._initial(B, q.device, state.weights[0].dtype)
        y, weights, momentum = memory_update(q, k, v, theta, eta, alpha, state.weights, state.momentum, **kw,
                                             reset=starts, mask=present & ~tail, initial=initial)
        if bool(tail.any()):  # the pending tokens of the next call, read from their anchor (a document start: W_0)
            fresh = (starts & tail).any(dim=1).view(B, 1, 1, 1)
            weights = tuple(torch.where(fresh, w0, w) for w0, w in zip(initial, weights))
            momentum = tuple(torch.where(fresh, 0.0, s) for s in momentum)
            y_tail, _, _ = memory_update(q, k, v, theta, eta, alpha, weights, momentum, **kw, mask=tail)
            y = torch.where(tail[:, None, :, None], y_tail, y)
        return y[:, :, n_p:], weights, momentum, tuple(m.tolist())

    def _own_pending(self, state: MemoryState, n: int) -> Tensor:
        """(B, n) bool: False for the leading pending slots that belong to other rows (see `pending_len`)."""
        B, n_p = state.conv_tail.shape[0], state.tokens_in_chunk
        lens = torch.tensor(state.pending_len or (n_p,) * B, device=state.conv_tail.device)
        return torch.arange(n, device=lens.device)[None, :] >= (n_p - lens)[:, None]

    def retrieve(self, x: Tensor, state: MemoryState | None = None,
                 reset: Tensor | None = None) -> tuple[Tensor, MemoryState]:
        """Read the memory without writing it: M_W(q) with the weights after the state's last token.

        Uses the same q projection and conv as `forward` (with its own conv tail, carried in the returned
        state), so MAC can read with a segment's tokens before writing the attention output of that segment.
        With `reset` (B, T) bool, tokens from a row's document start on read the initial memory W_0 (and the
        conv sees zeros before it), and the returned state of that row is the initial one.
        """
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device)
        inner = self.heads * self.head_dim
        proj = F.linear(x, self.qkv.weight[:inner])
        q, query_tail = self._causal_conv(proj, state.query_tail.to(x.dtype), slice(0, inner), reset)
        (q,) = head_norms(q, self.heads, ("l2",))
        weights = self.current_weights(state)
        q = q.to(weights[0].dtype)
        y = memory_apply(q, weights, residual=self.residual, layer_norm=self.layer_norm, ln_eps=self.ln_eps)
        if reset is not None and bool(reset.any()):
            after = torch.cummax(reset.int(), dim=1).values.bool()  # (B, T) at or after a document start
            initial = self._initial(B, y.device, y.dtype)
            y0 = memory_apply(q, initial, residual=self.residual, layer_norm=self.layer_norm, ln_eps=self.ln_eps)
            y = torch.where(after[:, None, :, None], y0, y)
            state = self.reset_state(state, after[:, -1])
        new_state = dataclasses.replace(state, query_tail=query_tail)
        return self._output(y.to(x.dtype), x), new_state

    def current_weights(self, state: MemoryState) -> tuple[Tensor, ...]:
        """Fast weights after the state's last token (the anchor advanced over the pending tokens)."""
        if not state.tokens_in_chunk:
            return state.weights
        k_p, v_p, theta_p, eta_p, alpha_p = state.pending
        theta = theta_p if self.theta_cols > 1 else theta_p[..., 0]
        mask = self._own_pending(state, k_p.shape[2]) if state.pending_len is not None else None
        _, weights, _ = memory_update(k_p, k_p, v_p, theta, eta_p, alpha_p, state.weights, state.momentum, mask=mask,
                                      **self._op_kw(k_p.device, state.weights[0].dtype))
        return weights

    def _initial(self, batch_size: int, device, dtype) -> tuple[Tensor, ...]:
        """The learned W_0, one view per row."""
        return tuple(w.to(device, dtype).unsqueeze(0).expand(batch_size, *w.shape) for w in self.init_weights)

    def _op_kw(self, device, dtype) -> dict:
        """The memory op's arguments that come from this layer's configuration."""
        kw = dict(chunk_size=self.chunk_size, residual=self.residual, layer_norm=self.layer_norm, ln_eps=self.ln_eps,
                  compile=self.compile)
        if self.forget_target == "initial":  # W_0 with batch size 1: the op shares it between the rows
            kw["forget_to"] = self._initial(1, device, dtype)
        return kw

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head RMS norm, SiLU gate from the layer input, output projection. y: (B, H, T, D) -> (B, T, dim)."""
        return self.out_proj(gated_head_norm(y.to(x.dtype), self.out_norm, self.gate(x)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, depth={self.depth}, "
            f"chunk_size={self.chunk_size}, max_lr={self.max_lr}, n_theta={self.n_theta}, "
            f"channel_alpha={self.channel_alpha}, residual={self.residual}, layer_norm={self.layer_norm}, "
            f"ln_eps={self.ln_eps}, forget_target={self.forget_target}"
        )
