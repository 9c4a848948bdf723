"""Parameter and FLOP counting (used by `titans-train info` and the MFU metric).

FLOPs count multiply-adds as 2 and only the work that matters for the result (masked-out attention pairs are not
counted, like the 6N convention ignores kernel overheads). Training FLOPs per token = 3 x forward (backward ~ 2 x
forward). Forward FLOPs per token, at sequence length T:

    dense      2 x (weights and biases of every nn.Linear and nn.Conv1d; the output head included,
                    the embedding lookup not)
    attention  per attention layer: 4 x dim x ctx, ctx = keys a query sees on average over a sequence of T
               tokens from position 0 (QK^T and AV): full causal (T+1)/2, sliding window w:
               mean_i min(i+1, w), MAC: within-segment causal + visible memory tokens; + n_persistent
    memory     per memory layer and token, per head, per memory-MLP layer l with input a_l and output b_l, chunk c
               (the dual form of TITANS.md section 2): 12 a_l b_l + 2 c (a_l + b_l)
                 = 2ab keys through the anchor weights + 2ab error back to the layer input
                 + 4ab queries against W_0 and S_0 + 4ab chunk-end weights and momentum (rank-c updates)
                 + 2c(a+b) the causal c x c "attention" of queries against the chunk's keys and errors
               with `memory.channel_alpha`, + 2 c (c + 1) D for the first layer (a = D): its per-channel decay
               coefficients G1, F1 are a (c + 1) x c by c x D matmul per token of the chunk
    MAC extra  per MAC layer and token: the retrieval of h before the segment (query, gate and output
               projections, 3 x 2 dim^2; memory MLP forward 2 sum_l a_l b_l per head) and the key/value
               projection of the memory tokens (4 dim^2 per memory token, mac_memory_tokens per segment_len).

Elementwise work (norms, GELU, gates, rates, softmax) is left out; it is a few percent at these sizes.
"""

from __future__ import annotations

from torch import nn

from titans_train.config import ModelConfig


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters of `model`, each shared tensor once; `non_embedding` leaves out the token embedding table."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding and hasattr(model, "embed"):
        n -= model.embed.weight.numel()
    return n


def dense_flops_per_token(model: nn.Module) -> float:
    """Forward FLOPs per token of the projections: 2 x (weights + biases of every nn.Linear and nn.Conv1d)."""
    n = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            n += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    return 2.0 * n


def attention_context(cfg: ModelConfig, seq_len: int) -> float:
    """Average number of keys a query attends to over a sequence of `seq_len` tokens from position 0."""
    T = seq_len
    if cfg.variant == "lmm":
        return 0.0
    if cfg.variant == "mac":
        C, s = cfg.segment_len, cfg.mac_stride()

        def segment(n: int) -> int:  # sum over j = 1..n of j (segment keys) + j // s (complete memory tokens)
            q, r = divmod(n, s)
            return n * (n + 1) // 2 + s * q * (q - 1) // 2 + q * (r + 1)

        total = (T // C) * segment(C) + segment(T % C)
        return total / T + cfg.n_persistent
    w = cfg.window
    if w is None or w >= T:
        return (T + 1) / 2 + cfg.n_persistent
    # sum_i min(i+1, w) = w(w+1)/2 for the first w queries + w for each of the rest
    return (w * (w + 1) / 2 + (T - w) * w) / T + cfg.n_persistent


def memory_layer_dims(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of each memory-MLP layer: D -> eD -> ... -> eD -> D with D the memory head dim."""
    D = cfg.dim // cfg.memory_heads()
    dims = [D] + [D * cfg.memory.expansion] * (cfg.memory.depth - 1) + [D]
    return list(zip(dims[:-1], dims[1:]))


def memory_update_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one memory layer's update + retrieval (the dual form), all heads."""
    c = cfg.memory.chunk_size
    per_head = sum(12 * a * b + 2 * c * (a + b) for a, b in memory_layer_dims(cfg))
    if cfg.memory.channel_alpha:
        per_head += 2 * c * (c + 1) * memory_layer_dims(cfg)[0][0]
    return float(cfg.memory_heads() * per_head)


def mac_extra_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of MAC's retrieval before each segment and its memory tokens' keys/values."""
    retrieve = 3 * 2 * cfg.dim * cfg.dim + cfg.memory_heads() * sum(2 * a * b for a, b in memory_layer_dims(cfg))
    memory_tokens = 4 * cfg.dim * cfg.dim * cfg.mac_memory_tokens / cfg.segment_len
    return float(retrieve + memory_tokens)


def flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per token of `model` (a TitansLM) at `seq_len`."""
    cfg: ModelConfig = model.cfg
    T = cfg.max_seq_len if seq_len is None else seq_len
    if T < 1:
        raise ValueError(f"seq_len={T} must be >= 1")
    fwd = dense_flops_per_token(model)
    fwd += cfg.n_layers * 4 * cfg.dim * attention_context(cfg, T)
    if cfg.variant != "transformer":
        fwd += cfg.n_layers * memory_update_flops_per_token(cfg)
    if cfg.variant == "mac":
        fwd += cfg.n_layers * mac_extra_flops_per_token(cfg)
    return 3.0 * fwd
